"""The benchmark registry: every module of this package that defines `BENCHMARK` is a shipped
benchmark (`dataset=<name>`). Adding one is its module, its data file under data/ (with its
origin in data/SOURCES.md), a test and its row in docs/configuration.md (`benchmarks_table()`);
nothing else names a benchmark."""

from __future__ import annotations

import functools
import hashlib
import importlib
import pkgutil
from pathlib import Path

from pipeline.benchmarks.base import DATA_DIR, Benchmark, strip_gold

__all__ = [
    "DATA_DIR",
    "Benchmark",
    "all_benchmarks",
    "benchmarks_table",
    "get_benchmark",
    "prompt_suffix",
    "strip_gold",
    "verify_checksums",
]


@functools.cache
def all_benchmarks() -> dict[str, Benchmark]:
    """name -> Benchmark, in table order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        bench = getattr(module, "BENCHMARK", None)
        if isinstance(bench, Benchmark):
            found.append(bench)
    return {b.name: b for b in sorted(found, key=lambda b: (b.order, b.name))}


def get_benchmark(name: str) -> Benchmark | None:
    """The shipped benchmark called `name`, or None (user data)."""
    return all_benchmarks().get(name)


def prompt_suffix(dataset: str, template: str) -> str:
    """What the solver template `template` appends to the user message for `dataset`."""
    bench = get_benchmark(dataset)
    return bench.prompt_suffix.get(template, "") if bench else ""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_checksums(data_dir: Path = DATA_DIR) -> dict[str, bool]:
    """Benchmark name -> whether its file in `data_dir` exists and matches its sha256."""
    return {
        name: (Path(data_dir) / b.file).is_file()
        and sha256_file(Path(data_dir) / b.file) == b.sha256
        for name, b in all_benchmarks().items()
    }


def benchmarks_table() -> str:
    """The shipped benchmarks as a Markdown table (docs/configuration.md holds this function's
    output; tests/test_docs.py compares them)."""
    rows = [
        "| dataset | title | file | question, answer | problem ids | prompt note for "
        "| graded under compat=reference by |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in all_benchmarks().values():
        ids = f"`{b.id_prefix}<{b.id_field or 'row'}>`"
        notes = ", ".join(f"`prompt={t}`" for t in b.prompt_suffix) or "-"
        official = "the official extraction" if b.official_extract else "this engine's grading"
        fields = f"`{b.question_field}`, `{b.answer_field}`"
        cells = [f"`{b.name}`", b.title, f"`data/{b.file}`", fields, ids, notes, official]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
