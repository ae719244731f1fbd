# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing. torch is pinned first to the CPU build this
# environment ships; a bare range would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install demo test lint typecheck unit postgres
install: $(BIN)/.installed

demo: install
	$(BIN)/blasphemer demo

lint: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

typecheck: install
	$(BIN)/mypy

postgres:
	bash scripts/ensure_postgres.sh

unit: install postgres
	$(BIN)/python -m pytest -q

test: lint typecheck unit
