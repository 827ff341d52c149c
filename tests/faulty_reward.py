"""A user reward (`reward=tests.faulty_reward:fails_on_gsm8k_1`) that raises on one problem,
for the retry test: it runs inside Ray workers, which import it from the repo root."""

import os


def fails_on_gsm8k_1(problem, answer: str) -> float:
    if problem.problem_id == "gsm8k-1":
        raise ValueError("deliberate failure for gsm8k-1")
    return -1.0


def fails_while_marked(problem, answer: str) -> float:
    """Raises on gsm8k-1 while the file named by $LATENTSEEK_TEST_FAIL_MARK exists: a transient
    failure, for the resume test (the workers inherit the variable from the driver's Ray)."""
    mark = os.environ.get("LATENTSEEK_TEST_FAIL_MARK", "")
    if problem.problem_id == "gsm8k-1" and mark and os.path.exists(mark):
        raise ValueError("transient failure for gsm8k-1")
    return -1.0
