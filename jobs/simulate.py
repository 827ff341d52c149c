"""The driver at cluster scale, by simulation: the real driver, scheduler and record store, fed
by stand-in workers that sleep instead of loading a model.

`simulate` runs `jobs.run.run_evaluation` exactly as `latentseek run` does (preflight, the
`pipeline.run.scheduler.Scheduler`, the single writer `pipeline.run.records.RecordStore`, MLflow, the
summary and report) with one difference: each worker is a `StandInWorker` (EvalWorker's `info`
and `run`, no model) started through run_evaluation's `start_worker`. It answers two questions:

- does every problem get recorded exactly once when many workers come and go? Faults: the
  driver kills random busy workers as it goes (`ray.kill`, restarted by Ray, or lost for good),
  stand-ins exit mid-batch at random (`os._exit`), some problem attempts raise (retried) and
  some problems always raise (recorded with their error once out of retries);
- what does one batch cost the driver? Every completed batch passes through one Python loop
  (schedule the next batch, fetch and unpickle the results, encode and fsync a Parquet shard
  pair, progress and live MLflow metrics), so with W workers each taking L seconds per batch
  the driver must handle W / L batches a second, and it sets the pace once

      W  >=  L / (driver seconds per batch)       (`Measurement.workers_at_saturation`)

  The driver's seconds per batch are wall time, measured from the first recorded batch to the
  last by a thread that samples, every 2 ms, what the driver's thread is doing (ACTIVITIES:
  waiting in `ray.wait`, dispatching, fetching results, writing records, MLflow progress, the
  rest); wall, not CPU, because most of a record write is fsync (two files and their
  directories per batch). The CPU time of the thread and of the process are reported beside.

The stand-in's batch latency is lognormal (a long tail: some batches take several times the
median, as long LatentSeek answers and many iterations do), with mean `latency_s`; it is a
function of the seed and the batch's problem ids, so a run's workload does not depend on which
worker takes which batch. The results are plausible `ProblemResult`s (answers of 120 to 480
tokens, 0 to 3 latent iterations) so that the records written are as large as real ones.

`python scripts/simulate_cluster.py [key=value ...]` prints the numbers (docs/throughput.md, "The
driver at cluster scale").
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.data import Problem
from pipeline.method.results import Compute, IterationStats, ProblemResult

GSM8K_FILE = Path(__file__).resolve().parent.parent / "data" / "gsm8k_test.jsonl"


@dataclass(frozen=True)
class Workload:
    """What the stand-in workers do, and the faults of a simulated run."""

    latency_s: float = 1.0  # mean seconds a stand-in spends on one batch
    latency_sigma: float = 0.5  # lognormal shape; 0.5: 1 batch in 20 takes > 2x the median
    crash_rate: float = 0.0  # per batch: the stand-in's process exits mid-batch (os._exit)
    flaky_rate: float = 0.0  # per problem attempt: it raises (the scheduler retries it)
    poison_rate: float = 0.0  # share of problems that raise on every attempt
    kill_every: int = 0  # the driver kills a random busy worker every this many tasks' results
    lose_for_good: int = 0  # of those kills, every second one (up to this many): no restart
    seed: int = 0


def is_poison(problem_id: str, workload: Workload) -> bool:
    """Whether a problem raises on every attempt (a function of the seed and its id)."""
    return random.Random(f"{workload.seed}:poison:{problem_id}").random() < workload.poison_rate


def batch_latency(problem_ids: Sequence[str], workload: Workload) -> float:
    """Seconds a stand-in spends on a batch: lognormal with mean `latency_s`."""
    if workload.latency_s <= 0:
        return 0.0
    rng = random.Random(f"{workload.seed}:latency:{','.join(problem_ids)}")
    sigma = workload.latency_sigma
    return rng.lognormvariate(math.log(workload.latency_s) - sigma * sigma / 2, sigma)


class StandInWorker:
    """EvalWorker's interface (`info`, `run`) without a model: sleeps the batch's latency and
    returns plausible results. Wrapped with `ray.remote` by `stand_in_starter`."""

    def __init__(self, cfg: Any, workload: Workload) -> None:
        import ray

        self.workload = workload
        self.node_id = ray.get_runtime_context().get_node_id()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.node_id[:8]}"
        # Faults differ per process (a restarted worker draws new ones); latencies do not.
        self.rng = random.Random(f"{workload.seed}:faults:{os.getpid()}:{time.time_ns()}")

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "node_id": self.node_id,
            "start_error": "",
            "model": "stand-in",
            "device": "cuda:0",
            "load_seconds": 0.0,
        }

    def stream(
        self,
        method: str,
        problems: Sequence[Problem],
        settings: Any = None,
        progress: Any = None,
    ) -> Iterator[tuple[str, int, Any]]:
        """As EvalWorker.stream (called with `num_returns="streaming"`): the batch's problems
        come back one by one over its latency; posts no progress (`progress` is ignored), so
        the driver's cost measured here is that of the records, not of progress events."""
        latency = batch_latency([p.problem_id for p in problems], self.workload)
        crash_at = (
            latency * self.rng.random() if self.rng.random() < self.workload.crash_rate else -1
        )
        each = latency / max(len(problems), 1)
        for i, p in enumerate(problems):
            if 0 <= crash_at < each * (i + 1):
                time.sleep(max(crash_at - each * i, 0.0))
                os._exit(1)  # the process dies mid-batch, as on a GPU fault or out of memory
            time.sleep(each)
            if is_poison(p.problem_id, self.workload):
                out: Any = f"Traceback ...\nRuntimeError: stand-in: {p.problem_id} always fails"
            elif self.rng.random() < self.workload.flaky_rate:
                out = f"Traceback ...\nRuntimeError: stand-in: {p.problem_id} flaked"
            else:
                out = plausible_result(p, method, each, self.workload)
            yield self.name, i, out


