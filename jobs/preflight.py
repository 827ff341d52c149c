"""Preflight: everything a user can get wrong, checked before anything starts or is written.

`latentseek run` (and each point of a sweep) checks, in order (`preflight`): the device settings
agree with each other and with the local Ray (`check_devices`), the generation backend is
installed (`check_backend`), an existing run directory may be
resumed with these settings (`check_resume`), the prompt templates load (`check_prompts`), a
`module:function` reward imports (`check_reward`), the dataset selection loads and is usable
(`load_selection`) and, if any of it is left to run, the model source exists and the memory plan
fits the device (`check_memory`: refused with the numbers when it does not fit; printed by the
driver once it holds the run directory). Then, holding the
run directory (`pipeline.run.rundir.hold_run_dir`), the driver checks the resume again and compares
what the inputs hold with the first invocation's (`plan_work`: a prompt, verifier, data or reward
file edited under the same name, or another model behind the same path, would mix results). Each
failure is one message (a `RunError`, `ConfigError` or `DataError`) that the command line prints
without a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import (
    BATCHING,
    BUILTIN_REWARDS,
    PROJECT_ROOT,
    RESULT,
    Config,
    ConfigError,
    keys_with,
)
from pipeline.data import Dataset, Problem, load_dataset
from pipeline.run.pool import RunError
from pipeline.run.records import RecordStore
from pipeline.run.rundir import CONFIG_FILE, INPUTS_FILE, read_inputs


def preflight(cfg: Config, directory: Path, log: Callable[[str], None]) -> Dataset:
    """The checks made before the run directory is held or anything is written: devices, the
    backend, resume, prompt templates, the reward, the dataset selection (which it returns) and, if any
    of it is left to run, the model source."""
    from pipeline.engine.model import check_model_source

    check_devices(cfg)
    check_backend(cfg)
    check_resume(cfg, directory)
    check_prompts(cfg)
    check_reward(cfg)
    dataset = load_selection(cfg, log)
    if any(_todo(cfg, RecordStore(directory), dataset).values()):
        check_model_source(cfg)
        check_memory(cfg, lambda _line: None)  # refused here; printed once the run is ours
    return dataset


def _todo(cfg: Config, store: RecordStore, dataset: Dataset) -> dict[str, list[Problem]]:
    """Per method, the problems without a row that counts as done (`retry_errors`)."""
    done = store.completed(include_errors=not cfg.retry_errors)
    return {m: [p for p in dataset.problems if (p.problem_id, m) not in done] for m in cfg.method}


@dataclass
class Work:
    """What an invocation has to do, decided holding the run directory (`plan_work`)."""

    todo: dict[str, list[Problem]]  # per method, the problems left to run
    total: int  # (problem, method) pairs in the selection
    skipped: int  # of them, already recorded (a failed row counts unless it is retried)
    inputs: dict[str, dict[str, str]]  # `input_digests`


def plan_work(cfg: Config, directory: Path, dataset: Dataset, log: Callable[[str], None]) -> Work:
    """Holding the run directory: the resume checked again (a driver that held it before may
    have written it since `preflight`), what is left to do (a row recorded with an error is
    run again unless `retry_errors` is off; how many is logged), the model source (if there is
    work), the inputs against the first invocation's, and that the MLflow run of this run_id
    belongs to this directory (`pipeline.run.tracking.check_run_dir`)."""
    from pipeline.engine.model import check_model_source
    from pipeline.run import tracking

    check_resume(cfg, directory)
    store = RecordStore(directory)
    todo = _todo(cfg, store, dataset)
    total = len(dataset.problems) * len(cfg.method)
    skipped = total - sum(len(v) for v in todo.values())
    failed = store.failed() if cfg.retry_errors else set()
    retried = sum((p.problem_id, m) in failed for m, ps in todo.items() for p in ps)
    if skipped or retried:
        again = f"; retrying {retried} recorded with an error" if retried else ""
        log(f"resuming {cfg.run_id}: {skipped} of {total} records already there{again}")
    work = any(todo.values())
    if work:
        check_model_source(cfg)  # again: `preflight` may have found nothing to do
    # The model is compared only when it is to be loaded: a finished run can be reported again
    # without it.
    inputs = input_digests(cfg, dataset, model=work)
    check_inputs(cfg, directory, inputs)
    tracking.check_run_dir(cfg)
    return Work(todo, total, skipped, inputs)


def resolve_run_id(cfg: Config) -> Config:
    if cfg.run_id:
        return cfg
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cfg.replace(run_id=f"{stamp}-{uuid.uuid4().hex[:6]}")


def resolved_precision(device: str, gpus_per_worker: float, dtype: str) -> tuple[str, str]:
    """(device type, dtype name) the workers will use, e.g. ("cpu", "float32"), worked out from
    the settings alone (no CUDA needed): GPU workers run on cuda, `dtype=auto` follows it."""
    import torch

    from pipeline.engine.model import resolve_dtype

    device_type = "cuda" if gpus_per_worker > 0 or device.startswith("cuda") else "cpu"
    resolved = resolve_dtype(dtype, torch.device(device_type))
    return device_type, str(resolved).removeprefix("torch.")


def check_devices(cfg: Config) -> None:
    """`device` and `gpus_per_worker` agree, and a local Ray has the GPUs the workers ask for."""
    from pipeline.run.workers import worker_device

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


def check_memory(cfg: Config, log: Callable[[str], None]) -> None:
    """Print the memory plan of one worker (`pipeline.engine.memory`) from the model's
    config.json, and refuse a run whose plan exceeds its device (`device_memory_gib`, or the
    CUDA device's size) with the numbers and the keys to change."""
    from pipeline.engine.memory import (
        ModelShape,
        device_memory,
        model_config,
        plan_memory,
        workload,
    )
    from pipeline.engine.model import EMBEDDED_NAME

    device_type, dtype = resolved_precision(cfg.device, cfg.gpus_per_worker, cfg.dtype)
    size, name = device_memory(cfg, device_type)
    try:
        config = model_config(cfg)
        if config is None:
            log(f"memory plan: model={cfg.model!r} has no config.json before its first load")
            return
        name_of = EMBEDDED_NAME if cfg.model == "embedded" else cfg.model
        shape = ModelShape.from_config(config, name=name_of)
        plan = plan_memory(shape, dtype, workload(cfg), cfg.backend, size, name)
    except (KeyError, TypeError, ValueError) as exc:  # a config the plan does not cover
        log(f"memory plan: skipped ({exc})")
        return
    for line in plan.lines():
        log(line)
    if refusal := plan.refusal():
        raise RunError(refusal)


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
    from pipeline.engine.backends import check_installed

    if missing := check_installed(cfg.backend):
        raise RunError(missing)


def check_prompts(cfg: Config) -> None:
    """The solver and verifier templates load, and the prompt files the methods read (reflect's);
    a ConfigError names the key, the file and the problem."""
    from pipeline.method.methods import get_method
    from pipeline.method.prompts import load_solver_template, load_verifiers

    checks = {"prompt": load_solver_template, "verifier_prompts": load_verifiers}
    for m in cfg.method:
        checks.update(get_method(m).files)
    for key, load in checks.items():
        try:
            load(getattr(cfg, key))
        except ConfigError as exc:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: {exc}") from None


def check_reward(cfg: Config) -> None:
    """A `module:function` reward imports and names a callable. The driver imports the module
    here (running its top-level code) as every worker will."""
    if cfg.reward in BUILTIN_REWARDS:
        return
    from pipeline.method.rewards import import_callable

    try:
        import_callable(cfg.reward)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def input_digests(cfg: Config, dataset: Dataset, model: bool = True) -> dict[str, dict[str, str]]:
    """What each input the config names holds, by config key: the dataset file, the prompt
    template, the verifier templates (with the self-reward), the reward's module file (its own
    file only, not what it imports), the problems loaded (id, question, gold: every source,
    `pipeline.data.problems_digest`), this project's code (`code_digest`), the library versions
    (`package_versions`) and, with `model`, the model (`pipeline.engine.model.model_digest`:
    every file by content; a hub id by its commit). Each is {"source": where, <field>: <value>};
    a hub model whose commit cannot be known here has nothing to compare."""
    from pipeline.engine.model import file_sha256, model_digest
    from pipeline.method.methods import get_method
    from pipeline.method.prompts import load_verifiers, template_path

    def of_file(path: Path) -> dict[str, str]:
        return {"source": str(path.resolve()), "sha256": file_sha256(path)}

    inputs: dict[str, dict[str, str]] = {}
    if dataset.digest:
        inputs["dataset"] = {"source": dataset.source, "sha256": dataset.digest}
    if dataset.content_digest:  # every source, a Hugging Face dataset too
        inputs["problems"] = {"source": dataset.source, "sha256": dataset.content_digest}
    inputs["code"] = code_digest()
    inputs["packages"] = package_versions(cfg)
    inputs["prompt"] = of_file(template_path(cfg.prompt))
    if cfg.reward == "self":
        # what the verifiers say, resolved: a file that includes another changes with it
        verifiers = load_verifiers(cfg.verifier_prompts)
        text = json.dumps(dataclasses.asdict(verifiers), sort_keys=True).encode()
        inputs["verifier_prompts"] = {
            "source": str(template_path(cfg.verifier_prompts).resolve()),
            "sha256": hashlib.sha256(text).hexdigest(),
        }
    for key in dict.fromkeys(k for m in cfg.method for k in get_method(m).files):
        inputs[key] = of_file(template_path(getattr(cfg, key)))
    if cfg.reward not in BUILTIN_REWARDS:
        module = sys.modules.get(cfg.reward.partition(":")[0])  # imported by check_reward
        if getattr(module, "__file__", None):
            inputs["reward"] = of_file(Path(module.__file__))
    if model and (digest := model_digest(cfg)):
        inputs["model"] = digest
    return inputs


CODE_DIRS = ("pipeline", "jobs")  # the code whose .py files make a run's results
PACKAGES = ("torch", "transformers")  # the libraries that make them (and vllm with its backend)
CODE_INPUTS = ("code", "packages")  # what `allow_code_change` lets a resume change


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None


def code_digest(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """What this project's code is: the sha256 of its `CODE_DIRS` .py files (each file's path
    and content; those git tracks, else every one there: the same files on a cluster that got
    the project from `latentseek submit`, which uploads what git tracks), and, as information,
    `git describe --always --dirty`."""
    from pipeline.engine.model import file_sha256

    listed = _git(root, "ls-files", "-z", "--", *(f"{d}/*.py" for d in CODE_DIRS))
    if listed is not None:
        files = [f for f in listed.split("\0") if f]
    else:
        files = [
            p.relative_to(root).as_posix()
            for d in CODE_DIRS
            for p in (root / d).rglob("*.py")
            if "__pycache__" not in p.parts
        ]
    h = hashlib.sha256()
    for rel in sorted(files):
        if (root / rel).is_file():
            h.update(f"{rel}\0{file_sha256(root / rel)}\n".encode())
    describe = (_git(root, "describe", "--always", "--dirty", "--abbrev=12") or "").strip()
    return {"source": f"git {describe}" if describe else "no git", "sha256": h.hexdigest()}


def package_versions(cfg: Config) -> dict[str, str]:
    """The versions of the libraries that compute the results (`PACKAGES`, and vllm when it is
    the backend); "absent" for one not installed."""
    from importlib.metadata import PackageNotFoundError, version

    names = [*PACKAGES, *(["vllm"] if cfg.backend == "vllm" else [])]
    versions = {"source": f"python {sys.version.split()[0]}"}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def check_inputs(cfg: Config, directory: Path, inputs: dict[str, dict[str, str]]) -> None:
    """Refuse a resume whose inputs hold something else than the first invocation's
    (inputs.yaml), naming each input and what changed; an input's `source` may move. The code
    and the library versions may change with `allow_code_change`."""
    saved = read_inputs(directory)
    if not saved:
        return
    changed = []
    for name, now in inputs.items():
        before = saved.get(name)
        if not before or (cfg.allow_code_change and name in CODE_INPUTS):
            continue
        fields = sorted((set(before) | set(now)) - {"source"})
        diffs = [
            f"{field} {_short(before.get(field, 'absent'))} -> {_short(now.get(field, 'absent'))}"
            for field in fields
            if before.get(field) != now.get(field)
        ]
        if diffs:
            changed.append(f"{name} {now.get('source', '')}: {', '.join(diffs)}")
    if changed:
        code = any(c.startswith(CODE_INPUTS) for c in changed)
        allow = " (or allow_code_change=true to resume with this code)" if code else ""
        raise RunError(
            f"run_id={cfg.run_id!r}: inputs changed since the run started "
            f"({directory / INPUTS_FILE}): {'; '.join(changed)}; resuming would mix results. "
            f"Use a new run_id (run_id=<new>) for these inputs, or restore them to resume{allow}."
        )


def _short(value: str) -> str:
    """A value with each sha256 cut to 12 hex digits (enough to tell two apart)."""
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", str(value))


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
