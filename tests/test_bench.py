"""`latentseek bench`: the report and ratio code on tiny hand-made inputs (nothing is timed), and
one end-to-end run of every row kind on a tiny setting (real child processes, a real local Ray)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import bench

ROOT = Path(__file__).resolve().parent.parent


def _child(wall: float, answers: dict[str, str], tokens: int = 10, **extra) -> dict:
    rows = [
        {
            "problem_id": pid,
            "final_answer": text,
            "extracted": text[-1:],
            "correct": False,
            "iterations": 1,
            "stop_reason": "max_iters",
            "error": "",
            "solver_generated": tokens,
            "verifier_generated": 0,
            "wall_s": wall / len(answers),
        }
        for pid, text in answers.items()
    ]
    return {"wall_s": wall, "problems": len(rows), "rows": rows, "peak_rss_mb": 900.0, **extra}


def test_compare_answers_lists_every_difference():
    ref = _child(1, {"p0": "x = 1", "p1": "so 2", "p2": "3"})["rows"]
    other = _child(1, {"p0": "x = 1", "p1": "so 7", "p3": "9"})["rows"]
    diffs = bench.compare_answers(ref, other)
    assert [d["problem_id"] for d in diffs] == ["p1"]  # p3 has no reference: not compared
    assert diffs[0]["first_difference_at_char"] == 3
    assert diffs[0]["reference_extracted"] == "2" and diffs[0]["other_extracted"] == "7"
    assert not diffs[0]["same_extracted"]


def test_rows_ratios_and_targets():
    answers = {"p0": "a", "p1": "b", "p2": "c", "p3": "d"}
    naive = _child(100.0, {"p0": "a"}, tokens=20)  # 36 problems/h, 0.2 tokens/s
    b1 = _child(20.0, answers)  # p0 took 5 s: 20x faster than naive on the same problem
    b4 = _child(8.0, answers)  # 2.5x faster than B=1
    rows = [
        bench._row("b", "latentseek-psrm", "engine B=1", b1, batch_size=1),
        bench._row("b", "latentseek-psrm", "engine B=4", b4, batch_size=4),
        bench._row("a", "latentseek-psrm", "naive", naive),
        bench._row("d", "latentseek-psrm", "generate() B=4", {"wall_s": 4.0, "generated": 60}),
        bench._row("c", "latentseek-psrm", "ray 1 worker", _child(16.0, answers)),
        bench._row("c", "latentseek-psrm", "ray 2 workers", _child(10.0, answers)),
        bench._row("b", "cot", "engine B=1", {"error": "exit 1: boom"}, batch_size=1),
    ]
    assert rows[1]["problems_per_hour"] == pytest.approx(1800.0)
    assert rows[1]["tokens_per_s"] == pytest.approx(5.0)
    assert rows[3]["problems"] == 0 and rows[3]["tokens_per_s"] == pytest.approx(15.0)
    matched = {"latentseek-psrm": {"naive_s": 100.0, "engine_b1_s": 5.0}}
    ratios = bench.compute_ratios(rows, matched)
    r = ratios["latentseek-psrm"]
    assert r["best_batch_size"] == 4
    assert r["b_over_a_direct"] == pytest.approx(1800.0 / 36.0)
    assert r["b_over_a_tokens_per_s"] == pytest.approx(5.0 / 0.2)
    assert r["b1_over_a_matched"] == pytest.approx(20.0)
    assert r["b_over_d_tokens_per_s"] == pytest.approx(5.0 / 15.0)
    assert r["c2_over_c1"] == pytest.approx(1.6)
    assert ratios["cot"]["best_batch_size"] is None  # its only row failed

    targets = bench.evaluate_targets(ratios)
    speedup = next(t for t in targets if "20x naive" in t["target"])
    # the smaller of 50x per problem and 25x per token (the naive's problem was the cheaper one)
    assert speedup["value"] == pytest.approx(25.0) and speedup["met"] is True
    ceiling = next(t for t in targets if "ceiling" in t["target"])
    assert ceiling["met"] is False  # 0.33 < 0.6
    scaling = next(t for t in targets if "workers" in t["target"])
    assert scaling["met"] is False  # 1.6x, but on 4 problems, fewer than 16
    assert "fewer than" in scaling["note"]


def test_report_is_written_as_json_and_markdown(tmp_path):
    rows = [
        bench._row("b", "cot", "engine B=1", _child(2.0, {"p0": "1"}), batch_size=1),
        bench._row("b", "cot", "engine B=2", {"error": "exit 1: out of memory"}, batch_size=2),
    ]
    ratios = bench.compute_ratios(rows, {})
    report = {
        "date": "2026-01-01T00:00:00",
        "command": "latentseek bench --problems 1",
        "machine": bench.machine_info(),
        "torch_threads": 2,
        "settings_text": "tiny",
        "total_wall_s": 3.0,
        "load_start": 0.5,
        "load_end": 0.7,
        "rows": rows,
        "ratios": ratios,
        "targets": bench.evaluate_targets(ratios),
        "answer_checks": [
            {
                "method": "cot",
                "what": "naive (a) vs engine B=1 (b)",
                "compared": 1,
                "differences": bench.compare_answers(
                    _child(1, {"p0": "= 5"})["rows"], _child(1, {"p0": "= 6"})["rows"]
                ),
            }
        ],
        "notes": bench.NOTES,
    }
    bench.write_report(report, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["rows"][0]["problems"] == 1
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| b | cot | engine B=1 | 1 |" in md
    assert "exit 1: out of memory" in md  # a failed row says why
    assert "0 of 1 identical; 1 differ" in md and "p0" in md  # differences are listed
    assert "## Targets" in md and "## How it was measured" in md


def test_profiles_fill_only_unset_options():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = bench.resolve_profile(parser.parse_args(["--problems", "2", "--methods", "cot"]))
    assert args.problems == 2 and args.methods == ["cot"]
    assert args.batch_sizes == [1, 16] and args.ray_problems == 16 and args.b1_problems == 1
    full = bench.resolve_profile(parser.parse_args(["--full"]))
    assert full.methods == list(bench.METHODS) and full.batch_sizes == [1, 4, 8, 16]
    with pytest.raises(SystemExit):
        parser.parse_args(["--methods", "cot,nope"])


def test_naive_cot_row_is_the_cot_pass_of_the_naive_latentseek_run():
    source = _child(300.0, {"p0": "final 7"}, tokens=40, rss_after_load_mb=800.0)
    cot = {**source["rows"][0], "final_answer": "cot 5", "solver_generated": 12, "wall_s": 30.0}
    source["rows"][0]["cot"] = cot
    res = bench._cot_from_naive_latentseek(source)
    assert res["wall_s"] == pytest.approx(30.0) and res["rows"] == [cot]
    row = bench._row("a", "cot", "naive", res)
    assert row["problems"] == 1 and row["generated_tokens"] == 12
    assert row["peak_rss_mb"] == 900.0  # the run it was read from


def test_bench_runs_every_row_end_to_end(tmp_path):
    """What `make bench` runs, shrunk (2 problems, 8 tokens, K=1): every row kind completes, the
    report has them all, and the naive reference and the engine agree on the answers."""
    out = tmp_path / "bench"
    args = [
        str(Path(sys.executable).parent / "latentseek"), "bench", "--problems", "2",
        "--batch-sizes", "1,2", "--max-new-tokens", "8", "--max-iters", "1",
        "--ray-problems", "2", "--ray-batch-size", "1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["row"], r["method"], r["config"]): r for r in report["rows"]}
    assert not [r for r in report["rows"] if "error" in r]
    methods = ("cot", "latentseek-psrm")
    engine = {
        m: [r for r in report["rows"] if r["row"] == "b" and r["method"] == m] for m in methods
    }
    for method in methods:
        assert rows[("b", method, "engine B=1")]["problems"] == 1
        assert rows[("b", method, "engine B=2")]["problems"] == 2
    # The ceiling (d) runs at the engine's best batch size, which timing decides: find its row by
    # kind and check it against the engine rows of this very report, whichever size won.
    best = {m: max(engine[m], key=lambda r: r["problems_per_hour"])["batch_size"] for m in methods}
    for method in methods:
        b = best[method]
        assert report["ratios"][method]["best_batch_size"] == b
        (ceiling,) = [r for r in report["rows"] if r["row"] == "d" and r["method"] == method]
        assert ceiling["batch_size"] == b and ceiling["config"] == f"generate() B={b}"
        # one batch of b rows for min(engine tokens at B=b (the least over the methods sharing
        # b), b * max_new_tokens / 2 = 4b) tokens, rounded up to whole rows
        engine_tokens = min(
            r["generated_tokens"]
            for m in methods
            for r in engine[m]
            if best[m] == r["batch_size"] == b
        )
        total = min(engine_tokens, 4 * b)
        assert ceiling["generated_tokens"] == b * -(-total // b)
    assert rows[("a", "latentseek-psrm", "naive")]["problems"] == 1
    assert rows[("a", "cot", "naive (CoT pass of the latentseek-psrm row)")]["problems"] == 1
    assert rows[("c", "cot", "ray 2 workers")]["problems"] == 2
    checks = report["answer_checks"]
    assert checks and all(c["compared"] >= 1 and not c["differences"] for c in checks)
    assert "## Targets" in (out / "bench.md").read_text()
