"""AIME 2024 I and II (30 problems with integer answers; Art of Problem Solving wiki)."""

from __future__ import annotations

from pipeline.benchmarks.base import Benchmark
from pipeline.benchmarks.gsm8k import NUMBERS_ONLY
from pipeline.benchmarks.official import official_extract

BENCHMARK = Benchmark(
    name="aime2024",
    title="AIME 2024",
    file="aime2024.jsonl",
    sha256="1d564969f68b737dae39bf2a578745fa01559fd6b64928089605463bac198a53",
    question_field="problem",
    answer_field="answer",
    id_field="id",
    order=20,
    meta_fields=("url",),
    prompt_suffix={"json": NUMBERS_ONLY},
    official_extract=official_extract,
)
