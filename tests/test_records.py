"""Parquet records (pipeline.run.records) and the analysis tables that read them.

The hand-built run used throughout (method latentseek unless noted):

    p1  iterations 2: CoT wrong, k=1 wrong, k=2 right; final right; r0 -0.8, rewards [-0.5, -0.1]
    p2  iterations 0: CoT right, accepted;               final right; r0 -0.1
    p3  iterations 1: CoT right, k=1 wrong;              final wrong; r0 -0.9, rewards [-0.6]
    p4  failed before answering (error set, all defaults)
    p1  with method cot: wrong, no reward
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import hold_in_child

from analysis.tables import accuracy_by_iteration, load_run, markdown, summary_table
from pipeline.config import Config
from pipeline.method.results import Compute, IterationStats, ProblemResult
from pipeline.run import records
from pipeline.run.records import (
    ITERATION_SCHEMA,
    PROBLEM_SCHEMA,
    DuplicateRecordError,
    RecordStore,
    iteration_rows,
    problem_row,
)
from pipeline.run.rundir import (
    INVOCATIONS_FILE,
    RunDirError,
    append_invocation,
    hold_run_dir,
    read_invocations,
    run_dir,
    write_config,
)

RUN = "run-1"
MODEL = "tiny"


def _stats(k: int, reward: float, correct: bool) -> IterationStats:
    return IterationStats(
        iteration=k,
        reward=reward,
        answer=f"answer {k}",
        correct=correct,
        tokens=10 + k,
        loss=0.5 / k,
        grad_norm=1.0 * k,
        tokens_changed=k,
        mean_logprob=-0.1 * k,
    )


def make_results(dataset: str = "gsm8k", prefix: str = "") -> list[ProblemResult]:
    """The run above; `prefix` keeps problem ids of a second dataset distinct."""
    p1 = ProblemResult(
        problem_id="p1", dataset=dataset, method="latentseek", question="1+1?", gold="2",
        cot_answer="3", final_answer="\\boxed{2}", final_extracted="2",
        cot_correct=False, final_correct=True, initial_reward=-0.8, rewards=[-0.5, -0.1],
        iterations=2, update_length=4, cot_length=40, final_length=12, stop_reason="threshold",
        iteration_stats=[_stats(1, -0.5, False), _stats(2, -0.1, True)],
        compute=Compute(100, 50, 30, 20, forward_calls=7, flops=1e9, wall_seconds=2.0),
        device="cuda:0", dtype="bfloat16", capture_mismatch=0,
    )  # fmt: skip
    p2 = ProblemResult(
        problem_id="p2", dataset=dataset, method="latentseek", question="2+2?", gold="4",
        cot_answer="4", final_answer="4", final_extracted="4", cot_correct=True,
        final_correct=True, initial_reward=-0.1, stop_reason="cot_accepted",
        compute=Compute(wall_seconds=1.0),
    )  # fmt: skip
    p3 = ProblemResult(
        problem_id="p3", dataset=dataset, method="latentseek", question="3+3?", gold="6",
        cot_answer="6", final_answer="7", final_extracted="7", cot_correct=True,
        final_correct=False, initial_reward=-0.9, rewards=[-0.6], iterations=1,
        stop_reason="max_iters", iteration_stats=[_stats(1, -0.6, False)],
        compute=Compute(wall_seconds=1.0), capture_mismatch=2,
    )  # fmt: skip
    p4 = ProblemResult(
        problem_id="p4", dataset=dataset, method="latentseek", question="?", gold="0",
        stop_reason="error", error="RuntimeError: boom",
    )  # fmt: skip
    cot = ProblemResult(
        problem_id="p1", dataset=dataset, method="cot", question="1+1?", gold="2",
        cot_answer="3", final_answer="3", final_extracted=None,
    )  # fmt: skip
    results = [p1, p2, p3, p4, cot]
    for r in results:
        r.problem_id = prefix + r.problem_id
    return results


@pytest.fixture
def store(tmp_path) -> RecordStore:
    s = RecordStore(tmp_path / RUN)
    results = make_results()
    s.write(results[:2], RUN, MODEL, worker="w0", attempts={("p1", "latentseek"): 2})
    s.write(results[2:], RUN, MODEL, worker="w1")
    return s


# --- rows and schema -----------------------------------------------------------------------


def test_problem_row_follows_the_schema_order():
    row = problem_row(make_results()[0], RUN, MODEL, "w0", 1)
    assert list(row) == PROBLEM_SCHEMA.names
    assert PROBLEM_SCHEMA.names[:3] == ["run_id", "problem_id", "dataset"]
    assert PROBLEM_SCHEMA.names.index("error") < PROBLEM_SCHEMA.names.index("samples")
    assert row["solver_tokens"] == 150 and row["verifier_tokens"] == 50


def test_iteration_zero_is_the_cot_answer():
    rows = iteration_rows(make_results()[0], RUN)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert list(rows[0]) == ITERATION_SCHEMA.names
    zero = rows[0]
    assert (zero["answer"], zero["correct"], zero["tokens"]) == ("3", False, 40)
    assert zero["reward"] == -0.8
    assert zero["loss"] is None and zero["grad_norm"] is None and zero["tokens_changed"] is None
    assert (rows[2]["answer"], rows[2]["correct"], rows[2]["reward"]) == ("answer 2", True, -0.1)
    # no reward at all (cot): iteration 0 keeps a null reward
    assert iteration_rows(make_results()[4], RUN)[0]["reward"] is None


def test_roundtrip_keeps_values_and_types(store):
    problems = store.read_problems()
    iterations = store.read_iterations()
    assert len(problems) == 5 and len(iterations) == 3 + 1 + 2 + 1 + 1
    p1 = problems.set_index(["problem_id", "method"]).loc[("p1", "latentseek")]
    assert list(p1["rewards"]) == [-0.5, -0.1]
    assert p1["attempts"] == 2 and p1["worker"] == "w0" and p1["model"] == MODEL
    assert p1["flops"] == 1e9 and p1["solver_prompt_tokens"] == 100
    assert (p1["device"], p1["dtype"]) == ("cuda:0", "bfloat16")
    p4 = problems.set_index(["problem_id", "method"]).loc[("p4", "latentseek")]
    assert p4["error"] == "RuntimeError: boom" and p4["attempts"] == 1
    cot = problems.set_index(["problem_id", "method"]).loc[("p1", "cot")]
    assert math.isnan(cot["initial_reward"]) and pd.isna(cot["final_extracted"])
    assert pd.api.types.is_bool_dtype(problems["final_correct"])
    assert str(iterations["tokens_changed"].dtype) == "Int64"

    # the files themselves carry the explicit schema
    files = sorted((store.run_dir / "problems").glob("part-*.parquet"))
    schema = pq.read_schema(files[0])
    assert schema.field("rewards").type == pa.list_(pa.float64())
    assert schema.field("initial_reward").nullable
    assert not schema.field("problem_id").nullable
    assert pq.read_schema(sorted((store.run_dir / "iterations").glob("*.parquet"))[0]).equals(
        ITERATION_SCHEMA
    )


def test_empty_store_reads_typed_frames(tmp_path):
    s = RecordStore(tmp_path / "nothing")
    problems, iterations = s.read_problems(), s.read_iterations()
    assert problems.empty and list(problems.columns) == PROBLEM_SCHEMA.names
    assert list(iterations.columns) == ITERATION_SCHEMA.names
    assert problems["iterations"].dtype == "int64" and problems["flops"].dtype == "float64"
    assert s.completed() == set()
    s.write([], RUN, MODEL, "w0")  # an empty batch writes nothing
    assert not (tmp_path / "nothing").exists()


def test_null_in_a_required_column_is_refused(tmp_path):
    bad = make_results()[1]
    bad.cot_answer = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="cot_answer"):
        RecordStore(tmp_path).write([bad], RUN, MODEL, "w0")


def test_completed_keys(store):
    # p4 was recorded with an error: not done (a resume retries it) unless errors count
    done = {("p1", "latentseek"), ("p2", "latentseek"), ("p3", "latentseek"), ("p1", "cot")}
    assert store.completed() == done
    assert store.completed(include_errors=True) == done | {("p4", "latentseek")}
    assert store.failed() == {("p4", "latentseek")}


def test_shard_names_sort_by_write_time(store):
    names = [p.name for p in sorted((store.run_dir / "problems").iterdir())]
    assert len(names) == 2 and all(n.startswith("part-") for n in names)
    first = pq.read_table(store.run_dir / "problems" / names[0]).column("problem_id").to_pylist()
    assert first == ["p1", "p2"]


# --- atomicity and resume ------------------------------------------------------------------


def test_crash_between_the_two_writes_leaves_an_ignored_orphan(store, monkeypatch):
    before = store.read_iterations()
    real = records._write_atomic

    def crash_on_commit(table, path):
        if path.parent.name == "problems":
            raise KeyboardInterrupt("killed")
        real(table, path)

    monkeypatch.setattr(records, "_write_atomic", crash_on_commit)
    extra = ProblemResult(
        problem_id="p9", dataset="gsm8k", method="latentseek", question="?", gold="1"
    )
    with pytest.raises(KeyboardInterrupt):
        store.write([extra], RUN, MODEL, "w0")
    monkeypatch.undo()
    # a leftover temporary file, as a kill during a write leaves it
    leftover = store.run_dir / "problems" / ".part-x.parquet.1234abcd.tmp"
    leftover.write_bytes(b"PAR1 half a file")

    assert len(list((store.run_dir / "iterations").glob("part-*.parquet"))) == 3
    assert ("p9", "latentseek") not in store.completed()
    pd.testing.assert_frame_equal(store.read_iterations(), before)
    assert len(store.read_problems()) == 5
    # third-party directory readers skip the hidden temporary file too
    assert len(pd.read_parquet(store.run_dir / "problems")) == 5

    removed = {p.name for p in store.cleanup()}
    assert leftover.name in removed and len(removed) == 2
    assert not leftover.exists()
    assert len(list((store.run_dir / "iterations").glob("part-*.parquet"))) == 2
    pd.testing.assert_frame_equal(store.read_iterations(), before)


def test_same_key_in_two_shards_raises(store):
    store.write([make_results()[1]], RUN, MODEL, "w2")
    with pytest.raises(DuplicateRecordError, match=r"p2.*latentseek"):
        store.read_problems()
    with pytest.raises(DuplicateRecordError):
        store.compact()


def _retry_of_p4(error: str = "") -> ProblemResult:
    return ProblemResult(
        problem_id="p4", dataset="gsm8k", method="latentseek", question="?", gold="0",
        cot_answer="0", final_answer="0", final_extracted="0", cot_correct=True,
        final_correct=True, initial_reward=-0.2, rewards=[-0.1], iterations=1,
        iteration_stats=[_stats(1, -0.1, True)], error=error,
    )  # fmt: skip


def test_a_retried_error_row_is_superseded_exactly_once(store):
    # p4 failed in the second shard; a resume retries it and commits the new row in a third.
    before = store.read_iterations()
    store.write([_retry_of_p4()], RUN, MODEL, "w2", attempts={("p4", "latentseek"): 1})
    problems, iterations = store.read_problems(), store.read_iterations()
    assert len(problems) == 5 and not problems.duplicated(["problem_id", "method"]).any()
    p4 = problems.set_index(["problem_id", "method"]).loc[("p4", "latentseek")]
    assert p4["error"] == "" and p4["final_correct"] and p4["worker"] == "w2"
    # the failed row's iteration row (its iteration 0) is gone, the retry's two are there
    p4_its = iterations[iterations["problem_id"] == "p4"]
    assert list(p4_its["iteration"]) == [0, 1] and list(p4_its["answer"]) == ["0", "answer 1"]
    assert len(iterations) == len(before) - 1 + 2
    assert ("p4", "latentseek") in store.completed() and store.failed() == set()
    # compaction keeps the same rows and drops the superseded one from the files
    store.compact()
    pd.testing.assert_frame_equal(store.read_problems(), problems.sort_values(
        ["problem_id", "method"], ignore_index=True), check_like=True)  # fmt: skip
    assert len(pq.read_table(next((store.run_dir / "problems").iterdir()))) == 5
    assert len(store.read_iterations()) == len(iterations)


def test_a_retry_that_fails_again_keeps_the_newest_error(store):
    store.write([_retry_of_p4("RuntimeError: again")], RUN, MODEL, "w2")
    (row,) = store.read_problems().query("problem_id == 'p4'").itertuples()
    assert row.error == "RuntimeError: again" and store.failed() == {("p4", "latentseek")}
    # and a later success still supersedes both, also across a compaction
    store.compact()
    store.write([_retry_of_p4()], RUN, MODEL, "w3")
    assert store.failed() == set() and len(store.read_problems()) == 5
    store.compact()
    assert store.read_problems().query("problem_id == 'p4'")["worker"].tolist() == ["w3"]


def test_a_row_without_error_is_never_superseded(store):
    # p4 succeeded on retry; recording it once more is a duplicate, not a newer version
    store.write([_retry_of_p4()], RUN, MODEL, "w2")
    store.write([_retry_of_p4()], RUN, MODEL, "w3")
    for read in (store.read_problems, store.read_iterations, store.completed, store.compact):
        with pytest.raises(DuplicateRecordError, match=r"p4.*latentseek"):
            read()


def test_a_new_shard_sorts_after_every_shard_present(store, monkeypatch):
    # a clock set back (or another host's) must not file a retry before the row it retries
    monkeypatch.setattr(records, "new_shard_id", lambda: f"{1:020d}-{'0' * 12}")
    store.write([_retry_of_p4()], RUN, MODEL, "w2")
    names = sorted(p.name for p in (store.run_dir / "problems").iterdir())
    assert pq.read_table(store.run_dir / "problems" / names[-1]).column("worker")[0].as_py() == "w2"
    assert store.failed() == set()


def test_same_key_twice_in_one_batch_is_refused(tmp_path):
    r = make_results()[1]
    with pytest.raises(ValueError, match="twice"):
        RecordStore(tmp_path).write([r, r], RUN, MODEL, "w0")


def test_compact_keeps_one_row_per_key_and_one_file_per_dataset(store):
    store.write(make_results("math500", prefix="m")[:2], RUN, MODEL, "w0")
    problems, iterations = store.read_problems(), store.read_iterations()

    written = store.compact()

    assert sorted(p.name.rsplit("-", 1)[-1] for p in written) == [
        "gsm8k.parquet",
        "math500.parquet",
    ]
    assert sorted(p.name for p in (store.run_dir / "problems").iterdir()) == sorted(
        p.name for p in written
    )
    assert len(list((store.run_dir / "iterations").iterdir())) == 2
    after = store.read_problems()
    key = ["problem_id", "method"]
    assert len(after) == 7 and not after.duplicated(key).any()
    pd.testing.assert_frame_equal(
        after.sort_values(key, ignore_index=True), problems.sort_values(key, ignore_index=True)
    )
    assert len(store.read_iterations()) == len(iterations)
    assert store.compact() == written  # already compact: nothing rewritten
    assert len(store.read_problems()) == 7


def test_interrupted_compaction_is_invisible(store, monkeypatch):
    store.write(make_results("math500", prefix="m")[:2], RUN, MODEL, "w0")
    before = store.read_problems()
    real = records._write_atomic
    calls = {"problems": 0}

    def crash_on_second_problem_file(table, path):
        if path.parent.name == "problems":
            calls["problems"] += 1
            if calls["problems"] == 2:
                raise KeyboardInterrupt("killed")
        real(table, path)

    monkeypatch.setattr(records, "_write_atomic", crash_on_second_problem_file)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.undo()
    # one compacted problem file landed next to the old shards: readers ignore it
    assert len(list((store.run_dir / "problems").glob("part-*"))) == 4
    assert len(store.read_problems()) == len(before) == 7
    store.cleanup()
    assert len(list((store.run_dir / "problems").glob("part-*"))) == 3
    store.compact()
    assert len(store.read_problems()) == 7


def test_run_dir_and_write_config(tmp_path):
    cfg = Config(output_dir=str(tmp_path), run_id="abc", method=["cot"])
    assert run_dir(cfg) == tmp_path / "abc"
    path = write_config(cfg)
    assert path == tmp_path / "abc" / "config.yaml"
    from pipeline.config import load_config

    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    # keep_existing: the first config stays; without it the file is replaced
    assert write_config(cfg.replace(workers=3), keep_existing=True) == path
    assert load_config(path).workers == 1
    write_config(cfg.replace(workers=3))
    assert load_config(path).workers == 3


def test_device_and_dtype_are_recorded_and_older_shards_read_as_null(store):
    problems = store.read_problems().set_index(["problem_id", "method"])
    assert (problems.loc[("p1", "latentseek"), "device"]) == "cuda:0"
    assert problems.loc[("p2", "latentseek"), "device"] == ""  # not set by the result: ""
    schema = pq.read_schema(next((store.run_dir / "problems").glob("part-*.parquet")))
    assert schema.field("device").type == pa.string() and schema.field("dtype").nullable

    # A shard written before the columns existed: same schema without device and dtype.
    gone = ("device", "dtype", "capture_mismatch")
    old_schema = pa.schema([f for f in PROBLEM_SCHEMA if f.name not in gone])
    row = problem_row(make_results(prefix="old-")[1], RUN, MODEL, "w9", 1)
    del row["device"], row["dtype"], row["capture_mismatch"]
    old_iter = iteration_rows(make_results(prefix="old-")[1], RUN)
    store._write_pair(
        "part-00000000000000000000-old.parquet",
        pa.Table.from_pylist([row], schema=old_schema),
        pa.Table.from_pylist(old_iter, schema=ITERATION_SCHEMA),
    )
    assert not pq.read_schema(
        store.run_dir / "problems" / "part-00000000000000000000-old.parquet"
    ).names.count("device")
    problems = store.read_problems().set_index(["problem_id", "method"])
    assert len(problems) == 6 and pd.isna(problems.loc[("old-p2", "latentseek"), "device"])
    assert pd.isna(problems.loc[("old-p2", "latentseek"), "capture_mismatch"])
    assert problems.loc[("p3", "latentseek"), "capture_mismatch"] == 2
    assert store.distinct("device") == {"cuda:0", ""} and store.distinct("dtype") == {
        "bfloat16",
        "",
    }
    store.compact()  # the nulls survive compaction
    problems = store.read_problems().set_index(["problem_id", "method"])
    assert pd.isna(problems.loc[("old-p2", "latentseek"), "dtype"])
    assert problems.loc[("p1", "latentseek"), "dtype"] == "bfloat16"


def test_invocations_append_one_line_each_and_skip_a_torn_line(tmp_path):
    assert read_invocations(tmp_path) == []
    append_invocation(tmp_path, {"n": 1, "argv": ["latentseek", "run"]})
    path = append_invocation(tmp_path, {"n": 2, "config": {"workers": 2}})
    assert path == tmp_path / INVOCATIONS_FILE
    with open(path, "a") as fh:
        fh.write('{"n": 3, "tor')  # a crash in the middle of a write
    assert [e["n"] for e in read_invocations(tmp_path)] == [1, 2]
    append_invocation(tmp_path, {"n": 4})  # starts on a line of its own
    assert [e["n"] for e in read_invocations(tmp_path)] == [1, 2, 4]
    assert len(path.read_text().splitlines()) == 4


# --- analysis ------------------------------------------------------------------------------


def test_load_run_reads_the_committed_records(store):
    problems, iterations = load_run(store.run_dir)
    assert len(problems) == 5 and len(iterations) == 8


def test_summary_table_by_hand(store):
    summary = summary_table(store.read_problems()).set_index("method")
    ls = summary.loc["latentseek"]
    assert ls["problems"] == 4 and ls["failures"] == 1
    assert ls["cot_accuracy"] == 0.5  # p2, p3 of 4
    assert ls["final_accuracy"] == 0.5  # p1, p2 of 4
    assert ls["mean_iterations"] == 0.75  # (2 + 0 + 1 + 0) / 4
    assert ls["mean_initial_reward"] == pytest.approx(-0.6)  # (-0.8 - 0.1 - 0.9) / 3, p4 none
    assert ls["mean_final_reward"] == pytest.approx(-0.8 / 3)  # (-0.1 - 0.1 - 0.6) / 3
    assert ls["tokens_per_problem"] == 50  # (150 + 50) / 4
    assert ls["mean_wall_seconds"] == 1.0 and ls["problems_per_hour"] == 3600
    assert ls["flops_per_problem"] == 0.25e9
    assert ls["capture_mismatch"] == 2  # p1 0 + p3 2; p2, p4 captured nothing
    cot = summary.loc["cot"]
    assert cot["problems"] == 1 and cot["final_accuracy"] == 0
    assert math.isnan(cot["mean_initial_reward"]) and math.isnan(cot["mean_final_reward"])
    assert math.isnan(cot["capture_mismatch"])


def test_accuracy_by_iteration_carries_the_last_answer_forward(store):
    curve = accuracy_by_iteration(store.read_problems(), store.read_iterations())
    got = {(m, k): a for m, k, a in curve.itertuples(index=False)}
    # k=0: p1 CoT wrong (runs on), p2 final right, p3 CoT right (runs on), p4 failed -> 2/4
    # k=1: p1 step 1 wrong, p2 right, p3 stopped at 1 -> final wrong, p4 wrong -> 1/4
    # k=2: p1 stopped at 2 -> final right, p2 right, p3 wrong, p4 wrong -> 2/4
    assert [got["latentseek", k] for k in range(3)] == [0.5, 0.25, 0.5]
    assert [got["cot", k] for k in range(3)] == [0.0, 0.0, 0.0]
    assert list(curve.columns) == ["method", "iteration", "accuracy"]

    capped = accuracy_by_iteration(store.read_problems(), store.read_iterations(), max_k=1)
    assert capped["iteration"].max() == 1
    longer = accuracy_by_iteration(store.read_problems(), store.read_iterations(), max_k=4)
    assert longer[longer["method"] == "latentseek"]["accuracy"].tolist()[2:] == [0.5, 0.5, 0.5]


def test_curve_and_summary_of_nothing_are_empty(tmp_path):
    problems, iterations = load_run(tmp_path)
    assert summary_table(problems).empty
    assert accuracy_by_iteration(problems, iterations).empty


def test_markdown_renders_a_table():
    df = pd.DataFrame({"method": ["a|b"], "acc": [0.123456], "n": [3], "r": [float("nan")]})
    assert markdown(df).splitlines() == [
        "| method | acc | n | r |",
        "| --- | ---: | ---: | ---: |",
        "| a\\|b | 0.1235 | 3 |  |",
    ]


def test_plot_scaling_curve(store, tmp_path):
    pytest.importorskip("matplotlib")
    from analysis.plots import plot_scaling_curve

    curve = accuracy_by_iteration(store.read_problems(), store.read_iterations())
    out = plot_scaling_curve(curve, tmp_path / "plots" / "curve.png", title="t")
    assert out.stat().st_size > 1000


# --- one driver per run directory --------------------------------------------------------------


def test_a_held_run_directory_refuses_a_second_holder_and_a_sigkill_frees_it(tmp_path):
    directory = tmp_path / "out" / "r1"
    holder = hold_in_child(directory)
    try:
        who = f"pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(RunDirError, match=rf"in use by another driver \({re.escape(who)}\)"):
            with hold_run_dir(directory):
                pytest.fail("two holders at once")
    finally:
        holder.send_signal(signal.SIGKILL)  # a driver killed outright: no cleanup of its own
        holder.wait(timeout=30)
    with hold_run_dir(directory) as lock:  # the kernel released it: no stale lock
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    with hold_run_dir(directory):  # and released at the end of the block
        pass


MOUNTS = """/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/shared nfs4 rw,vers=4.2,local_lock=none 0 0
server:/export2 /mnt/local\\040lock nfs rw,vers=3,local_lock=all 0 0
bucket /mnt/bucket fuse.gcsfuse rw,user_id=0 0 0
"""


def test_a_run_directory_where_flock_would_not_hold_is_refused(tmp_path, caplog, monkeypatch):
    from pipeline.run import rundir

    assert rundir.shared_mount("/mnt/bucket/out/r1", MOUNTS)[:2] == ("/mnt/bucket", "fuse.gcsfuse")
    assert rundir.shared_mount("/mnt/bucketx/r1", MOUNTS)[:2] == ("/", "ext4")
    with pytest.raises(RunDirError, match=r"on fuse\.gcsfuse \(/mnt/bucket\).*two drivers"):
        rundir.check_mount("/mnt/bucket/out/r1", MOUNTS)
    with pytest.raises(RunDirError, match=r"on nfs \(/mnt/local lock\)"):  # local_lock=all
        rundir.check_mount("/mnt/local lock/r1", MOUNTS)
    rundir.check_mount("/srv/out/r1", MOUNTS)  # a local disk: nothing to say
    assert not caplog.text
    rundir.check_mount("/mnt/shared/r1", MOUNTS)
    assert "on nfs4 (/mnt/shared)" in caplog.text and "lock manager" in caplog.text
    # the driver's lock asks first: nothing is created on such a mount
    monkeypatch.setattr(rundir, "shared_mount", lambda d, m=None: ("/x", "fuse.s3fs", "rw"))
    with pytest.raises(RunDirError, match="s3fs"), rundir.hold_run_dir(tmp_path / "r1"):
        pass
    assert not (tmp_path / "r1" / "driver.lock").exists()
