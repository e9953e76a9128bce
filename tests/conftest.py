"""Shared fixtures and the test tiers. Engine-backed tests share ONE real vLLM engine + gRPC server per test
session.

Tiers are folders; each test gets its folder's marker here (`pytest -m unit`, `make test-fast` runs all but
engine):
    unit/    pure functions and in-process parts: no engine, no server
    e2e/     real gRPC servers, real Redis and Prometheus, the client; a stand-in servicer, never vLLM
    engine/  the real vLLM engine (shared per session), over real gRPC channels
    deploy/  images, manifests, dashboards and alert rules
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import pytest
from tests_support import RedisProcess, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "e2e", "engine", "deploy")
ENGINE_FIXTURES = {"served", "stub"}


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, and keep the engine where it belongs: a test outside engine/ that asks
    for the shared engine would make its tier silently slow, so collection fails instead."""
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(TESTS).parts
        tier = parts[0] if len(parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of the tier folders {TIERS}")
        item.add_marker(getattr(pytest.mark, tier))
        wanted = ENGINE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if tier != "engine" and wanted:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(wanted)}: move it to tests/engine/")


TOY_SAE_LAYERS = (6, 27)
SHIPPED = Path(__file__).resolve().parent.parent / "server" / "assets"
TOY_D_SAE = 512


def build_toy_sae(path, layer: int, seed: int, d_in: int = 576) -> None:
    """A random ReLU SAE (unit decoder rows, tied encoder): real mechanics, no trained meaning. The issue
    allows test-built SAEs until the trained ones ship; results computed with it are real computations."""
    import torch
    from featurelens.server.interp.sae import SAE_CLASSES, SaeConfig, layer_to_hook_name, save_sae

    g = torch.Generator().manual_seed(seed)
    cfg = SaeConfig(architecture="standard", d_in=d_in, d_sae=TOY_D_SAE, hook_name=layer_to_hook_name(layer),
                    model_name="SmolLM2-135M-Instruct", apply_b_dec_to_input=False)
    sae = SAE_CLASSES["standard"](cfg)
    w_dec = torch.nn.functional.normalize(torch.randn(TOY_D_SAE, d_in, generator=g), dim=-1)
    sae.W_dec.data, sae.W_enc.data = w_dec, w_dec.T.contiguous()
    save_sae(sae, path)


@pytest.fixture(scope="session")
def toy_saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    paths = {}
    for i, layer in enumerate(TOY_SAE_LAYERS):
        paths[layer] = root / f"toy-l{layer}"
        build_toy_sae(paths[layer], layer, seed=100 + i)
    return paths


def shipped_saes() -> list[Path]:
    return [p.parent for p in sorted((SHIPPED / "saes").glob("*/cfg.json"))]


def write_toy_probe(path: Path, layer: int, sae_id: str) -> None:
    """A probe with hand-set weights on toy features: it exercises the risk machinery (streaming, labels,
    ScoreHallucination parity); only the shipped, trained probe says anything about hallucination."""
    features = [{"layer": layer, "sae_id": sae_id, "feature_id": f, "weight": w}
                for f, w in ((1, 0.02), (2, -0.015), (3, 0.01), (4, 0.02), (5, -0.01))]
    path.write_text(json.dumps({"probe_id": "toy-probe", "version": 1, "kind": "sparse_logreg",
                                "model": "SmolLM2-135M-Instruct", "features": features, "bias": -0.2,
                                "pooling": "mean", "input_transform": "identity",
                                "calibration": {"method": "platt", "a": 1.0, "b": 0.0},
                                "thresholds": {"medium": 0.45, "high": 0.55}}))


@pytest.fixture(scope="session")
def session_redis():
    """A private redis-server for the shared server's feature cache, so tests may stop and restart it."""
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def served(toy_saes, session_redis):
    """A real featurelens server on a free localhost port, started once; records the health statuses
    a client saw while it came up (NOT_SERVING until the engine is warm, then SERVING)."""
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    saes = [f"{layer}={path}" for layer, path in toy_saes.items()] + [str(p) for p in shipped_saes()]
    shipped_probes = sorted((SHIPPED / "probes").glob("*.json"))
    if shipped_probes:
        probe = "default"
    else:
        probe = str(toy_saes[27].parent / "toy-probe.json")
        write_toy_probe(Path(probe), 27, toy_saes[27].name)
    settings = Settings(port=port, metrics_port=0, max_num_seqs=32, grace_period_s=5.0, max_in_flight=64,
                        sae=saes, redis_url=session_redis.url, risk_probe=probe)
    seen: list[str] = []
    startup = asyncio.create_task(start_server(settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not startup.done():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if not seen or seen[-1] != name:
                    seen.append(name)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
        running = startup.result()
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    running.health_seen = seen
    running.target = f"127.0.0.1:{running.port}"
    running.redis = session_redis
    yield running
    await running.stop(grace_s=1.0)


@pytest.fixture
async def stub(served):
    from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(served.target) as channel:
        yield pb_grpc.FeatureLensServiceStub(channel)
