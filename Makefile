# One place for the set-up that README's commands and .ci/run share.
# CPU machines install torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
# GPU machines that already have torch: make test TORCH_SPEC=   (empty: keep the installed torch).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# megatron-core >= 0.17 (Megatron-LM main) needs Python >= 3.12: its tests run in a second venv where one exists.
# torch for Python 3.12 from the registry is a CUDA build (it runs on the CPU; ~5.5 GB, ~2 minutes here).
PYTHON_NEXT ?= $(shell for p in python3.12 python3.13 "$$(pyenv root 2>/dev/null)"/versions/3.1[2-9]*/bin/python3; do \
	"$$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && command -v "$$p" && break; done)
VENV_NEXT ?= .venv-next
TORCH_NEXT_SPEC ?= torch==2.14.1
NEXT_TESTS := tests/test_megatron.py tests/test_megatron_stack.py tests/test_megatron_checkpoint.py tests/test_megatron_gpt.py \
	tests/test_megatron_upstream.py tests/test_megatron_gtp.py tests/test_eo_hooks.py tests/test_megatron_qk_clip.py

.PHONY: setup setup-next demo test test-next bench docs lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash launch/train_cpu.sh

$(VENV_NEXT)/.installed: pyproject.toml Makefile
	$(PYTHON_NEXT) -m venv $(VENV_NEXT)
	$(if $(TORCH_NEXT_SPEC),$(VENV_NEXT)/bin/python -m pip install -q "$(TORCH_NEXT_SPEC)")
	$(VENV_NEXT)/bin/python -m pip install -q -e ".[test-next]"
	touch $@

setup-next: $(VENV_NEXT)/.installed

# Test files run on two pytest workers, a file per worker (its gloo world started once): the multi-process tests
# wait on each other and on timeouts, leaving cores idle. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

# The second environment is set up (mostly a download) while the main suite runs; its log: .venv-next.log.
test: setup
	@if [ -n "$(PYTHON_NEXT)" ]; then $(MAKE) --no-print-directory setup-next > $(VENV_NEXT).log 2>&1 & fi; \
	$(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; wait; [ $$status -eq 0 ] || exit $$status; \
	if [ -n "$(PYTHON_NEXT)" ]; then $(MAKE) --no-print-directory test-next; \
	else echo "SKIPPED: megatron-core >= 0.17 tests ($(NEXT_TESTS)): no Python >= 3.12 on this machine"; fi

# The Megatron tests again on megatron-core 0.19 (Megatron-LM main's API) and upstream's own Muon.
test-next: setup-next
	$(VENV_NEXT)/bin/python -m pytest $(PYTEST_ARGS) $(NEXT_TESTS)

bench: setup
	$(BIN)/python scripts/bench_ns.py

# The documentation site (mkdocs.yml, pages in docs/) into site/: a broken link, a missing anchor, a page left out of
# the nav or a missing included recipe fails the build. .ci/run runs it after the tests.
# The test extra includes the docs extra, so setup installs mkdocs.
docs: setup
	$(BIN)/python -m mkdocs build --strict

# ruff with the project's config (pyproject.toml [tool.ruff]); CI runs it before the tests.
lint: setup
	$(BIN)/python -m ruff check .
