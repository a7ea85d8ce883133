# The two commands a newcomer needs are `make demo` and `make test`; both run `make setup` first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-unit test-integration lint proto bench clean-lab

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests/unit tests/integration

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: setup
	$(PY) -m api.build

bench: setup
	$(PY) -m bench run

clean-lab:
	$(PY) -m cli.ambitctl lab down --all
