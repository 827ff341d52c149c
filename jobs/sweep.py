"""`latentseek sweep SWEEP_FILE [key=value ...]`: a test-time scaling sweep (pipeline/run/sweep.py).

Runs the sweep's executed points one after another with `jobs.run.run_evaluation`, into
`<output_dir>/<sweep name>/<point run_id>/`, all logged to one MLflow store: a parent run named
after the sweep with one nested run per point (`mlflow.parentRunId`), executed and derived alike,
named after the values that vary (`lr=0.01 max_iters=4`), each with a nested run per method.
Ray workers and their loaded model are kept from one point to the next while the points load the
same model (the keys with the MODEL role, `pipeline.run.pool.WorkerPool`); the next point's settings travel with its batches.

Resume: a point whose records are complete is skipped by `run_evaluation` itself (it only logs),
so re-running the same command finishes what a crash left and redoes nothing. Derived points are
computed from their executed point's records (`analysis.derive`) after every executed point.
At the end the sweep's report (`analysis.report`) is written to `<sweep dir>/report/` and logged to
the parent run, its scaling laws also as the parent's metrics and params
(`analysis.laws_report.mlflow_values`), and `<sweep dir>/sweep.yaml` lists every point with its
status and wall time.

Before anything starts, every executed point passes the run's preflight (`jobs.preflight`); the
sweep then holds its directory's lock (`pipeline.run.rundir.hold_run_dir`; each point's evaluation
holds its own run directory's too), and a sweep that fails or is interrupted ends its parent MLflow
run FAILED (KILLED) before the error goes on.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError
from pipeline.run.sweep import SweepPoint, load_sweep, plan

MANIFEST = "sweep.yaml"


@dataclass
class SweepSummary:
    sweep_dir: Path
    points: list[SweepPoint]
    seconds: dict[str, float]  # executed point run_id -> wall seconds of its evaluation
    worker_starts: int  # times workers were (re)started across the sweep
    mlflow_run_id: str
    tracking_uri: str
    report_files: list[Path] = field(default_factory=list)
    wall_seconds: float = 0.0


def run_sweep(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    reuse_workers: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> SweepSummary:
    from jobs.preflight import preflight
    from pipeline.run import tracking
    from pipeline.run.rundir import hold_run_dir, run_dir

    start = time.perf_counter()
    spec = load_sweep(path)
    points = plan(spec, overrides)
    base = points[0].cfg
    if len({p.cfg.output_dir for p in points}) > 1:
        raise ConfigError("output_dir must be the same for every point of a sweep")
    sweep_dir = Path(base.output_dir) / spec.name
    uri = tracking.resolve_tracking_uri(base)  # every point logs to the store of output_dir
    points = [_placed(p, sweep_dir, uri) for p in points]
    executed = [p for p in points if p.executed]
    for p in executed:  # every point's settings and inputs, before anything starts
        preflight(p.cfg, run_dir(p.cfg), lambda msg: None)
    log(f"sweep {spec.name}: {len(points)} points, {len(executed)} to run, "
        f"{len(points) - len(executed)} derived; records under {sweep_dir}")  # fmt: skip
    with hold_run_dir(sweep_dir):
        for p in executed:  # no point logs into another directory's MLflow run
            tracking.check_run_dir(p.cfg)
        parent = tracking.open_sweep_run(
            points[0].cfg,
            spec.name,
            {"sweep_file": str(spec.source), "points": len(points)},
            sweep_dir,
        )
        try:
            return _run_points(
                spec.name, sweep_dir, points, parent, progress, reuse_workers, log, start
            )
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracking.end_run(points[0].cfg, parent, status)
            raise


def _run_points(
    name: str,
    sweep_dir: Path,
    points: list[SweepPoint],
    parent: str,
    progress: bool,
    reuse_workers: bool,
    log: Callable[[str], None],
    start: float,
) -> SweepSummary:
    """Evaluate the executed points one after another, then log the derived ones and the
    sweep's report; the sweep's MLflow run `parent` is open."""
    import pandas as pd

    from analysis.derive import derived_curves, derived_metrics
    from analysis.report import write_report
    from jobs.run import run_evaluation
    from pipeline.run import tracking
    from pipeline.run.pool import WorkerPool

    executed = [p for p in points if p.executed]
    seconds: dict[str, float] = {}
    pool = WorkerPool() if reuse_workers else None
    _write_manifest(sweep_dir, name, points, seconds, done=set())
    done: set[str] = set()
    try:
        for i, p in enumerate(executed, start=1):
            log(f"[{i}/{len(executed)}] {p.run_id}")
            t = time.perf_counter()
            run_evaluation(
                p.cfg, progress=progress, pool=pool, log=log, tags=_tags(name, parent, p)
            )
            seconds[p.run_id] = time.perf_counter() - t
            done.add(p.run_id)
            _write_manifest(sweep_dir, name, points, seconds, done)
    finally:
        if pool is not None:
            pool.close()
    for p in points:
        if not p.executed:
            source = sweep_dir / p.derived_from
            metrics = derived_metrics(source, p.cfg, p.derived)
            curves = derived_curves(source, p.derived)
            tags = {**_tags(name, parent, p), "latentseek.derived_from": p.derived_from}
            tracking.log_derived_run(p.cfg, parent, metrics, tags, curves)
            done.add(p.run_id)
    _write_manifest(sweep_dir, name, points, seconds, done)
    report = write_report(sweep_dir, sweep_dir / "report")
    files = [*report.paths(), sweep_dir / MANIFEST]
    wall = time.perf_counter() - start
    starts = pool.starts if pool is not None else len([s for s in seconds if seconds[s] > 0])
    tracking.close_sweep_run(
        points[0].cfg, parent, files,
        {"sweep_wall_seconds": wall, "worker_starts": starts, **report.laws_metrics},
        tables={"report/table.json": pd.read_csv(report.table_csv),
                "report/laws.json": pd.read_csv(report.laws_csv)},
        params=report.laws_params,
    )  # fmt: skip
    uri = points[0].cfg.mlflow_tracking_uri  # every point's (`_placed`)
    return SweepSummary(sweep_dir, points, seconds, starts, parent, uri, files, wall)


def _placed(p: SweepPoint, sweep_dir: Path, uri: str) -> SweepPoint:
    p.cfg = p.cfg.replace(output_dir=str(sweep_dir), mlflow_tracking_uri=uri)
    return p


def _tags(sweep: str, parent: str, p: SweepPoint) -> dict[str, str]:
    """The point's MLflow tags: nested under the sweep's run, named after what varies."""
    from pipeline.run.tracking import PARENT_TAG, RUN_NAME_TAG

    return {
        PARENT_TAG: parent,
        RUN_NAME_TAG: point_label(p),
        "latentseek.sweep_name": sweep,
        **{f"sweep.{k}": _text(v) for k, v in p.varied.items()},
    }


def point_label(p: SweepPoint) -> str:
    """The values that make a point, `lr=0.01 max_iters=4` (its run_id if nothing varies)."""
    return " ".join(f"{k}={_text(v)}" for k, v in p.varied.items()) or p.run_id


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _write_manifest(sweep_dir: Path, name: str, points, seconds, done) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "run_id": p.run_id,
            "varied": {k: v for k, v in p.varied.items()},
            "derived_from": p.derived_from or None,
            "derived": p.derived or None,
            "status": "done" if p.run_id in done else "pending",
            "wall_seconds": round(seconds[p.run_id], 2) if p.run_id in seconds else None,
        }
        for p in points
    ]
    tmp = sweep_dir / (MANIFEST + ".tmp")
    tmp.write_text(yaml.safe_dump({"sweep": name, "points": rows}, sort_keys=False))
    tmp.replace(sweep_dir / MANIFEST)


def format_summary(s: SweepSummary) -> str:
    lines = [f"sweep:     {s.sweep_dir.resolve()} ({len(s.points)} points)"]
    for p in s.points:
        how = (
            f"derived from {p.derived_from} {p.derived}"
            if p.derived_from
            else (f"{s.seconds.get(p.run_id, 0.0):.1f} s")
        )
        lines.append(f"  {p.run_id}: {how}")
    lines += [
        f"workers:   started {s.worker_starts} time(s)",
        f"report:    {(s.sweep_dir / 'report' / 'report.md').resolve()}",
        f"mlflow:    parent run {s.mlflow_run_id} in {s.tracking_uri}",
        f"wall time: {s.wall_seconds:.1f} s",
    ]
    return "\n".join(lines)


def main(path: Path, overrides: list[str]) -> int:
    """Exits 128 + N when signal N stopped the sweep (SIGTERM from `ray job stop`, Slurm or
    Kubernetes; Ctrl-C), with one line saying how to go on: the same command, which keeps the
    points and records already made."""
    from jobs.run import PROGRAM, StopRequested

    try:
        summary = run_sweep(path, overrides)
    except StopRequested as stop:
        command = shlex.join([PROGRAM, "sweep", str(path), *overrides])
        print(
            f"stopped by {signal.Signals(stop.signum).name}: what was recorded is kept; "
            f"the same command goes on from there: {command}",
            file=sys.stderr,
        )
        return stop.exit_code
    print(format_summary(summary))
    return 0
