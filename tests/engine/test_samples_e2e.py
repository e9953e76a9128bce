"""Several samples per request through the real engine: each sample is its own engine request with its own seed
stream, tokens, features and risk; streaming tags every chunk with its sample; unary keeps sample 0 in the
single-answer fields."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from featurelens.v1 import featurelens_pb2 as pb

PROMPT = pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Tell me about Rome in one line.")])
INTERP = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=4)], score_risk=True)


def request(n: int, seed: int | None = 11, stream: bool = False, max_new_tokens: int = 12, **kw):
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    sampling = pb.SamplingOptions(temperature=1.0, num_samples=n)
    if seed is not None:
        sampling.seed = seed
    return cls(chat=PROMPT, sampling=sampling, stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens), **kw)


async def test_unary_returns_every_sample_each_with_its_seed_stream(stub):
    reply = await stub.Generate(request(3, interpretability=INTERP))
    assert [s.sample_index for s in reply.samples] == [0, 1, 2]
    # sample i is exactly what a one-sample request with seed 11 + i gives
    singles = await asyncio.gather(*(stub.Generate(request(1, seed=11 + i, interpretability=INTERP)) for i in range(3)))
    for sample, single in zip(reply.samples, singles, strict=True):
        assert [t.token_id for t in sample.tokens] == [t.token_id for t in single.tokens]
        assert sample.text == single.text and sample.finish_reason == single.finish_reason
        assert sample.usage.completion_tokens == len(sample.tokens) > 0
        assert all(t.features and t.HasField("risk") for t in sample.tokens)
        assert sample.risk.label != pb.RISK_LABEL_UNSPECIFIED and sample.risk.top_features
        assert sample.risk.score == pytest.approx(single.risk.score, abs=0.02)
    assert len({s.text for s in reply.samples}) > 1  # three seeds, not one answer three times
    # backward compatible: the single-answer fields are sample 0's
    first = reply.samples[0]
    assert reply.text == first.text and list(reply.tokens) == list(first.tokens)
    assert reply.finish_reason == first.finish_reason and reply.risk == first.risk and reply.usage == first.usage


async def test_one_sample_leaves_samples_empty(stub):
    reply = await stub.Generate(request(1, max_new_tokens=4))
    assert not reply.samples and reply.tokens


async def test_stream_tags_every_chunk_with_its_sample(stub):
    chunks = [c async for c in stub.GenerateStream(request(3, stream=True, interpretability=INTERP))]
    unary = await stub.Generate(request(3, interpretability=INTERP))
    assert {c.sample_index for c in chunks} == {0, 1, 2}
    for sample in unary.samples:
        mine = [c for c in chunks if c.sample_index == sample.sample_index]
        assert [t.token_id for c in mine for t in c.tokens] == [t.token_id for t in sample.tokens]
        assert "".join(c.text_delta for c in mine) == sample.text
        finals = [c for c in mine if c.finish_reason]
        assert len(finals) == 1 and finals[0] is mine[-1]  # each sample ends once, with its own risk
        tokens = [t for c in mine for t in c.tokens]
        assert finals[0].risk.label != pb.RISK_LABEL_UNSPECIFIED
        assert finals[0].risk.score == pytest.approx(tokens[-1].risk)


async def test_prompt_features_come_once_with_sample_zero(stub):
    interp = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=4)], include_prompt_features=True)
    chunks = [c async for c in stub.GenerateStream(request(2, stream=True, max_new_tokens=4, interpretability=interp))]
    with_prompt = [c for c in chunks if c.prompt_features]
    assert len(with_prompt) == 1 and with_prompt[0].sample_index == 0
    unary = await stub.Generate(request(2, max_new_tokens=4, interpretability=interp))
    assert list(unary.prompt_features) == list(with_prompt[0].prompt_features)


async def test_each_sample_of_a_structured_request_parses(stub):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
              "additionalProperties": False}
    reply = await stub.Generate(request(3, max_new_tokens=48,
                                        structured_output=pb.StructuredOutput(json_schema=json.dumps(schema))))
    for sample in reply.samples:
        assert sample.finish_reason == pb.FINISH_REASON_EOS, sample.text
        jsonschema.validate(json.loads(sample.text), schema)


async def test_cancel_aborts_every_sample_in_the_engine(served, stub):
    call = stub.GenerateStream(pb.GenerateStreamRequest(
        text="Tell me a very long story.", sampling=pb.SamplingOptions(temperature=1.0, num_samples=3),
        stopping=pb.StoppingOptions(max_new_tokens=1500, ignore_eos=True)))
    seen: set[int] = set()
    async for chunk in call:
        seen.add(chunk.sample_index)
        if len(seen) == 3:
            break
    assert served.engine.num_unfinished_requests() == 3
    call.cancel()
    deadline = asyncio.get_running_loop().time() + 10
    while served.engine.num_unfinished_requests() or await served.engine.worker_active_requests():
        assert asyncio.get_running_loop().time() < deadline, "samples still running after cancel"
        await asyncio.sleep(0.1)
