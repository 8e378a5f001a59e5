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

# The main job: a local 3-host cluster runs examples/demo.sh with `dunix run`, shows where
# each process ran, and comes down again (also when the job fails; make exits with its code).
demo: setup
	$(DUNIX) cluster up -n 3 --cpu-quota 0.5
	$(DUNIX) nodes
	cd $(CURDIR) && $(DUNIX) run --node n1 -- ./examples/demo.sh; rc=$$?; \
	$(DUNIX) cluster down; exit $$rc

bench: setup
	$(PY) -m bench

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
