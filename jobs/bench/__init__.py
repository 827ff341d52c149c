"""`latentseek bench [--config FILE] [key=value ...]` (`make bench`): the engine's cost, side by
side in one run on the same GSM8K problems: the naive reference loop, the engine at batch size 1
and at its best, static vs continuous batching on 64 problems, bfloat16 vs float32, the Ray
pipeline with 1 and 2 workers, and the `model.generate` ceiling; then the targets, met or missed.

- `settings`: the keys (`Config`'s and the bench's own `BenchSettings`, all `key=value`);
- `harness`: one child process per row, its clock and its memory;
- `rows`, `ray_row`, `profile`: what each row runs inside its child;
- `plan`: the rows of a run, in order, and the table row each becomes;
- `targets`: ratios, targets and answer agreement, from the table;
- `report`: `bench.md` and `bench.json`.

Exits 1 if any row failed (the report still lists every row, the failed ones with their error).
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys
from pathlib import Path


def main(config_path: str | Path | None, overrides: list[str]) -> int:
    from jobs.bench.harness import Runner, machine_info
    from jobs.bench.plan import Plan
    from jobs.bench.report import render_markdown, write_report
    from jobs.bench.settings import describe, parse
    from jobs.bench.targets import answer_checks, compute_ratios, evaluate_targets
    from pipeline.engine.model import prepare_model

    cfg, settings = parse(config_path, overrides)
    prepare_model(cfg)  # dequantise the embedded GGUF once, before any child needs it
    out = Path(settings.out)
    env = dict(os.environ)
    if settings.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = settings.omp_wait_policy
    load_start = os.getloadavg()[0]
    runner = Runner(out, env)
    plan = Plan(cfg, settings, runner)
    plan.run()
    checks = answer_checks(plan.rows, plan.results)
    ratios = compute_ratios(plan.rows)
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "settings": {"bench": vars(settings), "config": cfg.to_dict()},
        "settings_text": describe(cfg, settings),
        "total_wall_s": runner.elapsed(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "rows": plan.rows,
        "ratios": ratios,
        "targets": evaluate_targets(plan.rows, ratios, checks, plan.results),
        "answer_checks": checks,
        "results": plan.results,
    }
    write_report(report, out)
    print(render_markdown(report))
    failed = [r for r in plan.rows if "error" in r]
    runner.say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    if failed:
        names = "; ".join(f"{r['row']} {r['method']} {r['config']}" for r in failed)
        runner.say(f"{len(failed)} row(s) failed: {names}")
        return 1
    return 0
