"""`make gpu-check`: everything of featurelens that can run on a CUDA machine, one summary line per part.

    python tools/gpu_check.py                  # on a CUDA host (PYTHONPATH=typings when not installed)
    python tools/gpu_check.py --device cpu     # the same checks on this CPU (Triton in its interpreter)

Needs torch (and Triton for the Triton parts); vLLM and featurelens' server extras are optional: parts that need
what the machine lacks print SKIP with the reason. The lent GPU machines have torch, Triton and CUDA but no
vLLM and no network, so the kernel parts are the ones that always run there. Exit status 1 if any part FAILs.

Parts: Triton sparse GEMV and its per-part entry against the torch reference; row top-k against torch.topk;
the SAE top-k encode against a plain-torch encode; the tap op (server/worker/tap.py) in a small decoder stack
with a device-only handler that steers listed rows and captures top-k features, run eagerly, under
torch.compile (Inductor), split at the taps in vLLM's piecewise style (Inductor pieces captured as CUDA graphs,
the tap run eagerly between replays, the per-step row buffers rewritten between replays) and as one FULL CUDA
graph: each against the eager run, rows of unsteered requests bit-identical (on the CPU: everything but the
CUDA graphs, in float32); the engine test tier when vLLM is importable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
Result = tuple[str, str]  # (PASS | FAIL | SKIP, detail)


def _close(a, b, atol: float, rtol: float) -> tuple[bool, float]:
    import torch

    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)), err


def check_sparse_gemv(device: str) -> Result:
    import torch

    try:
        from featurelens.kernels.sparse_gemv import (
            sparse_gemv_parts_torch,
            sparse_gemv_torch,
            transpose_weight,
        )
        from featurelens.kernels.triton_sparse import sparse_gemv_parts_triton, sparse_gemv_triton
    except ImportError as error:
        return "SKIP", f"triton not importable: {error}"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]  # interpreter: no bf16
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in dtypes:
        for d_in, d_out, sparsity in ((576, 1536, 0.4), (1536, 576, 0.5), (576, 192, 0.0)):
            x = torch.randn(d_in, generator=g).to(device, dtype)
            w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(device, dtype)
            norms = w.float().norm(dim=0)
            scores = x.float().abs() * norms
            threshold = float(scores.quantile(sparsity)) if sparsity else 0.0
            w_t = transpose_weight(w)
            got = sparse_gemv_triton(x, w_t, norms, threshold)
            want = sparse_gemv_torch(x, w_t, norms, threshold)
            ok, err = _close(got, want, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)
            worst = max(worst, err)
            if not ok:
                return "FAIL", f"sparse_gemv_triton {dtype} {d_in}x{d_out}@{sparsity}: max err {err:.3g}"
        parts = [transpose_weight((torch.randn(o, 576, generator=g) / 24).to(device, dtype)) for o in (576, 192, 192)]
        norms = torch.stack([p.float().norm(dim=1) for p in parts])
        x = torch.randn(576, generator=g).to(device, dtype)
        thresholds = [float((x.float().abs() * n).quantile(0.4)) for n in norms]
        out_t = torch.empty(960, device=device, dtype=dtype)
        out_r = torch.empty_like(out_t)
        zeroed_t = sparse_gemv_parts_triton(x, parts, norms, thresholds, out_t)
        zeroed_r = sparse_gemv_parts_torch(x, parts, norms, thresholds, out_r)
        ok, err = _close(out_t, out_r, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)
        if not ok or zeroed_t != zeroed_r:
            return "FAIL", f"sparse_gemv_parts_triton {dtype}: max err {err:.3g}, zeroed {zeroed_t} vs {zeroed_r}"
    return "PASS", f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)}; max err {worst:.3g}"


def check_topk(device: str) -> Result:
    import torch
    from featurelens.kernels.topk import topk_rows

    g = torch.Generator().manual_seed(1)
    for rows, cols, k in ((1, 4096, 32), (64, 16384, 80), (7, 512, 512)):
        x = torch.randn(rows, cols, generator=g).to(device)
        values, indices = topk_rows(x, k)
        want_v, _ = torch.topk(x, k, dim=1)
        if not torch.equal(values, want_v) or not torch.equal(x.gather(1, indices), values):
            return "FAIL", f"topk_rows {rows}x{cols} k={k}: values or indices differ from torch.topk"
    return "PASS", "3 shapes, exact"


def check_sae_encode(device: str) -> Result:
    import torch
    from featurelens.kernels.sae_encode import topk_encode

    g = torch.Generator().manual_seed(2)
    d_in, d_sae, k = 576, 4096, 64
    w_enc = (torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5).to(device)
    b_enc, b_dec = (0.01 * torch.randn(d_sae, generator=g)).to(device), (0.01 * torch.randn(d_in, generator=g)).to(device)
    threshold = torch.full((d_sae,), 0.5, device=device)
    x = torch.randn(33, d_in, generator=g).to(device)
    for architecture in ("topk", "standard", "jumprelu"):
        values, indices = topk_encode(x, w_enc, b_enc, b_dec, k, threshold=threshold, architecture=architecture)
        pre = (x - b_dec) @ w_enc + b_enc
        act = torch.relu(pre) if architecture != "jumprelu" else pre * (pre > threshold)
        want, _ = torch.topk(act, k, dim=1)
        ok, err = _close(values, want, atol=1e-4, rtol=1e-4)
        if not ok:
            return "FAIL", f"topk_encode {architecture}: max err {err:.3g}"
    return "PASS", "topk, standard, jumprelu"


# --- the tap op (issue 28 item 7) ---------------------------------------------------------------------------
# A small decoder stack in plain torch, shaped like vLLM's fused-residual layers: each block returns
# (hidden, residual) and the residual stream after it is hidden + residual. Three "requests" share the rows
# (attention stays inside each request, causal), as in one vLLM step. The call sites are registered before
# anything compiles; the handler reads and writes only persistent device buffers that are rewritten between
# steps (graph-safe), like the server's: it steers the listed rows at one layer and captures the top-k
# "features" of the stream at the listed rows at the next.
TAP_D, TAP_FF, TAP_SAE, TAP_K, TAP_LAYERS = 64, 128, 256, 8, 4
TAP_STEER, TAP_CAPTURE = 1, 2  # the active layers; 0 and 3 have call sites nobody listens to
TAP_REQUESTS = ((0, 5), (5, 8), (8, 16))  # rows [start, end) of each request
TAP_ROWS = TAP_REQUESTS[-1][1]
TAP_STEER_SLOTS, TAP_CAPTURE_SLOTS = 8, 10  # fixed buffer sizes (a graph's shapes never change); padded
# Two steps with different rows: the same compiled code and the same graphs must serve both.
TAP_STEPS = (
    {"steer": [(row, 3.0) for row in range(0, 5)], "capture": [0, 1, 2, 3, 4, 12, 13, 14, 15]},
    {"steer": [(13, -2.5), (14, -2.5), (15, -2.5)], "capture": [5, 6, 7, 13, 14, 15]},
)


def _tap_stack(device: str, dtype):
    import torch
    from torch import nn

    functional = torch.nn.functional

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(TAP_D), nn.RMSNorm(TAP_D)
            self.qkv = nn.Linear(TAP_D, 3 * TAP_D, bias=False)
            self.out = nn.Linear(TAP_D, TAP_D, bias=False)
            self.up = nn.Linear(TAP_D, 2 * TAP_FF, bias=False)
            self.down = nn.Linear(TAP_FF, TAP_D, bias=False)

        def forward(self, hidden, residual, mask):
            residual = hidden if residual is None else hidden + residual
            q, k, v = self.qkv(self.norm1(residual)).chunk(3, dim=-1)
            attended = functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
            residual = self.out(attended) + residual
            gate, up = self.up(self.norm2(residual)).chunk(2, dim=-1)
            return self.down(functional.silu(gate) * up), residual

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(TAP_LAYERS))
            self.norm = nn.RMSNorm(TAP_D)
            mask = torch.zeros(TAP_ROWS, TAP_ROWS, dtype=torch.bool)
            for start, end in TAP_REQUESTS:
                mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            self.register_buffer("mask", mask)

        def forward(self, x):
            hidden, residual = x, None
            for block in self.blocks:
                hidden, residual = block(hidden, residual, self.mask)
            return self.norm(hidden + residual)

    torch.manual_seed(3)
    return Stack().to(device, dtype).eval()


class _TapState:
    """The handler and its persistent per-step buffers (index, strength, output), as the server keeps them."""

    def __init__(self, device: str) -> None:
        import torch

        g = torch.Generator().manual_seed(4)
        self.direction = (torch.randn(TAP_D, generator=g)).to(device)
        self.encoder = (torch.randn(TAP_D, TAP_SAE, generator=g) / TAP_D ** 0.5).to(device)
        self.steer_index = torch.zeros(TAP_STEER_SLOTS, dtype=torch.long, device=device)
        self.steer_strength = torch.zeros(TAP_STEER_SLOTS, device=device)
        self.capture_index = torch.zeros(TAP_CAPTURE_SLOTS, dtype=torch.long, device=device)
        self.values = torch.zeros(TAP_CAPTURE_SLOTS, TAP_K, device=device)
        self.indices = torch.zeros(TAP_CAPTURE_SLOTS, TAP_K, dtype=torch.long, device=device)
        self.calls: dict[int, int] = {}

    def handler(self, layer: int, hidden, residual) -> None:
        # Device-only: no host reads, no shapes that depend on data, so a full CUDA graph can hold it.
        self.calls[layer] = self.calls.get(layer, 0) + 1
        if layer == TAP_STEER:
            delta = self.steer_strength[:, None] * self.direction
            hidden.index_add_(0, self.steer_index, delta.to(hidden.dtype))
        elif layer == TAP_CAPTURE:
            stream = hidden if residual is None else hidden + residual
            values, indices = (stream.index_select(0, self.capture_index).float() @ self.encoder).topk(TAP_K)
            self.values.copy_(values)
            self.indices.copy_(indices)

    def write(self, step: dict | None) -> None:
        """Rewrite the buffers in place for a step (padding: the first listed row again, strength 0, so
        only listed rows are ever written), and poison the outputs so a capture that did not run shows."""
        import torch

        self.calls = {}
        self.values.fill_(float("nan"))
        self.indices.fill_(-1)
        if step is None:
            return
        steer = step["steer"] + [(step["steer"][0][0], 0.0)] * (TAP_STEER_SLOTS - len(step["steer"]))
        capture = step["capture"] + [step["capture"][0]] * (TAP_CAPTURE_SLOTS - len(step["capture"]))
        self.steer_index.copy_(torch.tensor([row for row, _ in steer]))
        self.steer_strength.copy_(torch.tensor([strength for _, strength in steer]))
        self.capture_index.copy_(torch.tensor(capture))


def _tap_inputs(device: str, dtype):
    import torch

    g = torch.Generator().manual_seed(5)
    return [torch.randn(TAP_ROWS, TAP_D, generator=g).to(device, dtype) for _ in TAP_STEPS]


def _tap_reference(stack, state: _TapState, x, step: dict | None):
    """The same step without the op: the blocks' own forward (no hooks), steering and capture in Python."""
    import torch

    hidden, residual, values, indices = x, None, None, None
    for layer, block in enumerate(stack.blocks):
        hidden, residual = block.forward(hidden, residual, stack.mask)
        if step is not None and layer == TAP_STEER:
            rows = torch.tensor([row for row, _ in step["steer"]], device=x.device)
            strength = torch.tensor([s for _, s in step["steer"]], device=x.device)
            hidden = hidden.index_add(0, rows, (strength[:, None] * state.direction).to(hidden.dtype))
        if step is not None and layer == TAP_CAPTURE:
            rows = torch.tensor(step["capture"], device=x.device)
            values, indices = ((hidden + residual)[rows].float() @ state.encoder).topk(TAP_K)
    return stack.norm(hidden + residual), values, indices


