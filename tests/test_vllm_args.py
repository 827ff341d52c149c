"""`backend=vllm` without vLLM (the default suite): the engine arguments it would start with on a
GPU node (a fake `torch.cuda.mem_get_info`, a Llama-3.1-shaped config), the hub id it hands
vLLM, how it reads vLLM's finish reasons, and what a worker does with an engine that failed or
a sweep point that the engine serves. The engine itself: tests/backend_vllm (`make test-vllm`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import problem, tiny_loaded
from transformers import LlamaConfig

from pipeline.config import Config
from pipeline.engine.backends import vllm as vb
from pipeline.engine.backends.base import EngineError, GenerationRequest
from pipeline.engine.backends.native import NativeBackend
from pipeline.method.solver import Solver

GIB = 1 << 30
H100 = 79.6 * GIB  # what mem_get_info reports as total on an 80 GB H100


def llama31_loaded(dtype=torch.bfloat16) -> SimpleNamespace:
    """What the engine arguments read of a loaded Llama-3.1-8B: its config and weights' dtype."""
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, vocab_size=128256,
    )  # fmt: skip
    weight = torch.zeros(1, dtype=dtype)
    model = SimpleNamespace(config=config, parameters=lambda: iter([weight]))
    return SimpleNamespace(model=model, dtype=dtype)


