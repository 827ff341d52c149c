"""Benchmark and user data loading: shipped files, formats, selection, malformed input."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from pipeline.benchmarks import DATA_DIR, all_benchmarks, verify_checksums
from pipeline.benchmarks.gsm8k import gold as gsm8k_gold
from pipeline.config import Config
from pipeline.data import DataError, Dataset, load_dataset

BENCHMARKS = all_benchmarks()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Each row is a dict (dumped as JSON) or a str (written verbatim as the line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def load(dataset: str | Path, **kw: object) -> Dataset:
    return load_dataset(Config(dataset=str(dataset), **kw))


# ------------------------------------------------------------------------------------------
# Shipped benchmarks


def test_shipped_checksums_match():
    assert verify_checksums() == {name: True for name in BENCHMARKS}


def test_modified_or_missing_copy_is_detected(tmp_path):
    for spec in BENCHMARKS.values():
        shutil.copy(DATA_DIR / spec.file, tmp_path / spec.file)
    assert all(verify_checksums(tmp_path).values())

    gsm = tmp_path / BENCHMARKS["gsm8k"].file
    gsm.write_bytes(gsm.read_bytes().replace(b"#### 18", b"#### 19", 1))
    (tmp_path / BENCHMARKS["aime2024"].file).unlink()
    assert verify_checksums(tmp_path) == {
        **{name: True for name in BENCHMARKS},
        "gsm8k": False,
        "aime2024": False,
    }


@pytest.mark.parametrize(
    ("name", "rows", "first_id"),
    [("gsm8k", 1319, "gsm8k-0"), ("math500", 500, "math500-0"), ("aime2024", 30, "aime2024-60")],
)
def test_shipped_benchmark_loads_every_row(name, rows, first_id):
    ds = load(name)
    assert (len(ds.problems), ds.total_rows, ds.skipped_rows) == (rows, rows, 0)
    assert ds.name == name and ds.digest == BENCHMARKS[name].sha256
    assert ds.problems[0].problem_id == first_id
    assert len({p.problem_id for p in ds.problems}) == rows
    assert all(p.question.strip() and p.gold.strip() for p in ds.problems)
    json.dumps([p.meta for p in ds.problems])  # meta is JSON-serialisable


def test_gsm8k_gold_is_the_label_after_hashes():
    assert load("gsm8k", limit=1).problems[0].gold == "18"
    assert gsm8k_gold("so 1,000 + 234 = 1,234\n#### 1,234 ") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no label here")


def test_math500_and_aime_fields():
    p = load("math500", ids=["math500-17"]).problems[0]
    assert (
        p.meta["unique_id"].startswith("test/") and "level" in p.meta and "solution" not in p.meta
    )
    aime = load("aime2024", limit=1).problems[0]
    assert (aime.gold, aime.dataset) == ("204", "aime2024")


def test_field_overrides_apply_to_benchmarks():
    ds = load("math500", question_field="solution", answer_field="unique_id", limit=2)
    raw = [json.loads(line) for line in (DATA_DIR / "math500_test.jsonl").open()][:2]
    assert [p.question for p in ds.problems] == [r["solution"] for r in raw]
    assert [p.gold for p in ds.problems] == [r["unique_id"] for r in raw]


def test_problem_ids_are_stable_across_loads():
    for name in BENCHMARKS:
        first, second = load(name), load(name)
        assert [p.problem_id for p in first.problems] == [p.problem_id for p in second.problems]
        assert first.problems == second.problems


# ------------------------------------------------------------------------------------------
# Selection: ids, then offset, then limit


def test_offset_and_limit():
    ids = [p.problem_id for p in load("gsm8k", offset=10, limit=3).problems]
    assert ids == ["gsm8k-10", "gsm8k-11", "gsm8k-12"]
    assert len(load("gsm8k", offset=1300).problems) == 19
    assert load("gsm8k", offset=5000).problems == []


def test_ids_keep_file_order_then_offset_and_limit():
    wanted = ["gsm8k-40", "gsm8k-3", "gsm8k-17", "gsm8k-8"]
    assert [p.problem_id for p in load("gsm8k", ids=wanted).problems] == [
        "gsm8k-3",
        "gsm8k-8",
        "gsm8k-17",
        "gsm8k-40",
    ]
    picked = load("gsm8k", ids=wanted, offset=1, limit=2).problems
    assert [p.problem_id for p in picked] == ["gsm8k-8", "gsm8k-17"]


def test_unknown_ids_are_listed():
    with pytest.raises(DataError, match=r"unknown problem ids: gsm8k-9999, nope"):
        load("gsm8k", ids=["gsm8k-1", "nope", "gsm8k-9999"])


# ------------------------------------------------------------------------------------------
# User data: JSON Lines, CSV, Parquet, Hugging Face


def test_jsonl_user_file_defaults(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": "1+1?", "answer": 2, "topic": "add", "long": "x" * 1000},
            "",
            "   ",
            {"question": "1/2?", "answer": 0.5},
            {"question": "3*3?", "answer": 9.0},
        ],
    )
    ds = load(path)
    assert (ds.name, ds.total_rows, ds.skipped_rows) == ("mine", 3, 0)
    assert [p.problem_id for p in ds.problems] == ["mine-0", "mine-1", "mine-2"]
    assert [p.gold for p in ds.problems] == ["2", "0.5", "9"]
    assert ds.problems[0].meta == {"topic": "add"}  # long strings are left out
    assert ds.source == str(path.resolve()) and len(ds.digest) == 64


def test_jsonl_id_field_and_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"q": "a?", "a": "1", "key": "p7"}, {"q": "b?", "a": "2", "key": 8}]
    )
    ds = load(path, question_field="q", answer_field="a", id_field="key")
    assert [(p.problem_id, p.question, p.gold) for p in ds.problems] == [
        ("p7", "a?", "1"),
        ("8", "b?", "2"),
    ]


def test_json_array_file(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(
        json.dumps([{"question": "a?", "answer": "1"}, {"question": "b?", "answer": "2"}])
    )
    assert [p.problem_id for p in load(path).problems] == ["arr-0", "arr-1"]


def test_relative_path_resolves_from_cwd(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", [{"question": "a?", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    ds = load("rel.jsonl")
    assert ds.source == str(tmp_path.resolve() / "rel.jsonl") and len(ds.problems) == 1


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "quiz.csv"
    pd.DataFrame(
        {"Prompt": ["2+2?", "3+3?"], "Gold": [4, 6], "uid": ["007", "008"], "src": ["x", "y"]}
    ).to_csv(path, index=False)
    ds = load(path, question_field="Prompt", answer_field="Gold", id_field="uid")
    assert [(p.problem_id, p.question, p.gold, p.meta) for p in ds.problems] == [
        ("007", "2+2?", "4", {"src": "x"}),
        ("008", "3+3?", "6", {"src": "y"}),
    ]


def test_parquet_with_column_mapping(tmp_path):
    path = tmp_path / "quiz.parquet"
    pd.DataFrame({"text": ["2+2?", "3+3?"], "label": [4, 6], "level": [1, 2]}).to_parquet(path)
    ds = load(path, question_field="text", answer_field="label")
    assert [(p.problem_id, p.question, p.gold, p.meta) for p in ds.problems] == [
        ("quiz-0", "2+2?", "4", {"level": 1}),
        ("quiz-1", "3+3?", "6", {"level": 2}),
    ]
    json.dumps(ds.problems[0].meta)


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load("hf:openai/gsm8k:main")


def test_hf_dataset_is_loaded_with_the_configured_split(monkeypatch):
    calls = []

    class FakeSplit(list):
        column_names = ["problem", "solution"]

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeSplit([{"problem": "a?", "solution": "1"}, {"problem": "b?", "solution": "2"}])

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset)
    )
    ds = load(
        "hf:org/quiz:cfg",
        dataset_split="validation",
        question_field="problem",
        answer_field="solution",
    )
    assert calls == [("org/quiz", "cfg", "validation")]
    assert (ds.name, ds.source, ds.digest) == ("org/quiz", "hf:org/quiz:cfg", "")
    assert [(p.problem_id, p.gold) for p in ds.problems] == [("quiz-0", "1"), ("quiz-1", "2")]


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(DataError, match=r"gsm8k, math500, aime2024.*\.jsonl.*\.parquet.*\.csv"):
        load("gsm9k")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load(other)


# ------------------------------------------------------------------------------------------
# Malformed input: strict raises naming file, place and field; skip_bad_rows counts


GOOD = {"question": "ok?", "answer": "1"}

# name -> (bad row, expected message fragment). The bad row is line 2 of the file.
BAD_JSONL_ROWS = {
    "bad_json": ('{"question": "x", "answer": ', "line 2: not valid JSON"),
    "not_object": ("[1, 2]", "line 2: expected a JSON object, got list"),
    "missing_question": ({"answer": "1"}, "line 2: field 'question' is missing"),
    "missing_answer": ({"question": "x?"}, "line 2: field 'answer' is missing"),
    "null_answer": ({"question": "x?", "answer": None}, "line 2: field 'answer' is missing"),
    "empty_question": ({"question": "", "answer": "1"}, "line 2: field 'question' is empty"),
    "blank_question": ({"question": " \n\t", "answer": "1"}, "line 2: field 'question' is empty"),
    "number_question": (
        {"question": 7, "answer": "1"},
        "line 2: field 'question' must be a string",
    ),
    "list_answer": (
        {"question": "x?", "answer": [1]},
        "line 2: field 'answer' must be a string or",
    ),
}


@pytest.mark.parametrize("case", list(BAD_JSONL_ROWS))
def test_malformed_jsonl_row(tmp_path, case):
    bad, fragment = BAD_JSONL_ROWS[case]
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value).startswith(f"{path} line 2: ")
    assert fragment in str(err.value)
    assert err.value.where == "line 2"

    ds = load(path, skip_bad_rows=True)
    assert (ds.total_rows, ds.skipped_rows) == (3, 1)
    assert [p.problem_id for p in ds.problems] == ["x-0", "x-2"]  # row indices are not shifted
    assert len(ds.skipped) == 1 and fragment in ds.skipped[0]


def test_duplicate_ids_keep_the_first(tmp_path):
    rows = [
        {"id": "a", "question": "first?", "answer": "1"},
        {"id": "b", "question": "b?", "answer": "2"},
        {"id": "a", "question": "again?", "answer": "3"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DataError, match=r"line 3: field 'id': duplicate problem id 'a' \(first at line 1\)"
    ):
        load(path, id_field="id")
    ds = load(path, id_field="id", skip_bad_rows=True)
    assert ds.skipped_rows == 1
    assert [(p.problem_id, p.question) for p in ds.problems] == [("a", "first?"), ("b", "b?")]


@pytest.mark.parametrize("skip", [False, True])
def test_empty_and_missing_files_always_raise(tmp_path, skip):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load(empty, skip_bad_rows=skip)
    with pytest.raises(DataError, match=r"absent\.csv: file not found"):
        load(tmp_path / "absent.csv", skip_bad_rows=skip)


def test_all_rows_bad_raises_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x"}, {"q": "y"}])
    with pytest.raises(DataError, match=r"no usable rows \(2 skipped\)"):
        load(path, skip_bad_rows=True)


def test_gsm8k_style_label_missing_names_the_field(monkeypatch, tmp_path):
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "q?", "answer": "no label"}])
    monkeypatch.setattr("pipeline.data.DATA_DIR", tmp_path)
    with pytest.raises(DataError, match=r"line 1: field 'answer' has no '####' label"):
        load("gsm8k")


def test_csv_errors_count_the_header_as_line_one(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"question": ["a?", "b?", "c?", None], "answer": ["1", None, "3", "4"]}).to_csv(
        path, index=False
    )
    with pytest.raises(DataError, match=r"c\.csv line 3: field 'answer' is missing"):
        load(path)
    ds = load(path, skip_bad_rows=True)
    assert (ds.total_rows, ds.skipped_rows) == (4, 2)
    assert [p.problem_id for p in ds.problems] == ["c-0", "c-2"]
    assert "line 5: field 'question' is missing" in ds.skipped[1]


def test_csv_missing_column_lists_columns(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"Prompt": ["a?"], "answer": ["1"]}).to_csv(path, index=False)
    for skip in (False, True):
        with pytest.raises(
            DataError, match=r"line 1: field 'question' is missing \(columns: Prompt, answer\)"
        ):
            load(path, skip_bad_rows=skip)


def test_parquet_errors_name_the_row_index(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"question": ["a?", "b?", "c?"], "answer": [1.0, float("nan"), 3.0]}).to_parquet(
        path
    )
    with pytest.raises(DataError, match=r"p\.parquet row 1: field 'answer' is missing"):
        load(path)
    ds = load(path, skip_bad_rows=True)
    assert [(p.problem_id, p.gold) for p in ds.problems] == [("p-0", "1"), ("p-2", "3")]

    numbers = tmp_path / "n.parquet"
    pd.DataFrame({"question": [1, 2], "answer": ["1", "2"]}).to_parquet(numbers)
    with pytest.raises(
        DataError, match=r"n\.parquet row 0: field 'question' must be a string, got int"
    ):
        load(numbers)


# ------------------------------------------------------------------------------------------
# Text that cannot be encoded, and the problems' content digest

SURROGATE_LINE = '{"question": "What is 1+1? \\ud800", "answer": "2"}'


def test_a_lone_surrogate_in_jsonl_is_refused_with_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "ok?", "answer": "1"}, SURROGATE_LINE])
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'question' .*UTF-8") as err:
        load(path)
    assert (err.value.where, err.value.field) == ("line 2", "question")
    assert len(load(path, skip_bad_rows=True).problems) == 1


@pytest.mark.parametrize("field", ["question", "answer", "id", "topic"])
def test_a_lone_surrogate_in_any_kept_field_of_a_json_array_is_refused(tmp_path, field):
    row = {"question": "q", "answer": "2", "id": "a", "topic": "algebra"}
    row[field] += "\ud800"
    path = tmp_path / "d.json"
    path.write_text(json.dumps([row]))  # json.dumps escapes the surrogate as \ud800
    with pytest.raises(DataError, match=rf"row 0: field '{field}' .*surrogate"):
        load(path, id_field="id")


def test_a_lone_surrogate_in_a_hugging_face_row_is_refused(monkeypatch):
    rows = [{"question": "q\udfff", "answer": "1"}]
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"hf:x/y row 0: field 'question'"):
        load("hf:x/y")


def test_the_content_digest_names_the_problems_not_the_file(tmp_path, monkeypatch):
    rows = [{"question": "What is 2+2?", "answer": "4"}]
    a = load(write_jsonl(tmp_path / "d.jsonl", rows))
    b = load(write_jsonl(tmp_path / "e.jsonl", rows))  # other id prefix: other ids
    (tmp_path / "d2").mkdir()
    c_path = tmp_path / "d2" / "d.jsonl"
    c_path.write_text(json.dumps(rows[0], indent=None, separators=(",", ":")) + "\n\n")
    c = load(c_path)
    assert a.digest != c.digest and a.content_digest == c.content_digest  # bytes differ
    assert a.content_digest != b.content_digest
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    hf = load("hf:org/d", limit=1)
    assert hf.digest == "" and len(hf.content_digest) == 64
