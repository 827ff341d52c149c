"""`make gpu-check`: a verdict on a machine with GPUs, written to a JSON file.

1. The reference: `--model` (default the embedded SmolLM2; give a real instruct model, e.g.
   `--model /models/Qwen2.5-7B-Instruct`) in float32 answers `--problems` GSM8K problems (greedy
   CoT) on `--reference-device` (default: the device under test; the CPU for the embedded model).
2. The same model on one GPU in bfloat16 (G = 1), through the engine:
   - the gate: the same *final answer* (the extracted answer, not only the same grade) as the
     reference on at least `--min-same-answer` of the problems, over at least `--min-problems`
     (64) problems: fewer give no verdict (exit 3);
   - teacher-forced top-1 agreement with the reference along its answers (`--min-agreement`);
   - the engine's invariants (`jobs.gpu_probe.invariants`, on the problems' prompts):
     `argmax(head(z_t)) == x_t` must hold at every captured position; the full-prefill z, and
     batch-vs-alone divergences with their top-2 gaps, are reported;
   - tokens/s of the engine against `model.generate`, like for like: the same prompts, every row
     decoding exactly `--max-new-tokens` (stops disabled in both), batch 1 and `--problems`.
3. backend=vllm, when vLLM is importable: its answers against the reference (the same gate).
4. With two GPUs or more, a tensor-parallel replica (G = 2, `shard_backend=deepspeed`: SmolLM2's
   9 heads do not divide by 2 for transformers) through the real pipeline (Ray, placement
   group, NCCL): its answers, and its own teacher-forced agreement.

Everything measured goes to `--out` (JSON). Exit status 1 when a check misses its tolerance
(listed at the end), 2 when there is no GPU, 3 when there were too few problems for a verdict.
`--device cpu` runs the same steps on the CPU (the tests do, in float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config

MIN_AGREEMENT = 0.95  # teacher-forced top-1 agreement with the float32 predictions
MIN_SAME_ANSWER = 0.9  # problems whose extracted final answer is the float32 reference's
MIN_PROBLEMS = 64  # fewer problems give no verdict: one differing answer would be 2 % or more
INVARIANT_ROWS = 8


@dataclass
class Variant:
    name: str
    answers: list[str]  # extracted final answers
    correct: list[bool]
    predictions: list[list[int]]  # teacher-forced top-1 along each reference answer
    tokens_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # invariants, like-for-like rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="model= of the run config (a real one)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--reference-device", default="", choices=["", "cuda", "cpu"],
                    help="where float32 runs (default: --device; cpu for the embedded model)")  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--problems", type=int, default=MIN_PROBLEMS)
    ap.add_argument("--min-problems", type=int, default=MIN_PROBLEMS)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu-check.json"))
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows")
    ap.add_argument(
        "--tensor-parallel",
        default="",
        help="comma-separated G values (default: 1, and 2 when there are two GPUs)",
    )
    ap.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT)
    ap.add_argument("--min-same-answer", type=float, default=MIN_SAME_ANSWER)
    return ap.parse_args(argv)


@torch.no_grad()
def predictions(model: Any, device: torch.device, sequences: list[list[int]],
                starts: list[int]) -> list[list[int]]:  # fmt: skip
    """Top-1 next-token predictions at the answer positions of each sequence (teacher-forced)."""
    out = []
    for seq, start in zip(sequences, starts):
        logits = model(input_ids=torch.tensor([seq], device=device)).logits[0]  # [L, V]
        out.append(logits[start - 1 : -1].argmax(-1).tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def engine_checks(solver: Any, prompts: list[list[int]], new_tokens: int,
                  problems: int) -> dict[str, Any]:  # fmt: skip
    """On the solver's model: the engine's invariants on the problems' prompts
    (`jobs.gpu_probe.invariants`) and, like for like, the engine's tokens/s against
    `model.generate` with every row decoding exactly `new_tokens` (stops disabled in both) at
    batch 1 and `problems`."""
    from types import SimpleNamespace

    from jobs.gpu_probe import decode_rates, invariants
    from pipeline.engine.generation import Generator

    model = solver.loaded.model
    gen = Generator(model, solver.tokenizer)
    checks = {"invariants": invariants(gen, prompts[:INVARIANT_ROWS], min(new_tokens, 64))}
    plan = SimpleNamespace(batches=sorted({1, problems}), prompt_tokens=128, new_tokens=new_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    checks["decode"] = decode_rates(gen, model, plan, vocab, deadline=float("inf"))
    return checks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_variant(name: str, cfg: Config, problems: list[Any], sequences: list[list[int]],
                   starts: list[int]) -> tuple[Variant, Any]:  # fmt: skip
    from pipeline.method.solver import Solver

    solver = Solver.from_config(cfg)
    solver.run("cot", problems[:1])  # warm-up
    _sync(solver.loaded.device)
    start = time.perf_counter()
    results = solver.run("cot", problems)
    _sync(solver.loaded.device)
    seconds = time.perf_counter() - start
    generated = sum(r.compute.solver_generated_tokens for r in results)
    variant = Variant(
        name,
        [r.final_extracted or "" for r in results],
        [r.final_correct for r in results],
        predictions(solver.loaded.model, solver.loaded.device, sequences, starts),
        generated / seconds,
    )
    return variant, solver


def vllm_variant(cfg: Config, problems: list[Any]) -> Variant:
    """backend=vllm on the same problems: answers only (its logits are not the HF model's)."""
    from pipeline.method.solver import Solver

    solver = Solver.from_config(cfg.replace(backend="vllm"))
    try:
        results = solver.run("cot", problems)
    finally:
        close = getattr(solver.backend, "close", None)
        if close:
            close()
    return Variant(
        f"{cfg.device} {cfg.dtype} G=1 vllm",
        [r.final_extracted or "" for r in results],
        [r.final_correct for r in results],
        [],
    )


def _rank_predictions(
    cfg: Config, sequences: list[list[int]], starts: list[int]
) -> list[list[int]]:
    """`predictions` on this rank's shard (run on every rank by `run_on_ranks`)."""
    from pipeline.engine.model import load_model

    loaded = load_model(cfg)
    return predictions(loaded.model, loaded.device, sequences, starts)


def replica_variant(cfg: Config, problems: list[Any], sequences: list[list[int]],
                    starts: list[int]) -> Variant:  # fmt: skip
    """G = cfg.tensor_parallel through the pipeline (answers), and through hand-made ranks
    (teacher-forced predictions)."""
    import ray

    from jobs.run import run_evaluation
    from pipeline.run.records import RecordStore
    from pipeline.run.workers import run_on_ranks

    gpu = cfg.device.startswith("cuda")
    world = cfg.tensor_parallel
    ray.init(address="local", num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as out:
            run_cfg = cfg.replace(output_dir=out, run_id=f"g{world}", workers=1,
                                  gpus_per_worker=1.0 if gpu else 0.0)  # fmt: skip
            summary = run_evaluation(run_cfg, progress=False, log=lambda m: None)
            rows = RecordStore(summary.run_dir).read_problems().set_index("problem_id")
            rows = rows.loc[[p.problem_id for p in problems]]
        if (rows["error"] != "").any():
            raise RuntimeError(f"G={world}: errors: {sorted(set(rows['error']))[:3]}")

        preds = run_on_ranks(run_cfg, _rank_predictions, sequences, starts)[0]
        return Variant(
            f"{cfg.device} {cfg.dtype} G={world} ({cfg.shard_backend})",
            [a if isinstance(a, str) else "" for a in rows["final_extracted"]],
            [bool(c) for c in rows["final_correct"]],
            preds,
        )
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        print("make gpu-check needs a CUDA device; this machine has none", file=sys.stderr)
        return 2
    worlds = [int(g) for g in args.tensor_parallel.split(",") if g.strip()] or (
        [1, 2] if gpus >= 2 else [1]
    )
    started = time.perf_counter()
    base, problems, prompts, sequences, starts, ref = reference_variant(args)
    device_cfg = base.replace(device=args.device, dtype=args.dtype, threads=0)
    variants = device_variants(args, device_cfg, worlds, problems, prompts, sequences, starts)
    vllm_note = "not installed"
    if args.no_vllm:
        vllm_note = "skipped (--no-vllm)"
    elif getattr(importlib.util.find_spec("vllm"), "origin", None):  # not a namespace folder
        try:
            variants.append(vllm_variant(device_cfg, problems))
            vllm_note = "run"
        except Exception as exc:  # noqa: BLE001 - reported as a failure, with its message
            vllm_note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    failures, rows = compare(args, ref, variants, len(problems))
    if vllm_note.startswith("failed"):
        failures.append(f"vllm: {vllm_note}")
    print_engine_summary(args, variants)
    print(f"vllm: {vllm_note}")
    decided = verdict(failures, len(problems), args.min_problems)
    print(f"\ntolerances: top-1 agreement >= {args.min_agreement}, same answer >= "
          f"{args.min_same_answer} over >= {args.min_problems} problems; took "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    for f in failures:
        print(f"FAILED {f}")
    print(f"verdict: {decided}")
    report = {
        "verdict": decided,
        "failures": failures,
        "model": args.model,
        "problems": len(problems),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "vllm": vllm_note,
        "variants": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    from jobs.gpu_probe import machine

    report["machine"] = machine(torch.device(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return {"pass": 0, "fail": 1}.get(decided, 3)


def reference_variant(args: argparse.Namespace) -> tuple[Config, list[Any], list[list[int]],
                                                          list[list[int]], list[int], Variant]:  # fmt: skip
    """Greedy CoT in float32 on the reference device (the CPU for the embedded model): the
    config, problems, prompts, prompt+answer token sequences, answer starts and its Variant."""
    from pipeline.data import load_dataset
    from pipeline.method.solver import Solver

    ref_device = args.reference_device or ("cpu" if args.model == "embedded" else args.device)
    base = Config(model=args.model, method=["cot"], reward="psrm", limit=args.problems,
                  batch_size=args.problems, max_new_tokens=args.max_new_tokens,
                  device=ref_device, dtype="float32",
                  threads=os.cpu_count() or 1)  # fmt: skip
    problems = list(load_dataset(base).problems)
    print(f"reference: {args.model}, {len(problems)} GSM8K problems, {ref_device} float32, "
          f"greedy CoT, {args.max_new_tokens} tokens at most")  # fmt: skip
    reference = Solver.from_config(base)
    ref_results = reference.run("cot", problems)
    prompts = [reference.prompt(p)[0] for p in problems]
    answers = [reference.tokenizer(r.cot_answer, add_special_tokens=False)["input_ids"]
               for r in ref_results]  # fmt: skip
    sequences = [p + a for p, a in zip(prompts, answers) if a]
    starts = [len(p) for p, a in zip(prompts, answers) if a]
    ref = Variant(
        f"reference ({ref_device} float32 G=1)",
        [r.final_extracted or "" for r in ref_results],
        [r.final_correct for r in ref_results],
        predictions(reference.loaded.model, reference.loaded.device, sequences, starts),
    )
    return base, problems, prompts, sequences, starts, ref


def device_variants(args: argparse.Namespace, device_cfg: Config, worlds: list[int],
                    problems: list[Any], prompts: list[list[int]], sequences: list[list[int]],
                    starts: list[int]) -> list[Variant]:  # fmt: skip
    """The engine on the device for each tensor-parallel world: G=1 in process (with its decode
    and invariant checks), G>1 as DeepSpeed replicas."""
    variants: list[Variant] = []
    for world in worlds:
        if world == 1:
            name = f"{args.device} {args.dtype} G=1"
            variant, solver = engine_variant(name, device_cfg, problems, sequences, starts)
            variant.extra = engine_checks(solver, prompts, args.max_new_tokens, len(problems))
            del solver
        else:
            cfg = device_cfg.replace(tensor_parallel=world, shard_backend="deepspeed",
                                     threads=1 if args.device == "cpu" else 0)  # fmt: skip
            variant = replica_variant(cfg, problems, sequences, starts)
        variants.append(variant)
    return variants


def compare(args: argparse.Namespace, ref: Variant, variants: list[Variant],
            n: int) -> tuple[list[str], list[dict[str, Any]]]:  # fmt: skip
    """Each variant against the reference, printed as a table: the failed tolerances and the
    JSON rows."""
    failures, rows = [], []
    print(f"\n{'variant':34s} {'top-1 agree':>11s} {'same answer':>11s} {'same grade':>10s} "
          f"{'correct':>7s} {'tokens/s':>9s}")  # fmt: skip
    for v in [ref, *variants]:
        top1 = agreement(v.predictions, ref.predictions) if v.predictions else None
        same = sum(a == b for a, b in zip(v.answers, ref.answers)) / n
        grade = sum(a == b for a, b in zip(v.correct, ref.correct)) / n
        speed = f"{v.tokens_per_s:9.0f}" if v.tokens_per_s else f"{'':9s}"
        shown = f"{top1:11.3f}" if top1 is not None else f"{'n/a':>11s}"
        print(f"{v.name:34s} {shown} {same:11.3f} {grade:10.3f} "
              f"{sum(v.correct):4d}/{n:<2d} {speed}")  # fmt: skip
        kept = {k: x for k, x in asdict(v).items() if k != "predictions"}  # token ids: long
        rows.append({**kept, "top1_agreement": top1, "same_answer": same, "same_grade": grade})
        if v is ref:
            continue
        if top1 is not None and top1 < args.min_agreement:
            failures.append(f"{v.name}: top-1 agreement {top1:.3f} < {args.min_agreement}")
        if same < args.min_same_answer:
            failures.append(f"{v.name}: same answer {same:.3f} < {args.min_same_answer}")
        inv = v.extra.get("invariants")
        if inv and inv["argmax_head_z_equals_token_rate"] < 1.0:
            rate = inv["argmax_head_z_equals_token_rate"]
            failures.append(f"{v.name}: argmax(head(z_t)) == x_t at {rate:.4f} of positions < 1")
    return failures, rows


def print_engine_summary(args: argparse.Namespace, variants: list[Variant]) -> None:
    """The G=1 engine's decode speed against model.generate, and its invariants."""
    engine = variants[0].extra.get("decode", {}) if variants else {}
    for r in engine.get("rows", []):
        if "hf_generate_tokens_per_s" in r:
            print(f"engine {r['native_tokens_per_s']:.0f} tokens/s vs model.generate "
                  f"{r['hf_generate_tokens_per_s']:.0f} tokens/s at batch {r['batch']}, "
                  f"{args.max_new_tokens} tokens every row ({r['native_vs_hf']:.2f}x)")  # fmt: skip
    inv = variants[0].extra.get("invariants") if variants else None
    if inv:
        print(f"invariants: argmax(head(z_t)) == x_t {inv['argmax_head_z_equals_token_rate']:.4f}; "
              f"full-prefill z {inv['prefill_z_argmax_equals_token_rate']:.4f}; rows that part "
              f"from their alone run {inv['batch_vs_alone_rows_diverged']}/{inv['rows']}")  # fmt: skip


def verdict(failures: list[str], problems: int, min_problems: int) -> str:
    """'fail' when a check missed (whatever the count), 'pass' when none did over at least
    `min_problems` problems, else no verdict ('none: ...')."""
    if failures:
        return "fail"
    if problems < min_problems:
        return f"none: {problems} problems < --min-problems {min_problems}"
    return "pass"


if __name__ == "__main__":
    sys.exit(main())
