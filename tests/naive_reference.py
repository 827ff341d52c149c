"""A deliberately naive LatentSeek (SPEC.md §1): the engine's reference in tests and `latentseek bench`.

Written from the spec, not from `pipeline/generation.py` or `pipeline/latent.py`:

- one problem at a time, no KV cache: every generated token runs one full forward over the whole
  sequence so far (`model.model(ids).last_hidden_state[:, -1]` is the post-final-norm z_t,
  `model.lm_head(z_t)` its logits), greedy argmax;
- the CoT pass keeps every z_t; U = min(floor(rho * T), U_max); Z is a copy that requires grad;
  one Adam(lr) per problem; per iteration loss = -r * sum_t log(softmax(W z_t)[a_t] + eps) with
  a_t = argmax, one step, new prefix = argmax(lm_head(Z)), greedy continuation from
  prompt + prefix for `max_new_tokens - U` tokens (the engine's documented decision: the cap is on
  the whole answer); stop as soon as r > tau, at most K iterations, return the last answer.

Only the grading (answer extraction and equivalence, for PSRM) is shared with the engine.
Expects a Llama-style causal LM (`model.model`, `model.lm_head`) with frozen weights, as
`pipeline.model.load_model` returns it.

This file is also imported by path by `latentseek bench`, so it keeps a small function API:
`naive_greedy`, `naive_latentseek`, `psrm_reward`, and `batch_agreement` (engine batch size B
against batch size 1, the count the fidelity test reports).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.grading import extract_answer, is_equivalent

LOG_EPS = 1e-10  # same epsilon inside the log as the engine (pipeline/latent.py LOG_EPS)


def psrm_reward(text: str, gold: str, style: str = "boxed") -> float:
    """The perfect sparse reward model: 0 if the extracted answer equals the gold, else -1."""
    return 0.0 if is_equivalent(extract_answer(text, style), gold) else -1.0


@dataclass
class NaiveResult:
    cot_tokens: list[int]  # greedy CoT answer (the EOS step included if reached)
    cot_text: str
    initial_reward: float  # r0
    update_length: int  # U
    answer_tokens: list[list[int]] = field(default_factory=list)  # per iteration: prefix + cont.
    answer_texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # reward after each iteration
    final_text: str = ""  # the last answer (the CoT answer if there was no iteration)
    stop_reason: str = ""  # cot_accepted | no_update | threshold | max_iters
    cot_seconds: float = 0.0  # wall time of the CoT pass alone (the naive CoT baseline's cost)

    @property
    def iterations(self) -> int:
        return len(self.rewards)


def default_eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


@torch.no_grad()
def naive_greedy(
    model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: set[int]
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without a cache: returns the tokens and each token's z_t ([D] float32)."""
    device = next(model.parameters()).device
    sequence = list(prompt_ids)
    tokens: list[int] = []
    zs: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        ids = torch.tensor([sequence], device=device)  # [1, L]
        z = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]  # [1, D] post-norm
        token = int(model.lm_head(z).argmax(dim=-1)[0])
        tokens.append(token)
        zs.append(z[0].float().clone())
        sequence.append(token)
        if token in eos_ids:
            break
    return tokens, zs


def config_kwargs(cfg: Any) -> dict[str, Any]:
    """`naive_latentseek`'s method settings read from a `pipeline.config.Config`."""
    return {
        "lr": cfg.lr,
        "rho": cfg.rho,
        "max_iters": cfg.max_iters,
        "max_new_tokens": cfg.max_new_tokens,
        "reward_threshold": cfg.reward_threshold,
        "max_update_length": cfg.max_update_length,
    }


def naive_latentseek(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    gold: str,
    *,
    lr: float,
    rho: float,
    max_iters: int,
    max_new_tokens: int,
    reward_threshold: float = -0.2,
    max_update_length: int = 300,
    reward_fn: Callable[[str, str], float] = psrm_reward,
    eos_ids: set[int] | None = None,
) -> NaiveResult:
    """SPEC.md §1 for one problem; `reward_fn(answer_text, gold) -> float`."""
    eos = eos_ids if eos_ids is not None else default_eos_ids(model, tokenizer)

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    # 1-2. CoT pass, keeping z_t; initial reward.
    start = time.perf_counter()
    cot, zs = naive_greedy(model, prompt_ids, max_new_tokens, eos)
    cot_seconds = time.perf_counter() - start
    reward = reward_fn(decode(cot), gold)
    # 3. U = min(floor(rho * T), U_max).
    u = min(math.floor(rho * len(cot)), max_update_length)
    res = NaiveResult(cot, decode(cot), reward, u, final_text=decode(cot), cot_seconds=cot_seconds)
    if reward > reward_threshold:
        res.stop_reason = "cot_accepted"
        return res
    if u == 0:
        res.stop_reason = "no_update"
        return res

    z = torch.stack(zs[:u]).clone().requires_grad_(True)  # [U, D], the trainable parameter
    optimizer = torch.optim.Adam([z], lr=lr)
    res.stop_reason = "max_iters"
    # 4. Iterate while r <= tau, at most K times.
    for _ in range(max_iters):
        with torch.enable_grad():
            probs = torch.softmax(model.lm_head(z).float(), dim=-1)  # [U, V]
            chosen = probs.argmax(dim=-1)  # [U]  a_t
            logp = torch.log(probs.gather(-1, chosen[:, None])[:, 0] + LOG_EPS)  # [U]
            loss = -reward * logp.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            prefix = model.lm_head(z).argmax(dim=-1).tolist()  # x'_1..U
        continuation, _ = naive_greedy(
            model, list(prompt_ids) + prefix, max(max_new_tokens - u, 0), eos
        )
        answer = prefix + continuation
        text = decode(answer)
        reward = reward_fn(text, gold)
        res.answer_tokens.append(answer)
        res.answer_texts.append(text)
        res.rewards.append(reward)
        res.final_text = text
        if reward > reward_threshold:
            res.stop_reason = "threshold"
            break
    return res


# ------------------------------------------------------------------------------------------
# Engine batch size B against batch size 1 (uses only `Solver.run`).


@dataclass
class BatchAgreement:
    batch_size: int
    identical: int  # problems whose final answer is the same at batch size B and 1
    total: int
    different_ids: list[str]  # the problems that differ


def batch_agreement(
    solver: Any,
    problems: Sequence[Any],
    batch_size: int,
    method: str = "latentseek",
    reference: Sequence[Any] | None = None,
) -> BatchAgreement:
    """Run `problems` through `solver.run` in batches of `batch_size` and compare final answers
    with batch size 1 (`reference`: the batch-size-1 `ProblemResult`s if already computed)."""
    if reference is None:
        reference = [solver.run(method, [p])[0] for p in problems]
    batched = []
    for start in range(0, len(problems), batch_size):
        batched.extend(solver.run(method, list(problems[start : start + batch_size])))
    different = [
        a.problem_id for a, b in zip(reference, batched) if a.final_answer != b.final_answer
    ]
    return BatchAgreement(batch_size, len(problems) - len(different), len(problems), different)
