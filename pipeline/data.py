"""Benchmark and user data: every source becomes a list of `Problem`s with stable ids.

Sources (`Config.dataset`):

- a shipped benchmark (`pipeline.benchmarks`: one module each, declaring its file under
  `data/`, its question/answer/id fields, its gold and label parsing and its sha256);
- a user file: JSON Lines (`.jsonl`, `.json`, `.jsonlines`, `.ndjson`; a `.json` file may
  also hold one JSON array of objects), Parquet (`.parquet`) or CSV (`.csv`); relative
  paths are resolved from the working directory;
- `hf:<dataset id>` or `hf:<dataset id>:<config name>`: a Hugging Face dataset, loaded with
  the optional `datasets` package (split `Config.dataset_split`).

Problem ids are stable across runs: `<benchmark>-<row index>` (or `<benchmark>-<id>` when
the benchmark has an id field); for user data the value of `id_field`,
else `<file stem>-<row index>`. Row indices count every record of the file, malformed
ones included, so skipping a bad row never renumbers the others.

Malformed input raises `DataError` naming the file, the place (`line N` for JSON Lines and
CSV, where the CSV header is line 1; `row N`, the 0-based row index, for Parquet, JSON
arrays and Hugging Face datasets) and the field. With `skip_bad_rows` a bad row (duplicate
ids, a question or answer over `MAX_TEXT_CHARS` and text UTF-8 cannot encode (a lone surrogate)
included; of duplicates the first is kept) is
skipped and counted instead; problems with the whole
source (missing or empty file, missing column, no usable row) always raise.

Selection (`load_dataset`): `ids` first (if any, in file order), then `offset`, then
`limit` (0 means all). Every row is validated, whatever the selection.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.benchmarks import DATA_DIR, all_benchmarks, get_benchmark, strip_gold

if TYPE_CHECKING:
    from pipeline.config import Config


JSONL_SUFFIXES = (".jsonl", ".json", ".jsonlines", ".ndjson")
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".csv")
HF_PREFIX = "hf:"
DEFAULT_QUESTION_FIELD = "question"
DEFAULT_ANSWER_FIELD = "answer"
META_MAX_CHARS = 200  # longer strings (solutions, passages) are left out of Problem.meta
# A question or answer longer than this (about 250k tokens) fits no context a worker could decode
# in: refused with the row's place instead of failing every worker that tries it.
MAX_TEXT_CHARS = 1_000_000


class DataError(ValueError):
    """Unusable input data; the message names the file, the line or row, and the field."""

    def __init__(self, message: str, *, file: str = "", where: str = "", field: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.where = where
        self.field = field


# ------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Problem:
    problem_id: str  # stable across runs, unique within the dataset
    dataset: str  # benchmark name, or the file stem / hf id of user data
    question: str
    gold: str
    meta: dict[str, Any] = field(default_factory=dict)  # other small columns, JSON-serialisable
    label: str = ""  # the gold answer as the data writes it, where `gold` cleans it (GSM8K)


@dataclass
class Dataset:
    name: str
    source: str  # resolved file path, or "hf:<id>"
    problems: list[Problem]  # after selection (ids, offset, limit)
    skipped_rows: int  # malformed rows skipped (skip_bad_rows), over the whole source
    total_rows: int  # records in the source, before skipping and selection
    digest: str  # sha256 of the source file; "" for Hugging Face datasets
    content_digest: str = ""  # `problems_digest` of every usable row, whatever the source
    skipped: list[str] = field(default_factory=list)  # one DataError message per skipped row


# ------------------------------------------------------------------------------------------
# Reading: every reader returns records as (where, row index, dict or why it is not one)


@dataclass(frozen=True)
class _Record:
    where: str  # "line 7" or "row 6"
    index: int  # 0-based among the source's records
    row: dict[str, Any] | None
    error: str = ""  # why `row` is None


def _error(file: str, where: str, message: str, fld: str = "") -> DataError:
    place = f"{file} {where}" if where else file
    return DataError(f"{place}: {message}", file=file, where=where, field=fld)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _read_bytes(path: Path, label: str) -> bytes:
    if not path.is_file():
        raise _error(label, "", f"file not found ({path})")
    data = path.read_bytes()
    if not data.strip():
        raise _error(label, "", "file is empty")
    return data


def _read_jsonl(data: bytes, label: str) -> list[_Record]:
    data = data.removeprefix(b"\xef\xbb\xbf")
    if data.lstrip()[:1] == b"[":
        return _read_json_array(data, label)
    records: list[_Record] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines are allowed anywhere
        where = f"line {lineno}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            records.append(_Record(where, len(records), None, f"not valid UTF-8: {exc.reason}"))
            continue
        except json.JSONDecodeError as exc:
            msg = f"not valid JSON: {exc.msg} (column {exc.colno})"
            records.append(_Record(where, len(records), None, msg))
            continue
        except RecursionError:
            records.append(_Record(where, len(records), None, "not valid JSON: nested too deep"))
            continue
        if isinstance(obj, dict):
            records.append(_Record(where, len(records), obj))
        else:
            msg = f"expected a JSON object, got {_type_name(obj)}"
            records.append(_Record(where, len(records), None, msg))
    return records


def _read_json_array(data: bytes, label: str) -> list[_Record]:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _error(label, "", f"not valid UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise _error(label, f"line {exc.lineno}", f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise _error(label, "", "not valid JSON: nested too deep") from None
    records = []
    for i, obj in enumerate(items):
        if isinstance(obj, dict):
            records.append(_Record(f"row {i}", i, obj))
        else:
            msg = f"expected a JSON object, got {_type_name(obj)}"
            records.append(_Record(f"row {i}", i, None, msg))
    return records


def _read_csv(data: bytes, label: str, required: Iterable[str]) -> list[_Record]:
    import pandas as pd

    try:
        # Strings throughout: ids like "007" and answers like "1e3" stay as written;
        # only empty cells become NaN (missing).
        frame = pd.read_csv(
            io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8"
        )
    except pd.errors.EmptyDataError:
        raise _error(label, "", "file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _error(label, "", f"not valid CSV: {exc}") from None
    _require_columns(label, "line 1", list(frame.columns), required)
    # The header is line 1, so row i is on line i + 2 (quoted multi-line cells aside).
    return [_Record(f"line {i + 2}", i, row) for i, row in enumerate(frame.to_dict("records"))]


def _read_parquet(data: bytes, label: str, required: Iterable[str]) -> list[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise _error(label, "", f"not a valid Parquet file: {exc}") from None
    _require_columns(label, "", table.column_names, required)
    return [_Record(f"row {i}", i, row) for i, row in enumerate(table.to_pylist())]


def _require_columns(label: str, where: str, columns: list[str], required: Iterable[str]) -> None:
    for name in required:
        if name not in columns:
            msg = f"field {name!r} is missing (columns: {', '.join(map(str, columns))})"
            raise _error(label, where, msg, name)


# ------------------------------------------------------------------------------------------
# Validation: records -> problems


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _question(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if _missing(value):
        keys = ", ".join(k for k, v in row.items() if not _missing(v))
        raise ValueError(f"is missing (present: {keys})" if keys else "is missing")
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_type_name(value)}")
    if not value.strip():
        raise ValueError("is empty")
    _check_length(value)
    return value


def _check_length(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"is {len(text)} characters long; at most {MAX_TEXT_CHARS}")
    _check_encodable(text)


def _check_encodable(text: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate, written `"\\ud800"` in JSON) would pass
    loading and fail the record write of every run that reaches it: refused here instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise ValueError(
            f"holds text that cannot be encoded as UTF-8 ({bad} at character {exc.start}: "
            "a lone surrogate); fix the row or set skip_bad_rows=true"
        ) from None


def _answer(row: dict[str, Any], name: str, gold: Callable[[str], str]) -> str:
    value = row.get(name)
    if _missing(value):
        keys = ", ".join(k for k, v in row.items() if not _missing(v))
        raise ValueError(f"is missing (present: {keys})" if keys else "is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a string or a number, got {_type_name(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 18.0 -> "18"
    _check_length(str(value))
    text = gold(str(value))
    if not text.strip():
        raise ValueError("is empty")
    return text


def _row_id(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if _missing(value):
        raise ValueError("is missing")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a string or an integer, got {_type_name(value)}")
    text = str(value).strip()
    if not text:
        raise ValueError("is empty")
    _check_encodable(text)
    return text


def _small(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= META_MAX_CHARS
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int))


@dataclass(frozen=True)
class _Fields:
    question: str
    answer: str
    id: str  # "" -> row index
    gold: Callable[[str], str]
    meta: tuple[str, ...] | None  # None: every other small column
    label: Callable[[str], str] | None = None  # Problem.label from the answer field


def _parse(rec: _Record, label: str, fields: _Fields) -> tuple[str, str, str]:
    """(question, gold, raw id) of one record, or the DataError that names the field."""
    if rec.row is None:
        raise _error(label, rec.where, rec.error)
    row = rec.row
    name = fields.question
    try:
        question = _question(row, name)
        name = fields.answer
        gold = _answer(row, name, fields.gold)
        name = fields.id
        raw_id = _row_id(row, name) if name else str(rec.index)
        for name, value in row.items():  # noqa: B007 (the except names it)
            if isinstance(value, str) and _small(value):
                _check_encodable(value)
    except ValueError as exc:
        raise _error(label, rec.where, f"field {name!r} {exc}", name) from None
    return question, gold, raw_id


def _build(
    records: list[_Record],
    *,
    label: str,
    dataset: str,
    fields: _Fields,
    id_prefix: str,  # problem_id = id_prefix + the id field (or the row index)
    skip: bool,
) -> tuple[list[Problem], list[str]]:
    """Validate every record; return the problems and the messages of the skipped rows."""
    problems: list[Problem] = []
    skipped: list[str] = []
    first_seen: dict[str, str] = {}
    own = {fields.question, fields.answer, fields.id}

    for rec in records:
        try:
            question, gold, raw_id = _parse(rec, label, fields)
            problem_id = id_prefix + raw_id
            if problem_id in first_seen:
                msg = (
                    f"field {fields.id or 'id'!r}: duplicate problem id {problem_id!r} "
                    f"(first at {first_seen[problem_id]})"
                )
                raise _error(label, rec.where, msg, fields.id)
        except DataError as exc:
            if not skip:
                raise
            skipped.append(str(exc))
            continue
        first_seen[problem_id] = rec.where
        row = rec.row or {}
        if fields.meta is None:
            meta = {k: v for k, v in row.items() if k not in own and _small(v)}
        else:
            meta = {k: row[k] for k in fields.meta if k in row and _small(row[k])}
        meta = {k: None if _missing(v) else v for k, v in meta.items()}
        raw_label = fields.label(str(row[fields.answer])) if fields.label else ""
        problems.append(Problem(problem_id, dataset, question, gold, meta, raw_label))
    return problems, skipped


def problems_digest(problems: Iterable[Problem]) -> str:
    """sha256 of what the problems say (id, question, gold, in order): equal for two sources
    that load the same problems (a file re-encoded, a Hugging Face dataset re-downloaded)."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.problem_id, p.question, p.gold]).encode() + b"\n")
    return h.hexdigest()


