"""In-engine interpretability, end to end: SAE features and per-request steering inside the real vLLM
worker, over a real gRPC channel, with SAEs built by the test session (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch
from featurelens.server.interp.sae import load_sae
from featurelens.v1 import featurelens_pb2 as pb
from tests_support import pair_in_one_batch

PROMPT = "The history of the Roman Empire"


def gen(text=PROMPT, n=12, features=(), steering=(), prompt_features=False, stream=False, **kw):
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return cls(text=text, sampling=pb.SamplingOptions(temperature=0.0),
               stopping=pb.StoppingOptions(max_new_tokens=n, ignore_eos=True),
               logprobs=pb.LogprobOptions(token_logprobs=True, top_logprobs=5),
               interpretability=pb.InterpretabilityOptions(
                   features=[pb.FeatureSelection(layer=layer, top_k=k) for layer, k in features],
                   include_prompt_features=prompt_features),
               steering=list(steering), **kw)


def nudge(layer, feature, strength, **kw):
    return pb.SteeringIntervention(layer=layer, feature_id=feature, op=pb.STEERING_OP_NUDGE, strength=strength, **kw)


def logprobs_of(reply) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for t in reply.tokens]


async def test_model_info_lists_saes(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    toy = sorted((s.layer, s.d_sae) for s in info.saes if s.sae_id.startswith("toy-"))
    assert toy == [(6, 512), (27, 512)]
    assert info.interpretability_available


async def test_generate_returns_topk_features_per_token(stub):
    reply = await stub.Generate(gen(features=[(6, 8), (27, 4)]))
    assert len(reply.tokens) == 12
    for token in reply.tokens:
        assert [lf.layer for lf in token.features] == [6, 27]
        for lf, k in zip(token.features, (8, 4), strict=True):
            acts = [a.activation for a in lf.activations]
            assert 0 < len(acts) <= k and acts == sorted(acts, reverse=True) and min(acts) > 0


async def test_streamed_features_equal_unary(stub):
    unary = await stub.Generate(gen(features=[(6, 8)]))
    streamed = [t async for chunk in stub.GenerateStream(gen(features=[(6, 8)], stream=True)) for t in chunk.tokens]
    assert [t.token_id for t in streamed] == [t.token_id for t in unary.tokens]
    assert [list(t.features) for t in streamed] == [list(t.features) for t in unary.tokens]


def offline_codes(model_path: str, sae_path, text_ids: list[int], layer: int) -> torch.Tensor:
    """HF transformers forward (bf16, as served) + the same SAE, entirely outside vLLM."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(torch.tensor([text_ids]), output_hidden_states=True)
    resid = out.hidden_states[layer + 1][0]  # hidden_states[0] is the embedding output
    return load_sae(sae_path).encode(resid.float())


async def test_prompt_features_match_offline_computation(served, stub, toy_saes):
    reply = await stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(
        text=PROMPT, features=[pb.FeatureSelection(layer=6, top_k=8)]))
    ids = [t.token_id for t in reply.tokens]
    dense = await asyncio.to_thread(offline_codes, served.engine.model_path, toy_saes[6], ids, 6)
    scale = float(dense.max())
    checked = 0
    for position, token in enumerate(reply.tokens):
        for a in token.features[0].activations:
            # bf16 kernels differ between vLLM and transformers; allow a few % of the activation scale.
            assert abs(a.activation - float(dense[position, a.feature_id])) <= 0.05 * scale + 0.02
            checked += 1
        served_top = {a.feature_id for a in token.features[0].activations}
        offline_top = set(torch.topk(dense[position], 8).indices.tolist())
        assert len(served_top & offline_top) >= 5
    assert checked >= 8 * len(ids) * 0.9


async def test_feature_activations_cached_equal_recomputed(stub):
    request = pb.GetFeatureActivationsRequest(text="Caching is a classic trade-off.",
                                              features=[pb.FeatureSelection(layer=27, top_k=6)])
    first = await stub.GetFeatureActivations(request)
    second = await stub.GetFeatureActivations(request)
    assert not first.cached and second.cached
    assert list(first.tokens) == list(second.tokens)


