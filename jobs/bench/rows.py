"""What each row runs, inside its child process (`jobs.bench.child`).

- `engine`: `Solver.run(method, task)` over tasks of `cfg.problems_per_task` problems, the way
  a worker is sent them (static: tasks of `batch_size`; continuous: `task_size` or 4 x
  `batch_size`), with `cfg.batching` and `cfg.dtype` as given. The static vs continuous and the
  bf16 rows are this function with another config.
- `naive`: `pipeline/method/reference.py`, the reference cost structure: one problem at a time, no KV
  cache, a full forward per generated token, the four self-reward verifiers one after another.
- `ceiling`: plain batched greedy `model.generate` (its own KV cache) on the same prompts.
- `ray` (`jobs.bench.ray_row`) and `profile` (`jobs.bench.profile`) have their own modules.

Each returns a dict: `wall_s` (the timed work only), and for problem rows one entry per problem
in `rows` (answer, correctness, generated tokens, iterations).
"""

from __future__ import annotations

import time
from typing import Any

from jobs.bench.harness import rss_mb
from jobs.bench.settings import METHODS, method_config


def load_problems(cfg: Any) -> list[Any]:
    from pipeline.data import load_dataset

    return list(load_dataset(cfg).problems)


def make_solver(cfg: Any) -> Any:
    import torch

    from pipeline.method.solver import Solver

    solver = Solver.from_config(cfg)
    torch.manual_seed(cfg.seed)
    return solver


def prompt_ids(solver: Any, problem: Any) -> list[int]:
    from pipeline.benchmarks import prompt_suffix
    from pipeline.method.prompts import render_chat

    suffix = prompt_suffix(problem.dataset, solver.template.name)
    messages = solver.template.messages(problem.question, suffix)
    return render_chat(solver.tokenizer, messages, as_text=solver.rules.render_as_text)


def warm_up(solver: Any, prompt: list[int]) -> None:
    """One short untimed generation: first-call allocations are not charged to any row."""
    from pipeline.engine.generation import GenerationRequest

    solver.backend.generate([GenerationRequest(prompt, 4)])


def problem_row(problem_id: str, text: str, grade: Any, **fields: Any) -> dict:
    """One problem's outcome, as every row kind reports it."""
    row = {"problem_id": problem_id, "final_answer": text, "extracted": grade.extracted}
    row["correct"] = bool(grade.correct)
    defaults = {"iterations": 0, "stop_reason": "", "error": "", "verifier_generated": 0}
    return {**row, **defaults, **fields}


