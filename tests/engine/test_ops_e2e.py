"""Operability end to end: the shared server's Redis feature cache under an outage, and a real Prometheus
server scraping the real server's /metrics after real RPCs."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from featurelens.v1 import featurelens_pb2 as pb
from tests_support import PrometheusProcess, prometheus_query


def _features(text: str) -> pb.GetFeatureActivationsRequest:
    return pb.GetFeatureActivationsRequest(text=text, features=[pb.FeatureSelection(layer=6, top_k=5)])


def _cache_errors(served) -> float:
    return sum(s.value for m in served.metrics.registry.collect() if m.name == "featurelens_cache_errors"
               for s in m.samples if s.name.endswith("_total"))


async def test_redis_outage_never_fails_an_rpc(served, stub):
    first = await stub.GetFeatureActivations(_features("Redis keeps the features warm."))
    again = await stub.GetFeatureActivations(_features("Redis keeps the features warm."))
    assert (first.cached, again.cached) == (False, True)
    errors_before = _cache_errors(served)
    served.redis.stop()
    try:
        during = await stub.GetFeatureActivations(_features("Redis keeps the features warm."))
        other = await stub.GetFeatureActivations(_features("A request while Redis is down."))
        assert not during.cached and not other.cached
        assert list(during.tokens) == list(first.tokens)  # recomputed result == the cached one
        assert _cache_errors(served) > errors_before
    finally:
        served.redis.start()
    await asyncio.sleep(1.5)  # past the cache's reconnect back-off
    text = "Redis is back and hits resume."
    assert not (await stub.GetFeatureActivations(_features(text))).cached
    assert (await stub.GetFeatureActivations(_features(text))).cached


async def test_real_prometheus_scrapes_the_server(served, stub, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus server not installed (apt-get install -y prometheus)")
    for _ in range(2):
        await stub.Generate(pb.GenerateRequest(text="Metrics please", stopping=pb.StoppingOptions(max_new_tokens=4)))
    prom = PrometheusProcess(binary, served.metrics_http.port, tmp_path)
    try:
        result = await asyncio.to_thread(
            prom.wait_for, 'featurelens_rpc_requests_total{job="featurelens",method="Generate",code="OK"}')
        assert float(result[0]["value"][1]) >= 2
        tokens = prometheus_query(prom.port, 'featurelens_generated_tokens_total{job="featurelens",mode="dense"}')
        assert tokens and float(tokens[0]["value"][1]) >= 8
        info = prometheus_query(prom.port, 'featurelens_engine_info{job="featurelens"}')
        assert info and info[0]["metric"]["model"] == "SmolLM2-135M-Instruct"
    finally:
        prom.stop()