async def test_feature_cache_keys_carry_the_engine_identity(served, stub):
    """A replica whose weights, dtype, KV dtype or SAE matmul dtype differ must not reuse these codes."""
    identity = served.engine.codes_identity
    assert "weights=" in identity and f"dtype={served.engine.dtype}" in identity and "sae_gemm=" in identity
    request = pb.GetFeatureActivationsRequest(text="Keys name the engine that computed the codes.",
                                              features=[pb.FeatureSelection(layer=27, top_k=6)])
    assert not (await stub.GetFeatureActivations(request)).cached
    assert (await stub.GetFeatureActivations(request)).cached
    served.engine.codes_identity = identity.replace("kv_cache_dtype=", "kv_cache_dtype=other-")
    try:
        assert not (await stub.GetFeatureActivations(request)).cached
    finally:
        served.engine.codes_identity = identity


async def test_include_prompt_features_on_generate(stub):
    reply = await stub.Generate(gen(features=[(6, 4)], prompt_features=True, n=3))
    tokens = await stub.Tokenize(pb.TokenizeRequest(text=PROMPT))
    assert [t.token_id for t in reply.prompt_features] == list(tokens.token_ids)
    assert all(t.features[0].activations for t in reply.prompt_features)


async def test_unsteered_neighbour_is_bit_identical(served, stub):
    """A steered and an unsteered request in one batch: the unsteered one's tokens, logprobs and features
    equal those of the same batch with nothing steered."""
    neighbour = gen("A short poem about rivers:", n=16, features=[(27, 6)])
    steered = gen(n=16, steering=[nudge(6, 3, 60.0), nudge(27, 9, 60.0)])
    plain = gen(n=16)
    with_steering, peak = await pair_in_one_batch(stub, neighbour, steered, 11, served.engine)
    without, _ = await pair_in_one_batch(stub, neighbour, plain, 12, served.engine)
    assert peak >= 3
    assert logprobs_of(with_steering[0]) == logprobs_of(without[0])
    assert [list(t.features) for t in with_steering[0].tokens] == [list(t.features) for t in without[0].tokens]
    assert [t.token_id for t in with_steering[1].tokens] != [t.token_id for t in without[1].tokens]


async def test_batched_capture_and_steering_go_to_the_right_request(served, stub):
    """The worker encodes the rows of all capturing requests at a layer in one call and steers the rows of
    each distinct steering list together: each request in a mixed batch gets what it gets next to a plain
    neighbour (tokens and logprobs bit-identical; features the same up to the encode's batch rounding)."""
    a = gen("A short poem about rivers:", n=10, features=[(6, 8)], steering=[nudge(6, 3, 40.0)])
    b = gen(n=10, features=[(6, 4), (27, 5)], steering=[nudge(27, 9, 40.0)])
    both, _ = await pair_in_one_batch(stub, a, b, 21, served.engine)
    a_alone, _ = await pair_in_one_batch(stub, a, gen(n=10), 22, served.engine)
    b_alone, _ = await pair_in_one_batch(stub, gen("A short poem about rivers:", n=10), b, 23, served.engine)

    def same_features(x, y) -> None:
        assert len(x.tokens) == len(y.tokens) == 10
        for tx, ty in zip(x.tokens, y.tokens, strict=True):
            assert [lf.layer for lf in tx.features] == [lf.layer for lf in ty.features]
            for fx, fy in zip(tx.features, ty.features, strict=True):
                ax = {a.feature_id: a.activation for a in fx.activations}
                ay = {a.feature_id: a.activation for a in fy.activations}
                common = ax.keys() & ay.keys()
                assert len(common) >= len(ax) - 1  # a near-tie at the k-th place may swap
                for f in common:
                    assert ax[f] == pytest.approx(ay[f], rel=2e-2, abs=2e-2)

    assert logprobs_of(both[0]) == logprobs_of(a_alone[0])
    assert logprobs_of(both[1]) == logprobs_of(b_alone[1])
    same_features(both[0], a_alone[0])
    same_features(both[1], b_alone[1])
    assert [len(lf.activations) for lf in both[1].tokens[0].features] == [4, 5]


