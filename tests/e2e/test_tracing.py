"""Tracing over a real gRPC channel: the real servicer in front of a stand-in engine (fixed tokens, vLLM-style
queue stamps), spans caught by the SDK's in-memory exporter, and OTLP export to a stand-in collector."""

from __future__ import annotations

import asyncio
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from featurelens.server.config import Settings
from featurelens.server.tracing import Tracing
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

pytest.importorskip("vllm")  # the servicer builds vLLM SamplingParams

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
QUEUE_S = 0.05


class ToyTokenizer:
    def encode_text(self, text: str) -> list[int]:
        return [1 + len(word) for word in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [1, 2, 3]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


class StandInEngine(ToyTokenizer):
    """Three tokens per request, after QUEUE_S 'in the queue', with vLLM's per-request stats stamps."""

    def __init__(self) -> None:
        self.shape = SimpleNamespace(model_id="toy", num_layers=4, hidden_size=8, vocab_size=100, max_model_len=64)
        self.saes: dict = {}
        self.interpretability_available = True
        self.risk_probe = None
        self.sparsity_levels = ()
        self.quantized = None
        self.tokenizer = ToyTokenizer()
        self.features = SimpleNamespace(open=lambda key: None, close=lambda key: None)
        self.errored = False

    def token_text(self, token_id: int) -> str:
        return f"t{token_id}"

    async def generate(self, request_id, prompt_token_ids, params, cache_salt=None, priority=0, adapter=""):
        queued = time.monotonic()
        await asyncio.sleep(QUEUE_S)
        stats = SimpleNamespace(queued_ts=queued, scheduled_ts=time.monotonic())
        for i in range(3):
            await asyncio.sleep(0.002)
            done = i == 2
            completion = SimpleNamespace(token_ids=[10 + i], text=f"t{10 + i}", logprobs=None,
                                         finish_reason="length" if done else None, stop_reason=None)
            yield SimpleNamespace(outputs=[completion], finished=done, metrics=stats)


async def _serve(tracing: Tracing):
    from featurelens.server.api import FeatureLensServicer, add_to_server

    server = grpc.aio.server()
    servicer = FeatureLensServicer(StandInEngine(), Settings(), tracing=tracing)  # type: ignore[arg-type]
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server, target = await _serve(Tracing.from_provider(provider))
    async with grpc.aio.insecure_channel(target) as channel:
        yield pb_grpc.FeatureLensServiceStub(channel), exporter
    await server.stop(0)


def _by_name(spans, name):
    return [s for s in spans if s.name == name]


async def test_a_generate_continues_the_callers_trace_with_its_children(traced):
    stub, exporter = traced
    metadata = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"), ("x-request-id", "trace-me"))
    reply = await stub.Generate(pb.GenerateRequest(text="hello there", sampling=pb.SamplingOptions(num_samples=2)),
                                metadata=metadata)
    assert len(reply.samples) == 2
    spans = exporter.get_finished_spans()
    (root,) = _by_name(spans, "featurelens.v1.FeatureLensService/Generate")
    assert root.kind == SpanKind.SERVER
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == CALLER_SPAN
    assert root.attributes["featurelens.request_id"] == "trace-me"
    assert root.attributes["rpc.method"] == "Generate" and root.attributes["rpc.grpc.status_code"] == 0
    assert root.status.status_code != StatusCode.ERROR
    (validation,) = _by_name(spans, "validation")
    engines = sorted(_by_name(spans, "engine"), key=lambda s: s.attributes["featurelens.sample_index"])
    assert [e.attributes["featurelens.sample_index"] for e in engines] == [0, 1]
    for child in (validation, *engines):
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
    for engine in engines:
        assert engine.attributes["featurelens.completion_tokens"] == 3
        assert engine.attributes["featurelens.finish_reason"] == "FINISH_REASON_LENGTH"
        (queue,) = [s for s in _by_name(spans, "queue") if s.parent.span_id == engine.context.span_id]
        assert queue.attributes["featurelens.queue.source"] == "vllm"
        # vLLM's monotonic stamps, placed on the wall clock: the stand-in's queue wait, inside its engine span
        assert QUEUE_S * 0.8 <= (queue.end_time - queue.start_time) / 1e9 <= QUEUE_S + 0.05
        assert engine.start_time - 5_000_000 <= queue.start_time and queue.end_time <= engine.end_time
    assert not _by_name(spans, "interpretability")  # nothing was asked of it


async def test_a_refused_request_is_an_error_span(traced):
    stub, exporter = traced
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(temperature=5.0)))
    spans = exporter.get_finished_spans()
    (root,) = _by_name(spans, "featurelens.v1.FeatureLensService/Generate")
    assert root.status.status_code == StatusCode.ERROR and "sampling.temperature" in root.status.description
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (validation,) = _by_name(spans, "validation")
    assert validation.status.status_code == StatusCode.ERROR
    assert not _by_name(spans, "engine")


async def test_without_a_traceparent_each_rpc_starts_a_trace(traced):
    stub, exporter = traced
    await stub.Tokenize(pb.TokenizeRequest(text="a b"))
    chunks = [c async for c in stub.GenerateStream(pb.GenerateStreamRequest(text="a b"))]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert sorted(s.name for s in roots) == ["featurelens.v1.FeatureLensService/GenerateStream",
                                             "featurelens.v1.FeatureLensService/Tokenize"]
    assert len({s.context.trace_id for s in roots}) == 2


class Collector:
    """A stand-in OTLP/gRPC collector: keeps every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list = []

    def Export(self, request, context):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_are_exported_over_otlp_to_the_configured_endpoint():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    collector = Collector()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)  # type: ignore[no-untyped-call]
    port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    try:
        tracing = Tracing.from_settings(Settings(otlp_endpoint=f"http://127.0.0.1:{port}"))
        assert tracing.recording
        server, target = await _serve(tracing)
        async with grpc.aio.insecure_channel(target) as channel:
            await pb_grpc.FeatureLensServiceStub(channel).Generate(pb.GenerateRequest(text="hello"))
        await server.stop(0)
        await asyncio.to_thread(tracing.shutdown)  # flushes the batch to the collector
    finally:
        otlp.stop(0)
    resource_spans = [rs for request in collector.requests for rs in request.resource_spans]
    service = {a.key: a.value.string_value for rs in resource_spans for a in rs.resource.attributes}["service.name"]
    names = {s.name for rs in resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert service == "featurelens"
    assert {"featurelens.v1.FeatureLensService/Generate", "validation", "engine", "queue"} <= names


def test_no_endpoint_means_a_no_op_tracer():
    tracing = Tracing.from_settings(Settings())
    assert not tracing.recording
    assert not tracing.tracer.start_span("x").is_recording()
