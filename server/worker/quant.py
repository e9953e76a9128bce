"""Per-request int8 quantized mode (int8 weights, weight-only) inside the vLLM worker (installed by
server/worker/extension.py).

The engine keeps serving its full-precision weights; at set-up every decoder projection also gets an int8
copy (symmetric per-output-channel weights, quantized from the model's safetensors by
`featurelens.kernels.int8_gemm.quantize_weight`), and each projection module's `forward` is wrapped —
on top of the sparse-mode wrapper when there is one:

- no quantized row in the step (the default): the previous forward, nothing else;
- every row of the step is quantized: only the int8-weight GEMM runs (float activations, fp32 accumulation;
  `featurelens.kernels.int8_gemm.WeightOnlyGemm`: the native kernel, `kernels/csrc/int8_gemm.cpp`, for
  decode-sized steps, and from 16-32 rows on — prefill, large batches — the weight dequantized chunk by chunk
  into a scratch buffer and the float GEMM; W8A8 with per-token int8 activations measured x1.03 perplexity
  against x1.00 for weight-only, so the mode is weight-only);
- a mixed step: the previous forward runs for the whole batch exactly as before (so other requests' rows are
  bit-identical to a run without quantized requests), then the quantized rows are recomputed in int8 and
  written over their rows.

The unembedding (lm_head, tied to the embedding in SmolLM2: 21% of the weights) gets an int8 copy too
(`Int8Head`): vLLM computes logits for one row per request, in batch order (the last scheduled token of each),
so the wrapped `lm_head.quant_method.apply` recomputes the quantized requests' rows in int8 the same way
(held-out perplexity unchanged: 23.968 vs 23.967 with projections only). Sparse-mode requests use the same
copy, re-scored: their rows in int8, then the RESCORE_TOP best candidates of each row recomputed with the
full-precision head, so their greedy token and every logit that can matter for sampling are the dense head's
while the step reads half the head's bytes (`--sparse-logits dense` turns it off). What stays in full precision: the embedding
lookup, norms, attention arithmetic (softmax over the KV cache) and the KV cache itself. The SAE hooks read the residual stream the int8 projections
produce, so features, steering and risk of a quantized request describe the quantized model.

Why not a second engine from a compressed-tensors checkpoint: vLLM's CPU W8A8 path (oneDNN) measured 6-20x
slower than our kernels at decode sizes on the AVX2 dev box (3 ms for one gate_up projection at M = 1), a
second engine doubles the KV-cache memory and the start-up time, and one engine batches dense and quantized
requests together.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from featurelens.kernels.int8_gemm import WeightOnlyGemm
from featurelens.server.worker.model import ModelLayout, default_layout
from featurelens.server.worker.sparse import read_tensor, weight_files, with_batch_dim

log = logging.getLogger(__name__)

MAX_STATS = 4096


def unavailable_on(device: torch.device) -> str | None:
    """Why int8 mode (and the int8 unembedding) cannot run on `device`, or None when it can."""
    from featurelens.kernels import int8_gemm

    if device.type in int8_gemm.DEVICES:
        return None
    return (f"the int8 kernels run on {', '.join(int8_gemm.DEVICES)} only; this worker's device is {device.type} "
            "(kernels/int8_gemm.py DEVICES)")


class QuantRuntime:
    """The int8 weights and the wrapped projections of one model."""

    def __init__(self, model_path: str, layout: ModelLayout | None = None) -> None:
        """`layout`: the served model's architecture (server/worker/model.py); default the Llama layout."""
        from featurelens.kernels import int8_gemm

        self.layout = layout if layout is not None else default_layout()
        self._files = weight_files(model_path)
        self.backend = int8_gemm.native_status()
        self.linear = int8_gemm.weight_only_kernel()  # x [M, in] -> [M, out], x's dtype
        self.rows: torch.Tensor | None = None  # the quantized rows of this step
        self.head: Int8Head | None = None  # the int8 unembedding, when installed (its counters are reported)
        self.all_rows = False
        self.segments: list[tuple[str, int]] = []
        self.stats: OrderedDict[str, int] = OrderedDict()  # request key -> rows computed in int8
        self.weight_bytes = 0
        self.skipped: list[str] = []  # modules left in full precision, and why (MoE blocks)
        self.wrapped: set[str] = set()  # module paths (under a layer) computed in int8

    def install(self, layers: Any = None) -> int:
        """Quantize and wrap the projection modules of every decoder layer (`layers`, else the layout's);
        idempotent. Modules that cannot be wrapped (a MoE block's experts) are skipped and listed in `skipped`;
        a model with nothing to wrap raises RuntimeError (the mode is then unavailable)."""
        from featurelens.kernels.int8_gemm import quantize_weight

        if layers is not None:
            self.layout.layers = list(layers)
        found, self.skipped = [], []
        for index in range(len(self.layout.layers)):
            modules, skipped = self.layout.wrappable(index)
            found.append(modules)
            self.skipped.extend(skipped)
            for _, linear in modules:
                if getattr(linear, "tp_size", 1) != 1:
                    raise RuntimeError("quantized mode supports tensor_parallel_size=1 only")
        if not any(found):
            raise RuntimeError(f"no projection of {self.layout.family.name} can be wrapped: "
                               f"{'; '.join(self.skipped[:3])}")
        if self.skipped:
            log.warning("quantized mode: %d modules stay in full precision (%s%s)", len(self.skipped),
                        "; ".join(self.skipped[:4]), " ..." if len(self.skipped) > 4 else "")
        count = 0
        for index, modules in enumerate(found):
            for projection, linear in modules:
                module: Any = linear  # a vLLM linear layer; the attributes set here are ours
                weight = torch.cat([self.layout.projection_weight(self._files, index, p) for p in projection.parts])
                expected = sum(getattr(module, "output_sizes", None) or [module.output_size])
                if weight.shape[0] != expected:
                    raise RuntimeError(f"layer {index} {projection.path}: checkpoint rows {weight.shape[0]} != "
                                       f"{expected}")
                wq, sw = quantize_weight(weight)
                self.weight_bytes += wq.numel() + sw.numel() * 4
                inner = getattr(module, "_fl_quant_inner", None) or module.forward
                module._fl_quant_inner = inner
                module.forward = _QuantProjection(self, module, inner, wq, sw)
                self.wrapped.add(projection.path)
                count += 1
        return count

    @property
    def covers(self) -> str:
        """What runs in int8, in words (GetModelInfo's mode description)."""
        moe = self.layout.family.moe_block
        if not self.skipped and not moe:
            return "the decoder projections"
        kept = f"the mixture-of-experts blocks ({moe})" if moe else f"{len(self.skipped)} modules"
        return f"the projections {', '.join(sorted(self.wrapped))} where present; {kept} stay in full precision"

    def begin(self, requests: list[tuple[str, int, int]], total_rows: int) -> None:
        self.rows, self.segments = None, []
        if not requests:
            return
        rows: list[int] = []
        for key, start, end in requests:
            rows.extend(range(start, end))
            self.segments.append((key, end - start))
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.all_rows = len(rows) == total_rows

    def end(self) -> None:
        if self.rows is None:
            return
        for key, n in self.segments:
            self.stats[key] = self.stats.pop(key, 0) + n
        while len(self.stats) > MAX_STATS:
            self.stats.popitem(last=False)
        self.rows, self.segments = None, []

    def report(self) -> dict[str, dict[str, Any]]:
        dequant = {"dequant_rows": self.linear.dequant_rows, "dequant_calls_total": self.linear.dequant_calls} \
            if isinstance(self.linear, WeightOnlyGemm) else {}
        head = self.head.int8_rows_total if self.head is not None else 0
        return {key: {"rows": n, "backend": self.backend, "lm_head_rows_total": head, **dequant}
                for key, n in self.stats.items()}