def _select(problems: list[Problem], cfg: Config, label: str) -> list[Problem]:
    if cfg.ids:
        wanted = set(cfg.ids)
        unknown = sorted(wanted - {p.problem_id for p in problems})
        if unknown:
            example = problems[0].problem_id if problems else ""
            raise DataError(
                f"{label}: unknown problem ids: {', '.join(unknown)}"
                + (f" (ids look like {example!r})" if example else "")
            )
        problems = [p for p in problems if p.problem_id in wanted]
    problems = problems[cfg.offset :]
    return problems[: cfg.limit] if cfg.limit else problems


# ------------------------------------------------------------------------------------------
# Entry point


def load_dataset(cfg: Config) -> Dataset:
    """Read `cfg.dataset`, validate every row, apply ids/offset/limit (see module docstring)."""
    source = cfg.dataset.strip()
    bench = get_benchmark(source)
    if bench is not None:
        question = cfg.question_field or bench.question_field
        answer = cfg.answer_field or bench.answer_field
        fields = _Fields(
            question=question,
            answer=answer,
            id=cfg.id_field or bench.id_field or "",
            gold=bench.gold if answer == bench.answer_field else strip_gold,
            meta=bench.meta_fields,
            label=bench.label if answer == bench.answer_field else None,
        )
        path = DATA_DIR / bench.file
        label = f"data/{bench.file}"
        data = _read_bytes(path, label)
        records = _read_jsonl(data, label)
        return _finish(cfg, records, label, bench.name, str(path), data, fields, bench.id_prefix)

    if source.startswith(HF_PREFIX):
        return _load_hf(cfg, source)

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        what = f"unsupported file type {suffix!r}" if path.is_file() else "unknown dataset"
        raise DataError(
            f"{source}: {what}; use a benchmark ({', '.join(all_benchmarks())}), a file ending in "
            f"{', '.join(FILE_SUFFIXES)}, or hf:<dataset id>"
        )
    fields = _user_fields(cfg)
    data = _read_bytes(path, source)
    required = (fields.question, fields.answer) + ((fields.id,) if fields.id else ())
    if suffix == ".csv":
        records = _read_csv(data, source, required)
    elif suffix == ".parquet":
        records = _read_parquet(data, source, required)
    else:
        records = _read_jsonl(data, source)
    prefix = "" if fields.id else f"{path.stem}-"
    return _finish(cfg, records, source, path.stem, str(path.resolve()), data, fields, prefix)


