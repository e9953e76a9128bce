"""Decoder-only families beyond SmolLM2, served through vLLM: tiny random-weight checkpoints built by the test
(tests/tiny_models.py: hidden 64, 2-3 layers, the SmolLM2 tokenizer), one engine per family, each with a toy SAE
at a middle layer. Per family: generation; SAE features of the residual stream after the tapped layer (prompt
features checked against a Hugging Face transformers forward of the same checkpoint); steering with a
bit-identical unsteered neighbour; ScoreHallucination (a toy probe on the Llama checkpoint, whose tokenizer ends
turns with a token other than EOS; FAILED_PRECONDITION elsewhere); and each inference mode working or refused
cleanly (MoE: int8 on attention only, sparse refused).

Which families run: FEATURELENS_TEST_FAMILIES = "ci" (the default: one per code path of the architecture
adapter, see CI_FAMILIES), "all", or a comma-separated list of tests/tiny_models.py FAMILIES. The families left
out of "ci" share their code path with one in it (qwen2/qwen3/mistral: llama's; gemma3: gemma2's; mixtral:
qwen3_moe's; olmo2: gpt_neox's — vLLM's Transformers backend). Cost on the 2-core dev box (shared with other
sessions, 2026-12-07): 29-94 s of engine start-up per family and a few seconds of tests; the six "ci" families
5 min 55 s and 9 min 37 s in two runs, the other six 4 min 38 s."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tiny_models
import torch
from conftest import build_toy_sae, write_toy_probe
from featurelens.v1 import featurelens_pb2 as pb
from tests_support import pair_in_one_batch

# One per adapter code path: Llama-style fused residual (and a turn terminator other than EOS); MoE; Gemma (no
# lm_head module, extra norms); Phi-3 (fused checkpoint tensors); GPT-2 (plain-tensor layers, Conv1D weights,
# biases); GPT-NeoX (vLLM's Transformers backend, interleaved qkv).
CI_FAMILIES = ("llama", "qwen3_moe", "gemma2", "phi3", "gpt2", "gpt_neox")
_choice = os.environ.get("FEATURELENS_TEST_FAMILIES", "ci")
SELECTED = (CI_FAMILIES if _choice == "ci" else tuple(tiny_models.FAMILIES) if _choice == "all"
            else tuple(f.strip() for f in _choice.split(",") if f.strip()))
ADAPTER = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen2", "mistral": "mistral", "gemma2": "gemma",
           "gemma3": "gemma", "phi3": "phi3", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "olmo2": "olmo2",
           "gpt2": "gpt2", "gpt_neox": "gpt_neox"}
MOE = {"qwen3_moe", "mixtral"}
PROBED = "llama"  # the family served with a toy risk probe (and a tokenizer whose EOS is not the turn end)
THRESHOLD = 0.5  # every projection's WINA threshold at the test's one sparse level: a fraction of inputs zeroed
PROMPT = "The history of the Roman Empire"
STARTUP_S: dict[str, float] = {}  # family -> engine start-up seconds (printed at the end of the module)


@dataclass
class Tiny:
    family: str
    path: Path
    layer: int  # the SAE's layer
    num_layers: int
    sae: Path
    running: Any
    stub: Any


def _thresholds(path: Path, family: str, num_layers: int) -> Path:
    from featurelens.server.worker.model import FAMILIES

    names = next(f for f in FAMILIES if f.name == ADAPTER[family]).projection_names
    path.write_text(json.dumps({"levels": {"40": {f"{i}.{p}": THRESHOLD for i in range(num_layers) for p in names}}}))
    return path


@pytest.fixture(scope="module", params=SELECTED)
async def tiny(request, tmp_path_factory):
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings
    from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

    family = request.param
    root = tmp_path_factory.mktemp(family)
    path = tiny_models.build(family, root / "model", seed=3,
                             eos_token="<|endoftext|>" if family == PROBED else None)
    num_layers = int(json.loads((path / "config.json").read_text()).get("num_hidden_layers")
                     or json.loads((path / "config.json").read_text())["n_layer"])
    layer = num_layers // 2 - (0 if num_layers % 2 else 1)  # a middle layer (HF's last hidden state is normed)
    sae = root / f"tiny-{family}-sae"
    build_toy_sae(sae, layer, seed=11, d_in=tiny_models.HIDDEN)
    probe = "none"
    if family == PROBED:
        probe = str(root / "probe.json")
        write_toy_probe(Path(probe), layer, sae.name)
    settings = Settings(model=str(path), port=0, metrics_port=-1, max_model_len=512, max_num_seqs=8,
                        kv_cache_gib=1, dtype="float32", sae=[f"{layer}={sae}"], risk_probe=probe,
                        sparsity_thresholds=str(_thresholds(root / "thr.json", family, num_layers)),
                        grace_period_s=1.0)
    began = time.perf_counter()
    running = await start_server(settings)
    STARTUP_S[family] = time.perf_counter() - began
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Tiny(family, path, layer, num_layers, sae, running, pb_grpc.FeatureLensServiceStub(channel))
    await running.stop(grace_s=1.0)
    print(f"\n{family}: engine start-up {STARTUP_S[family]:.1f}s")


def gen(text=PROMPT, n=8, features=(), steering=(), mode=pb.INFERENCE_MODE_UNSPECIFIED, sparsity=0, request_id=""):
    return pb.GenerateRequest(text=text, sampling=pb.SamplingOptions(temperature=0.0),
                              stopping=pb.StoppingOptions(max_new_tokens=n, ignore_eos=True),
                              logprobs=pb.LogprobOptions(token_logprobs=True, top_logprobs=3),
                              interpretability=pb.InterpretabilityOptions(
                                  features=[pb.FeatureSelection(layer=layer, top_k=k) for layer, k in features]),
                              steering=list(steering), mode=mode, sparsity_percent=sparsity, request_id=request_id)


def logprobs_of(reply) -> list[tuple[int, float, list]]:
    return [(t.token_id, t.logprob, [(a.token_id, a.logprob) for a in t.top_logprobs]) for t in reply.tokens]


async def test_generates_and_describes_the_model(tiny):
    info = await tiny.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (tiny.num_layers, 64, tiny_models.VOCAB)
    assert [(s.layer, s.d_in) for s in info.saes] == [(tiny.layer, 64)] and info.interpretability_available
    first = await tiny.stub.Generate(gen())
    again = await tiny.stub.Generate(gen())
    assert len(first.tokens) == 8 and logprobs_of(first) == logprobs_of(again)
    chat = await tiny.stub.Generate(pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Hi")]),
        sampling=pb.SamplingOptions(temperature=0.0), stopping=pb.StoppingOptions(max_new_tokens=4, ignore_eos=True)))
    assert len(chat.tokens) == 4


def offline_stream(path: Path, ids: list[int], layer: int) -> torch.Tensor:
    """The residual stream after block `layer`, from a Hugging Face transformers forward (float32, as served)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0]  # hidden_states[0] is the embedding output


