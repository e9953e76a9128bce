"""Sparse GEMV for batch-1 decode with activation sparsity (WINA / TEAL): skip the weight rows of zeroed inputs.

    y = sparse_gemv(x, w_t)                                # inputs already masked: rows of x == 0 are skipped
    y = sparse_gemv(x, w_t, col_norms, threshold)          # WINA mask fused: keep |x_i|*||W[:,i]|| >= threshold

`w_t` is the layer weight TRANSPOSED, [in, out] contiguous (`transpose_weight(linear.weight)`), so each input
channel's weights are one contiguous row and a skipped input costs no memory traffic at all. float32 and
bfloat16 weights; accumulation is float32; the result has x's dtype.

Backends, picked once per process by `backend="auto"`:
- "native": C++/AVX2 torch extension (kernels/csrc/sparse_gemv.cpp), built on first use with
  `torch.utils.cpp_extension.load` into ~/.cache/featurelens/torch_extensions (first build ~30-60 s on the
  2-core dev box, then a cached import). Needs an x86-64 CPU with AVX2+FMA; AVX-512 machines run the same
  AVX2 code: the walk is memory-bound, and an AVX-512 variant measured the same on a Zen 5 core (0.98-1.12x).
  Its software prefetches fill L2 on AMD CPUs and L1 elsewhere (`prefetch_level`, `set_prefetch`,
  FEATURELENS_PREFETCH=l1|l2|auto): on a Zen 4 core L2 made the walk 1.4-2x faster (kernels/csrc/isa.h).
- "torch": `index_select` of the active rows + a matmul. Correct everywhere, but it copies the active rows
  before reading them, which made it slower than dense below ~65% sparsity here; it is the fallback when the
  build fails (the reason is logged once) or FEATURELENS_SPARSE_NATIVE=0.
On GPU use `featurelens.kernels.triton_sparse.sparse_gemv_triton` (same contract); `parts_kernel("cuda")` gives
the engine its Triton `sparse_gemv_parts_triton`.

`sparse_gemv_parts(x, w_ts, norms, thresholds, out)` is the engine's batch-1 entry for a fused projection module
(q|k|v, gate|up): every part with its own threshold in one call, the result written into `out`, the number of
zeroed inputs returned (one Python->C++ call per module and step instead of a handful of torch ops).

Batch > 1 has no shared active set, so it is not this kernel's job: callers mask and use the dense matmul.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch

log = logging.getLogger(__name__)

Backend = Literal["auto", "native", "torch"]
_SOURCE = Path(__file__).parent / "csrc" / "sparse_gemv.cpp"
_EXTENSION_NAME = "featurelens_sparse_gemv"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # portable AVX2, not -march=native: cache may be shared


def extension_build_dir() -> Path:
    root = Path(os.environ.get("FEATURELENS_EXTENSIONS_DIR", Path.home() / ".cache" / "featurelens" / "torch_extensions"))
    return root / f"torch{torch.__version__.split('+')[0]}"


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def load_extension(name: str, source: Path, disable_env: str) -> tuple[ModuleType | None, str]:
    """Build/import one of our AVX2 torch extensions; (module, "") on success, (None, reason) otherwise.
    Shared by every native kernel here (same flags, same cache folder, same fallback rules)."""
    if os.environ.get(disable_env, "1") == "0":
        return None, f"disabled by {disable_env}=0"
    if not _cpu_has_avx2():
        return None, "CPU lacks AVX2/FMA (or /proc/cpuinfo unreadable)"
    try:
        from torch.utils.cpp_extension import load

        build_dir = extension_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        module = load(name=name, sources=[str(source)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                      build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build/import failure means "use the torch path"
        return None, f"native build failed: {type(exc).__name__}: {str(exc).strip()[-500:]}"
    return module, ""


@functools.lru_cache(maxsize=1)
def _native_module() -> tuple[ModuleType | None, str]:
    """Build/import the extension once; (module, "") on success, (None, reason) otherwise."""
    module, reason = load_extension(_EXTENSION_NAME, _SOURCE, "FEATURELENS_SPARSE_NATIVE")
    problem = prefetch_env_problem() if module is not None else ""
    if problem:
        log.warning("sparse GEMV: %s", problem)
    return module, reason


def native_status() -> str:
    """"native" or the reason the torch fallback is in use (for start-up logs and GetModelInfo)."""
    module, reason = _native_module()
    return "native" if module is not None else f"torch fallback ({reason})"


def native_available() -> bool:
    module, reason = _native_module()
    if module is None:
        _log_fallback_once(reason)
    return module is not None


PREFETCH_LEVELS = ("l1", "l2", "auto")


def prefetch_env_problem() -> str:
    """"" or why FEATURELENS_PREFETCH is ignored (the extensions read it at load and fall back to "auto")."""
    value = os.environ.get("FEATURELENS_PREFETCH", "")
    if value and value not in PREFETCH_LEVELS:
        return f"FEATURELENS_PREFETCH={value!r} is not one of {', '.join(PREFETCH_LEVELS)}; using auto"
    return ""


def _native_or_raise() -> ModuleType:
    module, reason = _native_module()
    if module is None:
        raise RuntimeError(f"native sparse GEMV unavailable: {reason}")
    return module


def prefetch_level() -> str:
    """The cache level the native walks prefetch weight rows into: "l1" or "l2" (L2 by default on AMD CPUs,
    where it measured 1.4-2x faster; L1 elsewhere; FEATURELENS_PREFETCH=l1|l2 overrides). Raises without the
    native kernel."""
    return _native_or_raise().prefetch()


def set_prefetch(name: str) -> str:
    """Switch the native walks to prefetch into "l1", "l2" or back to "auto"; returns the level now in use.
    For benchmarks that compare both on one machine."""
    return _native_or_raise().set_prefetch(name)


@functools.lru_cache(maxsize=1)
def _log_fallback_once(reason: str) -> None:
    log.warning("sparse GEMV: using the pure-torch fallback: %s", reason)


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] nn.Linear weight -> [in, out] contiguous, the layout every sparse kernel here reads."""
    return weight.detach().t().contiguous()


