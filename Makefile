# One place for the set-up that README's commands and .ci/run share.
# CPU machines install torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
# GPU machines that already have torch: make test TORCH_SPEC=   (empty: keep the installed torch).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash launch/train_cpu.sh

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python scripts/bench_ns.py
