"""The `latentseek` command line: run, config, summary, bench.

latentseek run [--config FILE] [key=value ...]     evaluate (resumes an existing run_id)
latentseek config [--config FILE] [key=value ...]  print the resolved config and exit
latentseek config --keys                            list every config key with its help
latentseek summary RUN_DIR                          print a run's tables from its records
latentseek bench [--problems N] [...]               cost per problem, side by side
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import CONFIG_DIR, ConfigError, describe_keys, load_config

DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def _quiet_libraries() -> None:
    # Idle OpenMP threads sleep instead of spinning: on a shared or small CPU, spinning threads
    # of one process starve the others (measured: 2-thread decoding 6x slower). Set before
    # torch is imported; Ray workers started from here inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads unless allow_download=true
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _config(args: argparse.Namespace):
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path, args.overrides)
    if cfg.allow_download:
        os.environ.pop("HF_HUB_OFFLINE", None)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latentseek", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("run", "evaluate methods over a dataset"), ("config", "show the config")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, help=f"YAML config (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "config":
            p.add_argument("--keys", action="store_true", help="list every key with its help")
    p = sub.add_parser("summary", help="print a run's summary tables from its records")
    p.add_argument("run_dir", type=Path)
    p = sub.add_parser("bench", help="cost per problem: naive vs engine vs Ray vs ceiling")
    from jobs.bench import add_arguments

    add_arguments(p)
    _quiet_libraries()
    args = parser.parse_args(argv)

    try:
        if args.command == "config":
            if args.keys:
                print(describe_keys())
                return 0
            import yaml

            print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
            return 0
        if args.command == "run":
            from jobs.run import main as run_main

            return run_main(_config(args))
        if args.command == "summary":
            from analysis.tables import accuracy_by_iteration, load_run, markdown, summary_table

            problems, iterations = load_run(args.run_dir)
            print(markdown(summary_table(problems)))
            print(markdown(accuracy_by_iteration(problems, iterations)))
            return 0
        if args.command == "bench":
            from jobs.bench import main as bench_main

            return bench_main(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - known failure kinds get one clear line
        from jobs.run import RunError
        from pipeline.data import DataError
        from pipeline.model import ModelError

        if isinstance(exc, (DataError, ModelError, RunError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
