"""Kernel microbenchmarks: sparse (WINA) GEMV vs dense at batch 1, side by side in one run.

    featurelens bench kernels [--dtypes bf16 fp32] [--hot] [--threads N] [--rounds 9] [--allocations]

For SmolLM2-135M's MLP shapes (gate/up 576->1536, down 1536->576) and sparsities 25/40/50/65%:
  dense      what vLLM's CPU backend runs for the dense layer (`engine_linear`: a oneDNN matmul on pre-packed
             weights where vLLM's build has oneDNN; measured 2x faster than F.linear at M = 1 on Zen 5)
  F.linear   torch F.linear(x, W) with W [out, in] (the baseline of older figures)
  kernel@0%  our native kernel with nothing skipped (separates "skipping rows" from "a different GEMV")
  native     our C++ sparse kernel on the masked x (featurelens.kernels.sparse_gemv), its prefetches filling the
             cache level it uses by default on this CPU (L2 on AMD, L1 elsewhere)
  other pf   the same with the other level (`set_prefetch`): the evidence for that default on this CPU
  gather     the pure-torch fallback (index_select of active rows + matmul)
Each figure is the median over rounds; in every round all variants run back to back on the same inputs, so
load from other processes hits them alike. By default each call reads a different copy of the weight from a
pool larger than the last-level cache, as decode does (the whole model never fits in cache); --hot reuses
one copy. `bound` is the physical floor: weight bytes read per token / measured copy bandwidth, for dense
(all rows) and sparse (active rows only); `bound x` = dense bound / sparse bound = 1 / (1 - sparsity).
The MLP line sums gate + up + down (gate and up read the same sparse input), the issue's >= 1.5x goal at 50%.
--allocations adds the whole decoder's projections per decoded token under each shipped allocation
(`allocation_step_times`): what the choice of allocation does to the part of decode that sparsity speeds up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from featurelens.kernels import sparse_gemv as sg
from featurelens.kernels.sparse_gemv import native_status, sparse_gemv, sparse_gemv_torch, transpose_weight
from featurelens.server.bench.common import parser

SHAPES = {"gate/up": (576, 1536), "down": (1536, 576)}  # (in, out) of SmolLM2-135M's MLP projections
SPARSITIES = (0.25, 0.40, 0.50, 0.65)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def last_level_cache_bytes() -> int:
    sizes = []
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * mult)
    return max(sizes, default=32 << 20)


def copy_bandwidth(n_bytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes per second moved by a large tensor copy (read + write both counted), median of repeats."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(times)


def _time_rounds(variants: Mapping[str, Callable[..., object]], calls: int, rounds: int) -> dict[str, float]:
    """Median microseconds per call of each variant; variants alternate within every round."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up (first native call may build/load the extension)
        for j in range(3):
            fn(j)
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            for j in range(calls):
                fn(j)
            samples[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def engine_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ weight.T exactly as vLLM's CPU backend computes an unquantized linear layer: its own dispatch
    (`dispatch_cpu_unquantized_gemm`: oneDNN with packed weights, or zentorch / AMX kernels where present,
    F.linear otherwise) applied to a stand-in layer. This is the dense mode every kernel here competes with."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    cpu_linear = cast(Callable[..., torch.Tensor], layer.cpu_linear)  # a plain attribute the dispatch sets
    return lambda x: cpu_linear(x, layer.weight, None)


def _masked_input(n_in: int, sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Exactly round(sparsity * n_in) zeros at random positions (what a calibrated WINA mask yields)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_in, generator=g)
    x[torch.randperm(n_in, generator=g)[: round(sparsity * n_in)]] = 0
    return x.to(dtype)


def _other(r: Mapping[str, float]) -> str:
    """'other pf' time and native's speed-up over it (> 1: the default level is the faster one here)."""
    if "other pf" not in r:
        return ""
    return f"{r['other pf']:>11.1f} {r['other pf'] / r['native']:>5.2f}x"


def bench_shape(n_in: int, n_out: int, dtype: torch.dtype, hot: bool, rounds: int) -> dict[float, dict[str, float]]:
    weight_bytes = n_in * n_out * dtype.itemsize
    copies = 1 if hot else max(2, 3 * last_level_cache_bytes() // weight_bytes)
    g = torch.Generator().manual_seed(0)
    dense_w = [torch.randn(n_out, n_in, generator=g).to(dtype) for _ in range(copies)]
    engine_w = [engine_linear(w) for w in dense_w]
    sparse_w = [transpose_weight(w) for w in dense_w]
    calls = max(copies, 50)
    x_dense = torch.randn(1, n_in, generator=g).to(dtype)
    x0 = x_dense[0]
    out: dict[float, dict[str, float]] = {}
    native = sg.native_available()
    default = sg.prefetch_level() if native else ""
    other = {"l1": "l2", "l2": "l1"}.get(default, "")

    def at_level(level: str, x: torch.Tensor) -> Callable[[int], object]:
        def run(j: int) -> object:
            if native:
                sg.set_prefetch(level)  # a sub-microsecond call, paid alike by both levels
            return sparse_gemv(x, sparse_w[j % copies], backend="native" if native else "torch")
        return run

    try:
        for s in SPARSITIES:
            xs = _masked_input(n_in, s, dtype, seed=int(s * 100))
            variants: dict[str, Callable[..., object]] = {
                "dense": lambda j: engine_w[j % copies](x_dense),
                "F.linear": lambda j: F.linear(x_dense, dense_w[j % copies]),
                "kernel@0%": at_level(default, x0),
                "native": at_level(default, xs),
                "gather": lambda j, xs=xs: sparse_gemv_torch(xs, sparse_w[j % copies]),
            }
            if other:
                variants["other pf"] = at_level(other, xs)
            out[s] = _time_rounds(variants, calls, rounds)
    finally:
        if native:
            sg.set_prefetch(default)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser("kernels", __doc__)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--hot", action="store_true", help="reuse one weight copy (cache-resident) instead of a pool")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--allocations", action="store_true",
                    help="also time the decoder's projections per token under each shipped sparse allocation")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    status = native_status()
    level = sg.prefetch_level() if sg.native_available() else "-"
    print(f"sparse GEMV backend: {status}; prefetch into {level} ('other pf': the other level); torch threads: "
          f"{torch.get_num_threads()}; weights: {'hot (one copy)' if args.hot else 'cold (pool > LLC)'}")
    if not status.startswith("native"):
        print("native kernel unavailable: 'native' and 'kernel@0%' columns run the torch fallback")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)\n")
    head = (f"{'dtype':<5} {'proj':<8} {'sparse':>6} {'dense us':>9} {'F.lin us':>8} {'k@0% us':>8} {'native us':>9} "
            f"{'x dense':>7} {'x k@0%':>6} {'gather us':>9} {'x dense':>7} {'bound us':>13} {'bound x':>7} "
            f"{'other pf us':>11} {'x':>6}")
    print(head)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        per_shape = {name: bench_shape(i, o, dtype, args.hot, args.rounds) for name, (i, o) in SHAPES.items()}
        for name, (n_in, n_out) in SHAPES.items():
            dense_bound = n_in * n_out * dtype.itemsize / bw * 1e6
            for s, r in per_shape[name].items():
                print(f"{dname:<5} {name:<8} {s:>6.0%} {r['dense']:>9.1f} {r['F.linear']:>8.1f} {r['kernel@0%']:>8.1f} {r['native']:>9.1f} "
                      f"{r['dense'] / r['native']:>6.2f}x {r['kernel@0%'] / r['native']:>5.2f}x {r['gather']:>9.1f} "
                      f"{r['dense'] / r['gather']:>6.2f}x {dense_bound:>5.1f}->{dense_bound * (1 - s):>5.1f} "
                      f"{1 / (1 - s):>6.2f}x {_other(r)}")
        for s in SPARSITIES:
            # MLP = gate + up (same input, same shape) + down.
            mlp: dict[str, float] = {k: 2 * per_shape["gate/up"][s][k] + per_shape["down"][s][k]
                   for k in ("dense", "F.linear", "native", "gather", "other pf") if k in per_shape["down"][s]}
            print(f"{dname:<5} {'MLP':<8} {s:>6.0%} {mlp['dense']:>9.1f} {mlp['F.linear']:>8.1f} {'':>8} {mlp['native']:>9.1f} "
                  f"{mlp['dense'] / mlp['native']:>6.2f}x {'':>6} {mlp['gather']:>9.1f} {mlp['dense'] / mlp['gather']:>6.2f}x"
                  f"{'':>14} {1 / (1 - s):>6.2f}x {_other(mlp)}")
        print()
    if args.allocations:
        main_allocations(rounds=args.rounds)
    return 0


