"""What a shipped benchmark declares: its data file and checksum, fields, labels, the text a
solver prompt adds for it, and its official grading under `compat=reference`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data"


def strip_gold(answer: str) -> str:
    """The gold answer as written (surrounding whitespace removed)."""
    return answer.strip()


@dataclass(frozen=True)
class Benchmark:
    name: str  # `dataset=<name>`, the records' `dataset` column, the problem-id prefix
    title: str  # what reports call it ("GSM8K")
    file: str  # the JSON Lines file under data/
    sha256: str  # of that file (data/SOURCES.md); a test compares them
    question_field: str
    answer_field: str
    id_field: str | None  # None: the row index
    order: int  # its column in tables (smaller first)
    gold: Callable[[str], str] = strip_gold  # the gold answer from the answer field
    label: Callable[[str], str] | None = None  # Problem.label: the answer as the data writes it
    meta_fields: tuple[str, ...] = ()  # small columns kept in Problem.meta
    # solver template name -> text appended to the user message (the paper's json prompt adds
    # a note for some benchmarks)
    prompt_suffix: Mapping[str, str] = field(default_factory=dict)
    # compat=reference: the official code's extraction (text, answer style) -> answer, compared
    # by string equality with `label`; None: this engine's grading in both modes
    official_extract: Callable[[str, str], str | None] | None = None

    @property
    def path(self) -> Path:
        return DATA_DIR / self.file

    @property
    def id_prefix(self) -> str:
        return f"{self.name}-"
