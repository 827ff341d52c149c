"""`latentseek reference`: run the naive reference loop (`pipeline.method.reference`) on a selection and
print, per problem, the CoT text and the reward list; with `--compare RUN_DIR`, check a run's
records against it (exit 1 on any difference).

This is how a user checks the engine against the official behaviour on their own model:

    latentseek run dataset=gsm8k limit=5 method=latentseek reward=psrm rho=0.2 lr=0.05 \\
        max_iters=3 max_new_tokens=128 prompt=boxed compat=reference run_id=check
    latentseek reference --compare outputs/check dataset=gsm8k limit=5 reward=psrm rho=0.2 \\
        lr=0.05 max_iters=3 max_new_tokens=128 prompt=boxed compat=reference

The reference loop is slow by design (no KV cache, one full forward per token, one problem at a
time): about 2 minutes per problem at 128 tokens and K = 3 for the embedded model on 2 CPU cores.
Only what it implements is accepted: PSRM, the paper's `boxed` or `json` prompt, greedy updates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError


def check_supported(cfg: Config) -> None:
    if cfg.reward != "psrm":
        raise ConfigError(f"reward={cfg.reward!r}: the reference loop implements reward=psrm only")
    if cfg.prompt not in ("boxed", "json"):
        raise ConfigError(
            f"prompt={cfg.prompt!r}: the reference loop knows the paper's prompts only"
        )
    if cfg.sample_update or cfg.return_best or cfg.lr_relative or cfg.grad_clip:
        raise ConfigError(
            "sample_update, return_best, lr_relative and grad_clip are engine options the "
            "reference loop does not implement; leave them at their defaults"
        )


def run_reference(cfg: Config, loaded: Any, problem: Any, prompt_ids: list[int], reward_fn=None):
    """`pipeline.method.reference.naive_latentseek` on one problem with the config's method settings
    (read here, in the entry points, never by the reference itself); `reward_fn=None` is the
    mode's own PSRM, which in reference mode compares with the label as the data writes it."""
    from pipeline.method import reference

    gold = problem.label if cfg.compat == "reference" and problem.label else problem.gold
    return reference.naive_latentseek(
        loaded.model,
        loaded.tokenizer,
        prompt_ids,
        gold,
        lr=cfg.lr,
        rho=cfg.rho,
        max_iters=cfg.max_iters,
        max_new_tokens=cfg.max_new_tokens,
        reward_threshold=cfg.reward_threshold,
        max_update_length=cfg.max_update_length,
        compat=cfg.compat,
        reward_fn=reward_fn,
    )


def _recorded(run_dir: Path) -> dict[str, Any]:
    from pipeline.run.records import read_records

    problems, _ = read_records(run_dir)
    rows = problems[problems["method"] == "latentseek"]
    return {row.problem_id: row for row in rows.itertuples()}


def main(cfg: Config, compare: Path | None = None) -> int:
    import torch

    from pipeline.benchmarks import prompt_suffix
    from pipeline.data import load_dataset
    from pipeline.engine.model import load_model
    from pipeline.method import reference

    check_supported(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    recorded = _recorded(compare) if compare is not None else {}
    loaded = load_model(cfg)
    differ = 0
    for p in load_dataset(cfg).problems:
        note = prompt_suffix(p.dataset, cfg.prompt)
        ids = reference.prompt_ids(loaded.tokenizer, p.question, cfg.prompt, note, cfg.compat)
        res = run_reference(cfg, loaded, p, ids)
        rewards = [res.initial_reward, *res.rewards]
        print(f"## {p.problem_id}: T={len(res.cot_tokens)} U={res.update_length} rewards={rewards}")
        print(res.cot_text)
        if compare is None:
            continue
        row = recorded.get(p.problem_id)
        if row is None:
            print(f"-> {p.problem_id}: not in {compare}")
            differ += 1
            continue
        theirs = [float(row.initial_reward), *(float(r) for r in row.rewards)]
        same_cot, same_rewards = row.cot_answer == res.cot_text, theirs == rewards
        print(
            f"-> run: CoT {'same' if same_cot else 'DIFFERS'}, rewards {theirs} "
            f"{'same' if same_rewards else 'DIFFER'}"
        )
        differ += not (same_cot and same_rewards)
    if compare is not None:
        print(f"{differ} problem(s) differ from {compare}", file=sys.stderr)
    return 1 if differ else 0
