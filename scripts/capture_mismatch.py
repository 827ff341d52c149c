"""Does z belong to the tokens? backend=vllm's two capture routes on the embedded model.

    .venv-vllm/bin/python scripts/capture_mismatch.py --dtype bfloat16 --n 16 --tokens 128

For GSM8K rows 0..n-1 (boxed prompt), the greedy CoT with z captured for every token, once per
route of the vLLM backend (one engine): "native" (the capture request decodes on the native
engine over the same HF model) and "prefill" (vLLM decodes, z from one HF forward pass over
prompt + answer). Prints per route the captured positions where argmax(head(z_t)) != x_t
(`capture_mismatch`; the latent step assumes 0), the problems with any, and the wall time of the
CoT batch (z included). `--json FILE` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.benchmarks import prompt_suffix  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.engine.backends.base import GenerationRequest, capture_mismatch  # noqa: E402
from pipeline.engine.model import load_model, prepare_model  # noqa: E402
from pipeline.method.prompts import load_solver_template, render_chat  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--n", type=int, default=16, help="GSM8K rows 0..n-1")
    ap.add_argument("--tokens", type=int, default=128, help="CoT budget (all captured)")
    ap.add_argument("--json", default="", help="write the numbers here")
    a = ap.parse_args()

    cfg = Config(dataset="gsm8k", limit=a.n, dtype=a.dtype, device="cpu", batch_size=a.n)
    prepare_model(cfg)
    loaded = load_model(cfg)
    template = load_solver_template("boxed")
    prompts = [
        render_chat(
            loaded.tokenizer, template.messages(p.question, prompt_suffix(p.dataset, "boxed"))
        )
        for p in load_dataset(cfg).problems
    ]
    from pipeline.engine.backends.vllm import VllmBackend

    backend = VllmBackend(loaded, cfg)
    report: dict = {"dtype": a.dtype, "n": a.n, "tokens": a.tokens, "routes": {}}
    print(f"vLLM engine start {backend.start_seconds:.1f} s; {a.dtype}, {a.n} problems")
    for route in ("native", "prefill"):
        backend.capture_on = route
        start = time.perf_counter()
        out = backend.generate([GenerationRequest(p, a.tokens, capture=a.tokens) for p in prompts])
        seconds = time.perf_counter() - start
        counts = [capture_mismatch(backend.logits, r.hidden, r.tokens) for r in out]
        tokens = sum(len(r.tokens) for r in out)
        row = {
            "capture_mismatch": sum(counts),
            "positions": sum(r.hidden.shape[0] for r in out),
            "problems_with_mismatch": sum(c > 0 for c in counts),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }
        report["routes"][route] = row
        print(
            f"{route:8s} capture_mismatch {row['capture_mismatch']} of {row['positions']} "
            f"positions ({row['problems_with_mismatch']} of {a.n} problems); {tokens} tokens "
            f"in {seconds:.1f} s = {row['tokens_per_s']:.1f} tokens/s (z included)"
        )
    backend.close()
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
