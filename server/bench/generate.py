"""`featurelens bench generate`: our gRPC server vs vLLM's own `LLM.generate`, same model, prompts and token
counts, measured one after the other in one run (never both engines at once: they would share 2 cores).

Prints tokens/s and time to first token at each concurrency, and the ratio ours / raw vLLM.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from featurelens.server.bench.common import add_load, add_model, drive, parser, prompts
from featurelens.server.model_assets import resolve_model


async def _bench_ours(model: str, prompts: list[str], max_new_tokens: int, levels: list[int]) -> dict[int, dict]:
    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    running = await start_server(Settings(model=model, port=0, metrics_port=-1, max_num_seqs=max(levels),
                                          max_in_flight=10_000))
    results = {}
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=3600) as client:
            for level in levels:
                results[level] = await drive(client, prompts, max_new_tokens, level)
    finally:
        await running.stop(grace_s=1.0)
    return results


def _bench_raw(model_path: str, prompts: list[str], max_new_tokens: int, levels: list[int]) -> dict[int, dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, enforce_eager=True, dtype="bfloat16", max_model_len=2048,
              max_num_seqs=max(levels), disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    inputs = [{"prompt_token_ids": tokenizer.encode(p)} for p in prompts]
    results = {}
    for level in levels:
        started = time.perf_counter()
        outputs = []
        for i in range(0, len(inputs), level):  # `level` requests in flight at once, like our clients
            outputs += llm.generate(inputs[i:i + level], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        ttfts = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
        results[level] = {"tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
                          "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan")}
    del llm
    return results


def main(argv: list[str] | None = None) -> int:
    ap = parser("generate", __doc__)
    add_model(ap)
    add_load(ap)
    args = ap.parse_args(argv)

    levels = args.concurrency or [1, 32]
    model_path = resolve_model(args.model)
    texts = prompts(args.num_prompts)
    print(f"bench generate: {len(texts)} prompts × {args.max_new_tokens} tokens, concurrency {levels}")
    ours = asyncio.run(_bench_ours(args.model, texts, args.max_new_tokens, levels))
    raw = _bench_raw(model_path, texts, args.max_new_tokens, levels)
    print(f"{'concurrency':>11} {'ours tok/s':>11} {'vLLM tok/s':>11} {'ratio':>6} {'ours TTFT':>10} {'vLLM TTFT':>10}")
    for level in levels:
        o, r = ours[level], raw[level]
        print(f"{level:>11} {o['tokens_per_s']:>11.1f} {r['tokens_per_s']:>11.1f} "
              f"{o['tokens_per_s'] / r['tokens_per_s']:>6.2f} {o['ttft_p50_s']:>9.3f}s {r['ttft_p50_s']:>9.3f}s")
    return 0
