"""analysis.report: a report of a hand-built sweep, its numbers worked out by hand.

The sweep (dataset gsm8k, model "tiny", problems p1..p4; gold 2, 4, 6, 0), one run dir each:

    cot        CoT: p1 wrong, p2 right, p3 right, p4 wrong                        -> 50 %
               answer tokens 40, 50, 40, 50; prompt 20 each; FLOPs 1e6 per token
    ls-a       LatentSeek, PSRM, lr 0.03, K 2 (answer tokens per iteration in brackets)
               p1  CoT wrong [40], k1 wrong [30], k2 right [30] -> right, 2 iterations
               p2  CoT right [50], accepted                      -> right, 0
               p3  CoT right [40], accepted                      -> right, 0
               p4  CoT wrong [50], k1 right [50]                  -> right, 1
    ls-b       LatentSeek, PSRM, lr 0.3, K 2: as ls-a except p1 stays wrong at k2 -> 75 %
    ls-self    LatentSeek, self reward, lr 0.03, K 2, p1 and p2 only, with verifier tokens
               p1  CoT wrong r -1 [30], k1 wrong r -0.5 [30], k2 right r -0.1 [30] -> right
               p2  CoT right r -0.5 [30], k1 right r 0 [30]                        -> right
    sc         SC, N = 4 (boxed answers; the majority by equivalence, ties to the first group)
               p1  3 2 2 5    p2  4 1 1 4    p3  6 7 7 6    p4  failed, no samples

Solver tokens of a LatentSeek problem: prompt 20 + generated = the sum of its answer tokens.
"""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.accuracy import paired_gain, wilson_interval
from analysis.records import find_run_dirs
from analysis.report import ReportFiles, write_report
from analysis.tables import accuracy_by_iteration
from jobs import cli
from pipeline.config import Config
from pipeline.method.results import Compute, IterationStats, ProblemResult
from pipeline.run.records import RecordStore, read_records

MODEL = "tiny"
GOLD = {"p1": "2", "p2": "4", "p3": "6", "p4": "0"}


def _compute(prompt: int, generated: int, verifier: int = 0) -> Compute:
    # FLOPs: 1e6 per token, so FLOPs per problem = 1e6 x tokens per problem everywhere.
    return Compute(
        solver_prompt_tokens=prompt,
        solver_generated_tokens=generated,
        verifier_prompt_tokens=verifier,
        flops=1e6 * (prompt + generated + verifier),
    )


def cot(pid: str, right: bool, length: int) -> ProblemResult:
    answer = f"\\boxed{{{GOLD[pid] if right else 9}}}"
    return ProblemResult(
        problem_id=pid, dataset="gsm8k", method="cot", question="?", gold=GOLD[pid],
        cot_answer=answer, final_answer=answer, cot_correct=right, final_correct=right,
        cot_length=length, final_length=length, stop_reason="eos",
        compute=_compute(20, length),
    )  # fmt: skip


def latentseek(
    pid: str,
    cot_right: bool,
    r0: float,
    lengths: list[int],
    steps: list[tuple[bool, float, int]],  # (correct, reward, tokens_changed) per k >= 1
    update_length: int = 8,
    verifier: int = 0,
) -> ProblemResult:
    stats = [
        IterationStats(
            iteration=k, reward=reward, answer=f"answer {k}", correct=right,
            tokens=lengths[k], loss=0.1, grad_norm=1.0, tokens_changed=changed, mean_logprob=-1,
        )
        for k, (right, reward, changed) in enumerate(steps, start=1)
    ]  # fmt: skip
    final_right = steps[-1][0] if steps else cot_right
    return ProblemResult(
        problem_id=pid, dataset="gsm8k", method="latentseek", question="?", gold=GOLD[pid],
        cot_answer="cot", final_answer="final", cot_correct=cot_right,
        final_correct=final_right, initial_reward=r0, rewards=[s[1] for s in steps],
        iterations=len(steps), update_length=update_length, cot_length=lengths[0],
        final_length=lengths[-1], stop_reason="threshold" if steps else "cot_accepted",
        iteration_stats=stats, compute=_compute(20, sum(lengths), verifier),
    )  # fmt: skip


