"""Triton sparse GEMV for GPU decode: same contract as `sparse_gemv.sparse_gemv` (x [in], w_t [in, out]).

One program per block of BLOCK_N output columns; it loops over the gathered list of active input indices
BLOCK_K at a time, loads the [BLOCK_K, BLOCK_N] tile of those rows (each row segment is contiguous because
w_t is [in, out]), and accumulates in fp32. Rows of zeroed inputs are never loaded, so at batch 1 (memory
bound) the time should fall with the fraction of active inputs. Not yet timed on a GPU: the dev box has none,
so the block sizes are conventional defaults (one autotune config, which also keeps TRITON_INTERPRET=1 tests
simple), not tuned values.

Tested on CPU with TRITON_INTERPRET=1 against the torch reference (fp32 only: the interpreter has no bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 128
BLOCK_K = 32


@triton.jit
def _sparse_gemv_kernel(
    x_vals_ptr,  # [nnz] fp32 values of the active inputs
    x_idx_ptr,  # [nnz] int64 indices of the active inputs
    w_ptr,  # [in, out] row-major
    y_ptr,  # [out] fp32
    nnz,
    n_out,
    stride_w,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, nnz, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < nnz
        rows = tl.load(x_idx_ptr + ks, mask=k_ok, other=0)
        vals = tl.load(x_vals_ptr + ks, mask=k_ok, other=0.0)
        tile = tl.load(
            w_ptr + rows[:, None] * stride_w + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc += tl.sum(tile.to(tl.float32) * vals[:, None], axis=0)
    tl.store(y_ptr + cols, acc, mask=col_ok)


def gather_active(
    x: torch.Tensor, col_norms: torch.Tensor | None = None, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64, values fp32) of the inputs that survive: x != 0 and, with norms, the WINA test."""
    keep = x != 0
    if col_norms is not None:
        keep &= x.float().abs() * col_norms >= threshold
    idx = keep.nonzero().squeeze(1)
    return idx, x.index_select(0, idx).float()


def sparse_gemv_triton(
    x: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor | None = None, threshold: float = 0.0
) -> torch.Tensor:
    """y = x_active @ w_t[active]; x [in] (or [1, in]), w_t [in, out] contiguous -> [out] in x's dtype.

    The active-index gather is a torch `nonzero`, which synchronises with the host on GPU; a CUDA-graph-safe
    version would need a fixed-capacity index list (a later step, once measured on a GPU).
    """
    squeeze_batch = x.dim() == 2
    if squeeze_batch:
        if x.shape[0] != 1:
            raise ValueError(f"sparse_gemv_triton is batch-1 only, got x of shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 1 or w_t.dim() != 2 or x.shape[0] != w_t.shape[0] or not w_t.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} does not match a contiguous w_t [in, out] {tuple(w_t.shape)}")
    y = _gemv_fp32(x, w_t, col_norms, threshold)[0].to(x.dtype)
    return y.unsqueeze(0) if squeeze_batch else y


def _gemv_fp32(x: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor | None, threshold: float
               ) -> tuple[torch.Tensor, int]:
    """(y [out] float32, inputs kept): one kernel launch over the active rows of a contiguous w_t."""
    idx, vals = gather_active(x, col_norms, threshold)
    n_out = w_t.shape[1]
    y = torch.empty(n_out, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n_out, BLOCK_N),)
    _sparse_gemv_kernel[grid](vals, idx, w_t, y, idx.numel(), n_out, w_t.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y, idx.numel()


def sparse_gemv_parts_triton(x: torch.Tensor, w_ts: list[torch.Tensor], norms: torch.Tensor, thresholds: list[float],
                             out: torch.Tensor) -> int:
    """The engine's batch-1 entry on GPU, the contract of the native `sparse_gemv_parts`: x [in]; w_ts one
    contiguous [in, out_p] per part (q|k|v, gate|up); norms [parts, in] float32 WINA column norms; out
    [sum out_p] receives each part's result in its columns, in out's dtype. Returns the number of inputs
    zeroed over all parts. One kernel launch per part; the count rides on the gather's host sync."""
    from featurelens.kernels.sparse_gemv import parts_into

    return parts_into(x, w_ts, norms, thresholds, out, _gemv_fp32)
