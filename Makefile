# Every routine task has a target. `make up` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install up test test-unit lint fmt typecheck bench clean check

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tradeplane needs Python 3.11+; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev tools

up: $(STAMP)  ## run the whole platform (embedded servers unless TRADEPLANE_*_URL are set)
	$(BIN)/tradeplane up

test: $(STAMP)  ## run the whole test suite (embedded servers unless TRADEPLANE_TEST_*_URL are set)
	$(BIN)/python -m pytest

test-unit: $(STAMP)  ## unit tests only (no servers)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)  ## ruff lint + format check, import contracts
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

fmt: $(STAMP)  ## format and autofix
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

typecheck: $(STAMP)  ## mypy strict
	$(BIN)/mypy

check: $(STAMP)  ## health of PostgreSQL, Redis and the bus, with a write/read test
	$(BIN)/tradeplane check --test

bench: $(STAMP)  ## run the benchmarks in tests/bench and print their figures
	@for b in tests/bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove the virtualenv and caches (keeps the .tradeplane data folder)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
