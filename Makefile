# Developer entry points. Every target that runs code first runs the (idempotent, cached)
# setup, which needs root: it installs packages and builds CRIU on the first run.
VENV := .venv
PY := $(VENV)/bin/python
DUNIX := $(VENV)/bin/dunix

.PHONY: all setup test demo bench lint native
all: test

setup:
	bash scripts/setup.sh

native:
	$(MAKE) -C native

test: setup
	$(PY) -m pytest -q

# The cluster comes down even when `nodes` fails; the make exit code is that of `nodes`.
demo: setup
	$(DUNIX) cluster up -n 3
	$(DUNIX) nodes; rc=$$?; $(DUNIX) cluster down; exit $$rc

bench: setup
	$(PY) -m bench

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
