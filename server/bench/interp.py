"""`featurelens bench interp`: what interpretability costs, measured side by side in one run.

* throughput at one concurrency: plain vs features on every request vs steering on every request vs both vs
  hallucination-risk scoring on every request (the shipped probe), with the mean request latency of each;
* bytes per token crossing worker → frontend vs a dense residual capture of the same layers;
* the feature channel: ZMQ push socket vs collective_rpc polling (a second server start);
* steering vs HF transformers + a forward hook doing the same nudge on the same model and prompts;
* with `--tensor-parallel-size 1 2`: all of the above per worker count (one server start each, in turn; the
  engine binds one CPU group per worker), and each one's plain tok/s against the first's.

Any served model: `--model PATH --sae LAYER=PATH ...` (the risk variant needs a probe: `--risk-probe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featurelens.server.bench.common import add_load, add_model, add_rounds, parser, prompts, saes_for_bench
from featurelens.v1 import featurelens_pb2 as pb


async def _run_variants(saes: list[str], transport: str, prompts: list[str], max_new_tokens: int,
                        concurrency: int, variants: list[str], rounds: int = 1, model: str = "default",
                        tensor_parallel_size: int = 1, risk_probe: str = "default",
                        enforce_eager: bool | None = None, taps: bool = True,
                        max_num_seqs: int | None = None) -> dict[str, dict[str, float]]:
    """Per variant: tok/s, ratio to plain, mean request latency and its ratio, bytes per token.

    One untimed pass of every variant first (prefix cache and first-use costs then favour none of them),
    then `rounds` timed passes with the variants interleaved, in alternating order so slow drift of the
    machine cancels; ratios are the median over rounds of each round's ratio to that round's plain run."""
    from statistics import median

    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    # Several CPU workers: vLLM's CPU backend reserves gpu_memory_utilization of the RAM per worker.
    extra: dict[str, Any] = {"gpu_memory_utilization": 0.1} if tensor_parallel_size > 1 else {}
    if not taps:  # read by the worker when vLLM imports the extension (server/worker/tap.py)
        os.environ["FEATURELENS_NO_TAPS"] = "1"
    try:
        running = await start_server(Settings(port=0, metrics_port=-1, max_num_seqs=max_num_seqs or concurrency,
                                              max_in_flight=10_000, sae=saes, feature_transport=transport,
                                              model=model, risk_probe=risk_probe, enforce_eager=enforce_eager,
                                              tensor_parallel_size=tensor_parallel_size, **extra))
    finally:
        os.environ.pop("FEATURELENS_NO_TAPS", None)
    layers = sorted(running.engine.saes)
    if running.engine.risk_probe is None and any("risk" in v for v in variants):
        print("no risk probe for this model: the risk variants are left out (--risk-probe)", flush=True)
        variants = [v for v in variants if "risk" not in v]
    elif any(v in RISK_BREAKDOWN for v in variants) and not (
            running.engine.risk_probe is not None and running.engine.risk_probe.needs_logprobs):
        print("the risk probe has no logprob terms: nothing to break down", flush=True)
        variants = [v for v in variants if v not in RISK_BREAKDOWN]
    assert running.engine.shape is not None  # known once the engine started
    hidden = running.engine.shape.hidden_size
    feature_sel = [pb.FeatureSelection(layer=layer, top_k=8) for layer in layers]
    steer = [pb.SteeringIntervention(layer=layers[0], feature_id=3, op=pb.STEERING_OP_NUDGE, strength=4.0)]
    receiver = running.engine.features
    assert receiver is not None  # made when the engine started
    runs: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}  # (tok/s, latency, bytes/token)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=3600) as client:

            async def run(variant: str) -> tuple[float, float, float]:
                with _risk_variant(running.engine, variant):
                    return await timed(variant)

            async def timed(variant: str) -> tuple[float, float, float]:
                interp = pb.InterpretabilityOptions(features=feature_sel if "features" in variant else [],
                                                    score_risk="risk" in variant)
                steering = steer if "steering" in variant else []
                queue = list(prompts)
                tokens = 0
                durations: list[float] = []
                bytes_before = receiver.bytes_received

                async def worker() -> None:
                    nonlocal tokens
                    while queue:
                        request = pb.GenerateRequest(
                            text=queue.pop(), sampling=pb.SamplingOptions(temperature=0.0),
                            stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
                            interpretability=interp, steering=steering)
                        began = time.perf_counter()
                        reply = await client.stub.Generate(request)
                        durations.append(time.perf_counter() - began)
                        tokens += len(reply.tokens)

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - started
                # Each generated token's codes come from the row that predicted it: one row per token.
                sent = receiver.bytes_received - bytes_before
                return tokens / elapsed, sum(durations) / max(1, len(durations)), sent / max(1, tokens)

            for variant in variants:
                await run(variant)
            for r in range(rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    runs[variant].append(await run(variant))
    finally:
        await running.stop(grace_s=1.0)
    out: dict[str, dict[str, float]] = {}
    plain = runs.get("plain")
    for variant, results in runs.items():
        out[variant] = {"tok_s": median(r[0] for r in results), "latency_s": median(r[1] for r in results),
                        "bytes_per_token": median(r[2] for r in results)}
        if plain:
            out[variant]["vs_plain"] = median(r[0] / p[0] for r, p in zip(results, plain, strict=True))
            ratios = [r[1] / p[1] for r, p in zip(results, plain, strict=True)]
            out[variant]["latency_vs_plain"] = median(ratios)
            # The spread of the per-round ratios: on a small shared box it is as large as the effects measured.
            out[variant]["latency_vs_plain_q1"], out[variant]["latency_vs_plain_q3"] = _quartiles(ratios)
    out["_dense_bf16_bytes_per_token"] = {"bytes_per_token": hidden * 2 * len(layers)}
    return out


# `--risk-breakdown`: what the risk variant's parts cost, switched on one server between rounds (separate
# server starts differ by as much as the effects). Each names what the round changes; "risk" is as shipped.
RISK_BREAKDOWN = {
    "risk/vllm-logprobs": "the probe's terms read from vLLM's logprobs=0 instead of the worker's own",
    "risk/no-terms": "the probe without its logprob terms: no logprob work in the worker or the frontend",
}


@contextlib.contextmanager
def _risk_variant(engine: Any, variant: str) -> Iterator[None]:
    """For one round of a `RISK_BREAKDOWN` variant: the engine's frontend state changed as it names, restored
    after. The worker keeps its probe features (the terms do not change them)."""
    if variant not in RISK_BREAKDOWN:
        yield
        return
    saved = engine.risk_probe, engine.worker_logprobs
    try:
        if variant == "risk/vllm-logprobs":
            engine.worker_logprobs = False
        elif variant == "risk/no-terms":
            probe = copy.copy(engine.risk_probe.probe)  # a copy keeps what is not a field (the OOD reference)
            probe.terms = []
            engine.risk_probe = dataclasses.replace(engine.risk_probe, probe=probe)
        yield
    finally:
        engine.risk_probe, engine.worker_logprobs = saved


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (the values themselves when there are fewer than 4)."""
    from statistics import quantiles

    if len(values) < 4:
        return min(values), max(values)
    q1, _, q3 = quantiles(values, n=4)
    return q1, q3


