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


async def test_a_failed_feature_receiver_is_unavailable_then_recovers(served, stub):
    """The receiver task raising (a bug, a bad message) must not leave health SERVING while feature RPCs time
    out: the waiting RPC gets UNAVAILABLE within a second, health turns NOT_SERVING, and once the receiver
    runs again health is SERVING and features flow."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    receiver = served.engine.features
    real_file = receiver._file

    def broken(records):
        receiver._file = real_file
        raise RuntimeError("injected receiver failure")

    statuses: list[str] = []
    async with grpc.aio.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def watch() -> None:
            while True:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if not statuses or statuses[-1] != name:
                    statuses.append(name)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        receiver._file = broken
        started = time.perf_counter()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetFeatureActivations(_features("The receiver fails while this request waits."))
            took = time.perf_counter() - started
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "feature channel failed" in refused.value.details()
            assert took < 5.0  # one engine pass plus the failure; not the 30 s code timeout
            for _ in range(100):
                if statuses[-1:] == ["SERVING"] and "NOT_SERVING" in statuses:
                    break
                await asyncio.sleep(0.05)
        finally:
            receiver._file = real_file
            watcher.cancel()
    assert statuses[-2:] == ["NOT_SERVING", "SERVING"], statuses
    after = await stub.GetFeatureActivations(_features("After the restart features flow again."))
    assert after.tokens and after.tokens[0].features
