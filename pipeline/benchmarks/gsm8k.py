"""GSM8K test (1319 problems; github.com/openai/grade-school-math, MIT): the label is the text
after `####`."""

from __future__ import annotations

from pipeline.benchmarks.base import Benchmark
from pipeline.benchmarks.official import official_extract

# The paper's json prompt (Prompt 2) adds this to the user message for GSM8K and AIME 2024.
NUMBERS_ONLY = (
    "Note that the final answer should be pure numbers, not the calculation formulas, and "
    "without any units or explanation!!! "
)


def gold(answer: str) -> str:
    """The label: the text after the last '####', stripped, thousands commas removed."""
    if "####" not in answer:
        raise ValueError("has no '####' label")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def label(answer: str) -> str:
    """The label as the official LatentSeek code reads it: the text after '#### ' as is."""
    return answer.split("#### ")[1] if "#### " in answer else ""


BENCHMARK = Benchmark(
    name="gsm8k",
    title="GSM8K",
    file="gsm8k_test.jsonl",
    sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    question_field="question",
    answer_field="answer",
    id_field=None,
    order=0,
    gold=gold,
    label=label,
    prompt_suffix={"json": NUMBERS_ONLY},
    official_extract=official_extract,
)
