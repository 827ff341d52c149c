"""The Ray rows: `jobs.run.run_evaluation` end to end with 1, then 2 workers, in one child.

One local Ray is started once and the MLflow store created once (both one-off, reported as
`setup_s`, not charged); each worker count then runs the whole pipeline (worker start and model
load, scheduling, Parquet records, compaction, MLflow logging). Memory is the peak of the summed
RSS of the driver and all its descendants (`TreeRss`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobs.bench.harness import TreeRss
from jobs.bench.settings import method_config


def run(cfg: Any, spec: dict) -> dict:
    """Returns {"wall_s": total, "runs": {workers: result}} for each of `spec["workers"]`."""
    import mlflow
    import ray

    from pipeline.run.pool import start_ray

    tmp = Path(spec["tmp_dir"])
    cfg = method_config(
        cfg,
        spec["method"],
        batch_size=spec["batch_size"],
        task_size=spec["batch_size"],  # 16 problems make 2 tasks: one per worker with 2 workers
        output_dir=str(tmp),
        mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
    )
    setup = time.perf_counter()
    start_ray(cfg)
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.search_experiments()  # the store's schema migrations, once
    setup = time.perf_counter() - setup
    runs = {}
    for workers in spec["workers"]:
        _wait_for_idle_cluster(ray)  # the previous configuration's workers are gone
        run_cfg = cfg.replace(workers=workers, run_id=f"bench-{spec['method']}-w{workers}")
        runs[str(workers)] = {**_one_configuration(run_cfg), "setup_s": setup}
    ray.shutdown()
    return {"wall_s": sum(r["wall_s"] for r in runs.values()), "runs": runs}


def _wait_for_idle_cluster(ray: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total, free = ray.cluster_resources(), ray.available_resources()
        if free.get("CPU", 0.0) >= total.get("CPU", 0.0):
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"Ray workers of the previous configuration still hold CPUs after {timeout} s"
    )


def _one_configuration(cfg: Any) -> dict:
    from analysis.tables import load_run
    from jobs.run import run_evaluation

    last_batch = [0.0]
    start = time.perf_counter()

    def on_batch(state: dict) -> None:
        last_batch[0] = time.perf_counter() - start

    with TreeRss() as rss:
        summary = run_evaluation(cfg, progress=False, on_batch=on_batch, log=lambda line: None)
        wall = time.perf_counter() - start
    problems, _ = load_run(summary.run_dir)
    rows = [
        {
            "problem_id": str(r.problem_id),
            "final_answer": r.final_answer,
            "extracted": r.final_extracted if isinstance(r.final_extracted, str) else None,
            "correct": bool(r.final_correct),
            "iterations": int(r.iterations),
            "stop_reason": r.stop_reason,
            "error": r.error,
            "solver_generated": int(r.solver_generated_tokens),
            "verifier_generated": int(r.verifier_generated_tokens),
            "wall_s": float(r.wall_seconds),
            "worker": r.worker,
        }
        for r in problems.itertuples()
    ]
    busy: dict[str, float] = {}
    for r in rows:
        busy[r["worker"]] = busy.get(r["worker"], 0.0) + r["wall_s"]
    return {
        "wall_s": wall,
        "until_last_batch_s": last_batch[0],
        "problems": len(rows),
        "failures": summary.failures,
        "worker_failures": summary.worker_failures,
        "worker_busy_s": busy,
        "rows": rows,
        "dtype": next(iter(problems["dtype"].dropna()), None) if "dtype" in problems else None,
        "peak_rss_mb": rss.peak_total,
        "peak_rss_workers_mb": rss.peak_workers,
        "peak_rss_driver_mb": rss.peak_driver,
    }
