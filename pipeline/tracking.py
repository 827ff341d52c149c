"""MLflow tracking of a finished (or resumed) run; the only module that imports mlflow.

`log_run` records one LatentSeek run as one MLflow run, found again by the tag
`latentseek.run_id`, so that resuming a run logs into the same MLflow run:

- params: the flattened config (lists joined with ","). MLflow params are immutable, so on
  resume only new keys are logged; a key whose value changed is kept as the tag
  `latentseek.resumed_param.<key>` instead of failing.
- tags: model, dataset, method, reward, git_commit (also `mlflow.source.git.commit`), the
  caller's tags, and `latentseek.run_id`.
- metrics: every numeric column of the summary table under its own name, always prefixed by
  the method (`<method>/final_accuracy`, `<method>/mean_final_reward`, ...: one name per
  metric across records, tables and MLflow), the scaling curve as
  `<method>/accuracy_at_iteration` with `step=k`, and the caller's run-level metrics as given
  (unprefixed). A value equal to the one already logged is not logged again, so a resume does
  not duplicate the history.
- the dataset as an MLflow input (context "evaluation");
- artifacts: problems/, iterations/, config.yaml, invocations.jsonl, and the files the caller
  hands over (the driver's summary.md, summary.csv and accuracy_by_iteration.csv).

This module reads the records (`pipeline.records`) but no analysis code: the driver computes
the tables and writes the summary files, and hands both over.

The client API is used throughout (no `mlflow.set_tracking_uri`, no active-run globals).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import subprocess
import sys
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
from pipeline.records import CONFIG_FILE, INVOCATIONS_FILE, ITERATIONS, PROBLEMS, RecordStore

RUN_ID_TAG = "latentseek.run_id"
SWEEP_TAG = "latentseek.sweep"  # on a sweep's parent run: the sweep's name
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a run under another in the UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "model training" view
CHANGED_PARAM_TAG = "latentseek.resumed_param."
CURVE_METRIC = "accuracy_at_iteration"
ARTIFACT_DIR = "mlartifacts"
DB_FILE = "mlflow.db"
UI_PORT = 5000

_BATCH = 100  # MLflow's per-request limit for params and tags (metrics allow 1000)
_NOISY_LOGGERS = ("mlflow", "alembic", "sqlalchemy")


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
    if _is_server(uri):
        return f"python -m webbrowser {shlex.quote(uri.rstrip('/') + '/#/' + TRAINING_VIEW)}"
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
    """Config dict -> MLflow params: nested keys joined with ".", lists joined with ","."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = "" if value is None else str(value)
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
    client: MlflowClient, experiment_id: str, run_id: str, tag: str = RUN_ID_TAG
) -> str | None:
    """The MLflow run id of the newest active run whose `tag` is `run_id` (by default: the run
    of this LatentSeek run_id), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tag}` = '{run_id}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def _open(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """The MLflow run of this LatentSeek run_id, found again or created, set RUNNING."""
    mlflow_run = find_run(client, experiment_id, run_id)
    if mlflow_run is None:
        return client.create_run(
            experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id}
        ).info.run_id
    client.update_run(mlflow_run, status=RunStatus.to_string(RunStatus.RUNNING))
    return mlflow_run


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def method_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """`<method>/<column>` -> value for every numeric column of the summary table."""
    columns = [
        c
        for c in summary.columns
        if pd.api.types.is_numeric_dtype(summary[c]) and not pd.api.types.is_bool_dtype(summary[c])
    ]
    return {
        f"{row['method']}/{c}": float(row[c]) for row in summary.to_dict("records") for c in columns
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


def _log_metrics(
    client: MlflowClient,
    mlflow_run: str,
    scalars: dict[str, float],
    curves: dict[str, list[tuple[int, float]]],
) -> None:
    """Log scalars (step 0) and curves (step=k), skipping values already logged unchanged."""
    now = int(time.time() * 1000)
    latest = client.get_run(mlflow_run).data.metrics
    metrics = [
        Metric(k, float(v), now, 0)
        for k, v in scalars.items()
        if math.isfinite(v) and latest.get(k) != float(v)
    ]
    for key, points in curves.items():
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
    client: MlflowClient, mlflow_run: str, problems: pd.DataFrame, info: Mapping[str, Any]
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
    client.log_inputs(
        mlflow_run, [DatasetInput(entity, [InputTag("mlflow.data.context", "evaluation")])]
    )


def log_run(
    cfg: Config,
    run_dir: Path | str,
    summary: pd.DataFrame,
    curve: pd.DataFrame,
    dataset_info: Mapping[str, Any],
    files: Sequence[Path | str] = (),
    extra_metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log a run's config, tags, metrics, dataset and records to MLflow; returns the run id.

    `summary` is the per-method table (`analysis.tables.summary_table`: a `method` column and
    numeric columns), `curve` the scaling curve (`method, iteration, accuracy`),
    `dataset_info` holds the dataset's `name` and `digest`, `files` are logged as top-level
    artifacts (the summary files the driver wrote).
    """
    if not cfg.run_id:
        raise ValueError("log_run needs cfg.run_id: resolve the run's name before logging it")
    run_dir = Path(run_dir)
    uri = resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, cfg, uri)
        mlflow_run = _open(client, experiment_id, cfg.run_id)
        try:
            _log_everything(
                client, mlflow_run, cfg, run_dir, summary, curve, dataset_info,
                [Path(f) for f in files], dict(extra_metrics or {}), dict(tags or {}),
            )  # fmt: skip
        except BaseException:
            client.set_terminated(mlflow_run, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_terminated(mlflow_run, RunStatus.to_string(RunStatus.FINISHED))
    return mlflow_run


def _log_everything(
    client: MlflowClient,
    mlflow_run: str,
    cfg: Config,
    run_dir: Path,
    summary: pd.DataFrame,
    curve: pd.DataFrame,
    dataset_info: Mapping[str, Any],
    files: list[Path],
    extra_metrics: dict[str, float],
    tags: dict[str, str],
) -> None:
    commit = git_commit()
    all_tags = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": ",".join(cfg.method),
        "reward": cfg.reward,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        **{str(k): str(v) for k, v in tags.items()},
        RUN_ID_TAG: cfg.run_id,
    }
    for chunk in _chunks([RunTag(k, v) for k, v in all_tags.items()], _BATCH):
        client.log_batch(mlflow_run, tags=chunk)
    _log_params(client, mlflow_run, flatten_params(cfg.to_dict()))

    scalars = {str(k): float(v) for k, v in extra_metrics.items()}
    scalars.update(method_metrics(summary))
    curves = {
        f"{method}/{CURVE_METRIC}": list(zip(g["iteration"], g["accuracy"], strict=True))
        for method, g in curve.groupby("method", sort=False)
    }
    _log_metrics(client, mlflow_run, scalars, curves)

    store = RecordStore(run_dir)
    problems = store.read_problems()
    if not problems.empty:
        _log_dataset(client, mlflow_run, problems, dataset_info)

    # Committed shards only: no temporary files, orphans or superseded shards.
    for sub, shards in zip((PROBLEMS, ITERATIONS), store.committed_files(), strict=True):
        for path in shards:
            client.log_artifact(mlflow_run, str(path), artifact_path=sub)
    for name in (CONFIG_FILE, INVOCATIONS_FILE):
        if (run_dir / name).is_file():
            client.log_artifact(mlflow_run, str(run_dir / name))
    for path in files:  # the summary files, and the report's under report/
        sub = "report" if path.parent.name == "report" else None
        client.log_artifact(mlflow_run, str(path), artifact_path=sub)