def sc(pid: str, picks: list[str], pick: int) -> ProblemResult:
    """What an SC run records: the samples, each one's grade and its group of equal answers
    (numbered by first appearance), as `pipeline.method.methods.sc` writes them."""
    samples = [f"so \\boxed{{{a}}}" for a in picks]
    groups = [list(dict.fromkeys(picks)).index(a) for a in picks]
    return ProblemResult(
        problem_id=pid, dataset="gsm8k", method="sc", question="?", gold=GOLD[pid],
        cot_answer=samples[0], final_answer=samples[pick], final_extracted=picks[pick],
        cot_correct=picks[0] == GOLD[pid], final_correct=picks[pick] == GOLD[pid],
        samples=samples, stop_reason="majority", compute=_compute(20, 120),
        sample_correct=[a == GOLD[pid] for a in picks], sample_groups=groups,
    )  # fmt: skip


def _write(run_dir, results, cfg: Config | None) -> None:
    RecordStore(run_dir).write(results, run_dir.name, MODEL, worker="w0")
    if cfg is not None:
        cfg.save(run_dir / "config.yaml")


def _psrm_run(p1_final_right: bool) -> list[ProblemResult]:
    return [
        latentseek(
            "p1",
            False,
            -1.0,
            [40, 30, 30],
            [(False, -1.0, 3), (p1_final_right, 0.0 if p1_final_right else -1.0, 1)],
        ),  # fmt: skip
        latentseek("p2", True, 0.0, [50], []),
        latentseek("p3", True, 0.0, [40], []),
        latentseek("p4", False, -1.0, [50, 50], [(True, 0.0, 2)], update_length=10),
    ]


