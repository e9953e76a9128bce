"""Structured output through the real engine: JSON Schema, regex, choice and grammar constrain the text, together
with features, risk and steering on the same request; invalid constraints never reach the engine."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
from featurelens.v1 import featurelens_pb2 as pb

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                           "is_capital": {"type": "boolean"}},
          "required": ["city", "is_capital"], "additionalProperties": False}
QUESTION = pb.ChatMessages(messages=[pb.ChatMessage(
    role=pb.CHAT_ROLE_USER, content="Name the capital of France as JSON with the fields city and is_capital.")])


def request(constraint: pb.StructuredOutput, stream: bool = False, n: int = 64,
            sampling: pb.SamplingOptions | None = None, **kw):
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return cls(chat=QUESTION, sampling=sampling or pb.SamplingOptions(temperature=0.0),
               stopping=pb.StoppingOptions(max_new_tokens=n), structured_output=constraint, **kw)


def feature_act(token: pb.Token, feature_id: int) -> float:
    return next((a.activation for a in token.features[0].activations if a.feature_id == feature_id), 0.0)


async def test_steered_risk_scored_request_parses_against_its_schema(served, stub):
    """The issue's test: one request with a JSON Schema, SAE features, risk scoring and a NUDGE; the text is valid
    JSON for the schema, every token carries features and risk, and the steering acted (features are read after
    the edit, so with the tied toy SAE the nudged feature's activation rises by ≈ the strength)."""
    interp = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=64)], score_risk=True)
    nudge = pb.SteeringIntervention(layer=6, feature_id=7, op=pb.STEERING_OP_NUDGE, strength=40.0)
    constraint = pb.StructuredOutput(json_schema=json.dumps(SCHEMA))
    steered = await stub.Generate(request(constraint, interpretability=interp, steering=[nudge]))
    plain = await stub.Generate(request(constraint, interpretability=interp))

    for reply in (steered, plain):
        assert reply.finish_reason == pb.FINISH_REASON_EOS, reply.text
        jsonschema.validate(json.loads(reply.text), SCHEMA)
        assert reply.tokens and all(t.features and t.HasField("risk") for t in reply.tokens)
        assert reply.risk.label != pb.RISK_LABEL_UNSPECIFIED
        assert reply.risk.score == pytest.approx(reply.tokens[-1].risk)
    assert feature_act(steered.tokens[0], 7) > feature_act(plain.tokens[0], 7) + 30.0


async def test_json_schema_streamed_equals_unary(stub):
    constraint = pb.StructuredOutput(json_schema=json.dumps(SCHEMA))
    unary = await stub.Generate(request(constraint))
    chunks = [c async for c in stub.GenerateStream(request(constraint, stream=True))]
    assert "".join(c.text_delta for c in chunks) == unary.text
    assert [t.token_id for c in chunks for t in c.tokens] == [t.token_id for t in unary.tokens]
    jsonschema.validate(json.loads(unary.text), SCHEMA)


@pytest.mark.parametrize("constraint, check", [
    (pb.StructuredOutput(regex=r"[A-Z][a-z]+, [0-9]{4}"), lambda text: re.fullmatch(r"[A-Z][a-z]+, [0-9]{4}", text)),
    (pb.StructuredOutput(choice=pb.ChoiceList(choices=["Paris", "Lyon", "Marseille"])),
     lambda text: text in ("Paris", "Lyon", "Marseille")),
    (pb.StructuredOutput(grammar='root ::= "The answer is " ("yes" | "no") "."'),
     lambda text: text in ("The answer is yes.", "The answer is no.")),
    (pb.StructuredOutput(grammar='start: "The city is " NAME "."\nNAME: /[A-Z][a-z]{1,12}/'),  # Lark
     lambda text: re.fullmatch(r"The city is [A-Z][a-z]{1,12}\.", text)),
])
async def test_regex_choice_and_grammar_constrain_the_text(stub, constraint, check):
    chunks = [c async for c in stub.GenerateStream(request(constraint, stream=True, n=32))]
    text = "".join(c.text_delta for c in chunks)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS, text
    assert check(text), text


async def test_sampled_json_still_parses(stub):
    """Temperature 1 with a seed: sampling within the constraint, not greedy luck."""
    constraint = pb.StructuredOutput(json_schema=json.dumps(SCHEMA))
    parsed = 0
    for seed in (1, 2, 3):
        reply = await stub.Generate(request(constraint, n=96, sampling=pb.SamplingOptions(temperature=1.0, seed=seed)))
        if reply.finish_reason == pb.FINISH_REASON_LENGTH:
            continue  # cut short by max_new_tokens: the only way the text may be incomplete
        parsed += 1
        jsonschema.validate(json.loads(reply.text), SCHEMA)
    assert parsed


@pytest.mark.parametrize("constraint, field", [
    (pb.StructuredOutput(json_schema='{"type": "objectx"}'), "structured_output.json_schema"),
    (pb.StructuredOutput(json_schema="{oops"), "structured_output.json_schema"),
    (pb.StructuredOutput(regex="[a-"), "structured_output.regex"),
    (pb.StructuredOutput(grammar="root ::= "), "structured_output.grammar"),
    (pb.StructuredOutput(choice=pb.ChoiceList()), "structured_output.choice.choices"),
])
async def test_invalid_constraints_are_invalid_argument_before_the_engine(served, stub, constraint, field):
    for stream in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if stream:
                async for _ in stub.GenerateStream(request(constraint, stream=True)):
                    pass
            else:
                await stub.Generate(request(constraint))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":"), info.value.details()
    assert served.engine.num_unfinished_requests() == 0
