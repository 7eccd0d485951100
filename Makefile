# The README's two set-up commands: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium

.PHONY: demo test lint screenshot bench-indexing clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	$(VENV)/bin/pip install --quiet --no-deps clip-retrieval==2.45.0  # its ClipClient, for tests/api (no back end)
	touch $(STAMP)

# The browser tests (tests/web) drive Debian's chromium through Playwright (`playwright install` cannot download a
# browser here): installed when missing, as root; otherwise the command to run is printed.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "tests/web need Debian's chromium: sudo apt-get install -y chromium" >&2; exit 1; \
	fi

demo: $(STAMP)
	$(VENV)/bin/python -m cli.demo

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# docs/page.png, the README's picture of the page: the demo's collection searched in headless Chromium.
screenshot: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/python -m tests.web.screenshot docs/page.png

bench-indexing: $(STAMP)
	$(VENV)/bin/python bench/indexing.py

clean:
	rm -rf $(VENV) demo-data
