# The two README commands. Each sets up its own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU machine install your CUDA torch into $(VENV) first and this is a no-op.
TORCH ?= torch==2.13.0
NUM_GPUS ?= 2
ARGS ?=

.PHONY: setup train test test-fast lint format

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,eval,trl]"
	touch $@

setup: $(VENV)/.installed

# The main job: smoke preset, offline corpus, 2 ranks (on CPU without a GPU).
train: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" deepspeed --num_gpus $(NUM_GPUS) launchers/pretrain.py --ds_config ds_configs/zero2.json $(ARGS)

# Everything CI runs: unit, slow, distributed and end-to-end tests.
test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest tests $(ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow and not distributed and not e2e" $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .
