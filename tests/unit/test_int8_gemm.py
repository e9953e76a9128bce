"""int8-weight GEMMs (quantized mode): the native kernels (weight-only W8A16, the engine's; and W8A8) against
the torch references, and the quantization error against the float matmul."""

from __future__ import annotations

import pytest
import torch
from featurelens.kernels import int8_gemm as q

native = pytest.mark.skipif(not q.native_available(), reason=f"native int8 kernel: {q.native_status()}")


@pytest.fixture(params=["avx2", pytest.param("avx512", marks=pytest.mark.skipif(
    not q.cpu_has_avx512(), reason="CPU lacks AVX-512 F/BW/VL/BF16"))])
def isa(request):
    """Each native weight-only test runs on both instruction sets the kernel dispatches between."""
    assert q.set_native_isa(request.param) == request.param
    yield request.param
    q.set_native_isa("auto")


def test_weight_quantization_is_symmetric_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 40, generator=g) * torch.arange(1, 8).unsqueeze(1)
    w[3] = 0  # an all-zero row stays zero
    wq, sw = q.quantize_weight(w)
    assert wq.dtype == torch.int8 and sw.dtype == torch.float32 and wq.shape == w.shape
    assert wq.abs().max() == 127 and (wq[3] == 0).all()
    # Round to nearest: every weight within half a step of its row's scale.
    assert ((q.dequantize(wq, sw) - w).abs() <= sw.unsqueeze(1) / 2 + 1e-7).all()


@native
@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (3, 1536, 576), (17, 40, 33), (1, 7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_w8a8_kernel_equals_the_exact_reference(m, k, n, dtype):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, : k // 2] = 0  # zeros and a large outlier change the per-token scale
    x[-1, -1] = 40.0
    wq, sw = q.quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    native_y = q.int8_linear(x, wq, sw, backend="native", scheme="w8a8")
    reference = q.int8_linear(x, wq, sw, backend="torch", scheme="w8a8")
    assert native_y.dtype == dtype and native_y.shape == (m, n)
    # Same integer dot products, same float scaling: equal to the last bit in fp32, to bf16 rounding in bf16.
    torch.testing.assert_close(native_y, reference, rtol=0 if dtype == torch.float32 else 8e-3,
                               atol=0 if dtype == torch.float32 else 1e-5)


@native
@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (2, 1536, 576), (17, 40, 33), (1, 7, 5), (5, 3, 4),
                                     (3, 100, 37), (4, 576, 70), (8, 64, 9), (12, 1537, 20), (32, 576, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_weight_only_kernel_matches_the_reference(m, k, n, dtype, isa):
    # (M, K) cover every AVX-512 path (M = 1, 2-3 fp32 rows, 4-8 and 9+ bf16 rows in passes of 8) and K tails
    # of 1..31 inputs; float16 runs the fp32-row path at every M.
    g = torch.Generator().manual_seed(m * 7 + k)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    wq, sw = q.quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    native_y = q.int8_linear(x, wq, sw, backend="native")
    assert native_y.dtype == dtype and native_y.shape == (m, n)
    # fp32 sums in another order: equal to float rounding (bf16: one output rounding step).
    reference = q.int8_linear(x, wq, sw, backend="torch")
    torch.testing.assert_close(native_y, reference, rtol=1e-5 if dtype == torch.float32 else 8e-3,
                               atol=1e-5 if dtype == torch.float32 else 1e-3)
    torch.testing.assert_close(reference.float(), x.float() @ q.dequantize(wq, sw).t(), rtol=8e-3, atol=1e-3)


@native
def test_isa_choice_is_checked_and_reported():
    with pytest.raises(RuntimeError, match="isa must be"):
        q.set_native_isa("sse2")
    best = q.set_native_isa("auto")
    assert best == ("avx512" if q.cpu_has_avx512() else "avx2")
    assert q.native_status() == f"native ({best})"


def test_unknown_scheme_is_refused():
    wq, sw = q.quantize_weight(torch.randn(4, 8))
    with pytest.raises(ValueError, match="scheme"):
        q.int8_linear(torch.randn(2, 8), wq, sw, scheme="w4a4")


@native
def test_zero_row_gives_zero_output_and_a_vector_input_works():
    wq, sw = q.quantize_weight(torch.randn(9, 32))
    x = torch.zeros(2, 32)
    x[1] = torch.randn(32)
    for scheme in ("w8a16", "w8a8"):
        y = q.int8_linear(x, wq, sw, scheme=scheme)
        assert (y[0] == 0).all()
        torch.testing.assert_close(q.int8_linear(x[1], wq, sw, scheme=scheme), y[1])


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=native)])
def test_quantization_error_is_small_against_the_float_matmul(backend):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(576, 1536, generator=g) * 0.02
    x = torch.randn(4, 1536, generator=g)
    x[:, 5] = 30.0  # an outlier channel, as after RMSNorm: coarse per-token activation scales suffer from it
    wq, sw = q.quantize_weight(w)
    exact = x @ w.T
    errors = {scheme: float((q.int8_linear(x, wq, sw, backend=backend, scheme=scheme) - exact).norm() / exact.norm())
              for scheme in ("w8a16", "w8a8")}
    assert errors["w8a16"] < 0.01 and errors["w8a8"] < 0.1
    assert errors["w8a16"] < errors["w8a8"]  # why the engine serves weight-only


