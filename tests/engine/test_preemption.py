"""Preemption does not change what a stream reports: a KV cache of a few blocks forces vLLM to preempt and
recompute requests while 32 risk-scored, feature-capturing streams run at once (a tiny random-weight Llama,
a toy SAE and probe, the real engine). Each stream's tokens, features and per-token risks equal its solo run.

The re-sent prefill usually arrives after the handler has read those positions, so this run rarely meets a
double-filed risk term; the filing itself is pinned by tests/unit/test_capture.py
(test_a_prefill_sent_again_after_preemption_replaces_what_was_filed, which fails with additive filing)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from conftest import build_toy_sae
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY
from tiny_models import HIDDEN, build

STREAMS, NEW_TOKENS, LAYER = 32, 64, 1  # prompt + answer ~170 tokens: a second block mid-decode


def _preemptions() -> float:
    return sum(sample.value for metric in REGISTRY.collect() if "preemption" in metric.name
               for sample in metric.samples if sample.name.endswith("_total"))


def _request(i: int) -> pb.GenerateStreamRequest:
    text = f"Stream {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(35))  # ~103 tokens: one block
    return pb.GenerateStreamRequest(
        text=text, sampling=pb.SamplingOptions(temperature=0.0),
        stopping=pb.StoppingOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        interpretability=pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=LAYER, top_k=4)],
                                                    score_risk=True))


async def _run(stub, i: int) -> list[tuple]:
    out = []
    async for chunk in stub.GenerateStream(_request(i), timeout=600):
        for token in chunk.tokens:
            (layer,) = token.features
            out.append((token.token_id, [(a.feature_id, a.activation) for a in layer.activations], token.risk))
    return out


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    model = build("llama", root / "llama")
    build_toy_sae(root / "sae", LAYER, seed=7, d_in=HIDDEN)
    features = [{"layer": LAYER, "sae_id": "sae", "feature_id": f, "weight": w}
                for f, w in ((1, 0.2), (2, -0.15), (3, 0.1), (4, 0.2), (5, -0.1), (6, 0.3), (7, -0.2))]
    probe = root / "probe.json"
    probe.write_text(json.dumps({"probe_id": "toy", "version": 1, "kind": "sparse_logreg", "model": "tiny",
                                 "features": features, "bias": -0.2, "pooling": "mean",
                                 "input_transform": "identity", "calibration": {"method": "platt", "a": 1.0, "b": 0.0},
                                 "thresholds": {"medium": 0.45, "high": 0.55}}))
    return str(model), f"{LAYER}={root / 'sae'}", str(probe)


async def test_streams_under_preemption_equal_their_solo_runs(tiny_setup):
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    model, sae, probe = tiny_setup
    # 8 blocks of 128 tokens: 8 prompts fit, and every stream needs a second block as it decodes past 128.
    settings = Settings(model=model, port=0, metrics_port=-1, max_num_seqs=STREAMS, max_model_len=512,
                        kv_cache_blocks=8, sae=[sae], risk_probe=probe, max_in_flight=STREAMS * 2)
    running = await start_server(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.FeatureLensServiceStub(channel)
            solo = [await _run(stub, i) for i in range(STREAMS)]
            before = _preemptions()
            together = await asyncio.gather(*(_run(stub, i) for i in range(STREAMS)))
            preempted = _preemptions() - before
    finally:
        await running.stop(grace_s=0)
    assert preempted > 0, "the KV cache was large enough: nothing was preempted, the test proves nothing"
    for i, (alone, batched) in enumerate(zip(solo, together, strict=True)):
        assert len(batched) == NEW_TOKENS
        assert [t[0] for t in batched] == [t[0] for t in alone], f"stream {i}: tokens"
        for (_, feats_a, risk_a), (_, feats_b, risk_b) in zip(alone, batched, strict=True):
            assert [f for f, _ in feats_b] == [f for f, _ in feats_a], f"stream {i}: feature ids"
            assert [v for _, v in feats_b] == pytest.approx([v for _, v in feats_a], rel=2e-2, abs=2e-2)
            assert risk_b == pytest.approx(risk_a, abs=2e-3), f"stream {i}: risk"
