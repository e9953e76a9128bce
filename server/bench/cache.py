"""`featurelens bench cache`: GetFeatureActivations latency, cached vs recomputed, Redis vs in-process LRU,
through the real gRPC server, in one run. Redis: `--redis-url` (default the local 127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from featurelens.server.bench.common import parser, saes_for_bench
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

TEXT = ("The Roman Empire was the post-Republican state of ancient Rome. It included large territorial holdings "
        "around the Mediterranean Sea in Europe, North Africa, and Western Asia, ruled by emperors.")


async def _latencies(stub: pb_grpc.FeatureLensServiceStub, layers: list[int], repeats: int, cached: bool) -> list[float]:
    out = []
    for i in range(repeats):
        text = TEXT if cached else f"{TEXT} ({uuid.uuid4().hex[:8]} {i})"
        request = pb.GetFeatureActivationsRequest(text=text, features=[pb.FeatureSelection(layer=layer, top_k=32)
                                                                       for layer in layers])
        started = time.perf_counter()
        reply = await stub.GetFeatureActivations(request)
        out.append(time.perf_counter() - started)
        assert reply.cached == cached or (cached and i == 0)
    return out[1:] if cached else out  # the first "cached" call fills the cache


async def _run(redis_url: str, repeats: int) -> dict[str, dict[str, float]]:
    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.cache import make_cache
    from featurelens.server.config import Settings

    running = await start_server(Settings(port=0, metrics_port=-1, sae=saes_for_bench()))
    layers = sorted(running.engine.saes)
    results = {}
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}") as client:
            for backend, url in (("in-process", None), ("redis", redis_url)):
                running.servicer.cache = make_cache(url, 3600, 4 << 20)
                if url:
                    import redis

                    redis.Redis.from_url(url).flushdb()
                uncached = await _latencies(client.stub, layers, repeats, cached=False)
                cached = await _latencies(client.stub, layers, repeats + 1, cached=True)
                results[backend] = {"uncached_ms": statistics.median(uncached) * 1e3,
                                    "cached_ms": statistics.median(cached) * 1e3}
                await running.servicer.cache.close()
    finally:
        await running.stop(grace_s=1.0)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = parser("cache", __doc__)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="the Redis to use")
    ap.add_argument("--repeats", type=int, default=16, help="requests timed per backend and case")
    args = ap.parse_args(argv)
    results = asyncio.run(_run(args.redis_url, repeats=max(5, args.repeats)))
    print(f"{'backend':<11} {'recompute ms':>13} {'cached ms':>10} {'speed-up':>9}")
    for backend, r in results.items():
        print(f"{backend:<11} {r['uncached_ms']:>13.1f} {r['cached_ms']:>10.2f} {r['uncached_ms'] / r['cached_ms']:>8.1f}x")
    return 0
