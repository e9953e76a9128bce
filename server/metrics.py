"""Prometheus metrics: one registry of our own, the series the server records, and the /metrics endpoint.

The registry is private (not prometheus_client's global REGISTRY) so that vLLM's or a test's metrics never
collide with ours and every test can build a fresh `Metrics`. Labels are bounded on purpose: RPC method,
status code, mode, model, steering op, layer, cache backend and error kind are all small fixed sets. Request
ids, prompts and other free text never become labels (each distinct value would be a new series forever).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from http.server import HTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import start_http_server

NAMESPACE = "featurelens"

# Buckets in seconds. RPCs span cheap info calls to multi-second generations.
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# SAE encode and risk probe run per engine step, so their interesting range is sub-millisecond to ~1 s.
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# Risk is a probability: 0.05-wide buckets give histogram_quantile enough resolution around the thresholds.
RISK_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# ResponseRisk.ood: shares of unseen codes; held-out-entity answers sit near 0.01, new kinds of questions higher.
OOD_BUCKETS = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)

# Values outside these sets are recorded as "other" so a bug or a hostile client cannot mint new series.
MODES = frozenset({"dense", "sparse", "quantized"})
STEERING_OPS = frozenset({"nudge", "pin", "scale", "ablate", "add"})
CACHE_RESULTS = frozenset({"hit", "miss"})
CACHE_ERROR_KINDS = frozenset({"connection", "timeout", "corrupt", "oversize", "response", "other"})
MAX_LAYER_LABEL = 1024


def _bounded(value: object, allowed: frozenset[str]) -> str:
    text = _label_text(value)
    return text if text in allowed else "other"


def _label_text(value: object) -> str:
    """Enum members (grpc.StatusCode, proto enums wrapped in Enum) become their lower-case name."""
    if isinstance(value, Enum):
        value = value.name
    text = str(value).lower()
    for prefix in ("inference_mode_", "steering_op_"):  # proto enum names → short label values
        text = text.removeprefix(prefix)
    return text


class Metrics:
    """All featurelens series on one private registry, plus the small helpers the server calls."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "featurelens_rpc_requests", "gRPC calls finished, by method and status code.",
            ["method", "code"], registry=r)
        self.rpc_duration = Histogram(
            "featurelens_rpc_duration_seconds", "Wall time of a gRPC call, from receipt to last message.",
            ["method"], buckets=RPC_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "featurelens_time_to_first_token_seconds",
            "Time from request receipt to the first generated token.", ["mode"], buckets=TTFT_BUCKETS,
            registry=r)
        self.inter_token_latency = Histogram(
            "featurelens_inter_token_latency_seconds", "Time between consecutive generated tokens.",
            ["mode"], buckets=ITL_BUCKETS, registry=r)
        self.request_duration = Histogram(
            "featurelens_request_duration_seconds", "End-to-end time of a generation request.",
            ["mode"], buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "featurelens_prompt_tokens", "Prompt tokens processed.", ["mode"], registry=r)
        self.generated_tokens = Counter(
            "featurelens_generated_tokens", "Tokens generated.", ["mode"], registry=r)
        self.requests_in_flight = Gauge(
            "featurelens_requests_in_flight", "Generation requests running in the engine now.", registry=r)
        self.requests_queued = Gauge(
            "featurelens_requests_queued", "Requests admitted but waiting for an engine slot.", registry=r)
        self.response_risk = Histogram(
            "featurelens_response_risk", "Calibrated hallucination risk of scored responses, in [0, 1].",
            ["model", "mode"], buckets=RISK_BUCKETS, registry=r)
        self.high_risk_responses = Counter(
            "featurelens_high_risk_responses", "Scored responses labelled HIGH risk.",
            ["model", "mode"], registry=r)
        self.response_risk_ood = Histogram(
            "featurelens_response_risk_ood",
            "How far scored responses lie from the risk probe's training data (ResponseRisk.ood, in [0, 1]: "
            "1 - cosine similarity to the nearest training answer's SAE codes, or the share of codes on "
            "features training never saw, as the probe file says).",
            ["model", "mode"], buckets=OOD_BUCKETS, registry=r)
        self.steering_interventions = Counter(
            "featurelens_steering_interventions", "Steering interventions applied, by operation.",
            ["op"], registry=r)
        self.features_returned = Counter(
            "featurelens_features_returned", "SAE feature activations returned to clients, by layer.",
            ["layer"], registry=r)
        self.cache_requests = Counter(
            "featurelens_cache_requests", "Feature cache lookups, by backend and result (hit|miss).",
            ["backend", "result"], registry=r)
        self.cache_errors = Counter(
            "featurelens_cache_errors",
            "Feature cache failures served without the cache, by backend and kind "
            "(connection|timeout|corrupt|oversize|response|other).",
            ["backend", "kind"], registry=r)
        self.sae_encode_seconds = Histogram(
            "featurelens_sae_encode_seconds", "Time to SAE-encode one engine step (all requests, all layers).",
            buckets=STEP_BUCKETS, registry=r)
        self.risk_seconds = Histogram(
            "featurelens_risk_seconds", "Time to run the risk probe for one engine step.",
            buckets=STEP_BUCKETS, registry=r)
        # Exposed as featurelens_engine_info{model,saes,version,kv_cache_dtype} 1 (Info appends _info).
        self.engine_info = Info(
            "featurelens_engine", "Model, SAEs and server version this replica serves.", registry=r)

    # ---- RPC level --------------------------------------------------------------------------------------

    def observe_rpc(self, method: str, code: object, seconds: float) -> None:
        """`method` is the RPC's short name (e.g. "Generate"); `code` a grpc.StatusCode or its name."""
        code_label = code.name if isinstance(code, Enum) else str(code).upper()
        self.rpc_requests.labels(method=method, code=code_label).inc()
        self.rpc_duration.labels(method=method).observe(seconds)

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Counts a request in `featurelens_requests_in_flight` while the block runs."""
        self.requests_in_flight.inc()
        try:
            yield
        finally:
            self.requests_in_flight.dec()

    @contextmanager
    def queued(self) -> Iterator[None]:
        """Counts a request in `featurelens_requests_queued` while it waits for admission."""
        self.requests_queued.inc()
        try:
            yield
        finally:
            self.requests_queued.dec()

    # ---- generation -------------------------------------------------------------------------------------

    def observe_time_to_first_token(self, mode: object, seconds: float) -> None:
        self.time_to_first_token.labels(mode=_bounded(mode, MODES)).observe(seconds)

    def observe_inter_token_latency(self, mode: object, seconds: float) -> None:
        self.inter_token_latency.labels(mode=_bounded(mode, MODES)).observe(seconds)

    def observe_request(self, mode: object, seconds: float, prompt_tokens: int, generated_tokens: int) -> None:
        """Call once per finished generation request."""
        label = _bounded(mode, MODES)
        self.request_duration.labels(mode=label).observe(seconds)
        self.prompt_tokens.labels(mode=label).inc(max(0, prompt_tokens))
        self.generated_tokens.labels(mode=label).inc(max(0, generated_tokens))

    # ---- interpretability -------------------------------------------------------------------------------

    def observe_response_risk(self, model: str, mode: object, score: float, high: bool) -> None:
        labels = {"model": model, "mode": _bounded(mode, MODES)}
        self.response_risk.labels(**labels).observe(min(1.0, max(0.0, score)))
        if high:
            self.high_risk_responses.labels(**labels).inc()

    def observe_response_ood(self, model: str, mode: object, ood: float) -> None:
        self.response_risk_ood.labels(model=model, mode=_bounded(mode, MODES)).observe(min(1.0, max(0.0, ood)))

    def count_steering(self, op: object, n: int = 1) -> None:
        self.steering_interventions.labels(op=_bounded(op, STEERING_OPS)).inc(n)

    def count_features_returned(self, layer: int, n: int) -> None:
        label = str(layer) if 0 <= layer < MAX_LAYER_LABEL else "other"
        self.features_returned.labels(layer=label).inc(n)

    def observe_step_timing(self, encode_seconds: float, risk_seconds: float) -> None:
        """One engine step's interpretability work, as the worker measured it (a step that sent codes)."""
        self.sae_encode_seconds.observe(encode_seconds)
        if risk_seconds > 0:
            self.risk_seconds.observe(risk_seconds)

    def set_engine_info(self, model: str, saes: list[str] | str, version: str, kv_cache_dtype: str = "auto") -> None:
        saes_text = saes if isinstance(saes, str) else ",".join(saes)
        self.engine_info.info({"model": model, "saes": saes_text, "version": version,
                               "kv_cache_dtype": kv_cache_dtype})

    # ---- cache ------------------------------------------------------------------------------------------

    def count_cache_lookup(self, backend: str, hit: bool) -> None:
        self.cache_requests.labels(backend=backend, result="hit" if hit else "miss").inc()

    def count_cache_error(self, backend: str, kind: str) -> None:
        self.cache_errors.labels(backend=backend, kind=_bounded(kind, CACHE_ERROR_KINDS)).inc()

    # ---- exposition -------------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as /metrics serves it."""
        return generate_latest(self.registry)

    def series_names(self) -> set[str]:
        """Every sample name this registry can expose (e.g. `x_total`, `x_bucket`), for checking that
        dashboards and alerts only query series that exist, even before anything was recorded."""
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "info": ("_info",),
            "gauge": ("",),
        }
        names: set[str] = set()
        for family in self.registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        return names


class MetricsServer:
    """Handle on the background /metrics HTTP server; `port` is the bound port (useful with port 0)."""

    def __init__(self, server: HTTPServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, host: str = "0.0.0.0", metrics: Metrics | None = None) -> MetricsServer:
    """Serve `metrics` (default: a fresh Metrics) at http://host:port/metrics from a daemon thread."""
    metrics = metrics if metrics is not None else Metrics()
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(server, thread)

