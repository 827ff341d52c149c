"""`latentseek submit | status | logs | stop`: run an evaluation as a Ray job on a cluster.

latentseek submit [run|sweep] [--config FILE] [--address ADDR] [--no-wait|--follow] [key=value ...]
latentseek status JOB [--address ADDR]
latentseek logs JOB [--follow] [--address ADDR]
latentseek stop JOB [--timeout S] [--address ADDR]

The address is the cluster's job server (its dashboard, `http://HOST:8265`): `--address`, else
$RAY_ADDRESS. `submit` uploads what git tracks of this project (`upload_files`; without git:
the tree without `EXCLUDES`), plus the paths given with `--include`, never a `SECRET_FILES`
file (`.env`), as the job's working directory, and the job's driver runs `python -m jobs.cli run --config FILE key=value ...` in
it on the cluster, with the `python` on the nodes' PATH: every node needs the same environment
as a local run (this project's dependencies; the uploaded code itself travels with the job).
A config file outside the uploaded tree (e.g. `outputs/<run_id>/config.yaml`) travels as its
resolved keys, in a staged copy of the project.

Before submitting, the config is resolved and validated here, and what the job would otherwise
decide on the cluster is fixed in its overrides, so that the submitter can say where records
land: `run_id` (a new one unless given), `output_dir` (made absolute against the current
directory), `mlflow_tracking_uri` (as a local run would resolve it) and `ray_address=auto`
(the driver joins the cluster it runs on). Records are written by the job's driver, on the
machine that runs it (the head node): on a real cluster set `output_dir` to shared storage.

A tracking URI that carries a secret (`https://user:password@host`, `?token=...`) is never put
in the entrypoint, the job's metadata or what `submit` prints: the job gets it as
$MLFLOW_TRACKING_URI in its runtime environment (which the job server keeps, readable by whoever
may submit jobs there), and `mlflow_tracking_uri` is pinned empty so that the driver reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT, Config, ConfigError, load_config
from pipeline.run.rundir import redact, redacted

# Never uploaded with the project: environments, results, caches, build metadata.
EXCLUDES = [
    ".venv", "outputs", "bench-results", "mlruns", "__pycache__", ".pytest_cache",
    ".ruff_cache", ".mypy_cache", ".git", "*.egg-info",
]  # fmt: skip
# Never uploaded, even if git tracks them or --include names them: credentials.
SECRET_FILES = [".env", ".env.*", "*.env", ".netrc", "*.pem", "*.key", "id_rsa*", "id_ed25519*"]
# What `jobs.cli` sets for a local run, where Ray workers inherit it; cluster workers get it here.
JOB_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
STAGED_CONFIG_DIR = "configs/submitted"  # where a config from outside the project travels
START_TIMEOUT_S = 300.0  # submit (no --follow): wait this long for the job to leave PENDING
STOP_TIMEOUT_S = 60.0  # stop: wait this long for the job to end
POLL_S = 1.0
META = "latentseek."  # prefix of the job metadata keys this module writes
# Keys fixed at submit time, so that the submitter knows where the job's records land.
PINNED_KEYS = ("run_id", "output_dir", "mlflow_tracking_uri", "ray_address")
NO_ADDRESS = "no Ray address: pass --address http://HOST:8265 or set RAY_ADDRESS"
COMMANDS = ("submit", "status", "logs", "stop")  # what `add_arguments` adds and `main` runs
# Ray's job client logs each packaging step and websocket close at INFO; errors still show.
RAY_CLIENT_LOGGERS = ("ray", "ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk")


class SubmitError(RuntimeError):
    """A submission or job query that cannot go on; the message is one line."""


@dataclass
class JobPlan:
    """What a submitted job runs, resolved and validated before anything is uploaded."""

    command: str  # run | sweep
    config: Path  # the local config file
    config_arg: str  # its path in the uploaded working directory
    overrides: list[str]  # as the job receives them
    run_id: str  # '' for a sweep (it names its own runs)
    run_dir: str  # on the machine that runs the job's driver; '' for a sweep
    tracking_uri: str  # '' for a sweep; redacted (`redact`)
    env: dict[str, str] | None = None  # the job's environment beyond JOB_ENV (a secret URI)
    include: tuple[str, ...] = ()  # paths uploaded beside what git tracks (`--include`)

    @property
    def staged(self) -> bool:
        """The config lives outside the uploaded tree: it travels in a staged copy."""
        return carried_path(self.config) is None

    @property
    def entrypoint(self) -> str:
        config = [self.config_arg] if self.command == "sweep" else ["--config", self.config_arg]
        return shlex.join(["python", "-m", "jobs.cli", self.command, *config, *self.overrides])

    @property
    def metadata(self) -> dict[str, str]:
        keys = {"command": self.command, "run_id": self.run_id, "run_dir": self.run_dir}
        keys["mlflow"] = self.tracking_uri
        return {META + k: v for k, v in keys.items() if v}


# --- the cluster's job server -------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise SubmitError(NO_ADDRESS)
    return address


def connect(address: str | None):
    """A `JobSubmissionClient` for `address` (else $RAY_ADDRESS), checked to answer."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    # Ray lets $RAY_ADDRESS (and $RAY_API_SERVER_ADDRESS) override the address it is given;
    # an explicit --address wins here.
    hidden = {
        k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ
    }
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SubmitError(
            f"the Ray job server at {address} wants a token: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - refused, DNS, a bad address: one line each
        raise SubmitError(
            f"cannot reach the Ray job server at {address} ({_one_line(exc)}); "
            "is the cluster up? The address is its dashboard's, http://HOST:8265"
        ) from None
    finally:
        os.environ.update(hidden)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _job_errors(client, job_id: str | None) -> Iterator[None]:
    """Turn the job server's errors about `job_id` (None: a new job) into one-line
    `SubmitError`s."""
    try:
        yield
    except BrokenPipeError:  # our own stdout closed (`| head`), not the server
        raise
    except OSError as exc:  # refused or dropped connection (requests, aiohttp, builtin)
        raise SubmitError(
            f"lost the Ray job server at {client.get_address()}: {_one_line(exc)}"
        ) from None
    except RuntimeError as exc:  # the job server's answer: "Request failed with status code ..."
        if job_id is None:
            raise SubmitError(f"the job server refused the job: {_one_line(exc)}") from None
        if "status code 404" in str(exc):
            raise SubmitError(f"no job {job_id!r} on {client.get_address()}") from None
        raise SubmitError(f"job {job_id}: {_one_line(exc)}") from None


def job_info(client, job_id: str):
    """The job's `JobDetails` (status, message, metadata)."""
    with _job_errors(client, job_id):
        return client.get_job_info(job_id)


def wait_for(client, job_id: str, done: Callable[[str], bool], timeout: float) -> str:
    """Poll the job's status until `done(status)` or `timeout` seconds; return the last one."""
    deadline = time.monotonic() + timeout
    while True:
        status = job_info(client, job_id).status
        if done(status) or time.monotonic() >= deadline:
            return status
        time.sleep(POLL_S)


def follow(client, job_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs to `write` until the job ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    job_info(client, job_id)  # an unknown id fails here, in one line
    with _job_errors(client, job_id):
        asyncio.run(tail())
    # The stream closes as the driver exits; the status follows a moment later.
    return wait_for(client, job_id, _is_terminal, timeout=30.0)


def stop(client, job_id: str, timeout: float = STOP_TIMEOUT_S) -> str:
    """Ask the job to stop and wait (at most `timeout` s) until it has ended; its last status."""
    with _job_errors(client, job_id):
        client.stop_job(job_id)
    return wait_for(client, job_id, _is_terminal, timeout)


def _is_terminal(status: str) -> bool:
    return status in ("SUCCEEDED", "FAILED", "STOPPED")


# --- what the job runs --------------------------------------------------------------------


def job_config(config: Path, overrides: list[str]) -> Config:
    """The run's config as the job will resolve it, with what it would decide on the cluster
    fixed here: run_id, an absolute output_dir, the MLflow store, and ray_address=auto."""
    from jobs.run import resolve_run_id
    from pipeline.run import tracking

    cfg = resolve_run_id(load_config(config, overrides))
    if not Path(cfg.output_dir).is_absolute():
        cfg = cfg.replace(output_dir=str(Path.cwd() / cfg.output_dir))
    return cfg.replace(mlflow_tracking_uri=tracking.resolve_tracking_uri(cfg), ray_address="auto")


def job_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """The user's overrides, then the pinned keys' values (which replace any given before)."""
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in PINNED_KEYS]
    return kept + [f"{k}={getattr(cfg, k)}" for k in PINNED_KEYS]


def carried_path(path: Path, root: Path = PROJECT_ROOT) -> str | None:
    """`path` relative to `root` if the upload of `root` carries it, else None."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    excluded = any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in EXCLUDES)
    return None if excluded else rel.as_posix()


def plan(command: str, config: Path | None, overrides: list[str]) -> JobPlan:
    """Resolve what `latentseek <command>` (run or sweep) with this config will run as a job."""
    config = Path(config or DEFAULT_CONFIG)
    config_arg = carried_path(config) or f"{STAGED_CONFIG_DIR}/{config.name}"
    if command == "sweep":  # it reads its own config: forwarded as given, joined to the cluster
        if not config.exists():
            raise ConfigError(f"sweep file not found: {config}")
        if not carried_path(config):  # its `config:` is relative to it: it must travel as is
            raise ConfigError(f"{config}: a submitted sweep file must be inside the project")
        return JobPlan(command, config, config_arg, [*overrides, "ray_address=auto"], "", "", "")
    cfg = job_config(config, overrides)
    uri, env = cfg.mlflow_tracking_uri, {}
    if redact(uri) != uri:  # a secret: in the job's environment, never in its command line
        cfg, env = cfg.replace(mlflow_tracking_uri=""), {"MLFLOW_TRACKING_URI": uri}
    return JobPlan(
        command=command,
        config=config,
        config_arg=config_arg,
        overrides=[redact(o) for o in job_overrides(cfg, overrides)],
        run_id=cfg.run_id,
        run_dir=str(Path(cfg.output_dir) / cfg.run_id),
        tracking_uri=redact(uri),
        env=env,
    )


def _secret(rel: str) -> bool:
    return any(fnmatch.fnmatch(Path(rel).name, pat) for pat in SECRET_FILES)


def upload_files(root: Path = PROJECT_ROOT, include: tuple[str, ...] = ()) -> list[str]:
    """The files `submit` uploads, relative to `root`: what git tracks there (without git, every
    file outside `EXCLUDES`), plus the files under each `include` path, never a `SECRET_FILES`
    one (`.env`, keys)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached"], cwd=root, capture_output=True, timeout=60
        )
        tracked = out.stdout.decode().split("\0") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        tracked = None
    if tracked is None:  # not a checkout (e.g. itself an upload): the tree, less EXCLUDES
        tracked = [
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and carried_path(p, root) is not None
        ]
    files = [f for f in tracked if f and (root / f).is_file()]
    for name in include:
        path = (root / name) if not Path(name).is_absolute() else Path(name)
        for p in [path] if path.is_file() else sorted(path.rglob("*")):
            try:
                rel = p.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                raise ConfigError(f"--include {name}: {p} is outside the project") from None
            if p.is_file():
                files.append(rel)
    return sorted({f for f in files if not _secret(f)})


