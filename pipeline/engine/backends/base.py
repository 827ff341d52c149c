"""The generation-backend protocol: everything a method's task may ask of an engine.

A method is written once per problem as a task (`pipeline.engine.batching`): a generator that yields
lists of `GenerationRequest` and is sent their `GenerationResult`s. A backend runs a list of
tasks to the end (`Backend.run`), batching their requests as it likes, and gives the LM head
(`Backend.logits`) that turns last-layer hidden states into logits, for the latent step.

What a request may ask:
- greedy or sampled tokens after `prompt_ids` (+ `prefix_ids`, forced and not decoded), up to
  `max_new_tokens`, ending at the first of `stop_ids` (kept in the result);
- `capture=n`: z_t, the post-final-norm last-layer hidden state at the position that predicted
  each of the first n decoded tokens (so `logits(z_t)` are that token's logits);
- `keep_prompt_state` / `prompt_state`: an opaque handle to the prompt's cache, which a later
  request with the same prompt may pass back; a backend without such a cache returns None and
  ignores it (`Capabilities.prompt_state`).

Invariants every backend keeps: a row's tokens depend on its own request only (not on the rows
batched with it, up to floating-point rounding); sampled rows draw from a generator seeded by
the request's `seed`; a task's requests are answered in the order it yielded them.
"""

from __future__ import annotations

from collections.abc import Generator as PyGenerator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_new_tokens: int  # tokens to decode after the prefix (0 allowed: nothing is decoded)
    prefix_ids: Sequence[int] = ()  # forced tokens fed after the prompt, not decoded
    prompt_state: Any = None  # a handle from an earlier result with the same prompt_ids
    keep_prompt_state: bool = False  # return the prompt's handle for later continuations
    capture: int = 0  # return z_t for the first `capture` decoded tokens
    stop_ids: frozenset[int] | None = None  # tokens that end this row; None: the model's EOS ids
    sample: bool = False  # False: greedy argmax
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample from the k most likely tokens only (0: no limit)
    repetition_penalty: float = 1.0  # HF's: seen tokens' logits scaled (greedy rows too)
    seed: int = 0  # per-request generator: samples do not depend on the batch composition


@dataclass
class GenerationResult:
    tokens: list[int]  # decoded tokens (the stop token included), prefix excluded
    finish_reason: str  # "eos" | "length"
    hidden: torch.Tensor | None = None  # [min(capture, len(tokens)), D] float32, detached
    prompt_state: Any = None  # the prompt's handle (keep_prompt_state), or None
    prompt_tokens: int = 0  # prompt tokens run through the model here (0 if a cache was reused)
    token_passes: int = 0  # every token position this request ran through the model
    forward_calls: int = 0  # model forward passes this request took part in


Task = PyGenerator[list[GenerationRequest], list[GenerationResult], None]


@dataclass(frozen=True)
class Capabilities:
    """What a backend promises beyond the protocol."""

    exact_reference: bool  # token for token the official code's outputs (compat=reference)
    prompt_state: bool  # continuations reuse the prompt's cache through `prompt_state`
    static_batching: bool  # can run `batching=static` (rounds that wait for their longest row)
    shards: bool = False  # runs on a tensor-parallel shard or a device_map'd model


class Backend(Protocol):
    """A generation engine for one loaded model (one worker, or one rank of a replica)."""

    name: str
    capabilities: Capabilities
    tokenizer: Any
    eos_ids: set[int]  # the model's EOS ids: the default stop set
    max_positions: int  # the model's context (0: unknown)
    device: torch.device
    stats: dict[str, int]  # counters since construction (the bench reads them)

    def run(self, tasks: Sequence[Task], max_rows: int, batching: str) -> None:
        """Drive every task to its end, at most `max_rows` rows decoding at a time."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One static batch: the results of `requests`, in order."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head in its own dtype: [..., D] -> [..., V]; decoding and the latent step
        both use it, so that argmax(logits(z_t)) = x_t holds in every precision."""
        ...


class EngineError(RuntimeError):
    """The engine itself failed (not one request): its state is unknown, so nothing more may run
    in this process. A Ray worker ends its process on it, and Ray starts a clean one."""


def check_fits(r: GenerationRequest, max_positions: int) -> None:
    """Raise ValueError when `r` is empty or prompt + prefix + budget exceed the context
    (`max_positions`; 0: unknown, not checked)."""
    if len(r.prompt_ids) == 0:
        raise ValueError("empty prompt")
    total = len(r.prompt_ids) + len(r.prefix_ids) + r.max_new_tokens
    if max_positions and total > max_positions:
        raise ValueError(
            f"prompt ({len(r.prompt_ids)}) + prefix ({len(r.prefix_ids)}) + "
            f"max_new_tokens ({r.max_new_tokens}) exceeds the model's context ({max_positions})"
        )


@torch.no_grad()
def capture_mismatch(
    head: Any,  # the backend's LM head (`Backend.logits`): [..., D] -> [..., V]
    hidden: torch.Tensor,  # [n, D] the captured z_1..z_n
    tokens: Sequence[int],  # the decoded tokens, at least n of them
) -> int:
    """How many captured positions t have argmax(head(z_t)) != x_t: 0 when z belongs to the
    greedy tokens (what the latent step assumes; a sampled or penalised request may differ)."""
    n = hidden.shape[0]
    if n == 0:
        return 0
    predicted = head(hidden).argmax(-1).cpu()  # [n]
    return int((predicted != torch.tensor(list(tokens[:n]), dtype=torch.long)).sum())
