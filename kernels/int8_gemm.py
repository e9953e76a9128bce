"""int8-weight linear layers for the quantized inference mode.

    wq, sw = quantize_weight(linear.weight)     # int8 [out, in], float32 per-output-channel scales
    y = int8_linear(x, wq, sw)                  # weight-only (W8A16): x [M, in] float -> [M, out], x's dtype
    y = int8_linear(x, wq, sw, scheme="w8a8")   # also int8 activations (dynamic, per token)

Weights: symmetric per-output-channel int8 (round to nearest). Schemes:
- "w8a16" (default, what the engine serves): activations stay float; fp32 accumulation. Held-out perplexity
  of SmolLM2-135M x1.00 of dense (measured, docs/modes.md).
- "w8a8": symmetric dynamic per-token int8 activations, exact int32 accumulation — the "int-quantized" W8A8
  scheme of compressed-tensors and vLLM's CPU oneDNN kernel. Perplexity x1.03 on the same text: per-token
  activation scales are too coarse for this model's outlier channels, hence not the default.

Backends (`backend="auto"` picks native when it builds):
- "native": C++ torch extension (kernels/csrc/int8_gemm.cpp), built on first use like the sparse GEMV
  (same cache folder, same portable AVX2 flags). For small M (decode): each weight row is read once for all
  rows. Where the CPU has AVX-512 F/BW/VL/BF16 the weight-only GEMM runs AVX-512 paths picked at run time
  (1.2x the AVX2 path at M = 1, 3.5-3.9x at M = 4-32 on a Zen 5 core); `set_native_isa` forces either.
- "torch": the reference — quantize in torch, integer products summed in float64 (exact), scaled. Slow;
  the fallback when the extension cannot build, and the oracle of the tests.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
from featurelens.kernels.sparse_gemv import load_extension

log = logging.getLogger(__name__)

Backend = Literal["auto", "native", "torch"]
Scheme = Literal["w8a16", "w8a8"]
_SOURCE = Path(__file__).parent / "csrc" / "int8_gemm.cpp"
_EXTENSION_NAME = "featurelens_int8_gemm"
QMAX = 127.0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in] contiguous, float32 [out] scales), symmetric per channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero at any scale
    wq = torch.round(w / scale.unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8).contiguous()
    return wq, scale.contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, in] -> (int8-valued float32 [M, in], float32 [M] scales); an all-zero row gets scale 0."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    scale = amax / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.round(xf / safe.unsqueeze(1)).clamp_(-QMAX, QMAX)
    return xq, scale


def int8_linear_torch(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """Reference W8A8 product: exact integer dot products (float64), then sx[m] * sw[o]."""
    xq, sx = quantize_activations(x)
    acc = xq.double() @ wq.double().t()
    return (acc.float() * sx.unsqueeze(1) * sw.unsqueeze(0)).to(x.dtype)


def w8a16_linear_torch(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """Reference weight-only product: float activations times the dequantized weights, fp32."""
    return ((x.float() @ wq.float().t()) * sw.unsqueeze(0)).to(x.dtype)


def dequantize(wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    return wq.float() * sw.unsqueeze(1)


@functools.lru_cache(maxsize=1)
def _native_module() -> tuple[ModuleType | None, str]:
    return load_extension(_EXTENSION_NAME, _SOURCE, "FEATURELENS_INT8_NATIVE")


def native_available() -> bool:
    module, reason = _native_module()
    if module is None:
        _log_fallback_once(reason)
    return module is not None


# Where these kernels run: the native ones and their torch fallback read and write CPU tensors (the
# quantized mode and the int8 unembedding are installed only on such devices).
DEVICES = ("cpu",)


def native_status() -> str:
    module, reason = _native_module()
    return f"native ({module.isa()})" if module is not None else f"torch fallback ({reason})"


def cpu_has_avx512() -> bool:
    """AVX-512 F/BW/VL/BF16, what the native kernel's AVX-512 paths need (it picks them at run time)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


def set_native_isa(name: str) -> str:
    """Force the native weight-only GEMM onto "avx2" or "avx512", or back to "auto" (the CPU's best); returns
    the instruction set now in use. For benchmarks and tests that compare both on one machine."""
    module, reason = _native_module()
    if module is None:
        raise RuntimeError(f"native int8 GEMM unavailable: {reason}")
    return module.set_isa(name)


@functools.lru_cache(maxsize=1)
def _log_fallback_once(reason: str) -> None:
    log.warning("int8 GEMM: using the pure-torch fallback: %s", reason)


