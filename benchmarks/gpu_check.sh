#!/usr/bin/env bash
# GPU check (installs nothing): a 50-step ViT-S/16 224 px SOVE step benchmark on generated images with
# paper-size feature sets (E_C 65536, K 8192, k 8, 4 CLS tasks; E_P 8192, K 512), bf16 autocast.
# Prints images/s, peak GPU memory and each phase's share of the step (concept selection included),
# then the paper-size concept selection alone, then the input pipeline (benchmarks/data_speed.py). Needs torch, timm, lightning, omegaconf importable.
#   bash benchmarks/gpu_check.sh            # ~3-5 minutes on one H100/H200
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
timeout 420 "$PY" benchmarks/step_speed.py --config imagenet_vit_small --device cuda --steps 50 optim.batch_size=64
timeout 60 "$PY" benchmarks/step_speed.py --selection-only --device cuda
timeout 300 "$PY" benchmarks/data_speed.py --device cuda --skip-steps   # input pipeline: device path on the GPU
