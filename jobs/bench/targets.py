"""From the table rows to what a reader asks: ratios measured side by side, the targets met or
missed, and whether rows that should agree gave the same answers.

Everything here reads the table rows (`plan.table_row`) and the children's results by row key;
nothing is timed.
"""

from __future__ import annotations

import functools
from typing import Any

TARGET_NAIVE_SPEEDUP = 50.0  # LatentSeek PSRM, 64 problems: engine best / naive, tokens/s
TARGET_CONTINUOUS = 1.3  # continuous / static batching at the same batch_size, problems/h
TARGET_TOKENS_PER_S = 225.0  # LatentSeek PSRM engine at its best batch in fp32 (25% of 900)
TARGET_BF16 = 1.5  # bfloat16 / float32 tokens/s, same engine, same problems
TARGET_CEILING_FRACTION = 0.6  # engine tokens/s at its best batch / plain generate()
TARGET_WORKER_SCALING = 1.6  # Ray 2 workers / 1 worker, problems/h
TARGET_RAY_PROBLEMS = 16
TARGET_VLLM_CPU = 1.0  # backend=vllm / native tokens/s, CoT, on CPU (make gpu-check: 3x on a GPU)


def find(rows: list[dict], **fields: Any) -> list[dict]:
    """The successful rows whose fields equal `fields`."""
    return [r for r in rows if "error" not in r and all(r.get(k) == v for k, v in fields.items())]


