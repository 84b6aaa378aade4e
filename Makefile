# Two commands: `make demo` (set up and run the demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.m3net-installed

.PHONY: demo test lint bench clean

# torch is pinned first: 2.13.0 is the CPU wheel on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
$(STAMP): M3NetCore/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e 'M3NetCore[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/m3net demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check M3NetCore Testing benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/latency.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
