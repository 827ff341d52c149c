"""Per-token decode latency of a tensor-parallel replica against the whole model, on the CPU.

    .venv/bin/python scripts/shard_latency.py [--tokens 64] [--rows 1,8]

Each rank is a Ray actor with one torch thread, joined over gloo (as `tensor_parallel` runs
them); G = 1 is one such actor. Two models: the embedded SmolLM2-135M (transformers can split its
9 heads over 3 ranks only, DeepSpeed over 2 or 3), and a random model of the same size with 8
heads and 4 KV heads (both backends split it over 2). Greedy decoding, EOS ignored, from a
GSM8K-style prompt; the median of 3 runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import ray
import torch

from pipeline.config import Config
from pipeline.engine.generation import GenerationRequest, Generator
from pipeline.engine.model import load_model
from pipeline.method.prompts import render_chat
from pipeline.run.workers import run_on_ranks

QUESTION = "Janet has 3 apples and buys 5 more. How many apples does she have?"


def time_decode(cfg: Config, tokens: int, rows: int) -> float:
    """Seconds per decode step of `rows` rows on this rank's shard (every rank runs it)."""
    loaded = load_model(cfg)
    gen = Generator(loaded.model, loaded.tokenizer)
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    # No stop token: every row decodes `tokens` tokens.
    request = GenerationRequest(prompt, tokens, stop_ids=frozenset())
    gen.generate([request] * rows)  # warm-up
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        gen.generate([request] * rows)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / tokens


def even_heads_model(directory: str) -> str:
    """SmolLM2-135M's shape with 8 heads of 72 and 4 KV heads, random weights, its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    source = load_model(Config(device="cpu"))
    config = AutoConfig.from_pretrained(source.model.config._name_or_path)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 72
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(source.model.config._name_or_path).save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", default="1,8")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    even = even_heads_model(tempfile.mkdtemp(prefix="even-heads-"))
    cases = [
        ("embedded", "embedded", "transformers", 1),
        ("embedded", "embedded", "transformers", 3),
        ("embedded", "embedded", "deepspeed", 2),
        ("embedded", "embedded", "deepspeed", 3),
        ("8 heads", even, "transformers", 1),
        ("8 heads", even, "transformers", 2),
        ("8 heads", even, "deepspeed", 2),
    ]
    print(f"{'model':10s} {'backend':13s} {'G':>2s} " + " ".join(
        f"{f'rows={r} ms/token':>17s}" for r in args.rows.split(",")))  # fmt: skip
    for name, model, backend, world in cases:
        cfg = Config(model=model, device="cpu", dtype="float32", tensor_parallel=world,
                     shard_backend=backend)  # fmt: skip
        cells = []
        for rows in (int(r) for r in args.rows.split(",")):
            per_token = run_on_ranks(cfg, time_decode, args.tokens, rows)[0]
            cells.append(f"{per_token * 1000:17.1f}")
        label = "(whole)" if world == 1 else backend
        print(f"{name:10s} {label:13s} {world:2d} " + " ".join(cells))
    ray.shutdown()


if __name__ == "__main__":
    main()
