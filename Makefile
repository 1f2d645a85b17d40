# Two commands do all the set-up on a fresh machine:
#   make quickstart   create .venv, install the lock (requirements/lock.txt: torch CPU build + every dependency,
#                     exact versions), run `embedscale train`
#   make test         same set-up, then the whole test suite (what CI runs); make test-fast: the quick tier
# Extra Hydra overrides for the quickstart: make quickstart ARGS="trainer.max_epochs=1"
# Newer dependencies: make lock (the only step that asks the registry for newer versions), then make test.

PYTHON ?= python3
VENV ?= .venv
LOCK := requirements/lock.txt
BIN := $(VENV)/bin
ARGS ?=
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK))
# torch's CPU build: this kind of machine keeps its wheel in /opt/wheels; elsewhere PyTorch's CPU index serves it
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
UV_PIP = $(BIN)/uv pip --quiet

.PHONY: setup quickstart test test-fast lock lint bench-st clean

$(BIN)/uv:
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else f"$(LOCK) pins wheels for Python 3.11, but $(PYTHON) is {v[0]}.{v[1]}: run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)

$(BIN)/.installed: $(LOCK) pyproject.toml | $(BIN)/uv
	# exactly the lock (sync: nothing resolved on the day, nothing left over from an older lock), then the package;
	# bytecode compiled now, as pip does: with PYTHONDONTWRITEBYTECODE set, every process would compile its imports
	$(UV_PIP) sync --compile-bytecode --python $(BIN)/python $(TORCH_SOURCE) $(LOCK)
	$(UV_PIP) install --python $(BIN)/python --no-deps -e .
	$(UV_PIP) check --python $(BIN)/python
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/embedscale train $(ARGS)

# --durations: the 40 slowest tests in the log, to keep CI under its 30 minutes
test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q --durations=40 $(ARGS)

# the quick tier: no test that starts processes, ranks, SLURM jobs or loads the real model (< 3 min on 2 cores)
test-fast: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lock: | $(BIN)/uv
	UV=$(BIN)/uv bash requirements/lock.sh

lint: setup
	$(BIN)/ruff check embedscale tests bench
	$(BIN)/ruff format --check embedscale tests bench

bench-st: setup
	$(BIN)/python bench/st_mnrl_scifact.py $(ARGS)

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