def _user_fields(cfg: Config) -> _Fields:
    return _Fields(
        question=cfg.question_field or DEFAULT_QUESTION_FIELD,
        answer=cfg.answer_field or DEFAULT_ANSWER_FIELD,
        id=cfg.id_field,
        gold=strip_gold,
        meta=None,
    )


def _finish(
    cfg: Config,
    records: list[_Record],
    label: str,
    name: str,
    source: str,
    data: bytes | None,
    fields: _Fields,
    id_prefix: str,
) -> Dataset:
    if not records:
        raise _error(label, "", "no rows")
    problems, skipped = _build(
        records,
        label=label,
        dataset=name,
        fields=fields,
        id_prefix=id_prefix,
        skip=cfg.skip_bad_rows,
    )
    if not problems:
        raise _error(label, "", f"no usable rows ({len(skipped)} skipped); first: {skipped[0]}")
    return Dataset(
        name=name,
        source=source,
        problems=_select(problems, cfg, label),
        skipped_rows=len(skipped),
        total_rows=len(records),
        digest=hashlib.sha256(data).hexdigest() if data is not None else "",
        content_digest=problems_digest(problems),
        skipped=skipped,
    )


def _load_hf(cfg: Config, source: str) -> Dataset:
    """`hf:<id>` or `hf:<id>:<config name>`, split `cfg.dataset_split`."""
    hf_id, _, hf_config = source[len(HF_PREFIX) :].partition(":")
    if not hf_id:
        raise DataError(f"{source}: expected hf:<dataset id>")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: Hugging Face datasets need the `datasets` package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(hf_id, hf_config or None, split=cfg.dataset_split)
    except Exception as exc:  # network, missing split, bad id: all reported the same way
        raise DataError(
            f"{source}: could not load split {cfg.dataset_split!r}: {type(exc).__name__}: {exc}"
        ) from exc
    fields = _user_fields(cfg)
    required = (fields.question, fields.answer) + ((fields.id,) if fields.id else ())
    columns = getattr(ds, "column_names", None)
    if columns is not None:
        _require_columns(source, "", list(columns), required)
    records = [_Record(f"row {i}", i, dict(row)) for i, row in enumerate(ds)]
    stem = hf_id.rstrip("/").rsplit("/", 1)[-1]
    prefix = "" if fields.id else f"{stem}-"
    return _finish(cfg, records, source, hf_id, source, None, fields, prefix)
