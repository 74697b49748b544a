# sove: the two README commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/fashion_mnist_tiny
FMNIST := /usr/share/datasets/fashion-mnist
# The exact tested versions (pyproject.toml states the supported ranges).
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup data demo test bench clean

$(BIN)/sove: pyproject.toml
	@t0=$$(date +%s); $(PYTHON) -m venv $(VENV) && t1=$$(date +%s) && \
	$(BIN)/pip install --quiet $(TORCH) -e '.[dev,bench]' && t2=$$(date +%s) && \
	echo "setup: venv $$((t1 - t0)) s, pip install (torch, timm, lightning, ...) $$((t2 - t1)) s"
	@touch $@

setup: $(BIN)/sove  ## virtual environment with sove, its dependencies and the tested torch / torchvision

data:  ## Fashion-MNIST: the Debian package where apt-get works, else data.root=PATH / data.download=true
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST found in $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "apt-get could not install dataset-fashion-mnist; pass data.root=PATH or data.download=true to sove"; \
	else echo "Fashion-MNIST not in $(FMNIST) and apt-get is not usable here: sove will look in ./data, or pass data.root=PATH or data.download=true (online)"; fi

# The demo fits DEMO_MINUTES of pretraining + evaluation on any machine: a probe times the evaluation here
# (sove.eval.knn.estimate_knn_seconds), pretraining gets the rest as trainer.time_budget (minus
# DEMO_OVERHEAD seconds for process start-ups, the final checkpoint and plot), then one k-NN pass.
DEMO_MINUTES  ?= 20
DEMO_OVERHEAD ?= 45
DEMO_CONFIG   ?= fashion_mnist_tiny
# 2 local crops instead of the preset's 4: as good per step, ~17% cheaper steps (docs/benchmarks.md, "Time-budgeted demo")
DEMO_RECIPE   ?= data.num_local_crops=2

demo: setup data  ## pretrain on Fashion-MNIST (CPU) for a time budget, then k-NN: trained vs random init vs raw pixels
	@start=$$(date +%s); \
	evals=$$($(BIN)/python -c "from sove.config import load_config; from sove.eval.knn import estimate_knn_seconds; \
print(round(estimate_knn_seconds(load_config('$(DEMO_CONFIG)', [a for a in '$(ARGS)'.split() if '=' in a]))))") || exit 2; \
	budget=$$(( $(DEMO_MINUTES) * 60 - ($$(date +%s) - start) - evals - $(DEMO_OVERHEAD) )); \
	echo "demo: evaluation estimated at $$evals s on this machine -> pretraining budget $$budget s ($(DEMO_MINUTES) min in all)"; \
	[ $$budget -gt 60 ] || { echo "demo: less than a minute left for pretraining; raise DEMO_MINUTES"; exit 2; }; \
	$(BIN)/sove pretrain --config $(DEMO_CONFIG) --overwrite trainer.time_budget=$$budget $(DEMO_RECIPE) $(ARGS) && \
	t1=$$(date +%s) && \
	$(BIN)/sove eval knn --run $(RUN) --all && \
	t2=$$(date +%s) && \
	$(BIN)/sove summary $(RUN) && \
	steps=$$($(BIN)/python -c "from sove.train.checkpoint import load_checkpoint; print(load_checkpoint('$(RUN)/checkpoints/last.pt')['step'])") && \
	echo "demo time: pretraining $$(( (t1 - start) / 60 )) min $$(( (t1 - start) % 60 )) s ($$steps steps, probe included)," \
	  "evaluation $$(( (t2 - t1) / 60 )) min $$(( (t2 - t1) % 60 )) s; total $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"

test: setup  ## the test suite (tiny models, CPU, a few minutes)
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/step_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
