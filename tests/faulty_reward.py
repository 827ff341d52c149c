"""User rewards (`reward=tests.faulty_reward:<function>`) that misbehave on one problem, for the
fault tests: they run inside Ray workers, which import them from the repo root."""

import os
import time


def fails_on_gsm8k_1(problem, answer: str) -> float:
    if problem.problem_id == "gsm8k-1":
        raise ValueError("deliberate failure for gsm8k-1")
    return -1.0


def exits_on_gsm8k_1(problem, answer: str) -> float:
    """Ends the worker's process on gsm8k-1, as an out-of-memory kill or a segfault would."""
    if problem.problem_id == "gsm8k-1":
        os._exit(1)
    return -1.0


def hangs_on_gsm8k_1(problem, answer: str) -> float:
    """Never returns on gsm8k-1 (an hour is forever for a test)."""
    if problem.problem_id == "gsm8k-1":
        time.sleep(3600)
    return -1.0


def slow(problem, answer: str) -> float:
    """A second per answer scored, so that the problems of one task finish seconds apart."""
    time.sleep(1.0)
    return -1.0


_scored: set[str] = set()  # problems this worker process has scored once (`slow_steps`)


def slow_steps(problem, answer: str) -> float:
    """Three seconds per answer after a problem's first (its CoT answer, scored at once): a worker
    that is slow, as when starved by other jobs, but reports each iteration as it ends, for the
    batch deadline test. (A task's CoT answers all come first, breadth-first.)"""
    if problem.problem_id in _scored:
        time.sleep(3.0)
    _scored.add(problem.problem_id)
    return -1.0


def fails_while_marked(problem, answer: str) -> float:
    """Raises on gsm8k-1 while the file named by $LATENTSEEK_TEST_FAIL_MARK exists: a transient
    failure, for the resume test (the workers inherit the variable from the driver's Ray)."""
    mark = os.environ.get("LATENTSEEK_TEST_FAIL_MARK", "")
    if problem.problem_id == "gsm8k-1" and mark and os.path.exists(mark):
        raise ValueError("transient failure for gsm8k-1")
    return -1.0
