"""Hallucination risk over gRPC: per-token risk streamed with tokens, a final labelled response risk, and
ScoreHallucination by teacher forcing agreeing with Generate. The shipped, trained probe is used when it
exists (then the content test runs); otherwise the session's toy probe exercises the machinery."""

from __future__ import annotations

import grpc
import pytest
from featurelens.v1 import featurelens_pb2 as pb


def chat(question: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=question)])


def risky(question: str, n: int = 24, stream: bool = False):
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return cls(chat=chat(question), sampling=pb.SamplingOptions(temperature=0.0),
               stopping=pb.StoppingOptions(max_new_tokens=n),
               interpretability=pb.InterpretabilityOptions(score_risk=True))


def _risk_count(served, name: str = "featurelens_response_risk") -> float:
    return sum(s.value for m in served.metrics.registry.collect() if m.name == name
               for s in m.samples if s.name.endswith("_count"))


async def test_streamed_per_token_risk_and_final_label(served, stub):
    chunks = [c async for c in stub.GenerateStream(risky("What is the capital of France?", stream=True))]
    tokens = [t for c in chunks for t in c.tokens]
    assert tokens and all(t.HasField("risk") and 0.0 <= t.risk <= 1.0 for t in tokens)
    final = chunks[-1].risk
    assert final.score == pytest.approx(tokens[-1].risk)
    probe = served.engine.risk_probe
    expected = (pb.RISK_LABEL_HIGH if final.score >= probe.high else
                pb.RISK_LABEL_MEDIUM if final.score >= probe.medium else pb.RISK_LABEL_LOW)
    assert final.label == expected and final.probe_id == probe.probe_id
    assert 0 < len(final.top_features) <= 5
    contributions = [abs(f.contribution) for f in final.top_features]
    assert contributions == sorted(contributions, reverse=True)


async def test_score_hallucination_matches_generate(served, stub, monkeypatch):
    question = "What is the capital of Japan?"
    generated = await stub.Generate(risky(question))
    scored = await stub.ScoreHallucination(pb.ScoreHallucinationRequest(
        chat=chat(question), response=generated.text, return_token_risks=True))
    assert scored.risk.score == pytest.approx(generated.risk.score, abs=0.03)
    assert len(scored.token_risks) == scored.response_tokens
    # A probe with uncertainty terms reads teacher-forced logprobs: they come from the same engine pass as
    # the codes and ride in the cache entry, so the terms agree with Generate's and a repeat runs no pass.
    assert {t.name: t.value for t in scored.risk.terms} == pytest.approx(
        {t.name: t.value for t in generated.risk.terms}, abs=0.05)
    engine = served.engine
    passes = []
    original = engine.generate

    def counting(*args, **kwargs):
        passes.append(args[0] if args else kwargs.get("request_id"))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", counting)
    again = await stub.ScoreHallucination(pb.ScoreHallucinationRequest(chat=chat(question), response=generated.text))
    assert again.cached and again.risk.score == scored.risk.score and passes == []
    other = await stub.ScoreHallucination(pb.ScoreHallucinationRequest(chat=chat(question), response="Kyoto."))
    assert not other.cached and len(passes) == 1  # one pass, logprobs included


async def test_risk_histogram_counts_scored_responses(served, stub):
    before = _risk_count(served)
    steps_before = {name: _risk_count(served, name) for name in ("featurelens_sae_encode_seconds",
                                                                 "featurelens_risk_seconds")}
    for question in ("What is 2 + 2?", "Who wrote Hamlet?"):
        await stub.Generate(risky(question, n=8))
    await stub.Generate(pb.GenerateRequest(text="not scored", stopping=pb.StoppingOptions(max_new_tokens=2)))
    assert _risk_count(served) - before == 2
    # The worker's per-step timings reach the step histograms: at least one step per scored token.
    for name, count in steps_before.items():
        assert _risk_count(served, name) - count >= 8, name


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(text="What is the capital of France?", response=""), "response"),
    (dict(text="What is the capital of France?", response="word " * 3000), "response"),
    (dict(response="Paris"), "prompt"),
    (dict(text="  ", response="Paris"), "text"),
])
async def test_score_hallucination_bad_input(stub, request_kwargs, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ScoreHallucination(pb.ScoreHallucinationRequest(**request_kwargs))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()


async def test_invented_entity_scores_higher_than_france(served, stub):
    if served.engine.risk_probe.probe_id == "toy-probe":
        pytest.skip("needs the shipped, trained risk probe (server/assets/probes); the toy probe means nothing")
    france = await stub.Generate(risky("What is the capital of France?"))
    invented = await stub.Generate(risky("What is the capital of Veltrania?"))
    assert invented.risk.score > france.risk.score
