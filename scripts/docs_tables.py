"""Rewrite the generated tables in docs/ from the code: the config keys (docs/configuration.md),
the methods (docs/method.md) and the benchmarks (docs/configuration.md). tests/test_docs.py
checks that they are current; run this after adding a key, a method or a benchmark:

    .venv/bin/python scripts/docs_tables.py
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.benchmarks import benchmarks_table
from pipeline.config import keys_table
from pipeline.method.methods import methods_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def replace_table(text: str, table: str) -> str:
    """`text` with the Markdown table that has `table`'s header line replaced by `table`."""
    header = table.splitlines()[0]
    start = text.index(header)
    block = re.match(r"(?:\|[^\n]*\n?)+", text[start:])
    return text[:start] + table.rstrip("\n") + "\n" + text[start + block.end() :]


def main() -> None:
    for page, tables in (
        ("configuration.md", (keys_table(), benchmarks_table())),
        ("method.md", (methods_table(),)),
    ):
        path = DOCS / page
        text = path.read_text()
        for table in tables:
            text = replace_table(text, table)
        path.write_text(text)
        print(f"rewrote {path}")


if __name__ == "__main__":
    main()
