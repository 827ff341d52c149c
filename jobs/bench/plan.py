"""The rows of one bench run, in order, each a child process (`Runner.child`), and the table row
each becomes. Every row kind is one method of `Plan`:

- `engine`: every method of `methods` at every batch size of `batch_sizes`, with the config's
  `batching` (B = 1 on the first `b1_problems` problems, the others on `limit`); at `batch_size`,
  a method of `batching_methods` is measured by its batching rows instead;
- `batching`: `batching_methods` on `batching_problems` (64) problems at `batch_size`, once with
  `batching=static` (tasks of `batch_size` problems) and once with `batching=continuous` (tasks of
  `problems_per_task`);
- `bf16`: `bf16_methods`, static at `batch_size` on `limit` problems in bfloat16, beside a
  float32 twin of the same work (an engine row, the first tasks of the static batching row, or a
  float32 row run here);
- `ceiling`: `model.generate` at each method's best batch size;
- `profile`: LatentSeek PSRM at its best batch under the profiler, with the rooflines;
- `naive`: the reference loop; its cot row is the CoT pass of its LatentSeek PSRM row;
- `ray`: the whole pipeline with 1 and 2 workers;
- `vllm`: `vllm_methods` on `vllm_problems` problems (continuous, K = 3) on the native engine,
  then on `backend=vllm` in `vllm_python` (the venv `make setup-vllm` makes; the engine's start-up
  is reported apart, `engine_start_s`).

A row whose child fails is kept with its error; the others still run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from jobs.bench.harness import Runner
from jobs.bench.settings import BenchSettings
from jobs.bench.targets import TARGET_TOKENS_PER_S, best_row, find
from pipeline.config import PROJECT_ROOT, Config


def generated_tokens(result: dict) -> int:
    if "generated" in result:  # ceiling, profile: a token count without problems
        return result["generated"]
    return sum(r["solver_generated"] + r["verifier_generated"] for r in result.get("rows", []))


def table_row(kind: str, method: str, config: str, result: dict, **extra: Any) -> dict:
    """One row of the results table: rates per problem and per token, so different N compare."""
    row: dict[str, Any] = {"row": kind, "method": method, "config": config, **extra}
    if "error" in result:
        row.update(problems=0, error=result["error"])
        return row
    wall, rows = result["wall_s"], result.get("rows", [])
    n, tokens = len(rows), generated_tokens(result)
    row.update(
        problems=n,
        wall_s=wall,
        problems_per_hour=3600.0 * n / wall if n and wall > 0 else None,
        generated_tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else None,
        peak_rss_mb=result.get("peak_rss_mb"),
        accuracy=sum(r["correct"] for r in rows) / n if n else None,
        mean_iterations=sum(r["iterations"] for r in rows) / n if n else None,
        load=[result.get("load_before"), result.get("load_after")],
    )
    if result.get("dtype"):
        row["dtype"] = str(result["dtype"]).removeprefix("torch.")
    return row


def first_tasks(result: dict, k: int) -> dict:
    """An engine result cut to its first `k` tasks (their problems and their wall time)."""
    rows = [r for r in result["rows"] if r["task"] < k]
    walls = result["task_walls"][:k]
    return {**result, "rows": rows, "task_walls": walls, "wall_s": sum(walls), "derived": True}


class Plan:
    def __init__(self, cfg: Config, settings: BenchSettings, runner: Runner) -> None:
        self.cfg, self.settings, self.runner = cfg, settings, runner
        self.rows: list[dict] = []  # the results table
        self.results: dict[str, dict] = {}  # row key -> the child's result (answers included)

    def run(self) -> None:
        """Every row kind not in `skip`; a kind that raises here (not in its child) is kept as
        one failed row, and the next kind runs."""
        for kind in ("engine", "batching", "bf16", "ceiling", "profile", "naive", "ray", "vllm"):
            if self.settings.runs(kind):
                try:
                    getattr(self, kind)()
                except Exception as exc:  # noqa: BLE001 - reported as a failed row
                    self.runner.say(f"{kind} rows FAILED in the driver: {exc!r}")
                    self.add(kind, "-", "(driver)", {"error": f"{type(exc).__name__}: {exc}"})

    # -------------------------------------------------------------------------------------
    def add(self, kind: str, method: str, config: str, result: dict, **extra: Any) -> dict:
        key = f"{kind}/{method}/{config}"
        self.results[key] = result
        row = table_row(kind, method, config, result, key=key, **extra)
        self.rows.append(row)
        return row

    def _engine(
        self, kind: str, method: str, cfg: Config, config: str, python: str | None = None
    ) -> dict:
        spec = {"kind": "engine", "cfg": cfg.to_dict(), "method": method}
        result = self.runner.child(f"{config} {method} N={cfg.limit}", spec, python)
        extra = {"batch_size": cfg.batch_size, "batching": cfg.batching, "dtype": cfg.dtype}
        extra.update(task=cfg.problems_per_task, max_new_tokens=cfg.max_new_tokens)
        extra.update(backend=cfg.backend, engine_start_s=result.get("engine_start_s"))
        return self.add(kind, method, config, result, **extra)

    def vllm(self) -> None:
        """Each of `vllm_methods` on both backends, the same problems and settings; vLLM runs in
        its own venv (left out, saying what to install, when that is missing)."""
        s = self.settings
        if not s.vllm_problems:
            return
        python = Path(s.vllm_python)
        python = python if python.is_absolute() else PROJECT_ROOT / python
        if not python.exists():  # left out, not failed: vLLM is an optional install
            self.runner.say(f"vllm rows left out: no {s.vllm_python} (`make setup-vllm` makes it)")
            return
        base = self.cfg.replace(limit=self._n(s.vllm_problems), max_iters=3, batching="continuous")
        for method in s.vllm_methods:
            label = f"B={base.batch_size} continuous"
            self._engine("vllm", method, base, f"native {label}")
            self._engine("vllm", method, base.replace(backend="vllm"), f"vllm {label}", str(python))

    def _n(self, n: int) -> int:
        return min(n, self.cfg.limit) if self.cfg.limit else n

    # -------------------------------------------------------------------------------------
    def engine(self) -> None:
        """Each method at each batch size; a method's row at `batch_size` is its batching rows
        (static and continuous, on more problems) when those run."""
        s = self.settings
        batching = s.runs("batching") and s.batching_problems > 0
        for method in s.methods:
            for b in s.batch_sizes:
                if batching and method in s.batching_methods and b == self.cfg.batch_size:
                    continue
                n = self._n(s.b1_problems) if b == 1 else self.cfg.limit
                cfg = self.cfg.replace(batch_size=b, limit=n)
                self._engine("engine", method, cfg, f"engine B={b} {cfg.batching}")

    def batching(self) -> None:
        n = self.settings.batching_problems
        for method in self.settings.batching_methods if n else []:
            for mode in ("static", "continuous"):
                # static: tasks of batch_size (all of a task's rows decode as one batch)
                cfg = self.cfg.replace(batching=mode, limit=n)
                cfg = cfg.replace(task_size=0) if mode == "static" else cfg
                label = f"{mode} B={cfg.batch_size}, tasks of {cfg.problems_per_task}"
                self._engine("batching", method, cfg, label)

    def bf16(self) -> None:
        """Each method in bfloat16, static at `batch_size` on `limit` problems, beside its float32
        twin: an engine row of the same work, else the first tasks of the static batching row
        (the same problems in the same tasks), else a float32 row run here."""
        cfg = self.cfg.replace(batching="static", task_size=0)
        b, n = cfg.batch_size, cfg.limit
        for method in self.settings.bf16_methods:
            same = dict(batch_size=b, batching="static", dtype="float32")
            if not find(self.rows, row="engine", method=method, problems=n, **same):
                source = next(iter(find(self.rows, row="batching", method=method, **same)), None)
                if source and n % b == 0 and source["problems"] >= n:
                    result = first_tasks(self.results[source["key"]], n // b)
                    config = f"engine B={b} static (the first {n} of the static row)"
                    self.add("engine", method, config, result, task=b, **same)
                else:
                    self._engine(
                        "engine", method, cfg.replace(dtype="float32"), f"engine B={b} static"
                    )
            self._engine("bf16", method, cfg.replace(dtype="bfloat16"), f"bf16 B={b} static")

    def ceiling(self) -> None:
        """One batch at each method's best batch size: rows of max_new_tokens / 2 (or
        `ceiling_tokens`), at most the engine's total; methods with the same settings share it."""
        runs: dict[tuple[int, int], dict] = {}
        for method in self.settings.methods:
            best = best_row(self.rows, method)
            if best is None:
                continue
            b = best["batch_size"]
            total = min(
                best["generated_tokens"],
                self.settings.ceiling_tokens or b * self.cfg.max_new_tokens // 2,
            )
            if (b, total) not in runs:
                spec = {"kind": "ceiling", "cfg": self.cfg.to_dict(), "batch_size": b}
                runs[(b, total)] = self.runner.child(
                    f"ceiling B={b} tokens={total}", {**spec, "total_tokens": total}
                )
            self.add("ceiling", method, f"generate() B={b}", runs[(b, total)], batch_size=b)

    def profile(self) -> None:
        best = best_row(self.rows, "latentseek-psrm")
        reached = best["tokens_per_s"] if best else None
        mode = self.settings.profile
        if mode == "never" or (mode == "auto" and reached and reached >= TARGET_TOKENS_PER_S):
            return
        b = best["batch_size"] if best else self.cfg.batch_size
        batching = best["batching"] if best else self.cfg.batching
        spec = {"kind": "profile", "cfg": self.cfg.to_dict(), "batch_size": b}
        spec.update(batching=batching, max_new_tokens=32)
        result = self.runner.child(f"profile latentseek-psrm B={b} {batching}", spec)
        config = f"profiled B={b} {batching}"
        self.add("profile", "latentseek-psrm", config, result, batch_size=b, batching=batching)

    def naive(self) -> None:
        """The naive rows; the naive cot row is the CoT pass of the naive LatentSeek PSRM run
        when both run (the same code, timed on its own), which saves a child."""
        methods = sorted(self.settings.methods, key=lambda m: m != "latentseek-psrm")
        for method in methods:
            s = self.settings
            n = self._n(s.naive_self_problems if method == "latentseek-self" else s.naive_problems)
            source = self.results.get("naive/latentseek-psrm/naive")
            if n < 1:
                continue
            if method == "cot" and source and "error" not in source:
                rows = [r["cot"] for r in source["rows"]]
                result = {**source, "rows": rows, "wall_s": sum(r["wall_s"] for r in rows)}
                self.add("naive", method, "naive (CoT pass of latentseek-psrm)", result)
                continue
            spec = {"kind": "naive", "cfg": self.cfg.replace(limit=n).to_dict(), "method": method}
            self.add("naive", method, "naive", self.runner.child(f"naive {method} N={n}", spec))

    def ray(self) -> None:
        s = self.settings
        cfg = self.cfg.replace(limit=s.ray_problems, cpus_per_worker=1)
        with tempfile.TemporaryDirectory(prefix="latentseek-bench-") as tmp:
            for method in s.ray_methods:
                spec = {"kind": "ray", "cfg": cfg.to_dict(), "method": method, "workers": [1, 2]}
                spec.update(batch_size=s.ray_batch_size, tmp_dir=str(Path(tmp) / method))
                both = self.runner.child(f"ray {method} workers=1,2 B={s.ray_batch_size}", spec)
                for workers in (1, 2):
                    result = both.get("runs", {}).get(str(workers), both)  # a failure: its error
                    loads = {k: both[k] for k in ("load_before", "load_after") if k in both}
                    label = "ray 1 worker" if workers == 1 else f"ray {workers} workers"
                    self.add("ray", method, label, {**result, **loads},
                             batch_size=s.ray_batch_size, workers=workers,
                             **{k: result.get(k) for k in RAY_FIELDS})  # fmt: skip


RAY_FIELDS = (
    "until_last_batch_s",
    "setup_s",
    "worker_busy_s",
    "peak_rss_workers_mb",
    "peak_rss_driver_mb",
)
