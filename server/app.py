"""`featurelens serve`: builds the engine, the gRPC server (service + health + reflection) and runs them.

Health reports SERVING only after the engine has warmed up. On SIGTERM/SIGINT health turns NOT_SERVING, new
RPCs are refused and in-flight ones get `grace_period_s` to finish. If the engine process dies, health turns
NOT_SERVING and the process exits non-zero so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from featurelens.server.api import SERVER_VERSION, FeatureLensServicer, add_to_server
from featurelens.server.cache import make_cache
from featurelens.server.config import Settings
from featurelens.server.engine import Engine
from featurelens.server.metrics import Metrics, MetricsServer, start_metrics_server
from featurelens.server.security import (
    BearerTokenInterceptor,
    RequestIdFilter,
    load_server_credentials,
    load_tokens,
    open_methods,
)
from featurelens.server.state import make_vector_store
from featurelens.v1 import featurelens_pb2 as pb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("featurelens.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureLensService"].full_name
ENGINE_DEAD_EXIT_CODE = 3


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(_JsonFormatter() if settings.log_json
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


@dataclass
class RunningServer:
    """A started server; `port` is the bound gRPC port (useful with port=0)."""

    settings: Settings
    engine: Engine
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    servicer: FeatureLensServicer
    port: int
    metrics: Metrics | None = None
    metrics_http: MetricsServer | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        if self.stopped.is_set():
            return
        await self.set_serving(False)
        await self.server.stop(self.settings.grace_period_s if grace_s is None else grace_s)
        for task in self._tasks:
            task.cancel()
        await self.servicer.cache.close()
        if self.servicer.vectors is not None:
            await self.servicer.vectors.close()
        if self.metrics_http is not None:
            self.metrics_http.stop()
        await self.engine.shutdown()
        self.servicer.tracing.shutdown()  # flush the spans still queued for export
        self.stopped.set()


async def start_server(settings: Settings, engine: Engine | None = None) -> RunningServer:
    """Starts the gRPC server at once (health NOT_SERVING), then the engine; SERVING after warm-up."""
    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes)]
    tokens = load_tokens(settings.auth_token_file, settings.auth_tokens)
    interceptors = [BearerTokenInterceptor(tokens, open_methods(settings.health_open, settings.reflection_open))] \
        if tokens else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    engine = engine or Engine(settings)
    metrics, metrics_http = _start_metrics(settings)
    cache = make_cache(settings.redis_url, settings.cache_ttl_s, settings.cache_max_value_bytes,
                       lru_max_bytes=settings.cache_lru_bytes, metrics=metrics)
    log.info("feature cache: %s", "redis" if settings.redis_url else "in-process LRU")
    servicer = FeatureLensServicer(engine, settings, metrics=metrics, cache=cache)
    log.info("traces: %s", f"OTLP/gRPC to {settings.otlp_endpoint}" if settings.otlp_endpoint else "off (--otlp-endpoint)")
    add_to_server(servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file:
        assert settings.tls_key_file is not None  # Settings refuses a certificate without its key
        credentials = load_server_credentials(settings.tls_cert_file, settings.tls_key_file,
                                              settings.tls_client_ca_file)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC to {address}")
    running = RunningServer(settings, engine, server, health_servicer, servicer, port, metrics, metrics_http)
    await running.set_serving(False)
    await server.start()
    log.info("gRPC listening on %s:%d (%s%s; health NOT_SERVING until the engine is warm)", settings.host, port,
             ("mutual TLS" if settings.tls_client_ca_file else "TLS") if settings.tls_cert_file else "plaintext",
             f", bearer-token auth with {len(tokens)} token(s)" if tokens else "")

    try:
        if engine.llm is None:
            await engine.start()
        if engine.features is not None:
            engine.features.on_step = metrics.observe_step_timing
            _watch_receiver(running)
        shape = engine.shape
        assert shape is not None  # known once the engine has started
        servicer.vectors = make_vector_store(settings.redis_url, shape.model_id,
                                             settings.max_vectors_per_caller, settings.max_vector_bytes_per_caller)
        log.info("steering vectors: %s store", servicer.vectors.backend)
        metrics.set_engine_info(shape.model_id, [e.sae_id for e in engine.saes.values()], SERVER_VERSION,
                                settings.kv_cache_dtype)
        started = time.perf_counter()
        await engine.warmup()
    except BaseException:  # a setting this machine cannot serve, a bad SAE, ...: close what was opened, then raise
        await running.stop(grace_s=0)
        raise
    log.info("engine warm in %.1fs", time.perf_counter() - started)
    from featurelens.server.engine import resolve_eager

    log.info("engine: %s (%s); features/steering/risk %s", "eager" if engine.eager else "compiled",
             resolve_eager(settings.enforce_eager)[1],
             "on" if engine.interpretability_available else "REFUSED (no tap call sites)")
    await running.set_serving(True)
    running._tasks.append(asyncio.create_task(_watch_engine(running)))
    return running


def _start_metrics(settings: Settings) -> tuple[Metrics, MetricsServer | None]:
    metrics = Metrics()
    if settings.metrics_port < 0:
        return metrics, None
    http = start_metrics_server(settings.metrics_port, settings.metrics_host, metrics)
    log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, http.port)
    return metrics, http


def _watch_receiver(running: RunningServer) -> None:
    """A failed feature receiver turns health NOT_SERVING at once (its waiting RPCs get UNAVAILABLE) and back
    to SERVING when it runs again, unless the server is stopping."""
    features = running.engine.features
    assert features is not None  # called once the engine has its receiver

    def failed(error: BaseException) -> None:
        running._tasks.append(asyncio.create_task(running.set_serving(False)))

    def recovered() -> None:
        if not running.stopped.is_set() and not running.engine.errored:
            running._tasks.append(asyncio.create_task(running.set_serving(True)))

    features.on_failure, features.on_recovered = failed, recovered


async def _watch_engine(running: RunningServer) -> None:
    """Engine process death → NOT_SERVING and a non-zero exit, so the supervisor restarts us."""
    while not running.stopped.is_set():
        await asyncio.sleep(1.0)
        if running.engine.errored:
            log.critical("the vLLM engine died; health NOT_SERVING, exiting with code %d", ENGINE_DEAD_EXIT_CODE)
            await running.set_serving(False)
            await running.server.stop(1.0)
            running.stopped.set()
            sys.exit(ENGINE_DEAD_EXIT_CODE)


async def serve(settings: Settings) -> int:
    configure_logging(settings)
    log.info("featurelens settings:\n%s", settings.describe())
    if settings.host in ("127.0.0.1", "localhost", "::1") and not settings.tls_cert_file:
        log.info("zero-config mode: plaintext gRPC on localhost only")
    elif not settings.tls_cert_file:
        log.warning("serving plaintext gRPC on %s: set --tls-cert-file/--tls-key-file (and auth tokens) "
                    "beyond a trusted network", settings.host)
    running = await start_server(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    log.info("ready: grpcurl -plaintext -d '{\"text\": \"Hello\"}' %s:%d featurelens.v1.FeatureLensService/Generate",
             settings.host, running.port)
    waiter = asyncio.create_task(stop_requested.wait())
    await asyncio.wait([waiter, asyncio.create_task(running.stopped.wait())], return_when=asyncio.FIRST_COMPLETED)
    if stop_requested.is_set():
        log.info("shutting down: NOT_SERVING, in-flight RPCs get %.0fs", settings.grace_period_s)
        await running.stop()
        return 0
    return ENGINE_DEAD_EXIT_CODE
