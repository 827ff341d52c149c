"""MLflow tracking of evaluations and sweeps; the only module that imports mlflow.

What the store holds (one experiment, tagged as a model-training experiment):

- An evaluation (`latentseek run`, or one point of a sweep) is one MLflow run, found again by
  the tag `latentseek.run_id` and its run directory's identity (`latentseek.run_dir_id`, the
  UUID written once in the directory: `pipeline.run.rundir.run_identity`) on resume; its
  resolved path (`latentseek.run_dir`) is information only. A run_id whose run belongs to
  another directory (two output_dirs, two sweeps of the same name, two hosts with the same
  layout, on one store) is refused (`ForeignRunError`, `check_run_dir`), never logged into;
  one still RUNNING when its directory's lock is taken is marked KILLED (its driver is gone).
  It is opened when the evaluation starts (`start_run`)
  and spans it: live `progress/*` metrics (step = records done) while it runs, then the
  run-level totals (`run_problems_per_hour`, `run_failures`, `worker_failures`), the config as
  params, the dataset as an input, and the artifacts: the current records under
  records/<digest>/{problems,iterations}/ (named by records/current.json and the tag
  `latentseek.records`: a resume after a compaction adds a folder, never mixes shards),
  config.yaml, invocations.jsonl, the summary files and the report (under report/; its Table 1 also as the
  MLflow table report/table.json).
- Each method of an evaluation is a run nested under it (`mlflow.parentRunId`), named
  `<evaluation's name> · <method>`, holding that method's row of the summary table under the
  column names (`final_accuracy`, `mean_final_reward`, ...: the same names for every method,
  evaluation and sweep point, and in the records' tables, so the compare view lines them up),
  the scaling curve `accuracy_at_iteration` and the reward trajectory
  `mean_reward_at_iteration` with `step = k`, the config as params with `method` set to that
  method, and the tags method, dataset, model, reward and `latentseek.run_id` to group and
  filter by. Found again by its parent and method on resume, never created twice.
- A sweep is a parent run named after the sweep with its points nested under it, executed
  (`log_run`) and derived (`log_derived_run`, metrics read off an executed point's records)
  alike, each with its method runs; found again by the sweep's name and directory.

A run that does not finish is marked: a failure (or interrupt) while evaluating, finishing or
sweeping ends its runs FAILED (KILLED) before the error goes on (`end_run`).

Every run carries `latentseek.kind`: evaluation, method or sweep. An evaluation is named after
the run_id its user chose, else after what it evaluates (`gsm8k cot+latentseek embedded`); a
caller names it with MLflow's own tag `mlflow.runName` (a sweep point: the values that vary,
`lr=0.01 max_iters=4`). Names are given when a run is created, never changed on resume.

MLflow params are immutable, so on resume only new keys are logged; a key whose value changed
is kept as the tag `latentseek.resumed_param.<key>` instead of failing. A metric value equal to
the one already logged is not logged again, so a resume does not duplicate the history.
Timings are logged rounded (seconds to the millisecond, rates per hour to 0.1), as the UI
prints every digit; everything else is logged as computed.

This module reads the records (`pipeline.run.records`) but no analysis code: the driver computes
the tables, writes the summary files and hands both over.

The client API is used throughout (no `mlflow.set_tracking_uri`, no active-run globals).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# MLflow's usage telemetry would try the network at every call; this tool never sends any.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow.data  # noqa: E402
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT, Config
from pipeline.run.records import ITERATIONS, PROBLEMS, RecordStore
from pipeline.run.rundir import CONFIG_FILE, INVOCATIONS_FILE, redact, run_dir, run_identity

RUN_ID_TAG = "latentseek.run_id"
RUN_DIR_TAG = "latentseek.run_dir"  # an evaluation's resolved run directory (a sweep's: its dir)
IDENTITY_TAG = "latentseek.run_dir_id"  # its identity (`rundir.run_identity`): what finds it
RECORDS_TAG = "latentseek.records"  # the artifact folder that holds the current records
SWEEP_TAG = "latentseek.sweep"  # on a sweep's parent run: the sweep's name
KIND_TAG = "latentseek.kind"  # what a run is: one of the three below
EVALUATION, METHOD, SWEEP = "evaluation", "method", "sweep"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a run under another in the UI
RUN_NAME_TAG = "mlflow.runName"  # MLflow's own: the run's name (read at creation only)
TABLES_TAG = "mlflow.loggedArtifacts"  # MLflow's own: the run's tables (JSON list)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "model training" view
CHANGED_PARAM_TAG = "latentseek.resumed_param."
CURVE_SUFFIX = "_at_iteration"  # accuracy -> accuracy_at_iteration, logged with step = k
CURVE_METRIC = "accuracy" + CURVE_SUFFIX
ARTIFACT_DIR = "mlartifacts"
DB_FILE = "mlflow.db"
UI_PORT = 5000

_BATCH = 100  # MLflow's per-request limit for params and tags (metrics allow 1000)
_NOISY_LOGGERS = ("mlflow", "alembic", "sqlalchemy")
logger = logging.getLogger(__name__)


class ForeignRunError(RuntimeError):
    """The MLflow run of this run_id belongs to another run directory; the message names both."""


def _default_uri(cfg: Config) -> str:
    return f"sqlite:///{Path(cfg.output_dir).resolve() / DB_FILE}"


def resolve_tracking_uri(cfg: Config) -> str:
    """cfg.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite under output_dir."""
    return cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_uri(cfg)


def _is_server(uri: str) -> bool:
    """A tracking server, which decides where artifacts go (else MLflow would use the CWD)."""
    return uri.startswith(("http://", "https://", "databricks"))


# MLflow 3.17's UI opens an experiment on its GenAI overview unless the URL asks for the model
# training view (the experiment's kind tag alone does not change that, checked in test_ui).
TRAINING_VIEW = "?workflowType=machine_learning"


def ui_command(cfg: Config) -> str:
    """The shell command that shows this run's store in a browser, and the page to open."""
    uri = resolve_tracking_uri(cfg)
    if _is_server(uri):  # printed: without a password the URI may carry
        page = redact(uri).rstrip("/") + "/#/" + TRAINING_VIEW
        return f"python -m webbrowser {shlex.quote(page)}"
    exe = Path(sys.executable).parent / "mlflow"  # the environment's own mlflow, if there
    mlflow_cmd = shlex.quote(str(exe)) if exe.exists() else "mlflow"
    return (
        f"{mlflow_cmd} ui --backend-store-uri {shlex.quote(uri)} --port {UI_PORT}  "
        f"# then open http://127.0.0.1:{UI_PORT}/#/{TRAINING_VIEW}"
    )