RESCORE_TOP = 64  # candidates per sparse-mode logits row recomputed with the full-precision head


class Int8Head:
    """The unembedding's int8 copy, for two kinds of logits rows (vLLM's layout: one row per request, in batch
    order): quantized requests' rows are int8 (quantized mode); sparse requests' rows are int8 with each row's
    RESCORE_TOP best candidates re-scored by the full-precision head (sparse mode's "int8-rescored" logits).

    Why sparse mode re-scores: at batch 1 the 49152 x 576 head is a fifth of SmolLM2's weight bytes and sparse
    mode never zeroes its inputs, so it caps the decode speed-up (~1.65x at 50%). int8 reads half the bytes
    (and on one thread took about half the time of vLLM's bf16 linear, docs/measurements/); the int8 logits'
    error (per-row scales; perplexity x1.000 in quantized mode) cannot move a token from beyond the 64th place
    to the first, so after the exact re-score the argmax, and every probability above ~1e-6, are the dense
    head's. The tail's logits stay int8: sampled and reported logprobs differ from dense only through them."""

    def __init__(self, linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 rescore: bool = False) -> None:
        self.linear = linear
        self.rescore = rescore  # sparse requests' rows re-scored (--sparse-logits int8-rescored)
        self.int8_rows: torch.Tensor | None = None
        self.rescored_rows: torch.Tensor | None = None
        self.num_reqs = 0
        self.int8_rows_total = 0  # observability (tests, stats RPCs)
        self.rescored_rows_total = 0
        self.weight_bytes = 0

    def install(self, model: Any, files: Mapping[str, str], layout: ModelLayout | None = None) -> bool:
        """Wrap the unembedding's `quant_method.apply` with an int8 copy of it; False when it cannot be done
        (tensor parallel, no plain unquantized head, or a vocabulary padded differently than the checkpoint).
        `layout`: where the unembedding and its checkpoint tensor are (default: Llama's `lm_head`, tied or not)."""
        from featurelens.kernels.int8_gemm import quantize_weight

        if layout is None:
            layout = default_layout()
            layout.model = model
        head = layout.unembedding()
        method = getattr(head, "quant_method", None)
        if head is None or method is None or getattr(head, "tp_size", 1) != 1:
            return False
        key = layout.unembedding_key(files)
        if key is None:
            return False
        weight = read_tensor(files, key)
        rows = getattr(head, "weight", None)
        if rows is None or rows.shape[0] != weight.shape[0] or getattr(head, "bias", None) is not None:
            return False
        wq, sw = quantize_weight(weight)
        self.weight_bytes = wq.numel() + sw.numel() * 4
        inner = getattr(method, "_fl_quant_inner", None) or method.apply
        method._fl_quant_inner = inner
        method.apply = _QuantLogits(self, inner, wq, sw, rows)
        return True

    def begin(self, int8: list[int], rescored: list[int], num_reqs: int) -> None:
        """Before the forward: which requests (batch order) get int8 / re-scored logits rows."""
        self.int8_rows = torch.tensor(int8, dtype=torch.long) if int8 else None
        self.rescored_rows = torch.tensor(rescored, dtype=torch.long) if rescored else None
        self.num_reqs = num_reqs


