"""The served risk equals offline scoring of the same answer: Generate with score_risk (and the probe layer's
top-k codes and the token logprobs returned, as `featurelens risk build-data` asks), turned into the offline
record and scored by the training pipeline's code (train.probe_logits, generalize.ood_scores) — the numbers the
LOFO evaluation and the shipped figures are computed from. Runs on the session's probe (the shipped default
when one exists); the OOD part runs when that probe file carries an OOD reference (v2)."""

from __future__ import annotations

import pytest
from featurelens.v1 import featurelens_pb2 as pb

QUESTIONS = ["What is the capital of France?", "What is the atomic number of quynfarium?",
             "Which month comes 3 months after May?", "How many letters are in the word 'garden'?"]


@pytest.mark.parametrize("question", QUESTIONS)
async def test_served_risk_equals_offline_scoring_of_the_same_answer(served, stub, question):
    from featurelens.server.interp import risk_probe as rp
    from featurelens.server.offline.risk import generalize as gz
    from featurelens.server.offline.risk.data import Question, reply_to_record
    from featurelens.server.offline.risk.train import calibrated, probe_logits

    risk = served.engine.risk_probe
    probe = risk.probe
    k = risk.trained_top_k or 32
    request = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=question)]),
        sampling=pb.SamplingOptions(temperature=0), stopping=pb.StoppingOptions(max_new_tokens=16),
        logprobs=pb.LogprobOptions(token_logprobs=True, top_logprobs=1),
        interpretability=pb.InterpretabilityOptions(
            score_risk=True, features=[pb.FeatureSelection(layer=layer, top_k=k) for layer in sorted(risk.layers)]))
    reply = await stub.Generate(request)
    record = reply_to_record(Question(qid="q", domain="d", entity="e", prompt=question), reply,
                             set(served.engine.shape.eos_token_ids))
    assert record["token_ids"]
    offline = float(calibrated(probe, probe_logits(probe, [record]))[0])
    assert reply.risk.score == pytest.approx(offline, abs=2e-3)
    assert [t.risk for t in reply.tokens][-1] == pytest.approx(reply.risk.score)
    if probe.terms:
        # The named uncertainty terms are those of the answer's logprobs; a request that asks for no logprobs
        # gets the same risk (the server asks the engine for them itself).
        values = rp.term_values(record["logprobs"])
        assert {t.name: t.value for t in reply.risk.terms} == pytest.approx({t.name: values[t.name]
                                                                             for t in probe.terms}, abs=1e-4)
        # On this engine (vLLM's V1 runner, CPU) the worker sends the sampled tokens' logprobs beside the codes,
        # so the terms above are its own figures checked against vLLM's logprobs of the same tokens.
        assert served.engine.worker_logprobs
        request.ClearField("logprobs")
        bare = await stub.Generate(request)
        assert bare.text == reply.text and not any(t.logprob for t in bare.tokens)
        assert bare.risk.score == pytest.approx(reply.risk.score, abs=1e-4)
        # The fallback for runners whose sampler the worker cannot wrap: the server asks vLLM for logprobs.
        served.engine.worker_logprobs = False
        try:
            fallback = await stub.Generate(request)
        finally:
            served.engine.worker_logprobs = True
        assert fallback.text == reply.text and not any(t.logprob for t in fallback.tokens)
        assert fallback.risk.score == pytest.approx(reply.risk.score, abs=1e-4)
        assert {t.name: t.value for t in fallback.risk.terms} == pytest.approx(
            {t.name: t.value for t in reply.risk.terms}, abs=1e-4)
    else:
        assert not reply.risk.terms
    if risk.nearest_layer is not None:  # the training answers' code vectors, nearest cosine
        layer, k_ood = int(probe.ood["layer"]), int(probe.ood["k"])
        expected = float(gz.nearest_scores([record], probe.ood_reference, layer, k_ood)[0])
        entry = record["features"][str(layer)]
        tokens = [{layer: list(zip(i, v, strict=True))} for i, v in zip(entry["idx"], entry["val"], strict=True)]
        assert rp.ood_nearest(probe.ood_reference, tokens, layer, k_ood) == pytest.approx(expected, abs=1e-6)
        assert reply.risk.ood == pytest.approx(expected, abs=2e-3)
    elif risk.unseen:
        unseen = {int(layer): ids for layer, ids in probe.ood["unseen"].items()}
        expected = float(gz.ood_scores([record], unseen, int(probe.ood["k"]))[0])
        assert reply.risk.ood == pytest.approx(expected, abs=1e-6)
    else:
        assert reply.risk.ood == 0.0


async def test_ood_histogram_counts_scored_responses(served, stub):
    if not served.engine.risk_probe.reports_ood:
        pytest.skip("the session's probe has no OOD reference")

    def count() -> float:
        return sum(s.value for m in served.metrics.registry.collect() if m.name == "featurelens_response_risk_ood"
                   for s in m.samples if s.name.endswith("_count"))

    before = count()
    await stub.Generate(pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="What is 2 + 2?")]),
        sampling=pb.SamplingOptions(temperature=0), stopping=pb.StoppingOptions(max_new_tokens=6),
        interpretability=pb.InterpretabilityOptions(score_risk=True)))
    assert count() == before + 1