def _tap_untouched(step: dict) -> list[int]:
    """Rows of requests none of whose rows is steered: they must not change by a single bit."""
    steered = {row for row, _ in step["steer"]}
    return [row for start, end in TAP_REQUESTS if not steered & set(range(start, end)) for row in range(start, end)]


def _tap_compare(mode: str, got: tuple, want: tuple, base, step: dict, tol: tuple[float, float],
                 feature_tol: float) -> str | None:
    """None when `got` (out, values, indices) of a steered step matches `want` (the eager run), and its
    untouched rows are bit-identical to `base` (the same mode's run with no layer active); else what differed."""
    import torch

    out, values, indices = got
    n = len(step["capture"])
    values, indices, want_values, want_indices = values[:n], indices[:n], want[1][:n], want[2][:n]
    ok, err = _close(out, want[0], atol=tol[0], rtol=tol[1])
    if not ok:
        return f"{mode}: output differs from eager by {err:.3g}"
    untouched = torch.tensor(_tap_untouched(step), device=out.device)
    if not torch.equal(out[untouched], base[untouched]):
        return f"{mode}: rows of unsteered requests changed ({(out[untouched] != base[untouched]).sum()} values)"
    steered = torch.tensor([row for row, _ in step["steer"]], device=out.device)
    if (out[steered].float() - base[steered].float()).abs().max().item() < 10 * tol[0]:
        return f"{mode}: steering did not change the steered rows"
    if bool(values.isnan().any()) or bool((indices < 0).any()):
        return f"{mode}: the capture buffers were not written"
    ok, err = _close(values, want_values, atol=feature_tol, rtol=feature_tol)
    if not ok:
        return f"{mode}: feature values differ from eager by {err:.3g}"
    # Indices equal, except where two of eager's values are within tolerance (a tie the rounding may flip).
    ref_values = want_values.float()
    near = torch.zeros_like(indices, dtype=torch.bool)
    near[:, 1:] |= (ref_values[:, 1:] - ref_values[:, :-1]).abs() <= 2 * feature_tol
    near[:, :-1] |= (ref_values[:, 1:] - ref_values[:, :-1]).abs() <= 2 * feature_tol
    near[:, -1] = True  # the k-th may swap with the (k+1)-th, which the capture does not keep
    if bool(((indices != want_indices) & ~near).any()):
        return f"{mode}: top-k feature indices differ from eager"
    return None