def cpu_has_amx() -> bool:
    """AMX bf16 tiles: oneDNN's bf16 GEMM (the engine's dense path, and `F.linear`) then runs on them."""
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def default_dequant_rows() -> int:
    """From how many rows `WeightOnlyGemm` dequantizes and calls the float GEMM instead of the native kernel.
    `FEATURELENS_INT8_DEQUANT_ROWS` overrides it (0: never). Fixed per machine, not timed at start-up, so
    a server's numerics do not depend on a measurement's noise. Measured crossovers (docs/modes.md): on the
    2-core AMX box the native kernel costs ~95 us per row per SmolLM2 block and the dequantize + AMX GEMM
    path ~1 ms from M = 1 to 32 (8-16 rows break even); on the Zen 5 box the native bf16 path is 2.8x
    faster per row and oneDNN's bf16 GEMM is not AMX, so the break-even is later (~32)."""
    import os

    raw = os.environ.get("FEATURELENS_INT8_DEQUANT_ROWS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"FEATURELENS_INT8_DEQUANT_ROWS must be an integer, got {raw!r}") from None
        return value if value > 0 else 1 << 62
    return 16 if cpu_has_amx() else 32


class WeightOnlyGemm:
    """The engine's weight-only GEMM f(x [M, in], wq, sw) -> [M, out] in x's dtype.

    M < `dequant_rows` (decode): the native kernel, called directly (`int8_linear`'s checks and backend choice
    cost about as much as the kernel's own call overhead, ~1 us, on each of the ~120 projection calls of a
    decode step). M >= `dequant_rows` (prefill, large batches): the weight is dequantized (wq * sw, in x's
    dtype, one rounding per weight) into a reused scratch buffer, at most `chunk_elements` at a time, and
    multiplied with torch's float GEMM (oneDNN, AMX where present) — 3-10x faster there than the GEMV-style
    kernel, which does M times the arithmetic for one weight read. The scratch costs `chunk_elements` * 2-4
    bytes. Without the native extension: the torch reference for every M."""

    def __init__(self, dequant_rows: int | None = None, chunk_elements: int = 1 << 21) -> None:
        module, _ = _native_module()
        self._module = module if native_available() else None
        self.dequant_rows = default_dequant_rows() if dequant_rows is None else dequant_rows
        self.chunk_elements = chunk_elements
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self.dequant_calls = 0  # observability for tests and benchmarks

    def __call__(self, x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        module = self._module
        if module is None:
            return w8a16_linear_torch(x, wq, sw)
        if x.shape[0] < self.dequant_rows:
            return module.int8_gemm_w8a16(x, wq, sw)
        return self.dequantized_gemm(x, wq, sw)

    def dequantized_gemm(self, x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        module = self._module
        if module is None:
            raise RuntimeError(f"native int8 GEMM unavailable: {native_status()}")
        self.dequant_calls += 1
        n, k = wq.shape
        x = x.contiguous()
        rows = max(1, min(n, self.chunk_elements // max(k, 1)))
        scratch = self._scratch.get(x.dtype)
        if scratch is None or scratch.numel() < rows * k:
            scratch = self._scratch[x.dtype] = torch.empty(rows * k, dtype=x.dtype)
        if rows == n:
            buf = scratch[: n * k].view(n, k)
            module.dequantize_rows(wq, sw, 0, buf)
            return torch.mm(x, buf.t())
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            buf = scratch[: (r1 - r0) * k].view(r1 - r0, k)
            module.dequantize_rows(wq, sw, r0, buf)
            out[:, r0:r1] = torch.mm(x, buf.t())
        return out


def weight_only_kernel() -> WeightOnlyGemm:
    """The engine's weight-only GEMM (a `WeightOnlyGemm` with this machine's defaults)."""
    return WeightOnlyGemm()


def int8_linear(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, backend: Backend = "auto",
                scheme: Scheme = "w8a16") -> torch.Tensor:
    """y = x @ dequant(wq, sw)^T (w8a16) or dequant(quant(x)) @ dequant(wq, sw)^T (w8a8).
    x: [M, in] (or [in]) float32/bfloat16/float16; wq: int8 [out, in]; sw: float32 [out].
    Returns x's dtype, [M, out] (or [out])."""
    if scheme not in ("w8a16", "w8a8"):
        raise ValueError(f"scheme must be 'w8a16' or 'w8a8', got {scheme!r}")
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 2 or wq.dim() != 2 or x.shape[1] != wq.shape[1] or sw.shape != (wq.shape[0],):
        raise ValueError(f"x {tuple(x.shape)}, wq {tuple(wq.shape)}, sw {tuple(sw.shape)} do not match")
    use_native = backend == "native" or (backend == "auto" and x.device.type == "cpu" and native_available())
    if use_native:
        module, reason = _native_module()
        if module is None:
            raise RuntimeError(f"native int8 GEMM unavailable: {reason}")
        y = (module.int8_gemm_w8a16 if scheme == "w8a16" else module.int8_gemm)(x, wq, sw)
    else:
        y = (w8a16_linear_torch if scheme == "w8a16" else int8_linear_torch)(x, wq, sw)
    return y[0] if squeeze else y
