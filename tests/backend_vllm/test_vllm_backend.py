"""backend=vllm against the native engine (fp32, CPU, the embedded SmolLM2): tokens, z_t, seeds,
stop ids, max_new_tokens=0, forced prefixes and continuous batching of tasks. Requests that
capture z decode on the native engine by default (capture="native"); the tests of vLLM's own
tokens with z from an HF prefill switch the session's backend to capture="prefill" (`route`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.engine.batching import run_continuous
from pipeline.engine.generation import GenerationRequest
from pipeline.method.prompts import render_chat

pytestmark = pytest.mark.vllm

TOKENS = 48  # the first 48 CoT tokens of GSM8K rows 0..3 agree between the engines (measured)


@contextlib.contextmanager
def route(backend, capture: str):
    """Where `backend` decodes capture requests, for the duration."""
    before, backend.capture_on = backend.capture_on, capture
    try:
        yield backend
    finally:
        backend.capture_on = before


@pytest.fixture(scope="module")
def native_cot(native_generator, boxed_prompts):
    return native_generator.generate(
        [GenerationRequest(p, TOKENS, capture=TOKENS) for p in boxed_prompts]
    )


@pytest.fixture(scope="module")
def vllm_cot(vllm_backend, boxed_prompts):
    with route(vllm_backend, "prefill"):
        return vllm_backend.generate(
            [GenerationRequest(p, TOKENS, capture=TOKENS) for p in boxed_prompts]
        )


def test_greedy_tokens_equal_native(native_cot, vllm_cot):
    for n, v in zip(native_cot, vllm_cot):
        assert v.tokens == n.tokens
        assert v.finish_reason == n.finish_reason


def test_captured_z_equals_native(native_cot, vllm_cot, vllm_backend):
    for n, v in zip(native_cot, vllm_cot):
        assert v.hidden.dtype == torch.float32
        assert v.hidden.shape == n.hidden.shape == (TOKENS, n.hidden.shape[1])
        assert float((v.hidden - n.hidden).abs().max()) < 1e-4
        # z_t predicts x_t: the LM head's argmax over the captured states is the greedy tokens
        assert vllm_backend.logits(v.hidden).argmax(-1).tolist() == v.tokens


@pytest.mark.parametrize("capture", ["native", "prefill"])
def test_capture_shorter_than_answer_and_longer(vllm_backend, boxed_prompts, native_cot, capture):
    with route(vllm_backend, capture):
        short, long_ = vllm_backend.generate(
            [
                GenerationRequest(boxed_prompts[0], 12, capture=5),
                GenerationRequest(boxed_prompts[0], 6, capture=50),
            ]
        )
    assert short.hidden.shape[0] == 5 and long_.hidden.shape[0] == 6
    assert float((short.hidden - native_cot[0].hidden[:5]).abs().max()) < 1e-4
    assert float((long_.hidden - native_cot[0].hidden[:6]).abs().max()) < 1e-4


def test_accounting(vllm_cot, boxed_prompts):
    for p, v in zip(boxed_prompts, vllm_cot):
        assert v.prompt_state is None
        assert 0 <= v.prompt_tokens <= len(p)
        # decode steps + the capture pass
        assert v.forward_calls == 1 + (len(v.tokens) - 1) + 1
        assert v.token_passes >= (len(v.tokens) - 1) + (len(p) + TOKENS - 1)


def test_seeded_samples_repeat_whatever_the_batch(vllm_backend, boxed_prompts):
    def req(seed: int, prompt: int = 0) -> GenerationRequest:
        return GenerationRequest(
            boxed_prompts[prompt], 24, sample=True, temperature=1.0, top_p=0.95, seed=seed
        )

    alone = vllm_backend.generate([req(7)])[0].tokens
    batch = vllm_backend.generate(
        [req(1, 1), req(7), req(8), req(7, 2), GenerationRequest(boxed_prompts[3], 10)]
    )
    assert batch[1].tokens == alone
    again = vllm_backend.generate([req(8), req(7)])
    assert again[1].tokens == alone and again[0].tokens == batch[2].tokens
    seeds = [r.tokens for r in vllm_backend.generate([req(s) for s in range(6)])]
    assert len({tuple(t) for t in seeds}) > 1  # different seeds draw differently


def test_max_new_tokens_zero_like_native(vllm_backend, native_generator, boxed_prompts):
    reqs = [
        GenerationRequest(boxed_prompts[0], 0, capture=4),
        GenerationRequest(boxed_prompts[1], 3),
    ]
    v = vllm_backend.generate(reqs)
    n = native_generator.generate(reqs)
    assert v[0].tokens == n[0].tokens == []
    assert v[0].finish_reason == n[0].finish_reason == "length"
    assert v[0].hidden is None and n[0].hidden is None
    assert v[1].tokens == n[1].tokens and len(v[1].tokens) == 3


def test_stop_ids_like_native(vllm_backend, native_generator, boxed_prompts, native_cot):
    cot = native_cot[0].tokens
    stop = cot[7]
    k = cot.index(stop)
    stops = frozenset({stop, 49000})
    reqs = [GenerationRequest(boxed_prompts[0], TOKENS, stop_ids=stops, capture=TOKENS)]
    with route(vllm_backend, "prefill"):
        v = vllm_backend.generate(reqs)[0]
    n = native_generator.generate(reqs)[0]
    assert v.tokens == n.tokens == cot[: k + 1]  # the stop token is kept
    assert v.finish_reason == n.finish_reason == "eos"
    assert v.hidden.shape == n.hidden.shape and float((v.hidden - n.hidden).abs().max()) < 1e-4


def test_eos_ends_the_row_like_native(vllm_backend, native_generator, vllm_loaded):
    prompt = render_chat(vllm_loaded.tokenizer, [{"role": "user", "content": "Say hello."}])
    req = [GenerationRequest(prompt, 64)]
    v, n = vllm_backend.generate(req)[0], native_generator.generate(req)[0]
    assert n.finish_reason == "eos"  # the model answers this within 64 tokens
    assert v.tokens == n.tokens and v.finish_reason == "eos"
    assert v.tokens[-1] in vllm_backend.eos_ids
    # an explicit stop set replaces the EOS ids: the row goes on past EOS
    other = vllm_backend.generate(
        [GenerationRequest(prompt, len(n.tokens) + 3, stop_ids=frozenset({49000}))]
    )[0]
    assert other.finish_reason == "length" and other.tokens[: len(n.tokens)] == n.tokens


def test_forced_prefix_continuation_like_native(
    vllm_backend, native_generator, boxed_prompts, native_cot
):
    reqs = []
    for p, cot in zip(boxed_prompts, native_cot):
        prefix = list(cot.tokens[:10])
        top2 = torch.topk(native_generator.logits(cot.hidden[5]), 2).indices.tolist()
        prefix[5] = top2[1]  # the runner-up: a perturbed prefix, as after a latent step
        reqs.append(GenerationRequest(p, 24, prefix_ids=prefix, capture=4))
    with route(vllm_backend, "prefill"):
        v = vllm_backend.generate(reqs)
    n = native_generator.generate(reqs)
    for a, b in zip(v, n):
        assert a.tokens == b.tokens
        assert float((a.hidden - b.hidden).abs().max()) < 1e-4


def test_run_continuous_tasks_like_native(vllm_backend, native_generator, boxed_prompts):
    """Two-stage tasks (a CoT, then a continuation after its first tokens) through `run`: the
    follow-up requests of a task go in as soon as its CoT is done."""

    def make(outputs: dict, key: int, prompt: list[int], length: int):
        def task():
            (cot,) = yield [GenerationRequest(prompt, length, capture=3)]
            nothing = yield []  # a task may yield nothing
            assert nothing == []
            conts = yield [
                GenerationRequest(prompt, 8, prefix_ids=cot.tokens[:4]),
                GenerationRequest(prompt, 0),
            ]
            outputs[key] = (cot.tokens, conts[0].tokens, conts[1].tokens)

        return task()

    lengths = [6, 20, 9, 14]  # different lengths: tasks move on at different steps
    got: dict = {}
    vllm_backend.run(
        [make(got, i, p, n) for i, (p, n) in enumerate(zip(boxed_prompts, lengths))], max_rows=3
    )
    want: dict = {}
    run_continuous(
        native_generator,
        [make(want, i, p, n) for i, (p, n) in enumerate(zip(boxed_prompts, lengths))],
        3,
    )
    assert got == want and len(got) == 4


def test_static_batching_like_generate(vllm_backend, boxed_prompts):
    got = []

    def task(p):
        (a,) = yield [GenerationRequest(p, 5)]
        (b,) = yield [GenerationRequest(p, 5, prefix_ids=a.tokens)]
        got.append(a.tokens + b.tokens)

    vllm_backend.run([task(p) for p in boxed_prompts[:2]], max_rows=8, batching="static")
    direct = vllm_backend.generate([GenerationRequest(p, 10) for p in boxed_prompts[:2]])
    assert sorted(got) == sorted(r.tokens for r in direct)


def test_context_limit_is_checked(vllm_backend, boxed_prompts):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        vllm_backend.generate([GenerationRequest(boxed_prompts[0], vllm_backend.max_positions)])


def test_process_settings_kept(vllm_backend):
    # vLLM's CPU worker replaces torch.set_num_threads by a no-op; the backend puts it back.
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    assert torch.get_num_threads() == before + 1
    torch.set_num_threads(before)
    assert vllm_backend.logits(torch.zeros(2, vllm_backend.model.config.hidden_size)).shape[-1] > 0


def test_failing_task_leaves_the_engine_clean(vllm_backend, boxed_prompts):
    def bad():
        yield [GenerationRequest(boxed_prompts[0], 3)]
        raise RuntimeError("boom")

    def slow():
        yield [GenerationRequest(boxed_prompts[1], 40)]

    with pytest.raises(RuntimeError, match="boom"):
        vllm_backend.run([bad(), slow()], max_rows=4)
    assert not vllm_backend.engine.has_unfinished_requests()
    assert len(vllm_backend.generate([GenerationRequest(boxed_prompts[0], 2)])[0].tokens) == 2


def test_capture_requests_decode_on_the_native_engine(
    vllm_backend, native_generator, boxed_prompts, native_cot
):
    # capture="native": z is the state each token was chosen from; the other requests of the
    # same batch go to vLLM as before.
    from pipeline.engine.backends.base import capture_mismatch

    requests_before = vllm_backend.stats["requests"]
    got = vllm_backend.generate(
        [GenerationRequest(p, TOKENS, capture=TOKENS) for p in boxed_prompts]
        + [GenerationRequest(boxed_prompts[0], 6)]
    )
    assert vllm_backend.stats["requests"] == requests_before + 1  # only the last went to vLLM
    for v, n in zip(got, native_cot):
        assert v.tokens == n.tokens and torch.equal(v.hidden, n.hidden)
        assert capture_mismatch(vllm_backend.logits, v.hidden, v.tokens) == 0
        assert v.prompt_state is None  # continuations run on vLLM
    assert got[-1].tokens == native_cot[0].tokens[:6]


def test_max_model_len_is_the_runs_need_and_every_check_uses_it(vllm_backend, vllm_cfg):
    from pipeline.engine.backends.vllm import needed_model_len

    model_limit = vllm_backend.model.config.max_position_embeddings  # 8192 for SmolLM2
    need = needed_model_len(vllm_cfg, model_limit)  # 1024 + 1024 + 256, rounded up
    assert need == 3072 < model_limit
    assert vllm_backend.max_positions == vllm_backend.engine.model_config.max_model_len == need
    assert vllm_backend.engine_kwargs["enforce_eager"] is True  # CPU
    with pytest.raises(ValueError, match="context \\(3072\\)"):
        vllm_backend.generate([GenerationRequest([1, 2, 3], need)])


def test_a_failed_engine_step_is_an_engine_error(vllm_backend, boxed_prompts, monkeypatch):
    from pipeline.engine.backends.base import EngineError

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine = vllm_backend.engine
    monkeypatch.setattr(engine, "step", broken)
    with pytest.raises(EngineError, match="illegal memory access"):
        vllm_backend.generate([GenerationRequest(boxed_prompts[0], 3)])
    monkeypatch.undo()
    while engine.has_unfinished_requests():  # what the failed run left (a worker would exit)
        engine.step()
    assert len(vllm_backend.generate([GenerationRequest(boxed_prompts[0], 2)])[0].tokens) == 2