def test_shape_mismatch_is_a_clear_error():
    wq, sw = q.quantize_weight(torch.randn(4, 8))
    with pytest.raises(ValueError, match="do not match"):
        q.int8_linear(torch.randn(2, 9), wq, sw)


@native
@pytest.mark.parametrize("n, k", [(70, 576), (33, 40), (5, 7), (1000, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantized_rows_equal_the_dequantized_weight_rounded_once(n, k, dtype, isa):
    g = torch.Generator().manual_seed(n + k)
    wq, sw = q.quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    exact = q.dequantize(wq, sw)  # float32, exact products
    out = torch.empty(n - 2, k, dtype=dtype)
    q._native_module()[0].dequantize_rows(wq, sw, 2, out)  # rows 2.. of the weight
    # One round-to-nearest-even per weight: bit-equal to torch's own conversion of the exact float32 value.
    assert torch.equal(out, exact[2:].to(dtype))
    with pytest.raises(RuntimeError, match="out of range"):
        q._native_module()[0].dequantize_rows(wq, sw, 3, out)


@native
@pytest.mark.parametrize("m", [1, 15, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_gemm_takes_the_dequantized_path_from_its_threshold_on(m, dtype):
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 200, generator=g) * 3).to(dtype)
    wq, sw = q.quantize_weight(torch.randn(1001, 200, generator=g) * 0.05)
    gemm = q.WeightOnlyGemm(dequant_rows=16, chunk_elements=200 * 300)  # 1001 rows: 4 chunks, the last short
    y = gemm(x, wq, sw)
    assert y.dtype == dtype and y.shape == (m, 1001)
    assert gemm.dequant_calls == (1 if m >= 16 else 0)
    reference = q.int8_linear(x, wq, sw, backend="torch")
    # bf16: the weights rounded once to bf16 (relative 2^-9) plus the output rounding.
    torch.testing.assert_close(y, reference, rtol=1e-5 if dtype == torch.float32 else 1.6e-2,
                               atol=1e-4 if dtype == torch.float32 else 2e-2)
    whole = q.WeightOnlyGemm(dequant_rows=1)(x, wq, sw)  # one chunk: the same products
    torch.testing.assert_close(whole, q.WeightOnlyGemm(dequant_rows=1, chunk_elements=200 * 300)(x, wq, sw))


def test_dequant_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEATURELENS_INT8_DEQUANT_ROWS", "24")
    assert q.default_dequant_rows() == 24
    monkeypatch.setenv("FEATURELENS_INT8_DEQUANT_ROWS", "0")
    assert q.default_dequant_rows() > 1 << 40  # never
    monkeypatch.setenv("FEATURELENS_INT8_DEQUANT_ROWS", "many")
    with pytest.raises(ValueError, match="FEATURELENS_INT8_DEQUANT_ROWS"):
        q.default_dequant_rows()
    monkeypatch.delenv("FEATURELENS_INT8_DEQUANT_ROWS")
    assert q.default_dequant_rows() == (16 if q.cpu_has_amx() else 32)