def _active_mask(x: torch.Tensor, col_norms: torch.Tensor | None, threshold: float) -> torch.Tensor:
    if col_norms is None:
        return x != 0
    return (x != 0) & (x.float().abs() * col_norms >= threshold)


def sparse_gemv_torch(
    x: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor | None = None, threshold: float = 0.0
) -> torch.Tensor:
    """Fallback and reference: gather the active rows, one fp32 matmul. x: [in] -> [out] in x's dtype."""
    return _gather_matmul(x, w_t, _active_mask(x, col_norms, threshold)).to(x.dtype)


def _gather_matmul(x: torch.Tensor, w_t: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """x[active] @ w_t[active] in float32 (the rows of inactive inputs are never read)."""
    index = active.nonzero().squeeze(1)
    return x.index_select(0, index).float() @ w_t.index_select(0, index).float()


def sparse_gemv(
    x: torch.Tensor,
    w_t: torch.Tensor,
    col_norms: torch.Tensor | None = None,
    threshold: float = 0.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """y = x_active @ w_t[active] for one token.

    Args:
        x: [in] or [1, in] activations (float32 or bfloat16). Zero entries are always skipped.
        w_t: [in, out] contiguous transposed weight (float32 or bfloat16), see `transpose_weight`.
        col_norms: optional [in] float32 ||W[:, i]||_2 (the server's `modes.sparsity.column_norms`); with it, inputs whose
            WINA score |x_i| * col_norms[i] is below `threshold` are skipped as well (mask fused in).
        threshold: WINA threshold for this layer/projection; ignored without col_norms.
        backend: "auto" (native when it builds), "native" (raise if it cannot) or "torch".

    Returns:
        [out] (or [1, out]) in x's dtype.
    """
    squeeze_batch = x.dim() == 2
    if squeeze_batch:
        if x.shape[0] != 1:
            raise ValueError(f"sparse_gemv is batch-1 only, got x of shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 1 or w_t.dim() != 2 or x.shape[0] != w_t.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} does not match w_t [in, out] {tuple(w_t.shape)}")

    use_native = backend == "native" or (backend == "auto" and x.device.type == "cpu" and native_available())
    if use_native:
        module = _native_or_raise()
        norms = col_norms.float().contiguous() if col_norms is not None else torch.empty(0)
        y = module.sparse_gemv(x.contiguous(), w_t.contiguous(), norms, float(threshold))
        y = y.to(x.dtype)
    else:
        y = sparse_gemv_torch(x, w_t, col_norms, threshold)
    return y.unsqueeze(0) if squeeze_batch else y


def parts_into(x: torch.Tensor, w_ts: list[torch.Tensor], norms: torch.Tensor, thresholds: list[float],
               out: torch.Tensor, gemv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float],
                                                 tuple[torch.Tensor, int]]) -> int:
    """The `sparse_gemv_parts` contract over any one-part GEMV (the torch and Triton entries share it):
    gemv(x, w_t, col_norms, threshold) -> (y [out_p] float32, inputs kept). Part p's result lands in its columns
    of `out` in out's dtype; returns the number of inputs zeroed over all parts."""
    offset, zeroed = 0, 0
    flat = out.view(-1)
    for w_t, col_norms, threshold in zip(w_ts, norms, thresholds, strict=True):
        y, kept = gemv(x, w_t, col_norms, threshold)
        zeroed += x.numel() - kept
        flat[offset:offset + w_t.shape[1]] = y.to(out.dtype)
        offset += w_t.shape[1]
    return zeroed


