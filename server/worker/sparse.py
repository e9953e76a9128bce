"""Per-request WINA sparse mode inside the vLLM worker (installed by server/worker/extension.py).

vLLM fuses Llama's projections (qkv_proj = q|k|v, gate_up_proj = gate|up), and the three q/k/v (two gate/up)
thresholds differ, so one input mask cannot serve a fused matmul. Each fused module's `forward` is therefore
wrapped (an instance attribute shadowing the class method) instead of pre-hooked:

- no sparse row in the step (the default): the wrapper calls the original forward and nothing else;
- mask path: the dense forward runs for the whole batch as before, so rows of other requests are computed
  exactly as without sparse requests; the sparse rows are recomputed once more with one masked copy of their
  input per sub-projection, stacked into ONE call of the module's own GEMM, and each sub-projection's output
  columns are taken from its copy. When every row is sparse the dense forward is skipped;
- fast path: a step whose whole batch is one sparse row (batch-1 decode) runs the sparse GEMV
  (featurelens.kernels.sparse_gemv, one `sparse_gemv_parts` call per module) with the WINA mask fused, on
  transposed weights read once per projection from the model's safetensors (vLLM repacks its weights for
  oneDNN and drops `weight`).

Which rows are sparse: a sparse request's rows at generated-token positions; its prompt rows run dense unless
the server sparsifies prompts too (`--sparse-prompt`), see `SparseRuntime.rows_of`.

Inputs in another basis: when the thresholds file ships input bases T (the default model's does, for q/k/v's
and the MLP's inputs, stored as int8 rows with per-row scales; see server/modes/sparsity.py), such a module's
sparse rows read x' = x T (one small GEMM per module and step; on the fast path the native int8 walk
`basis_gemv_int8` for int8 bases) and are masked in that basis; the fast path multiplies x' by the weights in that basis, transposed
((W T⁻ᵀ)ᵀ), the mask path maps each masked copy back (x'_masked T⁻¹, float32) and runs the module's own GEMM.
Dense rows never see T.

Profiling: with FEATURELENS_SPARSE_PROFILE=1 in the worker's environment, `StepProfile` times every step's
model forward, the wrapped projections and, on the fast path, the native kernels and the x T GEMVs, per kind
of step (`featurelens_sparse_profile`; `featurelens bench modes` prints it). Off (the default), a projection
call pays an attribute check (two on the fast path).

Column norms ||W[:, i]|| (of W T⁻ᵀ for projections read in another basis) come from the same safetensors files at set-up. Thresholds are the shipped per-layer,
per-projection tables (server/modes/sparsity.py). Per request the worker counts the zeroed inputs (over all
projections, every row), readable with `featurelens_sparsity_stats`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from featurelens.server.modes.sparsity import (
    PROJECTIONS,
    available_levels,
    basis_inverse,
    basis_weight,
    load_rotation_file,
    load_thresholds,
    rotation_of,
)
from featurelens.server.worker.model import LLAMA_STYLE, ModelLayout, default_layout

log = logging.getLogger(__name__)

PROJ_NAMES = tuple(PROJECTIONS)  # q, k, v, o, gate, up, down: a Llama block's threshold columns
# vLLM module (under a Llama-style decoder layer) -> the HF projections it fuses, in output-column order;
# other families' modules are in their adapter entry (server/worker/model.py).
FUSED: dict[str, tuple[str, ...]] = {p.path: p.parts for p in LLAMA_STYLE}
MAX_STATS = 4096  # requests whose counts are kept (oldest dropped first)
PROFILE_ENV = "FEATURELENS_SPARSE_PROFILE"  # "1": time the steps (StepProfile)
TIMED_PARTS = ("projections", "kernels", "basis")  # what StepProfile adds up inside a step


@dataclass
class SparseStep:
    """The sparse rows of one forward step."""

    rows: torch.Tensor  # [n] row indices in the flattened batch
    thresholds: torch.Tensor  # [n, layers, 7] float32: each row's request level
    levels: list[str]  # per row (python, for the fast path's scalar thresholds)
    all_rows: bool  # every row of the batch is sparse: the dense forward can be skipped
    segments: list[tuple[str, int, int]]  # (request key, start, end) within `rows`
    zeroed: torch.Tensor  # [n] float64: inputs zeroed so far this step
    inputs: int = 0  # inputs per row seen so far this step
    fast: bool = False  # the sparse GEMV ran (batch-1 step)
    fast_zeroed: int = 0  # fast path: inputs zeroed (the kernel counts them), added to `zeroed` at the end


class StepProfile:
    """Where a step's time goes, per kind of step: "dense 1 row", "dense batch", "quantized 1 row",
    "quantized batch", "sparse masked" (the mask path) and "sparse gemv" (the batch-1 fast path).

    Per step: `forward` runs from block 0's first projection to the end-of-forward hook (the embedding before
    it and the unembedding after it are outside); `projections` is the time inside the wrapped projection
    modules (the dense GEMM, the mask path or the fast path); on the fast path `kernels` is the native
    sparse_gemv_parts calls and `basis` the x T GEMVs, so `projections - kernels - basis` is the Python of the
    wrappers. A step whose rows are all quantized-mode runs only the int8 wrappers (worker/quant.py), which call
    none of these projections: such steps are not recorded ("quantized ..." is a mixed step)."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, float]] = {}
        self._start: float | None = None
        self._rows = 0
        self._step = dict.fromkeys(TIMED_PARTS, 0.0)

    def reset(self) -> None:
        self.totals.clear()

    def timed(self, module: _SparseProjection, x: torch.Tensor) -> Any:
        began = time.perf_counter()
        if module.first:
            self._start, self._rows = began, x.shape[0]
        out = module.forward(x)
        self._step["projections"] += time.perf_counter() - began
        return out

    def add(self, part: str, seconds: float) -> None:
        self._step[part] += seconds

    def end_step(self, step: SparseStep | None, quantized: bool) -> None:
        start, self._start = self._start, None
        parts, self._step = self._step, dict.fromkeys(TIMED_PARTS, 0.0)
        if start is None:  # no wrapped projection ran in this forward
            return
        if step is not None:
            kind = "sparse gemv" if step.fast else "sparse masked"
        else:
            kind = ("quantized" if quantized else "dense") + (" 1 row" if self._rows == 1 else " batch")
        total = self.totals.setdefault(kind, {"steps": 0, **dict.fromkeys(("forward", *TIMED_PARTS), 0.0)})
        total["steps"] += 1
        total["forward"] += time.perf_counter() - start
        for part, seconds in parts.items():
            total[part] += seconds

    def report(self) -> dict[str, dict[str, float]]:
        """kind -> steps and milliseconds per step: forward, projections, kernels, basis, wrappers (fast path:
        projections - kernels - basis), rest (forward - projections: attention, norms, activations, vLLM)."""
        out = {}
        for kind, total in self.totals.items():
            n = max(total["steps"], 1)
            ms = {part: 1000 * total[part] / n for part in ("forward", *TIMED_PARTS)}
            ms["wrappers"] = ms["projections"] - ms["kernels"] - ms["basis"] if kind == "sparse gemv" else 0.0
            ms["rest"] = ms["forward"] - ms["projections"]
            out[kind] = {"steps": total["steps"], **ms}
        return out