def plausible_result(p: Problem, method: str, seconds: float, workload: Workload) -> ProblemResult:
    """A result shaped like a LatentSeek one: a CoT answer, 0-3 iterations, compute counts."""
    rng = random.Random(f"{workload.seed}:result:{p.problem_id}:{method}")
    words = p.question.split() or ["step"]

    def answer(tokens: int, correct: bool) -> str:
        body = " ".join(rng.choice(words) for _ in range(tokens * 3 // 4))  # ~4/3 tokens a word
        return f"{body}\nThe answer is \\boxed{{{p.gold if correct else p.gold + '1'}}}."

    cot_tokens = rng.randint(120, 480)
    cot_correct = rng.random() < 0.5
    iterations = 0 if method != "latentseek" else rng.choice([0, 0, 1, 2, 3])
    stats, correct, tokens = [], cot_correct, cot_tokens
    for k in range(1, iterations + 1):
        correct, tokens = rng.random() < 0.5, rng.randint(120, 480)
        stats.append(
            IterationStats(k, -0.5 * (not correct), answer(tokens, correct), correct, tokens,
                           loss=rng.uniform(0, 20), grad_norm=rng.uniform(0, 5),
                           tokens_changed=rng.randint(0, 40), mean_logprob=rng.uniform(-2, 0))
        )  # fmt: skip
    cot = answer(cot_tokens, cot_correct)
    final = stats[-1].answer if stats else cot
    return ProblemResult(
        problem_id=p.problem_id,
        dataset=p.dataset,
        method=method,
        question=p.question,
        gold=p.gold,
        cot_answer=cot,
        final_answer=final,
        final_extracted=p.gold if correct else p.gold + "1",
        cot_correct=cot_correct,
        final_correct=correct,
        initial_reward=-0.5 * (not cot_correct) if method == "latentseek" else None,
        rewards=[s.reward for s in stats],
        iterations=iterations,
        update_length=cot_tokens // 5 if iterations else 0,
        cot_length=cot_tokens,
        final_length=tokens,
        stop_reason="threshold" if correct else "max_iters",
        answers=[s.answer for s in stats],
        iteration_stats=stats,
        compute=Compute(
            solver_prompt_tokens=150,
            solver_generated_tokens=cot_tokens + sum(s.tokens for s in stats),
            verifier_prompt_tokens=800 * (iterations + 1),
            verifier_generated_tokens=200 * (iterations + 1),
            forward_calls=cot_tokens * (iterations + 1),
            flops=1.6e10 * (cot_tokens + 1000) * (iterations + 1),
            wall_seconds=seconds,
        ),
        device="cuda:0",
        dtype="bfloat16",
    )


def stand_in_starter(workload: Workload) -> Callable[[Any], Any]:
    """`start_worker` for run_evaluation: one StandInWorker actor per call. num_cpus=0, so that
    any number of them fit one machine (they sleep); restarts as `max_worker_restarts` says."""
    actor_class: list[Any] = []

    def start(cfg: Any) -> Any:
        import ray

        if not actor_class:
            options = {"num_cpus": 0, "max_restarts": cfg.max_worker_restarts}
            actor_class.append(ray.remote(max_task_retries=0, **options)(StandInWorker))
        return actor_class[0].remote(cfg, workload)

    return start


def write_problems(path: Path, n: int) -> Path:
    """A JSON Lines dataset of `n` problems: GSM8K's test questions, cycled (ids are
    `<file stem>-<row>`)."""
    from pipeline.benchmarks.gsm8k import gold as gsm8k_gold

    rows = [json.loads(line) for line in GSM8K_FILE.read_text().splitlines() if line.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            row = rows[i % len(rows)]
            fh.write(json.dumps({"question": row["question"], "answer": gsm8k_gold(row["answer"])}))
            fh.write("\n")
    return path


# ------------------------------------------------------------------------------------------
# Measuring the driver

# Where the driver's thread can be, innermost first: (file, function) -> activity.
ACTIVITIES = (
    ("ray/_private/worker.py", "wait", "waiting"),  # for a worker to return a batch: idle
    ("ray/_private/worker.py", "get", "fetching results"),  # and unpickling them
    ("ray/actor.py", "_remote", "dispatching"),  # sending the next batch
    ("pipeline/run/records.py", "write", "writing records"),  # Parquet, fsync, rename
    ("pipeline/run/tracking.py", "log_progress", "mlflow progress"),
    ("jobs/simulate.py", "__call__", "harness"),  # the simulation's on_batch: not the driver's
)
IDLE = ("waiting", "harness")


def activity(frame: FrameType | None) -> str:
    """What a stack is doing: the innermost frame that ACTIVITIES names, else 'other' (the
    scheduler's and the driver's own bookkeeping)."""
    while frame is not None:
        code = frame.f_code
        for suffix, name, what in ACTIVITIES:
            if code.co_name == name and code.co_filename.endswith(suffix):
                return what
        frame = frame.f_back
    return "other"


class _Sampler(threading.Thread):
    """Samples, every `interval` seconds, what the thread that started it is doing: a
    statistical profile of the driver's wall time, fsync and Ray waits included."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True, name="driver-sampler")
        self.interval = interval
        self.target = threading.get_ident()
        self.counts: Counter[str] = Counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.counts[activity(sys._current_frames().get(self.target))] += 1


@dataclass
class Measurement:
    """The driver's cost from the first recorded batch to the last (start-up and the final
    compaction, summary and MLflow logging apart)."""

    workers: int
    problems: int
    problems_per_task: int
    batches: int  # batches recorded (retries of single problems included)
    wall_s: float
    activity_s: dict[str, float]  # wall seconds of the driver's thread by ACTIVITIES
    thread_cpu_s: float  # CPU time of the driver's thread
    process_cpu_s: float  # CPU time of the whole driver process (Ray's threads included)
    worker_failures: int  # in-flight batches lost with their worker, re-queued
    retried: int
    kills: int  # workers the driver killed
    lost_for_good: int
    failures: int  # problems recorded with an error
    startup_s: float  # run_evaluation's start to the first recorded batch (workers start)
    finish_s: float  # the last recorded batch to its return (compaction, summary, MLflow)
    run_dir: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def intervals(self) -> int:
        return max(self.batches - 1, 1)

    @property
    def batches_per_s(self) -> float:
        return (self.batches - 1) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def driver_ms_per_batch(self) -> float:
        """Wall time the driver's thread is busy per batch (not waiting for workers):
        dispatching, fetching and unpickling results, writing records, its bookkeeping."""
        busy = sum(v for k, v in self.activity_s.items() if k not in IDLE)
        return 1000 * busy / self.intervals

    def ms_per_batch(self, what: str) -> float:
        return 1000 * self.activity_s.get(what, 0.0) / self.intervals

    @property
    def cpu_ms_per_batch(self) -> float:
        return 1000 * self.thread_cpu_s / self.intervals

    @property
    def process_cpu_ms_per_batch(self) -> float:
        return 1000 * self.process_cpu_s / self.intervals

    def workers_at_saturation(self, gpu_batch_s: float, ms_per_batch: float = 0.0) -> float:
        """GPU workers at which the driver would be busy all the time: L / driver cost."""
        cost = (ms_per_batch or self.driver_ms_per_batch) / 1000
        return gpu_batch_s / cost if cost > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "log"}
        out.update(
            batches_per_s=self.batches_per_s,
            driver_ms_per_batch=self.driver_ms_per_batch,
            activity_ms_per_batch={k: self.ms_per_batch(k) for k in self.activity_s},
            cpu_ms_per_batch=self.cpu_ms_per_batch,
            process_cpu_ms_per_batch=self.process_cpu_ms_per_batch,
        )
        return out


@dataclass
class _Mark:
    wall: float
    thread_cpu: float
    process_cpu: float
    samples: Counter[str]

    @classmethod
    def now(cls, sampler: _Sampler) -> _Mark:
        return cls(time.perf_counter(), time.thread_time(), time.process_time(),
                   Counter(sampler.counts))  # fmt: skip


class _DriverClock:
    """on_batch: marks the driver's clocks at every recorded batch, and kills a random busy
    worker every `kill_every` tasks' worth of results while more batches wait than there are workers (so that
    a worker lost for good always costs an in-flight batch, and the run always ends)."""

    def __init__(self, workload: Workload, sampler: _Sampler, per_batch: int = 1) -> None:
        self.workload = workload
        self.sampler = sampler
        self.rng = random.Random(f"{workload.seed}:kills")
        self.batches = 0
        self.per_batch = per_batch  # problems per task: kills count tasks' worth of results
        self.results = 0
        self.first: _Mark | None = None
        self.last: _Mark | None = None
        self.own = [0.0, 0.0]  # this callback's thread / process CPU, left out
        self.own_at_last = (0.0, 0.0)
        self.kills = 0
        self.lost_for_good = 0
        self.gone: set[Any] = set()

    def __call__(self, state: dict[str, Any]) -> None:
        import ray

        mark = _Mark.now(self.sampler)
        self.batches += 1
        before, self.results = self.results, self.results + state.get("results", 1)
        span = self.workload.kill_every * self.per_batch  # a kill per kill_every tasks' results
        due = span and self.results // span > before // span
        self.first = self.first or mark
        self.last, self.own_at_last = mark, (self.own[0], self.own[1])
        scheduler = state["scheduler"]
        busy = [f.worker for f in scheduler.in_flight.values() if f.worker not in self.gone]
        waiting = len(scheduler.queue) > len(state["workers"])
        if busy and due and waiting:
            worker = self.rng.choice(busy)
            for_good = self.kills % 2 == 1 and self.lost_for_good < self.workload.lose_for_good
            ray.kill(worker, no_restart=for_good)
            self.kills += 1
            if for_good:
                self.lost_for_good += 1
                self.gone.add(worker)
        self.own[0] += time.thread_time() - mark.thread_cpu
        self.own[1] += time.process_time() - mark.process_cpu

    def span(self) -> tuple[float, dict[str, float], float, float]:
        """(wall s, wall s by activity, thread CPU s, process CPU s) from first to last batch."""
        if self.first is None or self.last is None:
            return 0.0, {}, 0.0, 0.0
        wall = self.last.wall - self.first.wall
        samples = self.last.samples - self.first.samples
        total = sum(samples.values())
        by_activity = {k: wall * n / total for k, n in sorted(samples.items())} if total else {}
        return (
            wall,
            by_activity,
            self.last.thread_cpu - self.first.thread_cpu - self.own_at_last[0],
            self.last.process_cpu - self.first.process_cpu - self.own_at_last[1],
        )


def simulate(cfg: Any, problems: int, workload: Workload) -> Measurement:
    """Evaluate `problems` stand-in problems with `cfg.workers` stand-in workers through the
    real driver (`run_evaluation`), with `workload`'s latencies and faults; measure the driver.

    `cfg` says everything else as for `latentseek run` (output_dir, run_id, method,
    task_size, max_retries, max_worker_restarts, MLflow); its dataset is replaced by a file of
    `problems` problems under output_dir. Starts a local Ray unless one is running."""
    from jobs.run import run_evaluation

    data = Path(cfg.output_dir) / "simulated" / f"problems-{problems}.jsonl"
    cfg = cfg.replace(dataset=str(write_problems(data, problems)), limit=0, offset=0, ids=[])
    sampler = _Sampler()
    clock = _DriverClock(workload, sampler, cfg.problems_per_task)
    log: list[str] = []
    sampler.start()
    start = time.perf_counter()
    try:
        summary = run_evaluation(
            cfg,
            progress=False,
            on_batch=clock,
            log=log.append,
            start_worker=stand_in_starter(workload),
        )
    finally:
        end = time.perf_counter()
        sampler.stopped.set()
        sampler.join()
    wall, by_activity, thread_cpu, process_cpu = clock.span()
    return Measurement(
        workers=cfg.workers,
        problems=problems,
        problems_per_task=cfg.problems_per_task,
        batches=clock.batches,
        wall_s=wall,
        activity_s=by_activity,
        thread_cpu_s=thread_cpu,
        process_cpu_s=process_cpu,
        worker_failures=summary.worker_failures,
        retried=summary.retried,
        kills=clock.kills,
        lost_for_good=clock.lost_for_good,
        failures=summary.failures,
        startup_s=(clock.first.wall if clock.first else end) - start,
        finish_s=end - (clock.last.wall if clock.last else end),
        run_dir=str(summary.run_dir),
        log=log,
    )


# ------------------------------------------------------------------------------------------
# The entry point (scripts/simulate_cluster.py)

DEFAULTS = [
    "workers=64", "batch_size=8", "task_size=8", "method=latentseek", "max_retries=1",
    "max_worker_restarts=5", "output_dir=outputs/simulate",
]  # fmt: skip
CHAOS = Workload(
    crash_rate=0.003, flaky_rate=0.01, poison_rate=0.002, kill_every=100, lose_for_good=2
)
GPU_BATCH_S = (20.0, 60.0)  # assumed: a LatentSeek batch of 8 problems, 7-8B model, one H100


def check_exactly_once(run_dir: str | Path, expected: int) -> int:
    """The number of (problem, method) records; raises if one is missing or duplicated."""
    from pipeline.run.records import RecordStore

    problems = RecordStore(run_dir).read_problems()  # raises DuplicateRecordError
    keys = set(zip(problems["problem_id"], problems["method"], strict=True))
    if len(problems) != expected or len(keys) != expected:
        raise AssertionError(f"{len(problems)} rows, {len(keys)} distinct, {expected} expected")
    return len(keys)


def main(argv: Sequence[str]) -> int:
    """key=value: `problems` (10000), `gpu_batch_s` (seconds per GPU batch, comma-separated;
    GPU_BATCH_S), `saturation_problems` (2000; 0: no saturation run), `json` (a file for the
    numbers), Workload fields (faults default to CHAOS), and any config key (DEFAULTS first)."""
    import ray

    from pipeline.config import load_config

    workload, options, overrides = asdict(CHAOS), {}, list(DEFAULTS)
    for item in argv:
        key, _, raw = item.partition("=")
        if key in workload:
            workload[key] = type(workload[key])(raw)
        elif key in ("problems", "gpu_batch_s", "saturation_problems", "json"):
            options[key] = raw
        else:
            overrides.append(item)
    cfg = load_config(None, overrides)
    if not cfg.run_id:
        cfg = cfg.replace(run_id=time.strftime("sim-%Y%m%d-%H%M%S"))
    chaos = Workload(**workload)
    problems = int(options.get("problems", 10_000))
    saturation_problems = int(options.get("saturation_problems", 2_000))
    gpu_batch_s = (
        [float(x) for x in options["gpu_batch_s"].split(",")]
        if "gpu_batch_s" in options
        else GPU_BATCH_S
    )

    runs = {"chaos": simulate(cfg, problems, chaos)}
    check_exactly_once(runs["chaos"].run_dir, problems * len(cfg.method))
    if saturation_problems:  # stand-ins that answer at once: the driver sets the pace
        saturation = cfg.replace(run_id=cfg.run_id + "-saturation")
        runs["saturation"] = simulate(saturation, saturation_problems, Workload(latency_s=0.0))
        check_exactly_once(runs["saturation"].run_dir, saturation_problems * len(cfg.method))
    ray.shutdown()
    print(report(runs, chaos, gpu_batch_s))
    if "json" in options:
        numbers = {"gpu_batch_s": list(gpu_batch_s), **{k: m.to_dict() for k, m in runs.items()}}
        Path(options["json"]).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


def report(runs: dict[str, Measurement], chaos: Workload, gpu_batch_s: Sequence[float]) -> str:
    m = runs["chaos"]
    parts = ", ".join(f"{k} {m.ms_per_batch(k):.2f}" for k in sorted(m.activity_s) if k not in IDLE)
    lines = [
        f"simulated:   {m.workers} stand-in workers, {m.problems} problems in tasks of "
        f"{m.problems_per_task}, mean batch latency {chaos.latency_s:g} s (lognormal, sigma "
        f"{chaos.latency_sigma:g}); workers started in {m.startup_s:.0f} s; compaction, "
        f"summary, report and MLflow took {m.finish_s:.0f} s after the last batch",
        f"faults:      {m.kills} workers killed by the driver ({m.lost_for_good} for good), "
        f"{m.worker_failures} in-flight batches re-queued, {m.retried} problem retries, "
        f"{m.failures} problems recorded with their error",
        f"records:     every problem recorded exactly once ({m.run_dir})",
        f"driver:      {m.driver_ms_per_batch:.2f} ms busy per batch (wall; ms: {parts}); "
        f"{m.cpu_ms_per_batch:.2f} ms CPU of its thread, {m.process_cpu_ms_per_batch:.2f} ms "
        f"with Ray's threads",
        f"throughput:  {m.batches} batches at {m.batches_per_s:.1f} batches/s, the driver busy "
        f"{m.driver_ms_per_batch * m.batches_per_s / 10:.0f}% of the time; it sustains "
        f"~{1000 / m.driver_ms_per_batch:.0f} batches/s",
    ]
    costs = {"busy": m.driver_ms_per_batch}
    if "saturation" in runs:
        s = runs["saturation"]
        costs["saturated"] = 1000 / s.batches_per_s
        lines.append(
            f"saturation:  stand-ins that answer at once: {s.batches_per_s:.0f} batches/s "
            f"measured ({costs['saturated']:.2f} ms per batch; busy {s.driver_ms_per_batch:.2f} "
            f"ms of it; {s.batches} batches)"
        )
    for latency in gpu_batch_s:
        at = " or ".join(
            f"~{m.workers_at_saturation(latency, ms):,.0f} ({name}: {ms:.2f} ms a batch)"
            for name, ms in costs.items()
        )
        lines.append(f"bottleneck:  at {latency:g} s per GPU batch the driver saturates at {at}")
    return "\n".join(lines)
