"""`make gpu-check` (jobs/gpu_check.py) on the CPU in float32, cheaply: two problems give no
verdict (a verdict needs 64), the engine's invariants hold, the engine and `model.generate` are
timed like for like, and a tolerance above what is met fails."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs.gpu_check import main
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


def test_gpu_check_on_cpu_writes_its_json_and_gives_no_verdict_on_two_problems(
    tmp_path, capsys, embedded
):
    threads = torch.get_num_threads()
    out = tmp_path / "check.json"
    model = tiny_instruct(tmp_path / "tiny", embedded)
    common = ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--problems", "2",
              "--max-new-tokens", "6", "--tensor-parallel", "1", "--no-vllm", "--out", str(out)]  # fmt: skip
    try:
        assert main(common) == 3  # float32 against float32: everything agrees, too few problems
        report = json.loads(out.read_text())
        assert report["verdict"] == "none: 2 problems < --min-problems 64"
        assert report["failures"] == [] and report["vllm"] == "skipped (--no-vllm)"
        ref, engine = report["variants"]
        assert engine["same_answer"] == 1.0 and engine["top1_agreement"] == 1.0
        inv = engine["extra"]["invariants"]
        assert inv["argmax_head_z_equals_token_rate"] == 1.0 and inv["rows"] == 2
        decode = engine["extra"]["decode"]["rows"]
        assert [r["batch"] for r in decode] == [1, 2]
        assert all(r["native_tokens_per_s"] > 0 and r["hf_generate_tokens_per_s"] > 0
                   for r in decode)  # fmt: skip

        # A gate above what can be met fails, and says which.
        assert main([*common, "--min-problems", "1", "--min-same-answer", "1.01"]) == 1
        assert json.loads(out.read_text())["verdict"] == "fail"
        assert "FAILED cpu float32 G=1: same answer 1.000 < 1.01" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
