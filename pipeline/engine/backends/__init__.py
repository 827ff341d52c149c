"""The generation-backend registry: every module of this package that defines `BACKEND` (a
class implementing `pipeline.engine.backends.base.Backend`, with a `name`) is a backend, chosen with
`backend=<name>`. A backend's heavy imports (a serving engine) happen in its constructor, so
listing the backends imports none of them."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from pipeline.engine.backends.base import Backend, Capabilities

__all__ = ["Backend", "Capabilities", "all_backends", "backend_class", "make_backend"]


@functools.cache
def all_backends() -> dict[str, type]:
    """name -> backend class."""
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "BACKEND", None)
        if cls is not None:
            found[cls.name] = cls
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "native", kv[0])))


def backend_class(name: str) -> type:
    backends = all_backends()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(backends)}")
    return backends[name]


def check_installed(name: str) -> str:
    """'' when backend `name` can start here, else what to install (a backend module may define
    `requirement() -> str`, asked before anything starts)."""
    check = getattr(importlib.import_module(backend_class(name).__module__), "requirement", None)
    return check() if check is not None else ""


def make_backend(name: str, loaded: Any, cfg: Any = None) -> Backend:
    """The backend `name` on an already loaded model."""
    return backend_class(name)(loaded, cfg)
