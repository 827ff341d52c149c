"""Can backend=vllm run inside a Ray actor on CPU? Starts a local Ray (2 CPUs), one actor that
loads the embedded model and a VllmBackend in its own process, decodes the boxed prompts of
GSM8K rows 0..n-1 greedily and compares them with the native engine in the driver.

    .venv-vllm/bin/python scripts/vllm_ray_probe.py --n 4 --tokens 32 [--multiprocess]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prompts_for(n: int, tokenizer) -> list[list[int]]:
    from pipeline.config import Config
    from pipeline.data import load_dataset
    from pipeline.method.prompts import load_solver_template, render_chat

    template = load_solver_template("boxed")
    problems = load_dataset(Config(dataset="gsm8k", limit=n)).problems
    return [render_chat(tokenizer, template.messages(p.question, p.dataset)) for p in problems]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument(
        "--multiprocess", action="store_true", help="vLLM's engine core in a child process"
    )
    a = ap.parse_args()

    import ray

    from pipeline.config import Config
    from pipeline.engine.generation import GenerationRequest, Generator
    from pipeline.engine.model import load_model, prepare_model

    cfg = Config(dtype="float32", device="cpu", batch_size=8)
    prepare_model(cfg)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if a.multiprocess else "0"}
    root = str(Path(__file__).resolve().parent.parent)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {**env, "PYTHONPATH": root}},
    )

    @ray.remote(num_cpus=1)
    class VllmActor:
        def __init__(self) -> None:
            from pipeline.engine.backends.vllm import VllmBackend

            self.loaded = load_model(cfg)
            self.backend = VllmBackend(self.loaded, cfg)

        def info(self) -> dict:
            import torch

            return {
                "pid": os.getpid(),
                "start_seconds": self.backend.start_seconds,
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
                "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
            }

        def generate(self, prompts: list[list[int]], tokens: int) -> list[list[int]]:
            out = self.backend.generate([GenerationRequest(p, tokens, capture=2) for p in prompts])
            return [r.tokens for r in out]

    start = time.perf_counter()
    actor = VllmActor.remote()
    info = ray.get(actor.info.remote())
    print(f"actor up in {time.perf_counter() - start:.1f} s: {info}")
    loaded = load_model(cfg)
    prompts = prompts_for(a.n, loaded.tokenizer)
    start = time.perf_counter()
    got = ray.get(actor.generate.remote(prompts, a.tokens))
    print(f"actor generate: {time.perf_counter() - start:.1f} s")
    want = [
        r.tokens
        for r in Generator(loaded.model, loaded.tokenizer).generate(
            [GenerationRequest(p, a.tokens) for p in prompts]
        )
    ]
    same = sum(g == w for g, w in zip(got, want))
    print(f"greedy tokens identical to the native engine in the driver: {same}/{len(want)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
