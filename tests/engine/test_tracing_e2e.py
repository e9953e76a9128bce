"""Tracing through the real engine: the shared server's tracer is swapped for the SDK's in-memory exporter while
a steered, risk-scored request with features runs; its spans carry vLLM's own queue stamps and what the
interpretability side did."""

from __future__ import annotations

import pytest
from featurelens.server.tracing import Tracing
from featurelens.v1 import featurelens_pb2 as pb
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def spans(served):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = served.servicer.tracing
    served.servicer.tracing = Tracing.from_provider(provider)
    yield exporter
    served.servicer.tracing = before


async def test_a_steered_risk_scored_request_is_traced_end_to_end(stub, spans):
    interp = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=4)], score_risk=True)
    nudge = pb.SteeringIntervention(layer=6, feature_id=7, op=pb.STEERING_OP_NUDGE, strength=8.0)
    request = pb.GenerateStreamRequest(text="The history of Rome", sampling=pb.SamplingOptions(temperature=0.0),
                                       stopping=pb.StoppingOptions(max_new_tokens=6, ignore_eos=True),
                                       interpretability=interp, steering=[nudge], priority=0)
    metadata = (("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01"), ("x-request-id", "traced-1"))
    chunks = [c async for c in stub.GenerateStream(request, metadata=metadata)]
    final = chunks[-1]

    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished}
    root = by_name["featurelens.v1.FeatureLensService/GenerateStream"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID and root.attributes["featurelens.request_id"] == "traced-1"
    engine, queue, interp_span = by_name["engine"], by_name["queue"], by_name["interpretability"]
    assert engine.parent.span_id == root.context.span_id and by_name["validation"].parent.span_id == root.context.span_id
    assert queue.parent.span_id == engine.context.span_id == interp_span.parent.span_id
    # our engine keeps vLLM's per-request stats: the queue span is vLLM's queued → scheduled, inside the request
    assert queue.attributes["featurelens.queue.source"] == "vllm"
    assert engine.start_time - 5_000_000 <= queue.start_time <= queue.end_time <= engine.end_time
    assert engine.attributes["featurelens.completion_tokens"] == 6
    assert tuple(interp_span.attributes["featurelens.features.layers"]) == (6,)
    assert interp_span.attributes["featurelens.risk"] is True
    assert interp_span.attributes["featurelens.steering.interventions"] == 1
    assert interp_span.attributes["featurelens.risk.score"] == pytest.approx(final.risk.score)
    assert interp_span.attributes["featurelens.interp.frontend_s"] > 0
