"""`latentseek gpu-probe`: what a bare GPU machine does with the paper's backbones, as one JSON.

Random-weight models with the exact shapes of the paper's backbones (`configs/models/<shape>.json`:
Qwen2.5-1.5B/7B/14B-Instruct, Qwen2-7B-Instruct, Llama-3.1-8B-Instruct, and `tiny`) are built on
the device from their config alone (no download, no tokenizer: prompts are random token ids), and
each is measured, within `--budget-s` for all shapes together:

- the memory plan (`pipeline.engine.memory`) beside the measured `torch.cuda.max_memory_allocated`;
- native decode tokens/s at each batch size with stops disabled (every row decodes exactly
  `--new-tokens`), and HF `generate` on the same prompts and lengths (`min_new_tokens` = max);
- the GPU-busy fraction of 20 decode steps (the profiler's kernel time over the wall time);
- the engine's invariants in the weights' dtype: `argmax(head(z_t)) == x_t` over captured z; the
  captured z against the z of one full prefill over prompt + tokens (what a backend that decodes
  elsewhere and prefills on the HF model would capture), and that z's argmax rate; each row decoded
  in a batch against alone: the first position where they part and the top-2 logit gap there;
- peak memory of continuous against static batching on two-stage tasks (a CoT, then a
  continuation after a forced prefix, as LatentSeek asks);
- one `latent_step` (`pipeline.method.latent`) at U = `--update-length` over the model's vocabulary.

It imports torch, transformers, PyYAML and this project's engine modules only (no Ray, MLflow,
gguf, math-verify, vLLM or tqdm of ours), so a node with just a CUDA torch and transformers runs it
from a checkout:

    python -m jobs.gpu_probe --shape qwen2.5-7b --out probe.json
    python -m jobs.gpu_probe --shape all --budget-s 280 --out probe.json
    python -m jobs.gpu_probe --shape qwen2.5-7b --plan-only [key=value ...]   (no model built)

What it cannot answer is listed in the JSON (`cannot_answer`). `--shape tiny --device cpu` runs
in `make test`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.engine.batching import run_continuous, run_static
from pipeline.engine.generation import GenerationRequest, Generator, head_logits
from pipeline.engine.memory import (
    GIB,
    H100_GIB,
    ModelShape,
    Workload,
    plan_memory,
    shape_config,
    shape_names,
)
from pipeline.method.latent import latent_step

PAPER_SHAPES = ["qwen2.5-1.5b", "qwen2.5-7b", "qwen2-7b", "llama-3.1-8b", "qwen2.5-14b"]
NO_STOP = frozenset({-1})  # a stop set no token is in: rows decode their whole budget
BUSY_STEPS = 20
CANNOT_ANSWER = [
    "trained-model agreement: the weights are random, so near-ties (and batch-vs-alone "
    "divergences) are far more frequent than in a trained model, and no answer can be graded; "
    "`make gpu-check ARGS='--model DIR'` checks a real instruct model",
    "vLLM against the native engine on this GPU: the probe imports no vLLM; `make gpu-check` "
    "adds vLLM rows where vLLM is installed",
    "tensor parallelism and more than one GPU",
    "prompts of real length distributions: every prompt here has --prompt-tokens tokens",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="latentseek gpu-probe", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        default="qwen2.5-7b",
        help=f"a shape, a comma-separated list, or 'all' (the paper's five); shipped: "
        f"{', '.join(shape_names())}",
    )
    ap.add_argument("--device", default="", help="cuda (default where there is one) or cpu")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    ap.add_argument("--plan-only", action="store_true", help="print the memory plan only")
    ap.add_argument("--budget-s", type=float, default=280.0, help="wall-clock budget, all shapes")
    ap.add_argument("--batches", default="", help="batch sizes (default 1,32,128,256; cpu 1,4)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="default 128 (cpu 16)")
    ap.add_argument("--new-tokens", type=int, default=0, help="default 128 (cpu 16)")
    ap.add_argument("--update-length", type=int, default=200, help="U of the latent step")
    ap.add_argument("--invariant-rows", type=int, default=8, help="rows for the invariants")
    ap.add_argument(
        "--device-memory-gib",
        type=float,
        default=0.0,
        help=f"the device's size for --plan-only (default: the CUDA device, else an 80 GB "
        f"H100: {H100_GIB} GiB)",
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="run config (--plan-only)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.batches = [
        int(b) for b in (args.batches or ("1,32,128,256" if on_gpu else "1,4")).split(",")
    ]
    args.prompt_tokens = args.prompt_tokens or (128 if on_gpu else 16)
    args.new_tokens = args.new_tokens or (128 if on_gpu else 16)
    if args.shape == "all":
        args.shapes = list(PAPER_SHAPES)
    else:
        args.shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    for name in args.shapes:
        try:
            shape_config(name)
        except ValueError as exc:  # an unknown shape stops here, with the list
            ap.error(str(exc))
    return args


# --- the machine ---------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GIB, 2),
            "capability": f"{props.major}.{props.minor}",
            "driver": _driver(),
            "gpus": torch.cuda.device_count(),
        }
    return info


def _driver() -> str:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    """GiB allocated at most since the last reset (None on the CPU: not measured)."""
    if device.type != "cuda":
        return None
    _sync(device)
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3)


# --- the model -----------------------------------------------------------------------------
def build(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A random-weight causal LM of `config`'s shape, built on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keep = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    hf_config = AutoConfig.for_model(**keep)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def stand_in_tokenizer(config: dict[str, Any]) -> SimpleNamespace:
    """What the engine asks of a tokenizer: its EOS and padding ids (no text is ever decoded)."""
    eos = config.get("eos_token_id", 0)
    return SimpleNamespace(eos_token_id=eos, pad_token_id=0)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def requests(prompts: list[list[int]], new_tokens: int, capture: int = 0) -> list[Any]:
    return [GenerationRequest(p, new_tokens, stop_ids=NO_STOP, capture=capture) for p in prompts]


# --- the measurements ----------------------------------------------------------------------
def decode_rates(gen: Generator, model: Any, args: argparse.Namespace, vocab: int,
                 deadline: float) -> dict[str, Any]:  # fmt: skip
    """Native engine and HF `generate` tokens/s per batch size (prefill included in both), and
    the peak GiB of the native runs (against the memory plan at the largest batch)."""
    device, rows, n, peaks = gen.device, [], args.new_tokens, []
    gen.generate(requests(random_prompts(1, args.prompt_tokens, vocab, 1), 2))  # warm-up
    for b in args.batches:
        if time.monotonic() > deadline:
            rows.append({"batch": b, "skipped": "budget"})
            continue
        prompts = random_prompts(b, args.prompt_tokens, vocab, seed=b)
        row: dict[str, Any] = {"batch": b}
        try:
            _peak_reset(device)
            start = time.perf_counter()
            out = gen.generate(requests(prompts, n))
            _sync(device)
            native = time.perf_counter() - start
            if any(len(r.tokens) != n for r in out):
                raise RuntimeError("a row stopped before its budget")
            peaks.append(_peak(device))
            row |= {"native_tokens_per_s": round(b * n / native, 1), "native_peak_gib": peaks[-1]}
            if time.monotonic() < deadline:
                _peak_reset(device)
                hf = _hf_generate_seconds(model, prompts, n, device)
                row |= {
                    "hf_generate_tokens_per_s": round(b * n / hf, 1),
                    "hf_generate_peak_gib": _peak(device),
                    "native_vs_hf": round(hf / native, 3),
                }
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
    measured = [p for p in peaks if p is not None]
    return {"rows": rows, "peak_gib": max(measured) if measured else None}


def _hf_generate_seconds(
    model: Any, prompts: list[list[int]], n: int, device: torch.device
) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, min_new_tokens=n)
    with torch.no_grad():
        model.generate(
            input_ids=ids[:, :8],
            max_new_tokens=2,
            **(kw | {"attention_mask": mask[:, :8], "min_new_tokens": 2}),
        )
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=n, **kw)
        _sync(device)
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - start


def busy_fraction(gen: Generator, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """The GPU's kernel time (the union of the kernels' intervals, from the profiler) over 20
    decode steps, against the wall time of 20 steps run without the profiler (whose host-side
    tracing would slow the host and understate the fraction)."""
    if gen.device.type != "cuda":
        return {"skipped": "no CUDA device"}
    from torch.profiler import ProfilerActivity, profile

    b = min(32, max(args.batches))
    prompts = random_prompts(b, args.prompt_tokens, vocab, 7)
    batch, _ = gen.open(requests(prompts, 2 * BUSY_STEPS + 2))
    batch.step()  # warm
    _sync(gen.device)
    start = time.perf_counter()
    for _ in range(BUSY_STEPS):
        batch.step()
    _sync(gen.device)
    wall_us = (time.perf_counter() - start) * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(BUSY_STEPS):
            batch.step()
        _sync(gen.device)
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for s, e in spans:  # the union of the kernels' intervals
        if e > end:
            busy += e - max(s, end)
            end = e
    if not spans:  # no device events listed: the operators' own device time instead
        busy = sum(e.self_device_time_total for e in prof.key_averages())
    return {
        "batch": b,
        "steps": BUSY_STEPS,
        "wall_ms": round(wall_us / 1e3, 2),
        "gpu_kernel_ms": round(busy / 1e3, 2),
        "kernels": len(spans),
        "gpu_busy_fraction": round(min(1.0, busy / wall_us), 3),
    }


@torch.no_grad()
def invariants(gen: Generator, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """On `prompts`, each decoded for `n` tokens (stops disabled) with z captured:
    argmax(head(z_t)) == x_t; the captured z against one full prefill's over prompt + tokens;
    each row in the batch against the same row alone (first divergence, top-2 gap there)."""
    batched = gen.generate(requests(prompts, n, capture=n))
    head, dtype, device = gen.lm_head, gen.lm_head.weight.dtype, gen.device
    own = prefill_own = positions = 0
    diffs: list[torch.Tensor] = []
    parted = []
    for i, (p, row) in enumerate(zip(prompts, batched)):
        tokens = torch.tensor(row.tokens, device=device)  # [n]
        captured = row.hidden.to(device)  # [n, D] float32
        own += int((head_logits(head, captured.to(dtype)).argmax(-1) == tokens).sum())
        # One forward over prompt + tokens: z at the positions that predicted each token.
        ids = torch.tensor([[*p, *row.tokens[:-1]]], device=device)
        prefill_z = gen.backbone(input_ids=ids).last_hidden_state[0, len(p) - 1 :].float()
        prefill_own += int((head_logits(head, prefill_z.to(dtype)).argmax(-1) == tokens).sum())
        diffs.append((captured - prefill_z).norm(dim=-1) / prefill_z.norm(dim=-1).clamp(min=1e-6))
        positions += len(row.tokens)
        alone = gen.generate(requests([p], n, capture=n))[0]
        pairs = zip(alone.tokens, row.tokens)
        first = next((t for t, (a, b) in enumerate(pairs) if a != b), None)
        if first is not None:
            logits = head_logits(head, alone.hidden[first].to(device, dtype)).float()
            top2 = logits.topk(2).values
            parted.append(
                {"row": i, "first_divergence": first, "top2_gap": float(top2[0] - top2[1])}
            )
    diff = torch.cat(diffs)
    return {
        "rows": len(prompts),
        "tokens_per_row": n,
        "argmax_head_z_equals_token_rate": own / positions,
        "prefill_z_argmax_equals_token_rate": prefill_own / positions,
        "captured_vs_prefill_z_relative_diff_max": float(diff.max()),
        "captured_vs_prefill_z_relative_diff_mean": float(diff.mean()),
        "batch_vs_alone_rows_diverged": len(parted),
        "batch_vs_alone": parted,
        "note": "the prefill z is what a backend that decodes elsewhere (vLLM) and prefills on "
        "the HF model would capture; its argmax rate below 1 is the failure of issue 26 item 2",
    }


def _two_stage_tasks(prompts: list[list[int]], n: int) -> list[Any]:
    """Tasks shaped like LatentSeek's: a CoT of a varying length, then a continuation after a
    forced prefix of its first quarter."""

    def task(i: int, p: list[int]):  # noqa: ANN202 - a task generator
        length = max(2, n // 2 + (i * 7919) % (n // 2 + 1))
        (cot,) = yield [GenerationRequest(p, length, stop_ids=NO_STOP, keep_prompt_state=True)]
        prefix = cot.tokens[: max(1, length // 4)]
        yield [GenerationRequest(p, n, prefix_ids=prefix, prompt_state=cot.prompt_state,
                                 stop_ids=NO_STOP)]  # fmt: skip

    return [task(i, p) for i, p in enumerate(prompts)]


def batching_peaks(gen: Generator, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Peak GiB of static rounds against continuous batching on the same two-stage tasks."""
    b = max(args.batches)
    prompts = random_prompts(b, args.prompt_tokens, vocab, seed=13)
    out: dict[str, Any] = {"tasks": b, "max_rows": b}
    for name in ("static", "continuous"):
        tasks = _two_stage_tasks(prompts, args.new_tokens)
        gc.collect()
        if gen.device.type == "cuda":
            torch.cuda.empty_cache()
        _peak_reset(gen.device)
        start = time.perf_counter()
        if name == "static":
            run_static(gen, tasks)
        else:
            run_continuous(gen, tasks, b)
        _sync(gen.device)
        out[name] = {
            "seconds": round(time.perf_counter() - start, 3),
            "peak_gib": _peak(gen.device),
        }
    return out


