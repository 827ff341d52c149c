"""How a worker's generation work is batched: static rounds, or continuous batching.

A method is written once, per problem, as a *task*: a Python generator that yields the
generation requests it needs next (a CoT, N samples, a continuation, verifier prompts) and is
sent their results, in the same order, when all of them are done:

    def task():
        (cot,) = yield [GenerationRequest(prompt, 256)]
        verdicts = yield [GenerationRequest(v, 64) for v in verifier_prompts(cot)]
        ...

Two runners drive a list of tasks on one `Generator`:

- `run_static`: rounds. Every task's pending requests decode together as one batch, and the
  round ends when its longest row ends; then every task moves on. Tasks of one method move in
  lockstep, so this is the engine's original batching, call for call.
- `run_continuous`: at most `max_rows` rows decode at a time; as soon as a task's requests are
  all done it moves on, and its next requests join the running batch when rows are free
  (`DecodeBatch.merge`), instead of waiting for the slowest row of a round. Requests are admitted
  in the order they were made, so the schedule (and every output) is a function of the tasks
  alone, never of timing.

A row's tokens do not depend on the rows around it, up to floating-point rounding of different
matrix shapes (the same caveat as any batch size).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.engine.backends.base import GenerationRequest, GenerationResult, Task
from pipeline.engine.generation import DecodeBatch, Generator, Row


@dataclass
class Waiting:
    """A task and the results of the requests it yielded last."""

    task: Task
    requests: list[GenerationRequest] = field(default_factory=list)
    results: list[GenerationResult | None] = field(default_factory=list)
    missing: int = 0


def advance(task: Task, results: list[GenerationResult] | None) -> list[GenerationRequest] | None:
    """Resume `task` with `results` until it asks for requests; None when it has finished."""
    try:
        requests = task.send(results)  # type: ignore[arg-type]  # None starts a generator
        while not requests:
            requests = task.send([])
    except StopIteration:
        return None
    return list(requests)


def run_static(generator: Generator | Any, tasks: Sequence[Task]) -> None:
    """Rounds: all pending requests of all tasks in one `generate` call, then every task moves
    (`generator`: anything with the engine's `generate`, e.g. the vLLM backend)."""
    pending = [(t, r) for t in tasks if (r := advance(t, None)) is not None]
    while pending:
        outputs = generator.generate([req for _, reqs in pending for req in reqs])
        following, start = [], 0
        for task, reqs in pending:
            mine = outputs[start : start + len(reqs)]
            start += len(reqs)
            if (more := advance(task, mine)) is not None:
                following.append((task, more))
        pending = following


def admit_at(max_rows: int) -> int:
    """Free rows that trigger an admission into a running batch: a merge copies the batch's
    cache, so rows join a few at a time rather than one by one."""
    return max(1, max_rows // 4)


def run_continuous(generator: Generator, tasks: Sequence[Task], max_rows: int) -> None:
    """Continuous batching: keep up to `max_rows` rows decoding; a task moves on as soon as its
    requests are done, and its next requests join the running batch when rows are free."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: must be >= 1")
    queue: deque[tuple[Waiting, int]] = deque()  # (task, index of the request) in FIFO order

    def submit(waiting: Waiting, requests: list[GenerationRequest] | None) -> None:
        if requests is None:
            return
        waiting.requests, waiting.results = requests, [None] * len(requests)
        waiting.missing = len(requests)
        queue.extend((waiting, i) for i in range(len(requests)))

    def deliver(rows: list[Row]) -> None:
        for row in rows:
            waiting, index = row.handle
            waiting.results[index] = row.result
            waiting.missing -= 1
            if waiting.missing == 0:
                submit(waiting, advance(waiting.task, list(waiting.results)))  # type: ignore[arg-type]

    for task in tasks:
        waiting = Waiting(task)
        submit(waiting, advance(task, None))

    batch = DecodeBatch.empty(generator)
    threshold = admit_at(max_rows)
    while queue or batch.rows:
        free = max_rows - len(batch)
        if queue and free > 0 and (not batch.rows or free >= min(threshold, len(queue))):
            taken = [queue.popleft() for _ in range(min(free, len(queue)))]
            fresh, done = generator.open([w.requests[i] for w, i in taken], handles=taken)
            batch = batch.merge(fresh)
            deliver(done)
            continue  # delivering may have queued more work, or ended tasks; look again
        deliver(batch.step())
