"""The bench's child process: `python -m jobs.bench.child SPEC RESULT` runs one row's function
(by the spec's `kind`) and writes its JSON result (`jobs.bench.harness.Runner.child` starts it).

The top of the bench: it knows every row module (`rows`, `ray_row`, `profile`); they import the
harness's measuring helpers, never this module.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jobs.bench import profile, ray_row, rows
from jobs.bench.harness import peak_rss_mb

CHILDREN = {
    "engine": rows.engine,
    "naive": rows.naive,
    "ceiling": rows.ceiling,
    "ray": ray_row.run,
    "profile": profile.run,
}


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def child_entry(spec_path: str, out_path: str) -> int:
    """In the child: run the spec's row function and write its JSON result."""
    _quiet()
    from pipeline.config import Config

    spec = json.loads(Path(spec_path).read_text())
    result = CHILDREN[spec["kind"]](Config(**spec["cfg"]), spec)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(child_entry(sys.argv[1], sys.argv[2]))
