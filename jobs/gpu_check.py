"""`make gpu-check`: one short check (under 5 minutes) for a machine with GPUs.

1. The reference: the embedded model on the CPU in float32 answers N GSM8K problems (greedy CoT).
2. The same model on one GPU in bfloat16 (G = 1), through the engine:
   - answers the same problems (answer and correctness agreement with the reference, reported);
   - predicts the next token along each reference answer (teacher-forced): the top-1 agreement
     with the CPU's predictions on the same inputs is the numerical check (`--min-agreement`);
   - tokens/s of the engine against `model.generate` on the same GPU, the same prompts.
3. With two GPUs or more, a tensor-parallel replica (G = 2, `shard_backend=deepspeed`: SmolLM2's
   9 heads do not divide by 2 for transformers) through the real pipeline (Ray, placement
   group, NCCL): its answers, and its own teacher-forced agreement.

Exit status 1 when a check misses its tolerance (listed at the end), 2 when there is no GPU.
`--device cpu` runs the same steps on the CPU (what `make test` does, in float32, to keep the
script working on machines without a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import Config

MIN_AGREEMENT = 0.95  # teacher-forced top-1 agreement with the CPU float32 predictions
MIN_CORRECT_AGREEMENT = 0.75  # problems graded the same (right or wrong) as on the CPU


@dataclass
class Variant:
    name: str
    answers: list[str]  # extracted final answers
    correct: list[bool]
    predictions: list[list[int]]  # teacher-forced top-1 along each reference answer
    tokens_per_s: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument(
        "--tensor-parallel",
        default="",
        help="comma-separated G values (default: 1, and 2 when there are two GPUs)",
    )
    ap.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT)
    ap.add_argument("--min-correct-agreement", type=float, default=MIN_CORRECT_AGREEMENT)
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


def generate_tokens_per_s(solver: Any, prompts: list[list[int]], n: int) -> float:
    """`model.generate` (greedy, its own cache) on the prompts as one left-padded batch, `n`
    tokens each (EOS ignored), after a warm-up."""
    tok, model, device = solver.tokenizer, solver.loaded.model, solver.loaded.device
    from jobs.bench.rows import left_padded

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_padded(prompts, pad, device)

    def run(k: int) -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=pad)  # fmt: skip

    run(2)
    _sync(device)
    start = time.perf_counter()
    run(n)
    _sync(device)
    return len(prompts) * n / (time.perf_counter() - start)


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
    ray.init(num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False,
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
    from pipeline.data import load_dataset
    from pipeline.method.solver import Solver

    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        print("make gpu-check needs a CUDA device; this machine has none", file=sys.stderr)
        return 2
    worlds = [int(g) for g in args.tensor_parallel.split(",") if g.strip()] or (
        [1, 2] if gpus >= 2 else [1]
    )
    started = time.perf_counter()
    base = Config(method=["cot"], reward="psrm", limit=args.problems, batch_size=args.problems,
                  max_new_tokens=args.max_new_tokens, device="cpu", dtype="float32",
                  threads=os.cpu_count() or 1)  # fmt: skip
    problems = list(load_dataset(base).problems)
    print(f"reference: {len(problems)} GSM8K problems, CPU float32, greedy CoT, "
          f"{args.max_new_tokens} tokens at most")  # fmt: skip
    reference = Solver.from_config(base)
    ref_results = reference.run("cot", problems)
    prompts = [reference.prompt(p)[0] for p in problems]
    answers = [reference.tokenizer(r.cot_answer, add_special_tokens=False)["input_ids"]
               for r in ref_results]  # fmt: skip
    sequences = [p + a for p, a in zip(prompts, answers) if a]
    starts = [len(p) for p, a in zip(prompts, answers) if a]
    ref = Variant(
        "reference (cpu float32 G=1)",
        [r.final_extracted or "" for r in ref_results],
        [r.final_correct for r in ref_results],
        predictions(reference.loaded.model, reference.loaded.device, sequences, starts),
    )
    del reference

    device_cfg = base.replace(device=args.device, dtype=args.dtype, threads=0)
    variants: list[Variant] = []
    ceiling = 0.0
    for world in worlds:
        if world == 1:
            name = f"{args.device} {args.dtype} G=1"
            variant, solver = engine_variant(name, device_cfg, problems, sequences, starts)
            ceiling = generate_tokens_per_s(solver, prompts, args.max_new_tokens)
            del solver
        else:
            cfg = device_cfg.replace(tensor_parallel=world, shard_backend="deepspeed",
                                     threads=1 if args.device == "cpu" else 0)  # fmt: skip
            variant = replica_variant(cfg, problems, sequences, starts)
        variants.append(variant)

    failures = []
    print(f"\n{'variant':34s} {'top-1 agree':>11s} {'same answer':>11s} {'same grade':>10s} "
          f"{'correct':>7s} {'tokens/s':>9s}")  # fmt: skip
    for v in [ref, *variants]:
        top1 = agreement(v.predictions, ref.predictions)
        same = sum(a == b for a, b in zip(v.answers, ref.answers)) / len(problems)
        grade = sum(a == b for a, b in zip(v.correct, ref.correct)) / len(problems)
        speed = f"{v.tokens_per_s:9.0f}" if v.tokens_per_s else f"{'':9s}"
        print(f"{v.name:34s} {top1:11.3f} {same:11.3f} {grade:10.3f} "
              f"{sum(v.correct):4d}/{len(problems):<2d} {speed}")  # fmt: skip
        if v is ref:
            continue
        if top1 < args.min_agreement:
            failures.append(f"{v.name}: top-1 agreement {top1:.3f} < {args.min_agreement}")
        if grade < args.min_correct_agreement:
            failures.append(f"{v.name}: same grade {grade:.3f} < {args.min_correct_agreement}")
    if ceiling and variants and variants[0].tokens_per_s:
        engine = variants[0].tokens_per_s
        print(f"\nengine {engine:.0f} tokens/s vs model.generate {ceiling:.0f} tokens/s on "
              f"{args.device} ({engine / ceiling:.2f}x; the engine stops rows at EOS, "
              f"generate runs every row to {args.max_new_tokens} tokens)")  # fmt: skip
    print(f"\ntolerances: top-1 agreement >= {args.min_agreement}, same grade >= "
          f"{args.min_correct_agreement}; took {time.perf_counter() - started:.0f} s")  # fmt: skip
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