class SparseRuntime:
    """Thresholds, column norms and the wrapped projections of one model."""

    def __init__(self, model_path: str, thresholds_path: str, num_layers: int, device: torch.device,
                 prompt: bool = False, profile: bool | None = None, layout: ModelLayout | None = None) -> None:
        """`layout`: the served model's architecture (server/worker/model.py); default the Llama layout."""
        self.layout = layout if layout is not None else default_layout()
        if self.layout.family.sparse:
            raise RuntimeError(f"sparse mode cannot run on {self.layout.family.name}: {self.layout.family.sparse}")
        # The threshold tables' columns: a block's projections in module order (Llama: PROJ_NAMES).
        self.proj_names = self.layout.family.projection_names
        self.prompt = prompt  # also sparsify prompt tokens (default: they run dense)
        if profile is None:
            profile = os.environ.get(PROFILE_ENV, "0") == "1"
        self.profile = StepProfile() if profile else None
        self.levels = available_levels(thresholds_path)  # the served allocation's levels
        self.num_layers = num_layers
        self._files = weight_files(model_path)
        self._thr: dict[str, list[list[float]]] = {}
        for level in self.levels:
            table = load_thresholds(level, thresholds_path)
            missing = [f"{i}.{p}" for i in range(num_layers) for p in self.proj_names if f"{i}.{p}" not in table]
            if missing:
                raise KeyError(f"{thresholds_path} level {level} has no thresholds for {missing[:4]}"
                               f"{' ...' if len(missing) > 4 else ''} ({len(missing)} missing; the "
                               f"{self.layout.family.name} layout's projections are {list(self.proj_names)})")
            self._thr[level] = [[float(table[f"{i}.{p}"]) for p in self.proj_names] for i in range(num_layers)]
        self._thr_tensor = torch.tensor([self._thr[lv] for lv in self.levels], dtype=torch.float32, device=device)
        self._level_index = {lv: i for i, lv in enumerate(self.levels)}
        # "<layer>.<group>" -> T float32 (the basis), or None; and (q, scale) of the bases stored in int8.
        self.rotations, stored_int8 = load_rotation_file(thresholds_path)
        # T⁻¹ in float64, inverted once per basis: the column norms, the fast path's weights and the mask
        # path's map back all use it (~40 ms per inversion, 30 bases).
        self._inverses = {key: basis_inverse(t, torch.float64) for key, t in (self.rotations or {}).items()}
        self.norms: list[list[torch.Tensor]] = [
            [_column_norms(self._weight(i, p)).to(device) for p in self.proj_names] for i in range(num_layers)]
        self._w_t: dict[tuple[int, int], torch.Tensor] = {}
        from featurelens.kernels.sparse_gemv import parts_kernel

        self.gemv_parts = parts_kernel(device)  # (x, w_ts, norms [parts, in], thresholds, out) -> zeroed inputs
        from featurelens.kernels.sparse_gemv import native_available, native_status, prefetch_level

        if device.type == "cuda":
            log.info("sparse mode: batch-1 kernel %s", getattr(self.gemv_parts, "__name__", self.gemv_parts))
        else:
            log.info("sparse mode: batch-1 kernels %s%s", native_status(),
                     f", prefetching weight rows into {prefetch_level()}" if native_available() else "")

        # x T (inputs read in another basis) on the fast path: the native GEMV at threshold 0 on CPU; elsewhere
        # (GPU, or no extension, where the fallback would gather every row) a plain matmul.
        self.rotate_gemv = self.gemv_parts if device.type == "cpu" and native_available() else None
        # Bases the file stores as int8 rows (+ per-row scales): the fast path walks those bytes directly
        # (`basis_gemv_int8`, half the bf16 basis's reads); everything else reads T~ = q * scale.
        self.rotations_int8 = stored_int8 if self.rotate_gemv is not None else {}
        if self.rotations_int8:
            from featurelens.kernels.sparse_gemv import basis_int8_kernel

            self.basis_int8 = basis_int8_kernel()
        self.step: SparseStep | None = None
        self.stats: OrderedDict[str, list[float]] = OrderedDict()
        self.fast_path_calls = 0

    # -- weights -----------------------------------------------------------------------------------------

    def _weight(self, layer: int, proj: str) -> torch.Tensor:
        """[out, in] weight as the mask sees it: W, or W T⁻ᵀ (float32) for a projection read in basis T."""
        weight = self.layout.projection_weight(self._files, layer, proj)
        t = self.rotation(layer, proj)
        return weight if t is None else basis_weight(weight, t, self.inverse(layer, proj))

    def rotation(self, layer: int, proj: str) -> torch.Tensor | None:
        return rotation_of(self.rotations, layer, proj)

    def rotation_int8(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q int8, per-row scale) of that basis when the file stores it in int8 and the native walk runs."""
        return rotation_of(self.rotations_int8, layer, proj)

    def inverse(self, layer: int, proj: str) -> torch.Tensor | None:
        """T⁻¹ (float64) of the basis `rotation(layer, proj)`, or None."""
        return rotation_of(self._inverses, layer, proj)

    @property
    def rotated_groups(self) -> list[str]:
        """The input groups ("mlp", "attn") masked in a rotated basis; [] without rotations."""
        return sorted({key.split(".", 1)[1] for key in self.rotations or {}})

    def transposed(self, layer: int, p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[in, out] contiguous weight of projection p, built once on the first fast-path call."""
        w_t = self._w_t.get((layer, p))
        if w_t is None:
            from featurelens.kernels.sparse_gemv import transpose_weight

            w_t = transpose_weight(self._weight(layer, self.proj_names[p]).to(device=device, dtype=dtype))
            self._w_t[(layer, p)] = w_t
        return w_t

    # -- installation ------------------------------------------------------------------------------------

    def install(self, layers: Any = None) -> int:
        """Wrap the projection modules of every decoder layer (`layers`, else the layout's); idempotent (set-up
        may run twice). Every projection the thresholds cover must be wrappable, or nothing is wrapped."""
        if layers is not None:
            self.layout.layers = list(layers)
        found = []
        for index in range(len(self.layout.layers)):
            modules, skipped = self.layout.wrappable(index)
            if skipped:
                raise RuntimeError(f"sparse mode cannot wrap {self.layout.family.name}: {'; '.join(skipped[:3])}")
            found.append(modules)
        for modules in found:
            for _, linear in modules:
                if getattr(linear, "tp_size", 1) != 1:
                    raise RuntimeError("sparse mode supports tensor_parallel_size=1 only")
        count = 0
        for index, modules in enumerate(found):
            for projection, linear in modules:
                module: Any = linear  # a vLLM linear layer; the attributes set here are ours
                dense = getattr(module, "_fl_dense_forward", None) or module.forward
                module._fl_dense_forward = dense
                module.forward = _SparseProjection(self, module, dense, index, projection.parts)
                count += 1
        return count

    # -- per step ----------------------------------------------------------------------------------------

    def rows_of(self, requests: list[Any]) -> list[tuple[str, int, int, str]]:
        """(key, start, end, level) of the rows each sparse request runs sparse in this step: all its rows with
        `prompt`, else those at generated-token positions (>= its prompt length). Prompt tokens run dense by
        default: prefill is compute-bound, so skipping inputs saves no time there (the batched mask path even
        costs ~2x), and a dense prompt's KV cache keeps quality closer to dense (measured in docs/modes.md).
        A request's rows in one step are consecutive positions from `r.first` on (read on the host by the
        runner adapter), so the sparse rows are a suffix."""
        if self.prompt:
            return [(r.key, r.start, r.end, r.sparse) for r in requests]
        out = []
        for r in requests:
            skip = max(0, min(r.end - r.start, r.num_prompt_tokens - r.first))
            if r.start + skip < r.end:
                out.append((r.key, r.start + skip, r.end, r.sparse))
        return out

    def begin(self, requests: list[tuple[str, int, int, str]], total_rows: int) -> None:
        """requests: (key, start, end, level) of the sparse-mode requests in this step's flattened batch."""
        self.step = None
        if not requests:
            return
        rows: list[int] = []
        levels: list[str] = []
        segments: list[tuple[str, int, int]] = []
        for key, start, end, level in requests:
            segments.append((key, len(rows), len(rows) + end - start))
            rows.extend(range(start, end))
            levels.extend([level] * (end - start))
        device = self._thr_tensor.device
        index = torch.tensor([self._level_index[lv] for lv in levels], dtype=torch.long, device=device)
        self.step = SparseStep(rows=torch.tensor(rows, dtype=torch.long, device=device),
                               thresholds=self._thr_tensor.index_select(0, index), levels=levels,
                               all_rows=len(rows) == total_rows, segments=segments,
                               zeroed=torch.zeros(len(rows), dtype=torch.float64, device=device))

    def end(self, quantized: bool = False) -> None:
        """After the forward. `quantized`: the step had quantized-mode rows (for the profile's step kinds)."""
        if self.profile is not None:
            self.profile.end_step(self.step, quantized)
        step, self.step = self.step, None
        if step is None or step.inputs == 0:
            return
        if step.fast_zeroed:
            step.zeroed[0] += step.fast_zeroed
        for key, start, end in step.segments:
            entry = self.stats.pop(key, None) or [0.0, 0.0, 0.0, 0.0]
            entry[0] += float(step.zeroed[start:end].sum())
            entry[1] += float(step.inputs * (end - start))
            entry[2] += end - start
            entry[3] += (end - start) if step.fast else 0
            self.stats[key] = entry
        while len(self.stats) > MAX_STATS:
            self.stats.popitem(last=False)

    def report(self) -> dict[str, dict[str, float]]:
        return {key: {"zeroed_fraction": z / n if n else 0.0, "inputs": n, "rows": rows, "sparse_gemv_rows": fast}
                for key, (z, n, rows, fast) in self.stats.items()}


