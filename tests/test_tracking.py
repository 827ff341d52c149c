"""MLflow tracking (pipeline.run.tracking) against real stores: SQLite files and an `mlflow server`.

Nothing is mocked: each test logs a small hand-built run and reads it back with MlflowClient.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import wait_healthy
from mlflow.tracking import MlflowClient

from analysis.tables import iteration_curves, summary_table, write_summary
from pipeline.config import Config
from pipeline.method.results import Compute, IterationStats, ProblemResult
from pipeline.run.records import RecordStore
from pipeline.run.rundir import append_invocation, redact, run_dir, write_config
from pipeline.run.tracking import (
    IDENTITY_TAG,
    KIND_TAG,
    PARENT_TAG,
    RECORDS_TAG,
    RUN_DIR_TAG,
    RUN_ID_TAG,
    ForeignRunError,
    end_run,
    flatten_params,
    log_run,
    open_sweep_run,
    resolve_tracking_uri,
    run_name,
    start_run,
    ui_command,
)

DATASET_INFO = {"name": "gsm8k", "digest": "d1g35t"}


def _results() -> list[ProblemResult]:
    # latentseek: a solved after 1 step (CoT wrong), b accepted its CoT; cot: a wrong, b right
    step = IterationStats(1, -0.1, "4", True, 5, 0.3, 1.2, 2, -0.4)
    return [
        ProblemResult("a", "gsm8k", "latentseek", "2+2?", "4", cot_answer="5", final_answer="4",
                      final_correct=True, initial_reward=-0.9, rewards=[-0.1], iterations=1,
                      iteration_stats=[step], compute=Compute(10, 5, 3, 2, wall_seconds=2.0)),
        ProblemResult("b", "gsm8k", "latentseek", "1+1?", "2", cot_answer="2", final_answer="2",
                      cot_correct=True, final_correct=True, initial_reward=-0.1,
                      compute=Compute(wall_seconds=2.0)),
        ProblemResult("a", "gsm8k", "cot", "2+2?", "4", cot_answer="5", final_answer="5",
                      compute=Compute(wall_seconds=1.0)),
        ProblemResult("b", "gsm8k", "cot", "1+1?", "2", cot_answer="2", final_answer="2",
                      cot_correct=True, final_correct=True, compute=Compute(wall_seconds=1.0)),
    ]  # fmt: skip


def _record_run(cfg: Config) -> Path:
    rd = run_dir(cfg)
    results = [r for r in _results() if r.method in cfg.method]
    RecordStore(rd).write(results, cfg.run_id, "tiny", worker="w0")
    write_config(cfg)
    return rd


TABLE = pd.DataFrame({"label": ["CoT", "LatentSeek"], "gain_pp": [float("nan"), 50.0]})


def _log(cfg: Config, rd: Path, **kw) -> str:
    """What the driver does: the tables, the summary files in the run directory, then log."""
    problems, iterations = RecordStore(rd).read_problems(), RecordStore(rd).read_iterations()
    summary, curves = summary_table(problems), iteration_curves(problems, iterations)
    files = write_summary(rd, summary, curves[["method", "iteration", "accuracy"]])
    return log_run(
        cfg, rd, summary, curves, DATASET_INFO, files=files,
        extra_metrics={"run_problems_per_hour": 12.5, "run_failures": 0.0},
        tags={"sweep": "s1"}, tables={"report/table.json": TABLE}, **kw,
    )  # fmt: skip


def _method_runs(client: MlflowClient, parent: str) -> dict:
    """method -> the run nested under the evaluation run `parent` for it."""
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    return {r.data.tags["method"]: r for r in runs}


def _steps(client: MlflowClient, run, metric: str) -> list[tuple[int, float]]:
    return sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, metric))


@pytest.fixture
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    cfg = Config(output_dir=str(tmp_path / "out"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert ui_command(cfg).endswith(
        f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'out' / 'mlflow.db'} --port 5000  "
        "# then open http://127.0.0.1:5000/#/?workflowType=machine_learning"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:1"
    cfg = cfg.replace(mlflow_tracking_uri="sqlite:////x/y.db")
    assert resolve_tracking_uri(cfg) == "sqlite:////x/y.db"


def test_flatten_params_joins_lists_and_nests():
    flat = flatten_params({"method": ["cot", "latentseek"], "lr": 0.03, "a": {"b": True}})
    assert flat == {"method": "cot,latentseek", "lr": "0.03", "a.b": "True"}


def test_log_run_to_sqlite_and_read_back(tmp_path, monkeypatch, no_env_uri):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = Config(output_dir=str(tmp_path / "out"), run_id="r1", method=["cot", "latentseek"])
    rd = _record_run(cfg)
    append_invocation(rd, {"argv": ["latentseek", "run"]})

    run_id = _log(cfg, rd)

    client = MlflowClient(resolve_tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["method"] == "cot,latentseek" and run.data.params["lr"] == "0.03"
    assert run.data.params["run_id"] == "r1"
    tags = run.data.tags
    assert tags[RUN_ID_TAG] == "r1" and tags["sweep"] == "s1"
    assert (tags["model"], tags["dataset"], tags["method"], tags["reward"]) == (
        "embedded", "gsm8k", "cot,latentseek", "self",
    )  # fmt: skip
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40

    assert tags[KIND_TAG] == "evaluation"
    # The evaluation's own metrics are its run-level totals; each method's are in its run.
    assert run.data.metrics == {"run_problems_per_hour": 12.5, "run_failures": 0.0}

    methods = _method_runs(client, run_id)
    assert sorted(methods) == ["cot", "latentseek"]
    for method, child in methods.items():
        assert child.info.run_name == f"r1 · {method}" and child.info.status == "FINISHED"
        assert child.data.params["method"] == method and child.data.params["lr"] == "0.03"
        assert child.data.tags[KIND_TAG] == "method" and child.data.tags[RUN_ID_TAG] == "r1"
        assert (child.data.tags["dataset"], child.data.tags["model"]) == ("gsm8k", "embedded")
        assert child.data.tags["sweep"] == "s1"  # the caller's tags, to group by
        assert len(child.inputs.dataset_inputs) == 1  # the dataset column of the runs table
    ls, cot = methods["latentseek"].data.metrics, methods["cot"].data.metrics
    assert ls["final_accuracy"] == 1.0 and ls["cot_accuracy"] == 0.5
    assert cot["final_accuracy"] == 0.5 and ls["mean_iterations"] == 0.5
    assert ls["mean_final_reward"] == pytest.approx(-0.1)  # (-0.1 + -0.1) / 2
    assert ls["tokens_per_problem"] == 10  # (15 + 5) / 2
    assert ls["problems_per_hour"] == 1800 and ls["failures"] == 0
    assert "mean_final_reward" not in cot  # NaN (no reward) is not logged
    # One name per metric: every method logs the summary table's columns under their own names
    # (the same in every run), plus the curves.
    summary = summary_table(RecordStore(rd).read_problems())
    curves = {"accuracy_at_iteration", "mean_reward_at_iteration"}
    # (capture_mismatch is NaN here: these hand-made results captured no z, and NaN is not logged)
    assert set(ls) == set(summary.columns) - {"method", "capture_mismatch"} | curves
    assert set(cot) <= set(ls) and set(ls) - set(cot) == {
        "mean_initial_reward", "mean_final_reward", "mean_reward_at_iteration",
    }  # fmt: skip
    # k=0: a runs on with a wrong CoT, b accepted (right) -> 0.5; k=1: both right -> 1.0
    assert _steps(client, methods["latentseek"], "accuracy_at_iteration") == [(0, 0.5), (1, 1.0)]
    # k=0: a's CoT reward -0.9, b's -0.1 -> -0.5; k=1: a's step-1 reward -0.1, b's -0.1
    rewards = _steps(client, methods["latentseek"], "mean_reward_at_iteration")
    assert rewards == [(0, pytest.approx(-0.5)), (1, pytest.approx(-0.1))]
    assert _steps(client, methods["cot"], "accuracy_at_iteration") == [(0, 0.5), (1, 0.5)]

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"records", "config.yaml", "summary.md", "summary.csv"} <= top
    assert {"accuracy_by_iteration.csv", "invocations.jsonl", "report"} <= top
    # the report's table as an MLflow table (the UI's artifact and evaluation views read it)
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [
        {"path": "report/table.json", "type": "table"}
    ]
    table = json.loads(
        Path(
            client.download_artifacts(run_id, "report/table.json", str(tmp_path / "t"))
        ).read_text()
    )
    assert table["columns"] == ["label", "gain_pp"]
    assert table["data"] == [["CoT", None], ["LatentSeek", 50.0]]  # NaN -> null: valid JSON
    assert all(not client.list_artifacts(c.info.run_id) for c in methods.values())
    folder = tags[RECORDS_TAG]
    shards = [a.path for a in client.list_artifacts(run_id, f"{folder}/problems")]
    assert len(shards) == 1 and shards[0].startswith(f"{folder}/problems/part-")
    local = Path(client.download_artifacts(run_id, "summary.md", str(tmp_path / "dl")))
    assert local.read_text().startswith("| method |")
    # artifacts live under <output_dir>/mlartifacts, nothing lands in the working directory
    assert run.info.artifact_uri.startswith((tmp_path / "out" / "mlartifacts").as_uri())
    assert list(cwd.iterdir()) == []

    (dataset_input,) = run.inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("gsm8k", "d1g35t")
    assert {(t.key, t.value) for t in dataset_input.tags} >= {("mlflow.data.context", "evaluation")}


def test_logging_again_reuses_the_mlflow_run(tmp_path, no_env_uri):
    cfg = Config(output_dir=str(tmp_path / "out"), run_id="r2", method=["cot", "latentseek"])
    rd = _record_run(cfg)
    first = _log(cfg, rd)

    resumed = cfg.replace(workers=2)  # a resumed run may change how it executes
    second = _log(resumed, rd)

    client = MlflowClient(resolve_tracking_uri(cfg))
    assert second == first
    experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 3  # the evaluation + 2 methods
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "1"  # params are immutable: the first value stays
    assert run.data.tags["latentseek.resumed_param.workers"] == "2"
    ls = _method_runs(client, first)["latentseek"]
    assert ls.data.tags["latentseek.resumed_param.workers"] == "2"
    assert len(_steps(client, ls, "accuracy_at_iteration")) == 2  # not logged twice
    assert len(client.get_metric_history(ls.info.run_id, "final_accuracy")) == 1
    assert len(run.inputs.dataset_inputs) == 1
    # the MLflow table is replaced, not appended to (MlflowClient.log_table would append)
    table = client.download_artifacts(first, "report/table.json", str(tmp_path / "t"))
    assert len(json.loads(Path(table).read_text())["data"]) == 2
    assert len(json.loads(run.data.tags["mlflow.loggedArtifacts"])) == 1


def test_run_names_say_what_was_evaluated():
    cfg = Config(method=["cot", "latentseek"], model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert run_name(cfg.replace(run_id="baseline-v2")) == "baseline-v2"  # the user's choice
    # a generated run_id (jobs.run.resolve_run_id: a timestamp) names nothing: say what ran
    generated = cfg.replace(run_id="20260101-120000-0a1b2c")
    assert run_name(generated) == "gsm8k cot+latentseek SmolLM2-135M-Instruct"


def test_a_run_spans_the_evaluation_and_resumes_without_new_runs(tmp_path, no_env_uri):
    """start_run opens the evaluation and its method runs (RUNNING); a failure marks all of
    them; the rerun finds the same runs (by run_id, then by parent and method) and finishes."""
    cfg = Config(output_dir=str(tmp_path / "out"), run_id="r3", method=["cot", "latentseek"])
    client = MlflowClient(resolve_tracking_uri(cfg))
    first = start_run(cfg, {"run_dir": "somewhere", "mlflow.runName": "lr=0.03"})
    running = _method_runs(client, first)
    assert client.get_run(first).info.run_name == "lr=0.03"  # a caller's name (a sweep point)
    assert {r.info.run_name for r in running.values()} == {"lr=0.03 · cot", "lr=0.03 · latentseek"}
    assert {r.info.status for r in running.values()} == {"RUNNING"}
    end_run(cfg, first, "KILLED")
    assert {r.info.status for r in _method_runs(client, first).values()} == {"KILLED"}
    assert client.get_run(first).info.status == "KILLED"

    assert start_run(cfg) == first
    rd = _record_run(cfg)
    assert _log(cfg, rd) == first
    assert client.get_run(first).info.run_name == "lr=0.03"  # names are not changed on resume
    again = _method_runs(client, first)
    assert {m: r.info.run_id for m, r in again.items()} == {
        m: r.info.run_id for m, r in running.items()
    }
    assert {r.info.status for r in again.values()} == {"FINISHED"}
    experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A served MLflow: its URL, and the folder its store and artifacts are in."""

    url: str
    folder: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, migrated_mlflow_db):
    """A real `mlflow server` on 127.0.0.1 with its store (a copy of one already migrated) and
    artifacts in a temporary folder, shared by this module's tests (a start costs 15-20 s here);
    each test logs to experiments or run directories of its own."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(migrated_mlflow_db, tmp_path / "server.db")
    saved = {var: os.environ.get(var) for var in ("NO_PROXY", "no_proxy")}
    for var in saved:  # talk to 127.0.0.1 directly, never via a proxy
        os.environ[var] = "127.0.0.1,localhost"
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    assert exe.exists(), f"no mlflow executable next to {sys.executable}: make setup installs it"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [
        str(exe), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,  # its own process group, so its workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        wait_healthy(proc, url, tmp_path / "server.log", direct, 240)  # slow on a loaded machine
        yield Server(url, tmp_path)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


def test_log_run_to_a_real_mlflow_server(tmp_path, mlflow_server, no_env_uri):
    cfg = Config(
        output_dir=str(tmp_path / "out"), run_id="srv", method=["latentseek"],
        mlflow_tracking_uri=mlflow_server.url, mlflow_experiment="served",
    )  # fmt: skip
    rd = _record_run(cfg)

    run_id = _log(cfg, rd)
    assert _log(cfg, rd) == run_id

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RUN_ID_TAG] == "srv"
    # One method: a method run all the same, its metrics named as in any other run.
    (ls,) = _method_runs(client, run_id).values()
    assert ls.info.run_name == "srv · latentseek" and ls.info.status == "FINISHED"
    assert ls.data.metrics["final_accuracy"] == 1.0 and "final_accuracy" not in run.data.metrics
    assert _steps(client, ls, "accuracy_at_iteration") == [(0, 0.5), (1, 1.0)]
    assert {a.path for a in client.list_artifacts(run_id)} >= {
        "records",
        "config.yaml",
        "summary.md",
    }
    # the server stored the artifacts (proxied), not this process's working directory
    stored = list((mlflow_server.folder / "server-artifacts").glob(f"*/{run_id}/**/part-*.parquet"))
    assert len(stored) == 2  # problems/ and iterations/
    assert not (tmp_path / "out" / "mlartifacts").exists()
    assert run.inputs.dataset_inputs[0].dataset.digest == "d1g35t"


def _statuses(client: MlflowClient, run_id: str) -> set[str]:
    """The statuses of an evaluation run and its method runs."""
    children = _method_runs(client, run_id).values()
    return {client.get_run(run_id).info.status} | {c.info.status for c in children}


def test_a_run_id_of_another_output_directory_is_refused_before_any_work(
    tmp_path, mlflow_server, no_env_uri, monkeypatch
):
    """Two output directories (two sweeps with the same point ids) on one tracking server: the
    second is refused, naming both directories, before Ray starts; the first still resumes."""
    import ray

    from jobs.run import run_evaluation

    a = Config(
        output_dir=str(tmp_path / "a"), run_id="point-1", method=["cot"], limit=1,
        mlflow_tracking_uri=mlflow_server.url, mlflow_experiment="shared",
    )  # fmt: skip
    b = a.replace(output_dir=str(tmp_path / "b"))
    first = start_run(a)
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(first).data.tags[RUN_DIR_TAG] == str(tmp_path / "a" / "point-1")
    both = rf"belongs to {tmp_path / 'a' / 'point-1'}, not to {tmp_path / 'b' / 'point-1'}"
    with pytest.raises(ForeignRunError, match=both):
        start_run(b)

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ForeignRunError, match=both):
        run_evaluation(b, progress=False, log=lambda m: None)
    assert [p.name for p in (tmp_path / "b" / "point-1").iterdir()] == ["driver.lock"]
    rd = _record_run(b)
    with pytest.raises(ForeignRunError, match=both):
        _log(b, rd)
    experiment = client.get_experiment_by_name("shared").experiment_id
    assert len(client.search_runs([experiment])) == 2  # a's evaluation and method run only
    assert start_run(a) == first  # its own directory finds it again


def test_a_failure_while_finishing_ends_the_mlflow_run_failed(tmp_path, mlflow_server, no_env_uri,
                                                             monkeypatch):  # fmt: skip
    import time

    from jobs import finish
    from pipeline.data import Dataset, Problem

    cfg = Config(
        output_dir=str(tmp_path / "out"), run_id="fin", method=["cot", "latentseek"],
        mlflow_tracking_uri=mlflow_server.url,
    )  # fmt: skip
    rd = _record_run(cfg)
    run = start_run(cfg)  # open while the evaluation ran
    client = MlflowClient(mlflow_server.url)
    assert _statuses(client, run) == {"RUNNING"}

    def broken_report(directory):
        raise RuntimeError("the report could not be written")

    monkeypatch.setattr(finish, "report_files", broken_report)
    problems = [Problem(pid, "gsm8k", "?", "0") for pid in ("a", "b")]
    dataset = Dataset("gsm8k", "gsm8k", problems, 0, 2, "")
    with pytest.raises(RuntimeError, match="the report could not be written"):
        finish.finish_run(
            cfg, rd, RecordStore(rd), dataset, 4, 0, finish.Counts(), time.perf_counter(),
            mlflow_run=run,
        )  # fmt: skip
    assert _statuses(client, run) == {"FAILED"}


def test_a_failed_sweep_ends_its_parent_run_failed(tmp_path, mlflow_server, no_env_uri,
                                                   monkeypatch):  # fmt: skip
    import jobs.run
    from jobs.run import RunError
    from jobs.sweep import run_sweep

    path = tmp_path / "sw.yaml"
    path.write_text("name: sw\nset: {method: [cot], limit: 1}\ngrid: {max_new_tokens: [4, 8]}\n")

    def fails(cfg, **kwargs):
        raise RunError(f"{cfg.run_id}: no worker left")

    monkeypatch.setattr(jobs.run, "run_evaluation", fails)
    overrides = [f"output_dir={tmp_path / 'out'}", f"mlflow_tracking_uri={mlflow_server.url}"]
    with pytest.raises(RunError, match="no worker left"):
        run_sweep(path, overrides, progress=False, log=lambda m: None)
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("latentseek").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`latentseek.sweep` = 'sw'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[RUN_DIR_TAG] == str(tmp_path / "out" / "sw")
    cfg = Config(mlflow_tracking_uri=mlflow_server.url)  # the same sweep name in another directory
    with pytest.raises(ForeignRunError, match=rf"belongs to {tmp_path / 'out' / 'sw'}, not to"):
        open_sweep_run(cfg, "sw", {}, tmp_path / "elsewhere" / "sw")


def test_tracking_imports_no_analysis_code():
    code = (
        "import sys, pipeline.run.tracking; "
        "print(sorted(m for m in sys.modules if m == 'analysis' or m.startswith('analysis.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------
# Secrets and end_run


def test_no_secret_of_a_uri_reaches_params_config_yaml_or_invocations(
    tmp_path, mlflow_server, no_env_uri
):
    secret = "pw" + os.urandom(6).hex()
    address = f"ray://bob:{secret}@head:10001/?token={secret}"
    cfg = Config(output_dir=str(tmp_path / "out"), run_id="r1", ray_address=address,
                 mlflow_tracking_uri=mlflow_server.url, mlflow_experiment="secrets")  # fmt: skip
    assert redact(address) == "ray://bob:***@head:10001/?token=***"
    assert redact("https://host/x?a=1&SIG=abc&b=2") == "https://host/x?a=1&SIG=***&b=2"
    run = start_run(cfg)
    params = MlflowClient(resolve_tracking_uri(cfg)).get_run(run).data.params
    assert params["ray_address"] == redact(address)
    rd = run_dir(cfg)
    write_config(cfg, rd)
    append_invocation(rd, {"argv": [f"ray_address={address}"], "config": cfg.to_dict()})
    for name in ("config.yaml", "invocations.jsonl"):
        text = (rd / name).read_text()
        assert secret not in text and "bob:***@head" in text


def test_end_run_that_fails_is_logged_and_never_masks_the_error(tmp_path, caplog):
    # A server nobody listens on: every request fails (MLflow retries; kept short here).
    cfg = Config(output_dir=str(tmp_path), run_id="r1",
                 mlflow_tracking_uri=f"http://u:hidden@127.0.0.1:{_free_port()}")  # fmt: skip
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(ZeroDivisionError):
            try:
                raise ZeroDivisionError("the run's own error")
            except ZeroDivisionError:
                assert end_run(cfg, "0123abcd", "FAILED") is False
                raise
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert "could not mark MLflow run 0123abcd FAILED" in caplog.text
    assert "hidden" not in caplog.text


# ------------------------------------------------------------------------------------------
# MLflow truth: identity, current records, runs left RUNNING


def test_the_artifacts_name_the_current_records_never_superseded_ones(
    tmp_path, mlflow_server, no_env_uri
):
    from pipeline.run.tracking import _log_records  # what log_run does with the records

    cfg = Config(output_dir=str(tmp_path / "out"), run_id="r1", method=["cot", "latentseek"],
                 mlflow_tracking_uri=mlflow_server.url, mlflow_experiment="current")  # fmt: skip
    rd = _record_run(cfg)
    client = MlflowClient(mlflow_server.url)
    run = start_run(cfg)
    _log_records(client, run, [], rd, DATASET_INFO)
    first = client.get_run(run).data.tags[RECORDS_TAG]
    # a resume records one more row, then compacts: other shards hold the same rows and more
    more = ProblemResult("c", "gsm8k", "cot", "q", "3", final_answer="3", final_correct=True)
    RecordStore(rd).write([more], "r1", "tiny", worker="w0")
    RecordStore(rd).compact()
    _log_records(client, run, [], rd, DATASET_INFO)
    current = client.get_run(run).data.tags[RECORDS_TAG]
    assert current != first and current.startswith("records/")
    manifest = json.loads(
        Path(
            client.download_artifacts(run, "records/current.json", str(tmp_path / "m"))
        ).read_text()
    )
    assert manifest["folder"] == current
    rows = pd.concat(
        pd.read_parquet(client.download_artifacts(run, f"{current}/{f}", str(tmp_path / "d")))
        for f in manifest["files"]
        if f.startswith("problems/")
    )
    assert len(rows) == 5 and not rows.duplicated(["problem_id", "method"]).any()


def test_one_directory_is_one_run_by_its_identity_not_its_path(tmp_path, mlflow_server, no_env_uri):
    """The same directory at another path (another mount) finds its run; another directory at
    the same path (another host with the same layout, or the directory made again) is
    refused."""
    store = mlflow_server.url
    cfg = Config(output_dir=str(tmp_path / "a"), run_id="r1", mlflow_tracking_uri=store,
                 mlflow_experiment="identity")  # fmt: skip
    first = start_run(cfg)
    client = MlflowClient(store)
    identity = (tmp_path / "a" / "r1" / "run_dir_id").read_text().strip()
    assert client.get_run(first).data.tags[IDENTITY_TAG] == identity
    (tmp_path / "a").rename(tmp_path / "mounted-elsewhere")
    moved = cfg.replace(output_dir=str(tmp_path / "mounted-elsewhere"))
    assert start_run(moved) == first
    assert client.get_run(first).data.tags[RUN_DIR_TAG] == str(tmp_path / "mounted-elsewhere/r1")
    run_dir(moved).rename(tmp_path / "old")  # made again there: another identity
    with pytest.raises(ForeignRunError, match="another directory at that path"):
        start_run(moved)


def test_a_run_left_running_is_marked_killed_when_its_directory_is_taken(
    tmp_path, mlflow_server, no_env_uri, monkeypatch
):
    import ray

    from jobs.run import run_evaluation

    class RayStarted(Exception):
        pass

    def refuse(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("jobs.run.start_ray", refuse)
    cfg = Config(output_dir=str(tmp_path / "out"), run_id="r1", method=["cot"], limit=1,
                 mlflow_tracking_uri=mlflow_server.url, mlflow_experiment="left")  # fmt: skip
    left = start_run(cfg)  # its driver SIGKILLed: RUNNING forever
    client = MlflowClient(resolve_tracking_uri(cfg))
    assert client.get_run(left).info.status == "RUNNING"
    with pytest.raises(RayStarted):
        run_evaluation(cfg, progress=False, log=lambda m: None)
    assert _statuses(client, left) == {"KILLED"}
