"""`featurelens bench generate`: our gRPC server vs vLLM's own `LLM.generate`, same model, prompts and token
counts, measured one after the other in one run (never both engines at once: they would share 2 cores).

Prints tokens/s and time to first token at each concurrency, and the ratio ours / raw vLLM. Both sides get the
same engine settings (`baseline_kwargs`: model, dtype, eager/compiled, KV dtype, max length, batch), printed
in the header; by default the run repeats for bfloat16 and float32, so the box shows what --dtype auto picks.
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import time
from typing import Any

from featurelens.server.bench.common import add_load, add_model, drive, parser, prompts
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
               levels: list[int]) -> dict[int, dict]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**baseline_kwargs(settings, model_path))
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


def main(argv: list[str] | None = None) -> int:
    ap = parser("generate", __doc__)
    add_model(ap)
    add_load(ap)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"],
                    help="model dtypes to measure, each on both sides (default: both, so the box shows which "
                         "one --dtype auto should pick; 'auto' is accepted)")
    args = ap.parse_args(argv)
    levels = args.concurrency or [1, 32]
    model_path = resolve_model(args.model)
    texts = prompts(args.num_prompts)
    auto, why = resolve_dtype("auto")
    print(f"bench generate: {len(texts)} prompts × {args.max_new_tokens} tokens, concurrency {levels}; "
          f"CPU/GPU: {platform.processor() or platform.machine()}; --dtype auto here = {auto} ({why})")
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
