"""Preflight: everything a user can get wrong, checked before anything starts or is written.

`latentseek run` (and each point of a sweep) checks, in order: the device settings agree with
each other and with the local Ray (`check_devices`), the generation backend is installed
(`check_backend`), an existing run directory may be resumed
with these settings (`check_resume`), the prompt templates load (`check_prompts`) and the
dataset selection loads and is usable (`load_selection`). Each failure is one message (a
`RunError`, `ConfigError` or `DataError`) that the command line prints without a traceback.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.config import BATCHING, RESULT, Config, keys_with
from pipeline.data import Dataset, load_dataset
from pipeline.pool import RunError
from pipeline.records import CONFIG_FILE, RecordStore


def resolve_run_id(cfg: Config) -> Config:
    if cfg.run_id:
        return cfg
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cfg.replace(run_id=f"{stamp}-{uuid.uuid4().hex[:6]}")


def resolved_precision(device: str, gpus_per_worker: float, dtype: str) -> tuple[str, str]:
    """(device type, dtype name) the workers will use, e.g. ("cpu", "float32"), worked out from
    the settings alone (no CUDA needed): GPU workers run on cuda, `dtype=auto` follows it."""
    import torch

    from pipeline.model import resolve_dtype

    device_type = "cuda" if gpus_per_worker > 0 or device.startswith("cuda") else "cpu"
    resolved = resolve_dtype(dtype, torch.device(device_type))
    return device_type, str(resolved).removeprefix("torch.")


def check_devices(cfg: Config) -> None:
    """`device` and `gpus_per_worker` agree, and a local Ray has the GPUs the workers ask for."""
    from pipeline.workers import worker_device

    try:
        worker_device(cfg.device, cfg.gpus_per_worker)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if cfg.gpus_per_worker > 0 and not cfg.ray_address:
        import ray
        import torch

        have = (
            ray.cluster_resources().get("GPU", 0.0)
            if ray.is_initialized()
            else torch.cuda.device_count()
        )
        need = cfg.gpus_per_worker * cfg.workers * cfg.tensor_parallel
        if have < need:
            tp = f" x tensor_parallel={cfg.tensor_parallel}" if cfg.tensor_parallel > 1 else ""
            raise RunError(
                f"workers={cfg.workers}{tp} x gpus_per_worker={cfg.gpus_per_worker:g} needs "
                f"{math.ceil(need)} GPU(s); this machine's local Ray has {have:g}. Lower workers or "
                "gpus_per_worker, set gpus_per_worker=0 for CPU workers, or give ray_address"
            )


def check_resume(cfg: Config, directory: Path) -> None:
    """A run id can be resumed only with the same settings of what it computes: the keys with
    the RESULT or BATCHING role (`pipeline.config`), the resolved device type and dtype,
    compared with config.yaml, and the device and dtype recorded in the run's problem rows.
    (`device`, `dtype` and `gpus_per_worker` may change as long as the resolved device type and
    dtype stay the same.)"""
    changed: list[str] = []
    fixed = set(keys_with(RESULT)) | set(keys_with(BATCHING))
    saved_path = directory / CONFIG_FILE
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = cfg.to_dict()
        for k in sorted(now):
            if k in fixed and k in saved and saved[k] != now[k]:
                changed.append(f"{k}: {saved[k]!r} -> {now[k]!r}")
        defaults = Config().to_dict()
        before = resolved_precision(
            *(saved.get(k, defaults[k]) for k in ("device", "gpus_per_worker", "dtype"))
        )
        changed += _precision_changes(before, cfg, "config.yaml")
    store = RecordStore(directory)
    types = {str(d).partition(":")[0] for d in store.distinct("device") if d}
    dtypes = {str(d) for d in store.distinct("dtype") if d}
    if len(types) > 1 or len(dtypes) > 1:
        changed.append(f"the recorded rows already mix {sorted(types)} / {sorted(dtypes)}")
    else:
        recorded = (next(iter(types), ""), next(iter(dtypes), ""))  # "": nothing recorded
        changed += _precision_changes(recorded, cfg, "the recorded problem rows")
    if changed:
        raise RunError(
            f"run_id={cfg.run_id!r} already exists in {directory} with different settings of "
            f"what it computes ({'; '.join(dict.fromkeys(changed))}); resuming would mix "
            "results. Use a new run_id (run_id=<new>) for these settings, or the same settings "
            "to resume it."
        )


def _precision_changes(before: tuple[str, str], cfg: Config, where: str) -> list[str]:
    now = resolved_precision(cfg.device, cfg.gpus_per_worker, cfg.dtype)
    out = []
    if before[0] and before[0] != now[0]:
        out.append(
            f"device type: {before[0]!r} in {where} -> {now[0]!r} now (device={cfg.device!r}, "
            f"gpus_per_worker={cfg.gpus_per_worker:g})"
        )
    if before[1] and before[1] != now[1]:
        out.append(f"dtype: {before[1]!r} in {where} -> {now[1]!r} now (dtype={cfg.dtype!r})")
    return out


def check_backend(cfg: Config) -> None:
    """The generation backend can start here (`backend=vllm` needs vLLM installed)."""
    from pipeline.backends import check_installed

    if missing := check_installed(cfg.backend):
        raise RunError(missing)


def check_prompts(cfg: Config) -> None:
    """The solver and verifier templates load; a ConfigError names the key, the file and the
    problem."""
    from pipeline.config import ConfigError
    from pipeline.prompts import load_solver_template, load_verifiers

    for key, load in (("prompt", load_solver_template), ("verifier_prompts", load_verifiers)):
        try:
            load(getattr(cfg, key))
        except ConfigError as exc:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: {exc}") from None


def load_selection(cfg: Config, log: Callable[[str], None]) -> Dataset:
    dataset: Dataset = load_dataset(cfg)
    if dataset.skipped_rows:
        log(f"skipped {dataset.skipped_rows} malformed rows of {dataset.source}")
    if not dataset.problems:
        raise RunError(f"the selection of {dataset.source} holds no problems")
    ids = [p.problem_id for p in dataset.problems]
    if len(set(ids)) != len(ids):
        raise RunError("problem ids are not unique in the selection")
    return dataset
