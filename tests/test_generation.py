"""`pipeline.engine.generation.Generator` on a tiny random Llama with a byte tokenizer (no downloads).

What the engine promises: a row's tokens do not depend on what else is in the batch (padding,
other prompts' lengths, other prefixes, sampling seeds of others), continuation from a cached
prompt equals decoding the whole sequence, captured z_t are the states behind each token, and
the stopping rules (EOS, max_new_tokens, the context limit) hold per row.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONTEXT, TINY_EOS, ByteTokenizer, make_tiny_model

from pipeline.engine.generation import (
    GenerationRequest,
    Generator,
    eos_token_ids,
    kv_bytes_per_token,
)


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (length,), generator=g).tolist()  # ids 0..3 are special


PROMPTS = [prompt(3, 1), prompt(9, 2), prompt(17, 3), prompt(30, 4)]


@pytest.fixture
def gen(tiny_model, byte_tokenizer) -> Generator:
    return Generator(tiny_model, byte_tokenizer)


def greedy(gen: Generator, ids, n: int, **kw):
    return gen.generate([GenerationRequest(list(ids), n, **kw)])[0]


def test_max_new_tokens_respected(gen):
    for n in (1, 5, 20):
        out = greedy(gen, PROMPTS[1], n)
        assert TINY_EOS not in out.tokens  # this model and prompt never emit EOS early
        assert len(out.tokens) == n and out.finish_reason == "length"


def test_max_new_tokens_zero_returns_no_tokens(gen):
    out = greedy(gen, PROMPTS[0], 0, keep_prompt_state=True, capture=4)
    assert out.tokens == [] and out.finish_reason == "length" and out.hidden is None
    assert out.prompt_state is not None and out.prompt_state.length == len(PROMPTS[0])
    assert gen.generate([]) == []


def test_greedy_batch_equals_single_requests(gen):
    # Prompts of lengths 3, 9, 17, 30 in one batch: each row is padded differently.
    singles = [greedy(gen, p, 12, capture=12) for p in PROMPTS]
    batch = gen.generate([GenerationRequest(p, 12, capture=12) for p in PROMPTS])
    for one, many in zip(singles, batch):
        assert many.tokens == one.tokens
        assert many.finish_reason == one.finish_reason
        assert torch.allclose(many.hidden, one.hidden, atol=1e-5)
    # The same with prompts prefilled two at a time, in reverse order.
    chunked = Generator(gen.model, gen.tokenizer, prefill_chunk=2)
    reverse = chunked.generate([GenerationRequest(p, 12) for p in reversed(PROMPTS)])
    assert [r.tokens for r in reversed(reverse)] == [s.tokens for s in singles]


def test_greedy_matches_full_recompute(gen, tiny_model):
    # No cache: argmax of lm_head(last hidden state) over the whole sequence, one token at a time.
    ids = list(PROMPTS[2])
    expected = []
    with torch.no_grad():
        for _ in range(10):
            logits = tiny_model(torch.tensor([ids + expected])).logits[0, -1]
            expected.append(int(logits.argmax()))
    assert greedy(gen, ids, 10).tokens == expected


def test_continuation_from_prompt_state_equals_full_decoding(gen):
    first = gen.generate([GenerationRequest(p, 6, keep_prompt_state=True) for p in PROMPTS])
    prefixes = [[65, 66, 67], [], [10, 20, 30, 40, 50, 60, 70], [99]]  # different lengths
    continued = gen.generate(
        [
            GenerationRequest(p, 8, prefix_ids=f, prompt_state=o.prompt_state, capture=8)
            for p, f, o in zip(PROMPTS, prefixes, first)
        ]
    )
    for p, f, cont in zip(PROMPTS, prefixes, continued):
        full = greedy(gen, p + f, 8, capture=8)
        assert cont.tokens == full.tokens
        assert torch.allclose(cont.hidden, full.hidden, atol=1e-5)
        assert cont.prompt_tokens == 0  # the cached prompt was not run again
    # A reused state and a fresh prompt in the same batch.
    mixed = gen.generate(
        [
            GenerationRequest(PROMPTS[0], 8, prefix_ids=[65], prompt_state=first[0].prompt_state),
            GenerationRequest(PROMPTS[3], 8, prefix_ids=[1, 2]),
        ]
    )
    assert mixed[0].tokens == greedy(gen, PROMPTS[0] + [65], 8).tokens
    assert mixed[1].tokens == greedy(gen, PROMPTS[3] + [1, 2], 8).tokens


def test_capture_returns_the_states_behind_the_tokens(gen):
    out = greedy(gen, PROMPTS[1], 10, capture=4)
    assert out.hidden.shape == (4, 32) and out.hidden.dtype == torch.float32
    assert gen.logits(out.hidden).argmax(-1).tolist() == out.tokens[:4]
    longer = greedy(gen, PROMPTS[1], 3, capture=10)  # capture beyond the answer: all of it
    assert longer.hidden.shape == (3, 32)
    assert gen.logits(longer.hidden).argmax(-1).tolist() == longer.tokens
    assert greedy(gen, PROMPTS[1], 3).hidden is None  # capture=0: nothing kept


def test_eos_stops_a_row(gen):
    # Make the token the model emits at step 4 the EOS token of a second model with the same
    # weights (same seed): that model must stop right after emitting it, at its first occurrence.
    base = greedy(gen, PROMPTS[0], 12).tokens
    stop = base[4]
    first = base.index(stop)
    eos_model = make_tiny_model(eos_token_id=stop)
    eos_gen = Generator(eos_model, ByteTokenizer(eos_token_id=stop))
    assert eos_gen.eos_ids == {stop}
    other = next(p for p in PROMPTS[1:] if stop not in greedy(gen, p, 12).tokens)
    both = eos_gen.generate([GenerationRequest(PROMPTS[0], 12), GenerationRequest(other, 12)])
    assert both[0].tokens == base[: first + 1] and both[0].finish_reason == "eos"
    # The other row keeps going, as if alone.
    assert both[1].tokens == greedy(gen, other, 12).tokens and both[1].finish_reason == "length"


def test_sampling_reproducible_per_seed_and_independent_of_batch(gen):
    def req(p, seed):
        return GenerationRequest(p, 16, sample=True, temperature=1.0, seed=seed)

    alone = gen.generate([req(PROMPTS[1], 5)])[0].tokens
    assert gen.generate([req(PROMPTS[1], 5)])[0].tokens == alone
    batch = gen.generate([req(PROMPTS[3], 1), req(PROMPTS[1], 5), req(PROMPTS[0], 9)])
    assert batch[1].tokens == alone
    assert gen.generate([req(PROMPTS[1], 6)])[0].tokens != alone  # another seed, another sample
    assert alone != greedy(gen, PROMPTS[1], 16).tokens  # it really samples


def test_tiny_top_p_is_greedy(gen):
    # top_p -> 0 keeps only the most likely token: the first sorted token always stays
    # (mass before it is 0), the second goes (mass before it is p_max > top_p).
    sampled = gen.generate([GenerationRequest(PROMPTS[2], 12, sample=True, top_p=1e-6, seed=3)])
    assert sampled[0].tokens == greedy(gen, PROMPTS[2], 12).tokens


def test_token_accounting(gen):
    # Prompt 9, prefix 3, 5 decoded tokens: prefill 9 positions (1 forward), prefix 3 (1 forward),
    # then tokens 1..4 fed back one at a time (4 forwards; the 5th is never fed):
    # passes 9 + 3 + 4 = 16, forward calls 1 + 1 + 4 = 6.
    out = greedy(gen, PROMPTS[1], 5, prefix_ids=[65, 66, 67], keep_prompt_state=True)
    assert (out.prompt_tokens, out.token_passes, out.forward_calls) == (9, 16, 6)
    again = gen.generate(
        [GenerationRequest(PROMPTS[1], 5, prefix_ids=[65], prompt_state=out.prompt_state)]
    )[0]
    assert (again.prompt_tokens, again.token_passes, again.forward_calls) == (0, 1 + 4, 1 + 4)


def test_over_long_and_empty_requests_raise(gen):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        greedy(gen, prompt(TINY_CONTEXT - 10, 5), 11)
    with pytest.raises(ValueError, match="exceeds"):
        greedy(gen, PROMPTS[0], 5, prefix_ids=[5] * (TINY_CONTEXT - 7))
    greedy(gen, prompt(TINY_CONTEXT - 10, 5), 10)  # exactly the context: allowed
    with pytest.raises(ValueError, match="empty prompt"):
        greedy(gen, [], 5)


def test_eos_ids_come_from_model_and_tokenizer(tiny_model):
    tiny_model.generation_config.eos_token_id = [7, 8]
    assert eos_token_ids(tiny_model, ByteTokenizer(eos_token_id=3)) == {3, 7, 8}
    tiny_model.generation_config.eos_token_id = None
    tok = ByteTokenizer()
    tok.eos_token_id = None
    with pytest.raises(ValueError, match="no EOS"):
        Generator(tiny_model, tok)


def test_kv_bytes_per_token_is_what_a_prompt_state_holds(gen):
    # The memory figure the driver prints: the bytes of keys and values one token of one row
    # holds, read off a real prefill, not only computed from the config.
    (state,) = gen.prefill([PROMPTS[2]])
    held = sum(t.numel() * t.element_size() for t in state.keys + state.values)
    assert kv_bytes_per_token(gen.model) == held // state.length > 0


def test_repetition_penalty_is_hf_s_rule(gen, tiny_model):
    # compat=reference verifiers decode with the model's generation config, which may carry a
    # repetition penalty (Qwen's 1.05): the engine's greedy rows against a naive loop that
    # applies transformers' own processor to the whole sequence so far.
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(3.0)
    for ids in PROMPTS[:3]:
        seq = list(ids)
        for _ in range(12):
            with torch.no_grad():
                logits = tiny_model(torch.tensor([seq])).logits[:, -1]
            seq.append(int(penalty(torch.tensor([seq]), logits).argmax(-1)))
        engine = greedy(gen, ids, 12, repetition_penalty=3.0)
        assert engine.tokens == seq[len(ids) :]
        assert engine.tokens != greedy(gen, ids, 12).tokens  # the penalty changed something


def test_top_k_of_one_is_greedy_and_top_k_limits_the_draws(gen):
    row = dict(sample=True, temperature=2.0, seed=5)
    assert greedy(gen, PROMPTS[2], 10, top_k=1, **row).tokens == greedy(gen, PROMPTS[2], 10).tokens
    free = [greedy(gen, PROMPTS[2], 1, seed=s, sample=True, temperature=5.0) for s in range(40)]
    capped = [
        greedy(gen, PROMPTS[2], 1, seed=s, sample=True, temperature=5.0, top_k=2) for s in range(40)
    ]
    assert len({o.tokens[0] for o in capped}) <= 2 < len({o.tokens[0] for o in free})


def test_one_device_to_host_transfer_per_decode_step(gen, monkeypatch):
    # On a GPU every tensor-to-Python conversion waits for the device. A decode step reads the
    # chosen tokens once (`tolist`) and nothing else: not per row, not for sampling, capture or
    # repetition penalties. Counted here on the engine's own lines (the model's are its own).
    import sys

    calls = []
    names = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu")
    for name in names:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("pipeline/engine/generation.py"):
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    requests = [
        GenerationRequest(PROMPTS[0], 6, capture=3),
        GenerationRequest(PROMPTS[1], 8, sample=True, temperature=0.8, top_p=0.9, seed=1),
        GenerationRequest(PROMPTS[2], 5, repetition_penalty=1.3, top_k=5, sample=True, seed=2),
        GenerationRequest(PROMPTS[3], 7, prefix_ids=PROMPTS[0][:2]),
    ]
    batch, _ = gen.open(requests)
    steps = []
    while batch.rows:
        calls.clear()
        batch.step()
        steps.append(list(calls))
    assert len(steps) == 8 and all(s == ["tolist"] for s in steps), steps


def _sample_one(logits, temperature, top_p, generator, top_k=0):
    """The per-row draw the engine made before sampling was batched (one sort per row)."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        sorted_probs[cum - sorted_probs > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def test_batched_sampling_draws_what_each_row_draws_alone():
    # Rows with their own temperature, top_k and top_p, sampled at once: the same tokens and the
    # same generator states as a multinomial per row, over 50 steps of random logits.
    from pipeline.engine.generation import Row, _sample

    settings = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.5, 0.5, 40), (1.0, 0.99, 1)]
    logits_gen = torch.Generator().manual_seed(0)
    rows, alone = [], []
    for i, (t, p, k) in enumerate(settings):
        req = GenerationRequest([1], 1, sample=True, temperature=t, top_p=p, top_k=k, seed=i)
        rows.append(Row(i, req, None, set(), torch.Generator().manual_seed(i)))
        alone.append(torch.Generator().manual_seed(i))
    for _ in range(50):
        logits = torch.randn(len(rows), 300, generator=logits_gen) * 4
        batched = _sample(logits, rows).tolist()
        single = [_sample_one(logits[i], t, p, alone[i], k) for i, (t, p, k) in enumerate(settings)]
        assert batched == single
    assert all(torch.equal(r.sampler.get_state(), g.get_state()) for r, g in zip(rows, alone))