def build_sweep(root):
    """Write the sweep of the module docstring under `root`; returns `root`."""
    base = {"dataset": "gsm8k", "model": MODEL, "max_iters": 2}
    _write(
        root / "cot",
        [cot("p1", False, 40), cot("p2", True, 50), cot("p3", True, 40), cot("p4", False, 50)],
        Config(method=["cot"], **base),
    )
    _write(root / "ls-a", _psrm_run(True), Config(method=["latentseek"], reward="psrm", lr=0.03, **base))  # fmt: skip
    _write(root / "ls-b", _psrm_run(False), Config(method=["latentseek"], reward="psrm", lr=0.3, **base))  # fmt: skip
    self_run = [
        # verifier tokens: 100 per answer scored (3 answers for p1, 2 for p2)
        latentseek("p1", False, -1.0, [30, 30, 30], [(False, -0.5, 2), (True, -0.1, 2)],
                   verifier=300),
        latentseek("p2", True, -0.5, [30, 30], [(True, 0.0, 1)], verifier=200),
    ]  # fmt: skip
    _write(root / "ls-self", self_run, Config(method=["latentseek"], reward="self", lr=0.03, **base))  # fmt: skip
    failed = ProblemResult(
        problem_id="p4", dataset="gsm8k", method="sc", question="?", gold="0",
        stop_reason="error", error="RuntimeError: boom",
    )  # fmt: skip
    _write(
        root / "sc",
        [sc("p1", ["3", "2", "2", "5"], 1), sc("p2", ["4", "1", "1", "4"], 0),
         sc("p3", ["6", "7", "7", "6"], 0), failed],
        Config(method=["sc"], n_samples=4, **base),
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return build_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def report(sweep) -> ReportFiles:
    return write_report(sweep, sweep / "report")


def _by(df: pd.DataFrame, label: str) -> pd.DataFrame:
    return df[df["label"] == label]


# --- statistics ----------------------------------------------------------------------------


def test_wilson_and_paired_gain_by_hand():
    # 2 of 4: centre 0.5; half = 1.96 sqrt(1/16 + 1.96^2/64) / (1 + 1.96^2/4) = 0.34995
    assert wilson_interval(2, 4) == pytest.approx((0.15005, 0.84995), abs=1e-4)
    # 4 of 4: centre (1 + 0.48) / 1.9604 = 0.7550, half 0.2450 -> [0.5101, 1]
    assert wilson_interval(4, 4) == pytest.approx((0.5101, 1.0), abs=1e-4)
    # d = [1, 0, 0, 0]: mean 0.25, sd 0.5, se 0.25 -> 0.25 +- 0.49
    g = paired_gain(pd.Series([1, 0, 1, 1]).to_numpy(bool), pd.Series([0, 0, 1, 1]).to_numpy(bool))
    assert (g["gain"], g["pairs"]) == (0.25, 4)
    assert (g["low"], g["high"]) == pytest.approx((0.25 - 0.49, 0.25 + 0.49), abs=1e-4)
    one = paired_gain(pd.Series([True]).to_numpy(bool), pd.Series([False]).to_numpy(bool))
    assert one["gain"] == 1 and pd.isna(one["low"])


# --- the sweep -----------------------------------------------------------------------------


def test_finds_the_run_dirs_of_a_sweep(sweep, report):
    # the report/ folder written into the sweep is not a run
    assert [p.name for p in find_run_dirs(sweep)] == ["cot", "ls-a", "ls-b", "ls-self", "sc"]
    assert find_run_dirs(sweep / "sc") == [sweep / "sc"]


def test_every_listed_file_exists(report):
    names = sorted(p.name for p in report.paths())
    assert names == sorted(
        ["report.md", "table.md", "table.csv", "scaling.csv", "scaling.png", "compute.csv",
         "compute.png", "rewards.png", "iterations.csv", "iterations.png",
         "tokens_changed.csv", "tokens_changed.png", "paper.md", "paper.csv", "laws.csv",
         "law_points.csv", "forecasts.csv", "frontier.csv", "laws.png", "frontier.png"]
    )  # fmt: skip
    assert all(p.is_file() and p.stat().st_size > 0 for p in report.paths())
    assert report.notes == ()


def test_table_accuracy_intervals_and_paired_gains(report):
    table = pd.read_csv(report.table_csv)
    assert list(table["label"]) == [
        "CoT", "SC (N=4)", "LatentSeek (self)", "LatentSeek (PSRM, lr=0.03)",
        "LatentSeek (PSRM, lr=0.3)",
    ]  # fmt: skip
    t = table.set_index("label")
    assert list(t["problems"]) == [4, 4, 2, 4, 4]
    # CoT 2/4 -> 50 [15.0, 85.0]; no gain of its own
    assert t.loc["CoT", "accuracy_pct"] == 50
    assert t.loc["CoT", ["accuracy_ci_low_pct", "accuracy_ci_high_pct"]].tolist() == pytest.approx(
        [15.0, 85.0], abs=0.01
    )
    assert t.loc["CoT", "pairs"] == 0 and pd.isna(t.loc["CoT", "gain_pct"])
    # LatentSeek PSRM lr 0.03: 4/4; against its own CoT pass d = [1, 0, 0, 1]: mean 0.5,
    # sd sqrt(1/3) = 0.5774, half 1.96 x 0.5774 / 2 = 0.5658 -> [-6.6, 106.6], clipped to 100
    a = t.loc["LatentSeek (PSRM, lr=0.03)"]
    assert a["accuracy_pct"] == 100 and a["accuracy_ci_low_pct"] == pytest.approx(51.01, abs=0.01)
    assert (a["gain_pct"], a["pairs"], a["gain_reference"]) == (50, 4, "own CoT pass")
    assert [a["gain_ci_low_pct"], a["gain_ci_high_pct"]] == pytest.approx([-6.58, 100], abs=0.01)
    # lr 0.3: 3/4, d = [0, 0, 0, 1] -> 25 +- 49.0
    b = t.loc["LatentSeek (PSRM, lr=0.3)"]
    assert b["accuracy_pct"] == 75 and b["gain_pct"] == 25
    assert [b["gain_ci_low_pct"], b["gain_ci_high_pct"]] == pytest.approx([-24.0, 74.0], abs=0.01)
    # SC: p1, p2, p3 right, p4 failed -> 75; paired with the CoT run: d = [1, 0, 0, 0] -> 25
    s = t.loc["SC (N=4)"]
    assert (s["accuracy_pct"], s["failures"], s["gain_pct"], s["pairs"]) == (75, 1, 25, 4)
    assert s["gain_reference"] == "CoT records"
    # self: 2/2, d = [1, 0]: sd 0.7071, half 1.96 x 0.7071 / sqrt(2) = 0.98 -> [-48.0, 100]
    assert t.loc["LatentSeek (self)", ["gain_pct", "gain_ci_low_pct"]].tolist() == pytest.approx(
        [50, -48.0], abs=0.01
    )
    assert t.loc["LatentSeek (PSRM, lr=0.3)", "lr"] == 0.3
    assert t.loc["SC (N=4)", "n_samples"] == 4 and pd.isna(t.loc["SC (N=4)", "lr"])

    md = report.table_md.read_text()
    assert "| LatentSeek (PSRM, lr=0.03) | 100.0 [51.0, 100.0] (n=4) |" in md
    assert "| LatentSeek (PSRM, lr=0.03) | +50.0 [-6.6, +100.0] (4 pairs) |" in md
    assert "| method | GSM8K |" in md and "Wilson" in md and "normal approximation" in md


def test_scaling_carries_early_stops_forward(sweep, report):
    scaling = pd.read_csv(report.scaling_csv)
    a = _by(scaling, "LatentSeek (PSRM, lr=0.03)")
    # k=0: CoT passes F T T F; k=1: p1's step 1 wrong, p4 stopped at 1 (right) -> 3/4;
    # k=2: p1's step 2 right -> 4/4. lr 0.3: p1 stays wrong -> 50, 75, 75
    assert a["k"].tolist() == [0, 1, 2]
    assert a["accuracy_pct"].tolist() == [50, 75, 100]
    assert _by(scaling, "LatentSeek (PSRM, lr=0.3)")["accuracy_pct"].tolist() == [50, 75, 75]
    # running after k: p1 and p4 ran more than 0 steps, p1 more than 1
    assert a["running_pct"].tolist() == [50, 25, 0]
    # PSRM rewards: k0 (-1 + 0 + 0 - 1) / 4, k1 p1 still -1, k2 all 0
    assert a["mean_reward"].tolist() == [-0.5, -0.25, 0]
    # self: p1 -1, -0.5, -0.1; p2 -0.5, 0, 0 (carried) -> means -0.75, -0.25, -0.05
    s = _by(scaling, "LatentSeek (self)")
    assert s["mean_reward"].tolist() == pytest.approx([-0.75, -0.25, -0.05])
    assert s["accuracy_pct"].tolist() == [50, 50, 100]

    # the same curve as analysis.tables computes from the same records
    for name in ("ls-a", "ls-b", "ls-self"):
        problems, iterations = read_records(sweep / name)
        label = {"ls-a": "LatentSeek (PSRM, lr=0.03)", "ls-b": "LatentSeek (PSRM, lr=0.3)"}
        expected = accuracy_by_iteration(problems, iterations)["accuracy"] * 100
        got = _by(scaling, label.get(name, "LatentSeek (self)"))["accuracy_pct"]
        assert got.tolist() == pytest.approx(expected.tolist())


def test_compute_per_k_and_per_n(report):
    compute = pd.read_csv(report.compute_csv)
    a = _by(compute, "LatentSeek (PSRM, lr=0.03)")
    assert set(a["budget_kind"]) == {"k"}
    # tokens after k = 20 + generated x (answer tokens so far / all answer tokens); no verifier
    # p1: 60, 90, 120   p2: 70   p3: 60   p4: 70, 120, 120  -> means 65, 85, 92.5
    assert a["tokens_per_problem"].tolist() == pytest.approx([65, 85, 92.5])
    assert a["flops_per_problem"].tolist() == pytest.approx([65e6, 85e6, 92.5e6])
    # self: + verifier tokens x (answers scored so far / answers scored)
    # p1: 20 + 90 x 1/3 + 300 x 1/3 = 150, then 280, 410   p2: 150, 280, 280
    s = _by(compute, "LatentSeek (self)")
    assert s["tokens_per_problem"].tolist() == pytest.approx([150, 280, 345])
    # SC with the first n samples:
    #   n=1: p1 3 F, p2 4 T, p3 6 T              -> 50
    #   n=2: ties go to the first group: 3 F, 4 T, 6 T -> 50
    #   n=3: p1 2 T (2 votes), p2 1 F, p3 7 F     -> 25
    #   n=4: the recorded answers T T T, p4 failed -> 75
    c = _by(compute, "SC (N=4)")
    assert c["budget"].tolist() == [1, 2, 3, 4] and set(c["budget_kind"]) == {"n"}
    assert c["accuracy_pct"].tolist() == [50, 50, 25, 75]
    # tokens: 140 x n / 4 for p1..p3, 0 for the failed p4 -> 26.25 n
    assert c["tokens_per_problem"].tolist() == pytest.approx([26.25, 52.5, 78.75, 105])
    cot_point = _by(compute, "CoT")
    assert cot_point[["budget_kind", "accuracy_pct", "tokens_per_problem"]].values.tolist() == [
        ["cot", 50, 65]
    ]


def test_distributions_of_iterations_and_tokens_changed(report):
    iterations = _by(pd.read_csv(report.iterations_csv), "LatentSeek (PSRM, lr=0.03)")
    # iterations used: 2, 0, 0, 1
    assert iterations["share_pct"].tolist() == [50, 25, 25]
    assert iterations["mean_iterations"].iloc[0] == 0.75
    changed = _by(pd.read_csv(report.tokens_changed_csv), "LatentSeek (PSRM, lr=0.03)").iloc[0]
    # steps: p1 3 and 1 of U 8, p4 2 of U 10 -> mean 2; 37.5 %, 12.5 %, 20 % -> 23.33 %
    assert (changed["steps"], changed["mean"], changed["median"]) == (3, 2, 2)
    assert changed["mean_pct_of_u"] == pytest.approx(70 / 3)


def test_pngs_are_images_and_the_report_embeds_them(report):
    image = pytest.importorskip("PIL.Image")
    pngs = [report.scaling_png, report.compute_png, report.rewards_png,
            report.iterations_png, report.tokens_changed_png, report.laws_png,
            report.frontier_png]  # fmt: skip
    for png in pngs:
        with image.open(png) as im:
            im.verify()
        with image.open(png) as im:
            assert im.format == "PNG" and im.width >= 500 and im.height >= 300
    text = report.report.read_text()
    for png in pngs:
        assert f"]({png.name})" in text
    assert "| LatentSeek (PSRM, lr=0.03) | 100.0 [51.0, 100.0] (n=4) |" in text
    assert text.count("Numbers: `") == 7  # one paragraph per figure says how it was computed


# --- a single run, no CoT run, no config ------------------------------------------------------


def test_single_run_without_config_uses_its_own_cot_pass(tmp_path):
    run = tmp_path / "alone"
    _write(run, _psrm_run(False), None)
    files = write_report(run, tmp_path / "out")
    t = pd.read_csv(files.table_csv).set_index("label")
    assert list(t.index) == ["CoT", "LatentSeek (?)"]  # the reward is unknown without config
    assert t.loc["CoT", "source"] == "LatentSeek CoT pass" and t.loc["CoT", "accuracy_pct"] == 50
    assert t.loc["LatentSeek (?)", "gain_pct"] == 25
    assert "†" in files.table_md.read_text()
    # without max_iters the curve runs to the most iterations seen
    assert pd.read_csv(files.scaling_csv)["k"].tolist() == [0, 1, 2]


# --- command line ----------------------------------------------------------------------------


def test_cli_writes_into_the_default_folder_and_prints_the_files(tmp_path, capsys):
    run = tmp_path / "r"
    _write(run, [cot("p1", True, 10)], Config(method=["cot"]))
    assert cli.main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert (
        str(run / "report" / "report.md") in printed
        and str(run / "report" / "table.csv") in printed
    )
    assert (run / "report" / "table.md").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no problem records" in capsys.readouterr().err
