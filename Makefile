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

# The container image (daemonset/Dockerfile), on a Debian machine from nothing: scripts/build-image.sh starts a
# private dockerd when none answers and makes the debian:bookworm-slim base with debootstrap when no registry does
# (docs/operations.md, "Building the image"). TAG=REGISTRY/ambit:VERSION names it (default ambit:dev).
.PHONY: image image-test image-lock
image:
	bash scripts/build-image.sh $(if $(TAG),--tag $(TAG))

# The image built, then run as the manifests run it (scripts/image_check.py): the controller as uid 1337 on a
# read-only root, an agent compiling and attaching its eBPF program, both stopped by SIGTERM. Needs the host's kernel
# headers linked, hence setup.
image-test: setup
	bash scripts/build-image.sh --check $(if $(TAG),--tag $(TAG))

# The image's Python lock (daemonset/requirements.lock), written again from pyproject.toml and PyPI: pinned versions
# with every file's hash, checked by pip for amd64 and arm64 (docs/operations.md, "Building the image").
image-lock: setup
	$(PY) scripts/lock_image_deps.py
