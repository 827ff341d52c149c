"""The paper's experiments one command away: configs/paper recipes against the appendix's settings
(data/paper/latentseek-v3-settings.csv), the comparison with its reported numbers
(data/paper/latentseek-v3.csv, `analysis.paper`), and a recipe run end to end on the embedded
model."""

from __future__ import annotations

import csv
import importlib.util
import math
import tempfile
from pathlib import Path

import pytest

from analysis.paper import (
    agreement_table,
    comparison_table,
    iterations_table,
    load_paper,
    paper_markdown,
    verdicts_table,
)
from analysis.records import load_records
from pipeline.config import Config
from pipeline.method.results import IterationStats, ProblemResult
from pipeline.run.records import RecordStore
from pipeline.run.sweep import load_sweep, plan

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "paper_recipes.py"
SETTINGS = ROOT / "data" / "paper" / "latentseek-v3-settings.csv"


def _script():
    spec = importlib.util.spec_from_file_location("paper_recipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _appendix() -> dict:
    """(model, dataset, prompt, reward) -> {key: value}, read here from the settings file."""
    cells: dict = {}
    with SETTINGS.open() as fh:
        for row in csv.DictReader(fh):
            if row["table"] in {f"Table {n}" for n in range(21, 27)}:
                reward = row["method"].split("_")[1]
                cells.setdefault((row["model"], row["dataset"], row["prompt"], reward), {})[
                    row["key"]
                ] = row["value"]
    return cells


def test_recipes_are_what_the_script_writes():
    written = _script().recipes()
    on_disk = sorted((ROOT / "configs" / "paper").rglob("*.yaml"))
    assert sorted(written) == on_disk and len(on_disk) == 5 * 3 * 2
    for path, text in written.items():
        assert path.read_text() == text, f"{path}: run scripts/paper_recipes.py"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "configs" / "paper").rglob("*.yaml")),
    ids=lambda p: p.parent.name + "/" + p.name,
)
def test_recipe_expands_to_the_papers_cell(path):
    points = plan(load_sweep(path))
    first = points[0].cfg
    appendix = _appendix()
    own = appendix[(first.paper_model, first.dataset, first.prompt, "self")]
    oracle = appendix[(first.paper_model, first.dataset, first.prompt, "psrm")]
    by = {}
    for p in points:
        assert (p.cfg.paper_model, p.cfg.dataset, p.cfg.prompt) == (
            first.paper_model, first.dataset, first.prompt,
        )  # fmt: skip
        assert p.cfg.compat == "reference" and p.cfg.max_new_tokens == int(own["max_new_tokens"])
        assert p.cfg.max_iters == int(own["max_iters"]) == 10
        by.setdefault((p.cfg.method[0], p.cfg.reward), []).append(p.cfg)
    expected = {("cot", "self"), ("bon", "self"), ("sc", "self"), ("reflect", "self"),
                ("latentseek", "self"), ("latentseek", "psrm")}  # fmt: skip
    if first.dataset == "gsm8k":
        expected.add(("se", "self"))
        assert sorted(c.se_sigma2 for c in by[("se", "self")]) == [0.5, 0.75, 1.0]  # Table 5
    assert set(by) == expected
    assert by[("bon", "self")][0].n_samples == by[("sc", "self")][0].n_samples == 3  # App. F.3
    (ls,) = by[("latentseek", "self")]
    assert (ls.rho, ls.lr) == (float(own["rho"]), float(own["lr"]))
    (ps,) = by[("latentseek", "psrm")]
    assert (ps.rho, ps.lr) == (float(oracle["rho"]), float(oracle["lr"]))
    # App. F's self-reward per cell: a format reward where it names one (its weight), and the
    # reweighted verifiers where it says 1:1:1:2.
    weight = own.get("format_reward_weight", "none")
    assert ls.format_rule == (weight != "none")
    if weight == "3":
        assert ls.verifier_prompts == "verifiers-format3"
    if "calculation_check=1" in own.get("verifier_weights", ""):
        assert ls.verifier_prompts == "verifiers-calc1"
    # BoN and Self-Reflection score with the same self-reward as LatentSeek (App. F.3), and so
    # does SE (issue 28: they used the plain self-reward before).
    for other in (by[("bon", "self")][0], by[("reflect", "self")][0], *by.get(("se", "self"), [])):
        assert (other.format_rule, other.verifier_prompts) == (ls.format_rule, ls.verifier_prompts)


