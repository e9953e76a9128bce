"""Per-request int8 (W8A8) quantized mode: the worker's wrapped projections (unit, on the fake vLLM-style
layers of test_sparse_mode; the real engine: tests/engine/test_quantized_mode_engine.py)."""

from __future__ import annotations

import pytest
import torch
from featurelens.kernels.int8_gemm import int8_linear, quantize_weight
from featurelens.server.worker.quant import QuantRuntime
from featurelens.v1 import featurelens_pb2 as pb
from test_sparse_mode import N_LAYERS, D
from test_sparse_mode import fake as fake  # noqa: F401 - the fixture: model folder, layers, sparse runtime

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
    from featurelens.server.worker.quant import Int8Head, _QuantLogits

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
    from featurelens.server.worker.quant import RESCORE_TOP

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


def test_int8_mode_declares_the_devices_it_runs_on():
    """A QUANTIZED request on a device without the int8 kernels must be refused, not crash the engine: the
    worker installs the mode (and the int8 unembedding) only where the kernels name the device."""
    from featurelens.kernels import int8_gemm
    from featurelens.server.worker.quant import unavailable_on

    assert int8_gemm.DEVICES == ("cpu",)
    assert unavailable_on(torch.device("cpu")) is None
    reason = unavailable_on(torch.device("cuda", 0))
    assert reason is not None and "cuda" in reason and "cpu" in reason
    assert unavailable_on(torch.device("meta")) is not None
