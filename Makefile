# `make demo` and `make test` work on a fresh machine: they create .venv and install dforce first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch where no NVIDIA GPU is present (an unpinned `torch` pulls a multi-GB CUDA build).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEMO_OUT ?= outputs/demo

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/dforce make-synthetic --out $(DEMO_OUT)/data --clips 256 --frames 32 --size 32 --overwrite
	$(BIN)/dforce plot-weights --frames 2 --levels 16 --out $(DEMO_OUT)/weights_2frames.png
	$(BIN)/dforce plot-weights --frames 8 --levels 1000 --cube-levels 16 --out $(DEMO_OUT)/weights_8frames.png

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
