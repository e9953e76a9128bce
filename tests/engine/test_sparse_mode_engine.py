"""Per-request WINA sparse mode in the real engine over gRPC (shared session server, tests/conftest.py); the
worker's wrapped projections on fake layers are tests/unit/test_sparse_mode.py."""

from __future__ import annotations

import grpc
import pytest
from featurelens.v1 import featurelens_pb2 as pb
from tests_support import gen, logprobs_of, pair_in_one_batch


async def test_model_info_lists_sparse_levels(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    sparse = next(m for m in info.modes if m.mode == pb.INFERENCE_MODE_SPARSE)
    assert sparse.available and list(sparse.sparsity_levels_percent) == [25, 40, 50]
    # The shipped table masks q/k/v's and the MLP's inputs of every block in calibrated bases; the mode says so,
    # and that its logits come from the re-scored int8 head (the default --sparse-logits).
    assert "the attn/mlp input of every block is masked in a calibrated basis" in sparse.description
    assert "logits from the int8 unembedding" in sparse.description


async def test_dense_neighbour_of_a_sparse_request_is_bit_identical(served, stub):
    """A dense and a sparse request in one batch: the dense one's tokens and logprobs equal those it gets
    beside a dense request, and the sparse one really ran masked (its output differs from dense)."""
    neighbour = gen(16, text="A short poem about rivers:")
    with_sparse, peak = await pair_in_one_batch(
        stub, neighbour, gen(16, pb.INFERENCE_MODE_SPARSE, 50, "iso-sparse"), 1, served.engine)
    without, _ = await pair_in_one_batch(stub, neighbour, gen(16), 2, served.engine)
    assert peak >= 3
    assert logprobs_of(with_sparse[0]) == logprobs_of(without[0])
    assert logprobs_of(with_sparse[1]) != logprobs_of(without[1])
    assert with_sparse[1].mode == pb.INFERENCE_MODE_SPARSE


async def test_sparse_request_zeroes_about_its_level_and_answers(served, stub):
    def sparse_tokens() -> float:
        return served.metrics.registry.get_sample_value("featurelens_generated_tokens_total", {"mode": "sparse"}) or 0

    before, head = sparse_tokens(), await served.engine.head_stats()
    replies = {}
    for level in (25, 50):
        replies[level] = await stub.Generate(gen(24, pb.INFERENCE_MODE_SPARSE, level, f"level-{level}"))
    stats = await served.engine.sparsity_stats()
    assert sparse_tokens() - before == 48  # metrics carry the mode label
    # Every token's logits row of both requests came from the re-scored int8 head.
    after = await served.engine.head_stats()
    assert after["rescore"] and after["rescored_rows_total"] - head["rescored_rows_total"] == 48, (head, after)
    dense = await stub.Generate(gen(24))
    assert "Paris" in dense.text and "Paris" in replies[25].text, (dense.text, replies[25].text)
    for level, reply in replies.items():
        assert reply.text and reply.usage.completion_tokens == 24
        (key,) = [k for k in stats if k.startswith(f"level-{level}-")]
        # The calibrated thresholds zero ~level% of every projection's inputs; chat text in bf16 sits
        # within a few points of the held-out corpus.
        assert abs(stats[key]["zeroed_fraction"] - level / 100) < 0.06, stats[key]
        # The prompt runs dense (the default): the sparse rows are the 23 decode steps after the first token.
        assert stats[key]["rows"] == 23, stats[key]
        assert stats[key]["sparse_gemv_rows"] >= 20  # alone in the batch, decode steps take the GEMV path
    assert logprobs_of(replies[50]) != logprobs_of(dense)


async def test_stream_and_unary_agree_in_sparse_mode(stub):
    unary = await stub.Generate(gen(8, pb.INFERENCE_MODE_SPARSE, 40))
    streamed = [t.token_id async for chunk in stub.GenerateStream(gen(8, pb.INFERENCE_MODE_SPARSE, 40, stream=True))
                for t in chunk.tokens]
    assert [t.token_id for t in unary.tokens] == streamed


@pytest.mark.parametrize("mode, level, field", [
    (pb.INFERENCE_MODE_SPARSE, 33, "sparsity_percent"),
    (pb.INFERENCE_MODE_SPARSE, 0, "sparsity_percent"),
    (pb.INFERENCE_MODE_SPARSE, -5, "sparsity_percent"),
    (pb.INFERENCE_MODE_DENSE, 40, "sparsity_percent"),
    (42, 0, "mode"),
])
async def test_bad_mode_or_level_is_invalid_argument_naming_the_field(stub, mode, level, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(gen(2, mode, level))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()