def submit(client, job: JobPlan) -> str:
    """Upload the project (`upload_files`, staged in a temporary copy) and submit `job`; its
    job id."""
    with tempfile.TemporaryDirectory(prefix="latentseek-submit-") as tmp:
        working_dir = stage(job, Path(tmp) / "project")
        with _job_errors(client, None):
            return client.submit_job(
                entrypoint=job.entrypoint,
                runtime_env={
                    "working_dir": str(working_dir),
                    "excludes": EXCLUDES,
                    "env_vars": {**JOB_ENV, **(job.env or {})},
                },
                metadata=job.metadata,
            )


def stage(job: JobPlan, working_dir: Path, root: Path = PROJECT_ROOT) -> Path:
    """A copy of what the job uploads (`upload_files`) in `working_dir`, with the config if it
    lives outside the project (a run's as its resolved keys, `redact`ed)."""
    for rel in upload_files(root, job.include):
        target = working_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    if job.staged or not (working_dir / job.config_arg).is_file():  # outside, or untracked
        (working_dir / job.config_arg).parent.mkdir(parents=True, exist_ok=True)
        if job.command == "run":  # its resolved keys: its `include:` files stay behind
            text = yaml.safe_dump(redacted(load_config(job.config).to_dict()), sort_keys=False)
            (working_dir / job.config_arg).write_text(text)
        else:
            shutil.copy(job.config, working_dir / job.config_arg)
    return working_dir