def _tap_piecewise_backend(graphs: bool, inductor: bool, stats: dict):
    """A Dynamo backend in vLLM's piecewise style: the traced graph is split around every tap call (each in a
    graph of its own, run eagerly), and the pieces between taps are compiled by Inductor (`inductor`) and
    captured as CUDA graphs (`graphs`): static inputs copied in, replayed, static outputs returned."""
    import torch
    from torch.fx.passes.split_module import split_module

    taps = (torch.ops.featurelens.tap, torch.ops.featurelens.tap.default)
    pool = torch.cuda.graph_pool_handle() if graphs else None

    class Piece:  # set in the split module's __dict__ (as vLLM does), so the module itself stays a child
        def __init__(self, module) -> None:
            self.module = module
            self.run: Any = None  # the piece as Inductor compiled it (or the fx module itself)
            self.graph: Any = None
            self.static: list = []
            self.outputs: Any = None

        def __call__(self, *args):
            if self.run is None:
                self.run = self.module
                if inductor:
                    from torch._inductor.compile_fx import compile_fx

                    self.run = compile_fx(self.module, list(args))
            if not graphs:
                return self.run(*args)
            if self.graph is None:
                self.static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graphs asks
                    self.run(*self.static)
                torch.cuda.current_stream().wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.outputs = self.run(*self.static)
                stats["captured"] = stats.get("captured", 0) + 1
            for static, arg in zip(self.static, args, strict=True):
                if isinstance(arg, torch.Tensor) and arg.data_ptr() != static.data_ptr():
                    static.copy_(arg)
            self.graph.replay()
            stats["replays"] = stats.get("replays", 0) + 1
            return self.outputs

    def backend(gm, example_inputs):
        stats["traced"] = stats.get("traced", 0) + 1
        part, parts, tap_parts = 0, {}, set()
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "call_function" and node.target in taps:
                part += 1
                parts[node] = part
                tap_parts.add(part)
                part += 1
            else:
                parts[node] = part
        split = split_module(gm, gm, lambda node: parts[node], keep_original_order=True)
        stats["taps"] = len(tap_parts)
        for name, module in list(split.named_children()):
            if int(name.removeprefix("submod_")) not in tap_parts:
                split.__dict__[name] = Piece(module)
                stats["pieces"] = stats.get("pieces", 0) + 1
        return split

    return backend


