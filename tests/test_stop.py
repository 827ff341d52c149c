"""A requested stop: SIGTERM (what `ray job stop`, Slurm and Kubernetes send to a driver) and
SIGINT end a run the way it should end, KILLED in MLflow, its lock let go, one line saying how
to resume, and the resume records every problem exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs import run as run_mod
from jobs.run import StopRequested, stop_on_signals, stopped_line
from pipeline.config import Config
from pipeline.run.records import RecordStore
from pipeline.run.tracking import RUN_ID_TAG

ROOT = Path(__file__).resolve().parent.parent
LATENTSEEK = str(Path(sys.executable).parent / "latentseek")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_raises_stop_requested_once_and_the_old_handlers_come_back(sig):
    before = {s: signal.getsignal(s) for s in run_mod.STOP_SIGNALS}
    with pytest.raises(StopRequested) as stop:
        with stop_on_signals():
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises before this ends
            except StopRequested:
                os.kill(os.getpid(), sig)  # a second signal while stopping: ignored
                time.sleep(0.05)
                raise
    assert stop.value.signum == sig and stop.value.exit_code == 128 + sig
    assert isinstance(stop.value, KeyboardInterrupt)  # what marks a run KILLED, not FAILED
    assert {s: signal.getsignal(s) for s in run_mod.STOP_SIGNALS} == before


def test_a_stop_signal_inside_held_waits_for_the_block_to_end():
    done: list[str] = []
    with pytest.raises(StopRequested) as stop:
        with stop_on_signals() as signals:
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run: the stop waits
                done.append("committed and counted")
            done.append("not reached")
    assert done == ["committed and counted"] and stop.value.signum == signal.SIGTERM


def test_main_turns_a_stop_into_one_line_and_the_signal_exit_code(monkeypatch, capsys):
    def stopped(cfg, argv):
        stop = StopRequested(signal.SIGTERM)
        stop.run_id, stop.directory, stop.recorded = "20260101-000000-abcdef", Path("o/r"), 3
        raise stop

    monkeypatch.setattr(run_mod, "run_evaluation", stopped)
    assert run_mod.main(Config(), argv=["latentseek", "run", "limit=5"]) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stopped by SIGTERM: 3 new records kept in o/r")
    # the same command, with the run_id it was given (a resume is found by run_id)
    assert err.rstrip().endswith("latentseek run limit=5 run_id=20260101-000000-abcdef")
    stop = StopRequested(signal.SIGINT)
    stop.run_id = "mine"
    assert stopped_line(stop, ["latentseek", "run", "run_id=mine"]).endswith("run run_id=mine")


def test_a_stopped_sweep_is_one_line_and_the_signal_exit_code(monkeypatch, capsys):
    """A sweep's StopRequested reached Ray's excepthook (a traceback, and a driver that hung in
    it); now it is one line naming the command that goes on."""
    from jobs import sweep as sweep_mod

    def stopped(path, overrides):
        raise StopRequested(signal.SIGTERM)

    monkeypatch.setattr(sweep_mod, "run_sweep", stopped)
    assert sweep_mod.main(Path("configs/sweeps/x.yaml"), ["workers=1"]) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stopped by SIGTERM")
    assert err.rstrip().endswith("latentseek sweep configs/sweeps/x.yaml workers=1")


def _mlflow_status(out: Path, run_id: str) -> str:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
    return runs[0].info.status


@pytest.mark.slow
def test_a_driver_sent_sigterm_ends_killed_and_its_resume_records_each_problem_once(tmp_path):
    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="lsk-", dir="/tmp"))  # Ray's socket paths are short
    args = [
        LATENTSEEK, "run", "dataset=gsm8k", "limit=6", "method=cot", "max_new_tokens=8",
        "batch_size=1", "task_size=1", "workers=1", f"output_dir={out}", "run_id=st",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    shards = out / "st" / "problems"
    try:
        deadline = time.monotonic() + 240
        while not (shards.exists() and list(shards.glob("part-*.parquet"))):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no record in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # the driver only, as `ray job stop` does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    assert lines[-1].startswith("stopped by SIGTERM: "), err[-3000:]
    assert lines[-1].endswith("run_id=st"), lines[-1]
    assert _mlflow_status(out, "st") == "KILLED"
    kept = len(RecordStore(out / "st").read_problems())
    assert 1 <= kept < 6

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the lock was let go
    assert f"resuming st: {kept} of 6" in done.stderr
    problems = RecordStore(out / "st").read_problems()
    keys = list(zip(problems["problem_id"], problems["method"]))
    assert len(keys) == len(set(keys)) == 6
    assert _mlflow_status(out, "st") == "FINISHED"


def test_a_stop_signal_during_a_records_commit_waits_for_it_and_nothing_is_written_twice(
    tmp_path, local_ray, monkeypatch
):
    """SIGTERM lands just after a shard pair's commit (here: sent by the write itself; in
    `latentseek chaos`, by a parent that sees the first shard): the stop waits until the window
    is counted as written, so the loop's last flush does not write it again (before: the same
    records committed twice, and the run directory unreadable: DuplicateRecordError)."""
    from jobs.chaos import Faults, chaos

    real, calls = RecordStore.write, []

    def write_then_sigterm(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the commit's section

    monkeypatch.setattr(RecordStore, "write", write_then_sigterm)
    with pytest.raises(StopRequested) as stop:
        chaos(tmp_path, 12, Faults(seconds_per_problem=0.2), workers=1)
    problems = RecordStore(tmp_path / "chaos").read_problems()  # raises if written twice
    assert len(calls) == 1 and 1 <= len(problems) == stop.value.recorded < 12