# ------------------------------------------------------------------------------------------
# The run while it runs: opened when the evaluation starts (so its duration spans the work),
# live progress metrics, a failed or interrupted evaluation marked as such.

PROGRESS_PREFIX = "progress/"


def start_run(cfg: Config, tags: Mapping[str, str] | None = None) -> str:
    """The evaluation's MLflow run (found again by run_id on resume, else created), RUNNING,
    with the config as params and `tags`; `log_run` finishes it."""
    if not cfg.run_id:
        raise ValueError("start_run needs cfg.run_id")
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        run = _open(client, experiment_id, cfg.run_id)
        if tags:
            client.log_batch(run, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])
        _log_params(client, run, flatten_params(cfg.to_dict()))
    return run


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


def end_run(cfg: Config, mlflow_run: str, status: str) -> None:
    """Mark a run that did not finish: status "FAILED" or "KILLED"."""
    with _quiet():
        MlflowClient(tracking_uri=resolve_tracking_uri(cfg)).set_terminated(mlflow_run, status)


# ------------------------------------------------------------------------------------------
# Sweeps: a parent run, nested point runs (executed ones via log_run with PARENT_TAG), and
# derived points (metrics read off an executed point's records, no records of their own).


def _client_and_experiment(cfg: Config) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    return client, _experiment_id(client, cfg, uri)


def open_sweep_run(cfg: Config, name: str, params: Mapping[str, Any]) -> str:
    """The sweep's parent run (found again by its name on resume), set RUNNING."""
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        parent = find_run(client, experiment_id, name, tag=SWEEP_TAG)
        if parent is not None:
            client.update_run(parent, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            parent = client.create_run(
                experiment_id, run_name=name, tags={SWEEP_TAG: name}
            ).info.run_id
        _log_params(client, parent, flatten_params(dict(params)))
    return parent


def log_derived_run(
    cfg: Config,
    parent: str,
    scalars: Mapping[str, float],
    tags: Mapping[str, str],
) -> str:
    """A sweep point whose results are read off another point's records: a nested run with the
    point's config as params and the derived metrics, under the same names as an executed run."""
    with _quiet():
        client, experiment_id = _client_and_experiment(cfg)
        run = _open(client, experiment_id, cfg.run_id)
        all_tags = {**{k: str(v) for k, v in tags.items()}, PARENT_TAG: parent}
        client.log_batch(run, tags=[RunTag(k, v) for k, v in all_tags.items()])
        _log_params(client, run, flatten_params(cfg.to_dict()))
        _log_metrics(client, run, {k: float(v) for k, v in scalars.items()}, {})
        client.set_terminated(run, RunStatus.to_string(RunStatus.FINISHED))
    return run


def close_sweep_run(
    cfg: Config, parent: str, files: Sequence[Path | str], scalars: Mapping[str, float]
) -> None:
    """Log the sweep's report files and totals to its parent run and mark it finished."""
    with _quiet():
        client, _ = _client_and_experiment(cfg)
        _log_metrics(client, parent, {k: float(v) for k, v in scalars.items()}, {})
        for path in files:
            path = Path(path)
            sub = "report" if path.parent.name == "report" else None
            client.log_artifact(parent, str(path), artifact_path=sub)
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))
