"""`featurelens bench generate`: our gRPC server vs vLLM's own `LLM.generate`, same model, prompts and token
counts, measured one after the other in one run (never both engines at once: they would share 2 cores).

Prints tokens/s and time to first token at each concurrency, and the ratio ours / raw vLLM. Both sides get the
same engine settings (`baseline_kwargs`: model, dtype, eager/compiled, KV dtype, max length, batch), printed
in the header; by default the run repeats for bfloat16 and float32, so the box shows what --dtype auto picks.

`--structured`: instead, structured output on our server: JSON-schema requests vs free text, same prompts and
token budget (the schema is long enough that JSON answers use all of it, so both variants generate the same
tokens), at concurrency 32 by default, the two variants interleaved in every round on one engine; prints
tokens/s, TTFT and the ratio JSON / free text, the first JSON request's time (the schema's compile), and
then checks that JSON answers given room to finish end on their own and parse.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from featurelens.server.bench.common import add_load, add_model, drive, machine, parser, prompts
from featurelens.server.config import Settings
from featurelens.server.engine import resolve_dtype, vllm_engine_kwargs
from featurelens.server.model_assets import resolve_model


def engine_settings(model: str, dtype: str, max_num_seqs: int) -> Settings:
    """The one Settings both sides are built from (FEATURELENS_* environment variables apply to both)."""
    return Settings(model=model, dtype=dtype, port=0, metrics_port=-1, max_num_seqs=max_num_seqs,
                    max_in_flight=10_000)


def baseline_kwargs(settings: Settings, model_path: str) -> dict[str, Any]:
    """vllm.LLM's arguments for the plain-vLLM side: exactly the engine settings our server passes to vLLM."""
    return {**vllm_engine_kwargs(settings, model_path), "disable_log_stats": False}


async def _bench_ours(settings: Settings, prompts: list[str], max_new_tokens: int, levels: list[int]) -> dict[int, dict]:
    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server

    running = await start_server(settings)
    results = {}
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=3600) as client:
            for level in levels:
                results[level] = await drive(client, prompts, max_new_tokens, level)
    finally:
        await running.stop(grace_s=1.0)
    return results