def git_commit(cwd: Path = PROJECT_ROOT) -> str:
    """`git rev-parse HEAD` of the project, or "unknown" (not a checkout, no git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Config dict -> MLflow params: nested keys joined with ".", lists joined with ",", every
    value `redact`ed (no password or token of a URI is ever logged)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = redact(",".join(str(v) for v in value))
        else:
            flat[name] = "" if value is None else redact(str(value))
    return flat


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence MLflow's INFO chatter (database creation, migrations) and its warnings."""
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _experiment_id(client: MlflowClient, cfg: Config, uri: str) -> str:
    """The experiment's id, created if needed, tagged as a model-training experiment (MLflow's
    own kind tag; MLflow 3.17's UI still needs `TRAINING_VIEW` in the URL to open on runs)."""
    name = cfg.mlflow_experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not _is_server(uri):  # keep artifacts beside the records, never in the CWD
            location = (Path(cfg.output_dir).resolve() / ARTIFACT_DIR).as_uri()
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
            )
            return experiment_id
        except MlflowException:  # created meanwhile by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise MlflowException(
            f"MLflow experiment {name!r} is deleted; restore it in the MLflow UI or set "
            "mlflow_experiment=<another name>"
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def find_run(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    tag: str = RUN_ID_TAG,
    directory: Path | str | None = None,
) -> str | None:
    """The MLflow run id of the newest active run whose `tag` is `run_id` (by default: the
    evaluation run of this LatentSeek run_id, not one of its method runs), if any.

    With `directory`, only that directory's run is found: the one tagged with its identity
    (`latentseek.run_dir_id`, `rundir.run_identity`), whatever path it is mounted at now; else a
    run logged before identities existed (no identity tag) at this path or without a path. The
    path (`latentseek.run_dir`) is kept as information only. Raises ForeignRunError if the only
    such runs belong to other directories (another identity: another host's directory at the
    same path, or this directory deleted and made again)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tag}` = '{run_id}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=100,
        order_by=["attributes.start_time DESC"],
    )
    runs = [r for r in runs if r.data.tags.get(KIND_TAG) != METHOD]
    if directory is None or not runs:
        return runs[0].info.run_id if runs else None
    here = str(Path(directory).resolve())
    identity = run_identity(directory)
    for r in runs:
        if identity and r.data.tags.get(IDENTITY_TAG) == identity:
            return r.info.run_id
    for wanted in (here, None):
        for r in runs:
            if IDENTITY_TAG not in r.data.tags and r.data.tags.get(RUN_DIR_TAG) == wanted:
                return r.info.run_id
    there = runs[0].data.tags.get(RUN_DIR_TAG, "another directory")
    other = runs[0].data.tags.get(IDENTITY_TAG)
    same = f" (another directory at that path: identity {other}, here {identity or 'new'})"
    raise ForeignRunError(
        f"MLflow run {runs[0].info.run_id} ({tag.removeprefix('latentseek.')}={run_id!r}) in "
        f"experiment {client.get_experiment(experiment_id).name!r} belongs to {there}, not to "
        f"{here}{same if there == here else ''}; use another run_id (or sweep name), or "
        "mlflow_experiment=<another name>, so that the two are not logged as one (or delete "
        "that MLflow run if its directory is gone)"
    )


# jobs.run.resolve_run_id's ids when the user gives none: a timestamp, which names nothing.
_GENERATED_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def run_name(cfg: Config) -> str:
    """An evaluation's MLflow run name: the run_id its user chose, else what it evaluates,
    `<dataset> <method>+<method> <model>` (e.g. `gsm8k cot+latentseek embedded`)."""
    if cfg.run_id and not _GENERATED_RUN_ID.fullmatch(cfg.run_id):
        return cfg.run_id
    model = str(cfg.model).rstrip("/").rsplit("/", 1)[-1]
    return f"{cfg.dataset} {'+'.join(cfg.method)} {model}"


def _open(client: MlflowClient, experiment_id: str, cfg: Config, name: str) -> str:
    """The evaluation run of this LatentSeek run_id and run directory, found again or created
    (as `name`), set RUNNING."""
    run_id, directory = str(cfg.run_id), _run_dir(cfg)
    mlflow_run = find_run(client, experiment_id, run_id, directory=directory)
    if mlflow_run is None:  # written once the run is known to be this directory's
        tags = {RUN_ID_TAG: run_id, KIND_TAG: EVALUATION, RUN_DIR_TAG: directory}
        tags[IDENTITY_TAG] = run_identity(directory, create=True)
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.update_run(mlflow_run, status=RunStatus.to_string(RunStatus.RUNNING))
    return mlflow_run


def _method_runs(
    client: MlflowClient, experiment_id: str, parent: str, methods: Sequence[str]
) -> dict[str, str]:
    """method -> its run nested under the evaluation run `parent`, found again (by parent and
    method) or created as `<parent's name> · <method>`; all of them set RUNNING."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{KIND_TAG}` = '{METHOD}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    runs: dict[str, str] = {}
    for r in found:
        runs.setdefault(r.data.tags.get("method", ""), r.info.run_id)
    name = client.get_run(parent).info.run_name
    for method in dict.fromkeys(methods):
        if method in runs:
            client.update_run(runs[method], status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            tags = {PARENT_TAG: parent, KIND_TAG: METHOD, "method": method}
            runs[method] = client.create_run(
                experiment_id, run_name=f"{name} · {method}", tags=tags
            ).info.run_id
    return {m: runs[m] for m in dict.fromkeys(methods)}


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def method_metrics(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    """method -> {column: value} for every numeric column of the summary table."""
    columns = [
        c
        for c in summary.columns
        if pd.api.types.is_numeric_dtype(summary[c]) and not pd.api.types.is_bool_dtype(summary[c])
    ]
    return {
        row["method"]: {c: float(row[c]) for c in columns} for row in summary.to_dict("records")
    }


Curves = dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)]


