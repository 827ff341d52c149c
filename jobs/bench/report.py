"""The bench's report: `bench.json` (everything, answers included) and `bench.md` (the tables a
reader needs: results, ratios, targets met or missed, the profile, the answer checks, and how it
was measured). Formatting only; the numbers come from `plan` and `targets`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


COLUMNS = [
    ("row", "row"), ("method", "method"), ("configuration", "config"), ("N", "problems"),
    ("dtype", "dtype"), ("wall s", "wall_s"), ("problems/h", "problems_per_hour"),
    ("gen tokens", "generated_tokens"), ("tokens/s", "tokens_per_s"),
    ("peak RSS MB", "peak_rss_mb"), ("accuracy", "accuracy"), ("mean iters", "mean_iterations"),
]  # fmt: skip


def results_table(rows: list[dict]) -> str:
    """One line per row; a failed row says FAILED and why, in the last column."""
    body = []
    for r in rows:
        if "error" in r:
            body.append(
                [r["row"], r["method"], r["config"], "FAILED", *["-"] * 8, r["error"][:160]]
            )
            continue
        load = "/".join(f"{x:.1f}" for x in r.get("load") or [] if x is not None)
        body.append([*(r.get(key) for _, key in COLUMNS), load or "-"])
    return table([name for name, _ in COLUMNS] + ["load before/after"], body)


def ray_table(rows: list[dict]) -> list[str]:
    ray = [r for r in rows if r["row"] == "ray" and "error" not in r]
    if not ray:
        return []
    body = [
        [r["method"], r["config"], r.get("batch_size"), r.get("setup_s"), r.get("wall_s"),
         r.get("until_last_batch_s"),
         ", ".join(f"{v:.0f}" for v in (r.get("worker_busy_s") or {}).values()),
         "/".join(f"{r.get(k) or 0:.0f}" for k in ("peak_rss_mb", "peak_rss_workers_mb", "peak_rss_driver_mb"))]
        for r in ray
    ]  # fmt: skip
    headers = ["method", "configuration", "B", "setup s", "wall s", "until last batch s",
               "worker busy s", "peak RSS MB all/workers/driver"]  # fmt: skip
    return ["Ray rows in detail (setup: Ray start and MLflow store, not charged):", "",
            table(headers, body), ""]  # fmt: skip


RATIOS = [
    ("best engine row (fp32)", "best"),
    ("its tokens/s", "best_tokens_per_s"),
    ("best / naive tokens/s", "best_over_naive_tokens"),
    ("best / naive problems/h", "best_over_naive_problems"),
    ("static/continuous best / naive tokens/s", "batching_best_over_naive_tokens"),
    ("B=1 / naive tokens/s", "b1_over_naive_tokens"),
    ("continuous / static problems/h", "continuous_over_static"),
    ("continuous / static tokens/s", "continuous_over_static_tokens"),
    ("bf16 / fp32 tokens/s", "bf16_over_fp32_tokens"),
    ("best / generate() tokens/s", "best_over_ceiling"),
    ("Ray 1 worker / best problems/h", "ray1_over_best"),
    ("Ray 2 workers / best problems/h", "ray2_over_best"),
    ("Ray 2 / 1 workers problems/h", "ray2_over_ray1"),
    ("Ray 2 / 1 workers, until the last batch", "ray2_over_ray1_until_last_batch"),
]


def ratios_table(ratios: dict[str, dict]) -> str:
    methods = list(ratios)
    return table(["ratio", *methods], [[name, *(ratios[m].get(key) for m in methods)]
                                       for name, key in RATIOS])  # fmt: skip


def targets_table(targets: list[dict]) -> str:
    return table(
        ["target", "measured", "met", "note"],
        [
            [t["target"], t["value"], "met" if t["met"] else "MISSED", t["note"] or ""]
            for t in targets
        ],
    )


def profile_section(rows: list[dict], results: dict[str, dict]) -> list[str]:
    prof = next((r for r in rows if r["row"] == "profile" and "error" not in r), None)
    if prof is None:
        return []
    p = results[prof["key"]]
    wall = p["wall_s"]
    parts = [
        "## Profile: what bounds LatentSeek PSRM's tokens/s",
        "",
        f"LatentSeek PSRM on {p['problems']} problems at B={p['batch_size']} ({p['batching']}), "
        f"K={p['max_iters']}, {p['max_new_tokens']} new tokens, {p['dtype']}, "
        f"{p['torch_threads']} torch threads, under torch.profiler: {p['tokens_per_s']:.1f} "
        f"tokens/s ({wall:.1f} s).",
        "",
        table(
            ["where the time goes", "s", "share"],
            [[k, v, f"{100 * v / wall:.0f}%"] for k, v in p["groups_s"].items()],
        ),  # fmt: skip
        "",
        table(["top ops (self time)", "s", "calls"], p["top_ops"]),
        "",
        table(
            ["roofline (measured here)", "rate", "tokens/s"],
            [
                [
                    "compute: 1024^3 fp32 GEMM",
                    f"{p['gemm_peak_gflops']:.0f} GFLOP/s",
                    p["roofline_compute_tokens_per_s"],
                ],
                [
                    f"compute at the decode's shape {p['decode_gemm_shape']}",
                    f"{p['gemm_decode_gflops']:.0f} GFLOP/s",
                    p["roofline_decode_gemm_tokens_per_s"],
                ],
                [
                    f"weight reads at B={p['batch_size']} ({p['weight_mb']:.0f} MB of weights)",
                    f"{p['bandwidth_gbs']:.1f} GB/s",
                    p["roofline_weight_read_tokens_per_s"],
                ],
            ],  # fmt: skip
        ),
        "",
        "Tokens/s = rate / (2 x parameters FLOPs per token), or B x bandwidth / weight bytes "
        f"({p['parameters'] / 1e6:.0f} M parameters).",
        "",
    ]
    return parts


SHOWN_DIFFERENCES = 5  # per check in bench.md; bench.json has them all


def answers_section(checks: list[dict]) -> list[str]:
    parts = ["## Answers", ""]
    for c in checks:
        n, diffs = c["compared"], c["differences"]
        parts.append(
            f"- {c['method']}: {c['what']}: {c['same_text']} of {n} identical; same final answer "
            f"{c['same_answer']}/{n}, same correctness {c['same_correct']}/{n}"
            + (f"; {len(diffs)} differ:" if diffs else "")
        )
        parts += [
            f"  - {d['problem_id']}: extracted {d['reference_extracted']!r} vs "
            f"{d['other_extracted']!r}, text differs from char {d['first_difference_at_char']} "
            f"({d['reference_tail']!r} vs {d['other_tail']!r})"
            for d in diffs[:SHOWN_DIFFERENCES]
        ]
        if len(diffs) > SHOWN_DIFFERENCES:
            parts.append(f"  - and {len(diffs) - SHOWN_DIFFERENCES} more (bench.json)")
    if not checks:
        parts.append("- (no comparison: rows missing)")
    return parts + [""]


def _loaded(rows: list[dict], machine: dict) -> str:
    limit = (machine.get("cores") or 1) + 1  # a row's own process accounts for about its threads
    busy = [r for r in rows if any(x is not None and x > limit for x in r.get("load") or [])]
    return ", ".join(f"{r['row']} {r['method']} {r['config']}" for r in busy) or "none"


def render_markdown(report: dict) -> str:
    rows, m = report["rows"], report["machine"]
    failed = [r for r in rows if "error" in r]
    parts = [
        "# latentseek bench",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, "
        f"transformers {m.get('transformers')}, ray {m.get('ray')}",
        f"- instruction sets (bf16 pays with avx512_bf16 or amx_bf16): "
        f"{', '.join(m.get('cpu_flags') or []) or 'unknown'}",
        f"- settings: {report['settings_text']}",
        f"- total wall time: {report['total_wall_s']:.0f} s; load average at start/end: "
        f"{report['load_start']:.2f} / {report['load_end']:.2f}",
        f"- failed rows: {len(failed)}" + (" (the bench exits 1)" if failed else ""),
        f"- rows measured under a load average above {(m.get('cores') or 1) + 1} (other "
        f"processes on the machine; ratios with them are unreliable): {_loaded(rows, m)}",
        "",
        "## Results",
        "",
        results_table(rows),
        "",
        *ray_table(rows),
        "## Ratios (rows of this run)",
        "",
        ratios_table(report["ratios"]),
        "",
        "## Targets",
        "",
        targets_table(report["targets"]),
        "",
        *profile_section(rows, report["results"]),
        *answers_section(report["answer_checks"]),
        "## How it was measured",
        "",
        *[f"- {line}" for line in NOTES],
    ]
    return "\n".join(parts) + "\n"


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(render_markdown(report))


NOTES = [
    "Each row runs in a fresh child process, one after another. Wall time is time.perf_counter "
    "around the row's work only (model load, imports and one short warm-up generation excluded).",
    "Generated tokens = solver + verifier tokens decoded, forced LatentSeek prefix tokens included "
    "(as the engine counts them); prompt tokens are not counted. Problems/h = 3600 N / wall; "
    "rows with different N compare per token (problems differ in cost).",
    "engine rows call Solver.run(method, task) over tasks of problems_per_task problems, as a "
    "worker is sent them; batching rows: the same on the 64-problem slice, static (tasks of "
    "batch_size) and continuous (tasks of problems_per_task) at the same batch_size.",
    "bf16: the same engine row with dtype=bfloat16 beside dtype=float32 (same problems, batch "
    "size and batching); agreement compares texts, extracted answers and correctness.",
    "The best engine row is the fp32 engine or batching row with the most tokens/s; the "
    "generate() ceiling decodes one full batch at its batch size (EOS ignored), at most the "
    "engine's token count.",
    "Naive: pipeline/method/reference.py (no cache, a full forward per token, one problem at a time); "
    "its cot row is the CoT pass of its LatentSeek PSRM row, timed on its own.",
    "Ray: jobs.run.run_evaluation end to end (workers of 1 CPU, tasks of ray_batch_size), Ray "
    "started and the MLflow store created beforehand (setup s). Peak RSS: the child's ru_maxrss; "
    "for Ray the summed RSS of the driver and its descendants, sampled every 0.25 s.",
    "The machine may be shared: the load average before/after each row is in the table; ratios "
    "come from rows of the same run. Every measured process gets OMP_WAIT_POLICY=PASSIVE "
    "(omp_wait_policy): spinning OpenMP threads on a shared 2-core machine decode several times "
    "slower.",
]
