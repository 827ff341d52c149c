"""Tensor-parallel replicas on CPU with real components: G Ray actors (one per rank) joined in a
gloo process group, the model sharded by transformers' tp_plan or by DeepSpeed AutoTP, compared
with the same model unsharded (G = 1).

Two models: a tiny random Llama (4 heads, 2 KV heads: splits evenly over 2) saved with the
embedded tokenizer, and the embedded SmolLM2-135M (9 heads, 3 KV heads: transformers can split it
only over 3, DeepSpeed also over 2, as 5 + 4 heads)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs.run import RunError, run_evaluation
from pipeline.config import Config, ConfigError
from pipeline.engine.generation import GenerationRequest, Generator
from pipeline.engine.model import ModelError, embedded_gguf_path, gguf_cache_dir, load_model
from pipeline.engine.shards import ShardError, check_shardable
from pipeline.method.latent import latent_step
from pipeline.method.prompts import render_chat
from pipeline.run.records import RecordStore
from pipeline.run.workers import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent

# Tolerances seen (docs/cluster.md): hidden states differ by up to ~5e-5 (summation order of the
# all-reduce), the Z gradient by ~2e-6 relative.
Z_ATOL = 1e-3
GRAD_RTOL = 1e-3

# (model, backend, G): every backend on both models, at a G that splits each model.
CASES = [
    ("tiny", "transformers", 2),
    pytest.param("tiny", "deepspeed", 2, marks=pytest.mark.slow),
    pytest.param("embedded", "transformers", 3, marks=pytest.mark.slow),
    pytest.param("embedded", "deepspeed", 2, marks=pytest.mark.slow),
]


@pytest.fixture
def shard_ray(local_ray):
    """The session's local Ray (conftest: 3 CPUs, a replica of 3 ranks)."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer, saved as safetensors."""
    tokenizer_dir = gguf_cache_dir(embedded_gguf_path(), Config().model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.3,  # peaked logits: no near-ties for rounding to flip
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_spec(name: str, tiny_dir: Path) -> str:
    return str(tiny_dir) if name == "tiny" else "embedded"


def probe(cfg: Config) -> dict[str, Any]:
    """Greedy tokens and z_t of two GSM8K-style prompts, then one LatentSeek step on the first
    one's Z (reward -1): its gradient, the updated Z and the new prefix. Runs on whatever
    `load_model(cfg)` gives: the whole model, or this rank's shard."""
    loaded = load_model(cfg)
    gen = Generator(loaded.model, loaded.tokenizer)
    questions = [
        "Janet has 3 apples and buys 5 more. How many apples does she have?",
        "A train goes 60 km in an hour. How far does it go in 3 hours?",
    ]
    prompts = [render_chat(loaded.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    results = gen.generate(
        [GenerationRequest(prompt_ids=p, max_new_tokens=16, capture=6) for p in prompts]
    )
    z = results[0].hidden.clone()[None].requires_grad_(True)  # [1, U, D]
    optimizer = torch.optim.Adam([z], lr=0.03)
    step = latent_step(z, None, torch.tensor([-1.0]), gen.logits, optimizer)
    return {
        "tokens": [r.tokens for r in results],
        "z": results[0].hidden.numpy(),  # [U, D]
        "grad": z.grad.detach().numpy().copy(),
        "z_after": z.detach().numpy().copy(),
        "prefix": step.tokens.tolist(),
        "parameters": loaded.num_parameters,
    }


@pytest.mark.parametrize("model,backend,world", CASES)
def test_sharded_model_matches_the_whole_model(shard_ray, tiny_dir, model, backend, world):
    cfg = Config(model=model_spec(model, tiny_dir), device="cpu", dtype="float32")
    whole = probe(cfg)
    ranks = run_on_ranks(cfg.replace(tensor_parallel=world, shard_backend=backend), probe)
    assert len(whole["tokens"][0]) >= 6, "the probe should decode past the captured positions"
    for rank, got in enumerate(ranks):
        assert got["tokens"] == whole["tokens"], f"rank {rank}: greedy tokens differ"
        np.testing.assert_allclose(got["z"], whole["z"], atol=Z_ATOL, err_msg=f"rank {rank}: z_t")
        # The full Z gradient on every rank (DeepSpeed's own head gives each rank a slice only).
        scale = np.abs(whole["grad"]).max()
        assert scale > 0
        np.testing.assert_allclose(
            got["grad"], whole["grad"], atol=GRAD_RTOL * scale, err_msg=f"rank {rank}: dZ"
        )
        np.testing.assert_allclose(got["z_after"], whole["z_after"], atol=Z_ATOL)
        assert got["prefix"] == whole["prefix"], f"rank {rank}: the new prefix differs"
        assert got["parameters"] == whole["parameters"]
    assert ranks[0]["z_after"].tobytes() == ranks[-1]["z_after"].tobytes(), (
        "the ranks must take bit-identical steps (they stay in lockstep without exchanging Z)"
    )


def run_cfg(tmp_path: Path, run_id: str, **kw: Any) -> Config:
    base = dict(
        dataset="gsm8k",
        limit=2,
        method=["latentseek"],
        reward="psrm",
        max_new_tokens=24,
        max_iters=2,
        rho=0.5,
        batch_size=2,
        workers=1,
        threads=1,
        device="cpu",
        output_dir=str(tmp_path / "out"),
        run_id=run_id,
    )
    base.update(kw)
    return Config(**base)


TRAJECTORY = ["problem_id", "cot_answer", "final_answer", "rewards", "stop_reason", "error"]


# Whole runs on both backends: the tiny model in `slow` (the default suite: rank 1 with another
# reward follows rank 0, below), the embedded model in `long` (its ranks' agreement at this size:
# test_sharded_model_matches_the_whole_model, in `slow`).
TRAJECTORY_CASES = [
    pytest.param("tiny", "transformers", 2, marks=pytest.mark.slow),
    pytest.param("tiny", "deepspeed", 2, marks=pytest.mark.slow),
    pytest.param("embedded", "transformers", 3, marks=pytest.mark.long),
    pytest.param("embedded", "deepspeed", 2, marks=pytest.mark.long),
]


@pytest.mark.parametrize("model,backend,world", TRAJECTORY_CASES)
def test_a_replica_runs_the_same_latentseek_trajectory(shard_ray, tmp_path, tiny_dir, model,
                                                       backend, world):  # fmt: skip
    spec = model_spec(model, tiny_dir)
    logs: list[str] = []
    whole = run_evaluation(run_cfg(tmp_path, "g1", model=spec), progress=False, log=lambda m: None)
    sharded = run_evaluation(
        run_cfg(tmp_path, "gn", model=spec, tensor_parallel=world, shard_backend=backend),
        progress=False,
        log=logs.append,
    )
    problems = [RecordStore(s.run_dir).read_problems().sort_values("problem_id") for s in
                (whole, sharded)]  # fmt: skip
    assert (problems[1]["error"] == "").all(), problems[1]["error"].tolist()
    a, b = (p[TRAJECTORY].map(str).values.tolist() for p in problems)
    assert a == b
    # Every iteration: the same answer, reward and changed tokens; loss and |dZ| within rounding.
    a, b = (
        RecordStore(s.run_dir).read_iterations().sort_values(["problem_id", "iteration"])
        for s in (whole, sharded)
    )
    assert len(a) == 6  # 2 problems x (CoT + 2 iterations): psrm rewards -1 for these answers
    for column in ("iteration", "answer", "reward", "tokens_changed"):
        assert a[column].map(str).tolist() == b[column].map(str).tolist(), column
    for column in ("loss", "grad_norm"):
        np.testing.assert_allclose(b[column].astype(float), a[column].astype(float), rtol=1e-3)
    assert any("KV cache" in line for line in logs)


def rank_dependent_run(cfg: Config) -> list[tuple]:
    """LatentSeek on two problems on this rank's shard, with a reward that rank 1 sees otherwise
    (it would accept every answer at once; rank 0 rejects every one): what each rank ran."""
    import torch.distributed as dist
    from conftest import ScriptedReward, problem

    from pipeline.method.solver import Solver

    script = [0.0] if dist.get_rank() == 1 else [-1.0]
    solver = Solver(cfg, load_model(cfg), reward=ScriptedReward(script))
    results = solver.run("latentseek", [problem(pid="a"), problem("What is 2+3?", "5", "b")])
    return [(r.stop_reason, r.iterations, r.rewards, r.answers) for r in results]


def test_a_rank_with_another_reward_follows_rank_0(shard_ray, tiny_dir):
    # Rewards decide the steps; every rank takes rank 0's (pipeline.engine.shards.rank0_value). Were
    # rank 1 to follow its own, it would stop while rank 0 runs its next forward, and rank 0
    # would wait in that collective until the group's timeout: the test bounds it at 120 s.
    cfg = Config(model=str(tiny_dir), device="cpu", dtype="float32", method=["latentseek"],
                 reward="psrm", max_iters=2, max_new_tokens=12, rho=0.5, tensor_parallel=2)  # fmt: skip
    rank0, rank1 = run_on_ranks(cfg, rank_dependent_run, timeout=120.0)
    assert rank0 == rank1
    assert [(stop, k) for stop, k, _, _ in rank0] == [("max_iters", 2), ("max_iters", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_rank_is_survived(shard_ray, tmp_path, tiny_dir, rank):
    """SIGKILL one rank of a replica between two batches. Rank 1: the next batch fails on the
    broken group and rank 0 ends itself. Rank 0: its batch fails at once, and rank 1 (which it
    owns) dies with it. Either way the batch is re-queued and Ray restarts rank 0, which builds
    a new replica; every problem is recorded once, without error, with the answers of G = 1."""
    spec = str(tiny_dir)
    killed: list[int] = []

    def kill_rank(state: dict[str, Any]) -> None:
        if not killed:
            pid = state["infos"][0]["rank_pids"][rank]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    common = dict(model=spec, method=["cot"], limit=4, task_size=1, batch_size=1)
    whole = run_evaluation(run_cfg(tmp_path, "g1", **common), progress=False, log=lambda m: None)
    sharded = run_evaluation(
        run_cfg(tmp_path, "g2", tensor_parallel=2, **common),
        progress=False,
        on_batch=kill_rank,
        log=lambda m: None,
    )
    assert killed
    assert sharded.worker_failures == 1
    a = RecordStore(whole.run_dir).read_problems().sort_values("problem_id")
    b = RecordStore(sharded.run_dir).read_problems().sort_values("problem_id")
    assert len(b) == 4 and b["problem_id"].is_unique
    assert (b["error"] == "").all(), b["error"].tolist()
    assert a["final_answer"].tolist() == b["final_answer"].tolist()


def test_a_model_that_does_not_divide_stops_before_any_worker(shard_ray, tmp_path):
    cfg = run_cfg(tmp_path, "bad", tensor_parallel=2, shard_backend="transformers")
    with pytest.raises(
        ModelError, match=r"attention heads 9.*KV heads 3.*tensor_parallel in \[3\]"
    ):
        run_evaluation(cfg, progress=False, log=lambda m: None)


def test_check_shardable_names_each_size_that_does_not_divide():
    config = LlamaConfig(
        vocab_size=102, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    check_shardable(config, 2, "transformers")
    check_shardable(config, 4, "deepspeed")  # AutoTP splits uneven sizes
    with pytest.raises(ShardError, match="KV heads 2, vocabulary 102 not divisible by 4"):
        check_shardable(config, 4, "transformers")
    with pytest.raises(ShardError, match="allowed: transformers, deepspeed"):
        check_shardable(config, 2, "megatron")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tensor_parallel=0), "tensor_parallel=0: must be >= 1"),
        (dict(tensor_parallel=2, gpus_per_worker=2.0), "each rank owns one device"),
        (dict(tensor_parallel=2, device_map="auto"), "device_map='auto'"),
        (dict(shard_backend="megatron"), "shard_backend='megatron'"),
    ],
)
def test_bad_shard_settings_are_refused_with_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kw)


def test_device_map_auto_loads_the_same_model(embedded):
    """device_map=auto (layers over the devices of one worker) on a CPU-only machine: everything
    lands on the CPU and decoding is unchanged. Spreading over GPUs is `make gpu-check`'s."""
    cfg = Config(model="embedded", device="cpu", dtype="float32", device_map="auto")
    loaded = load_model(cfg)
    assert loaded.device.type == "cpu"
    prompt = embedded.tokenizer("Janet has 3 apples and buys 5 more.")["input_ids"]
    request = [GenerationRequest(prompt_ids=prompt, max_new_tokens=12)]
    a = Generator(loaded.model, loaded.tokenizer).generate(request)[0].tokens
    b = Generator(embedded.model, embedded.tokenizer).generate(request)[0].tokens
    assert a == b


@pytest.mark.slow
def test_gpu_check_measures_agreement_and_fails_beyond_its_tolerance():
    """`make gpu-check`'s steps on the CPU in float32 (G = 1 and a G = 2 replica): every
    variant agrees with the reference top-1 at 1.000, so a tolerance above 1 must fail both."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "jobs.gpu_check", "--device", "cpu", "--dtype", "float32",
         "--problems", "2", "--max-new-tokens", "12", "--tensor-parallel", "1,2",
         "--min-agreement", "1.01"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert failed == [
        "FAILED cpu float32 G=1: top-1 agreement 1.000 < 1.01",
        "FAILED cpu float32 G=2 (deepspeed): top-1 agreement 1.000 < 1.01",
    ]
    assert "tokens/s vs model.generate" in proc.stdout


def test_gpu_check_without_a_gpu_says_so(capsys, monkeypatch):
    from jobs.gpu_check import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # also on a machine with GPUs
    assert main(["--problems", "1"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_replica_larger_than_any_node_stops_with_what_it_needs(shard_ray, tmp_path, tiny_dir):
    cfg = run_cfg(
        tmp_path, "big", model=str(tiny_dir), tensor_parallel=4, shard_backend="deepspeed"
    )
    with pytest.raises(
        RunError, match=r"tensor_parallel=4 needs 4 x \{.CPU.: 1\} on one node"
    ):  # 3 CPUs
        run_evaluation(cfg, progress=False, log=lambda m: None)


def test_deepspeed_shards_a_model_that_stays_on_the_host(tmp_path, monkeypatch):
    # AutoTP gets the model on the host and places the shards itself; the whole model never goes
    # to the rank's device first (a model larger than one GPU could not load). "meta" stands in
    # for the GPU here: where the weights were when init_inference got them, and where they end.
    deepspeed = pytest.importorskip("deepspeed")
    from pipeline.engine.shards import FullGradientHead, load_sharded

    make_tiny_model().save_pretrained(tmp_path)
    seen = []

    def init_inference(model, **kwargs):
        seen.append({p.device.type for p in model.parameters()})
        return type("Engine", (), {"module": model})()

    monkeypatch.setattr(deepspeed, "init_inference", init_inference)
    model = load_sharded(str(tmp_path), torch.float32, "meta", 2, "deepspeed")
    assert seen == [{"cpu"}]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert isinstance(model.get_output_embeddings(), FullGradientHead)