def best_row(rows: list[dict], method: str, kinds: tuple[str, ...] = ("engine", "batching")):
    """The method's fp32 engine row with the most tokens/s (None if none succeeded)."""
    mine = [r for r in find(rows, method=method, dtype="float32") if r["row"] in kinds]
    return max(
        (r for r in mine if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"], default=None
    )


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _get(rows: list[dict], **fields: Any) -> dict | None:
    return next(iter(find(rows, **fields)), None)


def fp32_twin(rows: list[dict], bf16: dict) -> dict | None:
    """The float32 engine row of the same work as a bf16 row (method, batch, batching, N)."""
    same = {k: bf16[k] for k in ("method", "batch_size", "batching", "problems")}
    return _get(rows, row="engine", dtype="float32", **same)


def _tps(row: dict | None) -> float | None:
    return row["tokens_per_s"] if row else None


def _pph(row: dict | None) -> float | None:
    return row["problems_per_hour"] if row else None


# ------------------------------------------------------------------------------------------
# Answers


def agreement(reference: list[dict], other: list[dict]) -> dict:
    """On the problems both hold: how many have the same answer text, the same extracted answer
    and the same correctness; and each text difference (where it starts, both tails)."""
    ref = {r["problem_id"]: r for r in reference}
    common = [(ref[r["problem_id"]], r) for r in other if r["problem_id"] in ref]
    differences = []
    for a, b in common:
        if a["final_answer"] == b["final_answer"]:
            continue
        at = next(
            (i for i, (x, y) in enumerate(zip(a["final_answer"], b["final_answer"])) if x != y),
            min(len(a["final_answer"]), len(b["final_answer"])),
        )
        differences.append(
            {
                "problem_id": b["problem_id"],
                "reference_extracted": a.get("extracted"),
                "other_extracted": b.get("extracted"),
                "first_difference_at_char": at,
                "reference_tail": a["final_answer"][at : at + 60],
                "other_tail": b["final_answer"][at : at + 60],
            }
        )
    return {
        "compared": len(common),
        "same_text": len(common) - len(differences),
        "same_answer": sum(a.get("extracted") == b.get("extracted") for a, b in common),
        "same_correct": sum(a["correct"] == b["correct"] for a, b in common),
        "differences": differences,
    }


def answer_checks(rows: list[dict], results: dict[str, dict]) -> list[dict]:
    """Every pair of rows that should give the same answers, compared."""
    pairs: list[tuple[str, str, dict, dict]] = []
    for method in dict.fromkeys(r["method"] for r in rows):
        b1 = _get(rows, row="engine", method=method, batch_size=1)
        naive = _get(rows, row="naive", method=method)
        if b1 and naive:
            pairs.append((method, "naive vs engine B=1", naive, b1))
        for r in find(rows, row="engine", method=method):
            if b1 and r["batch_size"] != 1:
                pairs.append((method, f"{r['config']} vs engine B=1", b1, r))
        static = _get(rows, row="batching", method=method, batching="static")
        cont = _get(rows, row="batching", method=method, batching="continuous")
        if static and cont:
            pairs.append((method, "continuous vs static batching", static, cont))
        for bf16 in find(rows, row="bf16", method=method):
            fp32 = fp32_twin(rows, bf16)
            if fp32:
                pairs.append((method, "bfloat16 vs float32", fp32, bf16))
        engines = find(rows, row="engine", method=method)
        widest = max(engines, key=lambda r: (r["problems"], -r["batch_size"]), default=None)
        for r in find(rows, row="ray", method=method):
            if widest:
                pairs.append((method, f"{r['config']} vs {widest['config']}", widest, r))
    return [
        {
            "method": m,
            "what": what,
            **agreement(results[a["key"]]["rows"], results[b["key"]]["rows"]),
        }
        for m, what, a, b in pairs
    ]


# ------------------------------------------------------------------------------------------
# Ratios and targets


def compute_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per method, every ratio of rows measured in this run (None where a row is missing)."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "-"):
        best = best_row(rows, method)
        wide = best_row(rows, method, kinds=("batching",))  # the 64-problem rows
        get = functools.partial(_get, rows, method=method)
        naive, ceiling, b1 = get(row="naive"), get(row="ceiling"), get(row="engine", batch_size=1)
        static = get(row="batching", batching="static")
        cont = get(row="batching", batching="continuous")
        ray1, ray2 = get(row="ray", workers=1), get(row="ray", workers=2)
        res: dict[str, Any] = {
            "best": best["config"] if best else None,
            "best_batch_size": best["batch_size"] if best else None,
            "best_tokens_per_s": best["tokens_per_s"] if best else None,
        }
        res["best_over_naive_tokens"] = _ratio(_tps(best), _tps(naive))
        res["best_over_naive_problems"] = _ratio(_pph(best), _pph(naive))
        res["batching_best_over_naive_tokens"] = _ratio(_tps(wide), _tps(naive))
        res["b1_over_naive_tokens"] = _ratio(_tps(b1), _tps(naive))
        res["continuous_over_static"] = _ratio(_pph(cont), _pph(static))
        res["continuous_over_static_tokens"] = _ratio(_tps(cont), _tps(static))
        bf16 = get(row="bf16")
        if bf16:
            res["bf16_over_fp32_tokens"] = _ratio(_tps(bf16), _tps(fp32_twin(rows, bf16)))
        res["best_over_ceiling"] = _ratio(_tps(best), _tps(ceiling))
        res["ray1_over_best"] = _ratio(_pph(ray1), _pph(best))
        res["ray2_over_best"] = _ratio(_pph(ray2), _pph(best))
        res["ray2_over_ray1"] = _ratio(_pph(ray2), _pph(ray1))
        native = get(row="vllm", backend="native")
        served = get(row="vllm", backend="vllm")
        res["vllm_over_native_tokens"] = _ratio(_tps(served), _tps(native))
        res["vllm_over_native_problems"] = _ratio(_pph(served), _pph(native))
        if ray1 and ray2:
            res["ray2_over_ray1_until_last_batch"] = _ratio(
                ray1.get("until_last_batch_s"), ray2.get("until_last_batch_s")
            )
            res["ray_problems"] = min(ray1["problems"], ray2["problems"])
        out[method] = {k: v for k, v in res.items() if v is not None}
    return out


def _target(text: str, value: float | None, goal: float, note: str = "", ok: bool = True) -> dict:
    met = value is not None and value >= goal and ok
    if value is None:
        note = "not measured: a row it needs failed or was left out" + (f"; {note}" if note else "")
    return {"target": text, "value": value, "goal": goal, "met": met, "note": note}


def _agreement_note(checks: list[dict], what: str, method: str = "latentseek-psrm") -> str:
    c = next((c for c in checks if c["what"] == what and c["method"] == method), None)
    if not c:
        return ""
    n = c["compared"]
    return (
        f"answers: {c['same_text']}/{n} identical texts, {c['same_answer']}/{n} identical final "
        f"answers, {c['same_correct']}/{n} same correctness"
    )


def _budget_note(row: dict | None, results: dict[str, dict]) -> str:
    """How much of their token budget the generations used: when every row runs to the cap, a
    static round hardly waits for its longest row, and continuous batching has little to gain."""
    if not row or not row.get("max_new_tokens"):
        return ""
    problems = results[row["key"]]["rows"]
    budget = sum((1 + r["iterations"]) * row["max_new_tokens"] for r in problems)
    used = sum(r["solver_generated"] for r in problems) / budget if budget else 0.0
    return f"generations used {100 * used:.0f}% of their {row['max_new_tokens']}-token budget"


def _profile_note(rows: list[dict], results: dict[str, dict]) -> str:
    prof = _get(rows, row="profile")
    if not prof:
        return ""
    p = results[prof["key"]]
    total = sum(p["groups_s"].values()) or 1.0
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in p["groups_s"].items())
    return (
        f"what bounds it (Profile below): {shares} of the wall time; rooflines at B="
        f"{p['batch_size']}: compute {p['roofline_compute_tokens_per_s']:.0f} tokens/s, the "
        f"decode's GEMM shape {p['roofline_decode_gemm_tokens_per_s']:.0f}, weight reads "
        f"{p['roofline_weight_read_tokens_per_s']:.0f}"
    )