async def test_nudge_raises_the_feature_activation(stub):
    base = await stub.Generate(gen(n=6, features=[(6, 64)]))
    steered = await stub.Generate(gen(n=6, features=[(6, 64)], steering=[nudge(6, 7, 40.0)]))

    def act(reply, f):
        return [next((a.activation for a in t.features[0].activations if a.feature_id == f), 0.0)
                for t in reply.tokens]

    # Features are read after the edit: tied toy SAE ⇒ the activation rises by ≈ strength (40).
    first_base, first_steered = act(base, 7)[0], act(steered, 7)[0]
    assert first_steered > first_base + 30.0


async def test_nudge_shifts_logits_toward_logit_lens_tokens(served, stub, toy_saes):
    """Nudging late-layer feature f shifts the next-token distribution toward the tokens its decoder
    direction promotes through the logit lens, W_U · (g ⊙ W_dec[f]) with g the final RMSNorm gain.
    Measured as the probability-weighted lens score (in standard deviations) of the top-20 next tokens.
    Residual norms at layer 27 are ~600 for this model, so the nudge is of that size."""
    from safetensors import safe_open

    with safe_open(f"{served.engine.model_path}/model.safetensors", "pt") as weights:
        unembed = weights.get_tensor("model.embed_tokens.weight").float()
        gain = weights.get_tensor("model.norm.weight").float()
    lens = unembed @ (gain * load_sae(toy_saes[27]).W_dec[11])
    lens = (lens - lens.mean()) / lens.std()

    def lens_score(reply) -> float:
        top = reply.tokens[0].top_logprobs
        probs = torch.tensor([t.logprob for t in top]).exp()
        return float((probs / probs.sum() * lens[[t.token_id for t in top]]).sum())

    def request(steering=()):
        r = gen(n=1, steering=steering)
        r.logprobs.top_logprobs = 20
        return r

    base = await stub.Generate(request())
    steered = await stub.Generate(request([nudge(27, 11, 800.0)]))
    assert lens_score(steered) > lens_score(base) + 1.0, (lens_score(base), lens_score(steered))


async def test_conditional_steering_only_where_feature_fires(stub):
    plain = await stub.Generate(gen(n=8))
    never = await stub.Generate(gen(n=8, steering=[nudge(6, 3, 60.0, condition=pb.SteeringCondition(
        feature_id=5, threshold=1e9))]))
    always = await stub.Generate(gen(n=8, steering=[nudge(6, 3, 60.0, condition=pb.SteeringCondition(
        feature_id=5, threshold=-1.0))]))
    assert logprobs_of(never) == logprobs_of(plain)
    assert logprobs_of(always) != logprobs_of(plain)


async def test_generated_positions_only_leaves_the_first_token(stub):
    plain = await stub.Generate(gen(n=6))
    later = await stub.Generate(gen(n=6, steering=[nudge(6, 3, 80.0, positions=pb.TOKEN_POSITIONS_GENERATED)]))
    # The first token is predicted from the (unsteered) prompt; later ones see steered positions.
    assert logprobs_of(later)[0] == logprobs_of(plain)[0]
    assert logprobs_of(later) != logprobs_of(plain)


async def test_registered_vector_add(stub, served):
    size = served.engine.shape.hidden_size
    reply = await stub.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(
        vector_id="unit-x", values=[1.0 / math.sqrt(size)] * size))
    assert reply.dimension == size and abs(reply.l2_norm - 1.0) < 1e-5
    plain = await stub.Generate(gen(n=6))
    added = await stub.Generate(gen(n=6, steering=[pb.SteeringIntervention(
        layer=5, vector_id="unit-x", op=pb.STEERING_OP_ADD, strength=120.0)]))
    assert logprobs_of(added) != logprobs_of(plain)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="short", values=[1.0] * 3))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("values:")