class _QuantProjection:
    def __init__(self, runtime: QuantRuntime, module: Any, inner: Any, wq: torch.Tensor, sw: torch.Tensor) -> None:
        self.runtime, self.module, self.inner, self.wq, self.sw = runtime, module, inner, wq, sw
        bias = getattr(module, "bias", None)
        self.bias = bias.detach().float() if bias is not None else None

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        y = self.runtime.linear(x, self.wq, self.sw)
        return y if self.bias is None else (y.float() + self.bias).to(x.dtype)

    def __call__(self, x: torch.Tensor) -> Any:
        rt = self.runtime
        rows = rt.rows
        if rows is None:
            return self.inner(x)
        if x.dim() == 3 and x.shape[0] == 1:  # vLLM's Transformers backend: HF's batch dimension
            return with_batch_dim(self(x[0]))
        if x.dim() != 2:
            return self.inner(x)
        if rt.all_rows and x.shape[0] == rows.numel():
            out = self._int8(x)
            return (out, None) if getattr(self.module, "return_bias", True) else out
        result = self.inner(x)
        out = result[0] if isinstance(result, tuple) else result
        out.index_copy_(0, rows, self._int8(x.index_select(0, rows)).to(out.dtype))
        return result


class _QuantLogits:
    """`lm_head.quant_method.apply(layer, hidden, bias)` with the quantized requests' rows in int8 and the sparse
    requests' rows in int8, re-scored (`Int8Head`); every other row is the original head's, bit for bit."""

    def __init__(self, head: Int8Head, inner: Any, wq: torch.Tensor, sw: torch.Tensor, weight: torch.Tensor) -> None:
        self.head, self.inner, self.wq, self.sw, self.weight = head, inner, wq, sw, weight

    def rescored(self, x: torch.Tensor) -> torch.Tensor:
        """int8 logits of x's rows with each row's RESCORE_TOP best recomputed exactly (fp32 accumulation, as
        the dense head)."""
        logits = self.head.linear(x, self.wq, self.sw)
        top = logits.topk(min(RESCORE_TOP, logits.shape[-1]), dim=-1).indices  # [rows, k]
        exact = torch.einsum("rd,rkd->rk", x.float(), self.weight[top].float())
        return logits.scatter_(1, top, exact.to(logits.dtype))

    def __call__(self, layer: Any, x: torch.Tensor, bias: Any = None) -> torch.Tensor:
        head = self.head
        int8, rescored = head.int8_rows, head.rescored_rows
        # One row per request is vLLM's layout without speculative decoding; anything else stays dense.
        if (int8 is None and rescored is None) or bias is not None or x.dim() != 2 or x.shape[0] != head.num_reqs:
            return self.inner(layer, x, bias)
        n_int8 = int8.numel() if int8 is not None else 0
        n_rescored = rescored.numel() if rescored is not None else 0
        head.int8_rows_total += n_int8
        head.rescored_rows_total += n_rescored
        if n_int8 == x.shape[0]:
            return head.linear(x, self.wq, self.sw)
        if n_rescored == x.shape[0]:
            return self.rescored(x)
        out = self.inner(layer, x, bias)
        if int8 is not None:
            out.index_copy_(0, int8, head.linear(x.index_select(0, int8), self.wq, self.sw).to(out.dtype))
        if rescored is not None:
            out.index_copy_(0, rescored, self.rescored(x.index_select(0, rescored)).to(out.dtype))
        return out
