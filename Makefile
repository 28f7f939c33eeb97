# Two commands on a fresh machine: `make demo` (the default job) and `make test` (the test suite).
# Each creates the virtual environment $(VENV) and installs the pinned versions on first use (with the
# `convert` extra: the demo's smollm2-135m source is read from a GGUF file; and `serve`: `spikelm serve` and its tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spikelm-installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml requirements/constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt torch
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test,convert,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spikelm demo

# the layering of the package (pyproject.toml: [tool.importlinter]), lint and format (ruff); before any test
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check

test: lint
	$(PY) -m pytest

test-fast: lint
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