class _SparseProjection:
    """The forward of one (possibly fused) projection module: dense unless the step has sparse rows."""

    def __init__(self, runtime: SparseRuntime, module: Any, dense: Any, layer: int, parts: tuple[str, ...]) -> None:
        self.runtime, self.module, self.dense, self.layer = runtime, module, dense, layer
        self.parts = [runtime.proj_names.index(p) for p in parts]
        self.first = layer == 0 and parts[0] == runtime.proj_names[0]  # the step's first projection (profile start)
        sizes = list(getattr(module, "output_sizes", None) or [module.output_size])
        if len(sizes) != len(parts):
            raise RuntimeError(f"layer {layer}: {type(module).__name__} has outputs {sizes}, expected {parts}")
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        self.slices = [slice(bounds[i], bounds[i + 1]) for i in range(len(parts))]
        self.has_bias = getattr(module, "bias", None) is not None
        # Fast-path constants: batch-1 decode pays Python overhead per call, so nothing is rebuilt per step.
        self.norm_stack = torch.stack([runtime.norms[layer][p] for p in self.parts]).contiguous()  # [parts, in]
        self.thr_list = {lv: [runtime._thr[lv][layer][p] for p in self.parts] for lv in runtime.levels}
        self.out_features = bounds[-1]
        self.w_t: list[torch.Tensor] | None = None
        rotations = [runtime.rotation(layer, p) for p in parts]
        if any(q is not rotations[0] for q in rotations):
            raise RuntimeError(f"layer {layer}: {parts} share one input and must share its rotation")
        self.rotation = None if rotations[0] is None else rotations[0].to(self.norm_stack.device)  # T, float32
        inverse = runtime.inverse(layer, parts[0])
        self.inverse = None if inverse is None else inverse.float().to(self.norm_stack.device)  # T⁻¹, float32
        self.rotation_fast: torch.Tensor | None = None  # in the activations' dtype, for the batch-1 path
        self.rotation_int8 = runtime.rotation_int8(layer, parts[0])  # (q, scale): the batch-1 path's int8 walk
        # x T on the fast path is a GEMV at threshold 0 over all inputs: unit norms keep every nonzero x_i.
        self.all_inputs = None if self.rotation is None else torch.ones_like(self.norm_stack[:1])

    def __call__(self, x: torch.Tensor) -> Any:
        profile = self.runtime.profile
        return self.forward(x) if profile is None else profile.timed(self, x)

    def forward(self, x: torch.Tensor) -> Any:
        step = self.runtime.step
        if step is None:
            return self.dense(x)
        if x.dim() == 3 and x.shape[0] == 1:  # vLLM's Transformers backend: HF's batch dimension
            return with_batch_dim(self.forward(x[0]))
        if x.dim() != 2:
            return self.dense(x)
        full = step.all_rows and x.shape[0] == step.rows.numel()  # a padded batch is never "all sparse"
        if full and x.shape[0] == 1 and not self.has_bias:
            return self._wrap(self._gemv(x, step))
        return self._masked(x, step, full)

    def _wrap(self, out: torch.Tensor) -> Any:
        return (out, None) if getattr(self.module, "return_bias", True) else out

    def _gemv(self, x: torch.Tensor, step: SparseStep) -> torch.Tensor:
        profile = self.runtime.profile
        if self.w_t is None:
            self.w_t = [self.runtime.transposed(self.layer, p, x.dtype, x.device) for p in self.parts]
        if self.rotation is not None:
            # x T with the same native GEMV at threshold 0 (nothing skipped): 50-80 us per 576 x 576 on the
            # AMX box, where torch's bf16 matmul at M = 1 takes ~180 us (measured, 1 thread); int8 bases by
            # their own walk (no bf16 copy of T is made for them).
            if self.rotation_int8 is None and (self.rotation_fast is None or self.rotation_fast.dtype != x.dtype):
                self.rotation_fast = self.rotation.to(x.dtype).contiguous()  # [in, in]: row i = what x_i adds
            began = time.perf_counter() if profile is not None else 0.0
            if self.rotation_int8 is not None:
                rotated = torch.empty_like(x)
                self.runtime.basis_int8(x[0].contiguous(), *self.rotation_int8, rotated)
                x = rotated
            else:
                rotation_fast, all_inputs = self.rotation_fast, self.all_inputs
                assert rotation_fast is not None and all_inputs is not None  # made above / with the basis
                if self.runtime.rotate_gemv is not None:
                    rotated = torch.empty_like(x)
                    self.runtime.rotate_gemv(x[0].contiguous(), [rotation_fast], all_inputs, [0.0], rotated)
                    x = rotated
                else:
                    x = x @ rotation_fast
            if profile is not None:
                profile.add("basis", time.perf_counter() - began)
        out = torch.empty((1, self.out_features), dtype=x.dtype, device=x.device)
        began = time.perf_counter() if profile is not None else 0.0
        # One native call computes every part with its own threshold, writes `out` and counts the zeroed inputs.
        step.fast_zeroed += self.runtime.gemv_parts(x[0].contiguous(), self.w_t, self.norm_stack,
                                                    self.thr_list[step.levels[0]], out)
        if profile is not None:
            profile.add("kernels", time.perf_counter() - began)
        step.inputs += x.shape[1] * len(self.parts)
        step.fast = True
        self.runtime.fast_path_calls += 1
        return out

    def _masked(self, x: torch.Tensor, step: SparseStep, full: bool) -> Any:
        xs = x if full else x.index_select(0, step.rows)
        n = xs.shape[0]
        basis = xs if self.rotation is None else xs.float() @ self.rotation
        absx = basis.float().abs()
        copies = []
        for p in self.parts:
            keep = absx * self.runtime.norms[self.layer][p] >= step.thresholds[:, self.layer, p:p + 1]
            step.zeroed += x.shape[1] - keep.sum(1)
            masked = basis.masked_fill(~keep, 0)
            if self.rotation is None:
                copies.append(masked)
            else:
                assert self.inverse is not None  # inverted with the basis (SparseRuntime.inverse)
                copies.append((masked @ self.inverse).to(xs.dtype))
        step.inputs += x.shape[1] * len(self.parts)
        result = self.dense(copies[0] if len(copies) == 1 else torch.cat(copies))
        stacked = result[0] if isinstance(result, tuple) else result
        if len(copies) == 1:
            sparse_out = stacked
        else:
            sparse_out = torch.cat([stacked[i * n:(i + 1) * n, sl] for i, sl in enumerate(self.slices)], dim=1)
        if full:
            return (sparse_out, *result[1:]) if isinstance(result, tuple) else sparse_out
        dense = self.dense(x)
        out = dense[0] if isinstance(dense, tuple) else dense
        out.index_copy_(0, step.rows, sparse_out.to(out.dtype))
        return dense


