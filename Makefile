# The two commands of the README:  `make demo`  and  `make test`.
VENV ?= .venv
export VENV

.PHONY: setup demo test lint bench-startup

setup:
	@KIT=$(KIT) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/appliance demo

test: setup
	$(VENV)/bin/python -m pytest -q -rs

# The checks that keep the house standing (docs/ARCHITECTURE.md): style, import contracts, types.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench-startup: setup
	$(VENV)/bin/python bench/startup.py
