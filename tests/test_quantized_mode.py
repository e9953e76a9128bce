"""Per-request int8 (W8A8) quantized mode: the worker's wrapped projections (unit, on the fake vLLM-style
layers of test_sparse_mode) and the real engine over gRPC (shared session server, tests/conftest.py)."""

from __future__ import annotations

import grpc
import pytest
import torch
from featurelens.kernels.int8_gemm import int8_linear, quantize_weight
from featurelens.server.worker_quant import QuantRuntime
from featurelens.v1 import featurelens_pb2 as pb
from test_sparse_mode import N_LAYERS, D, gen, logprobs_of
from test_sparse_mode import fake as fake  # noqa: F401 - the fixture: model folder, layers, sparse runtime
from tests_support import pair_in_one_batch

QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture
def quant(fake, tmp_path):  # noqa: F811
    sparse, layers, weights, levels = fake
    runtime = QuantRuntime(str(tmp_path))
    assert runtime.install(layers) == 4 * N_LAYERS  # on top of the sparse wrappers
    runtime.install(layers)  # idempotent
    return runtime, sparse, layers, weights


def int8_reference(x, weights, parts):
    wq, sw = quantize_weight(torch.cat([weights[p] for p in parts]))
    return int8_linear(x, wq, sw, backend="torch")


def test_no_quantized_row_runs_the_previous_forward_only(quant):
    runtime, _, layers, _ = quant
    x = torch.randn(4, D)
    qkv = layers[0].self_attn.qkv_proj
    out, _ = qkv(x)
    torch.testing.assert_close(out, x @ qkv.fused.T, rtol=0, atol=0)
    assert qkv.calls == [4]


def test_mixed_batch_recomputes_only_the_quantized_rows_in_int8(quant):
    runtime, _, layers, weights = quant
    x = torch.randn(5, D)
    runtime.begin([("r1", 1, 3)], total_rows=5)
    out, _ = layers[1].self_attn.qkv_proj(x)
    runtime.end()
    dense = x @ layers[1].self_attn.qkv_proj.fused.T
    keep = [0, 3, 4]
    torch.testing.assert_close(out[keep], dense[keep], rtol=0, atol=0)  # other rows untouched
    torch.testing.assert_close(out[1:3], int8_reference(x[1:3], weights[1], QKV))
    assert not torch.equal(out[1:3], dense[1:3])
    assert runtime.report()["r1"]["rows"] == 2


def test_all_quantized_batch_skips_the_full_precision_forward(quant):
    runtime, _, layers, weights = quant
    down = layers[0].mlp.down_proj
    x = torch.randn(3, down.fused.shape[1])
    runtime.begin([("a", 0, 2), ("b", 2, 3)], total_rows=3)
    out, _ = down(x)
    runtime.end()
    assert down.calls == []
    torch.testing.assert_close(out, int8_reference(x, weights[0], ("down_proj",)))


def test_sparse_and_quantized_rows_share_a_step(quant):
    runtime, sparse, layers, weights = quant
    from test_sparse_mode import reference

    x = torch.randn(4, D)
    sparse.begin([("s", 0, 1, "50")], total_rows=4)
    runtime.begin([("q", 2, 4)], total_rows=4)
    out, _ = layers[0].self_attn.o_proj(x)
    sparse.end()
    runtime.end()
    torch.testing.assert_close(out[0:1], reference(x[0:1], weights[0], ("o_proj",), 0.9))
    torch.testing.assert_close(out[1], x[1] @ weights[0]["o_proj"].T)
    torch.testing.assert_close(out[2:], int8_reference(x[2:], weights[0], ("o_proj",)))


def _head(vocab=50, seed=3):
    from featurelens.server.worker_quant import Int8Head, _QuantLogits

    g = torch.Generator().manual_seed(seed)
    head = torch.randn(vocab, D, generator=g)
    runtime = Int8Head(int8_linear)
    wq, sw = quantize_weight(head)
    calls = []

    def dense_apply(layer, x, bias=None):
        calls.append(x.shape[0])
        return x @ head.T

    return runtime, _QuantLogits(runtime, dense_apply, wq, sw, head), head, wq, sw, calls, g