def with_batch_dim(out: Any) -> Any:
    """A projection's output (a tensor, or (tensor, bias)) with a leading batch dimension of 1 put back."""
    if isinstance(out, tuple):
        return (out[0].unsqueeze(0), *out[1:])
    return out.unsqueeze(0)


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().norm(dim=0).contiguous()


def read_tensor(files: Mapping[str, str], key: str) -> torch.Tensor:
    """One tensor of a (possibly sharded) HF model folder, by name (`files` from `weight_files`)."""
    from safetensors import safe_open

    with safe_open(files[key], framework="pt") as f:
        return f.get_tensor(key)


def projection_weight(files: Mapping[str, str], layer: int, proj: str) -> torch.Tensor:
    """[out, in] weight of HF projection `proj` (q_proj, ..., down_proj) of decoder layer `layer`."""
    return read_tensor(files, f"model.layers.{layer}.{PROJECTIONS[proj]}.weight")


@functools.lru_cache(maxsize=4)
def weight_files(model_path: str) -> Mapping[str, str]:
    """Tensor name -> safetensors file of a (possibly sharded) HF model folder. Read once per folder and shared
    (read-only) by sparse mode, quantized mode and the int8 head: each used to open every file's header."""
    from safetensors import safe_open

    files: dict[str, str] = {}
    for path in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update({key: str(path) for key in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_path}: sparse mode needs the weights' column norms")
    return MappingProxyType(files)
