"""`featurelens bench modes`: dense vs WINA sparse 25/40/50 vs int8 weights, quality and speed side by side in
one run.

1. Engine (our gRPC server on vLLM, one instance, every mode through the same engine): greedy-token agreement
   of each sparse level with dense over --num-prompts chat prompts (free-running, position by position, and
   the mean length of the identical prefix); decode tokens/s at batch 1 and at batch 8 (`--concurrency`),
   prefill tokens/s on fresh ~500-token prompts (unique, so the prefix cache never answers). Modes alternate
   inside every round so load from other processes hits them alike.
2. Quality offline (HF transformers, float32, masks on every token; int8: every decoder projection through the
   same int8-weight arithmetic as the engine): perplexity on the calibration's held-out documents and teacher-forced
   agreement with the dense greedy continuation (server/offline/sparsity/calibrate.py).
3. Kernels: featurelens bench kernels (server/bench/kernels.py) (sparse GEMV vs dense at 25/40/50/65%, bf16; int8 GEMM vs bf16 at M=1..32).

Beside each decode figure: the physical bound, weight bytes read per token dense / sparse. Only decoder
projections are sparsified; the tied 49152x576 unembedding is read in full, which caps sparse-50% at ~1.65x.
Batch > 1 and prefill run the masked path (a masked copy of the input per fused sub-projection, then the
dense GEMM), so sparse mode costs time there: the speed-up is for batch-1 decode only. int8 mode reads one
byte per projection weight instead of two (the unembedding stays bf16); its bound is printed the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

from featurelens.server.bench.common import add_load, add_model, add_rounds, parser, prompts

LEVELS = (25, 40, 50)
B1_REPEATS = 3  # batch-1 decode samples per mode and round (the median over all of them is reported)
HELDOUT_TEXTS = 150  # featurelens sparsity --texts of the shipped thresholds: same seed, same held-out split


ALL_MODES = [("dense", 0)] + [(f"sparse-{lv}", lv) for lv in LEVELS] + [("int8", -1)]
_SELECTED: list[str] = [name for name, _ in ALL_MODES]


def _modes() -> list[tuple[str, int]]:
    """(name, level) of the modes this run measures: level 0 dense, > 0 a sparse level, -1 int8."""
    return [(name, level) for name, level in ALL_MODES if name in _SELECTED]


def _request(prompt: Any, level: int, max_new_tokens: int, stream: bool = True) -> Any:
    from featurelens.client import pb

    mode = pb.INFERENCE_MODE_QUANTIZED if level < 0 else pb.INFERENCE_MODE_SPARSE if level else pb.INFERENCE_MODE_DENSE
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    kind = {"text": prompt} if isinstance(prompt, str) else {"chat": pb.ChatMessages(messages=[
        pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=prompt[0])])}
    return cls(**kind, sampling=pb.SamplingOptions(temperature=0.0),
               stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
               mode=mode, sparsity_percent=max(level, 0))


async def _stream(stub: Any, request: Any) -> tuple[list[int], float, float, float]:
    """(token ids, start, first-token time, end) of one streamed generation."""
    started = time.perf_counter()
    first = 0.0
    ids: list[int] = []
    async for chunk in stub.GenerateStream(request):
        if chunk.tokens and not first:
            first = time.perf_counter()
        ids.extend(t.token_id for t in chunk.tokens)
    return ids, started, first, time.perf_counter()


async def _bench_engine(model: str, prompts: list[str], new_tokens: int, batches: list[int],
                        rounds: int) -> dict[str, dict[str, Any]]:
    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    running = await start_server(Settings(model=model, port=0, metrics_port=-1, max_num_seqs=max(8, *batches),
                                          max_in_flight=10_000))
    out_memory = running.engine.quantized
    out: dict[str, dict[str, Any]] = {name: {} for name, _ in _modes()}
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=3600) as client:
            stub = client.stub
            for _name, level in _modes():  # warm-up: the first sparse-GEMV call per projection transposes weights
                await _stream(stub, _request("Hello", level, 4))
            # Agreement: every prompt at concurrency 8 per mode.
            sem = asyncio.Semaphore(8)

            async def one(prompt: str, level: int) -> list[int]:
                async with sem:
                    return (await _stream(stub, _request([prompt], level, new_tokens)))[0]

            ids = {name: await asyncio.gather(*(one(p, level) for p in prompts)) for name, level in _modes()}
            for name, _ in _modes():
                same = total = prefix = 0
                for a, b in zip(ids["dense"], ids[name], strict=True):
                    same += sum(x == y for x, y in zip(a, b, strict=False))
                    total += len(a)
                    prefix += next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
                out[name]["agreement"] = same / max(total, 1)
                out[name]["same_prefix"] = prefix / len(prompts)
            await running.engine.sparse_profile(reset=True)  # FEATURELENS_SPARSE_PROFILE=1: time the rounds only
            samples: dict[str, dict[str, list[float]]] = {name: {} for name, _ in _modes()}
            rng = random.Random(0)
            for r in range(rounds):
                for name, level in _modes():
                    for batch in batches:
                        # Batch 1 is short and noisy on a shared 2-core box: B1_REPEATS requests per round.
                        for rep in range(B1_REPEATS if batch == 1 else 1):
                            reqs = [_request([prompts[(r * batch + i + rep) % len(prompts)]], level, new_tokens)
                                    for i in range(batch)]
                            results = await asyncio.gather(*(_stream(stub, q) for q in reqs))
                            if batch == 1:
                                ids1, _, first, end = results[0]
                                rate = (len(ids1) - 1) / (end - first)
                            else:
                                rate = sum(len(x[0]) for x in results) / (max(x[3] for x in results) -
                                                                          min(x[1] for x in results))
                            samples[name].setdefault(f"decode_b{batch}", []).append(rate)
                    long = f"[{rng.getrandbits(64):x}] " + " ".join(prompts) * 4  # unique: no prefix-cache hit
                    _, started, first, _ = await _stream(stub, _request(long[:2400], level, 1))
                    n_prompt = len(running.engine.encode_text(long[:2400]))
                    samples[name].setdefault("prefill", []).append(n_prompt / (first - started))
            for name, per in samples.items():
                out[name].update({k: statistics.median(v) for k, v in per.items()})
            out["_int8"] = dict(out_memory or {})
            out["_profile"] = await running.engine.sparse_profile()
    finally:
        await running.stop(grace_s=1.0)
    return out


async def _compare_engines(model: str, other: str, prompts: list[str], new_tokens: int,
                           rounds: int) -> dict[str, dict[str, float]]:
    """Batch-1 decode tokens/s of dense and each selected sparse level on two servers up at once: "served" (this
    run's table: FEATURELENS_SPARSITY_THRESHOLDS or the shipped one) and "other" (`other`). Requests alternate
    between the servers (which goes first flips every round), so load from other processes, and the idle
    server's share of the cores, hit both tables alike; comparing two separate runs instead mixes in the
    box's drift between them (up to 0.3x on the dev boxes). Quantized mode is off on both: it is not compared."""
    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    servers: dict[str, Any] = {}
    try:
        for label, table in (("served", None), ("other", other)):
            extra: dict[str, Any] = {"sparsity_thresholds": table} if table else {}
            servers[label] = await start_server(Settings(model=model, port=0, metrics_port=-1, quantized_mode="none",
                                                         max_in_flight=10_000, **extra))
        modes = [(name, level) for name, level in _modes() if level >= 0]
        samples: dict[str, dict[str, list[float]]] = {label: {} for label in servers}
        clients = {label: AsyncClient(f"127.0.0.1:{srv.port}", timeout_s=3600) for label, srv in servers.items()}
        async with contextlib.AsyncExitStack() as stack:
            for client in clients.values():
                await stack.enter_async_context(client)
                for _name, level in modes:  # warm-up: the first sparse call per projection transposes weights
                    await _stream(client.stub, _request("Hello", level, 4))
            for r in range(rounds):
                order = list(clients) if r % 2 == 0 else list(reversed(clients))
                for name, level in modes:
                    for rep in range(B1_REPEATS):
                        for label in order:
                            prompt = prompts[(r * B1_REPEATS + rep) % len(prompts)]
                            ids, _, first, end = await _stream(clients[label].stub,
                                                               _request([prompt], level, new_tokens))
                            samples[label].setdefault(name, []).append((len(ids) - 1) / (end - first))
    finally:
        for srv in servers.values():
            await srv.stop(grace_s=1.0)
    return {label: {name: statistics.median(v) for name, v in per.items()} for label, per in samples.items()}


def compare_table(speeds: dict[str, dict[str, float]], served: str, other: str) -> list[str]:
    """The lines `--compare-thresholds` prints: per mode, each server's batch-1 tokens/s, its ratio to the same
    server's dense, and other / served."""
    lines = [f"batch-1 decode, two servers up together: served = {served}; other = {other}",
             f"{'mode':<10} {'served tok/s':>12} {'x dense':>7} {'other tok/s':>11} {'x dense':>7} {'other/served':>12}"]
    a, b = speeds["served"], speeds["other"]
    for name in a:
        lines.append(f"{name:<10} {a[name]:>12.1f} {a[name] / a['dense']:>6.2f}x {b[name]:>11.1f} "
                     f"{b[name] / b['dense']:>6.2f}x {b[name] / a[name]:>11.2f}x")
    return lines


def check_thresholds_file(path: str) -> str:
    """"" when `path` is a thresholds file sparse mode can serve, else why not (checked before any engine starts)."""
    from featurelens.server.modes.sparsity import available_levels

    if not os.path.isfile(path):
        return f"--compare-thresholds: no such file: {path}"
    try:
        levels = available_levels(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"--compare-thresholds: {path} is not a thresholds file: {type(error).__name__}: {error}"
    missing = [lv for name, lv in _modes() if lv > 0 and str(lv) not in levels]
    if missing:
        return f"--compare-thresholds: {path} has no level(s) {missing} (it has {levels})"
    return ""


def _bench_quality(n_prompts: int, new_tokens: int) -> dict[str, dict[str, float]]:
    import torch
    from featurelens.server.model_assets import resolve_model
    from featurelens.server.modes.sparsity import load_rotations, load_thresholds
    from featurelens.server.offline.sparsity import calibrate as cal

    model, tok = cal.load_model(resolve_model("default"))
    _, held = cal.corpus_texts(0, HELDOUT_TEXTS)
    prompts = cal.chat_prompts(tok, n_prompts, 2)
    with torch.inference_mode():
        dense_full = cal.dense_continuations(model, prompts, new_tokens)
    tf_tokens = sum(f.shape[1] - p.shape[1] for p, f in zip(prompts, dense_full, strict=True))
    out = {"dense": {"ppl": cal.perplexity(model, tok, held), "tf_agreement": 1.0}}
    table = _sparsity_table()
    rotations = load_rotations(table)  # the table may mask some inputs in a rotated basis, as the engine does
    sparse_model = cal.rotate_model(copy.deepcopy(model), rotations) if rotations else model
    head = rescored_head(sparse_model) if _sparse_logits() == "int8-rescored" else contextlib.nullcontext()
    for level in LEVELS:
        if f"sparse-{level}" not in _SELECTED:
            continue
        first = [0]
        with cal.wina_masking(sparse_model, load_thresholds(level, table), first), head:
            out[f"sparse-{level}"] = {"ppl": cal.perplexity(sparse_model, tok, held),
                                      "tf_all": cal.greedy_agreement(sparse_model, prompts, dense_full),
                                      "tf_agreement": cal.greedy_agreement(sparse_model, prompts, dense_full, first)}
    if "int8" not in _SELECTED:
        return out | {"_docs": {"heldout_documents": len(held), "tf_tokens": tf_tokens}}
    with int8_projections(model, cal.projections(model) | {"lm_head": model.lm_head}):  # as the engine does
        out["int8"] = {"ppl": cal.perplexity(model, tok, held),
                       "tf_agreement": cal.greedy_agreement(model, prompts, dense_full)}
    out["_docs"] = {"heldout_documents": len(held), "tf_tokens": tf_tokens}
    return out


def _sparsity_table() -> str:
    """The thresholds file this run's engine serves (FEATURELENS_SPARSITY_THRESHOLDS, else the shipped one)."""
    from featurelens.server.config import Settings
    from featurelens.server.modes.sparsity import DEFAULT_THRESHOLDS

    choice = Settings().sparsity_thresholds
    return str(DEFAULT_THRESHOLDS) if choice in ("default", "none") else choice


def _sparse_logits() -> str:
    """The server's --sparse-logits as this run's engine gets it (FEATURELENS_SPARSE_LOGITS or the default)."""
    from featurelens.server.config import Settings

    return Settings().sparse_logits


class rescored_head(contextlib.AbstractContextManager):  # noqa: N801 (used like a contextmanager function)
    """While open, the model's unembedding gives sparse mode's served logits (worker.quant.Int8Head): int8
    logits with every position's RESCORE_TOP best candidates replaced by the module's own (here float32) ones.
    Reusable: the int8 weight is built once, each `with` installs the hook anew."""

    def __init__(self, model: Any) -> None:
        from featurelens.kernels.int8_gemm import quantize_weight, weight_only_kernel

        self.module = model.lm_head
        self.wq, self.sw = quantize_weight(self.module.weight)
        self.linear = weight_only_kernel()
        self.handle: Any = None

    def _hook(self, mod: Any, args: tuple, exact: Any) -> Any:
        from featurelens.server.worker.quant import RESCORE_TOP

        x = args[0]
        logits = self.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.wq, self.sw).reshape(exact.shape)
        top = logits.topk(RESCORE_TOP, dim=-1).indices
        return logits.to(exact.dtype).scatter_(-1, top, exact.gather(-1, top))

    def __enter__(self) -> rescored_head:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@contextlib.contextmanager
def int8_projections(model: Any, modules: dict[str, Any]) -> Iterator[None]:
    """Every listed nn.Linear computes with int8 weights (the engine's arithmetic) while the context is open."""
    from featurelens.kernels.int8_gemm import quantize_weight, weight_only_kernel

    linear = weight_only_kernel()  # the engine's GEMM: native kernel for few rows, dequantize + GEMM for many
    handles = []
    for module in modules.values():
        wq, sw = quantize_weight(module.weight)

        def hook(mod: Any, args: tuple, output: Any, wq: Any = wq, sw: Any = sw) -> Any:
            x = args[0]
            y = linear(x.reshape(-1, x.shape[-1]).contiguous(), wq, sw).reshape(*x.shape[:-1], -1)
            return y if mod.bias is None else y + mod.bias

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decode_bounds() -> dict[str, float]:
    """Weight bytes per decoded token, dense / sparse at each level (projections sparse; the unembedding int8 with
    --sparse-logits int8-rescored, the default, else bf16), and dense / int8 (projections and unembedding one
    byte per weight instead of two; the scales are negligible)."""
    from featurelens.server.model_assets import resolve_model
    from featurelens.server.worker.sparse import weight_files
    from safetensors import safe_open

    files = weight_files(resolve_model("default"))
    proj = other = 0
    for key, path in files.items():
        with safe_open(path, framework="pt") as f:
            shape = f.get_slice(key).get_shape()
        n = 1
        for d in shape:
            n *= d
        if key.endswith("_proj.weight"):
            proj += n
        elif key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight"):
            other += n  # tied: read once, as the unembedding (the embedding reads one row)
    dense = proj + other
    head = other / 2 if _sparse_logits() == "int8-rescored" else other
    return ({f"sparse-{lv}": dense / (proj * (1 - lv / 100) + head) for lv in LEVELS} |
            {"dense": 1.0, "int8": 2.0})  # projections and the unembedding in int8


def print_profile(profile: dict[str, dict[str, float]]) -> None:
    """The worker's step timings (FEATURELENS_SPARSE_PROFILE=1) over the speed rounds, ms per step."""
    parts = ("forward", "projections", "kernels", "basis", "wrappers", "rest")
    print(f"{'step kind':<16} {'steps':>6}" + "".join(f" {p:>11}" for p in parts))
    for kind, row in sorted(profile.items()):
        print(f"{kind:<16} {int(row['steps']):>6}" + "".join(f" {row[p]:>11.2f}" for p in parts))
    print("worker step profile (FEATURELENS_SPARSE_PROFILE=1), ms per step over the speed rounds: forward = block 0's "
          "first projection to the end of the model forward (the unembedding and sampling are outside); "
          "projections = inside the wrapped projections; kernels / basis = the fast path's sparse GEMVs / x T "
          "GEMVs; wrappers = their Python; rest = attention, norms, activations, vLLM's Python\n", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = parser("modes", __doc__)
    add_model(ap)
    add_load(ap, num_prompts=32, max_new_tokens=48, concurrency_help="decode batches to measure (default 1 and 32)")
    add_rounds(ap)
    ap.add_argument("--modes", nargs="+", default=None,
                    help="a subset of dense sparse-25 sparse-40 sparse-50 int8 (dense is always run)")
    ap.add_argument("--quality-prompts", type=int, default=200,
                    help="chat prompts (x 32 tokens) for the offline teacher-forced agreement")
    ap.add_argument("--profile", action="store_true",
                    help="time the worker's steps (forward, projections, sparse kernels, x T, wrappers) and print "
                         "them; sets FEATURELENS_SPARSE_PROFILE=1 for the engine")
    ap.add_argument("--compare-thresholds", metavar="PATH", default=None,
                    help="instead of the full report, batch-1 decode of dense and the sparse --modes on two "
                         "servers up together, this run's table and the thresholds file PATH, requests "
                         "alternating between them (a side-by-side speed comparison of two tables)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from featurelens.server.bench import kernels as bench_kernels

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    if args.profile:
        os.environ["FEATURELENS_SPARSE_PROFILE"] = "1"  # read by the worker's SparseRuntime when the engine starts
    names = [name for name, _ in ALL_MODES]
    unknown = set(args.modes or ()) - set(names)
    if unknown:
        print(f"unknown modes {sorted(unknown)}; choose from {names}")
        return 2
    _SELECTED[:] = ["dense", *[m for m in names if m in (args.modes or names) and m != "dense"]]
    # Capped so a run stays short.
    n_prompts, args.max_new_tokens = min(args.num_prompts, 32), min(args.max_new_tokens, 48)
    texts = prompts(n_prompts)
    other = args.compare_thresholds
    if other:
        problem = check_thresholds_file(other)
        if problem:
            print(problem)
            return 2
        print(f"bench modes --compare-thresholds: {n_prompts} prompts x {args.max_new_tokens} tokens, "
              f"{args.rounds} rounds x {B1_REPEATS} requests per mode and server, servers alternating", flush=True)
        compared = asyncio.run(_compare_engines(args.model, other, texts, args.max_new_tokens, args.rounds))
        print("\n".join(compare_table(compared, _sparsity_table(), other)))
        print(f"total {time.perf_counter() - started:.0f} s")
        return 0
    batches = args.concurrency or [1, 32]
    print(f"bench modes: engine agreement over {n_prompts} prompts x {args.max_new_tokens} tokens; decode at "
          f"batch {batches}; prefill ~500 tokens; {args.rounds} rounds, modes interleaved", flush=True)
    engine = asyncio.run(_bench_engine(args.model, texts, args.max_new_tokens, batches, args.rounds))
    print(f"engine done ({time.perf_counter() - started:.0f} s)", flush=True)
    # Teacher-forced agreement on its own, larger prompt set: 12 prompts (what this used before) read several
    # points above 200 prompts for the same table, too noisy for a 90% goal.
    quality = _bench_quality(args.quality_prompts, 32)
    print(f"quality done ({time.perf_counter() - started:.0f} s)\n", flush=True)
    bounds = decode_bounds()
    d = engine["dense"]
    cols = "".join(f" {'b' + str(b) + ' tok/s':>10} {'x':>5}" for b in batches)
    print(f"{'mode':<10} {'ppl':>7} {'x':>5} {'tf agree':>8} {'tf all':>6} {'agree':>6} {'prefix':>6}{cols} {'bound x':>7} "
          f"{'prefill/s':>9} {'x':>5}")
    for name, _ in _modes():
        e, q = engine[name], quality[name]
        speeds = "".join(f" {e[f'decode_b{b}']:>10.1f} {e[f'decode_b{b}'] / d[f'decode_b{b}']:>4.2f}x" for b in batches)
        tf_all = f"{q['tf_all']:>6.1%}" if "tf_all" in q else f"{'':>6}"
        print(f"{name:<10} {q['ppl']:>7.2f} {q['ppl'] / quality['dense']['ppl']:>4.2f}x {q['tf_agreement']:>8.1%} "
              f"{tf_all} {e['agreement']:>6.1%} {e['same_prefix']:>6.1f}{speeds} {bounds[name]:>6.2f}x "
              f"{e['prefill']:>9.0f} {e['prefill'] / d['prefill']:>4.2f}x")
    print(f"\nppl: held-out perplexity ({quality['_docs']['heldout_documents']} documents, HF float32, every token "
          f"masked); tf agree: teacher-forced top-1 agreement with dense greedy (HF, {quality['_docs']['tf_tokens']} "
          f"tokens of {args.quality_prompts} chat prompts; sparse: prompt tokens dense, "
          f"as served); tf all: the same with every token masked (--sparse-prompt); agree / prefix: engine "
          f"free-running greedy tokens equal to dense, position by position / mean identical prefix length; "
          f"bound x: dense / sparse weight bytes per decoded token\n", flush=True)
    if engine.get("_profile"):
        print_profile(engine["_profile"])
    int8 = engine.get("_int8") or {}
    if int8:
        print(f"int8 mode: {int8.get('weight_bytes', 0) / 1e6:.0f} MB of int8 projection weights + scales, held "
              f"beside the bf16 model ({int8.get('backend')} kernel)\n", flush=True)
    if any(name.startswith("sparse") for name in _SELECTED):
        # As many torch threads as the engine's worker gets: vLLM binds its CPU worker to all cores but one
        # (the one left for the frontend), so one thread on a 2-core box.
        threads = max(1, len(os.sched_getaffinity(0)) - 1)
        bench_kernels.main(["--dtypes", "bf16", "--threads", str(threads), "--rounds", str(max(3, args.rounds + 2)),
                            "--allocations"])
    if "int8" in _SELECTED:
        bench_kernels.main_int8(rounds=max(3, args.rounds + 2))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0
