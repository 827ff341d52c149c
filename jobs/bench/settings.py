"""What a bench run measures: `Config` keys for the engine, `BenchSettings` keys for the rows.

`latentseek bench [--config FILE] [key=value ...]` takes both kinds of key on one command line,
parsed by `pipeline.config.parse_overrides` like every other command:

- a `Config` key (`max_new_tokens`, `max_iters`, `limit`, `batch_size`, `batching`, `task_size`,
  `dtype`, `threads`, `model`, `offset`, ...) sets the engine that every row runs;
- a `BenchSettings` key (below) chooses the rows.

The config is the defaults, then the YAML (`--config`, else `configs/default.yaml`), then the
preset's `Config` keys (`CONFIG_PRESETS`: the bench's token budget and slice), then the command
line. Bench keys left unset take the preset's value (`BENCH_PRESETS`); `preset=full` is the
issue's whole matrix (hours on 2 cores).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    check_types,
    load_config,
    parse_overrides,
)

# bench method name -> (engine method, reward or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "cot": ("cot", None),
    "latentseek-psrm": ("latentseek", "psrm"),
    "latentseek-self": ("latentseek", "self"),
    "sc-8": ("sc", None),
}
METHOD_CHANGES: dict[str, dict[str, Any]] = {"sc-8": {"n_samples": 8}}  # besides method, reward
ROW_KINDS = ("engine", "batching", "bf16", "ceiling", "naive", "ray", "profile", "vllm")

# `Config` keys a preset sets (after the YAML, before the command line)
CONFIG_PRESETS: dict[str, dict[str, Any]] = {
    "default": {  # sized so that `make bench` takes about 11 minutes on 2 shared cores
        "max_new_tokens": 96,
        "verifier_max_new_tokens": 64,
        "max_iters": 2,
        "limit": 16,
        "batch_size": 16,
        "offset": 0,
    },
    "full": {
        "max_new_tokens": 256,
        "verifier_max_new_tokens": 64,
        "max_iters": 3,
        "limit": 16,
        "batch_size": 16,
        "offset": 0,
    },
}
# `BenchSettings` keys a preset sets where the command line does not
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "full": {
        "methods": list(METHODS),
        "batch_sizes": [1, 4, 8, 16, 32],
        "b1_problems": 4,
        "naive_problems": 2,
        "ray_methods": list(METHODS),
        "profile": "always",
    },
}


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class BenchSettings:
    preset: Literal["default", "full"] = _f(
        "default", "'default' (`make bench`, under 15 minutes) or 'full' (every row; hours)"
    )
    methods: list[str] = _f(
        ["cot", "latentseek-psrm"], f"methods of the engine rows, of {', '.join(METHODS)}"
    )
    batch_sizes: list[int] = _f(
        [1, 16],
        "engine rows' batch sizes (B=1 on b1_problems, the others on `limit`); at `batch_size` "
        "a method of batching_methods is measured by its static and continuous rows instead",
    )
    b1_problems: int = _f(1, "problems of the engine rows at batch size 1")
    batching_problems: int = _f(
        64, "problems of the static vs continuous row (at `batch_size`); 0 leaves it out"
    )
    batching_methods: list[str] = _f(["latentseek-psrm"], "methods of the static vs continuous row")
    bf16_methods: list[str] = _f(
        ["cot", "latentseek-psrm"],
        "methods run in bfloat16, static at `batch_size` on `limit` problems, beside float32",
    )
    naive_problems: int = _f(1, "problems of the naive rows (cot, latentseek-psrm)")
    naive_self_problems: int = _f(1, "problems of the naive latentseek-self row")
    ray_methods: list[str] = _f(["cot"], "methods of the Ray rows (1 and 2 workers)")
    ray_problems: int = _f(16, "problems of the Ray rows")
    ray_batch_size: int = _f(8, "batch size of the Ray rows (8: 16 problems, one task a worker)")
    vllm_problems: int = _f(
        64, "problems of the native-vs-vLLM rows (continuous, K=3); 0 leaves them out"
    )
    vllm_methods: list[str] = _f(
        ["cot", "latentseek-psrm", "sc-8"], "methods run on both backends (native and vllm)"
    )
    vllm_python: str = _f(
        ".venv-vllm/bin/python",
        "the Python that has vLLM (make setup-vllm), relative to the project; when it is missing "
        "the vllm rows are left out, saying what to install",
    )
    ceiling_tokens: int = _f(
        0, "tokens the generate() ceiling decodes (0: one batch of rows of max_new_tokens / 2)"
    )
    profile: Literal["auto", "always", "never"] = _f(
        "auto",
        "profile LatentSeek PSRM at its best batch (op shares, GEMM and memory rooflines): "
        "'auto' when its tokens/s target is missed",
    )
    skip: list[str] = _f([], f"row kinds to leave out, of {', '.join(ROW_KINDS)}")
    omp_wait_policy: str = _f(
        "PASSIVE", "OMP_WAIT_POLICY of every measured process ('' leaves the environment's)"
    )
    out: str = _f("bench-results", "report folder: bench.md, bench.json, logs/")

    def __post_init__(self) -> None:
        check_types(self)
        for key in ("methods", "batching_methods", "bf16_methods", "ray_methods", "vllm_methods"):
            bad = [m for m in getattr(self, key) if m not in METHODS]
            if bad:
                raise ConfigError(f"{key}: unknown {bad}; allowed: {', '.join(METHODS)}")
        bad = [k for k in self.skip if k not in ROW_KINDS]
        if bad:
            raise ConfigError(f"skip: unknown {bad}; allowed: {', '.join(ROW_KINDS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch_sizes={self.batch_sizes}: integers >= 1")
        for key in ("b1_problems", "ray_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("batching_problems", "naive_problems", "naive_self_problems", "ray_problems",
                    "vllm_problems"):  # fmt: skip
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")

    def runs(self, kind: str) -> bool:
        return kind not in self.skip


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def parse(config_path: str | Path | None, items: list[str]) -> tuple[Config, BenchSettings]:
    """The engine's `Config` and the bench's settings from a YAML path and `key=value` items."""
    bench_keys = [f.name for f in dataclasses.fields(BenchSettings)]
    config_keys = [f.name for f in dataclasses.fields(Config)]
    unknown = [_key(i) for i in items if "=" in i and _key(i) not in bench_keys + config_keys]
    if unknown:
        close = difflib.get_close_matches(unknown[0], bench_keys + config_keys, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `latentseek bench --keys`"
        raise ConfigError(f"unknown key {unknown[0]!r}; {hint}")
    values = parse_overrides(BenchSettings, [i for i in items if _key(i) in bench_keys])
    preset = values.get("preset", "default")
    settings = BenchSettings(**{**BENCH_PRESETS[preset], **values})
    path = Path(config_path) if config_path else CONFIG_DIR / "default.yaml"
    presets = [f"{k}={v}" for k, v in CONFIG_PRESETS[preset].items()]
    cfg = load_config(
        path if path.exists() else None, presets + [i for i in items if _key(i) not in bench_keys]
    )
    return cfg, settings


def method_config(cfg: Config, method: str, **changes: Any) -> Config:
    """`cfg` running one bench method (engine method + reward), with `changes`."""
    engine, reward = METHODS[method]
    changes = {**METHOD_CHANGES.get(method, {}), **changes}
    return cfg.replace(method=[engine], reward=reward or cfg.reward, **changes)


def describe(cfg: Config, settings: BenchSettings) -> str:
    """The settings in one paragraph, for the report's header."""
    s = settings
    last = cfg.offset + cfg.limit - 1
    return (
        f"preset {s.preset}; GSM8K-style slice {cfg.dataset} rows {cfg.offset}..{last} "
        f"(N={cfg.limit}); engine rows: {','.join(s.methods)} at B={','.join(map(str, s.batch_sizes))} "
        f"({cfg.batching}; B=1 on {s.b1_problems}); static vs continuous: "
        f"{','.join(s.batching_methods)} on {s.batching_problems} problems at B={cfg.batch_size} "
        f"(continuous tasks of {cfg.replace(batching='continuous').problems_per_task}); bf16: "
        f"{','.join(s.bf16_methods)} at B={cfg.batch_size}; naive: {s.naive_problems} problem(s); "
        f"Ray: {','.join(s.ray_methods)} on {s.ray_problems} at B={s.ray_batch_size}; "
        f"native vs vLLM: {','.join(s.vllm_methods)} on {s.vllm_problems} (K=3); "
        f"max_new_tokens={cfg.max_new_tokens}, K={cfg.max_iters}, verifier_max_new_tokens="
        f"{cfg.verifier_max_new_tokens}, lr={cfg.lr}, rho={cfg.rho}, tau={cfg.reward_threshold}, "
        f"prompt={cfg.prompt}, model={cfg.model} ({cfg.dtype}), threads={cfg.threads or 'default'}, "
        f"OMP_WAIT_POLICY={s.omp_wait_policy or '(unset)'}; left out: {','.join(s.skip) or 'none'}"
    )
