"""The pool of Ray workers a run (or a sweep's points) evaluates on: starting Ray, starting and
stopping workers, and reusing them from one evaluation to the next while the model stays the
same. `pipeline.run.workers` holds the actor, `pipeline.run.scheduler` what feeds it; this module their
lifecycle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import MODEL, Config, keys_with
from pipeline.run.workers import NoWorkerLeftError, stop_worker


class RunError(RuntimeError):
    """A run that cannot start or finish (here: workers that cannot start; `jobs.preflight`:
    settings that cannot run); the message says why and what to do."""


def start_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    else:
        per_rank = cfg.cpus_per_worker if cfg.gpus_per_worker == 0 else 1
        need = cfg.workers * cfg.tensor_parallel * per_rank
        ray.init(
            num_cpus=max(need, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def start_workers(
    cfg: Config, start_worker: Callable[[Config], Any] | None = None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """`cfg.workers` actors with their models loaded, and their `info()`; a worker that cannot
    start (its constructor raised, or its process died) stops the run with one line.

    `start_worker(cfg)` starts one actor and returns its handle; by default an `EvalWorker`, or
    a tensor-parallel replica's rank 0 (`pipeline.run.workers.start_worker`). Another actor with EvalWorker's `info` and `run` may stand in for it
    (`jobs.simulate`: the driver at cluster scale without models)."""
    import ray
    from ray.exceptions import RayActorError

    from pipeline.run.workers import start_worker as start_eval_worker

    start = start_worker or start_eval_worker
    workers: list[Any] = []
    try:
        for _ in range(cfg.workers):
            workers.append(start(cfg))
    except NoWorkerLeftError as exc:  # a replica's placement group could not be placed
        stop_workers(workers)
        raise RunError(str(exc)) from None
    try:
        infos = ray.get([w.info.remote() for w in workers])
    except RayActorError as exc:
        stop_workers(workers)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise RunError(f"a worker died while starting: {first}") from None
    errors = [i["start_error"] for i in infos if i["start_error"]]
    if errors:
        stop_workers(workers)
        raise RunError(f"a worker could not start: {errors[0]}")
    return workers, infos


class WorkerPool:
    """Workers kept across evaluations that load the same model (a sweep's points): the next
    evaluation reuses them when its config agrees on the keys with the MODEL role, else they
    are replaced."""

    def __init__(self) -> None:
        self.cfg: Config | None = None
        self.workers: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.starts = 0  # how many times workers were started (for the sweep's report)

    def acquire(self, cfg: Config) -> tuple[list[Any], list[dict[str, Any]]]:
        same = self.cfg is not None and all(
            getattr(self.cfg, k) == getattr(cfg, k) for k in keys_with(MODEL)
        )
        if not same:
            self.close()
            self.workers, self.infos = start_workers(cfg)
            self.starts += 1
        self.cfg = cfg
        return self.workers, self.infos

    def close(self) -> None:
        stop_workers(self.workers)
        self.workers, self.infos, self.cfg = [], [], None


def stop_workers(workers: Sequence[Any]) -> None:
    for w in workers:
        stop_worker(w)
