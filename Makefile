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
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) -e '.[dev,bench]'
	@touch $@

setup: $(BIN)/sove  ## virtual environment with sove, its dependencies and the tested torch / torchvision

data:  ## Fashion-MNIST: the Debian package where apt-get works, else data.root=PATH / data.download=true
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST found in $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "apt-get could not install dataset-fashion-mnist; pass data.root=PATH or data.download=true to sove"; \
	else echo "Fashion-MNIST not in $(FMNIST) and apt-get is not usable here: sove will look in ./data, or pass data.root=PATH or data.download=true (online)"; fi

demo: setup data  ## pretrain on Fashion-MNIST (CPU), then k-NN: trained vs random init vs raw pixels
	@start=$$(date +%s); \
	$(BIN)/sove pretrain --config fashion_mnist_tiny --overwrite $(ARGS) && \
	$(BIN)/sove eval knn --run $(RUN) && \
	$(BIN)/sove eval knn --run $(RUN) --random-init && \
	$(BIN)/sove eval knn --run $(RUN) --pixels && \
	$(BIN)/sove summary $(RUN) && \
	echo "demo time (pretrain + evaluation): $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"

test: setup  ## the test suite (tiny models, CPU, a few minutes)
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/step_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