def test_logits_of_quantized_requests_come_from_the_int8_unembedding():
    runtime, apply, head, wq, sw, calls, g = _head()
    x = torch.randn(3, D, generator=g)
    torch.testing.assert_close(apply(None, x), x @ head.T, rtol=0, atol=0)  # no quantized request
    runtime.begin([1], [], num_reqs=3)
    out = apply(None, x)
    torch.testing.assert_close(out[[0, 2]], (x @ head.T)[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[1], int8_linear(x[1:2], wq, sw)[0])
    assert runtime.int8_rows_total == 1
    calls.clear()
    runtime.begin([0, 1, 2], [], num_reqs=3)
    torch.testing.assert_close(apply(None, x), int8_linear(x, wq, sw))
    assert calls == []  # all rows quantized: the bf16 head is not read
    torch.testing.assert_close(apply(None, x[:2]), x[:2] @ head.T)  # not vLLM's one-row-per-request layout: dense


def test_sparse_requests_logits_are_int8_with_the_best_candidates_rescored_exactly():
    """Sparse mode's head: int8 logits, then each row's RESCORE_TOP best recomputed with the full-precision
    weights; dense and quantized rows of the same step keep theirs."""
    from featurelens.server.worker_quant import RESCORE_TOP

    runtime, apply, head, wq, sw, calls, g = _head(vocab=1000, seed=5)
    x = torch.randn(4, D, generator=g)
    exact, int8 = x @ head.T, int8_linear(x, wq, sw)
    runtime.begin([3], [0, 2], num_reqs=4)
    out = apply(None, x)
    torch.testing.assert_close(out[1], exact[1], rtol=0, atol=0)  # dense row: bit-identical
    torch.testing.assert_close(out[3], int8[3])  # quantized row
    for r in (0, 2):
        top = int8[r].topk(RESCORE_TOP).indices
        rest = torch.ones(1000, dtype=torch.bool)
        rest[top] = False
        torch.testing.assert_close(out[r, top], exact[r, top])  # the candidates: full precision
        torch.testing.assert_close(out[r, rest], int8[r, rest])  # the tail: int8
        assert out[r].argmax() == exact[r].argmax()  # the greedy token is the dense head's
        assert not torch.equal(out[r], exact[r])  # the tail really is int8
    assert (runtime.int8_rows_total, runtime.rescored_rows_total) == (1, 2)
    calls.clear()
    runtime.begin([], [0, 1, 2, 3], num_reqs=4)  # a step of sparse requests only: the dense head is not read
    out = apply(None, x)
    assert calls == [] and torch.equal(out.argmax(-1), exact.argmax(-1))


def test_quantized_requests_get_their_own_prefix_cache_namespace():
    from featurelens.server.api import _cache_salt

    assert _cache_salt(None, 0, pb.INFERENCE_MODE_DENSE) is None
    salts = {_cache_salt(None, 0, pb.INFERENCE_MODE_QUANTIZED), _cache_salt("steer", 0, pb.INFERENCE_MODE_QUANTIZED),
             _cache_salt(None, 40), _cache_salt("steer", 0)}
    assert len(salts) == 4 and None not in salts


# -- the real engine over gRPC -----------------------------------------------------------------------------

Q = pb.INFERENCE_MODE_QUANTIZED


@pytest.mark.engine
async def test_model_info_lists_quantized_mode(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    mode = next(m for m in info.modes if m.mode == Q)
    assert mode.available and "int8" in mode.description


@pytest.mark.engine
async def test_dense_neighbour_of_a_quantized_request_is_bit_identical(served, stub):
    neighbour = gen(16, text="A short poem about rivers:")
    with_quant, peak = await pair_in_one_batch(stub, neighbour, gen(16, Q, request_id="iso-quant"), 3, served.engine)
    without, _ = await pair_in_one_batch(stub, neighbour, gen(16), 4, served.engine)
    assert peak >= 3
    assert logprobs_of(with_quant[0]) == logprobs_of(without[0])
    assert logprobs_of(with_quant[1]) != logprobs_of(without[1])  # the int8 projections really ran
    assert with_quant[1].mode == Q


@pytest.mark.engine
async def test_quantized_request_answers_and_is_counted(served, stub):
    def tokens(mode: str) -> float:
        return served.metrics.registry.get_sample_value("featurelens_generated_tokens_total", {"mode": mode}) or 0

    before = tokens("quantized")
    reply = await stub.Generate(gen(24, Q, request_id="quant-answer"))
    dense = await stub.Generate(gen(24))
    assert "Paris" in reply.text and "Paris" in dense.text, (reply.text, dense.text)
    assert tokens("quantized") - before == 24  # metrics carry the mode label
    stats = await served.engine.quant_stats()
    (key,) = [k for k in stats if k.startswith("quant-answer-")]
    assert stats[key]["rows"] >= 24 and stats[key]["backend"] in ("native (avx2)", "native (avx512)")
    assert stats[key]["lm_head_rows_total"] >= 24 and served.engine.quantized["lm_head"] is True
    # The chat-templated prompt is one prefill step above the dequantize threshold: its 120 projection calls
    # ran dequantize + float GEMM (the decode steps, one row each, the native kernel).
    assert reply.usage.prompt_tokens >= stats[key]["dequant_rows"], (reply.usage.prompt_tokens, stats[key])
    assert stats[key]["dequant_calls_total"] >= 120, stats[key]
    streamed = [t.token_id async for chunk in stub.GenerateStream(gen(24, Q, stream=True)) for t in chunk.tokens]
    assert streamed == [t.token_id for t in reply.tokens]


@pytest.mark.engine
async def test_features_and_risk_read_the_quantized_residual_stream(served, stub):
    layer = sorted(served.engine.risk_probe.layers)[0]
    sel = [pb.FeatureSelection(layer=layer, top_k=8)]
    text = "The capital of Australia is Canberra, a planned city."
    dense = await stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(text=text, features=sel))
    quant = await stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(text=text, features=sel, mode=Q))
    again = await stub.GetFeatureActivations(pb.GetFeatureActivationsRequest(text=text, features=sel, mode=Q))
    assert not quant.cached and again.cached and again == pb.GetFeatureActivationsResponse(
        tokens=quant.tokens, cached=True)  # its own cache entry, not the dense one

    def codes(reply):
        return [[(a.feature_id, a.activation) for a in t.features[0].activations] for t in reply.tokens]

    assert [t.token_id for t in quant.tokens] == [t.token_id for t in dense.tokens]
    assert codes(quant) != codes(dense)
    # Same model, 8-bit projections: the top features overlap heavily without being identical.
    overlap = [len({f for f, _ in a} & {f for f, _ in b}) / max(1, len(a))
               for a, b in zip(codes(quant), codes(dense), strict=True)]
    assert sum(overlap) / len(overlap) > 0.5, overlap
    request = pb.ScoreHallucinationRequest(text="What is the capital of Australia?", response="Canberra.")
    risk_dense = await stub.ScoreHallucination(request)
    request.mode = Q
    risk_quant = await stub.ScoreHallucination(request)
    assert 0.0 <= risk_quant.risk.score <= 1.0 and risk_quant.risk.score != risk_dense.risk.score


@pytest.mark.engine
@pytest.mark.parametrize("rpc", ["Generate", "GetFeatureActivations", "ScoreHallucination"])
async def test_sparsity_percent_with_quantized_mode_is_invalid(stub, rpc):
    requests = {
        "Generate": gen(2, Q, 40),
        "GetFeatureActivations": pb.GetFeatureActivationsRequest(
            text="a", features=[pb.FeatureSelection(layer=12, top_k=4)], mode=Q, sparsity_percent=40),
        "ScoreHallucination": pb.ScoreHallucinationRequest(text="a", response="b", mode=Q, sparsity_percent=40),
    }
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, rpc)(requests[rpc])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("sparsity_percent:"), info.value.details()