@pytest.fixture
def h100_after_hf_copy(monkeypatch):
    """An H100 with a 7B-8B model's HF copy resident: 64 GiB free of 79.6."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * GIB, int(H100)))


def test_gpu_memory_utilization_fits_what_is_free_after_the_hf_copy(h100_after_hf_copy):
    share = vb.gpu_memory_utilization(torch.device("cuda:0"))
    # vLLM refuses to start unless free >= share x total; its default 0.92 asks 73 GiB
    assert share * H100 <= 64 * GIB - vb.GPU_MARGIN_BYTES
    assert 0.92 * H100 > 64 * GIB
    assert share == pytest.approx((64 - 2) * GIB / H100, abs=1e-3)


def test_gpu_memory_utilization_refuses_a_full_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, int(H100)))
    with pytest.raises(RuntimeError, match="GiB free"):
        vb.gpu_memory_utilization(torch.device("cuda:0"))


def test_engine_args_on_a_gpu_node_for_llama31(h100_after_hf_copy):
    cfg = Config(max_new_tokens=1024, verifier_max_new_tokens=256, batch_size=128)
    kwargs = vb.engine_kwargs_for(llama31_loaded(), cfg, torch.device("cuda:0"))
    # the run's need (1024 prompt + 1024 answer + 256 verifier, rounded up), not 131072
    assert kwargs["max_model_len"] == 3072
    assert kwargs["max_num_seqs"] == 128 and kwargs["dtype"] == "bfloat16"
    assert kwargs["gpu_memory_utilization"] * H100 <= 64 * GIB
    # CUDA graphs on, and the KV pool sized by vLLM from what it was given
    assert "enforce_eager" not in kwargs and "kv_cache_memory_bytes" not in kwargs


def test_engine_args_on_cpu_are_eager_with_a_pool_that_holds_a_full_request():
    cfg = Config(max_new_tokens=4096, verifier_max_new_tokens=4096, batch_size=1)
    kwargs = vb.engine_kwargs_for(llama31_loaded(torch.float32), cfg, torch.device("cpu"))
    assert kwargs["enforce_eager"] is True and kwargs["max_model_len"] == 9216
    per_token = 32 * 2 * 8 * 128 * 4  # layers x (K, V) x KV heads x head dim x fp32
    assert kwargs["kv_cache_memory_bytes"] >= per_token * 9216
    assert "gpu_memory_utilization" not in kwargs


def test_context_never_exceeds_the_model_and_user_args_win(h100_after_hf_copy):
    small = llama31_loaded()
    small.model.config.max_position_embeddings = 2048
    assert vb.engine_kwargs_for(small, Config(), torch.device("cpu"))["max_model_len"] == 2048
    cfg = Config(vllm_engine_args={"max_model_len": 8192, "gpu_memory_utilization": 0.5})
    kwargs = vb.engine_kwargs_for(llama31_loaded(), cfg, torch.device("cuda:0"))
    assert (kwargs["max_model_len"], kwargs["gpu_memory_utilization"]) == (8192, 0.5)


def test_vllm_engine_args_from_the_command_line():
    from pipeline.config import ConfigError, parse_overrides

    values = parse_overrides(Config, ["vllm_engine_args={max_model_len: 8192, block_size: 16}"])
    assert values == {"vllm_engine_args": {"max_model_len": 8192, "block_size": 16}}
    with pytest.raises(ConfigError, match="mapping"):
        parse_overrides(Config, ["vllm_engine_args=[1, 2]"])


def test_a_hub_id_goes_to_vllm_as_its_local_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def snapshot(repo_id, local_files_only):
        calls.append((repo_id, local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model = SimpleNamespace(name_or_path="org/model", config=SimpleNamespace())
    loaded = SimpleNamespace(model=model)
    assert vb.model_directory(loaded, Config(model="org/model")) == str(tmp_path)
    vb.model_directory(loaded, Config(model="org/model", allow_download=True))
    assert calls == [("org/model", True), ("org/model", False)]


def _output(tokens, reason, stop_reason=None):
    completion = SimpleNamespace(token_ids=tokens, finish_reason=reason, stop_reason=stop_reason)
    return SimpleNamespace(outputs=[completion], num_cached_tokens=0)


def test_finish_reasons_are_read_from_the_engine():
    backend = SimpleNamespace(eos_ids={2})
    req = GenerationRequest([5, 6], 3)
    result = vb.VllmBackend._result(backend, req, _output([7, 2], "stop", 2))
    assert (result.tokens, result.finish_reason) == ([7, 2], "eos")
    assert vb.VllmBackend._result(backend, req, _output([7, 8, 9], "length")).finish_reason == (
        "length"
    )
    for bad in (_output([7], "abort"), _output([7], "length"), _output([7, 8], "stop")):
        with pytest.raises(RuntimeError, match="finish_reason"):
            vb.VllmBackend._result(backend, req, bad)


class ServingBackend(NativeBackend):
    """The native engine, posing as a serving engine that serves configs with lr <= 1."""

    def __init__(self, loaded, cfg=None):
        super().__init__(loaded, cfg)
        self.closed = 0

    def serves(self, cfg) -> bool:
        return cfg.lr <= 1.0

    def close(self) -> None:
        self.closed += 1


def test_a_sweep_point_the_engine_serves_keeps_it_and_another_closes_it():
    loaded = tiny_loaded()
    cfg = Config(method=["cot"], max_new_tokens=4)
    engine = ServingBackend(loaded)
    first = Solver(cfg, loaded, backend=engine)
    second = first.reconfigure(cfg.replace(lr=0.5))
    assert second.backend is engine and engine.closed == 0 and second.cfg.lr == 0.5
    assert second.run("cot", [problem()])[0].error == ""
    third = second.reconfigure(cfg.replace(lr=2.0))
    assert third.backend is not engine and engine.closed == 1


def test_an_engine_failure_ends_the_worker_process(monkeypatch):
    from pipeline.run import workers

    class Exited(Exception):
        pass

    def fail(*args, **kwargs):
        raise EngineError("step failed")

    def exit_(code):
        raise Exited(code)

    worker = object.__new__(workers.EvalWorker)
    worker.name, worker.settings = "w", None
    worker.solver = SimpleNamespace(run=fail)
    monkeypatch.setattr(workers.os, "_exit", exit_)
    with pytest.raises(Exited):
        worker._run("cot", [problem(), problem(pid="p1")])
