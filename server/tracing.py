"""OpenTelemetry tracing of the RPCs.

Each RPC is one SERVER span that continues the caller's trace when the gRPC metadata carries a W3C
`traceparent` (and `tracestate`), with the request id as an attribute. Generation adds children: `validation`,
then per sample an `engine` span (its engine request, start to finish) holding `queue` (the time vLLM kept the
request waiting before its first schedule, from vLLM's own per-request timestamps) and, when the request asked
for features, risk or steering, `interpretability` (what was asked, the time the frontend waited for codes, the
response risk). Spans are exported over OTLP/gRPC to `--otlp-endpoint`; without one the tracer is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from featurelens.server.config import Settings
    from opentelemetry.sdk.trace import TracerProvider

SERVICE = "featurelens.v1.FeatureLensService"
_PROPAGATOR = TraceContextTextMapPropagator()
# The span of the RPC this task serves (set by the servicer's guard; tasks it starts inherit it).
rpc_span: ContextVar[Span] = ContextVar("featurelens_rpc_span", default=trace.INVALID_SPAN)


def parent_context(metadata: Sequence[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context from gRPC metadata (W3C traceparent / tracestate); empty without one."""
    carrier = {key: value.decode() if isinstance(value, bytes) else value for key, value in metadata or ()
               if key in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(carrier)


def monotonic_to_epoch_ns(ts: float) -> int:
    """A time.monotonic() reading of any process on this host (vLLM's engine core stamps requests with it;
    CLOCK_MONOTONIC is host-wide) as nanoseconds since the epoch, which spans are timed in."""
    return int(ts * 1e9) + time.time_ns() - time.monotonic_ns()


class Tracing:
    """A tracer and, when spans are exported, the provider to flush at shutdown."""

    def __init__(self, tracer: trace.Tracer | None = None, provider: TracerProvider | None = None) -> None:
        self.tracer: trace.Tracer = tracer if tracer is not None else trace.NoOpTracer()
        self.provider = provider

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        """OTLP/gRPC export to settings.otlp_endpoint (http:// plaintext, https:// TLS), or a no-op tracer."""
        if not settings.otlp_endpoint:
            return cls()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = cls.provider_for_service()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        return cls.from_provider(provider)

    @staticmethod
    def provider_for_service() -> TracerProvider:
        """A provider whose resource names this service: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES when set,
        else service.name "featurelens"."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        return TracerProvider(resource=Resource.create({} if named else {"service.name": "featurelens"}))

    @classmethod
    def from_provider(cls, provider: TracerProvider) -> Tracing:
        return cls(provider.get_tracer("featurelens.server"), provider)

    @property
    def recording(self) -> bool:
        return self.provider is not None

    def start_rpc(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Span:
        """The SERVER span of one RPC, child of the caller's span when the metadata carries one; it becomes
        this task's `rpc_span`."""
        span = self.tracer.start_span(f"{SERVICE}/{method}", context=parent_context(metadata), kind=SpanKind.SERVER,
                                      attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method})
        rpc_span.set(span)
        return span

    def start(self, name: str, parent: Span | None = None, attributes: Mapping[str, Any] | None = None,
              start_time: int | None = None) -> Span:
        """A child of `parent` (default: this task's RPC span)."""
        context = trace.set_span_in_context(parent if parent is not None else rpc_span.get())
        return self.tracer.start_span(name, context=context, attributes=attributes, start_time=start_time)

    @contextmanager
    def span(self, name: str, parent: Span | None = None, **attributes: Any) -> Iterator[Span]:
        """A child span around a block; an exception marks it ERROR (and is raised on)."""
        span = self.start(name, parent, attributes)
        try:
            yield span
        except BaseException as error:
            mark_error(span, error)
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        """Flush the spans still queued for export."""
        if self.provider is not None:
            self.provider.shutdown()


def mark_error(span: Span, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))


def end_rpc(span: Span, code: Any, message: str = "") -> None:
    """Ends an RPC span with its gRPC status (ERROR for anything but OK)."""
    value = code.value[0] if hasattr(code, "value") else int(code)
    span.set_attribute("rpc.grpc.status_code", value)
    if value != 0:
        span.set_status(Status(StatusCode.ERROR, f"{getattr(code, 'name', code)}: {message}"[:300]))
    span.end()