def test_recipe_cells_cover_table_1():
    # Every Table 1 cell of the five backbones has a recipe: 5 x 3 datasets x 2 prompts.
    paper = load_paper()
    t1 = paper[(paper["table"] == "Table 1") & (paper["model"] != "Avg")]
    cells = {(m, d, p) for m, d, p in zip(t1["model"], t1["dataset"], t1["prompt"])}
    recipes = {
        (cfg.paper_model, cfg.dataset, cfg.prompt)
        for path in (ROOT / "configs" / "paper").rglob("*.yaml")
        for cfg in [plan(load_sweep(path))[0].cfg]
    }
    assert cells == recipes and len(cells) == 30


# --- the comparison, on records written by hand -----------------------------------------------


def _result(pid, method, correct, **kw) -> ProblemResult:
    return ProblemResult(problem_id=pid, dataset="gsm8k", method=method, question="?", gold="1",
                         final_correct=correct, cot_correct=correct, **kw)  # fmt: skip


def _run(root: Path, name: str, results, **cfg) -> None:
    RecordStore(root / name).write(results, name, "my-7b", worker="w")
    Config(dataset="gsm8k", paper_model="Qwen2.5-7B-Instruct", **cfg).save(
        root / name / "config.yaml"
    )


def test_cells_beside_the_papers(tmp_path):
    # CoT boxed: 9 of 10 right = 90 %; the paper's Table 1 says 88.86 for Qwen2.5-7B-Instruct,
    # GSM8K, Prompt 1; Wilson 95% interval of 9/10: [59.6, 98.2] -> inside, +1.14 points.
    _run(tmp_path, "cot", [_result(f"p{i}", "cot", i < 9) for i in range(10)],
         method=["cot"], prompt="boxed")  # fmt: skip
    # LatentSeek (Self), json: 2 problems; p0 CoT accepted (0 iterations), p1 2 iterations.
    # Answers explored with rewards: p0 k0 -0.0 correct; p1 k0 -0.5 wrong, k1 -0.5 correct,
    # k2 -0.1 correct: (reward > -0.2) == correct on 3 of 4 -> 75 %.
    p0 = _result("p0", "latentseek", True, initial_reward=0.0)
    steps = [IterationStats(1, -0.5, "a", True, 5), IterationStats(2, -0.1, "b", True, 5)]
    p1 = _result("p1", "latentseek", True, initial_reward=-0.5, rewards=[-0.5, -0.1],
                 iterations=2, iteration_stats=steps)  # fmt: skip
    p1.cot_correct = False
    _run(tmp_path, "ls", [p0, p1], method=["latentseek"], reward="self", prompt="json")
    records = load_records(tmp_path)

    table = comparison_table(records)
    cot = table[table["label"] == "CoT"].iloc[0]
    assert (cot["paper_table"], cot["paper_pct"], cot["problems"]) == ("Table 1", 88.86, 10)
    assert cot["accuracy_pct"] == 90.0 and cot["difference_pp"] == pytest.approx(1.14)
    assert (round(cot["ci_low_pct"], 1), round(cot["ci_high_pct"], 1)) == (59.6, 98.2)
    assert cot["paper_in_ci"]
    ls = table[table["label"].str.startswith("LatentSeek")].iloc[0]
    assert (ls["prompt"], ls["paper_pct"], ls["accuracy_pct"]) == ("json", 85.06, 100.0)

    agreement = agreement_table(records).iloc[0]
    assert (agreement["answers"], agreement["agreement_pct"]) == (4, 75.0)
    assert agreement["paper_pct"] == 80.17  # Table 6, Qwen2.5-7B-Instruct
    iterations = iterations_table(records).iloc[0]
    assert iterations["mean_iterations"] == 1.0 and iterations["accepted_at_cot_pct"] == 50.0
    assert iterations["paper_mean_iterations"] == 1.52  # Table 8, GSM8K Prompt 2