def method_curves(curves: pd.DataFrame | None) -> dict[str, Curves]:
    """method -> {`<column>_at_iteration`: [(k, value)]} for every value column of `curves`
    (`method, iteration, accuracy[, mean_reward]`)."""
    if curves is None or curves.empty:
        return {}
    columns = [c for c in curves.columns if c not in ("method", "iteration")]
    return {
        str(method): {
            c + CURVE_SUFFIX: list(zip(g["iteration"].astype(int), g[c].astype(float), strict=True))
            for c in columns
        }
        for method, g in curves.groupby("method", sort=False)
    }


def _log_params(client: MlflowClient, mlflow_run: str, params: dict[str, str]) -> None:
    existing = client.get_run(mlflow_run).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = [
        RunTag(CHANGED_PARAM_TAG + k, v) for k, v in params.items() if existing.get(k, v) != v
    ]
    for chunk in _chunks(new, _BATCH):
        client.log_batch(mlflow_run, params=chunk)
    for chunk in _chunks(changed, _BATCH):
        client.log_batch(mlflow_run, tags=chunk)


def _log_tags(client: MlflowClient, mlflow_run: str, tags: Mapping[str, str]) -> None:
    items = [RunTag(str(k), str(v)) for k, v in tags.items() if k != RUN_NAME_TAG]
    for chunk in _chunks(items, _BATCH):
        client.log_batch(mlflow_run, tags=chunk)