def evaluate_targets(
    rows: list[dict], ratios: dict, checks: list[dict], results: dict
) -> list[dict]:
    """Every target, met or missed (a target whose rows are missing is missed, and says why)."""
    return [
        *_engine_targets(rows, ratios, checks, results),
        *_bf16_targets(rows, ratios, checks),
        *_ceiling_targets(ratios),
        *_ray_targets(ratios),
        *_vllm_targets(rows, ratios),
    ]


def _engine_targets(rows: list[dict], ratios: dict, checks: list[dict], results: dict) -> list:
    """LatentSeek PSRM on the engine: against the naive loop, continuous vs static, tokens/s."""
    ls = ratios.get("latentseek-psrm", {})
    static = _get(rows, row="batching", method="latentseek-psrm", batching="static")
    b = static["batch_size"] if static else "batch_size"
    n = static["problems"] if static else 64
    return [
        _target(
            f"LatentSeek PSRM, {n} problems: engine best (static or continuous) >= "
            f"{TARGET_NAIVE_SPEEDUP:g}x the naive loop, tokens/s",
            ls.get("batching_best_over_naive_tokens"),
            TARGET_NAIVE_SPEEDUP,
        ),
        _target(
            f"LatentSeek PSRM, {n} problems: continuous >= {TARGET_CONTINUOUS:g}x static "
            f"batching at B={b}, problems/h",
            ls.get("continuous_over_static"),
            TARGET_CONTINUOUS,
            "; ".join(
                x
                for x in (
                    _agreement_note(checks, "continuous vs static batching"),
                    _budget_note(static, results),
                )
                if x
            ),
        ),
        _target(
            f"LatentSeek PSRM: engine tokens/s at its best batch in fp32 >= "
            f"{TARGET_TOKENS_PER_S:g} (25% of the fp32 roofline)",
            ls.get("best_tokens_per_s"),
            TARGET_TOKENS_PER_S,
            "; ".join(
                x for x in (f"best: {ls.get('best', '-')}", _profile_note(rows, results)) if x
            ),
        ),
    ]


def _bf16_targets(rows: list[dict], ratios: dict, checks: list[dict]) -> list[dict]:
    targets = []
    bf16_methods = dict.fromkeys(
        ["latentseek-psrm", *(r["method"] for r in rows if r["row"] == "bf16")]
    )
    for method in bf16_methods:
        targets.append(
            _target(
                f"{method}: bfloat16 tokens/s >= {TARGET_BF16:g}x float32 (CPU)",
                ratios.get(method, {}).get("bf16_over_fp32_tokens"),
                TARGET_BF16,
                _agreement_note(checks, "bfloat16 vs float32", method),
            )
        )
    return targets


def _ceiling_targets(ratios: dict) -> list[dict]:
    targets = []
    for method, res in ratios.items():
        targets.append(
            _target(
                f"{method}: engine tokens/s at its best batch >= {TARGET_CEILING_FRACTION:g}x "
                "the generate() ceiling",
                res.get("best_over_ceiling"),
                TARGET_CEILING_FRACTION,
            )
        )
    return targets


def _ray_targets(ratios: dict) -> list[dict]:
    targets = []
    for method, res in ratios.items():
        if "ray2_over_ray1" not in res:
            continue
        n = res.get("ray_problems", 0)
        targets.append(
            _target(
                f"{method}: Ray 2 workers >= {TARGET_WORKER_SCALING:g}x 1 worker (problems/h, "
                f"end to end, {n} problems)",
                res["ray2_over_ray1"],
                TARGET_WORKER_SCALING,
                "" if n >= TARGET_RAY_PROBLEMS else f"fewer than {TARGET_RAY_PROBLEMS} problems",
                ok=n >= TARGET_RAY_PROBLEMS,
            )
        )
    return targets


def _vllm_targets(rows: list[dict], ratios: dict) -> list[dict]:
    targets = []
    for method, res in ratios.items():
        native = _get(rows, row="vllm", method=method, backend="native")
        served = _get(rows, row="vllm", method=method, backend="vllm")
        if native is None and served is None:
            continue
        start = (served or {}).get("engine_start_s")
        note = f"vLLM engine start-up {start:.1f} s, not timed" if start is not None else ""
        if served and "error" in served:
            note = served["error"][:200]
        if method == "cot":
            n = (native or {}).get("problems", 0)
            targets.append(
                _target(
                    f"cot: backend=vllm tokens/s >= {TARGET_VLLM_CPU:g}x the native engine "
                    f"(CPU, {n} problems)",
                    res.get("vllm_over_native_tokens"),
                    TARGET_VLLM_CPU,
                    note,
                )
            )
    return targets
