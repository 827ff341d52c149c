"""Batched decoding with a KV cache, latent capture, and continuation from a forced prefix.

The engine does not use `model.generate`: it needs three things that it does not give cheaply.

1. `z_t`, the last-layer hidden state after the final norm at the position that predicted
   token `x_t` (so `lm_head(z_t)` are its logits), for the first `capture` tokens only — not
   every layer's states for every step.
2. Continuation from "prompt + forced prefix" that reuses the prompt's cached keys and values
   (`PromptState`) instead of recomputing them: LatentSeek decodes from the same prompt once per
   iteration with a different prefix.
3. Per-row stopping in a batch, with finished rows dropped from the batch at once.

Layout. Prompts are prefilled right-padded (so no real token attends to padding and positions are
plain `0..L-1`); each row's keys and values are cut to its own length and kept. A decoding batch is
assembled as `[zero padding | prompt_i | padding | prefix_i]` along the sequence axis with a 2-D
attention mask and explicit position ids (prompt positions `0..P_i-1`, prefix `P_i..`), so a row's
tokens, positions and visible keys are the same whatever else is in the batch. The batch cache is
preallocated for the longest row (prompt + prefix + max_new_tokens) and written in place, so a
decode step does not copy the whole cache as `DynamicCache`'s concatenation does. Padding can still
change floating-point rounding (different matrix shapes), which is why the fidelity test measures
batch sizes 4 and 8 separately from batch size 1.

Supports decoder-only models whose cache layers are plain full attention (Llama, Qwen2, Mistral
without sliding window, SmolLM2, ...). Logit post-processing beyond `lm_head` (soft-capping,
logit scales) is not applied.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pipeline.engine.backends.base import GenerationRequest, GenerationResult, check_fits

__all__ = [
    "DecodeBatch",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "PromptState",
    "Row",
    "eos_token_ids",
    "head_logits",
    "kv_bytes_per_token",
]


@dataclass
class PromptState:
    """A prompt's cached keys/values and the hidden state that predicts the first answer token."""

    keys: list[torch.Tensor]  # per layer [H_kv, P, D_head]
    values: list[torch.Tensor]  # per layer [H_kv, P, D_head]
    last_hidden: torch.Tensor  # [D] post-norm hidden state at the last prompt position
    length: int  # P


