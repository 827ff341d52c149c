"""The memory plan (pipeline/engine/memory.py): parameter counts from config.json alone, the
items worked out by hand, and a run refused before any worker starts when it cannot fit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from jobs.preflight import check_memory, preflight
from pipeline.config import Config
from pipeline.engine.generation import kv_bytes_per_token
from pipeline.engine.memory import (
    GIB,
    H100_GIB,
    RUNTIME_BYTES,
    VLLM_RUNTIME_BYTES,
    ModelShape,
    Workload,
    plan_memory,
    shape_config,
    shape_names,
    workload,
)
from pipeline.run.pool import RunError

# The model cards' sizes (parameters, tied embeddings counted once).
PUBLISHED = {
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-7b": 7.6e9,
    "qwen2-7b": 7.6e9,
    "llama-3.1-8b": 8.0e9,
    "qwen2.5-14b": 14.8e9,
}


def test_parameter_counts_match_the_published_sizes_and_transformers_own_models():
    """From the shapes alone: within 1% of the model cards, and exactly the count (and the KV
    bytes per token) of the model transformers builds from the same config (on the meta
    device: no memory)."""
    assert set(PUBLISHED) | {"tiny"} == set(shape_names())
    for name in shape_names():
        config = shape_config(name)
        shape = ModelShape.from_config(config, name)
        if name in PUBLISHED:
            assert shape.parameters() == pytest.approx(PUBLISHED[name], rel=0.01), name
        keep = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.for_model(**keep), dtype=torch.bfloat16
            )
        unique = {id(p): p for p in model.parameters()}.values()
        assert shape.parameters() == sum(p.numel() for p in unique), name
        assert shape.kv_bytes_per_token(2) == kv_bytes_per_token(model), name


def test_native_plan_items_worked_out_by_hand():
    """tiny: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocabulary 512, untied,
    Qwen2 (q, k, v biases)."""
    shape = ModelShape.from_config(shape_config("tiny"), "tiny")
    # embeddings 512*64 x 2 (untied) = 65536; a layer: q 64*64+64, k and v 64*32+32 each,
    # o 64*64, MLP 3*64*128, norms 2*64 = 4160 + 2*2080 + 4096 + 24576 + 128 = 37120;
    # 2 layers + the final norm 64: 65536 + 74240 + 64.
    assert shape.parameters() == 139840
    load = Workload(rows=4, prompt_tokens=16, answer_tokens=16, verifier_tokens=8,
                    update_length=10, task_problems=8)  # fmt: skip
    plan = plan_memory(shape, "float32", load, device_bytes=2 * GIB, device_name="test")
    items = {what: b for what, b, _ in plan.items}
    kv_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x 4 B = 512
    assert load.row_tokens == 16 + 16 + 8 + 1
    assert items["weights"] == 139840 * 4
    assert items["KV cache"] == 4 * 41 * kv_token
    assert items["cached prompts"] == 8 * 16 * kv_token
    # the prefill chunk (16 prompts of 16 tokens: cache twice, MLP 2*128 + 4*64 wide) is larger
    # than the decode logits (4 x 512 x 8) and the latent step (10 x 512 x 12)
    chunk = 16 * 16
    assert items["activations"] == 2 * chunk * kv_token + chunk * (2 * 128 + 4 * 64) * 4
    assert items["runtime"] == RUNTIME_BYTES
    assert plan.total == sum(items.values()) and plan.fits
    assert plan.max_rows > 4 and plan.refusal() == ""


def test_vllm_plan_holds_two_copies_and_a_pool_of_at_least_one_full_context():
    shape = ModelShape.from_config(shape_config("llama-3.1-8b"))
    load = Workload(rows=1, prompt_tokens=512, answer_tokens=1024, verifier_tokens=256,
                    update_length=300, task_problems=4)  # fmt: skip
    native = plan_memory(shape, "bfloat16", load)
    vllm = plan_memory(shape, "bfloat16", load, backend="vllm")
    items = {what: b for what, b, _ in vllm.items}
    assert items["HF copy: weights"] == items["vLLM: weights"] == shape.parameters() * 2
    assert load.context == 3072  # 1024 (prompt allowance) + 1024 + 256, rounded up to 1024
    assert items["vLLM: KV pool"] == 3072 * 128 * 1024  # one row: a full context at 128 KiB
    assert items["vLLM: runtime"] == VLLM_RUNTIME_BYTES
    assert vllm.total > native.total + shape.parameters() * 2


def test_the_plan_on_an_80gb_h100_fits_natively_and_refuses_14b_beside_vllm():
    """The defaults (batch_size 32, 1024 answer tokens, the self-reward's 256): Qwen2.5-14B
    fits natively, not with vLLM's second copy; the refusal says what to change."""
    h100 = int(H100_GIB * GIB)
    load = workload(Config())
    for name in ("qwen2.5-7b", "llama-3.1-8b", "qwen2.5-14b"):
        plan = plan_memory(shape_config(name), "bfloat16", load, "native", h100, "H100")
        assert plan.fits, plan.lines()
    plan = plan_memory(shape_config("qwen2.5-14b"), "bfloat16", load, "vllm", h100, "H100")
    assert not plan.fits
    message = plan.refusal()
    assert f"lower batch_size to {plan.max_rows} or less" in message
    assert "device_memory_gib" in message and "backend=native" in message
    smaller = plan_memory(shape_config("qwen2.5-14b"), "bfloat16",
                          workload(Config(batch_size=plan.max_rows)), "vllm", h100, "H100")  # fmt: skip
    assert smaller.fits and plan_memory(
        shape_config("qwen2.5-14b"), "bfloat16",
        workload(Config(batch_size=plan.max_rows + 1)), "vllm", h100, "H100",
    ).refusal()  # fmt: skip


def test_a_run_that_cannot_fit_is_refused_in_preflight_with_the_numbers(tmp_path):
    """Before any worker starts: a stated device too small stops the run in preflight naming
    the keys; the plan the driver logs (once it holds the run directory, so that a second
    driver's one line stays one line) comes from the directory's config.json (no weights read)."""
    model = tmp_path / "qwen14"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(shape_config("qwen2.5-14b")))
    (model / "model.safetensors").write_bytes(b"")  # the source check wants weights to exist
    lines: list[str] = []
    cfg = Config(model=str(model), limit=1, dtype="bfloat16", device_memory_gib=80.0)
    preflight(cfg, tmp_path / "run", lambda m: None)  # 14B natively: fits in 80 GiB
    check_memory(cfg, lines.append)
    assert lines[-1].startswith("  total") and "of 80.0 GiB" in lines[-1] and "fits" in lines[-1]
    assert any(line.startswith("memory plan: ") and "14.77B" in line for line in lines)
    with pytest.raises(RunError, match=r"needs \d+\.\d GiB per device, the device has 24\.0 GiB"):
        preflight(cfg.replace(device_memory_gib=24.0), tmp_path / "run", lambda m: None)
    with pytest.raises(RunError, match=r"lower batch_size to \d+ or less"):  # two copies
        check_memory(cfg.replace(backend="vllm"), lambda m: None)
