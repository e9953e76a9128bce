"""Per-request int8 (W8A8) quantized mode in the real engine over gRPC (shared session server,
tests/conftest.py); the worker's wrapped projections on fake layers are tests/unit/test_quantized_mode.py."""

from __future__ import annotations

import grpc
import pytest
from featurelens.v1 import featurelens_pb2 as pb
from tests_support import gen, logprobs_of, pair_in_one_batch

Q = pb.INFERENCE_MODE_QUANTIZED


async def test_model_info_lists_quantized_mode(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    mode = next(m for m in info.modes if m.mode == Q)
    assert mode.available and "int8" in mode.description


async def test_dense_neighbour_of_a_quantized_request_is_bit_identical(served, stub):
    neighbour = gen(16, text="A short poem about rivers:")
    with_quant, peak = await pair_in_one_batch(stub, neighbour, gen(16, Q, request_id="iso-quant"), 3, served.engine)
    without, _ = await pair_in_one_batch(stub, neighbour, gen(16), 4, served.engine)
    assert peak >= 3
    assert logprobs_of(with_quant[0]) == logprobs_of(without[0])
    assert logprobs_of(with_quant[1]) != logprobs_of(without[1])  # the int8 projections really ran
    assert with_quant[1].mode == Q


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
