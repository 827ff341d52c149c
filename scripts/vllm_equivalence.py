"""backend=vllm against the native engine on the embedded model (fp32, CPU, boxed prompt).

    .venv-vllm/bin/python scripts/vllm_equivalence.py --n 32 --tokens 256

Prints, for GSM8K rows 0..n-1 with greedy CoT of `--tokens` new tokens:
(a) the share of problems whose CoT tokens are identical, and the first differing position where
    they are not;
(b) the largest |z_vllm - z_native| over the captured positions (z_vllm from the backend's HF
    prefill, z_native captured while decoding), on the tokens both engines agree on;
(c) continuations after a forced prefix: the first 20% of the native CoT with one token (the
    middle one) replaced by its runner-up under the LM head, then greedy to the same budget;
    share identical;
(d) tokens/s of both engines for the CoT batch (vLLM's start-up reported separately, its capture
    prefill timed on its own);
(e) verifier generations: the paper's four verifier prompts for each native CoT answer, greedy,
    `--verifier-tokens` tokens; share identical;
(f) the LatentSeek PSRM trajectory (K = `--iters`) per problem through `Solver` on each backend:
    share of problems with the same answers after every iteration and the same rewards.
`--json FILE` writes the numbers too. `--native-cache FILE` keeps the native results between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.benchmarks import prompt_suffix  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.engine.generation import GenerationRequest, Generator  # noqa: E402
from pipeline.engine.model import load_model, prepare_model  # noqa: E402
from pipeline.method.prompts import load_solver_template, render_chat  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(name: str, got: list[list[int]], want: list[list[int]]) -> dict:
    diffs = [first_difference(g, w) for g, w in zip(got, want)]
    same = sum(d is None for d in diffs)
    where = {i: d for i, d in enumerate(diffs) if d is not None}
    print(
        f"({name}) identical: {same}/{len(got)}" + (f"; first difference {where}" if where else "")
    )
    return {"identical": same, "total": len(got), "first_difference": where}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="GSM8K rows 0..n-1")
    ap.add_argument("--tokens", type=int, default=256, help="max new tokens of the CoT")
    ap.add_argument("--batch", type=int, default=32, help="rows decoding together (both engines)")
    ap.add_argument("--prefix-frac", type=float, default=0.2)
    ap.add_argument("--native-cache", default="", help="file to keep native results in")
    ap.add_argument("--json", default="", help="write the numbers here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--block-size", type=int, default=0, help="vLLM KV block size (0: default)")
    ap.add_argument("--verifier-tokens", type=int, default=64, help="(e) tokens per verifier")
    ap.add_argument("--iters", type=int, default=3, help="(f) LatentSeek's K (0: skip (f))")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    cfg = Config(dataset="gsm8k", limit=a.n, dtype="float32", device="cpu", batch_size=a.batch)
    prepare_model(cfg)
    loaded = load_model(cfg)
    template = load_solver_template("boxed")
    problems = load_dataset(cfg).problems
    prompts = [
        render_chat(
            loaded.tokenizer, template.messages(p.question, prompt_suffix(p.dataset, "boxed"))
        )
        for p in problems
    ]
    T = a.tokens
    report: dict = {
        "n": a.n,
        "tokens": T,
        "batch": a.batch,
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
    }

    # ---- native: CoT (z captured while decoding) ---------------------------------------
    native = Generator(loaded.model, loaded.tokenizer)
    cache = Path(a.native_cache) if a.native_cache else None
    key = {"n": a.n, "tokens": T, "batch": a.batch, "prompts": prompts}
    if cache and cache.exists() and torch.load(cache)["key"] == key:
        saved = torch.load(cache)
        n_tokens, n_hidden, n_seconds = saved["tokens"], saved["hidden"], saved["seconds"]
        print(f"native results from {cache} (measured {n_seconds:.1f} s)")
    else:
        n_tokens, n_hidden, n_seconds = [], [], 0.0
        for s in range(0, len(prompts), a.batch):
            start = time.perf_counter()
            out = native.generate(
                [GenerationRequest(p, T, capture=T) for p in prompts[s : s + a.batch]]
            )
            n_seconds += time.perf_counter() - start
            n_tokens += [r.tokens for r in out]
            n_hidden += [r.hidden for r in out]
        if cache:
            torch.save(
                {"key": key, "tokens": n_tokens, "hidden": n_hidden, "seconds": n_seconds}, cache
            )
    n_count = sum(len(t) for t in n_tokens)
    print(f"native CoT: {n_count} tokens in {n_seconds:.1f} s = {n_count / n_seconds:.1f} tokens/s")

    # ---- vLLM ---------------------------------------------------------------------------
    from pipeline.engine.backends.vllm import VllmBackend

    backend = VllmBackend(loaded, cfg, {"block_size": a.block_size} if a.block_size else None)
    print(f"vLLM engine start: {backend.start_seconds:.1f} s ({backend.engine_kwargs})")
    report["vllm_start_seconds"] = backend.start_seconds
    requests = [GenerationRequest(p, T) for p in prompts]
    v_seconds, v_out = 0.0, []
    for s in range(0, len(requests), a.batch):
        start = time.perf_counter()
        v_out += backend.generate(requests[s : s + a.batch])
        v_seconds += time.perf_counter() - start
    v_tokens = [r.tokens for r in v_out]
    v_count = sum(len(t) for t in v_tokens)
    print(f"vLLM CoT: {v_count} tokens in {v_seconds:.1f} s = {v_count / v_seconds:.1f} tokens/s")

    report["a_greedy"] = compare("a: greedy CoT", v_tokens, n_tokens)

    # (b) z from one HF prefill per finished request, on the tokens both agree on.
    cap_requests = [GenerationRequest(p, T, capture=T) for p in prompts]
    start = time.perf_counter()
    backend.capture(list(zip(cap_requests, v_out)))
    c_seconds = time.perf_counter() - start
    worst, worst_at, compared = 0.0, None, 0
    for i, (res, nt, nh) in enumerate(zip(v_out, n_tokens, n_hidden)):
        agree = first_difference(res.tokens, nt)
        k = min(len(res.tokens), len(nt)) if agree is None else agree + 1  # z_k predicted x_k
        k = min(k, res.hidden.shape[0], nh.shape[0])
        diff = float((res.hidden[:k] - nh[:k]).abs().max())
        compared += k
        if diff > worst:
            worst, worst_at = diff, i
    print(
        f"(b) z: max |z_vllm - z_native| = {worst:.3g} (problem {worst_at}) over {compared} "
        f"positions; capture prefill {c_seconds:.1f} s for {len(v_out)} rows"
    )
    report["b_z"] = {"max_abs_diff": worst, "problem": worst_at, "positions": compared}
    report["capture_seconds"] = c_seconds

    # (c) continuation after a forced, perturbed prefix.
    cont_native, cont_vllm = [], []
    for p, toks, hid in zip(prompts, n_tokens, n_hidden):
        u = max(1, int(a.prefix_frac * len(toks)))
        prefix = list(toks[:u])
        j = u // 2
        top2 = torch.topk(native.logits(hid[j]), 2).indices.tolist()
        prefix[j] = top2[1] if top2[0] == prefix[j] else top2[0]
        cont_native.append(GenerationRequest(p, T - u, prefix_ids=prefix))
        cont_vllm.append(GenerationRequest(p, T - u, prefix_ids=prefix))
    start = time.perf_counter()
    nc = []
    for s in range(0, len(cont_native), a.batch):
        nc += native.generate(cont_native[s : s + a.batch])
    nc_seconds = time.perf_counter() - start
    start = time.perf_counter()
    vc = []
    for s in range(0, len(cont_vllm), a.batch):
        vc += backend.generate(cont_vllm[s : s + a.batch])
    vc_seconds = time.perf_counter() - start
    report["c_continuation"] = compare(
        "c: continuation after a perturbed 20% prefix",
        [r.tokens for r in vc],
        [r.tokens for r in nc],
    )
    nc_count, vc_count = sum(len(r.tokens) for r in nc), sum(len(r.tokens) for r in vc)
    print(
        f"continuations: native {nc_count} tokens in {nc_seconds:.1f} s "
        f"({nc_count / nc_seconds:.1f} tokens/s), vLLM {vc_count} in {vc_seconds:.1f} s "
        f"({vc_count / vc_seconds:.1f} tokens/s; prompt tokens computed: "
        f"{sum(r.prompt_tokens for r in vc)} of {sum(len(p) for p in prompts)})"
    )

    report["d_throughput"] = {
        "native_cot_tokens": n_count,
        "native_cot_seconds": n_seconds,
        "native_cot_tokens_per_s": n_count / n_seconds,
        "vllm_cot_tokens": v_count,
        "vllm_cot_seconds": v_seconds,
        "vllm_cot_tokens_per_s": v_count / v_seconds,
        "vllm_capture_seconds": c_seconds,
        "vllm_cot_tokens_per_s_with_capture": v_count / (v_seconds + c_seconds),
        "native_continuation_tokens_per_s": nc_count / nc_seconds,
        "vllm_continuation_tokens_per_s": vc_count / vc_seconds,
    }
    # (e) verifier generations for each native CoT answer.
    from pipeline.method.prompts import load_verifiers
    from pipeline.method.rewards import SelfReward

    verifiers = SelfReward(
        loaded.tokenizer, load_verifiers("verifiers"), a.verifier_tokens, "boxed"
    )
    texts = [loaded.tokenizer.decode(t, skip_special_tokens=True) for t in n_tokens]
    asks = [q for p, t in zip(problems, texts) for q in verifiers.requests(p, t)]
    nv = [
        r.tokens
        for s in range(0, len(asks), a.batch)
        for r in native.generate(asks[s : s + a.batch])
    ]
    vv = [
        r.tokens
        for s in range(0, len(asks), a.batch)
        for r in backend.generate(asks[s : s + a.batch])
    ]
    report["e_verifiers"] = compare(f"e: verifier generations ({a.verifier_tokens} tokens)", vv, nv)

    # (f) the LatentSeek PSRM trajectory through the Solver on each backend.
    if a.iters:
        from pipeline.method.solver import Solver

        ls = cfg.replace(method=["latentseek"], reward="psrm", max_iters=a.iters, rho=0.2,
                         lr=0.05, max_new_tokens=T)  # fmt: skip
        mine = Solver(ls, loaded).run("latentseek", problems)
        theirs = Solver(ls, loaded, backend=backend).run("latentseek", problems)
        same = [
            (x.cot_answer, x.answers, x.rewards, x.final_answer)
            == (y.cot_answer, y.answers, y.rewards, y.final_answer)
            for x, y in zip(mine, theirs)
        ]
        differ = [p.problem_id for p, ok in zip(problems, same) if not ok]
        print(f"(f) LatentSeek PSRM K={a.iters}: same trajectory on {sum(same)}/{len(same)}"
              + (f"; differ: {differ}" if differ else ""))  # fmt: skip
        report["f_latentseek"] = {"identical": sum(same), "total": len(same), "differ": differ,
                                  "iterations": sum(x.iterations for x in mine)}  # fmt: skip

    report["load_average_after"] = os.getloadavg()
    print(
        f"(d) tokens/s: native {n_count / n_seconds:.1f}, vLLM {v_count / v_seconds:.1f} "
        f"({v_count / (v_seconds + c_seconds):.1f} with the capture prefill); vLLM start-up "
        f"{backend.start_seconds:.1f} s; load average {report['load_average_before']} -> "
        f"{report['load_average_after']}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    backend.close()


if __name__ == "__main__":
    main()
