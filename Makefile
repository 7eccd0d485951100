# The README's two set-up commands: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-indexing clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	$(VENV)/bin/pip install --quiet --no-deps clip-retrieval==2.45.0  # its ClipClient, for tests/api (no back end)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m cli.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench-indexing: $(STAMP)
	$(VENV)/bin/python bench/indexing.py

clean:
	rm -rf $(VENV) demo-data
