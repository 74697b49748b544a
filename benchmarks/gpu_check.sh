#!/usr/bin/env bash
# GPU check, one command, ~6 minutes on one H100/H200 (installs nothing; needs torch, torchvision, timm,
# lightning, omegaconf, safetensors, scikit-learn and, for method=dino, lightly importable):
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#
# 1. the device-sensitive tests on CUDA and on the CPU (`pytest -m gpu tests/test_cuda.py`: concepts,
#    losses and gradients vs the CPU fp32 and a float64 reference, bf16 autocast, masking, EMA, feature
#    sets, checkpoint save -> load -> resume bit-identical on CUDA);
# 2. benchmarks/gpu_recipe.py: the ViT-S/16 paper recipe (2 x 224 + 10 x 96, paper-size feature sets,
#    bf16) at the largest batch that fits, SOVE and DINO, img/s, peak memory, the step's time split
#    (concept selection included), the input pipeline (loader and device paths) and determinism.
# Everything lands in $OUT: gpu_check.log, pytest_gpu.xml, gpu_recipe.json, gpu_recipe.md, determinism/gpu_recipe.*
# (docs/benchmarks.md, "GPU", reports them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  df -h /dev/shm | tail -1  # DataLoader workers hand batches over in shared memory
  "$PY" - <<'EOF' || exit 3
import importlib, sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
missing = []
for name in ("torchvision", "timm", "lightning", "omegaconf", "safetensors", "sklearn", "PIL", "matplotlib",
             "tensorboard", "pytest", "lightly", "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
        missing.append(name)
sys.exit(f"missing: {missing}" if missing else 0)
EOF
  # cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts, before trainer.deterministic could set it: set it for the
  # processes that check determinism (only those: it may slow the GEMMs that the speed figures time)
  CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 150 "$PY" -m pytest -m gpu -o addopts="" -p no:cacheprovider -rs -v \
    --junitxml "$OUT/pytest_gpu.xml" tests/test_cuda.py
  tests=$?
  echo "pytest -m gpu: exit $tests"
  timeout "${RECIPE_TIMEOUT:-420}" "$PY" benchmarks/gpu_recipe.py --out "$OUT" \
    --sections search sove dino pipeline e2e sove_tf32 "$@"
  recipe=$?
  CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 150 "$PY" benchmarks/gpu_recipe.py --out "$OUT/determinism" \
    --sections determinism --jpegs 512
  det=$?
  recipe=$(( recipe > det ? recipe : det ))
  echo "gpu_recipe: exit $recipe"
  date -u
  exit $(( tests > recipe ? tests : recipe ))
} 2>&1 | tee "$OUT/gpu_check.log"
