"""`latentseek bench` / `make bench`: cost per problem, side by side, on the same GSM8K problems.

Rows, for each method (`cot`, `latentseek-psrm`, `latentseek-self`; K = max_iters, capped tokens):

- (a) naive: `pipeline/reference.py`, the reference cost structure: one problem at a time, no KV
  cache, one full forward over the whole sequence per generated token, the four self-reward
  verifiers one after another (greedy, capped at `verifier_max_new_tokens`, like the engine);
- (b) the engine in-process (`Solver.run`) at every batch size of `--batch-sizes` (batch size 1
  on the first `--b1-problems` of the N); "best" is the one with the most problems per hour;
- (c) the Ray pipeline (`jobs.run.run_evaluation`) with 1 and 2 workers;
- (d) the ceiling: plain batched greedy `model.generate` (with its cache) on the same prompts, at the
  engine's best batch size: one full batch of rows of max_new_tokens / 2 tokens (at most the
  engine's total; `--ceiling-tokens`), EOS ignored.

Every configuration runs in a fresh child process (so its peak RSS, `ru_maxrss`, is its own) one
after another, and reports wall time (`time.perf_counter` around the configuration only: model
loading, imports and one warm-up generation are excluded), generated tokens (solver + verifier,
forced prefix tokens included, as the engine counts them), and accuracy. The report holds problems
per hour, generated tokens per second, peak RSS, the ratios b/a, c/b, c2/c1 and b/d, the answer
check (a) vs (b) and (b, best) vs (b, B=1) with every difference listed, and the targets.

Printing is fine here: this is an entry point. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# method key -> (engine method, reward or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "cot": ("cot", None),
    "latentseek-psrm": ("latentseek", "psrm"),
    "latentseek-self": ("latentseek", "self"),
}
TARGET_NAIVE_SPEEDUP = 20.0  # latentseek-psrm, engine best batch vs naive, problems per hour
TARGET_CEILING_FRACTION = 0.6  # engine tokens/s vs plain generate() tokens/s
TARGET_WORKER_SCALING = 1.6  # Ray 2 workers vs 1 worker, problems per hour
TARGET_RAY_PROBLEMS = 16


# ------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in METHODS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; allowed: {', '.join(METHODS)}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Naive reference (a) vs engine in-process (b) vs Ray pipeline (c) vs plain batched "
        "generate() (d), on the same GSM8K problems; writes bench.json and bench.md."
    )
    p.add_argument(
        "--config", type=Path, default=None, help="base YAML config (default configs/default.yaml)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the issue's full matrix (long: hours on 2 cores): every method in every row, "
        "batch sizes 1,4,8,16, B=1 on 4 problems, naive on 2 problems (self-reward: 1), Ray for "
        "every method",
    )
    p.add_argument(
        "--problems",
        type=int,
        help="N for the engine rows (b) at batch sizes > 1 and the ceiling (d) (16)",
    )
    p.add_argument(
        "--b1-problems",
        type=int,
        help="N for the engine rows (b) at batch size 1: the first of the N, the naive's "
        "problems (1; full 4)",
    )
    p.add_argument(
        "--naive-problems",
        type=int,
        help="problems for the naive rows (a) of cot and latentseek-psrm: the first of the N "
        "(1; full 2)",
    )
    p.add_argument(
        "--naive-self-problems",
        type=int,
        help="problems for the naive latentseek-self row (1)",
    )
    p.add_argument(
        "--ray-problems", type=int, help="problems for the Ray rows (c) (16, the target's slice)"
    )
    p.add_argument(
        "--ray-batch-size",
        type=int,
        help="batch size of the Ray rows (c) (8: 16 problems make 2 batches, one per worker)",
    )
    p.add_argument(
        "--ray-methods",
        type=_method_list,
        help="methods with Ray rows (cot: the cheapest 16-problem slice; full: all)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        help="engine batch sizes, comma-separated (1,16; full 1,4,8,16)",
    )
    p.add_argument(
        "--methods",
        type=_method_list,
        help=f"comma-separated, of {', '.join(METHODS)} (cot,latentseek-psrm; full: all three)",
    )
    p.add_argument("--offset", type=int, default=0, help="first GSM8K row")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--verifier-max-new-tokens", type=int, default=64)
    p.add_argument("--max-iters", type=int, default=3, help="K")
    p.add_argument("--skip-naive", action="store_true", help="no (a) rows")
    p.add_argument("--skip-ray", action="store_true", help="no (c) rows")
    p.add_argument("--skip-ceiling", action="store_true", help="no (d) rows")
    p.add_argument(
        "--ceiling-tokens",
        type=int,
        default=0,
        help="tokens the ceiling (d) generates, at most the engine's total (0: one batch of "
        "rows of max_new_tokens / 2)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads of the in-process rows; 0: default"
    )
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every measured process (all rows alike); PASSIVE keeps idle "
        "OpenMP threads from spinning, which on a shared machine costs several-fold; '' leaves "
        "the environment as it is",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="report folder")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config key (e.g. --set lr=0.05); repeatable",
    )


# What an option left unset means: the default profile fits `make bench` into about 13 minutes
# of a quiet 2-core machine (the naive latentseek-psrm problem alone is 6 of them); --full runs
# the whole matrix.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "problems": 16,
        "b1_problems": 1,
        "naive_problems": 1,
        "naive_self_problems": 1,
        "ray_problems": 16,
        "ray_batch_size": 8,
        "ray_methods": ["cot"],
        "batch_sizes": [1, 16],
        "methods": ["cot", "latentseek-psrm"],
    },
    "full": {
        "problems": 16,
        "b1_problems": 4,
        "naive_problems": 2,
        "naive_self_problems": 1,
        "ray_problems": 16,
        "ray_batch_size": 8,
        "ray_methods": list(METHODS),
        "batch_sizes": [1, 4, 8, 16],
        "methods": list(METHODS),
    },
}


def resolve_profile(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the profile (--full or the default)."""
    profile = PROFILES["full" if getattr(args, "full", False) else "default"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------
# Child processes: one configuration each


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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _child_entry(spec_path: str, out_path: str) -> int:
    """Run one configuration (a JSON spec) and write its JSON result. Called as a subprocess."""
    _quiet()
    spec = json.loads(Path(spec_path).read_text())
    from pipeline.config import Config

    cfg = Config(**spec["cfg"])
    kind = spec["kind"]
    run = {
        "naive": _child_naive,
        "engine": _child_engine,
        "ceiling": _child_ceiling,
        "ray": _child_ray,
    }.get(kind)
    if run is None:
        raise ValueError(f"unknown child kind {kind!r}")
    result = run(cfg, spec)
    result.setdefault("peak_rss_mb", _peak_rss_mb())
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


def _problems(cfg: Any) -> list[Any]:
    from pipeline.data import load_dataset

    return list(load_dataset(cfg).problems)


def _solver(cfg: Any) -> Any:
    import torch

    from pipeline.methods import Solver

    solver = Solver.from_config(cfg)
    torch.manual_seed(cfg.seed)
    return solver


def _warm_up(solver: Any, prompt: list[int]) -> None:
    """One short untimed generation: first-call allocations are not charged to any row."""
    from pipeline.generation import GenerationRequest

    solver.generator.generate([GenerationRequest(prompt, 4)])


def _prompt_ids(solver: Any, problem: Any) -> list[int]:
    from pipeline.prompts import render_chat

    messages = solver.template.messages(problem.question, problem.dataset)
    return render_chat(solver.tokenizer, messages, as_text=solver.rules.render_as_text)


def _method_cfg(cfg: Any, key: str) -> Any:
    method, reward = METHODS[key]
    return cfg.replace(method=[method], reward=reward or cfg.reward)


def _child_engine(cfg: Any, spec: dict) -> dict:

    from pipeline.grading import grade

    method, _ = METHODS[spec["method"]]
    cfg = _method_cfg(cfg, spec["method"])
    solver = _solver(cfg)
    problems = _problems(cfg)
    _warm_up(solver, _prompt_ids(solver, problems[0]))
    rss_loaded = _rss_mb()
    b = spec["batch_size"]
    results, chunk_walls = [], []
    start = time.perf_counter()
    for i in range(0, len(problems), b):
        t = time.perf_counter()
        results.extend(solver.run(method, problems[i : i + b]))
        chunk_walls.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    rows = []
    for k, r in enumerate(results):
        c = r.compute
        rows.append(
            {
                "problem_id": r.problem_id,
                "final_answer": r.final_answer,
                "extracted": r.final_extracted,
                "correct": bool(r.final_correct),
                "cot_extracted": grade(r.cot_answer, r.gold, solver.style).extracted,
                "iterations": r.iterations,
                "stop_reason": r.stop_reason,
                "error": r.error,
                "solver_generated": c.solver_generated_tokens,
                "verifier_generated": c.verifier_generated_tokens,
                "solver_prompt": c.solver_prompt_tokens,
                "verifier_prompt": c.verifier_prompt_tokens,
                "wall_s": chunk_walls[k // b] / len(problems[(k // b) * b : (k // b) * b + b]),
            }
        )
    return _in_process_result(wall, rows, rss_loaded)


def _in_process_result(wall: float, rows: list[dict], rss_loaded: float) -> dict:
    """What an in-process row (engine, naive) returns to the driver."""
    import torch

    return {
        "wall_s": wall,
        "problems": len(rows),
        "rows": rows,
        "rss_after_load_mb": rss_loaded,
        "torch_threads": torch.get_num_threads(),
    }


def _naive_self_reward(model: Any, tokenizer: Any, verifiers: Any, cfg: Any, style: str, eos):
    """SPEC §2 self-reward computed the naive way: the verifiers one by one, each decoded greedily
    without a cache (capped at `verifier_max_new_tokens`, like the engine), verdicts read from the
    generated text only. Returns (reward_fn(question) -> (text, gold) -> float, token counter)."""
    from pipeline.prompts import render_chat
    from pipeline.reference import naive_greedy
    from pipeline.rewards import combine_verdicts, has_format

    counter = {"generated": 0, "prompt": 0}
    weights = [v.weight for v in verifiers.verifiers]

    def for_question(question: str):
        def reward(text: str, gold: str) -> float:
            verdicts = []
            for v in verifiers.verifiers:
                prompt = render_chat(tokenizer, v.messages(question, text))
                tokens, _ = naive_greedy(model, prompt, cfg.verifier_max_new_tokens, eos)
                counter["generated"] += len(tokens)
                counter["prompt"] += len(prompt)
                out = tokenizer.decode(tokens, skip_special_tokens=True)
                verdicts.append(verifiers.parse_verdict(out))
            format_ok = not cfg.format_rule or has_format(text, style)
            return combine_verdicts(verdicts, weights, format_ok, verifiers.format_penalty)

        return reward

    return for_question, counter


def _child_naive(cfg: Any, spec: dict) -> dict:

    from jobs.reference import run_reference
    from pipeline import reference as naive
    from pipeline.grading import grade

    key = spec["method"]
    method, reward_name = METHODS[key]
    cfg = _method_cfg(cfg, key)
    solver = _solver(cfg)  # for the model, tokenizer and templates only
    model, tok, style = solver.loaded.model, solver.tokenizer, solver.style
    eos = naive.model_eos_ids(model, tok)
    problems = _problems(cfg)
    naive.naive_greedy(model, _prompt_ids(solver, problems[0]), 2, eos)  # warm-up
    rss_loaded = _rss_mb()
    self_reward, counter = _naive_self_reward(model, tok, solver.verifiers, cfg, style, eos)
    rows = []
    cot_row: dict = {}
    start = time.perf_counter()
    for p in problems:
        t = time.perf_counter()
        prompt = _prompt_ids(solver, p)
        before = counter["generated"]
        if method == "cot":
            tokens, _ = naive.naive_greedy(model, prompt, cfg.max_new_tokens, eos)
            text, solver_tokens, iterations, stop = (
                tok.decode(tokens, skip_special_tokens=True),
                len(tokens),
                0,
                "",
            )
        else:
            # PSRM: the reference loop's own (reward_fn None); self: the naive verifiers above.
            fn = None if reward_name == "psrm" else self_reward(p.question)
            res = run_reference(cfg, solver.loaded, p, prompt, reward_fn=fn)
            text = res.final_text
            solver_tokens = len(res.cot_tokens) + sum(len(a) for a in res.answer_tokens)
            iterations, stop = res.iterations, res.stop_reason
            cot_g = grade(res.cot_text, p.gold, style)
            cot_row = {  # the CoT pass alone: the naive cot baseline on this problem
                "problem_id": p.problem_id,
                "final_answer": res.cot_text,
                "extracted": cot_g.extracted,
                "correct": bool(cot_g.correct),
                "iterations": 0,
                "stop_reason": "",
                "error": "",
                "solver_generated": len(res.cot_tokens),
                "verifier_generated": 0,
                "wall_s": res.cot_seconds,
            }
        g = grade(text, p.gold, style)
        rows.append(
            {
                "problem_id": p.problem_id,
                "final_answer": text,
                "extracted": g.extracted,
                "correct": bool(g.correct),
                "iterations": iterations,
                "stop_reason": stop,
                "error": "",
                "solver_generated": solver_tokens,
                "verifier_generated": counter["generated"] - before,
                "wall_s": time.perf_counter() - t,
                **({"cot": cot_row} if method != "cot" else {}),
            }
        )
    return _in_process_result(time.perf_counter() - start, rows, rss_loaded)


def _child_ceiling(cfg: Any, spec: dict) -> dict:
    """Plain `model.generate` (greedy, its own KV cache) on left-padded batches of the same
    prompts: rows of `max_new_tokens` tokens (EOS ignored: min_new_tokens = max_new_tokens)
    until `total_tokens` tokens are generated."""
    import torch

    solver = _solver(cfg)
    model, tok = solver.loaded.model, solver.tokenizer
    problems = _problems(cfg)
    prompts = [_prompt_ids(solver, p) for p in problems]
    # the engine's batch size, as it ran: never more rows than problems
    b = min(spec["batch_size"], len(prompts))
    total, length = spec["total_tokens"], cfg.max_new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = solver.loaded.device

    def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return ids.to(device), mask.to(device)

    def generate(rows: list[list[int]], n: int) -> int:
        ids, mask = batch(rows)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
            )
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    generate(prompts[:1], 2)  # warm-up
    rss_loaded = _rss_mb()
    done, calls, cursor = 0, 0, 0
    start = time.perf_counter()
    while done < total:
        rows = [prompts[(cursor + i) % len(prompts)] for i in range(b)]
        cursor += b
        n = min(length, -(-(total - done) // b))
        done += generate(rows, n)
        calls += 1
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "generated": done,
        "generate_calls": calls,
        "batch_size": b,
        "rss_after_load_mb": rss_loaded,
        "torch_threads": torch.get_num_threads(),
    }


class _TreeRss:
    """Samples the RSS of this process and all its descendants (Ray's raylet, GCS, workers)."""

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
            if "EvalWorker" in name:
                workers += rss
        self.peak_total = max(self.peak_total, total)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_driver = max(self.peak_driver, self.me.memory_info().rss / 2**20)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> _TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _child_ray(cfg: Any, spec: dict) -> dict:
    """The Ray pipeline with each worker count of `spec["workers"]`, one after another on one
    local Ray (started once, not charged); returns {"wall_s": total, "runs": {workers: result}}."""
    import ray

    from jobs.run import start_ray

    cfg = _method_cfg(cfg, spec["method"])
    tmp = Path(spec["tmp_dir"])
    cfg = cfg.replace(
        batch_size=spec["batch_size"],
        output_dir=str(tmp),
        mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
    )
    setup = time.perf_counter()
    start_ray(cfg)  # one-off cluster start, not charged to the rows
    import mlflow  # the store's one-off creation (schema migrations), not charged either

    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.search_experiments()
    setup = time.perf_counter() - setup
    runs = {}
    for workers in spec["workers"]:
        _wait_for_idle_cluster(ray)  # the previous configuration's workers are gone
        run_cfg = cfg.replace(workers=workers, run_id=f"bench-{spec['method']}-w{workers}")
        runs[str(workers)] = {**_ray_configuration(run_cfg), "setup_s": setup}
    ray.shutdown()
    return {"wall_s": sum(r["wall_s"] for r in runs.values()), "runs": runs}


def _wait_for_idle_cluster(ray: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total, free = ray.cluster_resources(), ray.available_resources()
        if free.get("CPU", 0.0) >= total.get("CPU", 0.0):
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"Ray workers of the previous configuration still hold CPUs after {timeout} s"
    )


def _ray_configuration(cfg: Any) -> dict:
    from analysis.tables import load_run
    from jobs.run import run_evaluation

    last_batch = [0.0]
    start = time.perf_counter()

    def on_batch(state: dict) -> None:
        last_batch[0] = time.perf_counter() - start

    log_lines: list[str] = []
    with _TreeRss() as rss:
        summary = run_evaluation(cfg, progress=False, on_batch=on_batch, log=log_lines.append)
        wall = time.perf_counter() - start
    problems, _ = load_run(summary.run_dir)
    rows = [
        {
            "problem_id": str(r.problem_id),
            "final_answer": r.final_answer,
            "extracted": r.final_extracted,
            "correct": bool(r.final_correct),
            "iterations": int(r.iterations),
            "stop_reason": r.stop_reason,
            "error": r.error,
            "solver_generated": int(r.solver_generated_tokens),
            "verifier_generated": int(r.verifier_generated_tokens),
            "wall_s": float(r.wall_seconds),
            "worker": r.worker,
        }
        for r in problems.itertuples()
    ]
    busy: dict[str, float] = {}
    for r in rows:
        busy[r["worker"]] = busy.get(r["worker"], 0.0) + r["wall_s"]
    return {
        "worker_busy_s": busy,
        "wall_s": wall,
        "until_last_batch_s": last_batch[0],
        "problems": len(rows),
        "failures": summary.failures,
        "worker_failures": summary.worker_failures,
        "rows": rows,
        "peak_rss_mb": rss.peak_total,
        "peak_rss_workers_mb": rss.peak_workers,
        "peak_rss_driver_mb": rss.peak_driver,
        "log": log_lines,
    }


# ------------------------------------------------------------------------------------------
# The driver


class _Runner:
    def __init__(self, out: Path, t0: float, env: dict[str, str]) -> None:
        self.env = env
        self.out = out
        self.t0 = t0
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def say(self, msg: str) -> None:
        elapsed = time.perf_counter() - self.t0
        print(f"[bench {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {msg}", file=sys.stderr)

    def child(self, label: str, spec: dict) -> dict:
        """Run one configuration in a fresh process; on failure the row carries the error."""
        self.count += 1
        name = f"{self.count:02d}-{label.replace(' ', '_').replace('=', '')}"
        spec_path, out_path = self.logs / f"{name}.spec.json", self.logs / f"{name}.result.json"
        log_path = self.logs / f"{name}.log"
        spec_path.write_text(json.dumps(spec, indent=1))
        self.say(f"{label} ...")
        load = os.getloadavg()[0]
        t = time.perf_counter()
        code = (
            "import sys; from jobs.bench import _child_entry; "
            "sys.exit(_child_entry(sys.argv[1], sys.argv[2]))"
        )
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-c", code, str(spec_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        took = time.perf_counter() - t
        if proc.returncode != 0 or not out_path.exists():
            tail = log_path.read_text().strip().splitlines()[-5:]
            self.say(f"{label} FAILED (exit {proc.returncode}) after {took:.0f} s: see {log_path}")
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
        result = json.loads(out_path.read_text())
        result["process_s"] = took
        result["load_before"] = load
        result["load_after"] = os.getloadavg()[0]
        self.say(f"{label} done: {result['wall_s']:.1f} s measured ({took:.0f} s with startup)")
        return result


def _cot_from_naive_latentseek(source: dict) -> dict:
    """The naive cot result read off a naive latentseek run: each problem's CoT pass, timed alone."""
    rows = [r["cot"] for r in source["rows"]]
    return {
        **{k: v for k, v in source.items() if k not in ("rows", "wall_s", "process_s")},
        "wall_s": sum(r["wall_s"] for r in rows),
        "rows": rows,
        "derived_from": "latentseek-psrm naive",
    }


def _pythonpath() -> str:
    from pipeline.config import PROJECT_ROOT

    parts = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return ":".join(parts)


def _tokens(result: dict) -> int:
    return sum(r["solver_generated"] + r["verifier_generated"] for r in result.get("rows", []))


def _row(kind: str, method: str, config: str, result: dict, **extra: Any) -> dict:
    """One table row from a child's result: rates per problem so different N compare."""
    row: dict[str, Any] = {"row": kind, "method": method, "config": config, **extra}
    if "error" in result:
        row.update(problems=0, error=result["error"])
        return row
    wall = result["wall_s"]
    n = 0 if kind == "d" else result.get("problems", 0)  # (d) is a token rate, not problems
    tokens = result["generated"] if kind == "d" else _tokens(result)
    rows = result.get("rows", [])
    row.update(
        problems=n,
        wall_s=wall,
        problems_per_hour=3600.0 * n / wall if n and wall > 0 else None,
        generated_tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else None,
        peak_rss_mb=result.get("peak_rss_mb"),
        rss_after_load_mb=result.get("rss_after_load_mb"),
        accuracy=(sum(r["correct"] for r in rows) / len(rows)) if rows else None,
        mean_iterations=(sum(r["iterations"] for r in rows) / len(rows)) if rows else None,
        load=(result.get("load_before"), result.get("load_after")),
    )
    return row


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _common(a: list[dict], b: list[dict]) -> int:
    """How many problems two row lists share (what an answer check actually compares)."""
    return len({r["problem_id"] for r in a} & {r["problem_id"] for r in b})


def compare_answers(reference: list[dict], other: list[dict]) -> list[dict]:
    """Problems (in both lists) whose final answer text differs; with the extracted answers."""
    ref = {r["problem_id"]: r for r in reference}
    diffs = []
    for r in other:
        a = ref.get(r["problem_id"])
        if a is None or a["final_answer"] == r["final_answer"]:
            continue
        common = 0
        for x, y in zip(a["final_answer"], r["final_answer"]):
            if x != y:
                break
            common += 1
        diffs.append(
            {
                "problem_id": r["problem_id"],
                "reference_extracted": a.get("extracted"),
                "other_extracted": r.get("extracted"),
                "same_extracted": a.get("extracted") == r.get("extracted"),
                "first_difference_at_char": common,
                "reference_tail": a["final_answer"][common : common + 60],
                "other_tail": r["final_answer"][common : common + 60],
            }
        )
    return diffs


def compute_ratios(rows: list[dict], naive_matched: dict[str, dict]) -> dict[str, dict]:
    """Per method: b/a (per-problem rates, per-token rates, and B=1 matched on the naive's
    problems), c/b, c2/c1 and b/d. `naive_matched[method]` holds {"naive_s", "engine_b1_s"} summed
    over the same problems."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and "error" not in r]

        def get(kind: str, config: str | None = None, mine: list[dict] = mine) -> dict | None:
            return next(
                (r for r in mine if r["row"] == kind and config in (None, r["config"])), None
            )

        engine = [r for r in mine if r["row"] == "b" and r.get("problems_per_hour")]
        best = max(engine, key=lambda r: r["problems_per_hour"] or 0, default=None)
        naive, ceiling = get("a"), get("d")
        ray1, ray2 = get("c", "ray 1 worker"), get("c", "ray 2 workers")
        res: dict[str, Any] = {"best_batch_size": best.get("batch_size") if best else None}
        if best and naive:
            res["b_over_a_direct"] = _ratio(best["problems_per_hour"], naive["problems_per_hour"])
            res["b_over_a_tokens_per_s"] = _ratio(best["tokens_per_s"], naive["tokens_per_s"])
            m = naive_matched.get(method)
            if m and m.get("engine_b1_s"):
                # engine B=1 vs naive, seconds on the very same problems
                res["b1_over_a_matched"] = m["naive_s"] / m["engine_b1_s"]
        if best and ceiling:
            res["b_over_d_tokens_per_s"] = _ratio(best["tokens_per_s"], ceiling["tokens_per_s"])
        for name, ray in (("c1", ray1), ("c2", ray2)):
            if best and ray:
                res[f"{name}_over_b"] = _ratio(ray["problems_per_hour"], best["problems_per_hour"])
        if ray1 and ray2:
            res["c2_over_c1"] = _ratio(ray2["problems_per_hour"], ray1["problems_per_hour"])
            res["c2_over_c1_until_last_batch"] = _ratio(
                ray1.get("until_last_batch_s"), ray2.get("until_last_batch_s")
            )
            res["ray_problems"] = min(ray1["problems"], ray2["problems"])
        out[method] = res
    return out


def evaluate_targets(ratios: dict[str, dict]) -> list[dict]:
    targets = []
    ls = ratios.get("latentseek-psrm", {})
    values = [
        v for v in (ls.get("b_over_a_direct"), ls.get("b_over_a_tokens_per_s")) if v is not None
    ]
    value = min(values) if values else None
    targets.append(
        {
            "target": f"latentseek-psrm problems/h, engine best batch >= {TARGET_NAIVE_SPEEDUP:g}x "
            "naive (a) (the smaller of the problems/h and the tokens/s ratio)",
            "value": value,
            "met": None if value is None else value >= TARGET_NAIVE_SPEEDUP,
        }
    )
    for method, res in ratios.items():
        value = res.get("b_over_d_tokens_per_s")
        if value is None:
            continue
        targets.append(
            {
                "target": f"{method}: engine tokens/s at best batch >= "
                f"{TARGET_CEILING_FRACTION:g} x ceiling (d)",
                "value": value,
                "met": value >= TARGET_CEILING_FRACTION,
            }
        )
    for method, res in ratios.items():
        value = res.get("c2_over_c1")
        if value is None:
            continue
        n = res.get("ray_problems", 0)
        targets.append(
            {
                "target": f"{method}: Ray 2 workers >= {TARGET_WORKER_SCALING:g}x 1 worker "
                f"(problems/h, end to end, {n} problems)",
                "value": value,
                "met": value >= TARGET_WORKER_SCALING and n >= TARGET_RAY_PROBLEMS,
                "note": "" if n >= TARGET_RAY_PROBLEMS else f"fewer than {TARGET_RAY_PROBLEMS}",
            }
        )
    return targets


# ------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
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


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c) for c in r) + " |")
    return "\n".join(lines)


def _ray_details(rows: list[dict]) -> list[str]:
    ray_rows = [r for r in rows if r["row"] == "c" and "error" not in r]
    if not ray_rows:
        return []
    return [
        "Ray rows in detail (setup = Ray start + MLflow store creation, not charged; busy = the "
        "sum of a worker's batch wall times; RSS: all processes / workers only / driver only):",
        "",
        _table(
            [
                "method",
                "configuration",
                "B",
                "setup s",
                "wall s",
                "until last batch s",
                "worker busy s",
                "peak RSS MB all/workers/driver",
            ],  # fmt: skip
            [
                [
                    r["method"],
                    r["config"],
                    r.get("batch_size"),
                    r.get("setup_s"),
                    r.get("wall_s"),
                    r.get("until_last_batch_s"),
                    ", ".join(f"{v:.0f}" for v in (r.get("worker_busy_s") or {}).values()),
                    "/".join(
                        f"{r.get(k) or 0:.0f}"
                        for k in ("peak_rss_mb", "peak_rss_workers_mb", "peak_rss_driver_mb")
                    ),
                ]
                for r in ray_rows
            ],
        ),
        "",
    ]


def not_run(args: argparse.Namespace) -> list[str]:
    """The rows of the full matrix this invocation left out (so a reader sees what is missing)."""
    missing = []
    for method in METHODS:
        left = []
        if method not in args.methods:
            left.append("a, b, d")
        else:
            n = args.naive_self_problems if method == "latentseek-self" else args.naive_problems
            if args.skip_naive or n < 1:
                left.append("a")
            if args.skip_ceiling:
                left.append("d")
        if args.skip_ray or method not in args.ray_methods:
            left.append("c")
        if left:
            missing.append(f"{method}: {', '.join(left)}")
    return missing


def render_markdown(report: dict) -> str:
    rows = report["rows"]
    parts = [
        "# latentseek bench",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine'].get('cpu')}, {report['machine'].get('cores')} cores, "
        f"torch {report['machine'].get('torch')}, transformers "
        f"{report['machine'].get('transformers')}, ray {report['machine'].get('ray')}, "
        f"torch threads in-process {report.get('torch_threads')}",
        f"- settings: {report['settings_text']}",
        f"- rows not run here: {'; '.join(report.get('not_run') or []) or 'none'}",
        f"- total wall time: {report['total_wall_s']:.0f} s; load average at start/end: "
        f"{report['load_start']:.2f} / {report['load_end']:.2f}",
        "",
        "## Results",
        "",
        _table(
            [
                "row",
                "method",
                "configuration",
                "N",
                "wall s",
                "problems/h",
                "gen tokens",
                "tokens/s",
                "peak RSS MB",
                "accuracy",
                "mean iters",
                "load (before/after)",
            ],  # fmt: skip
            [
                [
                    r["row"],
                    r["method"],
                    r["config"],
                    r.get("problems"),
                    r.get("wall_s"),
                    r.get("problems_per_hour"),
                    r.get("generated_tokens"),
                    r.get("tokens_per_s"),
                    r.get("peak_rss_mb"),
                    r.get("accuracy"),
                    r.get("mean_iterations"),
                    "/".join(f"{x:.1f}" for x in r["load"] if x is not None)
                    if r.get("load")
                    else r.get("error", "-")[:80],
                ]  # fmt: skip
                for r in rows
            ],
        ),
        "",
        *_ray_details(rows),
        "## Ratios",
        "",
        _table(
            [
                "method",
                "best B",
                "b/a problems/h",
                "b/a tokens/s",
                "b(B=1)/a matched",
                "c1/b",
                "c2/b",
                "c2/c1",
                "c2/c1 until last batch",
                "b/d tokens/s",
            ],  # fmt: skip
            [
                [
                    m,
                    r.get("best_batch_size"),
                    r.get("b_over_a_direct"),
                    r.get("b_over_a_tokens_per_s"),
                    r.get("b1_over_a_matched"),
                    r.get("c1_over_b"),
                    r.get("c2_over_b"),
                    r.get("c2_over_c1"),
                    r.get("c2_over_c1_until_last_batch"),
                    r.get("b_over_d_tokens_per_s"),
                ]  # fmt: skip
                for m, r in report["ratios"].items()
            ],
        ),
        "",
        "## Targets",
        "",
        _table(
            ["target", "measured", "met"],
            [
                [t["target"], t["value"], "n/a" if t["met"] is None else t["met"]]
                for t in report["targets"]
            ],
        ),
        "",
        "## Answers",
        "",
    ]
    for check in report["answer_checks"]:
        n_diff = len(check["differences"])
        parts.append(
            f"- {check['method']}: {check['what']}: {check['compared'] - n_diff} of "
            f"{check['compared']} identical" + ("" if not n_diff else f"; {n_diff} differ:")
        )
        for d in check["differences"]:
            parts.append(
                f"  - {d['problem_id']}: extracted {d['reference_extracted']!r} vs "
                f"{d['other_extracted']!r}, text differs from char {d['first_difference_at_char']}"
                f" ({d['reference_tail']!r} vs {d['other_tail']!r})"
            )
    if not report["answer_checks"]:
        parts.append("- (no comparison: rows missing)")
    parts += ["", "## How it was measured", ""]
    parts += [f"- {line}" for line in report["notes"]]
    return "\n".join(parts) + "\n"


NOTES = [
    "Each configuration runs in a fresh child process, one after another. Wall time is "
    "time.perf_counter around the configuration only (model load, imports and one short warm-up "
    "generation excluded). Rates are per problem (problems/h = 3600 N / wall), so rows with "
    "different N compare (the B=1 rows run the first --b1-problems of the N); problem cost varies "
    "(a problem whose CoT is accepted costs one generation), hence also the per-token ratio.",
    "Generated tokens = solver + verifier tokens decoded, forced LatentSeek prefix tokens included "
    "(as the engine counts them); prompt tokens are not counted.",
    "b/a problems/h: engine at its best batch size (problems 0..N-1) over the naive rate (its "
    "own first problems). Problems differ in cost (tokens), so b/a tokens/s is the same ratio "
    "normalised by generated tokens per problem; the target uses the smaller of the two. "
    "b(B=1)/a matched: naive seconds / engine B=1 seconds on the naive's very problems.",
    "Peak RSS, in-process rows (a, b, d): the child's own ru_maxrss (model, imports and the "
    "configuration). Ray rows (c): the peak of the summed RSS of the driver and all its "
    "descendants (GCS, raylet, workers), sampled every 0.25 s; the workers' share is in bench.json "
    "(peak_rss_workers_mb).",
    "Ray rows: run_evaluation end to end (worker start and model load, scheduling, Parquet "
    "records, compaction, MLflow logging) with Ray already started and the MLflow store already "
    "created (both one-off, reported as setup_s in bench.json); workers use cpus_per_worker=1 "
    "(1 torch thread each), batch size --ray-batch-size (8: the 16 problems make one batch per "
    "worker with 2 workers). 'c2/c1 until last batch' leaves out what follows the last batch "
    "(compaction, MLflow).",
    "Ceiling (d): model.generate greedy with its cache, left-padded batches of the same solver "
    "prompts at the engine's best batch size, rows of max_new_tokens tokens with EOS ignored "
    "(min_new_tokens = max_new_tokens): one full batch (--ceiling-tokens), at most the engine's "
    "total; methods with the same best batch size share the run. A full batch for its whole "
    "length is generate()'s best case; the engine's batches shrink as rows stop at EOS, and for "
    "self-reward it also decodes the longer verifier prompts (question + answer).",
    "Naive (a): pipeline/reference.py (no cache, full forward per token, one problem at a "
    "time); its self-reward runs the verifiers one by one with the engine's greedy/capped "
    "settings (jobs/bench.py _naive_self_reward). The naive cot row is the CoT pass of the naive "
    "latentseek-psrm run on the same problem, timed on its own (the same code a separate naive "
    "cot run would execute).",
    "The machine may be shared: the load average before/after each row is in the table; ratios "
    "come from rows measured in the same run. Every measured process gets OMP_WAIT_POLICY=PASSIVE "
    "(--omp-wait-policy): with OpenMP's default spin-waiting, 2 torch threads on 2 cores that "
    "another process also uses decoded several times slower (measured 6x at batch size 1).",
]


# ------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    from pipeline.config import CONFIG_DIR, load_config

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    args = resolve_profile(args)
    base_path = args.config or (CONFIG_DIR / "default.yaml")
    cfg = load_config(
        base_path if Path(base_path).exists() else None,
        list(args.overrides)
        + [
            f"max_new_tokens={args.max_new_tokens}",
            f"verifier_max_new_tokens={args.verifier_max_new_tokens}",
            f"max_iters={args.max_iters}",
            f"offset={args.offset}",
            f"limit={args.problems}",
            f"threads={args.threads}",
        ],
    )
    from pipeline.model import prepare_model

    prepare_model(cfg)  # dequantise the embedded GGUF once, before any child needs it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    runner = _Runner(out, t0, env)
    base = cfg.to_dict()
    n_naive = min(args.naive_problems, args.problems)
    n_naive_self = min(args.naive_self_problems, args.problems)
    rows: list[dict] = []
    results: dict[tuple[str, str], dict] = {}

    # (b) engine, every batch size
    best_b: dict[str, int] = {}
    for method in args.methods:
        for b in args.batch_sizes:
            n = min(args.b1_problems, args.problems) if b == 1 else args.problems
            res = runner.child(
                f"engine {method} B={b} N={n}",
                {"kind": "engine", "cfg": {**base, "limit": n}, "method": method, "batch_size": b},
            )
            results[(method, f"b{b}")] = res
            rows.append(_row("b", method, f"engine B={b}", res, batch_size=b))
        engine = [r for r in rows if r["method"] == method and r["row"] == "b" and r["problems"]]
        if engine:
            best_b[method] = max(engine, key=lambda r: r["problems_per_hour"])["batch_size"]

    # (d) ceiling at the engine's best batch size: one batch of rows of max_new_tokens / 2 (or
    # --ceiling-tokens), at most the engine's total; methods with the same settings share a run
    if not args.skip_ceiling:
        ceilings: dict[tuple[int, int], dict] = {}
        for method in args.methods:
            if method not in best_b:
                continue
            b = best_b[method]
            # one run per batch size: the smallest engine total among the methods there
            engine_total = min(
                _tokens(results[(m, f"b{b}")]) for m in args.methods if best_b.get(m) == b
            )
            total = min(engine_total, args.ceiling_tokens or b * cfg.max_new_tokens // 2)
            if (b, total) not in ceilings:
                ceilings[(b, total)] = runner.child(
                    f"ceiling B={b} tokens={total}",
                    {"kind": "ceiling", "cfg": base, "batch_size": b, "total_tokens": total},
                )
            rows.append(_row("d", method, f"generate() B={b}", ceilings[(b, total)], batch_size=b))

    # (a) naive; the naive cot row is the CoT pass of the naive latentseek-psrm run when both
    # run on the same problems (the same code, timed on its own), which saves a child
    if not args.skip_naive:
        order = sorted(args.methods, key=lambda m: m != "latentseek-psrm")
        for method in order:
            n = n_naive_self if method == "latentseek-self" else n_naive
            if n < 1:
                continue
            source = results.get(("latentseek-psrm", "naive"))
            if method == "cot" and source and "error" not in source:
                res = _cot_from_naive_latentseek(source)
                label = "naive (CoT pass of the latentseek-psrm row)"
            else:
                res = runner.child(
                    f"naive {method} N={n}",
                    {"kind": "naive", "cfg": {**base, "limit": n}, "method": method},
                )
                label = "naive"
            results[(method, "naive")] = res
            rows.append(_row("a", method, label, res))

    # (c) Ray, 1 and 2 workers
    if not args.skip_ray:
        with tempfile.TemporaryDirectory(prefix="latentseek-bench-") as tmp:
            for method in args.ray_methods:
                b = args.ray_batch_size
                both = runner.child(
                    f"ray {method} workers=1,2 B={b}",
                    {
                        "kind": "ray",
                        "cfg": {**base, "limit": args.ray_problems, "cpus_per_worker": 1},
                        "method": method,
                        "workers": [1, 2],
                        "batch_size": b,
                        "tmp_dir": str(Path(tmp) / method),
                    },
                )
                for workers in (1, 2):
                    res = both.get("runs", {}).get(str(workers), both)  # a failure: its error
                    res = {
                        **res,
                        **{k: both[k] for k in ("load_before", "load_after") if k in both},
                    }
                    results[(method, f"ray{workers}")] = res
                    label = "ray 1 worker" if workers == 1 else f"ray {workers} workers"
                    rows.append(
                        _row(
                            "c",
                            method,
                            label,
                            res,
                            batch_size=b,
                            until_last_batch_s=res.get("until_last_batch_s"),
                            setup_s=res.get("setup_s"),
                            peak_rss_workers_mb=res.get("peak_rss_workers_mb"),
                            peak_rss_driver_mb=res.get("peak_rss_driver_mb"),
                            worker_busy_s=res.get("worker_busy_s"),
                        )  # fmt: skip
                    )

    # answers and ratios
    checks, matched = [], {}
    for method in args.methods:
        b1 = results.get((method, "b1"), {}).get("rows")
        naive = results.get((method, "naive"), {}).get("rows")
        if naive and b1:
            ids = {r["problem_id"] for r in naive}
            checks.append(
                {
                    "method": method,
                    "what": "naive (a) vs engine B=1 (b)",
                    "compared": _common(naive, b1),
                    "differences": compare_answers(naive, b1),
                }
            )
            matched[method] = {
                "naive_s": sum(r["wall_s"] for r in naive),
                "engine_b1_s": sum(r["wall_s"] for r in b1 if r["problem_id"] in ids),
            }
        for b in args.batch_sizes:
            other = results.get((method, f"b{b}"), {}).get("rows")
            if b != 1 and b1 and other:
                checks.append(
                    {
                        "method": method,
                        "what": f"engine B={b} vs engine B=1",
                        "compared": _common(b1, other),
                        "differences": compare_answers(b1, other),
                    }
                )
        # Ray against the engine row that covers the most problems (ties: the smaller batch)
        engine_rows = [
            (b, results[(method, f"b{b}")]["rows"])
            for b in sorted(args.batch_sizes)
            if results.get((method, f"b{b}"), {}).get("rows")
        ]
        ref_b, ref = max(engine_rows, key=lambda e: len(e[1]), default=(None, None))
        for w in (1, 2):
            other = results.get((method, f"ray{w}"), {}).get("rows")
            if ref and other:
                checks.append(
                    {
                        "method": method,
                        "what": f"Ray {w} worker(s) vs engine B={ref_b} (common problems)",
                        "compared": _common(ref, other),
                        "differences": compare_answers(ref, other),
                    }
                )

    ratios = compute_ratios(rows, matched)
    targets = evaluate_targets(ratios)
    threads = next((r.get("torch_threads") for r in results.values() if "torch_threads" in r), None)
    last = args.offset + args.problems - 1
    naive_text = ", ".join(
        f"{m} N={n_naive_self if m == 'latentseek-self' else n_naive}" for m in args.methods
    )
    settings = (
        f"methods {','.join(args.methods)}; engine (b) rows N={args.problems} "
        f"(GSM8K test rows {args.offset}..{last}), batch sizes "
        f"{','.join(map(str, args.batch_sizes))}, B=1 on the first "
        f"{min(args.b1_problems, args.problems)}; naive (a): {naive_text} (the first of those "
        f"rows); ceiling (d): one batch at the best batch size; Ray (c): "
        f"{','.join(args.ray_methods)} on N={args.ray_problems}, B={args.ray_batch_size}; "
        f"max_new_tokens={cfg.max_new_tokens}, verifier_max_new_tokens="
        f"{cfg.verifier_max_new_tokens}, K={cfg.max_iters}, lr={cfg.lr}, rho={cfg.rho}, "
        f"tau={cfg.reward_threshold}, prompt={cfg.prompt}, model={cfg.model} ({cfg.dtype}), "
        f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "torch_threads": threads,
        "settings": {
            **{
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("func",)
            },
            "config": cfg.to_dict(),
        },  # fmt: skip
        "settings_text": settings,
        "not_run": not_run(args),
        "total_wall_s": time.perf_counter() - t0,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "answer_checks": checks,
        "notes": NOTES,
        "raw": {f"{m}/{k}": v for (m, k), v in results.items()},
    }
    write_report(report, out)
    print(render_markdown(report))
    runner.say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(render_markdown(report))