# --- the command line ---------------------------------------------------------------------


def add_arguments(subparsers) -> None:
    """Add `submit`, `status`, `logs` and `stop` to an argparse subparsers object; dispatch the
    parsed arguments with `main(args)` (its `command` attribute names the subcommand)."""

    def with_address(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", help="the job server, http://HOST:8265 (default $RAY_ADDRESS)")
        return p

    p = with_address(subparsers.add_parser("submit", help="run an evaluation as a Ray job"))
    p.add_argument("--config", type=Path, help="YAML config (default configs/default.yaml)")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATH",
        help="upload PATH too (a file or folder of the project that git does not track)",
    )
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--no-wait", action="store_true", help="return once submitted")
    wait.add_argument(
        "--follow",
        action="store_true",
        help="stream the logs until the job ends (exit 0 if it succeeded)",
    )
    p.add_argument(
        "words",
        nargs="*",
        metavar="[run|sweep] key=value",
        help="what to run (default run), then overrides",
    )
    p = with_address(subparsers.add_parser("status", help="a Ray job's status"))
    p.add_argument("job_id", metavar="JOB")
    p = with_address(subparsers.add_parser("logs", help="a Ray job's logs"))
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--follow", action="store_true", help="stream them until the job ends")
    p = with_address(subparsers.add_parser("stop", help="stop a Ray job and wait until it has"))
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S, help="seconds to wait")