def test_cells_are_matched_by_budget_and_tables_6_8_by_method_and_reward(tmp_path):
    # Issue 28: BoN with N = 10 is Table 10's cell (80.06 for Qwen2.5-7B, GSM8K, Prompt 2), not
    # Table 1's N = 3 (82.11); N = 5 and LatentSeek with K = 3 have no paper cell (the paper
    # reports N = 3 and 10, K = 10) and say so instead of sitting beside another budget.
    right = [_result(f"p{i}", "bon", i < 8) for i in range(10)]
    _run(tmp_path, "bon10", right, method=["bon"], reward="self", n_samples=10, prompt="json")
    _run(tmp_path, "bon5", right, method=["bon"], reward="self", n_samples=5, prompt="json")
    steps = [IterationStats(1, -0.5, "a", True, 5)]
    ls = [_result("p0", "latentseek", True, initial_reward=-0.5, rewards=[-0.5], iterations=1,
                  iteration_stats=steps)]  # fmt: skip
    _run(tmp_path, "ls3", ls, method=["latentseek"], reward="self", max_iters=3, prompt="json")
    # PSRM at K = 10 and Self-Reflection: Table 8 (self) and Table 6 (LatentSeek) are not theirs.
    _run(tmp_path, "psrm", ls, method=["latentseek"], reward="psrm", prompt="json")
    reflect = [_result("p0", "reflect", True, initial_reward=-0.5, rewards=[-0.5], iterations=1,
                       iteration_stats=steps)]  # fmt: skip
    _run(tmp_path, "reflect", reflect, method=["reflect"], reward="self", prompt="json")
    records = load_records(tmp_path)

    table = comparison_table(records).set_index("label")
    n10, n5 = table.loc["BoN (self, N=10)"], table.loc["BoN (self, N=5)"]
    assert (n10["paper_table"], n10["paper_pct"], n10["accuracy_pct"]) == ("Table 10", 80.06, 80.0)
    assert n10["note"] == ""
    assert math.isnan(n5["paper_pct"]) and n5["paper_table"] == ""
    assert (
        n5["note"] == "no paper cell at this budget; the paper has N=3 (Table 1), N=10 (Table 10)"
    )
    k3 = table.loc["LatentSeek (self)"]  # K = 3
    assert math.isnan(k3["paper_pct"]) and "the paper has K=10 (Table 1, " in k3["note"]

    iterations = iterations_table(records).set_index("label")  # Table 8: self at the cell's K
    assert {"LatentSeek (self)", "LatentSeek (PSRM)", "Self-Reflection (self)"} == set(
        iterations.index
    )
    assert iterations["paper_mean_iterations"].isna().all()  # K = 3, and PSRM
    agreement = agreement_table(records).set_index("label")
    assert math.isnan(agreement.loc["Self-Reflection (self)", "paper_pct"])  # Table 6: LatentSeek
    assert agreement.loc["LatentSeek (self)", "paper_pct"] == 80.17


def test_unreadable_verdicts_per_configuration_and_the_warning(tmp_path):
    # LatentSeek (self): p0 scored 3 answers (CoT + 2 iterations) x 4 verifiers = 12 verdicts,
    # 6 unreadable -> 50% (warned); BoN (self, N=3): 3 samples x 4 = 12 verdicts, 1 unreadable
    # -> 8.3% (under the 10% threshold); CoT has no self-reward.
    ls = _result("p0", "latentseek", True, initial_reward=-0.5, rewards=[-0.5, -0.5],
                 iterations=2, unparsed_verdicts=6)  # fmt: skip
    _run(tmp_path, "ls", [ls], method=["latentseek"], reward="self", prompt="json")
    bon = _result("p0", "bon", True, sample_rewards=[0.0, -0.5, -1.0], unparsed_verdicts=1)
    _run(tmp_path, "bon", [bon], method=["bon"], reward="self", n_samples=3, prompt="json")
    _run(tmp_path, "cot", [_result("p0", "cot", True)], method=["cot"], prompt="json")
    records = load_records(tmp_path)
    table = verdicts_table(records).set_index("label")
    assert set(table.index) == {"LatentSeek (self)", "BoN (self, N=3)"}
    ls_row, bon_row = table.loc["LatentSeek (self)"], table.loc["BoN (self, N=3)"]
    assert (ls_row["verdicts"], ls_row["unparsed"], ls_row["unparsed_pct"]) == (12, 6, 50.0)
    assert ls_row["warning"] and not bon_row["warning"]
    assert (bon_row["verdicts"], bon_row["unparsed"]) == (12, 1)
    text = paper_markdown(records, comparison_table(records))
    assert text.startswith("**Warning:** LatentSeek (self) (gsm8k, my-7b): 50.0% of the")
    assert text.count("**Warning:**") == 1 and "## Unreadable verdicts" in text


