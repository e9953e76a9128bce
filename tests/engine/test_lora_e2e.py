"""LoRA adapters through a real engine: a server of its own with a random low-rank adapter built here in the PEFT
format (q_proj and v_proj of every layer). The adapter changes what the model computes; features and steering
read and edit the adapted residual stream; the prefix cache keeps adapters apart; other modes refuse it."""

from __future__ import annotations

import json

import grpc
import pytest
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

RANK = 8
PROMPT = "The history of the Roman Empire"


def build_adapter(folder, model_path: str, seed: int = 0, scale: float = 0.08) -> None:
    """Random LoRA A/B for q_proj and v_proj of every layer, saved as PEFT does (adapter_config.json +
    adapter_model.safetensors); real mechanics, no trained meaning."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_path / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    outs = {"q_proj": cfg["num_attention_heads"] * head_dim, "v_proj": cfg["num_key_value_heads"] * head_dim}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, out in outs.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=g) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "target_modules": ["q_proj", "v_proj"]}))


@pytest.fixture(scope="module")
async def lora_server(tmp_path_factory, toy_saes):
    from pathlib import Path

    from featurelens.server.app import start_server
    from featurelens.server.config import Settings
    from featurelens.server.model_assets import resolve_model

    folder = tmp_path_factory.mktemp("lora") / "rand"
    build_adapter(folder, Path(resolve_model("default")))
    settings = Settings(port=0, metrics_port=-1, max_num_seqs=2, max_model_len=1024, lora=[f"rand={folder}"],
                        max_lora_rank=RANK, sae=[f"6={toy_saes[6]}"], risk_probe="none", quantized_mode="none",
                        grace_period_s=1.0)
    running = await start_server(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.FeatureLensServiceStub(channel)
        stub.engine = running.engine  # type: ignore[attr-defined]  # for the prefix-cache test
        yield stub
    await running.stop(grace_s=1.0)


def gen(n: int = 16, adapter: str = "", prompt: str = PROMPT, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(temperature=0.0),
                              stopping=pb.StoppingOptions(max_new_tokens=n, ignore_eos=True), adapter=adapter, **kw)


def ids(reply) -> list[int]:
    return [t.token_id for t in reply.tokens]


async def test_model_info_lists_the_adapter(lora_server):
    info = await lora_server.GetModelInfo(pb.GetModelInfoRequest())
    assert [(a.name, a.rank, list(a.target_modules)) for a in info.adapters] == [("rand", RANK, ["q_proj", "v_proj"])]


async def test_the_adapter_changes_the_model_and_base_stays_base(lora_server):
    base, adapted, base_again = [await lora_server.Generate(gen(adapter=a)) for a in ("", "rand", "")]
    assert ids(base) == ids(base_again)
    assert ids(adapted) != ids(base)


async def test_features_read_the_adapted_residual_stream(lora_server):
    interp = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=8)], include_prompt_features=True)
    base, base_again, adapted = [await lora_server.Generate(gen(4, adapter=a, interpretability=interp))
                                 for a in ("", "", "rand")]
    assert list(base.prompt_features) == list(base_again.prompt_features)
    # same prompt tokens; the adapter changed attention in every layer, so layer 6's codes differ from the 2nd on
    assert [t.token_id for t in adapted.prompt_features] == [t.token_id for t in base.prompt_features]
    assert list(adapted.prompt_features)[1:] != list(base.prompt_features)[1:]


async def test_steering_edits_the_adapted_model(lora_server):
    interp = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=64)])
    nudge = pb.SteeringIntervention(layer=6, feature_id=7, op=pb.STEERING_OP_NUDGE, strength=40.0)

    def act(reply) -> float:
        return next((a.activation for a in reply.tokens[0].features[0].activations if a.feature_id == 7), 0.0)

    plain = await lora_server.Generate(gen(4, adapter="rand", interpretability=interp))
    steered = await lora_server.Generate(gen(4, adapter="rand", interpretability=interp, steering=[nudge]))
    assert act(steered) > act(plain) + 30.0  # tied toy SAE: read after the edit, ≈ +strength


async def test_the_prefix_cache_keeps_adapters_apart(lora_server):
    """vLLM hashes KV blocks with the adapter: an adapter's run of a prompt the base model has cached reuses
    none of it, while a second run of the same (base or adapted) prompt does; and what the adapter answers
    after the base run equals a run that reads no cached KV at all (prompt features skip the prefix cache)."""
    from vllm import SamplingParams

    prompt = "A prompt that fills several KV blocks: " + "the quick brown fox jumps over the lazy dog. " * 40
    engine = lora_server.engine
    prompt_ids = engine.encode_text(prompt)

    async def cached_tokens(adapter: str, run: str) -> int:
        last = None
        async for output in engine.generate(f"cache-{run}", prompt_ids, SamplingParams(max_tokens=1), adapter=adapter):
            last = output
        assert last is not None
        return int(last.num_cached_tokens or 0)

    await cached_tokens("", "base-1")
    assert await cached_tokens("", "base-2") > 0  # the prompt is long enough to be cached
    assert await cached_tokens("rand", "adapted-1") == 0  # ... but not across adapters
    assert await cached_tokens("rand", "adapted-2") > 0
    interp = pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=6, top_k=1)], include_prompt_features=True)
    cached = await lora_server.Generate(gen(8, adapter="rand", prompt=prompt))
    fresh = await lora_server.Generate(gen(8, adapter="rand", prompt=prompt, interpretability=interp))
    assert ids(cached) == ids(fresh)


@pytest.mark.parametrize("kw, code", [
    (dict(adapter="missing"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(adapter="rand", mode=pb.INFERENCE_MODE_SPARSE, sparsity_percent=40), grpc.StatusCode.FAILED_PRECONDITION),
])
async def test_refusals(lora_server, kw, code):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lora_server.Generate(gen(2, **{k: v for k, v in kw.items() if k != "adapter"}, adapter=kw["adapter"]))
    assert info.value.code() == code and info.value.details().startswith("adapter: ")