def _rounded(name: str, value: float) -> float:
    """Timings without their noise digits (the UI prints every digit): seconds to the
    millisecond, rates per hour to 0.1."""
    if name.endswith("_seconds"):
        return round(value, 3)
    if name.endswith("_per_hour"):
        return round(value, 1)
    return value


def _log_metrics(
    client: MlflowClient,
    mlflow_run: str,
    scalars: Mapping[str, float],
    curves: Curves | None = None,
) -> None:
    """Log scalars (step 0) and curves (step=k), skipping values already logged unchanged."""
    now = int(time.time() * 1000)
    latest = client.get_run(mlflow_run).data.metrics
    values = {k: _rounded(k, float(v)) for k, v in scalars.items()}
    metrics = [
        Metric(k, v, now, 0) for k, v in values.items() if math.isfinite(v) and latest.get(k) != v
    ]
    for key, points in (curves or {}).items():
        seen: dict[int, float] = {}
        if key in latest:
            for m in client.get_metric_history(mlflow_run, key):  # ordered by time
                seen[m.step] = m.value
        metrics += [
            Metric(key, float(v), now, int(k))
            for k, v in points
            if math.isfinite(v) and seen.get(int(k)) != float(v)
        ]
    for chunk in _chunks(metrics, 1000):
        client.log_batch(mlflow_run, metrics=chunk)


def _log_dataset(
    client: MlflowClient,
    mlflow_runs: Sequence[str],
    problems: pd.DataFrame,
    info: Mapping[str, Any],
) -> None:
    frame = (
        problems[["problem_id", "question"]]
        .drop_duplicates("problem_id")
        .astype(str)
        .reset_index(drop=True)
    )
    dataset = mlflow.data.from_pandas(
        frame,
        name=str(info.get("name") or "dataset"),
        # MLflow caps digests at 36 characters; ours are sha256 hex strings.
        digest=str(info["digest"])[:32] if info.get("digest") else None,
    )
    entity = dataset._to_mlflow_entity()  # what mlflow.log_input does; there is no public twin
    for run in mlflow_runs:
        client.log_inputs(
            run, [DatasetInput(entity, [InputTag("mlflow.data.context", "evaluation")])]
        )


