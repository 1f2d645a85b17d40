# Two commands do all the set-up on a fresh machine:
#   make quickstart   create .venv, install torch (CPU build) + embedscale[dev], run `embedscale train`
#   make test         same set-up, then the test suite
# Extra Hydra overrides for the quickstart: make quickstart ARGS="trainer.max_epochs=1"

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup quickstart test lint bench-st clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/embedscale train $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check embedscale tests bench
	$(BIN)/ruff format --check embedscale tests bench

bench-st: setup
	$(BIN)/python bench/st_mnrl_scifact.py $(ARGS)

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
