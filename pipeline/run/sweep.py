"""Sweep plans: which runs a test-time scaling sweep needs, and which of its points are derived.

A sweep file (`configs/sweeps/*.yaml`) names a base config, settings for every point, a grid
(the cartesian product of value lists) and/or a list of points:

    name: lr-scaling            # the sweep's directory and the prefix of its run ids
    config: ../default.yaml     # the base config (relative to this file); optional
    set: {reward: psrm, method: [latentseek]}       # every point
    grid: {max_iters: [1, 2, 4, 8, 10], lr: [0.003, 0.01, 0.03]}
    points:                     # optional; each entry is crossed with the grid, and its own
      - {lr_relative: false}    # values win over the grid's (`{method: [cot], max_iters: 0}`
      - {lr_relative: true, lr: 0.5}  # appears once however large the grid)
    derive: true                # default: derive K <= K_max and n <= N from one run (below)

Derive instead of recompute: points that differ only in derivable keys (config keys with the
DERIVABLE role: `max_iters`, `n_samples`) share one executed run with the largest of each, for
the keys that every method of the point either derives (`Method.derive`: a LatentSeek run with
K = 10 holds the answer after every k <= 10; BoN / SC with N samples hold every n <= N, samples
being seeded per (seed, problem, sample index)) or does not depend on. A key that some method of
the point depends on without deriving it is not derived: each of its values runs. Such a point
is recorded as derived from the executed run's id.

This module plans; `jobs/sweep.py` runs the plan. Nothing here starts Ray or MLflow.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    DERIVABLE,
    Config,
    ConfigError,
    keys_with,
    load_config,
    read_yaml_file,
)

_SPEC_KEYS = {"name", "config", "set", "grid", "points", "derive", "description"}


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: Path | None  # the base config file
    fixed: dict[str, Any]  # `set:`
    grid: dict[str, list[Any]]
    points: list[dict[str, Any]]
    derive: bool = True
    source: Path | None = None  # the sweep file


@dataclass
class SweepPoint:
    run_id: str
    varied: dict[str, Any]  # the values that make this point (keys that vary across the sweep)
    cfg: Config
    derived_from: str = ""  # run_id of the executed point that holds this point's results
    derived: dict[str, Any] = field(default_factory=dict)  # e.g. {"max_iters": 4}

    @property
    def executed(self) -> bool:
        return not self.derived_from


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    data = read_yaml_file(path, "sweep keys (name, set, grid and/or points)")
    unknown = sorted(set(map(str, data)) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    name = str(data.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{path}: name={name!r}: use letters, digits, '-', '_' and '.' only")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid must map config keys to non-empty lists of values")
    points = data.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{path}: points must be a list of mappings of config keys")
    if not grid and not points:
        raise ConfigError(f"{path}: nothing to sweep: give a grid and/or points")
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: set must be a mapping of config keys")
    base = data.get("config")
    return SweepSpec(
        name=name,
        base=(path.parent / base).resolve() if base else None,
        fixed=dict(fixed),
        grid={str(k): list(v) for k, v in grid.items()},
        points=[dict(p) for p in points],
        derive=bool(data.get("derive", True)),
        source=path.resolve(),
    )


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_value_text(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def point_name(sweep: str, varied: dict[str, Any]) -> str:
    """`<sweep>-<key>_<value>-...` over the keys that vary, e.g. `lr-scaling-lr_0.01-max_iters_4`."""
    parts = [f"{k}_{_value_text(v)}" for k, v in varied.items()]
    return "-".join([sweep, *parts]) if parts else sweep


def plan(spec: SweepSpec, overrides: list[str] | None = None) -> list[SweepPoint]:
    """Every point of the sweep, validated; executed points first, then the derived ones."""
    combos = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    raw: list[dict[str, Any]] = []  # a point's own values win over the grid's
    for values in ({**combo, **entry} for entry in (spec.points or [{}]) for combo in combos):
        if values not in raw:  # a point that fixes every swept key appears once
            raw.append(values)
    swept = [k for k in dict.fromkeys(k for point in raw for k in point)]
    fixed_overrides = [o for o in overrides or [] if o.split("=", 1)[0].strip() in swept]
    if fixed_overrides:
        raise ConfigError(
            f"{fixed_overrides[0]!r}: that key is swept by {spec.name}; edit the sweep file instead"
        )
    varying = [k for k in swept if len({repr(p.get(k)) for p in raw}) > 1]
    points: list[SweepPoint] = []
    seen: set[str] = set()
    for values in raw:
        settings = {**spec.fixed, **values}
        items = [f"{k}={_as_override(v)}" for k, v in settings.items()]
        cfg = load_config(spec.base, items + list(overrides or []))
        varied = {k: values[k] for k in varying if k in values}
        run_id = point_name(spec.name, varied)
        if run_id in seen:
            raise ConfigError(f"{spec.source}: two points are the same ({run_id})")
        seen.add(run_id)
        points.append(SweepPoint(run_id, varied, cfg.replace(run_id=run_id)))
    return _derive(points, spec.name) if spec.derive else points


def _as_override(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def derivable_keys(cfg: Config) -> tuple[str, ...]:
    """The DERIVABLE keys that every method of `cfg` derives or does not depend on."""
    from pipeline.method.methods import get_method

    def ok(key: str, name: str) -> bool:
        m = get_method(name)
        return (m.derive is not None and m.derive.key == key) or key not in m.settings

    return tuple(k for k in keys_with(DERIVABLE) if all(ok(k, m) for m in cfg.method))


def _group_key(cfg: Config) -> str:
    values = cfg.to_dict()
    for key in (*derivable_keys(cfg), "run_id"):
        values.pop(key)
    return repr(sorted(values.items()))


def _derive(points: list[SweepPoint], sweep: str) -> list[SweepPoint]:
    """Within each group of points equal but for their derivable keys, execute the one with the
    largest value of each (added to the plan if the sweep has no such point) and derive the
    others from it."""
    groups: dict[str, list[SweepPoint]] = {}
    for p in points:
        groups.setdefault(_group_key(p.cfg), []).append(p)
    executed: list[SweepPoint] = []
    derived: list[SweepPoint] = []
    for members in groups.values():
        keys = derivable_keys(members[0].cfg)
        top = {k: max(getattr(p.cfg, k) for p in members) for k in keys}
        source = next(
            (p for p in members if all(getattr(p.cfg, k) == v for k, v in top.items())), None
        )
        if source is None:  # no point has both maxima: run one that does
            first = members[0]
            varied = {**first.varied, **top}
            run_id = point_name(sweep, varied)
            source = SweepPoint(run_id, varied, first.cfg.replace(run_id=run_id, **top))
        executed.append(source)
        for p in members:
            if p is source:
                continue
            p.derived_from = source.run_id
            p.derived = {k: getattr(p.cfg, k) for k in keys if getattr(p.cfg, k) != top[k]}
            derived.append(p)
    return executed + derived