def _bench_raw(settings: Settings, model_path: str, prompts: list[str], max_new_tokens: int,
               levels: list[int], vllm_defaults: tuple[str, ...] = ()) -> dict[int, dict]:
    """Plain vLLM with our engine settings; `vllm_defaults`: settings left to vLLM's own defaults instead
    (e.g. "compilation_config": vLLM's default CUDA graphs rather than the tapped engine's PIECEWISE ones)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = baseline_kwargs(settings, model_path)
    for name in vllm_defaults:
        kwargs.pop(name, None)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    inputs = [TokensPrompt(prompt_token_ids=tokenizer.encode(p)) for p in prompts]
    results = {}
    for level in levels:
        started = time.perf_counter()
        outputs = []
        for i in range(0, len(inputs), level):  # `level` requests in flight at once, like our clients
            outputs += llm.generate(inputs[i:i + level], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        ttfts = [m.first_token_latency for o in outputs if (m := getattr(o, "metrics", None)) is not None]
        results[level] = {"tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
                          "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan")}
    del llm
    return results


# Long enough that most answers use the whole token budget, so both variants generate the same tokens.
BENCH_SCHEMA = {"type": "object", "properties": {
    "topic": {"type": "string", "maxLength": 40},
    "summary": {"type": "string", "minLength": 120, "maxLength": 400},
    "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 6},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["topic", "summary", "keywords", "confidence"], "additionalProperties": False}


async def _drive_requests(client: Any, make: Callable[[str], Any], texts: list[str], concurrency: int) -> dict:
    """Stream `make(text)` for every text with `concurrency` in flight: tokens/s, median TTFT, and the
    answers that ended on their own (finish EOS) with whether each parses as JSON."""
    from featurelens.client import pb

    queue = list(texts)
    ttfts: list[float] = []
    tokens, ended, parsed = 0, 0, 0

    async def worker() -> None:
        nonlocal tokens, ended, parsed
        while queue:
            started, first, text = time.perf_counter(), None, []
            async for chunk in client.stub.GenerateStream(make(queue.pop())):
                if first is None and chunk.tokens:
                    first = time.perf_counter() - started
                tokens += len(chunk.tokens)
                text.append(chunk.text_delta)
                if chunk.finish_reason == pb.FINISH_REASON_EOS:
                    ended += 1
                    try:
                        json.loads("".join(text))
                        parsed += 1
                    except ValueError:
                        pass
            ttfts.append(first or 0.0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_s": statistics.median(ttfts), "tokens": tokens,
            "ended": ended, "parsed": parsed}


async def _bench_structured(settings: Settings, texts: list[str], max_new_tokens: int, level: int,
                            rounds: int) -> None:
    """JSON-schema requests vs free text on one server, interleaved (the order alternates every round)."""
    from featurelens.client import AsyncClient, pb
    from featurelens.server.app import start_server

    schema = json.dumps(BENCH_SCHEMA)
    variants: dict[str, Callable[[str], Any]] = {
        "free text": lambda text: pb.GenerateStreamRequest(
            text=text, sampling=pb.SamplingOptions(temperature=0.0),
            stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens, ignore_eos=True)),
        "JSON schema": lambda text: pb.GenerateStreamRequest(
            text=text, sampling=pb.SamplingOptions(temperature=0.0),
            stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens),
            structured_output=pb.StructuredOutput(json_schema=schema)),
    }
    running = await start_server(settings)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=3600) as client:
            await _drive_requests(client, variants["free text"], texts[:2], 2)  # warm-up
            started = time.perf_counter()
            await _drive_requests(client, variants["JSON schema"], texts[:1], 1)  # compiles the schema
            first_json_s = time.perf_counter() - started
            for r in range(rounds):
                for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                    results[name].append(await _drive_requests(client, variants[name], texts, level))
                    print(f"  round {r + 1} {name}: {results[name][-1]['tokens_per_s']:.1f} tok/s", flush=True)
            roomy = await _drive_requests(client, lambda text: pb.GenerateStreamRequest(
                text=text, sampling=pb.SamplingOptions(temperature=0.0), stopping=pb.StoppingOptions(max_new_tokens=512),
                structured_output=pb.StructuredOutput(json_schema=schema)), texts[:16], 16)
    finally:
        await running.stop(grace_s=1.0)
    print(f"\nfirst JSON-schema request (schema compile + {max_new_tokens} tokens at concurrency 1): "
          f"{first_json_s:.2f}s")
    print(f"{'variant':>12} {'tok/s':>8} {'TTFT p50':>9} {'tokens':>7} {'ended':>6} {'parse':>6}")
    median = {name: statistics.median(r["tokens_per_s"] for r in runs) for name, runs in results.items()}
    for name, runs in results.items():
        last = runs[-1]
        print(f"{name:>12} {median[name]:>8.1f} {statistics.median(r['ttft_p50_s'] for r in runs):>8.3f}s "
              f"{last['tokens']:>7} {last['ended']:>6} {last['parsed']:>6}")
    print(f"ratio JSON schema / free text, tokens/s (median of {rounds} rounds): "
          f"{median['JSON schema'] / median['free text']:.2f}")
    print(f"JSON answers with room to finish (512 tokens): {roomy['ended']}/16 ended on their own, "
          f"{roomy['parsed']} of them parse as JSON")


def main(argv: list[str] | None = None) -> int:
    ap = parser("generate", __doc__)
    add_model(ap)
    add_load(ap)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"],
                    help="model dtypes to measure, each on both sides (default: both, so the box shows which "
                         "one --dtype auto should pick; 'auto' is accepted)")
    ap.add_argument("--rounds", type=int, default=3, help="with --structured: timed rounds of each variant (the "
                                                           "median is printed)")
    ap.add_argument("--structured", action="store_true",
                    help="structured output instead: JSON-schema requests vs free text on our server, interleaved "
                         "(concurrency 32 unless --concurrency; --dtype's first value; --rounds)")
    args = ap.parse_args(argv)
    if args.structured:
        level = (args.concurrency or [32])[0]
        texts = prompts(args.num_prompts)
        settings = engine_settings(args.model, args.dtype[0], level)
        print(f"bench generate --structured: {len(texts)} prompts × {args.max_new_tokens} tokens per variant, "
              f"concurrency {level}, {args.rounds} rounds; machine: {machine()}; "
              f"dtype {resolve_dtype(args.dtype[0])[0]}", flush=True)
        asyncio.run(_bench_structured(settings, texts, args.max_new_tokens, level, args.rounds))
        return 0
    levels = args.concurrency or [1, 32]
    model_path = resolve_model(args.model)
    texts = prompts(args.num_prompts)
    auto, why = resolve_dtype("auto")
    print(f"bench generate: {len(texts)} prompts × {args.max_new_tokens} tokens, concurrency {levels}; "
          f"machine: {machine()}; --dtype auto here = {auto} ({why})")
    for dtype in args.dtype:
        settings = engine_settings(args.model, dtype, max(levels))
        shared = {k: v for k, v in vllm_engine_kwargs(settings, model_path).items() if k != "model"}
        print(f"\nengine settings, both sides: {shared}", flush=True)
        ours = asyncio.run(_bench_ours(settings, texts, args.max_new_tokens, levels))
        raw = _bench_raw(settings, model_path, texts, args.max_new_tokens, levels)
        print(f"{'concurrency':>11} {'ours tok/s':>11} {'vLLM tok/s':>11} {'ratio':>6} {'ours TTFT':>10} {'vLLM TTFT':>10}")
        for level in levels:
            o, r = ours[level], raw[level]
            print(f"{level:>11} {o['tokens_per_s']:>11.1f} {r['tokens_per_s']:>11.1f} "
                  f"{o['tokens_per_s'] / r['tokens_per_s']:>6.2f} {o['ttft_p50_s']:>9.3f}s {r['ttft_p50_s']:>9.3f}s")
    return 0