def check_tap_op(device: str) -> Result:
    import torch

    return _check_tap(device, torch.bfloat16 if device == "cuda" else torch.float32)


def _check_tap(device: str, dtype) -> Result:
    import torch
    from featurelens.server.worker import tap

    started = time.perf_counter()
    cuda = device == "cuda"
    low = dtype != torch.float32
    tol = (5e-2, 5e-2) if low else (1e-4, 1e-4)
    feature_tol = 1e-1 if low else 1e-4
    stack = _tap_stack(device, dtype)
    for layer, block in enumerate(stack.blocks):
        block.register_forward_hook(tap.call_site(layer))  # before anything compiles, as install_taps does
    state = _TapState(device)
    inputs = _tap_inputs(device, dtype)
    active = frozenset((TAP_STEER, TAP_CAPTURE))
    static_x = inputs[0].clone()  # the model input as a persistent buffer too (CUDA graphs read it in place)

    def step_with(model, x, step: dict | None):
        state.write(step)
        tap.set_active(active if step is not None else frozenset())
        static_x.copy_(x)
        with torch.no_grad():
            out = model(static_x).clone()
        tap.set_active(frozenset())
        return out, state.values.clone(), state.indices.clone(), dict(state.calls)

    def check_mode(mode: str, model, want, expect_calls: dict[int, int] | None = None) -> str | None:
        for x, step, reference in zip(inputs, TAP_STEPS, want, strict=True):
            base = step_with(model, x, None)
            if base[3]:
                return f"{mode}: the handler ran with no layer active"
            got = step_with(model, x, step)
            problem = _tap_compare(mode, got[:3], reference, base[0], step, tol, feature_tol)
            if problem:
                return problem
            calls = {TAP_STEER: 1, TAP_CAPTURE: 1} if expect_calls is None else expect_calls
            if got[3] != calls:
                return f"{mode}: handler calls per layer {got[3]}, expected {calls}"
        return None

    ran: list[str] = []
    tap.set_handler(state.handler)
    try:
        # (a) eager: the op against the same step done by hand without it, and the eager runs kept as reference
        want = []
        for x, step in zip(inputs, TAP_STEPS, strict=True):
            reference = _tap_reference(stack, state, x, step)
            state.write(None)
            bare = step_with(stack, x, None)
            if not torch.equal(bare[0], _tap_reference(stack, state, x, None)[0]):
                return "FAIL", "eager: with no layer active the output is not bit-identical to no call sites"
            got = step_with(stack, x, step)
            problem = _tap_compare("eager", got[:3], reference, bare[0], step, tol if low else (1e-6, 1e-6),
                                   feature_tol if low else 1e-6)
            if problem:
                return "FAIL", problem
            want.append(got[:3])
        ran.append("eager")
        # (b) torch.compile of the whole stack (Inductor), one graph: the op must not break it or be traced away.
    # Inductor on the CPU too (not backend="eager"): it is what vLLM's CPU compiled mode runs, and with (c) it
    # costs ~30 s cold, ~10 s with Inductor's cache warm, on a 2-core machine.
        torch._dynamo.reset()
        compiled = torch.compile(stack, fullgraph=True)
        problem = check_mode("compile", compiled, want)
        if problem:
            return "FAIL", problem
        ran.append("compile (Inductor)")
        # (c) vLLM's piecewise mode: the Dynamo graph split at the taps, Inductor pieces, each a CUDA graph
        # replayed with the buffers rewritten between steps (on the CPU: the split and the pieces, no graphs)
        stats: dict[str, int] = {}
        torch._dynamo.reset()
        piecewise = torch.compile(stack, backend=_tap_piecewise_backend(cuda, True, stats), fullgraph=True)
        problem = check_mode("piecewise", piecewise, want)
        if problem:
            return "FAIL", problem
        if stats.get("traced") != 1 or stats.get("taps") != TAP_LAYERS:
            return "FAIL", f"piecewise: traced {stats.get('traced')} times with {stats.get('taps')} taps"
        if cuda and (stats.get("captured") != stats.get("pieces") or not stats.get("replays")):
            return "FAIL", f"piecewise: {stats}"
        ran.append(f"piecewise {stats['pieces']} pieces" + (" as CUDA graphs" if cuda else " (no CUDA graphs on cpu)"))
        # (d) a FULL CUDA graph of the eager stack, handler included: replay never runs Python, so the handler
        # is never called, yet its device-only work (reading the rewritten buffers) is in the graph
        if cuda:
            full = {}
            for name, layers in (("bare", frozenset()), ("tapped", active)):
                state.write(TAP_STEPS[0])
                tap.set_active(layers)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.no_grad():
                    stack(static_x)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), torch.no_grad():
                    output = stack(static_x)
                full[name] = (graph, output)
            tap.set_active(frozenset())

            class Replay:
                def __call__(self, x):
                    graph, output = full["tapped" if tap.active() else "bare"]
                    graph.replay()
                    return output

            problem = check_mode("full graph", Replay(), want, expect_calls={})
            if problem:
                return "FAIL", problem
            ran.append("full CUDA graph")
    finally:
        tap.set_handler(None)
        tap.set_active(frozenset())
        torch._dynamo.reset()
    detail = f"{', '.join(ran)}; {len(TAP_STEPS)} steps, {str(dtype).removeprefix('torch.')}"
    if not cuda:
        detail += "; CUDA graphs skipped on cpu"
    return "PASS", f"{detail} ({time.perf_counter() - started:.0f} s)"


def check_engine_tier(device: str) -> Result:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "SKIP", "vLLM is not installed on this machine"
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/engine"],
                         cwd=ROOT, capture_output=True, text=True, timeout=3000)
    last = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    return ("PASS" if run.returncode == 0 else "FAIL"), f"{last} ({time.perf_counter() - started:.0f} s)"


PARTS: dict[str, Callable[[str], Result]] = {
    "triton sparse GEMV": check_sparse_gemv,
    "row top-k": check_topk,
    "SAE top-k encode": check_sae_encode,
    "tap op (compile + CUDA graphs)": check_tap_op,
    "engine tier": check_engine_tier,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--skip", nargs="*", default=[], help="parts to leave out, e.g. 'engine tier'")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (use --device cpu to run the checks on the CPU)")
        return 2
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"gpu-check on {where}, torch {torch.__version__}")
    failed = False
    for name, part in PARTS.items():
        if name in args.skip:
            print(f"SKIP  {name}: --skip")
            continue
        try:
            status, detail = part(args.device)
        except Exception as error:  # noqa: BLE001 - a crashing part is a failed part, the others still run
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        failed |= status == "FAIL"
        print(f"{status:<5} {name}: {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