def head_logits(lm_head: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the LM head in the head's own dtype: [..., D] -> [..., V].

    The one function that turns hidden states into logits, for decoding and for the latent step
    alike, so that argmax(W z_t) = x_t holds in bf16 too (the same matrix product in the same
    precision) and no float32 copy of the head is made. Callers that need float32 probabilities
    cast the logits, not the weights."""
    return lm_head(hidden.to(lm_head.weight.dtype))


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of KV cache one token of one row holds: layers x 2 x KV heads x head dim x the
    weights' element size (a row of T tokens holds T times this, prompt included)."""
    cfg = model.config
    layers = int(cfg.num_hidden_layers)
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    element = next(model.parameters()).element_size()
    return layers * 2 * heads * head_dim * element


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class Generator:
    """Decodes batches of requests on one model. Holds no per-request state between calls."""

    def __init__(self, model: Any, tokenizer: Any, prefill_chunk: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        self.eos_ids = eos_token_ids(model, tokenizer)
        if not self.eos_ids:
            raise ValueError("the model and tokenizer define no EOS token id")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.prefill_chunk = prefill_chunk  # prompts prefilled together at most
        # Counters since construction (the bench reads them): decode steps, the rows they
        # decoded (rows / steps is the batch's mean occupancy), and merges into running batches.
        self.stats = {"decode_steps": 0, "decoded_rows": 0, "merges": 0}
        # transformers 5.x renamed the backbone's `past_key_values` argument to `cache`.
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -------------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`lm_head` in its own dtype: [..., D] -> [..., V] (see `head_logits`)."""
        return head_logits(self.lm_head, hidden)

    def _forward(
        self,
        input_ids: torch.Tensor,  # [B, L]
        attention_mask: torch.Tensor,  # [B, past + L]
        position_ids: torch.Tensor,  # [B, L]
        cache: DynamicCache,
    ) -> torch.Tensor:  # [B, L, D] post-norm hidden states
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PromptState]:
        """Run prompts (right-padded, in chunks) and keep each one's cache and last hidden state."""
        states: list[PromptState] = []
        for start in range(0, len(prompts), self.prefill_chunk):
            chunk = [list(p) for p in prompts[start : start + self.prefill_chunk]]
            lengths = [len(p) for p in chunk]
            width = max(lengths)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
                mask[i, : len(p)] = 1
            positions = torch.arange(width).expand(len(chunk), width)
            cache = DynamicCache(config=self.model.config)
            hidden = self._forward(
                ids.to(self.device), mask.to(self.device), positions.to(self.device), cache
            )
            layers = _cache_layers(cache)
            for i, n in enumerate(lengths):
                states.append(
                    PromptState(
                        keys=[k[i, :, :n].clone() for k, _ in layers],
                        values=[v[i, :, :n].clone() for _, v in layers],
                        last_hidden=hidden[i, n - 1].clone(),
                        length=n,
                    )
                )
        return states

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode `requests` as one static batch: every row starts together, finished rows leave
        at once, and the call returns when the last row is done."""
        batch, done = self.open(requests)
        while batch.rows:
            done += batch.step()
        by_handle = {row.handle: row.result for row in done}
        return [by_handle[i] for i in range(len(requests))]

    @torch.no_grad()
    def open(
        self, requests: Sequence[GenerationRequest], handles: Sequence[Any] | None = None
    ) -> tuple[DecodeBatch, list[Row]]:
        """Start decoding `requests`: reuse or prefill their prompts, lay them out in one batch
        cache, feed the forced prefixes, and return the batch (step it until it is empty, or
        merge it into a running one) with the rows that are done already (nothing to decode).
        Each row carries its `handle` (default: its index in `requests`)."""
        handles = list(range(len(requests))) if handles is None else list(handles)
        rows = [self._row(h, r) for h, r in zip(handles, requests)]
        states = self._prompt_states(rows)
        live = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        done = [rows[i] for i, r in enumerate(requests) if r.max_new_tokens <= 0]
        if not live:
            return DecodeBatch.empty(self), done
        batch = self._layout([rows[i] for i in live], [states[i] for i in live])
        self._feed_prefixes(batch)
        return batch, done

    def _row(self, handle: Any, r: GenerationRequest) -> Row:
        """A request as a row, after checking that it fits the model's context."""
        check_fits(r, self.max_positions)
        sampler = torch.Generator(device=self.device).manual_seed(r.seed) if r.sample else None
        result = GenerationResult(tokens=[], finish_reason="length")
        seen = None
        if r.repetition_penalty != 1.0:
            seen = [*r.prompt_ids, *r.prefix_ids]
        return Row(handle, r, result, r.stop_ids or self.eos_ids, sampler, seen=seen)

    def _prompt_states(self, rows: Sequence[Row]) -> list[PromptState]:
        """Each row's prompt state: the one its request carries (reuse), else a fresh prefill
        (all missing prompts together, charged to their rows)."""
        states: list[PromptState | None] = [row.request.prompt_state for row in rows]
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            fresh = self.prefill([rows[i].request.prompt_ids for i in missing])
            for i, s in zip(missing, fresh):
                states[i] = s
                rows[i].result.prompt_tokens = s.length
                rows[i].result.token_passes += s.length
                rows[i].result.forward_calls += 1
        for row, s in zip(rows, states):
            if row.request.keep_prompt_state:
                row.result.prompt_state = s
        return states  # type: ignore[return-value]

    def _layout(self, rows: list[Row], states: list[PromptState]) -> DecodeBatch:
        """The batch cache `[zeros | prompt_i]` along the sequence axis, in buffers that already
        hold room for the prefixes and every token to decode (no per-step concatenation)."""
        p_max = max(s.length for s in states)
        f_max = max(len(row.request.prefix_ids) for row in rows)
        capacity = p_max + f_max + max(row.request.max_new_tokens for row in rows)
        cache = _preallocated_cache(self.model.config, states, capacity)
        mask = torch.zeros((len(rows), capacity), dtype=torch.long, device=self.device)
        for b, s in enumerate(states):
            mask[b, p_max - s.length : p_max] = 1
        next_pos = torch.tensor([s.length for s in states], device=self.device)
        z = torch.stack([s.last_hidden for s in states])  # [b, D]
        return DecodeBatch(self, rows, cache, mask, p_max, next_pos, z)

    def _feed_prefixes(self, batch: DecodeBatch) -> None:
        """Run the forced prefixes (left-padded inside one block after the prompts) in one
        pass: each row's z becomes the hidden state after its last prefix token."""
        lengths = [len(row.request.prefix_ids) for row in batch.rows]
        f_max = max(lengths)
        if f_max == 0:
            return
        b, start = len(batch.rows), batch.width
        ids = torch.full((b, f_max), self.pad_id, dtype=torch.long, device=self.device)
        pos = torch.zeros((b, f_max), dtype=torch.long, device=self.device)
        for i, (row, f) in enumerate(zip(batch.rows, lengths)):
            if f:
                ids[i, f_max - f :] = torch.tensor(list(row.request.prefix_ids), device=self.device)
                pos[i, f_max - f :] = torch.arange(f, device=self.device) + batch.next_pos[i]
                batch.mask[i, start + f_max - f : start + f_max] = 1
        batch.width += f_max
        hidden = self._forward(ids, batch.mask[:, : batch.width], pos, batch.cache)  # [b, f, D]
        for i, (row, f) in enumerate(zip(batch.rows, lengths)):
            if f:
                batch.z[i] = hidden[i, -1]
                row.result.token_passes += f
                row.result.forward_calls += 1
        batch.next_pos = batch.next_pos + torch.tensor(lengths, device=self.device)


@dataclass
class Row:
    """One request while it decodes: its handle, its result so far and its sampling state."""

    handle: Any
    request: GenerationRequest
    result: GenerationResult
    stops: frozenset[int] | set[int]
    sampler: torch.Generator | None = None
    captured: list[torch.Tensor] = field(default_factory=list)
    seen: list[int] | None = None  # ids so far (prompt, prefix, tokens): repetition penalty only

    @property
    def remaining(self) -> int:  # tokens this row may still decode
        return self.request.max_new_tokens - len(self.result.tokens)

    def finish(self) -> Row:
        if self.captured:
            self.result.hidden = torch.stack(self.captured)
            self.captured = []
        return self


class DecodeBatch:
    """Rows decoding together over one cache (`[B, H_kv, capacity, D_head]` per layer), with a
    2-D attention mask, explicit positions and `z`, each row's hidden state that predicts its
    next token. `step` decodes one token per row and drops the rows that finish; `merge` takes in
    the rows of another batch (continuous batching: rows join as others leave).

    A row's columns in the cache are wherever the layout put them: its positions are explicit and
    its mask hides every other column, so a row's tokens do not depend on the batch around it
    (except for floating-point rounding of different matrix shapes)."""

    def __init__(
        self,
        generator: Generator,
        rows: list[Row],
        cache: DynamicCache | None,
        mask: torch.Tensor,  # [B, capacity]
        width: int,  # columns of `mask` in use
        next_pos: torch.Tensor,  # [B] position of each row's next token
        z: torch.Tensor,  # [B, D]
    ) -> None:
        self.gen = generator
        self.rows = rows
        self.cache = cache
        self.mask = mask
        self.width = width
        self.next_pos = next_pos
        self.z = z

    @classmethod
    def empty(cls, generator: Generator) -> DecodeBatch:
        none = torch.zeros((0, 0), dtype=torch.long)
        return cls(generator, [], None, none, 0, torch.zeros(0, dtype=torch.long), none)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Choose each row's next token; return the rows that finished (removed from the batch)
        and run the others' new tokens through the model."""
        rows = self.rows
        self.gen.stats["decode_steps"] += 1
        self.gen.stats["decoded_rows"] += len(rows)
        logits = self.gen.logits(self.z)  # [b, V] in the head's dtype
        chosen = _choose(logits, rows)  # [b], on the device
        self._capture()
        keep, finished = [], []
        for b, (row, token) in enumerate(zip(rows, chosen.tolist())):  # one transfer per step
            row.result.tokens.append(token)
            if row.seen is not None:
                row.seen.append(token)
            if token in row.stops:
                row.result.finish_reason = "eos"
                finished.append(row.finish())
            elif row.remaining > 0:
                keep.append(b)
            else:
                finished.append(row.finish())
        if not keep:
            self.rows = []
            self.cache = None
            return finished
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.gen.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_pos, chosen = self.mask[index], self.next_pos[index], chosen[index]
            self.rows = [rows[b] for b in keep]
        self.mask[:, self.width] = 1
        self.width += 1
        hidden = self.gen._forward(
            chosen[:, None], self.mask[:, : self.width], self.next_pos[:, None], self.cache
        )
        self.z = hidden[:, -1]
        self.next_pos = self.next_pos + 1
        for row in self.rows:
            row.result.token_passes += 1
            row.result.forward_calls += 1
        return finished

    def _capture(self) -> None:
        """Keep z of the rows that still capture (one gather for all of them)."""
        want = [b for b, row in enumerate(self.rows) if len(row.captured) < row.request.capture]
        if want:
            zs = self.z[want].detach().float()  # [len(want), D], a copy
            for i, b in enumerate(want):
                self.rows[b].captured.append(zs[i])

    def merge(self, other: DecodeBatch) -> DecodeBatch:
        """This batch's rows followed by `other`'s, in new buffers: each batch's used columns are
        right-aligned at the wider of the two widths, with room for every row's remaining
        tokens. Both batches are consumed: layer by layer, their buffers are freed as soon as
        they are copied, so the peak is the merged cache plus one layer of the old ones (not
        both caches whole)."""
        if not other.rows:
            return self
        if not self.rows:
            return other
        self.gen.stats["merges"] += 1
        width = max(self.width, other.width)
        capacity = width + max(row.remaining for row in self.rows + other.rows)
        layers = []
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            merged = []
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                shape = (a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3])
                buf = _kv_buffer(a, shape)
                buf[: a.shape[0], :, width - self.width : width] = a[:, :, : self.width]
                buf[a.shape[0] :, :, width - other.width : width] = b[:, :, : other.width]
                merged.append(buf)
            del a, b
            mine.release()
            theirs.release()
            layers.append(_BufferLayer(merged[0], merged[1], width))
        self.cache = other.cache = None
        cache = DynamicCache(config=self.gen.model.config)
        cache.layers = layers
        mask = self.mask.new_zeros((len(self.rows) + len(other.rows), capacity))
        mask[: len(self.rows), width - self.width : width] = self.mask[:, : self.width]
        mask[len(self.rows) :, width - other.width : width] = other.mask[:, : other.width]
        return DecodeBatch(
            self.gen,
            self.rows + other.rows,
            cache,
            mask,
            width,
            torch.cat([self.next_pos, other.next_pos]),
            torch.cat([self.z, other.z]),
        )


def _kv_buffer(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed KV cache buffer of `shape` with `like`'s dtype and device: every batch cache's
    buffer is made here (the tests count the live ones around a merge)."""
    return like.new_zeros(shape)


class _BufferLayer(DynamicLayer):
    """A cache layer over preallocated buffers `[B, H_kv, capacity, D_head]`: `update` writes the
    new keys/values in place, and `keys`/`values` are views of the filled part (DynamicLayer
    concatenates the whole cache at every step instead)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._keys_buffer, self._values_buffer = keys, values
        self._length = length
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._keys_buffer[:, :, : self._length]
        self.values = self._values_buffer[:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._keys_buffer.shape[-2]:
            raise RuntimeError(f"cache buffer of {self._keys_buffer.shape[-2]} positions is full")
        self._keys_buffer[:, :, self._length : end] = key_states
        self._values_buffer[:, :, self._length : end] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys_buffer = self._keys_buffer[indices]
        self._values_buffer = self._values_buffer[indices]
        self._views()

    def release(self) -> None:
        """Drop this layer's buffers (a merge has copied them)."""
        self._keys_buffer = self._values_buffer = self.keys = self.values = None


def _preallocated_cache(config: Any, states: Sequence[PromptState], capacity: int) -> DynamicCache:
    """A batch cache whose layers hold each prompt right-aligned at `max(length)` in buffers of
    `capacity` positions."""
    p_max = max(s.length for s in states)
    layers = []
    for layer in range(len(states[0].keys)):
        ref_k, ref_v = states[0].keys[layer], states[0].values[layer]
        b, heads = len(states), ref_k.shape[0]
        keys = _kv_buffer(ref_k, (b, heads, capacity, ref_k.shape[2]))
        values = _kv_buffer(ref_v, (b, heads, capacity, ref_v.shape[2]))
        for row, s in enumerate(states):
            keys[row, :, p_max - s.length : p_max] = s.keys[layer]
            values[row, :, p_max - s.length : p_max] = s.values[layer]
        layers.append(_BufferLayer(keys, values, p_max))
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers):
        raise NotImplementedError("the model's cache layout is not one full-attention layer each")
    cache.layers = layers
    return cache


def _cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                f"{type(layer).__name__}: only full-attention caches are supported by the engine"
            )
        layers.append((layer.keys, layer.values))
    return layers


def _choose(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Each row's next token, [b] on the device: the argmax, after the row's repetition penalty
    (HF's rule: a seen token's logit divided by the penalty if positive, else multiplied), or a
    draw from the row's own seeded generator (`_sample`, all sampled rows at once)."""
    penalised = [b for b, row in enumerate(rows) if row.seen is not None]
    if penalised:
        logits = logits.clone()
        for b in penalised:
            ids = torch.tensor(sorted(set(rows[b].seen)), device=logits.device)
            values = logits[b, ids]
            penalty = rows[b].request.repetition_penalty
            logits[b, ids] = torch.where(values > 0, values / penalty, values * penalty)
    chosen = logits.argmax(dim=-1)  # [b]
    sampled = [b for b, row in enumerate(rows) if row.sampler is not None]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        chosen[index] = _sample(logits[index], [rows[b] for b in sampled])
    return chosen


def _sample(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """A draw per row from softmax(logits / temperature), restricted to the row's top_k logits
    (0: all, then renormalised) and to the smallest set of tokens whose mass reaches its top_p:
    [n, V] in the head's dtype -> [n]. Batched over the rows (one softmax, one top-k, one sort
    when a row asks for top_p); only the noise is per row, from the row's own generator:
    argmax(p / q), q ~ Exp(1) over the vocabulary, which is `torch.multinomial(p, 1)`'s own
    draw (the same tokens and generator states as a per-row multinomial)."""
    n, vocab = logits.shape
    device = logits.device
    reqs = [row.request for row in rows]
    temperature = torch.tensor([r.temperature for r in reqs], device=device)[:, None]
    scaled = logits.float() / temperature  # [n, V]
    ks = [r.top_k if 0 < r.top_k < vocab else 0 for r in reqs]
    if any(ks):
        top = torch.topk(scaled, max(ks), dim=-1).values  # [n, max k], descending
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None])
        limited = torch.tensor([k > 0 for k in ks], device=device)[:, None]
        scaled = scaled.masked_fill(limited & (scaled < kth), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if any(r.top_p < 1.0 for r in reqs):
        top_p = torch.tensor([r.top_p for r in reqs], device=device)[:, None]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cum = sorted_probs.cumsum(-1)
        # drop tokens once the mass before them exceeds top_p (rows with top_p = 1 keep all)
        cut = (cum - sorted_probs > top_p) & (top_p < 1.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(cut, 0.0))
    noise = torch.stack(
        [torch.empty(vocab, device=device).exponential_(1, generator=row.sampler) for row in rows]
    )  # [n, V]
    return (probs / noise).argmax(dim=-1)