def allocation_step_times(levels: tuple[str, ...], rounds: int = 7, prompts: int = 6, tokens: int = 4,
                          allocations: tuple[str, ...] = ("uniform", "layerwise", "projection")) -> dict[str, dict]:
    """Microseconds per decoded token spent in the decoder's projections, dense vs each shipped allocation at
    each level: every module of every block on real decode-token inputs (the last `tokens` positions of dense
    greedy continuations of chat prompts), bf16, the engine's native `sparse_gemv_parts` call with the
    allocation's thresholds vs the engine's dense bf16 linear (`engine_linear`) on the fused weight. The whole decoder's weights (212 MB) pass
    through the cache each token, as in decode. Inputs in another basis (the shipped table's q/k/v and MLP
    inputs) include the x T walk (int8 where the file stores int8 bases) in the sparse time. Allocations missing from the shipped file are skipped.
    Returns level -> allocation ("dense" too) -> {"us": median, "zeroed": fraction of inputs zeroed}."""
    from featurelens.kernels.sparse_gemv import basis_int8_kernel, parts_kernel
    from featurelens.server.model_assets import resolve_model
    from featurelens.server.modes.sparsity import (
        basis_inverse,
        basis_weight,
        column_norms,
        load_rotation_file,
        load_thresholds,
        rotation_of,
    )
    from featurelens.server.offline.sparsity import calibrate as cal
    from featurelens.server.worker.sparse import FUSED

    model, tok = cal.load_model(resolve_model("default"))
    mods = cal.projections(model)
    layers = len(model.model.layers)
    # The engine's four modules per block and the projections each fuses: "qkv_proj" -> (q, k, v).
    parts_of = {path.split(".")[-1]: parts for path, parts in FUSED.items()}
    names = [f"{i}.{m}" for i in range(layers) for m in parts_of]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    first_parts = {n: mods[f"{n.split('.')[0]}.{parts_of[n.split('.')[1]][0]}"] for n in names}  # same input
    full_seqs = cal.dense_continuations(model, cal.chat_prompts(tok, prompts, 11), tokens)
    with torch.inference_mode(), cal.hooks(first_parts, lambda n, _m: lambda _mod, a: captured[n].append(
            a[0][0, -tokens:].to(torch.bfloat16))):
        for full in full_seqs:
            model(full)
    xs = {n: torch.cat(v) for n, v in captured.items()}  # [prompts * tokens, in]
    n_tok = xs[names[0]].shape[0]
    weights = {n: [mods[f"{n.split('.')[0]}.{p}"].weight.detach() for p in parts_of[n.split(".")[1]]]
               for n in names}
    # Inputs in another basis (the shipped table's q/k/v and MLP inputs): the sparse step pays x T (the bf16
    # walk, or the int8 walk for bases stored in int8, as the engine) and runs on W T⁻ᵀ; the dense step keeps
    # W. A module's parts share one input, so one rotation per module.
    rotations, stored_int8 = load_rotation_file()
    basis_int8 = basis_int8_kernel() if stored_int8 else None
    q32 = {n: q for n in names
           if (q := rotation_of(rotations, int(n.split(".")[0]), parts_of[n.split(".")[1]][0])) is not None}
    rot8 = {n: b for n in names if (b := rotation_of(stored_int8, int(n.split(".")[0]),
                                                     parts_of[n.split(".")[1]][0])) is not None}
    rot = {n: q.to(torch.bfloat16).contiguous() for n, q in q32.items() if n not in rot8}  # bf16-walked bases only
    inverses = {n: basis_inverse(q, torch.float64) for n, q in q32.items()}  # once per module, not per part
    sparse_w = {n: [basis_weight(w, q32[n], inverses[n]) for w in ws] if n in q32 else ws
                for n, ws in weights.items()}
    all_in = {n: torch.ones((1, q.shape[0])) for n, q in rot.items()}
    rot_out = {n: torch.empty(q.shape[0], dtype=torch.bfloat16) for n, q in q32.items()}
    w_t = {n: [w.T.contiguous().to(torch.bfloat16) for w in ws] for n, ws in sparse_w.items()}
    norms = {n: torch.stack([column_norms(w).float() for w in ws]).contiguous() for n, ws in sparse_w.items()}
    dense = {n: engine_linear(torch.cat(ws).to(torch.bfloat16).contiguous()) for n, ws in weights.items()}
    outs = {n: torch.empty(sum(w.shape[0] for w in weights[n]), dtype=torch.bfloat16) for n in names}
    kernel = parts_kernel()
    inputs = n_tok * sum(x.shape[1] * len(w_t[n]) for n, x in xs.items())
    result: dict[str, dict] = {}
    for level in levels:
        thresholds: dict[str, dict[str, list[float]]] = {}
        for a in allocations:
            try:
                table = load_thresholds(level, allocation=a)
            except KeyError:
                continue
            thresholds[a] = {n: [table[f"{n.split('.')[0]}.{p}"] for p in parts_of[n.split(".")[1]]]
                             for n in names}
        zeroed: dict[str, int] = {}
        steps: dict[str, int] = {}  # timed and warm-up calls alike: every call counts its zeroed inputs

        def step(a: str, thresholds: dict = thresholds, zeroed: dict = zeroed, steps: dict = steps) -> None:
            steps[a] = steps.get(a, 0) + 1
            for t in range(n_tok):
                for n in names:
                    if a == "dense":
                        dense[n](xs[n][t:t + 1])
                    else:
                        x = xs[n][t]
                        if n in rot8:  # x T~ by the int8 walk, as the engine does for int8 bases
                            assert basis_int8 is not None  # loaded with the int8 bases
                            basis_int8(x.contiguous(), *rot8[n], rot_out[n])
                            x = rot_out[n]
                        elif n in rot:  # x T by the same native call at threshold 0, as the engine does
                            kernel(x.contiguous(), [rot[n]], all_in[n], [0.0], rot_out[n])
                            x = rot_out[n]
                        zeroed[a] = zeroed.get(a, 0) + kernel(x.contiguous(), w_t[n], norms[n],
                                                              thresholds[a][n], outs[n])

        by_allocation: dict[str, Callable[..., object]] = {
            a: lambda _j, a=a: step(a) for a in ("dense", *thresholds)}
        times = _time_rounds(by_allocation, 1, rounds)
        result[level] = {a: {"us": us / n_tok, "zeroed": zeroed.get(a, 0) / (inputs * steps[a])}
                         for a, us in times.items()}
    return result


