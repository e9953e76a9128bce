"""`make gpu-check`: everything of featurelens that can run on a CUDA machine, one summary line per part.

    python tools/gpu_check.py                  # on a CUDA host (PYTHONPATH=typings when not installed)
    python tools/gpu_check.py --device cpu     # the same checks on this CPU (Triton in its interpreter)

Needs torch (and Triton for the Triton parts); vLLM and featurelens' server extras are optional: parts that need
what the machine lacks print SKIP with the reason. The lent GPU machines have torch, Triton and CUDA but no
vLLM and no network, so the kernel parts are the ones that always run there. Exit status 1 if any part FAILs.

Parts: Triton sparse GEMV and its per-part entry against the torch reference; row top-k against torch.topk;
the SAE top-k encode against a plain-torch encode; the compile/CUDA-graph tap op (not built yet: SKIP);
the engine test tier when vLLM is importable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def check_tap_op(device: str) -> Result:
    return "SKIP", ("the compile-proof tap op (issue 28 item 1) is not built yet; interpretability runs as Python "
                    "hooks in eager mode only")


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