def _log_table(
    client: MlflowClient, mlflow_run: str, artifact_file: str, frame: pd.DataFrame
) -> None:
    """`frame` as an MLflow table: the JSON file `MlflowClient.log_table` writes, listed in the
    run's `mlflow.loggedArtifacts` tag. Written here because `log_table` appends to a table
    already logged, which would double its rows on every resume; this replaces it."""
    sub, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.to_json(path, orient="split", index=False, date_format="iso")  # NaN -> null
        client.log_artifact(mlflow_run, str(path), artifact_path=sub or None)
    logged = json.loads(client.get_run(mlflow_run).data.tags.get(TABLES_TAG, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(mlflow_run, TABLES_TAG, json.dumps([*logged, entry]))


def _log_files(client: MlflowClient, mlflow_run: str, files: Sequence[Path | str]) -> None:
    for path in map(Path, files):  # the summary files, and the report's under report/
        sub = "report" if path.parent.name == "report" else None
        client.log_artifact(mlflow_run, str(path), artifact_path=sub)


def _terminate(client: MlflowClient, runs: Sequence[str], status: RunStatus | int) -> None:
    for run in runs:
        client.set_terminated(run, RunStatus.to_string(status))


# ------------------------------------------------------------------------------------------
# An evaluation and its method runs


def _run_dir(cfg: Config) -> str:
    return str(run_dir(cfg).resolve())


def _evaluation_tags(cfg: Config, tags: Mapping[str, str]) -> dict[str, str]:
    commit = git_commit()
    return {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": ",".join(cfg.method),
        "reward": cfg.reward,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        **{str(k): str(v) for k, v in tags.items()},
        RUN_ID_TAG: str(cfg.run_id),
        RUN_DIR_TAG: _run_dir(cfg),
        IDENTITY_TAG: run_identity(_run_dir(cfg), create=True),
        KIND_TAG: EVALUATION,
    }


def _prepare(
    client: MlflowClient,
    experiment_id: str,
    cfg: Config,
    tags: Mapping[str, str],
    methods: Sequence[str],
) -> tuple[str, dict[str, str]]:
    """The evaluation run and its method runs, found again or created, RUNNING, with their
    tags and params: (evaluation run, {method: method run})."""
    tags = {str(k): str(v) for k, v in tags.items()}
    run = _open(client, experiment_id, cfg, tags.get(RUN_NAME_TAG) or run_name(cfg))
    evaluation_tags = _evaluation_tags(cfg, tags)
    _log_tags(client, run, evaluation_tags)
    _log_params(client, run, flatten_params(cfg.to_dict()))
    runs = _method_runs(client, experiment_id, run, methods)
    for method, method_run in runs.items():
        own = {"method": method, KIND_TAG: METHOD, PARENT_TAG: run}
        _log_tags(client, method_run, {**evaluation_tags, **own})
        _log_params(client, method_run, flatten_params({**cfg.to_dict(), "method": [method]}))
    return run, runs


def check_run_dir(cfg: Config) -> None:
    """Before any work, holding the run directory's lock: raise ForeignRunError if the MLflow
    run of cfg.run_id belongs to another run directory (creates nothing but the store); a run
    of this directory that MLflow still shows RUNNING (its driver was killed outright, or
    lost its tracking server) is marked KILLED, since no driver runs it now."""
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        run = find_run(client, experiment_id, str(cfg.run_id), directory=_run_dir(cfg))
        if run and client.get_run(run).info.status == "RUNNING":
            end_run(cfg, run, "KILLED")


def start_run(cfg: Config, tags: Mapping[str, str] | None = None) -> str:
    """The evaluation's MLflow run (found again by run_id on resume, else created) and its
    method runs, RUNNING, with the config as params and `tags`; `log_run` finishes them."""
    if not cfg.run_id:
        raise ValueError("start_run needs cfg.run_id")
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        run, _ = _prepare(client, experiment_id, cfg, dict(tags or {}), cfg.method)
    return run


def log_run(
    cfg: Config,
    run_dir: Path | str,
    summary: pd.DataFrame,
    curve: pd.DataFrame,
    dataset_info: Mapping[str, Any],
    files: Sequence[Path | str] = (),
    extra_metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> str:
    """Log a finished evaluation (its config, tags, metrics, dataset, records and report) and
    finish its runs; returns the evaluation's MLflow run id.

    `summary` is the per-method table (`analysis.tables.summary_table`: a `method` column and
    numeric columns), `curve` the curves per k (`method, iteration, accuracy[, mean_reward]`:
    `analysis.tables.iteration_curves`), `dataset_info` holds the dataset's `name` and
    `digest`, `files` are logged as artifacts (the summary files the driver wrote, and the
    report's under report/), `extra_metrics` are run-level totals, `tables` maps an artifact
    file (`report/table.json`) to a table logged as an MLflow table.
    """
    if not cfg.run_id:
        raise ValueError("log_run needs cfg.run_id: resolve the run's name before logging it")
    run_dir = Path(run_dir)
    scalars = method_metrics(summary)
    methods = [*cfg.method, *(m for m in scalars if m not in cfg.method)]
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        run, runs = _prepare(client, experiment_id, cfg, dict(tags or {}), methods)
        try:
            _log_metrics(client, run, dict(extra_metrics or {}))
            curves = method_curves(curve)
            for method, method_run in runs.items():
                _log_metrics(client, method_run, scalars.get(method, {}), curves.get(method))
            _log_records(client, run, list(runs.values()), run_dir, dataset_info)
            _log_files(client, run, files)
            for artifact_file, frame in (tables or {}).items():
                _log_table(client, run, artifact_file, frame)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)  # SIGINT, or jobs.run's SIGTERM
            end_run(cfg, run, "KILLED" if interrupted else "FAILED")
            raise
        _terminate(client, [*runs.values(), run], RunStatus.FINISHED)
    return run


def _log_records(
    client: MlflowClient,
    run: str,
    method_runs: list[str],
    run_dir: Path,
    dataset_info: Mapping[str, Any],
) -> None:
    """The dataset as an input of every run; config.yaml and invocations.jsonl as the
    evaluation's; the committed records (no temporary files, orphans or superseded shards) in
    one folder per set of shards, `records/<digest of their names>/{problems,iterations}/`,
    named by the tag `latentseek.records` and by `records/current.json` (the folder and its
    files). A resume after a compaction logs a new folder beside the old one (artifacts cannot
    be deleted through MLflow), so a reader takes the current one, never both."""
    store = RecordStore(run_dir)
    problems = store.read_problems()
    if not problems.empty:
        _log_dataset(client, [run, *method_runs], problems, dataset_info)
    committed = dict(zip((PROBLEMS, ITERATIONS), store.committed_files(), strict=True))
    names = sorted(f"{sub}/{Path(p).name}" for sub, shards in committed.items() for p in shards)
    folder = "records/" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    for sub, shards in committed.items():
        for path in shards:
            client.log_artifact(run, str(path), artifact_path=f"{folder}/{sub}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "current.json"
        manifest.write_text(json.dumps({"folder": folder, "files": names}, indent=1))
        client.log_artifact(run, str(manifest), artifact_path="records")
    client.set_tag(run, RECORDS_TAG, folder)
    for name in (CONFIG_FILE, INVOCATIONS_FILE):
        if (run_dir / name).is_file():
            client.log_artifact(run, str(run_dir / name))


# ------------------------------------------------------------------------------------------
# The run while it runs: live progress metrics, a failed or interrupted evaluation marked as such.

PROGRESS_PREFIX = "progress/"


def log_progress(cfg: Config, mlflow_run: str, step: int, values: Mapping[str, float]) -> None:
    """Live metrics while the evaluation runs: `progress/<name>` at step = records done."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(PROGRESS_PREFIX + k, float(v), now, int(step))
        for k, v in values.items()
        if math.isfinite(v)
    ]
    with _quiet():
        MlflowClient(tracking_uri=resolve_tracking_uri(cfg)).log_batch(mlflow_run, metrics=metrics)


def end_run(cfg: Config, mlflow_run: str, status: str) -> bool:
    """Mark an evaluation that did not finish, and its method runs still running: status
    "FAILED" or "KILLED". Called while an error goes on, so it never raises: a failure here
    (the tracking server down, a locked database) is logged and False returned, and the
    original error stays the one the user sees."""
    try:
        with _quiet():
            client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
            experiment_id = client.get_run(mlflow_run).info.experiment_id
            children = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{mlflow_run}' and tags.`{KIND_TAG}` = "
                f"'{METHOD}' and attributes.status = 'RUNNING'",
                max_results=1000,
            )
            for run in [*(r.info.run_id for r in children), mlflow_run]:
                client.set_terminated(run, status)
    except Exception as exc:  # noqa: BLE001 - any failure here must not hide the error going on
        logger.warning(
            "could not mark MLflow run %s %s in %s: %s: %s",
            mlflow_run, status, redact(resolve_tracking_uri(cfg)), type(exc).__name__,
            redact(str(exc)),
        )  # fmt: skip
        return False
    return True


# ------------------------------------------------------------------------------------------
# Sweeps: a parent run, nested point runs (executed ones via log_run with PARENT_TAG), and
# derived points (metrics read off an executed point's records, no records of their own).


def _client_and_experiment(cfg: Config) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    return client, _experiment_id(client, cfg, uri)


def open_sweep_run(cfg: Config, name: str, params: Mapping[str, Any], directory: Path | str) -> str:
    """The sweep's parent run (found again by its name and `directory`, the sweep's, on resume;
    ForeignRunError if it belongs to another directory), set RUNNING."""
    directory = str(Path(directory).resolve())
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        parent = find_run(client, experiment_id, name, tag=SWEEP_TAG, directory=directory)
        identity = run_identity(directory, create=True)
        if parent is not None:
            client.update_run(parent, status=RunStatus.to_string(RunStatus.RUNNING))
            client.set_tag(parent, RUN_DIR_TAG, directory)  # where it is mounted now
            client.set_tag(parent, IDENTITY_TAG, identity)  # a parent logged before the tag
        else:
            tags = {SWEEP_TAG: name, KIND_TAG: SWEEP, RUN_DIR_TAG: directory}
            tags[IDENTITY_TAG] = identity
            parent = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        _log_params(client, parent, flatten_params(dict(params)))
    return parent


def log_derived_run(
    cfg: Config,
    parent: str,
    metrics: Mapping[str, Mapping[str, float]],
    tags: Mapping[str, str],
    curves: pd.DataFrame | None = None,
) -> str:
    """A sweep point whose results are read off another point's records: an evaluation run
    nested under the sweep's `parent` with the point's config as params, and a run per method
    holding `metrics[method]` and its `curves` under the names of an executed point's."""
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        all_tags = {**{k: str(v) for k, v in tags.items()}, PARENT_TAG: parent}
        methods = [*cfg.method, *(m for m in metrics if m not in cfg.method)]
        run, runs = _prepare(client, experiment_id, cfg, all_tags, methods)
        per_method = method_curves(curves)
        for method, method_run in runs.items():
            _log_metrics(client, method_run, dict(metrics.get(method, {})), per_method.get(method))
        _terminate(client, [*runs.values(), run], RunStatus.FINISHED)
    return run


def close_sweep_run(
    cfg: Config,
    parent: str,
    files: Sequence[Path | str],
    scalars: Mapping[str, float],
    tables: Mapping[str, pd.DataFrame] | None = None,
    params: Mapping[str, str] | None = None,
) -> None:
    """Log the sweep's report files (and `tables` as MLflow tables), totals and `params` (the
    scaling laws' forms, for one) to its parent run and mark it finished."""
    with _quiet():
        client, _ = _client_and_experiment(cfg)
        _log_metrics(client, parent, {k: float(v) for k, v in scalars.items()})
        _log_params(client, parent, {k: str(v) for k, v in (params or {}).items()})
        _log_files(client, parent, files)
        for artifact_file, frame in (tables or {}).items():
            _log_table(client, parent, artifact_file, frame)
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))
