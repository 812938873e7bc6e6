# clm-runner developer commands. `make smoke-test` and `make test` each install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# torch: pip's default Linux build of torch bundles CUDA (several GB). Where `nvidia-smi` finds no GPU
# we also ask PyTorch's CPU index; where it finds one, pip's default CUDA build is what you want. The
# variables below are expanded only when torch is about to be installed, so no other target pays for them.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Where that index cannot be reached (a closed network with its own mirror), pip would retry it for
# minutes before falling back, so it is asked only when a 3-second connection to it succeeds.
TORCH_CPU_HOST ?= download.pytorch.org
HAS_GPU = $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
CPU_INDEX_REACHABLE = $(shell $(PYTHON) -c "import socket; socket.create_connection(('$(TORCH_CPU_HOST)', 443), 3)" >/dev/null 2>&1 && echo yes)
TORCH_INSTALL = $(TORCH_SPEC) $(if $(HAS_GPU),,$(if $(CPU_INDEX_REACHABLE),--extra-index-url $(TORCH_CPU_INDEX)))

# Tests and the smoke test never touch the network.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install smoke-test test fault-test fuzz lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_INSTALL)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

smoke-test: install
	rm -rf runs/smoke runs/smoke-lora runs/smoke-lora-merged
	$(OFFLINE) $(BIN)/clm-runner train --recipe recipes/smoke.toml
	$(OFFLINE) $(BIN)/clm-runner eval --run runs/smoke
	$(OFFLINE) $(BIN)/clm-runner train --recipe recipes/smoke-lora.toml
	$(OFFLINE) $(BIN)/clm-runner eval --run runs/smoke-lora
	$(OFFLINE) $(BIN)/clm-runner export --run runs/smoke-lora --merge --output runs/smoke-lora-merged

test: install
	$(OFFLINE) $(BIN)/python -m pytest -q

# Kill a real run at every named fault point (and fill its disk, take its permissions) and resume it.
fault-test: install
	$(OFFLINE) $(BIN)/python -m pytest -q -m fault tests/integration/test_faults.py

# A longer, freshly random search of the recipe reader (make test runs a fixed, reproducible one).
fuzz: install
	$(OFFLINE) HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q tests/config/test_fuzz.py

lint: install
	$(BIN)/ruff check clm_runner tests benchmarks scripts
	$(BIN)/ruff format --check clm_runner tests benchmarks scripts

format: install
	$(BIN)/ruff format clm_runner tests benchmarks scripts
	$(BIN)/ruff check --fix clm_runner tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache .ruff_cache