def latent(gen: Generator, args: argparse.Namespace, hidden: int) -> dict[str, Any]:
    """One latent step on U random hidden states of the model's width."""
    device, u = gen.device, args.update_length
    z = torch.randn((1, u, hidden), device=device, generator=torch.Generator(device).manual_seed(5))
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.03)
    reward = torch.tensor([-1.0], device=device)
    _peak_reset(device)
    before = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    with torch.enable_grad():
        latent_step(z, None, reward, gen.logits, opt)  # warm
        _sync(device)
        start = time.perf_counter()
        out = latent_step(z, None, reward, gen.logits, opt)
        _sync(device)
    peak = _peak(device)
    return {
        "update_length": u,
        "vocab": gen.lm_head.weight.shape[0],
        "seconds": round(time.perf_counter() - start, 4),
        "finite": bool(out.finite.all()),
        "tokens_changed": int(out.tokens_changed[0]),
        "extra_peak_gib": round(peak - before, 3)
        if peak is not None and before is not None
        else None,
    }


def probe_shape(name: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    config = shape_config(name)
    shape = ModelShape.from_config(config, name)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    load = Workload(rows=max(args.batches), prompt_tokens=args.prompt_tokens,
                    answer_tokens=args.new_tokens, verifier_tokens=0,
                    update_length=args.update_length, task_problems=0)  # fmt: skip
    plan = plan_memory(shape, args.dtype, load)
    result: dict[str, Any] = {
        "parameters": shape.parameters(),
        "plan": {
            "lines": plan.lines(),
            "total_gib": round(plan.total / GIB, 3),
            "items_gib": {w: round(b / GIB, 3) for w, b, _ in plan.items},
        },  # fmt: skip
    }
    start = time.perf_counter()
    _peak_reset(device)
    model = build(config, device, dtype)
    result["build_seconds"] = round(time.perf_counter() - start, 2)
    result["weights_gib_measured"] = _peak(device)
    try:
        measure(result, Generator(model, stand_in_tokenizer(config)), model, shape, args, deadline)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def measure(result: dict[str, Any], gen: Generator, model: Any, shape: ModelShape,
            args: argparse.Namespace, deadline: float) -> None:  # fmt: skip
    """Every section into `result`, in order, each skipped once the deadline has passed."""
    vocab = shape.vocab
    invariant_prompts = random_prompts(args.invariant_rows, args.prompt_tokens, vocab, seed=11)
    sections = [
        ("decode", lambda: decode_rates(gen, model, args, vocab, deadline)),
        ("invariants", lambda: invariants(gen, invariant_prompts, args.new_tokens)),
        ("busy", lambda: busy_fraction(gen, args, vocab)),
        ("batching_peak", lambda: batching_peaks(gen, args, vocab)),
        ("latent_step", lambda: latent(gen, args, shape.hidden)),
    ]
    for key, run in sections:
        if time.monotonic() > deadline:
            result[key] = {"skipped": "budget"}
            continue
        try:
            result[key] = run()
        except torch.cuda.OutOfMemoryError as exc:  # a size this device cannot hold
            result[key] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    measured = result["decode"].get("peak_gib") if isinstance(result["decode"], dict) else None
    if measured is not None:
        planned = result["plan"]["total_gib"] - result["plan"]["items_gib"]["runtime"]
        result["plan"]["measured_peak_gib"] = measured
        result["plan"]["planned_without_runtime_gib"] = round(planned, 3)
        result["plan"]["planned_over_measured"] = round(planned / measured, 3)


def plan_only(args: argparse.Namespace) -> int:
    """Print the memory plan of each shape, for both backends, under the run config given."""
    from pipeline.config import load_config
    from pipeline.engine.memory import workload

    cfg = load_config(None, args.overrides)
    if args.device_memory_gib:
        size, where = (
            args.device_memory_gib * GIB,
            f"--device-memory-gib {args.device_memory_gib:g}",
        )
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        size, where = props.total_memory, props.name
    else:
        size, where = H100_GIB * GIB, "an 80 GB H100"
    dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype
    for name in args.shapes:
        for backend in ("native", "vllm"):
            shape = ModelShape.from_config(shape_config(name), name)
            plan = plan_memory(shape, dtype, workload(cfg), backend, int(size), where)
            print("\n".join(plan.lines()), end="\n\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        return plan_only(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-probe: no CUDA device here; --device cpu runs it on the CPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    report: dict[str, Any] = {
        "machine": machine(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overrides")},
        "shapes": {},
        "cannot_answer": CANNOT_ANSWER,
    }
    report["settings"]["dtype"] = args.dtype
    for i, name in enumerate(args.shapes):
        left = args.budget_s - (time.monotonic() - started)
        deadline = time.monotonic() + left / (len(args.shapes) - i)
        if left <= 0:
            report["shapes"][name] = {"skipped": "budget"}
            continue
        print(f"gpu-probe: {name} ({left:.0f} s left)", file=sys.stderr)
        report["shapes"][name] = probe_shape(name, args, deadline)
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"gpu-probe: wrote {args.out} ({report['seconds']} s)", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
