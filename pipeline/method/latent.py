"""The LatentSeek update (Li et al., "Seek in the Dark", arXiv 2505.13308), pure torch.

Objective, for one problem with reward r of its current answer and trainable hidden states
Z = [z_1..z_U] (post-final-norm last-layer states behind the first U answer tokens):

    a_t     = argmax_v (W z_t)_v                       (the reference: argmax, not a sample)
    logp_t  = log(softmax(W z_t)[a_t] + eps)
    loss    = -r * sum_{t<=U} logp_t
    Z      <- Adam step on loss (the optimiser persists across a problem's iterations)
    x'_t    = argmax_v (W z_t)_v  with the updated Z   (the new prefix)

With r < 0 the step pushes probability away from the current tokens; with r = 0 the gradient is
zero. The model's weights are frozen and get no gradient: only Z requires grad.

Departures from the reference code, all off by default: `sample=True` draws a_t and x'_t from
softmax(W z_t) instead of argmax; `grad_clip` clips the gradient norm per problem; the caller may
scale the learning rate to the hidden states' RMS (`lr_relative`). Not validated: the sampling
variant has no counterpart in the paper's experiments.

Numerics. The logits come from `head` (pipeline.engine.generation.head_logits: the LM head in its own
dtype, the same function decoding uses, so argmax(W z_t) = x_t also in bf16). By default Z is a
float32 leaf and the softmax is taken in float32 (`eps` = 0 inside the softmax). With
`reference=True` (compat=reference) the official code's numerics are used instead: Z is in the
model's dtype (the caller's choice), the softmax is taken in the logits' dtype and 1e-8 is added to
the probabilities before a_t = argmax and the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOG_EPS = 1e-10  # the reference adds a small epsilon inside the log
REFERENCE_PROB_EPS = 1e-8  # and, in compat=reference, this one to the probabilities


@dataclass
class LatentStepResult:
    tokens: torch.Tensor  # [B, U] new prefix tokens x' (padding positions: -1)
    loss: torch.Tensor  # [B] per-problem loss before the step (detached)
    grad_norm: torch.Tensor  # [B] per-problem gradient norm before clipping (detached)
    tokens_changed: torch.Tensor  # [B] prefix positions whose token differs from before the step
    mean_logprob: torch.Tensor  # [B] mean log pi(a_t | z_t) over the valid positions, before
    finite: torch.Tensor  # [B] bool: loss and gradient were finite (else Z was left unchanged)


def latent_step(
    z: torch.Tensor,  # [B, U, D] leaf tensor, requires_grad (owned by `optimizer`)
    mask: torch.Tensor | None,  # [B, U] bool, True on real positions; None means all real
    reward: torch.Tensor,  # [B] reward of each problem's current answer
    head: Callable[[torch.Tensor], torch.Tensor],  # frozen: [..., D] -> [..., V] logits
    optimizer: torch.optim.Optimizer,
    *,
    sample: bool = False,
    grad_clip: float = 0.0,
    generator: torch.Generator | None = None,
    reference: bool = False,
) -> LatentStepResult:
    """One policy-gradient step on Z for a batch of problems; returns the new prefix tokens."""
    if not z.requires_grad:
        raise ValueError("z must require grad (it is the trainable parameter)")
    b, u, _ = z.shape
    if mask is None:
        mask = torch.ones((b, u), dtype=torch.bool, device=z.device)

    optimizer.zero_grad(set_to_none=True)
    probs = _probabilities(head(z), reference)  # [B, U, V]
    with torch.no_grad():
        before = _choose(probs, sample, generator)  # [B, U]
    chosen = probs.gather(-1, before[..., None]).squeeze(-1)  # [B, U]
    logp = torch.log(chosen + LOG_EPS) * mask.to(chosen.dtype)  # [B, U]
    loss = -reward.to(logp.dtype) * logp.sum(dim=1)  # [B]
    # Problems are independent: the sum keeps each one's gradient its own. The gradient is taken
    # with respect to Z alone, so no weight gets one even if the caller's head is not frozen.
    (grad,) = torch.autograd.grad(loss.sum(), z)  # [B, U, D]
    z.grad = grad
    grad_norm = grad.flatten(1).norm(dim=1)  # [B]
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)  # [B]
    with torch.no_grad():
        grad[~finite] = 0.0
        if grad_clip > 0:
            scale = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)  # [B], as clip_grad_norm_
            scale = torch.where(finite, scale, torch.zeros_like(scale))  # NaN norm: no step
            grad.mul_(scale[:, None, None])
        grad.mul_(mask[..., None].to(grad.dtype))
    frozen = z.detach()[~finite].clone()
    optimizer.step()

    with torch.no_grad():
        if (~finite).any():
            z[~finite] = frozen  # a problem with a non-finite loss keeps its Z
        logits = head(z)  # [B, U, V]
        if sample:
            after = _choose(_probabilities(logits, reference), True, generator)
        else:
            after = logits.argmax(dim=-1)  # x'_t = argmax(W z_t), as decoding chooses
        changed = ((after != before) & mask).sum(dim=1)  # [B]
        mean_logprob = logp.detach().float().sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        after = torch.where(mask, after, torch.full_like(after, -1))
    return LatentStepResult(
        tokens=after,
        loss=loss.detach(),
        grad_norm=grad_norm.detach(),
        tokens_changed=changed,
        mean_logprob=mean_logprob,
        finite=finite,
    )


def _probabilities(logits: torch.Tensor, reference: bool) -> torch.Tensor:
    """softmax(W z) over the vocabulary: [B, U, V] -> [B, U, V]. Default: in float32. Reference:
    in the logits' own dtype, plus 1e-8 (the official code's `softmax(logits) + 1e-8`)."""
    if reference:
        return torch.softmax(logits, dim=-1) + REFERENCE_PROB_EPS
    return torch.softmax(logits.float(), dim=-1)


def _choose(
    probs: torch.Tensor,  # [B, U, V]
    sample: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:  # [B, U]
    if not sample:
        return probs.argmax(dim=-1)
    flat = probs.detach().flatten(0, 1)  # [B*U, V]
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:2])


def hidden_rms(z: torch.Tensor) -> float:
    """Root mean square of the entries of [U, D] hidden states (the `lr_relative` scale)."""
    return float(z.float().pow(2).mean().sqrt())
