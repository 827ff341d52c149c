"""Per-problem records: the Parquet schema, atomic shards, resume and compaction.

A run directory `<output_dir>/<run_id>/` holds, beside its own files (`pipeline.run.rundir`:
config.yaml, inputs.yaml, invocations.jsonl, driver.lock),

    problems/part-<shard>.parquet   one row per (problem, method)       PROBLEM_SCHEMA
    iterations/part-<shard>.parquet one row per answer: iteration 0 is  ITERATION_SCHEMA
                                    the CoT answer, k >= 1 the answer after latent step k

`RecordStore.write` adds one shard pair for a batch of results. The iteration shard is
written first and the problem shard last: the problem shard is the commit point, so a
(problem, method) is done exactly when a problem row for it exists, and an iteration shard
without its problem shard (a crash between the two writes) is an orphan that readers skip and
`cleanup` deletes. Each file is written under a hidden temporary name in the same directory
(`.part-<shard>.parquet.<uuid>.tmp`, which Parquet readers skip) and then `os.replace`d, so
no reader ever sees half a file.

A (problem, method) has one row, with one exception: a row recorded with an error may be
superseded by a later row of the same key (a resume retries it, `Config.retry_errors`). Shard
names sort in the order they were written (`RecordStore.write` names each new shard after every
shard present, whatever the clock says), and readers keep the row of the newest shard and the
iteration rows of that shard only; `compact` drops the superseded rows. Any other repeat (a key
whose superseded row has no error) is a `DuplicateRecordError`.

`compact` merges every committed shard into one shard pair per dataset. The new problem files
carry, in their Parquet metadata, the compaction they belong to, how many files it has and
which shards it supersedes; readers honour a compaction only once all of its problem files
exist (the last one to land is the commit point) and then skip the superseded shards, so a
crash at any moment of a compaction leaves a readable, duplicate-free store.

Writers never run concurrently with `cleanup` or `compact`: call those from the driver when
no worker is writing (on resume, and at the end of a run), while it holds the run directory's
lock (`pipeline.run.rundir.hold_run_dir`).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.method.results import ProblemResult

if TYPE_CHECKING:
    pass

Key = tuple[str, str]  # (problem_id, method)

PROBLEMS = "problems"
ITERATIONS = "iterations"
_SHARD_RE = re.compile(r"^part-[0-9A-Za-z_.-]+\.parquet$")
_META_KEY = b"latentseek.compaction"


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


PROBLEM_SCHEMA = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("problem_id", pa.string()),
        _req("dataset", pa.string()),
        _req("method", pa.string()),
        _req("model", pa.string()),
        # Where it ran: "cpu", "cuda", "cuda:0"; "float32", "bfloat16". "" for a problem that
        # failed outside the model; null in records written before these columns existed.
        _opt("device", pa.string()),
        _opt("dtype", pa.string()),
        _req("question", pa.string()),
        _req("gold", pa.string()),
        _req("cot_answer", pa.string()),
        _req("final_answer", pa.string()),
        _opt("final_extracted", pa.string()),  # null when no answer could be extracted
        _req("cot_correct", pa.bool_()),
        _req("final_correct", pa.bool_()),
        _opt("initial_reward", pa.float64()),  # r0; null for methods without a reward
        _req("rewards", pa.list_(pa.float64())),  # reward after every latent iteration
        # The reward of the returned answer (the last, or the best with return_best, or BoN's
        # pick); null without a reward, and in records written before this column existed.
        _opt("final_reward", pa.float64()),
        _req("iterations", pa.int64()),
        _req("update_length", pa.int64()),  # U
        _req("cot_length", pa.int64()),  # T
        _req("final_length", pa.int64()),
        _req("stop_reason", pa.string()),
        _req("solver_tokens", pa.int64()),
        _req("verifier_tokens", pa.int64()),
        _req("solver_prompt_tokens", pa.int64()),
        _req("solver_generated_tokens", pa.int64()),
        _req("verifier_prompt_tokens", pa.int64()),
        _req("verifier_generated_tokens", pa.int64()),
        _req("forward_calls", pa.int64()),
        _req("flops", pa.float64()),
        _req("wall_seconds", pa.float64()),
        _req("unparsed_verdicts", pa.int64()),
        # The worst of the problem's grades: ok, timeout (math-verify did not decide in time: the
        # answer counts as wrong) or error; null in records written before this column existed.
        _opt("grade_status", pa.string()),
        # Captured positions (LatentSeek's CoT) whose z_t does not predict the CoT's token there
        # (argmax(head(z_t)) != x_t; 0 expected); null when nothing was captured, and in records
        # written before this column existed.
        _opt("capture_mismatch", pa.int64()),
        _req("worker", pa.string()),
        _req("attempts", pa.int64()),
        _req("error", pa.string()),  # "" when the problem ran to completion
        # Whose fault the error is: "problem" (its own: it raised, could not be recorded, killed
        # its worker) or "infra" (the workers could not run it); "" without an error; null in
        # records written before this column existed.
        _opt("error_kind", pa.string()),
        _req("samples", pa.list_(pa.string())),  # bon / sc: the N sampled answers
        _req("sample_rewards", pa.list_(pa.float64())),  # bon: the reward of each sample
        # Sampling methods: whether each sample is correct, and (sc) each sample's group of
        # equivalent answers (-1: no answer), so that analysis can score n <= N samples from
        # the records alone. Null in records written before these columns existed.
        _opt("sample_correct", pa.list_(pa.bool_())),
        _opt("sample_groups", pa.list_(pa.int64())),
    ]
)

ITERATION_SCHEMA = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("problem_id", pa.string()),
        _req("method", pa.string()),
        _req("iteration", pa.int64()),  # 0 = the CoT (first) answer
        _opt("reward", pa.float64()),  # iteration 0: initial_reward, which may be null
        _req("answer", pa.string()),
        _req("correct", pa.bool_()),
        _req("tokens", pa.int64()),
        _opt("loss", pa.float64()),  # null at iteration 0
        _opt("grad_norm", pa.float64()),
        _opt("tokens_changed", pa.int64()),
        _opt("mean_logprob", pa.float64()),
        _req("dataset", pa.string()),
    ]
)

PROBLEM_KEY = ["problem_id", "method"]
ITERATION_KEY = ["problem_id", "method", "iteration"]
_KEY_ERROR = [*PROBLEM_KEY, "error"]
_SHARD = "__shard"  # a read's column: the shard file each row came from


class DuplicateRecordError(RuntimeError):
    """The same (problem_id, method) is committed more than once (other than a row with an
    error superseded by a later one); the store needs a look."""


# ------------------------------------------------------------------------------------------
# Rows


def problem_row(result: ProblemResult, run_id: str, model: str, worker: str, attempts: int) -> dict:
    """The PROBLEM_SCHEMA row of one result."""
    c = result.compute
    return {
        "run_id": run_id,
        "problem_id": str(result.problem_id),
        "dataset": result.dataset,
        "method": result.method,
        "model": model,
        "device": result.device,
        "dtype": result.dtype,
        "question": result.question,
        "gold": str(result.gold),
        "cot_answer": result.cot_answer,
        "final_answer": result.final_answer,
        "final_extracted": result.final_extracted,
        "cot_correct": bool(result.cot_correct),
        "final_correct": bool(result.final_correct),
        "initial_reward": _float_or_none(result.initial_reward),
        "rewards": [float(r) for r in result.rewards],
        "final_reward": _float_or_none(result.final_reward),
        "iterations": int(result.iterations),
        "update_length": int(result.update_length),
        "cot_length": int(result.cot_length),
        "final_length": int(result.final_length),
        "stop_reason": result.stop_reason,
        "solver_tokens": int(c.solver_tokens),
        "verifier_tokens": int(c.verifier_tokens),
        "solver_prompt_tokens": int(c.solver_prompt_tokens),
        "solver_generated_tokens": int(c.solver_generated_tokens),
        "verifier_prompt_tokens": int(c.verifier_prompt_tokens),
        "verifier_generated_tokens": int(c.verifier_generated_tokens),
        "forward_calls": int(c.forward_calls),
        "flops": float(c.flops),
        "wall_seconds": float(c.wall_seconds),
        "unparsed_verdicts": int(result.unparsed_verdicts),
        "grade_status": result.grade_status,
        "capture_mismatch": result.capture_mismatch,
        "worker": worker,
        "attempts": int(attempts),
        "error": result.error,
        "error_kind": result.error_kind or ("problem" if result.error else ""),
        "samples": list(result.samples),
        "sample_rewards": [float(r) for r in result.sample_rewards],
        "sample_correct": [bool(c) for c in result.sample_correct],
        "sample_groups": [int(g) for g in result.sample_groups],
    }


def iteration_rows(result: ProblemResult, run_id: str) -> list[dict]:
    """ITERATION_SCHEMA rows: iteration 0 is the CoT answer, then one per IterationStats."""
    base = {"run_id": run_id, "problem_id": str(result.problem_id), "method": result.method}
    rows = [
        {
            **base,
            "iteration": 0,
            "reward": _float_or_none(result.initial_reward),
            "answer": result.cot_answer,
            "correct": bool(result.cot_correct),
            "tokens": int(result.cot_length),
            "loss": None,
            "grad_norm": None,
            "tokens_changed": None,
            "mean_logprob": None,
            "dataset": result.dataset,
        }
    ]
    for k, s in enumerate(result.iteration_stats, start=1):
        rows.append(
            {
                **base,
                "iteration": k,
                "reward": _float_or_none(s.reward),
                "answer": s.answer,
                "correct": bool(s.correct),
                "tokens": int(s.tokens),
                "loss": _float_or_none(s.loss),
                "grad_norm": _float_or_none(s.grad_norm),
                "tokens_changed": None if s.tokens_changed is None else int(s.tokens_changed),
                "mean_logprob": _float_or_none(s.mean_logprob),
                "dataset": result.dataset,
            }
        )
    return rows


def encodable(result: ProblemResult) -> ProblemResult:
    """`result` if its rows can be written, else the problem recorded with that error
    (error_kind "problem"): text that Parquet cannot encode (a lone surrogate in an answer or a
    question) must cost its own problem, never the shard of the problems written with it, nor
    the run (a resume would meet it again)."""
    try:
        _table([problem_row(result, "", "", "", 1)], PROBLEM_SCHEMA)
        _table(iteration_rows(result, ""), ITERATION_SCHEMA)
        return result
    except (pa.ArrowException, UnicodeError) as exc:
        why = " ".join(str(exc).split())[:300]

        def escaped(text: str) -> str:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")

        return ProblemResult(
            problem_id=result.problem_id,
            dataset=result.dataset,
            method=result.method,
            question=escaped(result.question),
            gold=escaped(str(result.gold)),
            stop_reason="error",
            device=result.device,
            dtype=result.dtype,
            error=f"UnencodableResult: the result cannot be written ({type(exc).__name__}: "
            f"{escaped(why)})",
            error_kind="problem",
        )


def _float_or_none(x: float | None) -> float | None:
    return None if x is None else float(x)


def new_shard_id() -> str:
    """A sortable, unique shard id: nanoseconds since the epoch, then random hex."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def _tmp_name(path: Path) -> Path:
    # Hidden (leading '.') so that pandas/pyarrow/Spark directory readers skip it.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=schema)
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise ValueError(f"record column {f.name!r} may not be null")
    return table