async def test_prompt_features_are_the_residual_stream_after_the_layer(tiny):
    """Where the adapter reads the stream (hidden + residual, or the layer's output) is where HF's
    hidden_states are: the served codes equal the SAE applied to an offline forward."""
    from featurelens.server.interp.sae import load_sae

    reply = await tiny.stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(
        text=PROMPT, features=[pb.FeatureSelection(layer=tiny.layer, top_k=8)]))
    ids = [t.token_id for t in reply.tokens]
    stream = await asyncio.to_thread(offline_stream, tiny.path, ids, tiny.layer)
    dense = load_sae(tiny.sae).encode(stream.float())
    scale = float(dense.max())
    assert scale > 0
    for position, token in enumerate(reply.tokens):
        acts = token.features[0].activations
        assert len(acts) == 8
        for a in acts:
            assert abs(a.activation - float(dense[position, a.feature_id])) <= 0.01 * scale + 1e-3
        served = {a.feature_id for a in acts}
        assert len(served & set(torch.topk(dense[position], 8).indices.tolist())) >= 7


async def test_generated_tokens_carry_features(tiny):
    reply = await tiny.stub.Generate(gen(features=[(tiny.layer, 4)]))
    for token in reply.tokens:
        (lf,) = token.features
        acts = [a.activation for a in lf.activations]
        assert lf.layer == tiny.layer and len(acts) == 4 and acts == sorted(acts, reverse=True) and min(acts) > 0


