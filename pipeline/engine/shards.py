"""Tensor-parallel shards: one model replica over G processes (ranks), one device each.

Every rank holds a slice of every large matrix and runs the same calls in the same order; the
slices meet in collectives (torch.distributed: gloo on CPU, NCCL on GPU) inside each forward, so
each rank ends every layer with the full hidden states and the full logits. Nothing of the method
changes: the engine and the latent step see an ordinary model. The Ray side (one actor per rank
in a placement group, rank 0 taking the work) is in `pipeline.run.workers`.

Two backends, chosen by `shard_backend`:

- `transformers` (default): the model's own `tp_plan` (`from_pretrained(tp_plan="auto")`, torch
  DTensor). Attention heads, KV heads and the MLP are split by column then row; `lm_head` is
  split by vocabulary and its logits gathered, and the gather's backward sums the head-input
  gradient across ranks, so d(loss)/dZ is the full gradient on every rank as it comes. Needs the
  head counts, MLP width and vocabulary to divide by G (`check_shardable` says which do not).
- `deepspeed`: DeepSpeed AutoTP (`deepspeed.init_inference(tensor_parallel=...)`). It splits
  uneven head counts (SmolLM2-135M's 9 heads over 2 ranks as 5 + 4), and `lm_head` by its input
  (hidden) dimension, all-reducing the logits outside autograd: each rank's gradient with respect
  to the head's input is then only its own slice. `FullGradientHead` wraps the head so that the
  backward all-reduces that gradient (a sum), which makes it the full one on every rank. On CPU,
  DeepSpeed's shared-memory all-reduce sets up its buffers only when `LOCAL_SIZE` equals the world
  size (it crashes the first forward otherwise), so `join_group` sets it.

With the full Z gradient on every rank, every rank takes the same optimiser step, keeps the same Z
and decodes the same prefix: the ranks stay in lockstep without exchanging tokens. Sampling is
seeded per request, and the logits are identical on every rank (they are gathered or
all-reduced), so sampled tokens agree too; `pipeline.run.workers` checks that the ranks' answers
agree after every batch.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
from torch import nn

BACKENDS = ("transformers", "deepspeed")
GROUP_TIMEOUT = timedelta(minutes=10)  # a collective waits this long for a rank (a dead peer is
# seen at once: its connection closes)


class ShardError(RuntimeError):
    """The model cannot be sharded as configured; the message says which key to change."""


def free_port() -> int:
    """A TCP port free on this host now (rank 0's rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def join_group(rank: int, world: int, addr: str, port: int, device_type: str) -> None:
    """Join the replica's process group as `rank` of `world` (blocks until every rank joins).

    Ray gives each rank of a GPU replica its own GPU, seen as cuda:0, hence LOCAL_RANK 0 there;
    CPU ranks share the host, so LOCAL_RANK is the rank and LOCAL_SIZE the world size."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank if device_type == "cpu" else 0),
        LOCAL_WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),  # DeepSpeed's CPU all-reduce reads this one
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )
    if device_type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo" if device_type == "cpu" else "nccl",
        rank=rank,
        world_size=world,
        timeout=GROUP_TIMEOUT,
    )


def rank0_value(value: float) -> float:
    """Rank 0's `value` on every rank of the replica (the value itself outside one).

    Every decision that changes what a replica computes next (a reward against tau, a stop) is
    taken on rank 0's value: a rank whose reward differs (a grader timing out on one rank, a
    custom reward that is not deterministic) then still takes the same steps and meets the same
    collectives, instead of waiting in a mismatched one until the group times out."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def check_shardable(config: Any, world: int, backend: str) -> None:
    """Raise ShardError if `backend` cannot split a model with this `config` over `world` ranks."""
    if backend not in BACKENDS:
        raise ShardError(f"shard_backend={backend!r}: allowed: {', '.join(BACKENDS)}")
    if world == 1 or backend == "deepspeed":
        return  # AutoTP splits uneven sizes
    sizes = {
        "attention heads": getattr(config, "num_attention_heads", None),
        "KV heads": getattr(config, "num_key_value_heads", None)
        or getattr(config, "num_attention_heads", None),
        "MLP width": getattr(config, "intermediate_size", None),
        "vocabulary": getattr(config, "vocab_size", None),
    }
    bad = {k: v for k, v in sizes.items() if v is not None and int(v) % world}
    if bad:
        fits = [g for g in range(2, 9) if all(int(v) % g == 0 for v in sizes.values() if v)]
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise ShardError(
            f"shard_backend=transformers cannot split this model over tensor_parallel={world}: "
            f"{what} not divisible by {world}. Use tensor_parallel in "
            f"{fits or 'none of 2..8'}, or shard_backend=deepspeed (splits uneven heads)"
        )
    if getattr(config, "base_model_tp_plan", None) is None:
        raise ShardError(
            f"shard_backend=transformers: {type(config).__name__} has no tensor-parallel plan "
            "(base_model_tp_plan); use shard_backend=deepspeed, or device_map=auto"
        )


def load_sharded(path: str, dtype: torch.dtype, device: torch.device, world: int, backend: str,
                 **kw: Any) -> Any:  # fmt: skip
    """This rank's shard of the causal LM in directory (or hub id) `path`; the process group
    must be joined (`join_group`). Returns the model (eval mode, frozen)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_shardable(AutoConfig.from_pretrained(path, **kw), world, backend)
    if backend == "transformers":
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, tp_plan="auto", **kw
        )
        model.eval()
        model.requires_grad_(False)
        return model
    try:
        import deepspeed
    except ImportError as exc:
        raise ShardError(
            "shard_backend=deepspeed needs the deepspeed package, built against this torch: "
            "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19' (make setup does)"
        ) from exc
    # The whole model stays on the host: AutoTP slices its weights there and DeepSpeed moves
    # this rank's shards (and the unsplit rest) to the rank's current device (`join_group` set
    # it), so a model larger than one GPU loads.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw)
    model.eval()
    model.requires_grad_(False)
    unsharded = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": world}, dtype=dtype, replace_with_kernel_inject=False
    )
    model = engine.module.to(device)  # already there: only this rank's shard is moved
    model.set_output_embeddings(FullGradientHead(model.get_output_embeddings()))
    model.requires_grad_(False)
    model.unsharded_parameters = unsharded  # the FLOP estimate counts the whole model
    return model


class _SumGradient(torch.autograd.Function):
    """Identity forward; the backward sums the incoming gradient over the ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class FullGradientHead(nn.Module):
    """A head split by its input dimension (DeepSpeed's `LmHeadLinearAllreduce`), made to give
    the full gradient with respect to its input on every rank: each rank's gradient covers only
    its slice of the hidden dimension (zeros elsewhere), so their sum is the full gradient."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    @property
    def weight(self) -> torch.Tensor:  # this rank's slice; its dtype is the head's dtype
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden = _SumGradient.apply(hidden)
        # LmHeadLinearAllreduce slices its input as [B, T, D]: any [..., D] goes through as that
        logits = self.head(hidden.reshape(-1, 1, hidden.shape[-1]))
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])
