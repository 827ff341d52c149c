"""`pipeline.method.latent.latent_step`: the LatentSeek update, checked by hand and on a tiny random Llama.

A fact used throughout: Adam's first step (bias-corrected, default betas) is
    m_hat = g, v_hat = g^2  ->  delta = -lr * g / (|g| + 1e-8) ~= -lr * sign(g)  per coordinate,
so a zero gradient moves nothing and every coordinate with a gradient moves by ~lr.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.method.latent import LOG_EPS, hidden_rms, latent_step


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The LM head as `latent_step` takes it: [..., D] -> [..., V] logits."""
    return lambda z: torch.nn.functional.linear(z, weight, bias)


def prefix_logits(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(weight)(z)


def leaf(z: torch.Tensor) -> torch.Tensor:
    return z.detach().clone().float().requires_grad_(True)


def adam(z: torch.Tensor, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam([z], lr=lr)


def logp_of(z: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(W z_t)[tokens_t]: [B, U, D], [V, D], [B, U] -> [B, U]."""
    logits = prefix_logits(z.detach(), weight)
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]


@pytest.fixture
def head(tiny_model) -> torch.Tensor:
    return tiny_model.lm_head.weight  # [128, 32], tied to the embeddings, frozen


@pytest.fixture
def z0() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 32, generator=g)  # [B, U, D], the scale of post-norm states


# --- a case worked out by hand -----------------------------------------------------------------


def test_hand_worked_single_position():
    # V = 2, D = 1, W = [[1], [-1]], z = 0.5: logits [0.5, -0.5], a = 0,
    # p0 = sigmoid(1) = 0.7310586, logp = log p0 = -0.3132617.
    # r = -1: loss = -r * logp = -0.3132617.
    # d logp / dz = w0 - (p0 w0 + p1 w1) = 1 - (0.7310586 - 0.2689414) = 0.5378828 = grad (r = -1).
    # Adam's first step: z <- 0.5 - lr * sign(0.5378828) = 0.5 - 0.1 = 0.4; still token 0,
    # whose log-probability drops to log sigmoid(0.8) = -0.3711007.
    w = torch.tensor([[1.0], [-1.0]])
    z = leaf(torch.tensor([[[0.5]]]))
    step = latent_step(z, None, torch.tensor([-1.0]), linear(w), adam(z, 0.1))
    assert step.loss.item() == pytest.approx(-0.3132617, abs=1e-6)
    assert step.grad_norm.item() == pytest.approx(0.5378828, abs=1e-6)
    assert step.mean_logprob.item() == pytest.approx(-0.3132617, abs=1e-6)
    assert z.item() == pytest.approx(0.4, abs=1e-6)
    assert step.tokens.tolist() == [[0]] and step.tokens_changed.tolist() == [0]
    assert logp_of(z, w, step.tokens).item() == pytest.approx(-0.3711007, abs=1e-6)
    assert bool(step.finite[0])


def test_hand_worked_flip_and_positive_reward():
    w = torch.tensor([[1.0], [-1.0]])
    # z = 0.05, r = -1, lr = 0.1: z -> 0.05 - 0.1 = -0.05, logits [-0.05, 0.05]: the token flips.
    z = leaf(torch.tensor([[[0.05]]]))
    step = latent_step(z, None, torch.tensor([-1.0]), linear(w), adam(z, 0.1))
    assert z.item() == pytest.approx(-0.05, abs=1e-6)
    assert step.tokens.tolist() == [[1]] and step.tokens_changed.tolist() == [1]
    # r = +1 pushes the other way: z = 0.5 -> 0.6, token 0 kept and more likely.
    z = leaf(torch.tensor([[[0.5]]]))
    step = latent_step(z, None, torch.tensor([1.0]), linear(w), adam(z, 0.1))
    assert step.loss.item() == pytest.approx(0.3132617, abs=1e-6)  # -r * logp
    assert z.item() == pytest.approx(0.6, abs=1e-6)


def test_saturated_softmax_stays_finite():
    # V = 2, W = [[1], [-1]], z = 60: p0 = sigmoid(120) = 1 in float32 and p1 underflows to 0,
    # so logp = log(1 + 1e-10) ~ 0 and the gradient 2 * p0 * p1 is 0: a finite no-op step.
    w = torch.tensor([[1.0], [-1.0]])
    z = leaf(torch.tensor([[[60.0]]]))
    step = latent_step(z, None, torch.tensor([-1.0]), linear(w), adam(z, 0.1))
    assert bool(step.finite[0]) and torch.isfinite(step.loss).all()
    assert step.grad_norm.item() == 0.0 and z.item() == 60.0
    assert math.log(LOG_EPS) == pytest.approx(-23.02585, abs=1e-4)  # the floor of any logp_t


# --- the tiny model's lm_head ------------------------------------------------------------------


def test_zero_reward_leaves_z_unchanged(head, z0):
    # r = 0: loss = 0 * sum logp, gradient 0, Adam moves nothing (m = v = 0 -> 0 / (0 + eps)).
    z = leaf(z0)
    before = logp_of(z, head, prefix_logits(z.detach(), head).argmax(-1))
    step = latent_step(z, None, torch.zeros(2), linear(head), adam(z, 0.5))
    assert torch.equal(z.detach(), z0)
    assert step.tokens_changed.tolist() == [0, 0]
    assert torch.equal(step.tokens, prefix_logits(z0, head).argmax(-1))
    assert torch.allclose(step.mean_logprob, before.mean(dim=1))
    assert step.loss.abs().max().item() == 0.0


def test_negative_reward_lowers_logprob_of_current_tokens(head, z0):
    z = leaf(z0)
    tokens = prefix_logits(z0, head).argmax(-1)  # [B, U] the current a_t
    before = logp_of(z, head, tokens)
    latent_step(z, None, torch.tensor([-1.0, -0.5]), linear(head), adam(z, 0.01))
    after = logp_of(z, head, tokens)
    # Each z_t only affects its own logp_t, and a small step goes down each one's gradient.
    assert (after < before).all()


def test_positive_reward_raises_logprob_of_current_tokens(head, z0):
    z = leaf(z0)
    tokens = prefix_logits(z0, head).argmax(-1)
    before = logp_of(z, head, tokens)
    latent_step(z, None, torch.tensor([1.0, 0.5]), linear(head), adam(z, 0.01))
    assert (logp_of(z, head, tokens) > before).all()


def test_first_step_is_lr_times_sign_of_gradient(head, z0):
    # Independent gradient: loss = -r * sum_t log(softmax(W z_t)[a_t] + eps).
    r = torch.tensor([-1.0, -0.3])
    g_z = leaf(z0)
    probs = torch.softmax(g_z @ head.T, dim=-1)
    a = probs.argmax(-1)
    loss = -(r * torch.log(probs.gather(-1, a[..., None])[..., 0] + LOG_EPS).sum(1)).sum()
    (grad,) = torch.autograd.grad(loss, g_z)
    z = leaf(z0)
    step = latent_step(z, None, r, linear(head), adam(z, 0.01))
    expected = z0 - 0.01 * grad / (grad.abs() + 1e-8)
    assert torch.allclose(z.detach(), expected, atol=1e-6)
    assert torch.allclose(step.grad_norm, grad.flatten(1).norm(dim=1), rtol=1e-5)


def test_returned_tokens_are_argmax_of_updated_z(head, z0):
    z = leaf(z0)
    before = prefix_logits(z0, head).argmax(-1)
    step = latent_step(z, None, torch.tensor([-1.0, -1.0]), linear(head), adam(z, 0.5))
    after = prefix_logits(z.detach(), head).argmax(-1)
    assert torch.equal(step.tokens, after)
    assert step.tokens_changed.tolist() == (after != before).sum(1).tolist()
    assert step.tokens_changed.sum() > 0  # lr 0.5 on unit-scale states does flip tokens


def test_padded_batch_equals_rows_run_separately(head):
    g = torch.Generator().manual_seed(2)
    za, zb = torch.randn(1, 5, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    garbage = 100 * torch.randn(1, 2, 32, generator=g)  # padding must neither move nor matter
    batch = leaf(torch.cat([za, torch.cat([zb, garbage], dim=1)]))  # [2, 5, D]
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    a, b = leaf(za), leaf(zb)
    opt_batch, opt_a, opt_b = adam(batch, 0.2), adam(a, 0.2), adam(b, 0.2)
    for rewards in ([-1.0, -0.5], [-1.0, -1.0], [-0.3, -1.0]):  # Adam state carries over steps
        s = latent_step(batch, mask, torch.tensor(rewards), linear(head), opt_batch)
        sa = latent_step(a, None, torch.tensor(rewards[:1]), linear(head), opt_a)
        sb = latent_step(b, None, torch.tensor(rewards[1:]), linear(head), opt_b)
        assert torch.allclose(batch[0].detach(), a[0].detach(), atol=1e-6)
        assert torch.allclose(batch[1, :3].detach(), b[0].detach(), atol=1e-6)
        assert torch.equal(batch[1, 3:].detach(), garbage[0])  # masked positions never change
        assert s.tokens[0].tolist() == sa.tokens[0].tolist()
        assert s.tokens[1].tolist() == sb.tokens[0].tolist() + [-1, -1]  # padding reads -1
        for field in ("loss", "grad_norm", "mean_logprob"):
            got, ref = getattr(s, field), torch.cat([getattr(sa, field), getattr(sb, field)])
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), field
        assert s.tokens_changed.tolist() == [sa.tokens_changed.item(), sb.tokens_changed.item()]


def test_grad_clip_limits_the_step_per_problem(head, z0):
    # With plain SGD(lr=1) the step is the (clipped) gradient itself: |dz_b| = min(|g_b|, clip).
    # Row 1 has 1/100 of row 0's reward, so 1/100 of its gradient: the clip between them cuts
    # row 0 only (clipping is per problem).
    # (With Adam the first step is ~lr*sign(g) whatever the clip: clipping only reweights steps.)
    r = torch.tensor([-1.0, -0.01])
    probe = leaf(z0)
    norms = latent_step(probe, None, r, linear(head), torch.optim.SGD([probe], lr=0.0)).grad_norm
    clip = float((norms[0] * norms[1]).sqrt())
    assert norms[1] < clip < norms[0]
    z = leaf(z0)
    step = latent_step(z, None, r, linear(head), torch.optim.SGD([z], lr=1.0), grad_clip=clip)
    moved = (z.detach() - z0).flatten(1).norm(dim=1)
    assert moved[0].item() == pytest.approx(clip, rel=1e-4)
    assert moved[1].item() == pytest.approx(norms[1].item(), rel=1e-4)
    assert torch.allclose(step.grad_norm, norms)  # reported before clipping


def test_nan_reward_is_not_finite_and_leaves_z_unchanged(head, z0):
    z = leaf(z0)
    opt = adam(z, 0.2)
    latent_step(z, None, torch.tensor([-1.0, -1.0]), linear(head), opt)  # Adam now has momentum
    after_first = z.detach().clone()
    step = latent_step(z, None, torch.tensor([float("nan"), -1.0]), linear(head), opt)
    assert step.finite.tolist() == [False, True]
    assert torch.equal(z[0].detach(), after_first[0])  # despite the momentum of step 1
    assert not torch.equal(z[1].detach(), after_first[1])  # the other problem still moves
    assert torch.isfinite(z).all()
    assert step.tokens_changed[0].item() == 0
    assert torch.equal(step.tokens[0], prefix_logits(after_first[:1], head).argmax(-1)[0])


@pytest.mark.parametrize("frozen", [True, False])
def test_no_gradient_reaches_model_weights(tiny_model, z0, frozen):
    # Even when the weights require grad, latent_step differentiates with respect to Z alone.
    tiny_model.requires_grad_(not frozen)
    z = leaf(z0)
    latent_step(
        z, None, torch.tensor([-1.0, -1.0]), linear(tiny_model.lm_head.weight), adam(z, 0.1)
    )
    assert z.grad is not None
    assert all(p.grad is None for p in tiny_model.parameters())


def test_bias_is_added():
    # V = 2, D = 1, W = [[1], [-1]], bias [0, 2], z = 0.5: logits [0.5, 1.5] -> a = token 1,
    # p1 = sigmoid(1) = 0.7310586, logp = log p1 = -0.3132617.
    # d logp / dz = w1 - (p0 w0 + p1 w1) = -1 - (0.2689414 - 0.7310586) = -0.5378828.
    # r = -1: loss = -r * logp = -0.3132617, gradient = d logp / dz = -0.5378828, and Adam's
    # first step moves z by -lr * sign(grad) = +0.1 -> 0.6 (logits [0.6, 1.4]: still token 1,
    # logp drops to log sigmoid(0.8) = -0.3711007). Without the bias the same z would pick
    # token 0 and move the other way, to 0.4 (test_hand_worked_single_position).
    w, bias = torch.tensor([[1.0], [-1.0]]), torch.tensor([0.0, 2.0])
    z = leaf(torch.tensor([[[0.5]]]))
    step = latent_step(z, None, torch.tensor([-1.0]), linear(w, bias), adam(z, 0.1))
    assert step.loss.item() == pytest.approx(-0.3132617, abs=1e-6)
    assert step.grad_norm.item() == pytest.approx(0.5378828, abs=1e-6)
    assert z.item() == pytest.approx(0.6, abs=1e-6)
    assert step.tokens.tolist() == [[1]] and step.tokens_changed.tolist() == [0]
    logp = torch.log_softmax(linear(w, bias)(z.detach()), dim=-1)[0, 0, 1]
    assert logp.item() == pytest.approx(-0.3711007, abs=1e-6)


def test_z_must_require_grad(head, z0):
    with pytest.raises(ValueError, match="require grad"):
        latent_step(z0, None, torch.zeros(2), linear(head), torch.optim.Adam([leaf(z0)]))


def _sampled(z0: torch.Tensor, head: torch.Tensor, seed: int | None):
    """One step from z0 with r = -1: sampled tokens (`seed`), or argmax (`seed=None`)."""
    z = leaf(z0)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    r = torch.tensor([-1.0, -1.0])
    step = latent_step(
        z, None, r, linear(head), adam(z, 0.1), sample=seed is not None, generator=gen
    )
    return step.tokens, z.detach()


def test_sampled_update_reproducible_per_generator(head, z0):
    # The tiny model's head gives small logits (|W z| ~ 0.1 over 128 tokens): softmax(W z_t) is
    # nearly uniform, so 12 sampled positions all equal to the argmax ones has odds ~ 128^-12.
    tokens, z = _sampled(z0, head, seed=7)
    again_tokens, again_z = _sampled(z0, head, seed=7)
    assert torch.equal(tokens, again_tokens) and torch.equal(z, again_z)
    argmax_tokens, argmax_z = _sampled(z0, head, seed=None)
    # Sampling had an effect: both a_t (which the gradient follows, so Z moves elsewhere) and
    # the returned x'_t differ from the argmax step's.
    assert (tokens != argmax_tokens).sum() > tokens.numel() // 2
    assert not torch.allclose(z, argmax_z)
    assert torch.equal(argmax_tokens, prefix_logits(argmax_z, head).argmax(-1))
    other_tokens, _ = _sampled(z0, head, seed=8)
    assert not torch.equal(tokens, other_tokens)  # and it follows the generator


def test_hidden_rms():
    # entries 3 and 4 -> sqrt((9 + 16) / 2) = 3.5355
    assert hidden_rms(torch.tensor([[3.0, 4.0]])) == pytest.approx(math.sqrt(12.5))


def test_nan_reward_with_grad_clip_does_not_poison_later_steps(head, z0):
    z = leaf(z0)
    opt = adam(z, 0.1)
    step = latent_step(z, None, torch.tensor([math.nan, -1.0]), linear(head), opt, grad_clip=1.0)
    assert step.finite.tolist() == [False, True] and torch.equal(z[0].detach(), z0[0])
    step = latent_step(z, None, torch.tensor([-1.0, -1.0]), linear(head), opt, grad_clip=1.0)
    assert step.finite.all() and torch.isfinite(z).all()
