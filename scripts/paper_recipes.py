"""Write configs/paper/: the paper's Table 1 experiments (arXiv 2505.13308 v3) as sweeps, one per
backbone x dataset x prompt, from the hyper-parameters of its appendix (Tables 21-26, in
data/paper/latentseek-v3-settings.csv). tests/test_paper.py checks that the files are what this
script writes, so after editing the settings file run:

    .venv/bin/python scripts/paper_recipes.py

Each recipe runs, on the paper's cell: CoT; BoN and self-consistency with N = 3 (App. F.3);
Self-Reflection with as many rounds as LatentSeek's K (Table 1's caption: "a rollout number
comparable to LatentSeek's update iterations"); LatentSeek (Self) with Table 21/23/25's rho and
lr, its format reward and verifier weights (App. F.4-F.6); LatentSeek (PSRM) with Table
22/24/26's; on GSM8K also the unguided search of Table 5 at its three noise variances. Every
self-rewarded point (BoN, Self-Reflection, LatentSeek (Self), SE) uses the cell's self-reward
variant, format rule and verifier weights included (App. F.3: BoN uses "the same self-reward
mechanism as LatentSeek"). In the two cells whose verifiers are weighted 1:1:1:2, the points
that stop on tau run at `analysis.paper.TIE_THRESHOLD` (-0.21), so that one failed weight-1
verifier (exactly -0.2) is accepted as in the other cells (analysis/paper.py says why). Settings
the paper does not give keep this project's defaults (docs/method.md says which).
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

from analysis.paper import TIE_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ROOT / "data" / "paper" / "latentseek-v3-settings.csv"
OUT = ROOT / "configs" / "paper"

BACKBONES = {  # the paper's name -> its Hugging Face id (App. F.2)
    "Qwen2-7B-Instruct": "Qwen/Qwen2-7B-Instruct",
    "Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen2.5-14B-Instruct": "Qwen/Qwen2.5-14B-Instruct",
    "Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
}
DATASETS = ("gsm8k", "math500", "aime2024")
PROMPTS = {"boxed": "Prompt 1", "json": "Prompt 2"}
SE_VARIANCES = (0.5, 0.75, 1.0)  # Table 5, GSM8K only
N_SAMPLES = 3  # App. F.3, BoN and SC


def cell_settings() -> dict[tuple[str, str, str, str], dict[str, str]]:
    """(model, dataset, prompt, reward) -> {key: value} from Tables 21-26."""
    cells: dict[tuple[str, str, str, str], dict[str, str]] = defaultdict(dict)
    with SETTINGS.open() as fh:
        for row in csv.DictReader(fh):
            if not re.fullmatch(r"Table 2[1-6]", row["table"]):
                continue
            reward = row["method"].removeprefix("latentseek_")
            key = (row["model"], row["dataset"], row["prompt"], reward)
            cells[key][row["key"]] = row["value"]
            cells[key]["table"] = row["table"]
    return dict(cells)


def _self_reward(cell: dict[str, str]) -> tuple[dict[str, object], str]:
    """The self-reward's format rule and verifier file of a cell, and a note."""
    weight = cell.get("format_reward_weight", "none")
    keys: dict[str, object] = {"format_rule": weight != "none"}
    notes = []
    if weight == "3":
        keys["verifier_prompts"] = "verifiers-format3"
        notes.append("format reward 3")
    elif weight != "none":
        notes.append(f"format reward {weight}")
    if "calculation_check=1" in cell.get("verifier_weights", ""):
        keys["verifier_prompts"] = "verifiers-calc1"
        notes.append("verifiers weighted 1:1:1:2")
    return keys, ", ".join(notes)


def recipe(model: str, dataset: str, prompt: str, cells) -> str:
    own, oracle = cells[(model, dataset, prompt, "self")], cells[(model, dataset, prompt, "psrm")]
    k = int(own["max_iters"])
    self_keys, note = _self_reward(own)
    # The points that stop on tau; in a 1:1:1:2 cell they run at TIE_THRESHOLD.
    stopping = dict(self_keys)
    if self_keys.get("verifier_prompts") == "verifiers-calc1":
        stopping["reward_threshold"] = TIE_THRESHOLD
    lines = [
        f"# The paper's cell {model}, {dataset}, {PROMPTS[prompt]} ({prompt}), arXiv 2505.13308 v3:",
        f"# LatentSeek (Self) as in {own['table']}, LatentSeek (PSRM) as in {oracle['table']}"
        + (f"; {note} (App. F)." if note else "."),
        *(
            [
                f"# tau {TIE_THRESHOLD} for Self-Reflection, LatentSeek (Self) and SE: with weights "
                "1:1:1:2 one failed",
                "# weight-1 verifier gives exactly -0.2, which -0.2 itself would reject "
                "(analysis/paper.py).",
            ]
            if "reward_threshold" in stopping
            else []
        ),
        "# Written by scripts/paper_recipes.py from data/paper/latentseek-v3-settings.csv; do not",
        "# edit by hand. Run: latentseek sweep configs/paper/<this file> [model=<local dir>] ...",
        f"name: paper-{model.lower()}-{dataset}-{prompt}",
        "set:",
        f"  model: {BACKBONES[model]}  # the model's location: a local directory or the HF cache",
        f"  paper_model: {model}  # the report sets the cells beside the paper's for this model",
        f"  dataset: {dataset}",
        f"  prompt: {prompt}",
        "  compat: reference  # the paper's numbers come from the official code",
        f"  max_new_tokens: {int(own['max_new_tokens'])}",
        f"  max_iters: {k}  # LatentSeek's K, and Self-Reflection's rounds",
        "  reward_threshold: -0.2  # not in the paper; the official code's default",
        "points:",
        "  - {method: [cot]}",
        _keys({"method": "[bon]", "reward": "self", "n_samples": N_SAMPLES, **self_keys}),
        f"  - {{method: [sc], n_samples: {N_SAMPLES}}}",
        _keys({"method": "[reflect]", "reward": "self", **stopping}),
        _point("latentseek", "self", own, stopping),
        _point("latentseek", "psrm", oracle, {}),
    ]
    if dataset == "gsm8k":
        lines += [
            _point("se", "self", own, {**stopping, "se_sigma2": v}, lr=False) for v in SE_VARIANCES
        ]
    lines.append("derive: false")
    return "\n".join(lines) + "\n"


def _point(method: str, reward: str, cell: dict[str, str], extra: dict, lr: bool = True) -> str:
    keys = {"method": f"[{method}]", "reward": reward, "rho": float(cell["rho"])}
    if lr:
        keys["lr"] = float(cell["lr"])
    keys.update(extra)
    return _keys(keys)


def _keys(keys: dict) -> str:
    """One point of the sweep, as a YAML flow mapping line."""
    text = ", ".join(
        f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()
    )
    return f"  - {{{text}}}"


def recipe_path(model: str, dataset: str, prompt: str) -> Path:
    return OUT / model.lower() / f"{dataset}-{prompt}.yaml"


def recipes() -> dict[Path, str]:
    cells = cell_settings()
    return {
        recipe_path(m, d, p): recipe(m, d, p, cells)
        for m in BACKBONES
        for d in DATASETS
        for p in PROMPTS
    }


def main() -> None:
    for path, text in recipes().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(recipes())} recipes under {OUT}")


if __name__ == "__main__":
    main()
