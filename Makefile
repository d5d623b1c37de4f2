# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
#   TORCH: the torch requirement installed first. Default `torch`: pip's normal build for the
#          platform (on Linux x86-64 the CUDA build, several GB). CI pins the CPU build:
#          TORCH=torch==2.13.0. For the CPU build from PyTorch's CPU index on other machines:
#          make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   TORCH_INDEX: optional package index for the torch install only (empty: PyPI).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: test demo bench notebooks clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

$(BIN)/.notebooks: $(BIN)/.installed
	$(BIN)/python -m pip install -e ".[dev,notebooks]"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

demo: $(BIN)/.installed
	$(BIN)/python -m torch_impl demo

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_reference.py

# JupyterLab on the tutorials, in the project's environment
notebooks: $(BIN)/.notebooks
	$(BIN)/python -m jupyter lab tutorials/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
