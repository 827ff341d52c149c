"""A user reward (`reward=tests.faulty_reward:fails_on_gsm8k_1`) that raises on one problem,
for the retry test: it runs inside Ray workers, which import it from the repo root."""


def fails_on_gsm8k_1(problem, answer: str) -> float:
    if problem.problem_id == "gsm8k-1":
        raise ValueError("deliberate failure for gsm8k-1")
    return -1.0
