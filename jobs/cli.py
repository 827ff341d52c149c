"""The `latentseek` command line: run, config, summary, report, reference, submit, bench, gpu-probe.

latentseek run [--config FILE] [key=value ...]     evaluate (resumes an existing run_id)
latentseek config [--config FILE] [key=value ...]  print the resolved config and exit
latentseek config --keys                            list every config key with its help
latentseek sweep SWEEP_FILE [key=value ...]         a scaling sweep: nested runs, one report
latentseek summary RUN_DIR                          print a run's tables from its records
latentseek report RUN_OR_SWEEP_DIR [--out DIR]      tables and plots from records
latentseek reference [--config FILE] [--compare RUN_DIR] [key=value ...]
                                                    the naive reference loop, and a check
latentseek submit [run|sweep] ... | status | logs | stop JOB   Ray Jobs on a cluster
latentseek bench [--config FILE] [key=value ...]    cost per problem, side by side (--keys)
latentseek gpu-probe [--shape S] [--out FILE] [--plan-only]
                                                    a GPU machine measured with the paper's
                                                    shapes, random weights (jobs/gpu_probe.py)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, ConfigError, describe_keys, load_config


def _quiet_libraries() -> None:
    # Idle OpenMP threads sleep instead of spinning: on a shared or small CPU, spinning threads
    # of one process starve the others (measured: 2-thread decoding 6x slower). Set before
    # torch is imported; Ray workers started from here inherit all of these. transformers reads
    # its verbosity and the hub's progress-bar switch from the environment when it is imported,
    # so a bad key is refused before torch or transformers load (a second, not five).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads unless allow_download=true
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _config(args: argparse.Namespace):
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path, args.overrides)
    if cfg.allow_download:
        os.environ.pop("HF_HUB_OFFLINE", None)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    _quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gpu-probe"]:  # its own arguments (jobs/gpu_probe.py runs without this CLI)
        from jobs.gpu_probe import main as probe_main

        return probe_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return _dispatch(args, [parser.prog, *argv])
    except ConfigError as exc:  # also a bad prompt template (pipeline.method.prompts)
        print(f"config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - user errors get one message, bugs a traceback
        from jobs.run import RunError
        from pipeline.data import DataError
        from pipeline.engine.model import ModelError
        from pipeline.run.records import DuplicateRecordError
        from pipeline.run.rundir import RunDirError
        from pipeline.run.tracking import ForeignRunError

        user_errors = (
            DataError, ModelError, RunError, DuplicateRecordError, RunDirError, ForeignRunError
        )  # fmt: skip
        if isinstance(exc, user_errors):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


def _parser() -> argparse.ArgumentParser:
    """Every subcommand with its arguments."""
    parser = argparse.ArgumentParser(prog="latentseek", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("run", "evaluate methods over a dataset"),
        ("config", "show the config"),
        ("reference", "run the naive reference loop (and compare a run's records with it)"),
        ("bench", "naive vs engine (batch sizes, static/continuous, bf16) vs Ray vs ceiling"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, help=f"YAML config (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        if name in ("config", "bench"):
            p.add_argument("--keys", action="store_true", help="list every key with its help")
        if name == "reference":
            p.add_argument("--compare", type=Path, metavar="RUN_DIR", help="check these records")
    p = sub.add_parser("sweep", help="run a test-time scaling sweep (configs/sweeps/*.yaml)")
    p.add_argument("sweep_file", type=Path, help="a sweep file, e.g. configs/sweeps/k-scaling.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for every point")
    sub.add_parser("gpu-probe", add_help=False,
                   help="measure a GPU machine with the paper's shapes (gpu-probe --help)")  # fmt: skip
    p = sub.add_parser("summary", help="print a run's summary tables from its records")
    p.add_argument("run_dir", type=Path)
    p = sub.add_parser(
        "chaos",
        help="the driver under faults on two local Ray nodes (stand-ins; SIGTERM and resume, "
        "an MLflow stall, a raylet killed)",
    )
    p.add_argument("options", nargs="*", metavar="key=value", help="problems=N, out=DIR")
    p = sub.add_parser("report", help="tables and plots from a run's records")
    p.add_argument(
        "paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
        help="a run directory, or a sweep directory whose subdirectories are run directories",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=None,
        help="where to write the report (default: <first dir>/report)",
    )  # fmt: skip
    from jobs import submit

    submit.add_arguments(sub)
    return parser


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the subcommand `args` names; its exit code. A command's config is read and checked
    before its heavy imports (Ray, torch, transformers), so bad input is refused at once."""
    from jobs import submit

    if args.command == "config":
        if args.keys:
            print(describe_keys())
            return 0
        import yaml

        print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
        return 0
    if args.command == "run":
        cfg = _config(args)
        from jobs.run import main as run_main

        return run_main(cfg, argv=argv)
    if args.command == "summary":
        from analysis.tables import accuracy_by_iteration, load_run, markdown, summary_table

        problems, iterations = load_run(args.run_dir)
        print(markdown(summary_table(problems)))
        print(markdown(accuracy_by_iteration(problems, iterations)))
        return 0
    if args.command == "sweep":
        from jobs.sweep import main as sweep_main

        return sweep_main(args.sweep_file, args.overrides)
    if args.command == "report":
        from analysis import report

        return report.main(args)
    if args.command == "chaos":
        from jobs.chaos import main as chaos_main

        return chaos_main(args.options)
    if args.command == "reference":
        cfg = _config(args)
        from jobs.reference import main as reference_main

        return reference_main(cfg, compare=args.compare)
    if args.command in submit.COMMANDS:
        return submit.main(args)
    if args.command == "bench":
        from jobs import bench
        from jobs.bench.settings import BenchSettings

        if args.keys:
            print(describe_keys(BenchSettings) + "\n\n(and every `latentseek config --keys`)")
            return 0
        return bench.main(args.config, args.overrides)
    return 1


def _one_line(exc: Exception) -> str:
    """The message on one line (a path or a library's message may hold line breaks)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
