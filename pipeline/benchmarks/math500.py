"""MATH-500 (500 problems; the MATH test subset of github.com/openai/prm800k, MIT). Under
`compat=reference` it keeps this engine's grading: the official MATH-500 judge chains graders
this project does not ship."""

from __future__ import annotations

from pipeline.benchmarks.base import Benchmark

BENCHMARK = Benchmark(
    name="math500",
    title="MATH-500",
    file="math500_test.jsonl",
    sha256="35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    question_field="problem",
    answer_field="answer",
    id_field=None,
    order=10,
    meta_fields=("subject", "level", "unique_id"),
)