def nudge(layer: int, feature: int, strength: float) -> pb.SteeringIntervention:
    return pb.SteeringIntervention(layer=layer, feature_id=feature, op=pb.STEERING_OP_NUDGE, strength=strength)


async def test_steering_changes_the_request_and_not_its_neighbour(tiny):
    neighbour = gen("A short poem about rivers:", n=12, features=[(tiny.layer, 6)])
    steered = gen(n=12, steering=[nudge(tiny.layer, 3, 200.0)])
    plain = gen(n=12)
    engine = tiny.running.engine
    with_steering, _ = await pair_in_one_batch(tiny.stub, neighbour, steered, 21, engine, blocker_words=30,
                                               blocker_extra_tokens=120)
    without, _ = await pair_in_one_batch(tiny.stub, neighbour, plain, 22, engine, blocker_words=30,
                                         blocker_extra_tokens=120)
    assert logprobs_of(with_steering[0]) == logprobs_of(without[0])
    assert [list(t.features) for t in with_steering[0].tokens] == [list(t.features) for t in without[0].tokens]
    assert [t.token_id for t in with_steering[1].tokens] != [t.token_id for t in without[1].tokens]


async def test_score_hallucination(tiny):
    request = pb.ScoreHallucinationRequest(text="Who wrote Hamlet?", response="Shakespeare wrote it.")
    engine = tiny.running.engine
    if tiny.family != PROBED:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await tiny.stub.ScoreHallucination(request)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no risk probe is loaded" in error.value.details()
        return
    # This tokenizer's EOS is <|endoftext|>, its chat template ends a turn with <|im_end|>: the scored sequence
    # ends with what the model would generate to end its answer.
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.turn_end_id == im_end != engine.tokenizer.eos_token_id
    reply = await tiny.stub.ScoreHallucination(pb.ScoreHallucinationRequest(
        text=request.text, response=request.response, return_token_risks=True))
    n = len(engine.tokenizer.encode(request.response, add_special_tokens=False))
    assert reply.response_tokens == n + 1 == len(reply.token_risks)
    assert 0.0 <= reply.risk.score <= 1.0


async def test_each_mode_works_or_is_refused_cleanly(tiny):
    info = await tiny.stub.GetModelInfo(pb.GetModelInfoRequest())
    modes = {m.mode: m for m in info.modes}
    engine = tiny.running.engine

    quant = modes[pb.INFERENCE_MODE_QUANTIZED]
    assert quant.available, quant.description
    assert ("mixture-of-experts" in quant.description) == (tiny.family in MOE), quant.description
    dense = await tiny.stub.Generate(gen(n=6))
    reply = await tiny.stub.Generate(gen(n=6, mode=pb.INFERENCE_MODE_QUANTIZED, request_id=f"q-{tiny.family}"))
    assert reply.mode == pb.INFERENCE_MODE_QUANTIZED and len(reply.tokens) == 6
    stats = await engine.quant_stats()
    (key,) = [k for k in stats if k.startswith(f"q-{tiny.family}-")]
    assert stats[key]["rows"] >= 6 and stats[key]["lm_head_rows_total"] >= 6
    assert logprobs_of(reply) != logprobs_of(dense)  # the int8 projections and head really ran
    assert abs(reply.tokens[0].logprob - dense.tokens[0].logprob) < 0.5  # and stay close to dense

    sparse = modes[pb.INFERENCE_MODE_SPARSE]
    request = gen(n=6, mode=pb.INFERENCE_MODE_SPARSE, sparsity=40, request_id=f"s-{tiny.family}")
    if tiny.family in MOE:
        assert not sparse.available and "mixture-of-experts" in sparse.description, sparse.description
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await tiny.stub.Generate(request)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details().startswith("mode:"), error.value.details()
        return
    assert sparse.available and list(sparse.sparsity_levels_percent) == [40], sparse.description
    reply = await tiny.stub.Generate(request)
    assert reply.mode == pb.INFERENCE_MODE_SPARSE and len(reply.tokens) == 6
    stats = await engine.sparsity_stats()
    (key,) = [k for k in stats if k.startswith(f"s-{tiny.family}-")]
    assert 0.05 < stats[key]["zeroed_fraction"] < 0.95, stats[key]
