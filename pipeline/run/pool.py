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
from pipeline.run.workers import PLACEMENT_TIMEOUT_S, NoWorkerLeftError, stop_worker

# How long the workers may take to start: placement, then a first model load (a hub model's
# download included, or the embedded model's first dequantisation).
START_TIMEOUT_S = PLACEMENT_TIMEOUT_S + 1800.0


def restart_timeout(infos: Sequence[dict[str, Any]]) -> float:
    """How long the scheduler waits for a restarting worker: placement, then ten times the
    slowest first model load (at least two minutes of it); a worker not back by then is
    retired (`pipeline.run.scheduler.Scheduler`)."""
    load = max((float(i.get("load_seconds", 0.0)) for i in infos), default=0.0)
    return PLACEMENT_TIMEOUT_S + max(120.0, 10.0 * load)


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one worker asks Ray for (per rank of a tensor-parallel replica)."""
    from pipeline.run.workers import _resources

    return _resources(cfg)


def free_resources() -> dict[str, float]:
    """The cluster's free CPUs, GPUs and memory now ({} if Ray cannot say)."""
    import ray

    try:
        return _main_resources(ray.available_resources())
    except Exception:  # noqa: BLE001 - only for a message
        return {}


def total_resources() -> dict[str, float]:
    import ray

    try:
        return _main_resources(ray.cluster_resources())
    except Exception:  # noqa: BLE001 - only for a message
        return {}


def _main_resources(resources: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in sorted(resources.items()) if not k.startswith("node:")}


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
            address="local",  # a new Ray of its own, never a cluster left running nearby
            num_cpus=max(need, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def start_workers(
    cfg: Config,
    start_worker: Callable[[Config], Any] | None = None,
    start_timeout: float | None = None,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """`cfg.workers` actors with their models loaded, and their `info()`; a worker that cannot
    start (its constructor raised, or its process died), or that is not up within
    `start_timeout` seconds (START_TIMEOUT_S: placement and a first model load; a worker Ray
    cannot place waits forever otherwise) stops the run with one line, naming the resources a
    worker needs and those the cluster has free.

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
    refs = [w.info.remote() for w in workers]
    timeout = start_timeout if start_timeout is not None else START_TIMEOUT_S
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if waiting:
        stop_workers(workers)
        raise RunError(
            f"{len(waiting)} of {len(refs)} workers did not start within {timeout:g} s: each "
            f"needs {worker_resources(cfg)}, and the cluster has free {free_resources()} (of "
            f"{total_resources()}); Ray cannot place them, or their model load hangs. Lower "
            "workers or the resources per worker, or add nodes"
        )
    try:
        infos = ray.get(refs)
    except RayActorError as exc:
        stop_workers(workers)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise RunError(f"a worker died while starting: {first}") from None
    errors = [i["start_error"] for i in infos if i["start_error"]]
    if errors:
        stop_workers(workers)
        raise RunError(f"a worker could not start: {errors[0]}")
    try:
        check_model_digests(cfg, infos)
    except RunError:
        stop_workers(workers)
        raise
    return workers, infos


def check_model_digests(cfg: Config, infos: Sequence[dict[str, Any]]) -> None:
    """Every worker loaded the files the driver digested for this run (`inputs.yaml`'s model):
    a node with another copy of a model directory (an older download, a half-synced copy) would
    mix results. A RunError naming the worker, its node and the first file that differs. A
    worker that reports no digest (a stand-in, a hub id unknown there) is not compared."""
    reported = [i for i in infos if i.get("model_digest")]
    if not reported:
        return
    from pipeline.engine.model import model_digest

    expected = model_digest(cfg)
    for info in reported:
        theirs = info["model_digest"]
        differ = sorted(
            k for k in expected.keys() | theirs.keys() if expected.get(k) != theirs.get(k)
        )
        if expected and differ:
            key = differ[0]
            raise RunError(
                f"worker {info.get('name', '?')} loaded other model files than the driver "
                f"reads: {key} is {theirs.get(key, 'missing')!r} on its node, "
                f"{expected.get(key, 'missing')!r} here ({len(differ)} of {len(expected)} "
                "entries differ); every node must hold the same copy of the model"
            )


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