@pytest.mark.parametrize("steering, field, code", [
    ([nudge(40, 1, 1.0)], "steering[0].layer", grpc.StatusCode.INVALID_ARGUMENT),
    ([nudge(6, 512, 1.0)], "steering[0].feature_id", grpc.StatusCode.INVALID_ARGUMENT),
    ([nudge(6, 1, 1e5)], "steering[0].strength", grpc.StatusCode.INVALID_ARGUMENT),
    ([nudge(6, 1, float("inf"))], "steering[0].strength", grpc.StatusCode.INVALID_ARGUMENT),
    ([nudge(6, 1, 1.0)] * 17, "steering", grpc.StatusCode.INVALID_ARGUMENT),
    ([nudge(3, 1, 1.0)], "steering[0].layer", grpc.StatusCode.FAILED_PRECONDITION),
    ([pb.SteeringIntervention(layer=3, vector_id="missing", op=pb.STEERING_OP_ADD)], "steering[0].vector_id",
     grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_invalid_interventions(stub, steering, field, code):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(gen(steering=steering))
    assert info.value.code() == code
    assert info.value.details().startswith(field + ":"), info.value.details()


@pytest.mark.parametrize("features, field", [
    ([(5, 8)], "interpretability.features[0].layer"),
    ([(6, 0)], None),  # top_k 0 → server default
    ([(6, 9999)], "interpretability.features[0].top_k"),
])
async def test_feature_selection_validation(stub, features, field):
    request = gen(n=1, features=features)
    if field is None:
        reply = await stub.Generate(request)
        assert reply.tokens[0].features
        return
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()


# -- explanations of the shipped SAEs (GetFeature / SearchFeatures) ---------------------------------------------


def _shipped_layers(info) -> list[tuple[int, str]]:
    return [(s.layer, s.sae_id) for s in info.saes if not s.sae_id.startswith("toy-")]


async def _shipped_or_skip(stub) -> list[tuple[int, str]]:
    shipped = _shipped_layers(await stub.GetModelInfo(pb.GetModelInfoRequest()))
    if not shipped:
        pytest.skip("no SAEs shipped under server/assets/saes")
    return shipped


async def test_get_feature_returns_the_shipped_explanation(stub):
    from featurelens.server.interp.catalog import FeatureCatalog
    from featurelens.server.paths import ASSETS_DIR as ASSETS

    for layer, sae_id in await _shipped_or_skip(stub):
        catalog = FeatureCatalog.load(ASSETS / "saes" / sae_id)
        assert catalog is not None, f"shipped SAE {sae_id} has no explanations file"
        # The most frequent live feature: it has examples to show.
        fid = max(range(len(catalog)), key=lambda f: catalog.get(f)["density"])
        reply = (await stub.GetFeature(pb.GetFeatureRequest(layer=layer, feature_id=fid))).feature
        want = catalog.get(fid)
        assert (reply.layer, reply.sae_id, reply.feature_id) == (layer, sae_id, fid)
        assert reply.label == want["label"] and reply.label_machine_generated
        assert math.isclose(reply.density, want["density"], rel_tol=1e-6)
        assert [e.text for e in reply.top_examples] == [t for t, _ in want["examples"]] and reply.top_examples
        assert all("«" in e.text and "»" in e.text for e in reply.top_examples)
        assert [t.token_id for t in reply.promoted_tokens] == [t[0] for t in want["promoted"]]
        assert reply.promoted_tokens[0].score > reply.suppressed_tokens[0].score
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetFeature(pb.GetFeatureRequest(layer=layer, feature_id=len(catalog)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("feature_id:")


async def test_search_features_by_text_and_by_example(stub):
    layer, sae_id = (await _shipped_or_skip(stub))[0]
    # By example: the features most active on a text are ones that fire on it (checked against the
    # GetFeatureActivations of the same text).
    text = "The capital of France is Paris."
    found = await stub.SearchFeatures(pb.SearchFeaturesRequest(layer=layer, example_text=text, page_size=5))
    assert len(found.matches) == 5
    scores = [m.score for m in found.matches]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    acts = await stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(
        text=text, features=[pb.FeatureSelection(layer=layer, top_k=64)]))
    fired = {a.feature_id for t in acts.tokens for lf in t.features for a in lf.activations}
    assert {m.feature.feature_id for m in found.matches} <= fired
    # By text query: the RPC returns the catalog's own ranking (whose semantics tests/test_explanations.py
    # checks), and a word of a top example's activating token finds that feature.
    from featurelens.server.interp.catalog import FeatureCatalog
    from featurelens.server.paths import ASSETS_DIR as ASSETS

    catalog = FeatureCatalog.load(ASSETS / "saes" / sae_id)
    query = "capital France Paris"
    hits = await stub.SearchFeatures(pb.SearchFeaturesRequest(layer=layer, text_query=query, page_size=20))
    assert [(m.feature.feature_id, m.score) for m in hits.matches] == [
        (f, pytest.approx(s)) for f, s in catalog.search_text(query, 20)]
    assert hits.matches, "no shipped feature mentions capital/France/Paris in its contexts or tokens"
    # Common words: the best match's top contexts contain the word.
    for word in ("the", "capital", "def", "number"):
        best = (await stub.SearchFeatures(pb.SearchFeaturesRequest(layer=layer, text_query=word, page_size=1))).matches
        assert best, f"no feature found for {word!r}"
        assert any(word in e.text.lower() for e in best[0].feature.top_examples), (word, best[0].feature)
    hits = await stub.SearchFeatures(pb.SearchFeaturesRequest(layer=layer, text_query="zqxjvkwq"))
    assert list(hits.matches) == []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SearchFeatures(pb.SearchFeaturesRequest(layer=layer, text_query="x", page_size=101))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("page_size:")


# 97 tokens: under one 128-token KV block, which its 48-token answer then fills (turn 2 shares that block)
LONG_PROMPT = ("Notes from the field trip. " * 16).strip() + "\n"
BLOCK_PROMPT = ("Notes from the field trip. " * 30).strip() + "\n"  # 181 tokens: one full block of prompt


async def _tokens_of(stub, text: str) -> list[int]:
    return list((await stub.Tokenize(pb.TokenizeRequest(text=text))).token_ids)


async def test_multi_turn_follow_up_with_generated_steering_equals_a_fresh_run(stub, served):
    """Turn 1 steers only GENERATED positions; turn 2's prompt holds turn 1's answer, whose positions are
    prompt positions now (unsteered). vLLM caches the full blocks turn 1 filled, answer tokens included:
    turn 2 must not reuse them, so its output equals the same request after the prefix cache is reset."""
    steer = [nudge(6, 3, 60.0, positions=pb.TOKEN_POSITIONS_GENERATED)]
    first = await stub.Generate(gen(text=LONG_PROMPT, n=48, steering=steer))
    follow_up = LONG_PROMPT + first.text + "\nAnd then"
    prompt_ids, follow_ids = await _tokens_of(stub, LONG_PROMPT), await _tokens_of(stub, follow_up)
    turn_one = prompt_ids + [t.token_id for t in first.tokens]
    block = served.engine.llm.vllm_config.cache_config.block_size
    shared = next((i for i, (a, b) in enumerate(zip(turn_one, follow_ids, strict=False)) if a != b), len(turn_one))
    assert len(prompt_ids) < block <= shared, "turn 2 must share a full block holding turn 1's answer tokens"
    again = await stub.Generate(gen(text=follow_up, n=8, steering=steer))
    assert await served.engine.llm.reset_prefix_cache()
    fresh = await stub.Generate(gen(text=follow_up, n=8, steering=steer))
    assert logprobs_of(again) == logprobs_of(fresh)


async def test_re_registering_a_vector_changes_what_it_computes(stub, served):
    size = served.engine.shape.hidden_size
    steer = [pb.SteeringIntervention(layer=5, vector_id="salted", op=pb.STEERING_OP_ADD, strength=120.0)]
    await stub.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="salted", values=[1.0 / math.sqrt(size)] * size))
    first = await stub.Generate(gen(text=BLOCK_PROMPT, n=6, steering=steer))
    await stub.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(
        vector_id="salted", values=[(-1.0) ** i / math.sqrt(size) for i in range(size)]))
    second = await stub.Generate(gen(text=BLOCK_PROMPT, n=6, steering=steer))
    assert await served.engine.llm.reset_prefix_cache()
    fresh = await stub.Generate(gen(text=BLOCK_PROMPT, n=6, steering=steer))
    assert logprobs_of(second) == logprobs_of(fresh) != logprobs_of(first)
