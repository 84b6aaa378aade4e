# Two commands: `make demo` (set up and run the demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.m3net-installed
TEST_STAMP := $(VENV)/.m3net-test-installed

.PHONY: demo test lint bench clean

# torch is pinned first: 2.13.0 is the CPU wheel on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
$(STAMP): M3NetCore/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e 'M3NetCore[dev]'
	touch $@

# The Slicer module's tests add slicer-core (Slicer's MRML, logics and renderers as a wheel).
$(TEST_STAMP): $(STAMP) Testing/slicer_module/requirements.txt
	$(BIN)/python -m pip install --quiet -r Testing/slicer_module/requirements.txt
	touch $@

demo: $(STAMP)
	$(BIN)/m3net demo --out demo-output

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check M3NetCore M3NetSlicer Testing benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/latency.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
