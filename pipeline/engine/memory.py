"""The memory plan: what one worker's device must hold, worked out from the model's config alone.

No weights are read: the parameter count comes from the shapes in `config.json` (embeddings,
attention with its KV heads, the gated MLP, the norms, `lm_head` unless tied), so a run can be
checked before any worker starts, and `latentseek gpu-probe --plan-only` can print the plan of a
model nobody downloaded (`configs/models/*.json` holds the paper's backbones).

What a worker holds, per device (a tensor-parallel replica of G ranks splits weights and KV heads
G ways):

- native backend: the weights; the KV cache of `batch_size` rows, every row at the longest a row
  can be (prompt + answer + the verifier's budget with the self-reward); the cached prompts of a
  task's problems (continuations reuse them); the activations (the largest of a prefill chunk, a
  decode step's logits and one latent step at U = `max_update_length`); the runtime (CUDA context,
  cuBLAS workspace, allocator slack).
- vllm backend: the Hugging Face copy (its weights, the latent step, the KV of the requests that
  capture z on it) beside vLLM's own weights, its KV pool (`batch_size` rows at the run's context,
  and at least one row of the full context, which vLLM requires) and its runtime (activations at
  its profiled batch, CUDA graphs, sampler).

Estimates, not measurements: `latentseek gpu-probe` prints the plan beside the measured
`torch.cuda.max_memory_allocated` for the shapes it builds. Dense decoder-only models only (Llama,
Qwen2, Mistral, SmolLM2: SwiGLU MLP, RMSNorm); a mixture of experts is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CONFIG_DIR

SHAPES_DIR = CONFIG_DIR / "models"  # <name>.json: config.json of the paper's backbones, and tiny
PLAN_PROMPT_TOKENS = 512  # prompt tokens assumed per row (chat-formatted GSM8K/MATH-500: < 400)
PREFILL_CHUNK = 16  # prompts prefilled together (pipeline.engine.generation.Generator)
RUNTIME_BYTES = 1 << 30  # CUDA context, cuBLAS workspace, allocator slack
VLLM_RUNTIME_BYTES = 3 << 30  # vLLM's activations at its profiled batch, CUDA graphs, sampler
# The context a vLLM engine is started with (`max_model_len`, `backends/vllm.py` asks
# `needed_model_len`): the run's longest prompt is not known when the engine starts, so this many
# tokens are allowed for it (GSM8K, MATH-500 and AIME prompts are well under), on top of the
# answer and verifier budgets, rounded up to CONTEXT_ROUND. A longer prompt is refused per
# problem by the context check; `vllm_engine_args` may raise it.
PROMPT_ALLOWANCE = 1024
CONTEXT_ROUND = 1024
H100_GIB = 79.2  # an 80 GB H100 as torch.cuda reports it (85.0e9 bytes)
GIB = 1 << 30
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a dense decoder-only transformer, read from its config.json."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    max_positions: int
    qkv_bias: bool  # Qwen2: q, k and v projections carry a bias
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "") -> ModelShape:
        """From a config.json dict (or a transformers config's `to_dict()`)."""
        if any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise ValueError("the memory plan covers dense models; this config has experts")
        model_type = str(config.get("model_type", ""))
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            name=name or str(config.get("_name_or_path", "") or model_type),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", True)),  # transformers' default
            max_positions=int(config.get("max_position_embeddings") or 0),
            qkv_bias=model_type.startswith("qwen2") or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def parameters(self) -> int:
        """Every parameter, tied embeddings counted once."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h  # q, k, v, o
        attention += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate + (2 * self.intermediate + h) * self.mlp_bias
        layer = attention + mlp + 2 * h  # two RMSNorms
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return embeddings + self.layers * layer + h  # + the final norm

    def kv_bytes_per_token(self, element: int) -> int:
        """Layers x (K and V) x KV heads x head dim x element size (as the engine's cache)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * element


def count(n: int) -> str:
    """A parameter count the way model cards write it: 7.62B, 135M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def shape_names() -> list[str]:
    """The shipped shapes (`configs/models/<name>.json`)."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def shape_config(name: str) -> dict[str, Any]:
    """The config.json of a shipped shape."""
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no model shape {name!r}; shipped: {', '.join(shape_names())}")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Workload:
    """What a worker runs, in the terms the plan needs (see `workload`)."""

    rows: int  # rows decoding together (batch_size)
    prompt_tokens: int
    answer_tokens: int  # max_new_tokens
    verifier_tokens: int  # the verifier's budget (0 without the self-reward)
    update_length: int  # U at most (max_update_length)
    task_problems: int  # problems of a task whose prompts stay cached
    tensor_parallel: int = 1

    @property
    def row_tokens(self) -> int:
        """The longest row: its prompt, answer (a verifier's prompt holds the answer) and the
        verifier's own tokens, plus the stop token."""
        return self.prompt_tokens + self.answer_tokens + self.verifier_tokens + 1

    @property
    def context(self) -> int:
        """The context a vLLM engine is started with for this run (`needed_model_len`)."""
        return context_tokens(self.answer_tokens, self.verifier_tokens)


def context_tokens(answer_tokens: int, verifier_tokens: int) -> int:
    """PROMPT_ALLOWANCE + the answer and verifier budgets, rounded up to CONTEXT_ROUND."""
    need = PROMPT_ALLOWANCE + answer_tokens + verifier_tokens
    return math.ceil(need / CONTEXT_ROUND) * CONTEXT_ROUND


def needed_model_len(cfg: Any, max_positions: int) -> int:
    """The context a run needs from a serving engine (`context_tokens` of its answer and
    verifier budgets), at most the model's `max_positions` (0: unknown)."""
    answer = int(getattr(cfg, "max_new_tokens", 0) or 0)
    verifier = int(getattr(cfg, "verifier_budget", 0) or 0)
    need = context_tokens(answer, verifier)
    return min(need, max_positions) if max_positions else need


def workload(cfg: Any, prompt_tokens: int = PLAN_PROMPT_TOKENS) -> Workload:
    """The workload of a run's config (`pipeline.config.Config`)."""
    return Workload(
        rows=cfg.batch_size,
        prompt_tokens=prompt_tokens,
        answer_tokens=cfg.max_new_tokens,
        verifier_tokens=cfg.verifier_budget if cfg.reward == "self" else 0,
        update_length=cfg.max_update_length,
        task_problems=cfg.problems_per_task,
        tensor_parallel=cfg.tensor_parallel,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, item by item (`items`), against the device's size (0: not known)."""

    shape: ModelShape
    backend: str
    dtype: str
    load: Workload
    items: tuple[tuple[str, int, str], ...]  # (what, bytes, how it was counted)
    per_row: int  # bytes one more row adds (KV, and its share of the logits)
    device_bytes: int = 0
    device_name: str = ""

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.items)

    @property
    def fits(self) -> bool:
        return not self.device_bytes or self.total <= self.device_bytes

    @property
    def max_rows(self) -> int:
        """The most rows (batch_size) that fit the device, the rest unchanged."""
        fixed = self.total - self.load.rows * self.per_row
        return max(0, (self.device_bytes - fixed) // self.per_row) if self.device_bytes else 0

    def lines(self) -> list[str]:
        tp = self.load.tensor_parallel
        head = (
            f"memory plan: {self.shape.name} ({count(self.shape.parameters())} parameters), "
            f"{self.dtype}, backend={self.backend}, batch_size={self.load.rows}, rows of "
            f"{self.load.row_tokens} tokens" + (f", per rank of {tp}" if tp > 1 else "")
        )
        out = [head]
        out += [f"  {what:<22s} {b / GIB:8.2f} GiB  {how}" for what, b, how in self.items]
        total = f"  {'total':<22s} {self.total / GIB:8.2f} GiB"
        if self.device_bytes:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            total += (
                f"  of {self.device_bytes / GIB:.1f} GiB ({self.device_name}): {verdict}; "
                f"batch_size up to {self.max_rows}"
            )
        return [*out, total]

    def refusal(self) -> str:
        """Why the run cannot start on this device, with the keys to change; '' if it fits."""
        if self.fits:
            return ""
        fixed = self.total - self.load.rows * self.per_row
        if self.max_rows >= 1:
            fix = f"lower batch_size to {self.max_rows} or less, or max_new_tokens"
        else:
            fix = f"even one row does not fit ({fixed / GIB:.1f} GiB without the rows)"
        return (
            f"the memory plan needs {self.total / GIB:.1f} GiB per device, the device has "
            f"{self.device_bytes / GIB:.1f} GiB ({self.device_name}): {fix}; or raise "
            f"tensor_parallel, use a smaller dtype or model"
            + (
                ", or backend=native (no second copy of the weights)"
                if self.backend == "vllm"
                else ""
            )
            + "; device_memory_gib states the device's size for planning"
        )


def plan_memory(
    config: Mapping[str, Any] | ModelShape,
    dtype: str,
    load: Workload,
    backend: str = "native",
    device_bytes: int = 0,
    device_name: str = "",
) -> MemoryPlan:
    """The plan for one worker (one rank of a replica) of `load` on a model of `config`."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    element = ELEMENT_BYTES[dtype]
    g = max(1, load.tensor_parallel)
    kv_token = shape.kv_bytes_per_token(element) // g
    weights = shape.parameters() * element // g
    logits_row = shape.vocab * (element + 4)  # a decode step's logits, and a float32 copy
    common = [
        _activations(shape, element, load, kv_token, logits_row),
        ("runtime", RUNTIME_BYTES, "CUDA context, cuBLAS workspace, allocator slack"),
    ]
    weights_item = ("weights", weights, f"{count(shape.parameters())} x {element} B")
    per_token = f"{kv_token / 1024:.0f} KiB/token"
    if backend == "vllm":
        items, per_row = _vllm_items(load, kv_token, weights_item, per_token, logits_row, common)
    else:
        kv_row = kv_token * load.row_tokens
        prompts = load.task_problems * load.prompt_tokens * kv_token
        items = [
            weights_item,
            ("KV cache", load.rows * kv_row,
             f"{per_token} x {load.row_tokens} tokens x {load.rows} rows"),
            ("cached prompts", prompts,
             f"{load.task_problems} problems of a task x {load.prompt_tokens} tokens"),
            *common,
        ]  # fmt: skip
        per_row = kv_row + logits_row + prompts // max(1, load.rows)  # a task grows with rows
    return MemoryPlan(
        shape=shape,
        backend=backend,
        dtype=dtype,
        load=load,
        items=tuple(items),
        per_row=per_row,
        device_bytes=device_bytes,
        device_name=device_name,
    )


def _activations(shape: ModelShape, element: int, load: Workload, kv_token: int,
                 logits_row: int) -> tuple[str, int, str]:  # fmt: skip
    """The largest transient of a step: a prefill chunk, a decode step's logits, a latent step."""
    decode = load.rows * logits_row
    # A prefill chunk: its cache (cloned per prompt, so twice) and one layer's MLP at a time.
    chunk = PREFILL_CHUNK * load.prompt_tokens
    prefill = 2 * chunk * kv_token + chunk * (2 * shape.intermediate + 4 * shape.hidden) * element
    # One latent step: logits in the weights' dtype, float32 probabilities and their gradient.
    latent = load.update_length * shape.vocab * (element + 8)
    parts = [("a prefill chunk", prefill), ("decode logits", decode), ("a latent step", latent)]
    largest, activations = max(parts, key=lambda part: part[1])
    return (
        "activations",
        activations,
        f"{largest}: the largest of prefill chunk {prefill / GIB:.2f}, decode logits "
        f"{decode / GIB:.2f}, latent step (U={load.update_length}, V={shape.vocab}) "
        f"{latent / GIB:.2f} GiB",
    )


def _vllm_items(load: Workload, kv_token: int, weights_item: tuple[str, int, str], per_token: str,
                logits_row: int, common: list[tuple[str, int, str]],
                ) -> tuple[list[tuple[str, int, str]], int]:  # fmt: skip
    """backend=vllm: the resident HF copy (weights, the CoT's capture KV) beside vLLM's engine
    (its weights, KV pool and runtime), and the bytes a row adds."""
    context = max(load.context, CONTEXT_ROUND)
    pool_tokens = max(load.rows * context, context)
    capture_tokens = load.prompt_tokens + load.answer_tokens + 1
    weights = weights_item[1]
    items = [
        ("HF copy: weights", weights, weights_item[2]),
        (
            "HF copy: capture KV",
            load.rows * capture_tokens * kv_token,
            f"{per_token} x {capture_tokens} tokens x {load.rows} rows (the CoT that "
            "captures z runs on the resident model)",
        ),
        *common,
        ("vLLM: weights", weights, "its own copy"),
        (
            "vLLM: KV pool",
            pool_tokens * kv_token,
            f"{per_token} x {load.rows} rows x max_model_len {context}",
        ),
        ("vLLM: runtime", VLLM_RUNTIME_BYTES, "activations at its profiled batch, CUDA graphs"),
    ]
    return items, kv_token * (context + capture_tokens) + logits_row


def model_config(cfg: Any) -> dict[str, Any] | None:
    """The config.json of `cfg.model` without loading it: a local directory's, the local
    Hugging Face cache's for a hub id, the dequantised cache's for a GGUF file (None until the
    first load wrote it)."""
    from pipeline.engine.model import _gguf_file, _looks_local, gguf_cache_dir

    spec = cfg.model
    gguf, _ = _gguf_file(spec)
    if gguf is not None:
        path: Path | None = gguf_cache_dir(gguf, cfg.model_cache_dir) / "config.json"
    elif _looks_local(spec):
        path = Path(spec).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable: the loader will say what is wrong with it
        return None


def device_memory(cfg: Any, device_type: str) -> tuple[int, str]:
    """(bytes, description) of one worker's device: `device_memory_gib` when set, else the
    first CUDA device's size when the workers run on CUDA and this process sees one; (0, '')
    when neither is known (the plan is printed, nothing is refused)."""
    if getattr(cfg, "device_memory_gib", 0):
        return int(cfg.device_memory_gib * GIB), f"device_memory_gib={cfg.device_memory_gib:g}"
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), props.name
    return 0, ""
