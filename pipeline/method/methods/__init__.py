"""The method registry: every module of this package that defines `METHOD` is a method.

Adding a method is one file here (its `METHOD = Method(...)` and its task), a test file and its
row in docs/method.md (`methods_table()`): the config, the driver, sweeps and reports find it
through this registry and name no method themselves.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from pipeline.method.methods.base import Derivation, Method, problem_seed, select_best

__all__ = [
    "Derivation",
    "Method",
    "all_methods",
    "get_method",
    "method_names",
    "methods_table",
    "problem_seed",
    "select_best",
]


@functools.cache
def all_methods() -> dict[str, Method]:
    """name -> Method, in table order."""
    found: list[Method] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    names = [m.name for m in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"two method modules declare the same name: {duplicates}")
    return {m.name: m for m in sorted(found, key=lambda m: (m.order, m.name))}


def method_names() -> list[str]:
    return list(all_methods())


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(methods)}")
    return methods[name]


def reference_method() -> Method | None:
    """The method every other method's gain is measured against (the greedy CoT)."""
    return next((m for m in all_methods().values() if m.reference), None)


def methods_table() -> str:
    """The registered methods as a Markdown table (docs/method.md holds this function's output;
    tests/test_docs.py compares them)."""
    rows = [
        "| method | title | what it does | its own keys | records | a sweep derives |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in all_methods().values():
        keys = (["reward"] if m.uses_reward else []) + list(m.settings)
        records = ["a problem row"]
        if m.cot_pass:
            records.append("its own greedy CoT pass")
        if m.iterations:
            records.append("an iteration row per step k")
        if m.samples:
            records.append("its N samples")
        derives = "-"
        if m.derive is not None:
            how = "the answer after k steps" if m.derive.kind == "steps" else "the first n of N"
            derives = f"`{m.derive.key}`: {how}"
        what = m.description + (" (the reference of every gain)" if m.reference else "")
        cells = [
            f"`{m.name}`",
            m.title,
            what,
            ", ".join(f"`{k}`" for k in keys) or "-",
            ", ".join(records),
            derives,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
