"""`latentseek bench` (placeholder until the benchmark lands)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problems", type=int, default=8)


def main(args: argparse.Namespace) -> int:
    raise SystemExit("latentseek bench: not implemented yet")