def _gather_counted(x: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor, threshold: float
                    ) -> tuple[torch.Tensor, int]:
    active = _active_mask(x, col_norms, threshold)  # once per part: for the count and the product
    return _gather_matmul(x, w_t, active), int(active.sum())


def sparse_gemv_parts_torch(x: torch.Tensor, w_ts: list[torch.Tensor], norms: torch.Tensor, thresholds: list[float],
                            out: torch.Tensor) -> int:
    """Fallback and reference of the native `sparse_gemv_parts` (same contract): x [in]; w_ts one [in, out_p] per
    part; norms [parts, in] float32; out [sum out_p] (any float dtype) receives the parts in order. Returns the
    number of inputs zeroed over all parts (WINA score below the part's threshold, or x_i == 0)."""
    return parts_into(x, w_ts, norms, thresholds, out, _gather_counted)


def parts_kernel(device: torch.device | str = "cpu"
                 ) -> Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor, list[float], torch.Tensor], int]:
    """The engine's batch-1 kernel for `device`: on CUDA the Triton kernel (`triton_sparse.sparse_gemv_parts_triton`)
    when Triton imports, else the torch gather; on CPU the native `sparse_gemv_parts` (called directly: a
    checking wrapper costs more than the GEMV at decode sizes) when the extension builds, else
    `sparse_gemv_parts_torch`."""
    if torch.device(device).type == "cuda":
        try:
            from featurelens.kernels.triton_sparse import sparse_gemv_parts_triton
        except ImportError as error:  # no Triton in this install: the gather still skips the rows
            _log_fallback_once(f"Triton unavailable on GPU: {error}")
            return sparse_gemv_parts_torch
        return sparse_gemv_parts_triton
    if torch.device(device).type != "cpu":  # the native kernel reads host memory only
        return sparse_gemv_parts_torch
    if native_available():
        return _native_or_raise().sparse_gemv_parts
    return sparse_gemv_parts_torch


def basis_gemv_int8_torch(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """Fallback and reference of the native `basis_gemv_int8`: out = x @ (q * scales[:, None]), fp32 arithmetic.
    x [in]; q [in, out] int8 (row i: what x_i adds, in the basis); scales [in] float32; out [out], any float dtype."""
    out.view(-1).copy_(((x.float() * scales) @ q.float()).to(out.dtype))


def basis_int8_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """x T for a basis stored as int8 rows with per-row scales (`sparsity.load_rotations_int8`): the native walk
    (one byte per entry, the scale folded into x_i) when the extension builds, else `basis_gemv_int8_torch`."""
    if native_available():
        return _native_or_raise().basis_gemv_int8
    return basis_gemv_int8_torch
