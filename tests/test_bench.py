"""`latentseek bench`: its keys, its ratios and targets on hand-made rows (nothing is timed), a
whole bench in-process with fake children (a failing row makes the exit code 1), and one tiny
real run of every row kind (real child processes, a real local Ray). No test depends on how
fast anything ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import bench
from jobs.bench import harness, settings
from jobs.bench.plan import table_row
from jobs.bench.targets import agreement, answer_checks, compute_ratios, evaluate_targets
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (
    "engine best (static or continuous) >= 50x the naive loop",
    "continuous >= 1.3x static",
    "engine tokens/s at its best batch in fp32 >= 225",
    "bfloat16 tokens/s >= 1.5x float32",
)


def _child(wall: float, answers: dict[str, str], tokens: int = 10, **extra) -> dict:
    rows = [
        {"problem_id": pid, "final_answer": text, "extracted": text[-1:], "correct": text.endswith("7"),
         "iterations": 1, "stop_reason": "max_iters", "error": "", "solver_generated": tokens,
         "verifier_generated": 0, "wall_s": wall / len(answers)}
        for pid, text in answers.items()
    ]  # fmt: skip
    return {"wall_s": wall, "rows": rows, "peak_rss_mb": 900.0, "dtype": "torch.float32", **extra}


def test_keys_are_config_keys_and_bench_keys():
    cfg, s = settings.parse(None, ["max_new_tokens=32", "batch_sizes=1,4", "skip=ray,naive"])
    assert cfg.max_new_tokens == 32 and cfg.max_iters == 2  # the preset's, under the command line
    assert s.batch_sizes == [1, 4] and s.skip == ["ray", "naive"] and not s.runs("ray")
    _, full = settings.parse(None, ["preset=full", "naive_problems=1"])
    assert full.methods == list(settings.METHODS) and full.naive_problems == 1
    with pytest.raises(ConfigError, match="did you mean .*batch_sizes"):
        settings.parse(None, ["batch_size=4", "batch_sizez=1,2"])
    with pytest.raises(ConfigError, match="methods"):
        settings.parse(None, ["methods=cot,nope"])
    with pytest.raises(ConfigError, match="skip"):
        settings.parse(None, ["skip=everything"])


def test_agreement_counts_texts_answers_and_correctness():
    ref = _child(1, {"p0": "x = 1", "p1": "so 7", "p2": "3"})["rows"]
    other = _child(1, {"p0": "x = 1", "p1": "so 2", "p3": "9"})["rows"]
    a = agreement(ref, other)  # p3 has no reference: not compared
    assert (a["compared"], a["same_text"], a["same_answer"], a["same_correct"]) == (2, 1, 1, 1)
    (d,) = a["differences"]
    assert d["problem_id"] == "p1" and d["first_difference_at_char"] == 3
    assert (d["reference_extracted"], d["other_extracted"]) == ("7", "2")


def _rows() -> tuple[list[dict], dict[str, dict]]:
    """A run's table by hand: psrm naive 0.2 tokens/s; static 64 problems 640 tokens in 64 s
    (10 tokens/s), continuous in 32 s (20 tokens/s); bf16 vs fp32 at B=16: 30 vs 20 tokens/s."""
    answers = {f"p{i}": "7" for i in range(64)}
    sixteen = {f"p{i}": "7" for i in range(16)}
    made = [
        ("naive", "naive", _child(50.0, {"p0": "7"}, tokens=10), {}),
        ("engine", "engine B=1 static", _child(5.0, {"p0": "7"}), dict(batch_size=1)),
        ("engine", "engine B=16 static", _child(8.0, sixteen), dict(batch_size=16)),
        ("batching", "static B=16", _child(64.0, answers), dict(batching="static", max_new_tokens=10)),
        ("batching", "continuous B=16", _child(32.0, answers), dict(batching="continuous")),
        ("bf16", "bf16 B=16 static", _child(16 / 3, sixteen, dtype="bfloat16"), dict(batch_size=16)),
        ("ceiling", "generate() B=16", {"wall_s": 4.0, "generated": 100, "dtype": "float32"}, {}),
        ("ray", "ray 1 worker", _child(16.0, sixteen), dict(workers=1)),
        ("ray", "ray 2 workers", {"error": "exit 1: boom"}, dict(workers=2)),
    ]  # fmt: skip
    rows, results = [], {}
    for kind, config, result, extra in made:
        key = f"{kind}/latentseek-psrm/{config}"
        results[key] = result
        extra = {"batch_size": 16, "batching": "static", **extra}
        rows.append(table_row(kind, "latentseek-psrm", config, result, key=key, **extra))
    return rows, results


def test_ratios_and_targets_from_the_rows_of_one_run():
    rows, results = _rows()
    checks = answer_checks(rows, results)
    ratios = compute_ratios(rows)
    r = ratios["latentseek-psrm"]
    assert r["best"] == "engine B=16 static" and r["best_tokens_per_s"] == pytest.approx(20.0)
    assert r["batching_best_over_naive_tokens"] == pytest.approx(20.0 / 0.2)
    assert r["continuous_over_static"] == pytest.approx(2.0)
    assert r["bf16_over_fp32_tokens"] == pytest.approx(30.0 / 20.0)
    assert r["best_over_ceiling"] == pytest.approx(20.0 / 25.0)
    assert "ray2_over_ray1" not in r  # its row failed
    whats = {c["what"] for c in checks}
    assert {"continuous vs static batching", "bfloat16 vs float32", "naive vs engine B=1"} <= whats

    targets = {t["target"]: t for t in evaluate_targets(rows, ratios, checks, results)}
    by = {name: next(t for k, t in targets.items() if name in k) for name in TARGETS}
    assert by[TARGETS[0]]["met"] and by[TARGETS[0]]["value"] == pytest.approx(100.0)
    assert by[TARGETS[1]]["met"] and "64/64 identical texts" in by[TARGETS[1]]["note"]
    # 10 tokens per problem of a budget of (1 CoT + 1 iteration) x 10 tokens
    assert "used 50% of their 10-token budget" in by[TARGETS[1]]["note"]
    assert not by[TARGETS[2]]["met"]  # 20 tokens/s
    assert by[TARGETS[3]]["met"]  # 1.5x exactly
    assert all(isinstance(t["met"], bool) for t in targets.values())


def test_a_target_whose_row_failed_is_missed_and_says_so():
    rows, results = _rows()
    rows = [r for r in rows if r["row"] != "bf16"]
    targets = evaluate_targets(rows, compute_ratios(rows), [], results)
    bf16 = next(t for t in targets if TARGETS[3] in t["target"])
    assert bf16["met"] is False and "not measured" in bf16["note"]


def _fake_child(failing: str):
    """A `Runner.child` that returns made-up results at once; the row labelled `failing` fails."""

    def child(self, label: str, spec: dict, python: str | None = None) -> dict:
        self.count += 1
        if label.startswith(failing):
            return {"error": "exit 1: RuntimeError: deliberate"}
        n, b = spec["cfg"]["limit"], spec["cfg"]["batch_size"]
        result = _child(float(n), {f"gsm8k-{i}": "7" for i in range(n)}, load_before=0.5)
        result["task_walls"] = [1.0] * -(-n // b)
        dtype = spec["cfg"]["dtype"]
        result["dtype"] = "float32" if dtype == "auto" else dtype
        for i, r in enumerate(result["rows"]):
            r.update(cot=dict(r), task=i // b)
        if spec["kind"] == "ceiling":
            return {"wall_s": 1.0, "generated": spec["total_tokens"], "dtype": "float32"}
        if spec["kind"] == "ray":
            return {"wall_s": 2.0, "runs": {"1": result, "2": result}}
        return result

    return child


@pytest.mark.parametrize("failing", ["", "bf16 B=16 static latentseek-psrm"])
def test_every_row_reported_and_a_failed_row_makes_the_exit_code_1(
    failing, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(harness.Runner, "child", _fake_child(failing or "nothing"))
    monkeypatch.setattr("pipeline.engine.model.prepare_model", lambda cfg: None)
    code = bench.main(None, [f"out={tmp_path}", "profile=never", f"vllm_python={sys.executable}"])
    md = (tmp_path / "bench.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()  # the report is also printed
    report = json.loads((tmp_path / "bench.json").read_text())
    kinds = {r["row"] for r in report["rows"]}
    assert kinds == {"engine", "batching", "bf16", "ceiling", "naive", "ray", "vllm"}
    vllm = [r for r in report["rows"] if r["row"] == "vllm"]
    assert sorted((r["method"], r["backend"]) for r in vllm) == sorted(
        (m, b) for m in ("cot", "latentseek-psrm", "sc-8") for b in ("native", "vllm")
    )
    assert any("backend=vllm tokens/s" in line for line in md.splitlines())
    for name in TARGETS:  # every target is in the table, met or missed
        line = next(line for line in md.splitlines() if name in line)
        assert "| met |" in line or "| MISSED |" in line
    if failing:
        assert code == 1
        (bad,) = [r for r in report["rows"] if "error" in r]
        assert bad["row"] == "bf16" and "deliberate" in bad["error"]
        assert "| FAILED |" in md and "deliberate" in md and "failed rows: 1" in md
    else:
        assert code == 0 and "failed rows: 0" in md


@pytest.mark.slow
def test_bench_runs_every_row_end_to_end(tmp_path):
    """`make bench` shrunk (2 problems, 8 tokens, K=1): every row kind completes in its own
    process, the report has them all, and rows that should agree give the same answers. The
    vLLM rows point at a Python that does not exist: they are left out, saying what to install
    (the vLLM rows run for real in tests/backend_vllm)."""
    out = tmp_path / "bench"
    args = [
        str(Path(sys.executable).parent / "latentseek"), "bench", "limit=2", "batch_sizes=1,2",
        "batch_size=2", "max_new_tokens=8", "max_iters=1", "batching_problems=2",
        "ray_problems=2", "ray_batch_size=1", "profile=always", f"out={out}",
        "vllm_problems=2", "vllm_methods=cot", f"vllm_python={tmp_path}/no-vllm/python",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vllm rows left out" in done.stderr and "make setup-vllm" in done.stderr
    report = json.loads((out / "bench.json").read_text())
    assert not [r for r in report["rows"] if "error" in r]
    assert {r["row"] for r in report["rows"]} == set(settings.ROW_KINDS) - {"vllm"}
    rows = {(r["row"], r["method"], r["config"]): r for r in report["rows"]}
    assert rows[("engine", "latentseek-psrm", "engine B=1 continuous")]["problems"] == 1
    assert rows[("batching", "latentseek-psrm", "static B=2, tasks of 2")]["problems"] == 2
    assert rows[("bf16", "latentseek-psrm", "bf16 B=2 static")]["dtype"] == "bfloat16"
    assert rows[("naive", "cot", "naive (CoT pass of latentseek-psrm)")]["problems"] == 1
    assert rows[("ray", "cot", "ray 2 workers")]["problems"] == 2
    checks = {(c["method"], c["what"]): c for c in report["answer_checks"]}
    for key in [("latentseek-psrm", "naive vs engine B=1"),
                ("latentseek-psrm", "continuous vs static batching"),
                ("cot", "ray 2 workers vs engine B=2 continuous")]:  # fmt: skip
        assert checks[key]["compared"] >= 1 and not checks[key]["differences"], key
    md = (out / "bench.md").read_text()
    assert "## Targets" in md and "## Profile" in md
    assert len(report["targets"]) >= len(TARGETS)
