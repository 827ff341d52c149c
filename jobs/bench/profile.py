"""What bounds the engine's tokens/s: LatentSeek PSRM under `torch.profiler`, and the machine's
rooflines measured with the same torch, in the same child process.

- Op shares: `Solver.run("latentseek", the first B problems)` at the best row's batch size and
  batching, shortened (K = 1, at most `max_new_tokens` of the spec) so that it costs seconds.
  Self CPU time per op, grouped: matrix products, attention, other ops; the rest of the wall
  time is spent outside torch ops (Python, scheduling, sampling, the profiler itself).
- Compute roofline: the GEMM rate of a large square fp32 product (what the machine's cores reach)
  and of the decode's own product shapes ([B, D] x [D, I]), each as tokens/s at 2 x parameters
  FLOPs per token.
- Weight-read roofline at batch size B: a decode step reads every weight once, so B x memory
  bandwidth (a large tensor copy) / weight bytes tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

from jobs.bench.rows import load_problems, make_solver, prompt_ids, warm_up
from jobs.bench.settings import method_config

GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear"),
    "attention": (
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_softmax",
        "aten::_safe_softmax",
    ),
}


def _rate(fn: Any, seconds: float = 0.5) -> float:
    """Calls per second of `fn` over about `seconds` (after one warm-up call)."""
    fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        reps += 1
    return reps / (time.perf_counter() - start)


def gemm_gflops(m: int, k: int, n: int, dtype: Any) -> float:
    """GFLOP/s of `[m, k] x [k, n]` products (as `nn.Linear` computes them)."""
    import torch

    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    return 2.0 * m * k * n * _rate(lambda: torch.nn.functional.linear(a, w)) / 1e9


def copy_bandwidth_gbs(megabytes: int = 256) -> float:
    """Memory bandwidth of a large tensor copy (bytes read + bytes written per second)."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 * _rate(lambda: dst.copy_(src)) / 1e9


def op_shares(prof: Any, wall: float) -> tuple[dict[str, float], list[list[Any]]]:
    """Seconds per op group (self CPU time) and outside ops; the ten costliest ops."""
    events = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    groups = dict.fromkeys([*GROUPS, "other ops"], 0.0)
    for name, seconds, _ in events:
        group = next((g for g, names in GROUPS.items() if name in names), "other ops")
        groups[group] += seconds
    groups["outside torch ops"] = max(0.0, wall - sum(s for _, s, _ in events))
    top = sorted(events, key=lambda e: -e[1])[:10]
    return groups, [[name, seconds, count] for name, seconds, count in top]


def run(cfg: Any, spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    b = spec["batch_size"]
    cfg = method_config(
        cfg,
        "latentseek-psrm",
        limit=b,
        batch_size=b,
        batching=spec["batching"],
        max_iters=1,
        max_new_tokens=min(cfg.max_new_tokens, spec["max_new_tokens"]),
    )
    solver = make_solver(cfg)
    problems = load_problems(cfg)
    warm_up(solver, prompt_ids(solver, problems[0]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        results = solver.run("latentseek", problems)
        wall = time.perf_counter() - start
    tokens = sum(
        r.compute.solver_generated_tokens + r.compute.verifier_generated_tokens for r in results
    )
    groups, top = op_shares(prof, wall)
    model, loaded = solver.loaded.model, solver.loaded
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    d, inner = model.config.hidden_size, model.config.intermediate_size
    peak = gemm_gflops(1024, 1024, 1024, loaded.dtype)
    decode = gemm_gflops(b, d, inner, loaded.dtype)
    bandwidth = copy_bandwidth_gbs()
    flops_per_token = 2.0 * loaded.num_parameters
    return {
        "wall_s": wall,
        "generated": tokens,
        "tokens_per_s": tokens / wall,
        "batch_size": b,
        "batching": cfg.batching,
        "max_new_tokens": cfg.max_new_tokens,
        "max_iters": cfg.max_iters,
        "problems": len(results),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "groups_s": groups,
        "top_ops": top,
        "parameters": loaded.num_parameters,
        "weight_mb": weight_bytes / 2**20,
        "gemm_peak_gflops": peak,
        "gemm_decode_gflops": decode,
        "decode_gemm_shape": [b, d, inner],
        "bandwidth_gbs": bandwidth,
        "roofline_compute_tokens_per_s": peak * 1e9 / flops_per_token,
        "roofline_decode_gemm_tokens_per_s": decode * 1e9 / flops_per_token,
        "roofline_weight_read_tokens_per_s": b * bandwidth * 1e9 / weight_bytes,
    }
