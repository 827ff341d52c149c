"""How a row is measured: one fresh child process per configuration, its clock and its memory.

`Runner.child(label, spec)` writes the spec (a JSON file: the row kind, the resolved config and
the row's own fields) to `logs/`, runs `python -m jobs.bench.child SPEC RESULT` (absolute paths;
the child runs in the caller's working directory, so that relative paths in the config mean what
they meant to the caller, and finds this project through PYTHONPATH) and reads back the result; the child's output goes to `logs/NN-label.log`. A child that fails returns
`{"error": ...}` (its exit code and the log's last lines) and the bench goes on with the next row.

In the child (`jobs.bench.child`), the row's function times only its own work with
`time.perf_counter` (imports, model loading and one short warm-up generation are excluded), and
the child's peak RSS is its `ru_maxrss`, so each row's memory is its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.config import PROJECT_ROOT


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class TreeRss:
    """Peak RSS of this process and all its descendants (Ray's GCS, raylet, workers), sampled
    every `interval` seconds; `peak_workers` counts the processes named EvalWorker."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_total = self.peak_workers = self.peak_driver = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = workers = 0.0
        try:
            procs = [self.me] + self.me.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2**20
                name = " ".join(proc.cmdline()[:1])
            except psutil.Error:
                continue
            total += rss
            workers += rss if "EvalWorker" in name else 0.0
        self.peak_total = max(self.peak_total, total)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_driver = max(self.peak_driver, self.me.memory_info().rss / 2**20)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class Runner:
    """Runs the configurations one after another, each in a fresh process; says what it does on
    stderr with the time since the bench started."""

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.env = {**env, "PYTHONPATH": _pythonpath(env)}
        self.logs = (out / "logs").resolve()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.count = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        elapsed = int(self.elapsed())
        print(f"[bench {elapsed // 60:02d}:{elapsed % 60:02d}] {msg}", file=sys.stderr)

    def child(self, label: str, spec: dict, python: str | None = None) -> dict:
        """Run one configuration in a fresh process (of `python`, default this one); on failure
        the result carries the error."""
        self.count += 1
        name = f"{self.count:02d}-" + "".join(c if c.isalnum() else "_" for c in label)
        spec_path, out_path = self.logs / f"{name}.spec.json", self.logs / f"{name}.result.json"
        log_path = self.logs / f"{name}.log"
        spec_path.write_text(json.dumps(spec, indent=1))
        self.say(f"{label} ...")
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [
                    python or sys.executable,
                    "-m",
                    "jobs.bench.child",
                    str(spec_path),
                    str(out_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        took = time.perf_counter() - start
        if proc.returncode != 0 or not out_path.exists():
            tail = log_path.read_text().strip().splitlines()[-5:]
            self.say(f"{label} FAILED (exit {proc.returncode}) after {took:.0f} s: see {log_path}")
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
        result = json.loads(out_path.read_text())
        result.update(process_s=took, load_before=load, load_after=os.getloadavg()[0])
        self.say(f"{label} done: {result['wall_s']:.1f} s measured ({took:.0f} s with startup)")
        return result


def _pythonpath(env: dict[str, str]) -> str:
    parts = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    return ":".join(dict.fromkeys(parts))


# Instruction sets that decide whether bf16 (and vLLM's CPU kernels) pay on this CPU.
WATCHED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of WATCHED_FLAGS this CPU reports (/proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in WATCHED_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions, for the report's header."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for mod in ("torch", "transformers", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a report field, not a requirement
            info[mod] = None
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    return info
