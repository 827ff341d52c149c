"""`make gpu-check` (jobs/gpu_check.py) on the CPU in float32, cheaply (a tiny model directory):
the engine's invariants hold, the engine and `model.generate` are timed like for like, a gate
above what is met fails, and fewer than 64 problems give no verdict."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs.gpu_check import main, verdict
from pipeline.config import Config
from pipeline.engine.model import embedded_gguf_path, gguf_cache_dir


def tiny_instruct(path: Path, embedded) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer (and chat template), saved as
    a model directory: `--model` as a user gives it, at a fraction of SmolLM2's cost."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_cache_dir(embedded_gguf_path(),
                                                             Config().model_cache_dir))  # fmt: skip
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         initializer_range=0.3, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gpu_check_on_cpu_writes_its_json_and_fails_a_gate_above_what_is_met(
    tmp_path, capsys, embedded
):
    """float32 against float32 on two problems: every answer, top-1 prediction and captured
    position agrees, so only a same-answer gate above 1 can fail, and it does, by name."""
    threads = torch.get_num_threads()
    out = tmp_path / "check.json"
    model = tiny_instruct(tmp_path / "tiny", embedded)
    try:
        code = main(["--model", str(model), "--device", "cpu", "--dtype", "float32",
                     "--problems", "2", "--max-new-tokens", "6", "--tensor-parallel", "1",
                     "--no-vllm", "--out", str(out), "--min-same-answer", "1.01"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 1
    assert "FAILED cpu float32 G=1: same answer 1.000 < 1.01" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["verdict"] == "fail" and report["vllm"] == "skipped (--no-vllm)"
    assert report["failures"] == ["cpu float32 G=1: same answer 1.000 < 1.01"]
    ref, engine = report["variants"]
    assert engine["same_answer"] == 1.0 and engine["top1_agreement"] == 1.0
    inv = engine["extra"]["invariants"]
    assert inv["argmax_head_z_equals_token_rate"] == 1.0 and inv["rows"] == 2
    decode = engine["extra"]["decode"]["rows"]
    assert [r["batch"] for r in decode] == [1, 2]
    assert all(r["native_tokens_per_s"] > 0 and r["hf_generate_tokens_per_s"] > 0
               for r in decode)  # fmt: skip


def test_a_verdict_needs_64_problems_and_no_failure():
    assert verdict([], 64, 64) == "pass"
    assert verdict([], 2, 64) == "none: 2 problems < --min-problems 64"  # exit 3
    assert verdict(["x"], 2, 64) == verdict(["x"], 64, 64) == "fail"
