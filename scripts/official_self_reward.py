"""`compat=reference reward=self` against the official code's own `RewardModel.get_reward`.

    git clone https://github.com/bigai-nlco/LatentSeek /tmp/LatentSeek   # or any checkout
    .venv/bin/python scripts/official_self_reward.py --official /tmp/LatentSeek/src --n 8

Runs LatentSeek with the self-reward under `compat=reference` on GSM8K rows 0..n-1 (embedded
model, fp32, CPU, the paper's Prompt 1 `boxed`) and records every reward the engine computed:
r0 of the CoT answer and the reward after each step. Then it asks the official code
(`src/rewards/reward.py` and `src/prompts/vera_prompts.py` of the checkout, imported as they are)
for the reward of each of those answers to the same question, with the same model and
tokenizer objects, and prints how many agree exactly, with each disagreement.

The official code calls `model.generate(**inputs, max_new_tokens=4096)`; here that budget is
replaced by `--verifier-tokens` (the engine's `verifier_max_new_tokens`), the only change. The
embedded model's generation config is greedy, so neither side samples. The official module's
`termcolor` import is satisfied by a stand-in that returns the text uncoloured, and its prints
are swallowed. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import Config  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.engine.model import load_model  # noqa: E402
from pipeline.method.solver import Solver  # noqa: E402


def official_reward_model(src: Path, loaded, budget: int):
    """The official `RewardModel` over `loaded`'s model, its generate budget set to `budget`."""
    if "termcolor" not in sys.modules:
        sys.modules["termcolor"] = types.SimpleNamespace(colored=lambda text, *a, **k: text)
    sys.path.insert(0, str(src))
    from rewards.reward import RewardModel  # the official module, unchanged

    model = loaded.model
    generate = model.generate

    def capped(*args, **kwargs):
        kwargs["max_new_tokens"] = budget
        return generate(*args, **kwargs)

    model.generate = capped
    return RewardModel(model, loaded.tokenizer, data_name="gsm8k", device=str(model.device))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="the official code's src/")
    ap.add_argument("--n", type=int, default=8, help="GSM8K test rows 0..n-1")
    ap.add_argument("--verifier-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the compared rewards here")
    args = ap.parse_args(argv)
    if not (args.official / "rewards" / "reward.py").is_file():
        ap.error(
            f"--official {args.official}: no rewards/reward.py there (give the checkout's src/)"
        )

    cfg = Config(
        model="embedded", device="cpu", dtype="float32", compat="reference", reward="self",
        method=["latentseek"], prompt="boxed", dataset="gsm8k", limit=args.n,
        verifier_max_new_tokens=args.verifier_tokens, max_new_tokens=args.max_new_tokens,
        max_iters=args.iters, rho=0.2, lr=0.05, reward_threshold=-0.2,
    )  # fmt: skip
    loaded = load_model(cfg)
    problems = load_dataset(cfg).problems
    start = time.perf_counter()
    results = Solver(cfg, loaded).run("latentseek", problems)
    engine_s = time.perf_counter() - start

    rm = official_reward_model(args.official, loaded, args.verifier_tokens)
    rows, start = [], time.perf_counter()
    for p, r in zip(problems, results, strict=True):
        scored = [(0, r.cot_answer, r.initial_reward)]
        scored += [(s.iteration, s.answer, s.reward) for s in r.iteration_stats]
        for k, answer, mine in scored:
            with contextlib.redirect_stdout(io.StringIO()):
                theirs = rm.get_reward(p.question, answer)
            rows.append({"problem": p.problem_id, "k": k, "engine": mine, "official": theirs})
    official_s = time.perf_counter() - start

    same = [row for row in rows if row["engine"] == row["official"]]
    print(f"{len(same)}/{len(rows)} rewards identical ({len(problems)} problems, r0 and each of "
          f"up to {args.iters} steps; verifier budget {args.verifier_tokens} tokens)")  # fmt: skip
    for row in rows:
        if row not in same:
            print(f"  differs: {row}")
    values = sorted({row["engine"] for row in rows})
    print(f"reward values seen: {values}")
    print(f"engine {engine_s:.0f} s (whole LatentSeek runs), official {official_s:.0f} s (rewards)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if len(same) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
