"""`latentseek submit | status | logs | stop` against a real local Ray head.

The head is a `ray start --head --block` of this module's own (its own ports, a temp dir of its
own, token auth off: it listens on 127.0.0.1 only), stopped by signalling that process, which
drains and stops what it started; whatever is left with the temp dir in its command line or
working directory (a job's driver) is then killed by pid. Never `ray stop`: it would stop every
Ray on the machine, including the in-process ones of other tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from jobs import submit
from pipeline.config import CONFIG_DIR, PROJECT_ROOT
from pipeline.run.records import read_records

pytestmark = pytest.mark.timeout(480)  # a head start under load, then the test

BIN = Path(sys.executable).parent  # the venv's bin: its `ray`, and the jobs' `python`
SMOKE = ["--config", "configs/smoke.yaml"]  # one GSM8K problem, CoT, 8 tokens, one worker
HEAD_START_S = 300.0  # our wait for the job server; Ray's own dashboard wait is below it
DASHBOARD_START_S = 240  # Ray's (RAY_DASHBOARD_STARTUP_TIMEOUT_S, 60 by default): too short
# for a head started beside a loaded 2-core machine's other jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_leftovers(root: str) -> None:
    """Kill the processes whose command line or working directory lies under `root`."""
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline, cwd = " ".join(p.info["cmdline"] or []), p.info["cwd"] or ""
            if p.pid != os.getpid() and (root in cmdline or cwd.startswith(root)):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def head():
    """The job server address (http://127.0.0.1:PORT) of a fresh local Ray head."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="lsray-", dir="/tmp")  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        NO_PROXY="127.0.0.1,localhost",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        RAY_DASHBOARD_STARTUP_TIMEOUT_S=str(DASHBOARD_START_S),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
    )
    dashboard = _free_port()
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=2",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.delenv("RAY_ADDRESS", raising=False)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, f"no job server at {address}"
                time.sleep(1.0)
        yield address
    finally:
        mp.undo()
        proc.terminate()  # `ray start --block` drains and stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftovers(temp_dir)
        log.close()
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.slow
def test_submit_follow_runs_the_job_and_its_records_land_in_output_dir(head, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.submit",
            "submit",
            *SMOKE,
            "--address",
            head,
            "--follow",
            f"output_dir={out}",
        ],  # fmt: skip
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = re.search(r"^run_id:\s+(\S+)$", proc.stdout, re.M).group(1)
    job_id = re.search(r"^job:\s+(\S+)$", proc.stdout, re.M).group(1)
    assert f"records:   {out / run_id}" in proc.stdout
    assert f"{job_id}: SUCCEEDED" in proc.stdout
    assert "wall time:" in proc.stdout  # the driver's own summary, streamed from the cluster

    problems, iterations = read_records(out / run_id)
    assert len(problems) == 1
    assert problems.iloc[0]["method"] == "cot" and problems.iloc[0]["problem_id"] == "gsm8k-0"
    assert (out / "mlflow.db").exists()