def main(args: argparse.Namespace) -> int:
    import ray.job_submission  # noqa: F401 - its modules set their loggers' levels on import

    for name in RAY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if args.command == "submit":
            return _submit(args)
        client = connect(args.address)
        if args.command == "status":
            info = job_info(client, args.job_id)
            print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
            _print_records(info.metadata or {})
            return 0
        if args.command == "logs":
            if args.follow:
                return _report_end(args.job_id, follow(client, args.job_id, _write))
            with _job_errors(client, args.job_id):
                print(client.get_job_logs(args.job_id), end="")
            return 0
        if args.command == "stop":
            status = stop(client, args.job_id, args.timeout)
            print(f"{args.job_id}: {status}")
            return 0 if _is_terminal(status) else 1
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenPipeError) as exc:  # Ctrl-C, or a reader that went away
        if isinstance(exc, BrokenPipeError):  # no more output: silence the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if getattr(args, "job_id", None):
            print(f"\ninterrupted; the job goes on: {_hint('stop', args)}", file=sys.stderr)
        return 130
    raise ValueError(f"not a submit command: {args.command!r}")


def _submit(args: argparse.Namespace) -> int:
    words = list(args.words)
    command = words.pop(0) if words and words[0] in ("run", "sweep") else "run"
    job = plan(command, args.config, words)
    job.include = tuple(args.include)
    client = connect(args.address)
    args.job_id = submit(client, job)
    print(f"job:       {args.job_id}")
    print(f"dashboard: {client.get_address()}/#/jobs/{args.job_id}")
    print(f"command:   {job.entrypoint}")
    if job.run_id:
        print(f"run_id:    {job.run_id}")
        _print_records(job.metadata)
        print("           (on the machine that runs the job's driver, the head node: on a real")
        print("           cluster set output_dir to shared storage)")
    else:
        print("records:   where the sweep's output_dir says, on the machine that runs its driver")
    for verb in ("status", "logs", "stop"):
        print(f"{verb + ':':<10} {_hint(verb, args)}")
    sys.stdout.flush()
    if args.follow:
        return _report_end(args.job_id, follow(client, args.job_id, _write))
    if args.no_wait:
        return 0
    status = wait_for(client, args.job_id, lambda st: st != "PENDING", START_TIMEOUT_S)
    print(f"{args.job_id}: {status}")
    return 1 if status in ("FAILED", "STOPPED") else 0


def _print_records(metadata: dict[str, str]) -> None:
    if metadata.get(META + "run_dir"):
        print(f"records:   {metadata[META + 'run_dir']}")
    if metadata.get(META + "mlflow"):
        print(f"mlflow:    {metadata[META + 'mlflow']}")


def _hint(verb: str, args: argparse.Namespace) -> str:
    extra = " --follow" if verb == "logs" else ""
    address = f" --address {shlex.quote(args.address)}" if args.address else ""
    return f"latentseek {verb} {args.job_id}{extra}{address}"


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _report_end(job_id: str, status: str) -> int:
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m jobs.submit", description=__doc__.split("\n")[0]
    )
    add_arguments(parser.add_subparsers(dest="command", required=True))
    sys.exit(main(parser.parse_args()))