def _hf_steering(prompts: list[str], max_new_tokens: int, concurrency: int, layer: int,
                 model_name: str = "default") -> float:
    """The same nudge with HF transformers: forward hook on the decoder layer, batched generate()."""
    import torch
    from featurelens.server.model_assets import resolve_model
    from featurelens.server.worker.model import hf_layers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    hidden = int(model.config.hidden_size)
    direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0).to(torch.bfloat16) * 4.0

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden += direction
        return output

    handle = hf_layers(model)[layer].register_forward_hook(hook)
    tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), concurrency):
            batch = tokenizer(prompts[i:i + concurrency], return_tensors="pt", padding=True)
            # transformers types generate's self as its mixin, which the Auto class's model does not match
            out = model.generate(**batch, max_new_tokens=max_new_tokens,  # type: ignore[misc]
                                 min_new_tokens=max_new_tokens, do_sample=False)
            assert isinstance(out, torch.Tensor)  # token ids: return_dict_in_generate is off
            tokens += (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    handle.remove()
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    ap = parser("interp", __doc__)
    add_load(ap, concurrency_help="the concurrency to measure (default 32)")
    add_rounds(ap)
    add_model(ap)
    ap.add_argument("--sae", action="append", default=None,
                    help="LAYER=PATH (repeatable); needed with --model, default: the shipped SAEs")
    ap.add_argument("--risk-probe", default="default",
                    help="the risk variant's probe file ('default': the shipped one, default model only)")
    ap.add_argument("--tensor-parallel-size", type=int, nargs="+", default=[1],
                    help="worker counts to measure, one server start each (e.g. 1 2: TP=2 against TP=1)")
    ap.add_argument("--compiled", action="store_true",
                    help="vLLM's compiled engine instead: plain vLLM compiled vs eager; our compiled server "
                         "without tap call sites, with them unused, and with features / steering / risk on every "
                         "request (at each --concurrency, default 1 and 32)")
    ap.add_argument("--risk-only", action="store_true",
                    help="only plain vs risk scoring on every request (more rounds in the same time; the "
                         "issue-29 latency goal), no feature transport or HF comparison")
    ap.add_argument("--risk-breakdown", action="store_true",
                    help="with --risk-only, for a probe with logprob terms: also risk with vLLM's logprobs and "
                         "risk without the terms, switched on the same server between rounds")
    args = ap.parse_args(argv)
    if args.risk_breakdown and not args.risk_only:
        ap.error("--risk-breakdown goes with --risk-only")
    if args.model != "default" and not args.sae:
        ap.error("--model needs --sae LAYER=PATH: the shipped SAEs are the default model's")
    if args.compiled:
        return _compiled(args)
    concurrency = (args.concurrency or [32])[0]
    rounds = max(1, args.rounds)
    texts = prompts(args.num_prompts)
    saes = args.sae or saes_for_bench()
    print(f"bench interp: {len(texts)} prompts × {args.max_new_tokens} tokens at concurrency {concurrency}; "
          f"{rounds} timed rounds after a warm-up, variants interleaved; model {args.model}; "
          f"SAEs: {', '.join(Path(s.partition('=')[2] or s).name for s in saes)}", flush=True)
    plain_by_tp: dict[int, float] = {}
    for tp in args.tensor_parallel_size:
        variants = ["plain", "risk"] if args.risk_only else ["plain", "features", "steering", "features+steering",
                                                              "risk"]
        if args.risk_breakdown:
            variants += list(RISK_BREAKDOWN)
        common: dict[str, Any] = {"rounds": rounds, "model": args.model, "tensor_parallel_size": tp,
                                  "risk_probe": args.risk_probe}
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")  # the engine sets it for several CPU workers
        try:
            zmq = asyncio.run(_run_variants(saes, "zmq", texts, args.max_new_tokens, concurrency, variants,
                                            **common))
            rpc = {} if args.risk_only else asyncio.run(
                _run_variants(saes, "rpc", texts, args.max_new_tokens, concurrency, ["features"], **common))
        finally:  # the next worker count binds its own
            if bind is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        # HF transformers runs one process: measured once, beside the first worker count
        hf_tp = _hf_steering(texts, args.max_new_tokens, concurrency, layer=_sae_layers(saes)[0],
                             model_name=args.model) if tp == args.tensor_parallel_size[0] and not args.risk_only else 0.0
        dense = zmq.pop("_dense_bf16_bytes_per_token")["bytes_per_token"]
        rpc.pop("_dense_bf16_bytes_per_token", None)
        plain_by_tp[tp] = zmq["plain"]["tok_s"]
        if len(args.tensor_parallel_size) > 1:
            print(f"--- tensor parallel size {tp}")
        print(f"{'variant':<20} {'tok/s':>8} {'vs plain':>9} {'mean latency s':>15} {'vs plain':>9} {'bytes/token':>12}")
        for variant, r in zmq.items():
            sent = f"{r['bytes_per_token']:>12.1f}" if r["bytes_per_token"] else f"{'-':>12}"
            print(f"{variant:<20} {r['tok_s']:>8.1f} {r['vs_plain']:>8.2f}x {r['latency_s']:>15.2f} "
                  f"{r['latency_vs_plain']:>8.2f}x {sent}")
        if len(zmq) > 1 and rounds >= 4:
            print(f"mean latency vs plain, per-round spread over {rounds} rounds (quartiles): " + ", ".join(
                f"{variant} {r['latency_vs_plain_q1']:.2f}-{r['latency_vs_plain_q3']:.2f}x"
                for variant, r in zmq.items() if variant != "plain"))
        if rpc:
            print(f"{'features (rpc poll)':<20} {rpc['features']['tok_s']:>8.1f}   ZMQ/rpc = "
                  f"{zmq['features']['tok_s'] / rpc['features']['tok_s']:.2f}x (separate server start)")
        for variant in ("features", "risk"):
            if variant in zmq:
                print(f"bytes/token {variant:<10} {zmq[variant]['bytes_per_token']:>7.1f}   dense bf16 residuals "
                      f"{dense:.0f}   {dense / zmq[variant]['bytes_per_token']:.1f}x fewer")
        if hf_tp:
            print(f"steering: ours {zmq['steering']['tok_s']:.1f} tok/s vs HF transformers+hook {hf_tp:.1f} tok/s = "
                  f"{zmq['steering']['tok_s'] / hf_tp:.2f}x")
    first = args.tensor_parallel_size[0]
    for tp, tok_s in plain_by_tp.items():
        if tp != first:
            print(f"plain tok/s, tensor parallel {tp} vs {first}: {tok_s / plain_by_tp[first]:.2f}x "
                  "(separate server starts)")
    return 0


def _sae_layers(saes: list[str]) -> list[int]:
    """The layers of the SAE arguments, sorted (the steering layer is the first, as in `_run_variants`)."""
    from featurelens.server.interp.registry import parse_sae_arg

    return sorted(parse_sae_arg(s).layer for s in saes)


def _compiled(args: Any) -> int:
    """`--compiled`: what the taps cost on vLLM's compiled engine, one server start per row and concurrency.

    "plain compiled" for the goals is our own compiled server started without tap call sites
    (FEATURELENS_NO_TAPS=1: vLLM compiles the same model with nothing of ours in the graph), so the ratios
    measure the taps and nothing else; plain vLLM (no featurelens, vLLM's default compilation settings) is
    printed beside it."""
    from featurelens.server.bench.common import machine
    from featurelens.server.bench.generate import _bench_raw, engine_settings
    from featurelens.server.model_assets import resolve_model

    levels = args.concurrency or [1, 32]
    rounds = max(1, args.rounds)
    texts = prompts(args.num_prompts)
    saes = args.sae or saes_for_bench()
    model_path = resolve_model(args.model)
    print(f"bench interp --compiled on {machine()}: {len(texts)} prompts x {args.max_new_tokens} tokens, "
          f"concurrency {levels}, {rounds} timed rounds per server; model {args.model}", flush=True)
    raw = {}
    for eager in (True, False):
        settings = engine_settings(args.model, "auto", max(levels)).model_copy(update={"enforce_eager": eager})
        raw[eager] = _bench_raw(settings, model_path, texts, args.max_new_tokens, levels,
                                vllm_defaults=("compilation_config",))
    rows: dict[int, dict[str, float]] = {}
    for level in levels:
        # One max_num_seqs for every start: it is part of vLLM's compile-cache key, so each engine compiles once.
        common: dict[str, Any] = {"rounds": rounds, "model": args.model, "risk_probe": args.risk_probe,
                                  "max_num_seqs": max(levels)}
        bare = asyncio.run(_run_variants(saes, "zmq", texts, args.max_new_tokens, level, ["plain"],
                                         enforce_eager=False, taps=False, **common))
        tapped = asyncio.run(_run_variants(saes, "zmq", texts, args.max_new_tokens, level,
                                           ["plain", "features", "steering", "risk"], enforce_eager=False,
                                           **common))
        eagerly = asyncio.run(_run_variants(saes, "zmq", texts, args.max_new_tokens, level, ["plain"],
                                            enforce_eager=True, **common))
        base = bare["plain"]["tok_s"]
        row = {"vllm eager": raw[True][level]["tokens_per_s"], "vllm compiled": raw[False][level]["tokens_per_s"],
               "server compiled, no taps": base, "server eager": eagerly["plain"]["tok_s"]}
        for variant in ("plain", "features", "steering", "risk"):
            if variant in tapped:
                row[f"compiled, taps: {variant}"] = tapped[variant]["tok_s"]
        rows[level] = row
        print(f"--- concurrency {level}")
        print(f"{'engine':<32} {'tok/s':>8} {'vs plain compiled':>18}")
        for name, tok_s in row.items():
            print(f"{name:<32} {tok_s:>8.1f} {tok_s / base:>17.2f}x")
        print(f"plain vLLM compiled vs eager: {row['vllm compiled'] / row['vllm eager']:.2f}x; our server compiled "
              f"(taps unused) vs eager: {row['compiled, taps: plain'] / row['server eager']:.2f}x", flush=True)
        goals = [("taps installed, unused", "compiled, taps: plain", 0.98)] + [
            (f"{v} on every request", f"compiled, taps: {v}", 0.90) for v in ("features", "steering", "risk")]
        for label, key, goal in goals:
            if key in row:
                ratio = row[key] / base
                print(f"goal {label}: {ratio:.2f}x of plain compiled (goal >= {goal:.2f}: "
                      f"{'met' if ratio >= goal else 'NOT met'})")
    return 0
