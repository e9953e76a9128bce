"""Several samples per request, without an engine: num_samples validation, each sample's seed stream, and the
merge of the samples' streams (interleaving, errors, early stop closing every stream)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from featurelens.server.api import merge_streams
from featurelens.server.config import Settings
from featurelens.server.validation import ApiError, validate_generate
from featurelens.v1 import featurelens_pb2 as pb


class WordTokenizer:
    def encode_text(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [t for m in messages for t in [1, 2, *self.encode_text(m["content"]), 3]]


def plan(**sampling):
    return validate_generate(pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(**sampling)),
                             WordTokenizer(), Settings(max_samples=4), max_model_len=100, vocab_size=1000,
                             request_id="r1")


def test_default_is_one_sample():
    assert plan().num_samples == 1 and plan(num_samples=0).num_samples == 1


def test_each_sample_has_its_own_seed_stream():
    p = plan(num_samples=3, seed=41, temperature=0.7)
    assert p.num_samples == 3
    assert [p.sample_kwargs(i)["seed"] for i in range(3)] == [41, 42, 43]
    assert all(p.sample_kwargs(i)["temperature"] == pytest.approx(0.7) for i in range(3))
    unseeded = plan(num_samples=3)
    assert all("seed" not in unseeded.sample_kwargs(i) for i in range(3))  # vLLM draws each at random


@pytest.mark.parametrize("sampling, field", [
    (dict(num_samples=5), "sampling.num_samples"),
    (dict(num_samples=-1), "sampling.num_samples"),
    (dict(num_samples=3, seed=2**63 - 2), "sampling.seed"),
])
def test_bad_num_samples(sampling, field):
    with pytest.raises(ApiError) as info:
        plan(**sampling)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.message.startswith(field + ": ")


class Stream:
    """An async generator stand-in for one sample's engine request: yields after a delay, records closing."""

    def __init__(self, name: str, items: int, delay: float, fail_at: int | None = None) -> None:
        self.name, self.items, self.delay, self.fail_at = name, items, delay, fail_at
        self.closed = False

    async def run(self):
        try:
            for i in range(self.items):
                await asyncio.sleep(self.delay)
                if i == self.fail_at:
                    raise RuntimeError(f"{self.name} failed")
                yield (self.name, i)
        finally:
            self.closed = True  # where the real stream aborts its engine request


async def test_merge_interleaves_and_keeps_each_streams_order():
    fast, slow = Stream("fast", 4, 0.01), Stream("slow", 3, 0.025)
    got = [item async for item in merge_streams([fast.run(), slow.run()])]
    assert sorted(got) == sorted([("fast", i) for i in range(4)] + [("slow", i) for i in range(3)])
    assert [i for name, i in got if name == "slow"] == [0, 1, 2]
    assert got.index(("fast", 3)) < got.index(("slow", 2))  # interleaved, not one stream after the other
    assert fast.closed and slow.closed


async def test_an_error_in_one_sample_closes_the_others_and_is_raised():
    ok, bad = Stream("ok", 100, 0.01), Stream("bad", 5, 0.01, fail_at=2)
    with pytest.raises(RuntimeError, match="bad failed"):
        async for _ in merge_streams([ok.run(), bad.run()]):
            pass
    assert ok.closed and bad.closed


async def test_stopping_early_closes_every_stream():
    streams = [Stream(str(i), 100, 0.01) for i in range(3)]
    merged = merge_streams([s.run() for s in streams])
    async for _ in merged:
        break
    await merged.aclose()
    assert all(s.closed for s in streams)


async def test_cancelling_the_consumer_closes_every_stream():
    streams = [Stream(str(i), 100, 0.01) for i in range(3)]

    async def consume():
        async for _ in merge_streams([s.run() for s in streams]):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(s.closed for s in streams)
