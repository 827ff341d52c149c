"""What a method returns for one problem: plain dataclasses, no I/O.

`ProblemResult` is the engine's output; `pipeline.run.records` turns it into the Parquet rows
(one problem row, one iteration row per iteration, iteration 0 being the CoT answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Compute:
    """Compute spent on one problem. `flops` is an estimate: 2 x parameters x token-passes."""

    solver_prompt_tokens: int = 0  # prompt tokens the solver ran forward (cache hits excluded)
    solver_generated_tokens: int = 0  # tokens the solver decoded (forced prefix tokens included)
    verifier_prompt_tokens: int = 0
    verifier_generated_tokens: int = 0
    forward_calls: int = 0  # model forward passes this problem took part in
    flops: float = 0.0
    wall_seconds: float = 0.0

    @property
    def solver_tokens(self) -> int:
        return self.solver_prompt_tokens + self.solver_generated_tokens

    @property
    def verifier_tokens(self) -> int:
        return self.verifier_prompt_tokens + self.verifier_generated_tokens

    def add(self, other: Compute) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class IterationStats:
    """One iteration k >= 1 of an iterative method (a latent step, a reflection round);
    detached diagnostics, never printed by the library. None: not part of that method's step."""

    iteration: int
    reward: float  # reward of the answer decoded after this step
    answer: str
    correct: bool
    tokens: int  # answer length in tokens (prefix + continuation)
    loss: float | None = None  # the latent step's loss
    grad_norm: float | None = None
    tokens_changed: int | None = None  # prefix positions whose token differs from before
    mean_logprob: float | None = None  # mean log pi(a_t | z_t) over the prefix, before the step


@dataclass
class ProblemResult:
    problem_id: str
    dataset: str
    method: str
    question: str
    gold: str
    cot_answer: str = ""  # the first (greedy CoT) answer; for bon/sc the first sample
    final_answer: str = ""  # the full text of the answer returned
    final_extracted: str | None = None  # the answer extracted from final_answer for grading
    cot_correct: bool = False
    final_correct: bool = False
    initial_reward: float | None = None  # r0; None for methods without a reward (cot, sc)
    rewards: list[float] = field(default_factory=list)  # reward after every iteration
    final_reward: float | None = None  # the reward of the returned answer (None: no reward)
    iterations: int = 0
    update_length: int = 0  # U
    cot_length: int = 0  # T (EOS step included)
    final_length: int = 0  # tokens in the returned answer
    stop_reason: str = ""  # threshold | max_iters | no_update | cot_accepted | nan_loss | error ...
    answers: list[str] = field(default_factory=list)  # answer after every iteration
    iteration_stats: list[IterationStats] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # bon / sc: the N sampled answers
    sample_rewards: list[float] = field(default_factory=list)  # bon: the reward of each sample
    sample_correct: list[bool] = field(default_factory=list)  # bon / sc: each sample graded
    sample_groups: list[int] = field(default_factory=list)  # sc: equivalent-answer group, -1 none
    unparsed_verdicts: int = 0  # self-reward verifier outputs without a verdict
    grade_status: str = "ok"  # the worst of its grades: ok | timeout (counted wrong) | error
    # Captured positions whose z_t does not predict the token the CoT holds there
    # (argmax(head(z_t)) != x_t); 0 expected on every backend. None: nothing was captured.
    capture_mismatch: int | None = None
    compute: Compute = field(default_factory=Compute)
    device: str = ""  # the resolved device the problem ran on ("cpu", "cuda:0")
    dtype: str = ""  # the resolved weights dtype ("float32", "bfloat16")
    error: str = ""  # non-empty when the problem failed; the other fields are then partial
    # Whose fault an error is: "problem" (it raised, its result could not be recorded, it killed
    # or hung its worker alone every time) or "infra" (the workers could not run it); "" else.
    error_kind: str = ""