@pytest.mark.slow
def test_stop_ends_a_running_job_as_stopped(head, tmp_path, capsys):
    # A config outside the project travels as its resolved keys (its include: stays behind).
    config = tmp_path / "long.yaml"
    config.write_text(f"include: {CONFIG_DIR / 'default.yaml'}\nmethod: [cot]\nworkers: 1\n")
    job = submit.plan("run", config, ["limit=50", "max_new_tokens=256", f"output_dir={tmp_path}"])
    assert job.staged and job.config_arg == "configs/submitted/long.yaml"
    client = submit.connect(head)
    job_id = submit.submit(client, job)

    # Running means evaluating: the driver's progress bar (named after the run) has appeared.
    deadline = time.monotonic() + 150
    # a job's log is no terminal: plain progress lines, `<run_id>: 4/50 rec (8%) [...]`
    while not re.search(rf"{job.run_id}: \d+/\d+ rec", client.get_job_logs(job_id)):
        status = client.get_job_status(job_id)
        assert status in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1.0)
    assert client.get_job_status(job_id) == "RUNNING"

    assert submit.main(_cli("stop", job_id, "--address", head)) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: STOPPED"
    assert submit.main(_cli("status", job_id, "--address", head)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{job_id}: STOPPED") and f"records:   {tmp_path / job.run_id}" in out


def test_unknown_job_and_unreachable_address_are_one_line_errors(head, capsys, monkeypatch):
    for argv in (["status", "raysubmit_nope"], ["logs", "raysubmit_nope", "--follow"]):
        assert submit.main(_cli(*argv, "--address", head)) == 2
        err = capsys.readouterr().err
        assert err == f"error: no job 'raysubmit_nope' on {head}\n"

    nobody = f"http://127.0.0.1:{_free_port()}"
    assert submit.main(_cli("status", "raysubmit_nope", "--address", nobody)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the Ray job server at {nobody} ")
    assert err.count("\n") == 1 and "Traceback" not in err

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.main(_cli("stop", "raysubmit_nope")) == 2
    assert capsys.readouterr().err == f"error: {submit.NO_ADDRESS}\n"


def test_what_the_upload_carries():
    assert submit.carried_path(CONFIG_DIR / "smoke.yaml") == "configs/smoke.yaml"
    assert submit.carried_path(PROJECT_ROOT / "outputs" / "r1" / "config.yaml") is None
    assert submit.carried_path(Path("/elsewhere/x.yaml")) is None
    job = submit.plan("run", CONFIG_DIR / "smoke.yaml", ["run_id=r1", "ray_address=x", "limit=2"])
    assert not job.staged
    assert job.overrides[0] == "limit=2" and "run_id=r1" in job.overrides
    assert "ray_address=auto" in job.overrides and "ray_address=x" not in job.overrides
    assert job.run_dir == str(Path.cwd() / "outputs" / "r1")


def test_the_upload_is_what_git_tracks_plus_what_is_named_never_a_dot_env(tmp_path):
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    for name, text in [("a.py", "x = 1\n"), (".env", "TOKEN=s3cret\n"), ("scratch.py", "")]:
        (root / name).write_text(text)
    (root / "data" / "extra.jsonl").write_text("{}\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "a.py", ".env"], cwd=root, check=True)  # .env tracked, even
    assert submit.upload_files(root) == ["a.py"]
    assert submit.upload_files(root, ("data", ".env")) == ["a.py", "data/extra.jsonl"]
    (tmp_path / "other.txt").write_text("")
    with pytest.raises(submit.ConfigError, match="outside the project"):
        submit.upload_files(root, (str(tmp_path / "other.txt"),))
    shutil.rmtree(root / ".git")  # no git (a project that was itself uploaded): the tree
    assert submit.upload_files(root) == ["a.py", "data/extra.jsonl", "scratch.py"]


def test_a_secret_in_the_tracking_uri_never_reaches_the_entrypoint_or_the_upload(tmp_path):
    secret = uuid.uuid4().hex  # written nowhere in the project (this file is uploaded too)
    uri = f"https://alice:{secret}@mlflow.example:5000/?access_token=abc123"
    job = submit.plan("run", CONFIG_DIR / "smoke.yaml", ["run_id=r1", f"mlflow_tracking_uri={uri}"])
    shown = job.entrypoint + str(job.metadata) + job.tracking_uri
    assert secret not in shown and "abc123" not in shown
    assert "mlflow_tracking_uri=" in job.overrides  # the driver reads $MLFLOW_TRACKING_URI
    assert job.env == {"MLFLOW_TRACKING_URI": uri}
    assert job.tracking_uri == "https://alice:***@mlflow.example:5000/?access_token=***"
    outside = tmp_path / "mine.yaml"  # a config from outside the project travels staged
    outside.write_text(f"include: {CONFIG_DIR / 'smoke.yaml'}\nmlflow_tracking_uri: {uri}\n")
    job = submit.plan("run", outside, ["run_id=r1"])
    staged = submit.stage(job, tmp_path / "w")
    assert (staged / job.config_arg).is_file() and not (staged / ".env").exists()
    assert all(secret.encode() not in p.read_bytes() for p in staged.rglob("*") if p.is_file())