def _result(wall: float, rows: list[dict], rss_loaded: float, **extra: Any) -> dict:
    import torch

    return {
        "wall_s": wall,
        "problems": len(rows),
        "rows": rows,
        "rss_after_load_mb": rss_loaded,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def engine(cfg: Any, spec: dict) -> dict:
    method, _ = METHODS[spec["method"]]
    cfg = method_config(cfg, spec["method"])
    solver = make_solver(cfg)
    problems = load_problems(cfg)
    warm_up(solver, prompt_ids(solver, problems[0]))
    rss_loaded = rss_mb()
    size = cfg.problems_per_task
    rows, task_walls = [], []
    start = time.perf_counter()
    for t, i in enumerate(range(0, len(problems), size)):
        task_start = time.perf_counter()
        results = solver.run(method, problems[i : i + size])
        task_walls.append(time.perf_counter() - task_start)
        for r in results:
            c = r.compute
            rows.append(
                {
                    "problem_id": r.problem_id,
                    "final_answer": r.final_answer,
                    "extracted": r.final_extracted,
                    "correct": bool(r.final_correct),
                    "iterations": r.iterations,
                    "stop_reason": r.stop_reason,
                    "error": r.error,
                    "solver_generated": c.solver_generated_tokens,
                    "verifier_generated": c.verifier_generated_tokens,
                    "wall_s": task_walls[-1] / len(results),
                    "task": t,
                }
            )
    wall = time.perf_counter() - start
    extra = {"backend": solver.backend.name}
    if hasattr(solver.backend, "start_seconds"):  # a serving engine's start-up, not timed above
        extra["engine_start_s"] = solver.backend.start_seconds
    return _result(wall, rows, rss_loaded, task_walls=task_walls, dtype=str(solver.loaded.dtype),
                   **extra)  # fmt: skip


def _naive_self_reward(model: Any, tokenizer: Any, verifiers: Any, cfg: Any, style: str, eos):
    """SPEC §2 self-reward computed the naive way: the verifiers one by one, each decoded greedily
    without a cache (capped at `verifier_max_new_tokens`, like the engine), verdicts read from the
    generated text only. Returns (reward_fn(question) -> (text, gold) -> float, token counter)."""
    from pipeline.method.prompts import render_chat
    from pipeline.method.reference import naive_greedy
    from pipeline.method.rewards import combine_verdicts, has_format

    counter = {"generated": 0}
    weights = [v.weight for v in verifiers.verifiers]

    def for_question(question: str):
        def reward(text: str, gold: str) -> float:
            verdicts = []
            for v in verifiers.verifiers:
                prompt = render_chat(tokenizer, v.messages(question, text))
                tokens, _ = naive_greedy(model, prompt, cfg.verifier_budget, eos)
                counter["generated"] += len(tokens)
                out = tokenizer.decode(tokens, skip_special_tokens=True)
                verdicts.append(verifiers.parse_verdict(out))
            format_ok = not cfg.format_rule or has_format(text, style)
            return combine_verdicts(verdicts, weights, format_ok, verifiers.format_penalty)

        return reward

    return for_question, counter


def naive(cfg: Any, spec: dict) -> dict:
    """The naive loop; a LatentSeek row also returns each problem's CoT pass (timed on its own)
    as `rows[i]["cot"]`: the naive cot row on that problem, read off without a second run."""
    from jobs.reference import run_reference
    from pipeline.method import reference
    from pipeline.method.grading import grade

    method, reward_name = METHODS[spec["method"]]
    cfg = method_config(cfg, spec["method"])
    solver = make_solver(cfg)  # for the model, tokenizer and templates only
    model, tok, style = solver.loaded.model, solver.tokenizer, solver.style
    eos = reference.model_eos_ids(model, tok)
    problems = load_problems(cfg)
    reference.naive_greedy(model, prompt_ids(solver, problems[0]), 2, eos)  # warm-up
    rss_loaded = rss_mb()
    self_reward, counter = _naive_self_reward(model, tok, solver.verifiers, cfg, style, eos)
    rows = []
    start = time.perf_counter()
    for p in problems:
        t = time.perf_counter()
        prompt = prompt_ids(solver, p)
        before = counter["generated"]
        if method == "cot":
            tokens, _ = reference.naive_greedy(model, prompt, cfg.max_new_tokens, eos)
            text = tok.decode(tokens, skip_special_tokens=True)
            rows.append(
                problem_row(
                    p.problem_id,
                    text,
                    grade(text, p.gold, style),
                    solver_generated=len(tokens),
                    wall_s=time.perf_counter() - t,
                )
            )
            continue
        # PSRM: the reference loop's own (reward_fn None); self: the naive verifiers above
        fn = None if reward_name == "psrm" else self_reward(p.question)
        res = run_reference(cfg, solver.loaded, p, prompt, reward_fn=fn)
        cot = problem_row(
            p.problem_id,
            res.cot_text,
            grade(res.cot_text, p.gold, style),
            solver_generated=len(res.cot_tokens),
            wall_s=res.cot_seconds,
        )
        rows.append(
            problem_row(
                p.problem_id,
                res.final_text,
                grade(res.final_text, p.gold, style),
                iterations=res.iterations,
                stop_reason=res.stop_reason,
                solver_generated=len(res.cot_tokens) + sum(len(a) for a in res.answer_tokens),
                verifier_generated=counter["generated"] - before,
                wall_s=time.perf_counter() - t,
                cot=cot,
            )
        )
    return _result(time.perf_counter() - start, rows, rss_loaded, dtype=str(solver.loaded.dtype))


def left_padded(rows: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    """(input ids, attention mask) [B, L] of token rows left-padded to the longest, on `device`:
    the layout `model.generate` expects."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def ceiling(cfg: Any, spec: dict) -> dict:
    """Plain `model.generate` (greedy, its own KV cache) on left-padded batches of the same
    prompts: rows of `max_new_tokens` tokens (EOS ignored: min_new_tokens = max_new_tokens)
    until `total_tokens` tokens are generated."""
    import torch

    solver = make_solver(cfg)
    model, tok = solver.loaded.model, solver.tokenizer
    prompts = [prompt_ids(solver, p) for p in load_problems(cfg)]
    b = min(spec["batch_size"], len(prompts))  # the engine's batch as it ran: at most N rows
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def generate(rows: list[list[int]], n: int) -> int:
        ids, mask = left_padded(rows, pad, solver.loaded.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
            )
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    generate(prompts[:1], 2)  # warm-up
    rss_loaded = rss_mb()
    total, done, cursor = spec["total_tokens"], 0, 0
    start = time.perf_counter()
    while done < total:
        rows = [prompts[(cursor + i) % len(prompts)] for i in range(b)]
        cursor += b
        done += generate(rows, min(cfg.max_new_tokens, -(-(total - done) // b)))
    return {
        "wall_s": time.perf_counter() - start,
        "generated": done,
        "batch_size": b,
        "dtype": str(solver.loaded.dtype),
        "rss_after_load_mb": rss_loaded,
        "torch_threads": torch.get_num_threads(),
    }
