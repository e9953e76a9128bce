"""The client's generation options over a real gRPC channel to a stand-in servicer that records what arrived:
structured output (sync, asyncio and the CLI) and the typed results."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from featurelens.client import AsyncClient, Client, build_generate_request, pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from tests_support import free_port


class Recorder(pb_grpc.FeatureLensServiceServicer):
    """Answers with a fixed JSON text and keeps every request it got."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def Generate(self, request, context):
        self.requests.append(request)
        n = request.sampling.num_samples or 1
        samples = [pb.Sample(sample_index=i, text=f"answer {i}", finish_reason=pb.FINISH_REASON_EOS,
                             tokens=[pb.Token(token_id=i)], usage=pb.Usage(prompt_tokens=3, completion_tokens=1),
                             risk=pb.ResponseRisk(score=0.1 * i, label=pb.RISK_LABEL_LOW)) for i in range(n)]
        if n == 1:
            return pb.GenerateResponse(text='{"city": "Paris"}', finish_reason=pb.FINISH_REASON_EOS)
        first = samples[0]
        return pb.GenerateResponse(text=first.text, tokens=first.tokens, finish_reason=first.finish_reason,
                                   usage=first.usage, risk=first.risk, samples=samples)

    def GenerateStream(self, request, context):
        self.requests.append(request)
        for i in range(request.sampling.num_samples or 1):
            yield pb.GenerateStreamResponse(text_delta="Paris", finish_reason=pb.FINISH_REASON_EOS, sample_index=i)


@pytest.fixture
def recorder():
    service = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FeatureLensServiceServicer_to_server(service, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(0)


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_json_schema_from_a_dict_and_typed_json_result(recorder):
    service, target = recorder
    with Client(target, timeout_s=10) as client:
        result = client.generate("Capital of France?", json_schema=SCHEMA)
    assert result.json() == {"city": "Paris"}
    sent = service.requests[0].structured_output
    assert sent.WhichOneof("constraint") == "json_schema" and json.loads(sent.json_schema) == SCHEMA


async def test_async_client_streams_with_a_choice(recorder):
    service, target = recorder
    async with AsyncClient(target, timeout_s=10) as client:
        chunks = [c async for c in client.generate_stream("Capital?", choice=["Paris", "Lyon"])]
    assert chunks[-1].text == "Paris" and chunks[-1].finish_reason == "eos"
    assert list(service.requests[0].structured_output.choice.choices) == ["Paris", "Lyon"]


@pytest.mark.parametrize("kwargs, field, value", [
    (dict(regex="[0-9]+"), "regex", "[0-9]+"),
    (dict(grammar='root ::= "a"'), "grammar", 'root ::= "a"'),
    (dict(json_schema='{"type": "integer"}'), "json_schema", '{"type": "integer"}'),
])
def test_each_constraint_lands_in_its_oneof_field(kwargs, field, value):
    for stream in (False, True):
        message = build_generate_request("x", stream=stream, **kwargs).structured_output
        assert message.WhichOneof("constraint") == field and getattr(message, field) == value


def test_no_constraint_leaves_the_field_unset():
    assert not build_generate_request("x").HasField("structured_output")


def test_two_constraints_are_refused_client_side():
    with pytest.raises(ValueError, match="at most one of json_schema, regex"):
        build_generate_request("x", regex="a", grammar='root ::= "a"')
    with pytest.raises(TypeError):
        build_generate_request("x", choice="yes")


def test_cli_sends_the_constraint(recorder, tmp_path):
    service, target = recorder
    grammar = tmp_path / "g.ebnf"
    grammar.write_text('root ::= "yes" | "no"')
    for flags, field in ((["--choice", "yes", "--choice", "no"], "choice"), (["--grammar", f"@{grammar}"], "grammar"),
                         (["--json-schema", json.dumps(SCHEMA), "--no-stream"], "json_schema")):
        out = subprocess.run([sys.executable, "-m", "featurelens.client.cli", "generate", "Capital?", "--target", target,
                              "--timeout-s", "10", *flags], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert service.requests[-1].structured_output.WhichOneof("constraint") == field
    assert service.requests[1].structured_output.grammar == 'root ::= "yes" | "no"'
    both = subprocess.run([sys.executable, "-m", "featurelens.client.cli", "generate", "x", "--regex", "a",
                           "--choice", "b"], capture_output=True, text=True)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_samples_are_typed_and_one_sample_is_a_list_of_one(recorder):
    service, target = recorder
    with Client(target, timeout_s=10) as client:
        several = client.generate("Rome?", n=3, seed=5, temperature=1.0)
        one = client.generate("Rome?")
        chunks = list(client.generate_stream("Rome?", n=2))
    assert service.requests[0].sampling.num_samples == 3 and service.requests[0].sampling.seed == 5
    assert [s.sample_index for s in several.samples] == [0, 1, 2]
    assert [s.text for s in several.samples] == ["answer 0", "answer 1", "answer 2"]
    assert several.samples[2].risk is not None and several.samples[2].risk.score == pytest.approx(0.2)
    assert several.text == several.samples[0].text and several.samples[1].tokens[0].token_id == 1
    assert len(one.samples) == 1 and one.samples[0].text == one.text and one.samples[0].json() == {"city": "Paris"}
    assert [c.sample_index for c in chunks] == [0, 1]


def test_cli_prints_every_sample(recorder):
    service, target = recorder
    out = subprocess.run([sys.executable, "-m", "featurelens.client.cli", "generate", "Rome?", "--target", target,
                          "--timeout-s", "10", "--samples", "2", "--temperature", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["answer 0", "answer 1"]
    assert "[sample 1]" in out.stderr and service.requests[-1].sampling.num_samples == 2


def test_priority_is_sent_by_client_and_cli(recorder):
    service, target = recorder
    with Client(target, timeout_s=10) as client:
        client.generate("x", priority=-2)
    assert service.requests[-1].priority == -2
    out = subprocess.run([sys.executable, "-m", "featurelens.client.cli", "generate", "x", "--target", target,
                          "--timeout-s", "10", "--priority", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert service.requests[-1].priority == 4


def test_adapter_is_sent_and_listed(recorder):
    from featurelens.client.types import AdapterInfo, ModelInfo

    service, target = recorder
    with Client(target, timeout_s=10) as client:
        client.generate("x", adapter="support")
    assert service.requests[-1].adapter == "support"
    out = subprocess.run([sys.executable, "-m", "featurelens.client.cli", "generate", "x", "--target", target,
                          "--timeout-s", "10", "--adapter", "legal"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert service.requests[-1].adapter == "legal"
    info = ModelInfo.from_pb(pb.GetModelInfoResponse(adapters=[pb.AdapterInfo(name="legal", rank=8,
                                                                              target_modules=["q_proj"])]))
    assert info.adapters == [AdapterInfo("legal", 8, ("q_proj",))]