def _typed(df: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Nullable integer columns keep one dtype whether or not this read holds a null."""
    for f in schema:
        if f.nullable and pa.types.is_integer(f.type):
            df[f.name] = df[f.name].astype("Int64")
    return df


@dataclass(frozen=True)
class _Compaction:
    group: str
    files: int
    supersedes: frozenset[str]


def _compaction_of(path: Path) -> _Compaction | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_KEY)
    if raw is None:
        return None
    info = json.loads(raw)
    return _Compaction(info["group"], int(info["files"]), frozenset(info["supersedes"]))


# ------------------------------------------------------------------------------------------
# The store


class RecordStore:
    """The Parquet records of one run directory (see the module docstring for the layout)."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.problems_dir = self.run_dir / PROBLEMS
        self.iterations_dir = self.run_dir / ITERATIONS

    # --- writing ---------------------------------------------------------------------------
    def write(
        self,
        results: Sequence[ProblemResult],
        run_id: str,
        model: str,
        worker: str | Sequence[str],
        attempts: dict[Key, int] | None = None,
    ) -> None:
        """Commit one shard pair holding `results` (iterations first, the problem shard last);
        `worker` names the worker of every result, or of each."""
        if not results:
            return
        keys = [(str(r.problem_id), r.method) for r in results]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"one batch holds the same (problem_id, method) twice: {dup[:5]}")
        attempts = attempts or {}
        workers = [worker] * len(results) if isinstance(worker, str) else list(worker)
        problems = _table(
            [
                problem_row(r, run_id, model, w, attempts.get(k, 1))
                for r, k, w in zip(results, keys, workers, strict=True)
            ],
            PROBLEM_SCHEMA,
        )
        iterations = _table(
            [row for r in results for row in iteration_rows(r, run_id)], ITERATION_SCHEMA
        )
        self._write_pair(self._next_name(), problems, iterations)

    def _next_name(self) -> str:
        """A new shard's name, sorting after every shard present: the newest row of a key is
        the one that counts, so a clock set back must not file a retry before what it retries."""
        sid = new_shard_id()
        last = max((p.name for p in self._shards(self.problems_dir)), default="")
        if f"part-{sid}.parquet" <= last:
            ns = int(last.removeprefix("part-").split("-", 1)[0]) + 1
            sid = f"{ns:020d}-{uuid.uuid4().hex[:12]}"
        return f"part-{sid}.parquet"

    def _write_pair(
        self, name: str, problems: pa.Table, iterations: pa.Table, metadata: dict | None = None
    ) -> None:
        self.problems_dir.mkdir(parents=True, exist_ok=True)
        self.iterations_dir.mkdir(parents=True, exist_ok=True)
        if metadata is not None:
            problems = problems.replace_schema_metadata({_META_KEY: json.dumps(metadata)})
        _write_atomic(iterations, self.iterations_dir / name)
        _write_atomic(problems, self.problems_dir / name)  # the commit point

    # --- which files count -------------------------------------------------------------------
    def _shards(self, directory: Path) -> list[Path]:
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if _SHARD_RE.match(p.name))

    def _committed_names(self) -> list[str]:
        """Problem shard names that readers use: present, not superseded, not half-compacted."""
        files = self._shards(self.problems_dir)
        comps = {p.name: _compaction_of(p) for p in files}
        present: dict[str, int] = {}
        for c in comps.values():
            if c is not None:
                present[c.group] = present.get(c.group, 0) + 1
        complete = {
            c.group for c in comps.values() if c is not None and present[c.group] >= c.files
        }
        superseded: set[str] = set()
        for c in comps.values():
            if c is not None and c.group in complete:
                superseded |= c.supersedes
        return [
            name
            for name, c in comps.items()
            if name not in superseded and (c is None or c.group in complete)
        ]

    def committed_files(self) -> tuple[list[Path], list[Path]]:
        """(problem shards, iteration shards) that readers use, e.g. to copy or upload."""
        names = self._committed_names()
        keep = set(names)
        problems = [self.problems_dir / n for n in names]
        iterations = [p for p in self._shards(self.iterations_dir) if p.name in keep]
        return problems, iterations

    # --- reading ---------------------------------------------------------------------------
    def completed(self, include_errors: bool = False) -> set[Key]:
        """(problem_id, method) pairs whose committed row counts as done: ran without an error
        (`include_errors=True`: any row, failed ones too)."""
        rows = self._newest(self._read(self.committed_files()[0], PROBLEM_SCHEMA, _KEY_ERROR))
        if not include_errors:
            rows = rows[rows["error"] == ""]
        return set(zip(rows["problem_id"], rows["method"], strict=True))

    def failed(self) -> set[Key]:
        """(problem_id, method) pairs whose committed row records an error (a resume with
        `retry_errors` runs them again)."""
        rows = self._newest(self._read(self.committed_files()[0], PROBLEM_SCHEMA, _KEY_ERROR))
        rows = rows[rows["error"] != ""]
        return set(zip(rows["problem_id"], rows["method"], strict=True))

    def read_problems(self) -> pd.DataFrame:
        """Every committed problem row that counts (PROBLEM_SCHEMA dtypes, also when empty): per
        (problem_id, method) the newest, which supersedes an older row with an error.

        Raises DuplicateRecordError if a (problem_id, method) is committed more than once
        otherwise."""
        df = self._newest(self._read(self.committed_files()[0], PROBLEM_SCHEMA))
        return _typed(df.drop(columns=_SHARD), PROBLEM_SCHEMA)

    def distinct(self, column: str) -> set:
        """The distinct non-null values of a problem column over the committed rows (superseded
        rows included)."""
        files = self.committed_files()[0]
        if not files:
            return set()
        field = PROBLEM_SCHEMA.field(column)
        df = pd.read_parquet([str(p) for p in files], columns=[column], schema=pa.schema([field]))
        return set(df[column].dropna().unique())

    def read_iterations(self) -> pd.DataFrame:
        """Iteration rows of the problem rows that count (`read_problems`): orphans of a crash
        and the iterations of a superseded row are skipped."""
        problems, iterations = self.committed_files()
        winners = self._newest(self._read(problems, PROBLEM_SCHEMA, _KEY_ERROR))
        rows = self._read(iterations, ITERATION_SCHEMA)
        rows = rows.merge(winners[[*PROBLEM_KEY, _SHARD]], on=[*PROBLEM_KEY, _SHARD])
        return _typed(rows.drop(columns=_SHARD), ITERATION_SCHEMA)

    @staticmethod
    def _read(files: list[Path], schema: pa.Schema, columns: list[str] | None = None):
        """The rows of `files` in shard order, with each row's shard name in column `_SHARD`."""
        names = columns or schema.names
        tables = []
        for path in sorted(files, key=lambda p: p.name):
            table = pq.read_table(path, schema=schema, columns=names)
            shard = pa.array([path.name] * table.num_rows, pa.string())
            tables.append(table.append_column(_SHARD, shard))
        if not tables:
            empty = pa.schema([schema.field(n) for n in names]).empty_table()
            tables.append(empty.append_column(_SHARD, pa.array([], pa.string())))
        return pa.concat_tables(tables).to_pandas()

    def _newest(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The newest row of each key (`rows` in shard order); DuplicateRecordError if a row
        that is superseded has no error (only a failed row is ever recorded again)."""
        superseded = rows.duplicated(PROBLEM_KEY, keep="last")
        bad = superseded & (rows["error"] == "")
        if bad.any():
            keys = sorted(
                set(zip(rows.loc[bad, "problem_id"], rows.loc[bad, "method"], strict=True))
            )
            files = sorted(set(rows.loc[rows.set_index(PROBLEM_KEY).index.isin(keys), _SHARD]))
            raise DuplicateRecordError(
                f"{self.problems_dir}: {len(keys)} (problem_id, method) pair(s) are committed "
                f"more than once, e.g. {keys[:5]} in {files[:10]}; remove the extra shard(s) by "
                "hand before reading or compacting"
            )
        return rows[~superseded].reset_index(drop=True)

    # --- maintenance -----------------------------------------------------------------------
    def cleanup(self) -> list[Path]:
        """Delete temporary files, orphan iteration shards and superseded shards.

        Call on resume, before any worker writes. Returns the deleted paths.
        """
        removed: list[Path] = []
        for d in (self.problems_dir, self.iterations_dir):
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(".") and p.name.endswith(".tmp"):
                        p.unlink(missing_ok=True)
                        removed.append(p)
        committed = set(self._committed_names())
        # Everything not committed is invisible to readers already, so the order is free.
        for d in (self.problems_dir, self.iterations_dir):
            for p in self._shards(d):
                if p.name not in committed:
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def compact(self) -> list[Path]:
        """Merge every committed shard into one shard pair per dataset; returns the new files.

        Atomic: readers see either the old shards or the compacted files, never both nor a mix.
        """
        self.cleanup()
        names = self._committed_names()
        if not names:
            return []
        # Supersede every shard present, not only the committed ones, so that leftovers of an
        # interrupted earlier compaction can never reappear next to this one.
        present = [p.name for p in self._shards(self.problems_dir)]
        problems = self.read_problems()  # raises on duplicates: never compact those away
        groups = {_compaction_of(self.problems_dir / n) for n in names}
        if len(groups) == 1 and None not in groups:
            return [self.problems_dir / n for n in names]  # already compact
        iterations = self.read_iterations()
        datasets = sorted(problems["dataset"].unique())
        group = new_shard_id()
        meta = {"group": group, "files": len(datasets), "supersedes": sorted(present)}
        written = []
        for ds in datasets:
            p = problems[problems["dataset"] == ds].sort_values(PROBLEM_KEY)
            it = iterations[iterations["dataset"] == ds].sort_values(ITERATION_KEY)
            name = f"part-{group}-{_safe(ds)}.parquet"
            self._write_pair(
                name,
                pa.Table.from_pandas(p, schema=PROBLEM_SCHEMA, preserve_index=False),
                pa.Table.from_pandas(it, schema=ITERATION_SCHEMA, preserve_index=False),
                metadata=meta,
            )
            written.append(self.problems_dir / name)
        self.cleanup()
        return written


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", name)[:80] or "dataset"


def read_records(path: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(problems, iterations) of a run directory."""
    store = RecordStore(path)
    return store.read_problems(), store.read_iterations()


__all__ = [
    "ITERATION_SCHEMA",
    "PROBLEM_SCHEMA",
    "DuplicateRecordError",
    "RecordStore",
    "iteration_rows",
    "problem_row",
    "read_records",
]