def test_tie_cells_are_flagged_and_their_recipes_accept_one_weight_1_failure():
    # 1:1:1:2 weights: one failed weight-1 verifier is -1/5, exactly tau = -0.2, rejected by the
    # strict `>`; the two cells' recipes run at -0.21 so that it is accepted, as -1/6 is in the
    # 1:1:2:2 cells, and the comparison flags them.
    from analysis.paper import TIE_CELLS, TIE_THRESHOLD
    from pipeline.method.prompts import load_verifiers
    from pipeline.method.rewards import combine_verdicts

    calc1 = load_verifiers("verifiers-calc1")
    weights = [v.weight for v in calc1.verifiers]
    one_fails = [v.name != "answer_correct" for v in calc1.verifiers]  # a weight-1 verifier
    assert combine_verdicts(one_fails, weights) == -0.2
    assert TIE_THRESHOLD < -0.2 < combine_verdicts(one_fails, [2, 1, 2, 1])  # 1:1:2:2: -1/6
    assert TIE_THRESHOLD > combine_verdicts([True, False, True, False], weights)  # -2/5 fails
    # The comparison flags such a cell's self-rewarded rows with the tau they ran at.
    calc = ProblemResult(problem_id="p0", dataset="math500", method="latentseek", question="?",
                         gold="1", final_correct=True, cot_correct=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        RecordStore(Path(tmp) / "ls").write([calc], "ls", "my-7b", worker="w")
        Config(dataset="math500", paper_model="Qwen2-7B-Instruct", method=["latentseek"],
               reward="self", prompt="boxed", reward_threshold=TIE_THRESHOLD,
               verifier_prompts="verifiers-calc1").save(Path(tmp) / "ls" / "config.yaml")  # fmt: skip
        (row,) = comparison_table(load_records(tmp)).itertuples()
    assert row.paper_table == "Table 1" and row.note == (
        "1:1:1:2 verifiers: one failed weight-1 verifier gives exactly -0.2; the recipe's tau is "
        "-0.21, this run's -0.21"
    )
    for model, dataset, prompt in TIE_CELLS:
        path = ROOT / "configs" / "paper" / model.lower() / f"{dataset}-{prompt}.yaml"
        for point in plan(load_sweep(path)):
            cfg = point.cfg
            if cfg.reward == "self" and cfg.method[0] in ("latentseek", "reflect", "se"):
                assert cfg.reward_threshold == TIE_THRESHOLD, (path, cfg.method)
                assert cfg.verifier_prompts == "verifiers-calc1"


def test_a_model_without_a_paper_cell_is_not_compared(tmp_path):
    _run(tmp_path, "cot", [_result("p0", "cot", True)], method=["cot"], prompt="boxed")
    cfg = Config(dataset="gsm8k", method=["cot"])  # no paper_model: compared by its own name
    cfg.save(tmp_path / "cot" / "config.yaml")
    assert comparison_table(load_records(tmp_path)).empty


# --- a recipe end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_recipe_runs_end_to_end_on_the_embedded_model(tmp_path, local_ray):
    from jobs.sweep import run_sweep

    recipe = ROOT / "configs" / "paper" / "qwen2.5-1.5b-instruct" / "gsm8k-boxed.yaml"
    overrides = [
        "model=embedded", "device=cpu", "dtype=float32", "limit=1", "max_new_tokens=8",
        "max_iters=1", "verifier_max_new_tokens=4", "workers=1", f"output_dir={tmp_path}",
    ]  # fmt: skip
    summary = run_sweep(recipe, overrides, progress=False, log=lambda msg: None)
    assert len(summary.points) == 9 and all(p.executed for p in summary.points)
    table = (summary.sweep_dir / "report" / "paper.csv").read_text()
    rows = list(csv.DictReader(table.splitlines()))
    # Every Table 1 method of the cell, and SE at its three variances (Table 5), beside the
    # paper's Qwen2.5-1.5B-Instruct numbers; LatentSeek (Self) ran at K = 1, the paper's cell is
    # K = 10: listed without a paper value.
    assert {r["paper_table"] for r in rows} == {"Table 1", "Table 5", ""}, rows
    assert len(rows) == 5 + 3, rows
    assert {(r["paper_model"], r["problems"]) for r in rows} == {("Qwen2.5-1.5B-Instruct", "1")}
    unmatched = [r for r in rows if not r["paper_table"]]
    assert len(unmatched) == 1 and unmatched[0]["label"].startswith("LatentSeek (self"), rows
    assert unmatched[0]["note"].startswith("no paper cell at this budget; the paper has K=10")
    assert all(not math.isnan(float(r["paper_pct"])) for r in rows if r["paper_table"])
    report = (summary.sweep_dir / "report" / "report.md").read_text()
    assert "# Against the paper" in report and "Table 6" in report
