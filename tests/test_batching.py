"""The batching runners (`pipeline.engine.batching`) on the tiny model: continuous batching gives every
task the tokens it gets alone and in static rounds, never decodes more than `max_rows` rows, and
lets a task move on before the slowest row of its round is done."""

from __future__ import annotations

import pytest
from conftest import TINY_EOS, tiny_loaded

from pipeline.engine.batching import run_continuous, run_static
from pipeline.engine.generation import DecodeBatch, GenerationRequest, Generator

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17], [18, 19, 20]]


@pytest.fixture(scope="module")
def gen() -> Generator:
    loaded = tiny_loaded()
    return Generator(loaded.model, loaded.tokenizer)


def make_tasks(log: dict[int, list]):
    """Per prompt: a greedy answer of a length that depends on the prompt, then two seeded
    samples, then a continuation of the first answer's prefix from the cached prompt."""

    def task(i: int, prompt: list[int]):
        (first,) = yield [GenerationRequest(prompt, 3 + 2 * i, keep_prompt_state=True)]
        samples = yield [
            GenerationRequest(prompt, 4, sample=True, temperature=0.9, seed=100 * i + j)
            for j in range(2)
        ]
        (cont,) = yield [
            GenerationRequest(
                prompt, 5, prefix_ids=first.tokens[:2], prompt_state=first.prompt_state, capture=3
            )
        ]
        log[i] = [first.tokens, [s.tokens for s in samples], cont.tokens, cont.hidden]

    return [task(i, p) for i, p in enumerate(PROMPTS)]


def alone(gen: Generator) -> dict[int, list]:
    """Each task on its own, one request per `generate` call."""
    log: dict[int, list] = {}
    for task in make_tasks(log):
        results = None
        try:
            while True:
                requests = task.send(results)
                results = [gen.generate([r])[0] for r in requests]
        except StopIteration:
            pass
    return log


def assert_same(a: dict[int, list], b: dict[int, list]) -> None:
    assert sorted(a) == sorted(b) == list(range(len(PROMPTS)))
    for i in a:
        assert a[i][:3] == b[i][:3], i
        assert a[i][3].shape == b[i][3].shape
        assert (a[i][3] - b[i][3]).abs().max() < 1e-4, i


@pytest.mark.parametrize("max_rows", [1, 2, 3, 16])
def test_continuous_gives_the_tokens_of_each_task_alone(gen, max_rows):
    expected = alone(gen)
    static: dict[int, list] = {}
    run_static(gen, make_tasks(static))
    continuous: dict[int, list] = {}
    run_continuous(gen, make_tasks(continuous), max_rows)
    assert_same(expected, static)
    assert_same(expected, continuous)


def test_continuous_keeps_at_most_max_rows_and_moves_tasks_on_early(gen, monkeypatch):
    sizes: list[int] = []
    real_step = DecodeBatch.step

    def step(self):
        sizes.append(len(self))
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", step)
    order: list[str] = []

    def task(name: str, length: int, rounds: int):
        for k in range(rounds):
            (out,) = yield [GenerationRequest([5, 6, 7], length, stop_ids=frozenset({-1}))]
            assert len(out.tokens) == length  # no stop token: every row runs to its length
            order.append(f"{name}{k}")

    # One slow row (30 tokens) and a fast task of 3 rounds of 4 tokens: with continuous
    # batching the fast task's three rounds all finish while the slow row is still decoding.
    before = dict(gen.stats)
    run_continuous(gen, [task("slow", 30, 1), task("fast", 4, 3)], max_rows=2)
    assert max(sizes) <= 2
    assert gen.stats["decode_steps"] - before["decode_steps"] == len(sizes) == 30
    assert gen.stats["decoded_rows"] - before["decoded_rows"] == sum(sizes) == 30 + 3 * 4
    assert gen.stats["merges"] - before["merges"] == 2  # fast1 and fast2 joined the slow row
    assert order == ["fast0", "fast1", "fast2", "slow0"]
    sizes.clear()
    order.clear()
    run_static(gen, [task("slow", 30, 1), task("fast", 4, 3)])
    assert order == ["slow0", "fast0", "fast1", "fast2"]  # round 1 waited for the slow row


def test_rows_that_stop_free_their_place_for_queued_work(gen):
    # Six one-request tasks through two rows: each row is a request decoded to its stop token
    # or length; all six finish, the results belong to the right tasks.
    got: dict[int, int] = {}

    def task(i: int):
        (out,) = yield [GenerationRequest([5 + i, 6], 2 + i, stop_ids=frozenset({TINY_EOS}))]
        got[i] = len(out.tokens)

    run_continuous(gen, [task(i) for i in range(6)], max_rows=2)
    ref = [len(gen.generate([GenerationRequest([5 + i, 6], 2 + i)])[0].tokens) for i in range(6)]
    assert [got[i] for i in range(6)] == ref


def test_max_rows_must_be_positive(gen):
    with pytest.raises(ValueError, match="max_rows"):
        run_continuous(gen, [], 0)


def test_merge_frees_the_old_caches_layer_by_layer(gen, monkeypatch):
    # The live KV buffers, counted at every allocation during a merge: the merged cache plus at
    # most one layer of the two old ones (the old merge held both caches whole beside the new
    # one: 2x the KV cache at its peak).
    import weakref

    from pipeline.engine import generation

    live: list[tuple[weakref.ref, int]] = []
    peak = [0]
    allocate = generation._kv_buffer

    def counted(like, shape):
        buf = allocate(like, shape)
        live[:] = [(ref, n) for ref, n in live if ref() is not None]
        live.append((weakref.ref(buf), buf.nbytes))
        peak[0] = max(peak[0], sum(n for _, n in live))
        return buf

    monkeypatch.setattr(generation, "_kv_buffer", counted)
    running, _ = gen.open([GenerationRequest(p, 12) for p in PROMPTS[:3]])
    for _ in range(3):
        running.step()
    fresh, _ = gen.open([GenerationRequest(p, 12) for p in PROMPTS[3:]])

    def nbytes(layer) -> int:
        return layer._keys_buffer.nbytes + layer._values_buffer.nbytes

    old = [nbytes(a) + nbytes(b) for a, b in zip(running.cache.layers, fresh.cache.layers)]
    peak[0] = 0
    merged = running.merge(fresh)
    new = sum(nbytes(layer) for layer in merged.cache.layers)
    assert len(old) == 2 and peak[0] <= new + max(old)  # the old caches' largest layer
    assert peak[0] < new + sum(old)  # not both caches whole
    assert running.cache is None and fresh.cache is None  # consumed
    # the merged batch decodes what the rows decode alone
    done = []
    while merged.rows:
        done += merged.step()
    by_prompt = {tuple(row.request.prompt_ids): row.result.tokens for row in done}
    for p in PROMPTS:
        assert by_prompt[tuple(p)] == gen.generate([GenerationRequest(p, 12)])[0].tokens
