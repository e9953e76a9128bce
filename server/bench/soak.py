"""`featurelens bench soak`: N concurrent streaming clients for a bounded time against the real server on
loopback, a private Redis killed and restarted in the middle, and a storm of mid-stream cancels.

Prints requests, errors (other than the deliberate cancels), p50/p99 time to first token, and the RSS of the
server process tree at start and end. Goal (issue 8): 0 errors, RSS growth < 10%.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
from collections import Counter

import grpc
import psutil
from featurelens.server.bench.common import parser, saes_for_bench
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc


def _rss_mb() -> float:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int) -> subprocess.Popen:
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _soak(clients: int, duration_s: float, max_new_tokens: int) -> dict:
    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    if shutil.which("redis-server") is None:
        raise SystemExit("bench soak needs redis-server on PATH")
    redis_port = _free_port()
    redis_proc = _start_redis(redis_port)
    running = await start_server(Settings(port=0, metrics_port=-1, sae=saes_for_bench(), max_num_seqs=clients,
                                          max_in_flight=4 * clients, redis_url=f"redis://127.0.0.1:{redis_port}/0"))
    layers = sorted(running.engine.saes)
    outcomes: Counter[str] = Counter()
    ttfts: list[float] = []
    deadline = time.monotonic() + duration_s
    rng = random.Random(0)
    rss_start = _rss_mb()

    async def client_loop(stub: pb_grpc.FeatureLensServiceStub, index: int) -> None:
        while time.monotonic() < deadline:
            if index % 8 == 0:  # some clients hit the cached feature RPC, which uses Redis
                try:
                    await stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(
                        text=f"Soak text {rng.randrange(50)}", features=[pb.FeatureSelection(layer=layers[0])]))
                    outcomes["features_ok"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[f"error_{error.code().name}"] += 1
                continue
            cancel_after = rng.randrange(1, 6) if rng.random() < 0.25 else None  # the cancel storm
            call = stub.GenerateStream(pb.GenerateStreamRequest(
                text=f"Tell me something about number {rng.randrange(1000)}.",
                sampling=pb.SamplingOptions(temperature=0.7, seed=rng.randrange(1 << 30)),
                stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens)))
            started, seen = time.perf_counter(), 0
            try:
                async for chunk in call:
                    if seen == 0 and chunk.tokens:
                        ttfts.append(time.perf_counter() - started)
                    seen += len(chunk.tokens)
                    if cancel_after is not None and seen >= cancel_after:
                        call.cancel()
                        break
                outcomes["cancelled" if cancel_after is not None and seen >= cancel_after else "ok"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes["cancelled" if error.code() == grpc.StatusCode.CANCELLED else
                         f"error_{error.code().name}"] += 1

    async def redis_chaos() -> None:
        nonlocal redis_proc
        await asyncio.sleep(duration_s / 3)
        redis_proc.kill()
        redis_proc.wait()
        outcomes["redis_killed"] += 1
        await asyncio.sleep(duration_s / 6)
        redis_proc = _start_redis(redis_port)
        outcomes["redis_restarted"] += 1

    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=120) as client:
            await asyncio.gather(redis_chaos(), *(client_loop(client.stub, i) for i in range(clients)))
        await asyncio.sleep(1.0)
        leftover = running.engine.num_unfinished_requests()
        rss_end = _rss_mb()
    finally:
        await running.stop(grace_s=1.0)
        redis_proc.kill()
    ttfts.sort()
    return {"outcomes": dict(outcomes), "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else float("nan"),
            "ttft_p99": ttfts[int(len(ttfts) * 0.99)] if ttfts else float("nan"), "rss_start_mb": rss_start,
            "rss_end_mb": rss_end, "unfinished_after": leftover}


def main(argv: list[str] | None = None) -> int:
    ap = parser("soak", __doc__)
    ap.add_argument("--duration-s", type=float, default=60.0, help="how long to run")
    ap.add_argument("--concurrency", type=int, default=64, help="clients at once")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    clients, duration = args.concurrency, args.duration_s
    result = asyncio.run(_soak(clients, duration, args.max_new_tokens))
    outcomes = result["outcomes"]
    errors = sum(v for k, v in outcomes.items() if k.startswith("error_"))
    requests = sum(v for k, v in outcomes.items() if not k.startswith("redis_"))
    print(f"soak: {clients} clients × {duration:.0f}s; requests {requests}, errors {errors} "
          f"(deliberate cancels {outcomes.get('cancelled', 0)}); outcomes {outcomes}")
    print(f"TTFT p50 {result['ttft_p50'] * 1e3:.0f} ms, p99 {result['ttft_p99'] * 1e3:.0f} ms; "
          f"engine requests left after the run: {result['unfinished_after']}")
    growth = result["rss_end_mb"] / result["rss_start_mb"] - 1
    print(f"RSS start {result['rss_start_mb']:.0f} MiB, end {result['rss_end_mb']:.0f} MiB ({growth:+.1%})")
    return 0 if errors == 0 else 1