def main_allocations(levels: tuple[str, ...] = ("25", "40", "50"), rounds: int = 7) -> None:
    print("projections per decoded token by allocation (all 30 blocks, real decode inputs, bf16, native "
          "sparse_gemv_parts vs the engine's dense linear; us/token, median of rounds)")
    print(f"{'level':>5} {'allocation':<11} {'us/token':>9} {'x dense':>7} {'inputs zeroed':>13}")
    for level, res in allocation_step_times(levels, rounds).items():
        for a, r in res.items():
            print(f"{level:>5} {a:<11} {r['us']:>9.0f} {res['dense']['us'] / r['us']:>6.2f}x {r['zeroed']:>12.1%}")
    print()


INT8_SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}  # (in, out)


def main_int8(rounds: int = 7, ms: tuple[int, ...] = (1, 4, 8, 16, 32, 128, 512)) -> None:
    """int8-weight GEMMs (quantized mode: weight-only "int8", and "w8a8") vs the engine's dense bf16 and fp32
    linear (`engine_linear`), for
    SmolLM2-135M's four fused projections, per decoder block; weights cold (a pool larger than the LLC).
    "int8 us" is what the engine runs at that M (`WeightOnlyGemm`: the native kernel below its dequantize
    threshold, dequantize + float GEMM from it on); "gemv us" is the native kernel alone (M <= 32). On an
    AVX-512 CPU the native kernel's portable AVX2 path is timed beside it ("avx2 us", M <= 32). M >= 128 (prefill
    sizes) is compute-bound: those rows reuse a few weight copies."""
    from featurelens.kernels import int8_gemm

    bw = copy_bandwidth()
    best = int8_gemm.set_native_isa("auto") if int8_gemm.native_available() else "torch"
    both = best == "avx512"

    def weight_only(isa: str) -> Callable[..., torch.Tensor]:
        def run(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
            if both:
                int8_gemm.set_native_isa(isa)
            return int8_gemm.int8_linear(x, wq, sw)
        return run

    int8_best, int8_avx2 = weight_only(best), weight_only("avx2")

    def w8a8(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        return int8_gemm.int8_linear(x, wq, sw, scheme="w8a8")
    engine_int8 = int8_gemm.weight_only_kernel()

    def engine_int8_best(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        if both:  # the "avx2" variant of the previous round left the kernel on its AVX2 path
            int8_gemm.set_native_isa(best)
        return engine_int8(x, wq, sw)

    print(f"int8 GEMM backend: {int8_gemm.native_status()}; torch threads: {torch.get_num_threads()}; "
          f"dequantize + float GEMM from M = {engine_int8.dequant_rows}")
    print(f"{'M':>3} {'bf16 us':>9} {'fp32 us':>9} {'int8 us':>9} {'x bf16':>7} {'x fp32':>7} {'gemv us':>9} "
          + (f"{'avx2 us':>9} " if both else "")
          + f"{'w8a8 us':>9} {'x bf16':>7} {'bound bf16->int8 us':>20} {'bound x':>7}   (one block: qkv + o + gate_up + down)")
    names = ("bf16", "fp32", "int8", "gemv", "avx2", "w8a8")
    totals: dict[int, dict[str, float]] = {}
    for n_in, n_out in INT8_SHAPES.values():
        copies = max(2, 3 * last_level_cache_bytes() // (n_in * n_out * 2))
        g = torch.Generator().manual_seed(0)
        w16 = [torch.randn(n_out, n_in, generator=g).to(torch.bfloat16) for _ in range(copies)]
        e16 = [engine_linear(w) for w in w16]
        e32 = [engine_linear(w.float()) for w in w16[: max(2, copies // 2)]]
        wq = [int8_gemm.quantize_weight(w) for w in w16]
        for m in ms:
            x16 = torch.randn(m, n_in, generator=g).to(torch.bfloat16)
            x32 = x16.float()
            # Called at once: the loop variables are bound while they are current.
            variants: dict[str, Callable[..., object]] = {
                "bf16": lambda j, x16=x16, e16=e16: e16[j % len(e16)](x16),
                "fp32": lambda j, x32=x32, e32=e32: e32[j % len(e32)](x32),
                "int8": lambda j, x16=x16, wq=wq: engine_int8_best(x16, *wq[j % len(wq)]),
            }
            if m <= 32:  # the GEMV-style kernels do M times the work per weight read: seconds at prefill sizes
                variants["gemv"] = lambda j, x16=x16, wq=wq: int8_best(x16, *wq[j % len(wq)])
                variants["w8a8"] = lambda j, x16=x16, wq=wq: w8a8(x16, *wq[j % len(wq)])
                if both:
                    variants["avx2"] = lambda j, x16=x16, wq=wq: int8_avx2(x16, *wq[j % len(wq)])
            r = _time_rounds(variants, max(copies, 20) if m <= 32 else 6, rounds if m <= 32 else 3)
            entry = totals.setdefault(m, dict.fromkeys((*names, "bytes"), 0.0))
            for k in r:
                entry[k] += r[k]
            entry["bytes"] += n_in * n_out
    if both:
        int8_gemm.set_native_isa("auto")
    for m, t in totals.items():
        b16, b8 = 2 * t["bytes"] / bw * 1e6, t["bytes"] / bw * 1e6
        small = m <= 32

        def cell(name: str, t: dict[str, float] = t, small: bool = small) -> str:
            return f"{t[name]:>9.0f}" if small else f"{'-':>9}"

        print(f"{m:>3} {t['bf16']:>9.0f} {t['fp32']:>9.0f} {t['int8']:>9.0f} {t['bf16'] / t['int8']:>6.2f}x "
              f"{t['fp32'] / t['int8']:>6.2f}x {cell('gemv')} "
              + (f"{cell('avx2')} " if both else "")
              + f"{cell('w8a8')} " + (f"{t['bf16'] / t['w8a8']:>6.2f}x" if small else f"{'-':>7}")
              + f" {b16:>9.0f}->{b8:>6.0f} {2.0:>6.2f}x")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
