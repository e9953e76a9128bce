"""`featurelens bench generate`: our gRPC server vs vLLM's own `LLM.generate`, same model, prompts and token
counts, measured one after the other in one run (never both engines at once: they would share 2 cores).

Prints tokens/s and time to first token at each concurrency, and the ratio ours / raw vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn.", "What is a binary search tree?",
    "Give three tips for learning a language.", "Describe the water cycle.", "What causes inflation?",
    "Summarise the plot of Hamlet.", "How do vaccines work?", "What is the Pythagorean theorem?",
    "Name some uses of copper.", "Why do cats purr?", "How does a refrigerator work?",
]


def _prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(n)]


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
                results[level] = await _drive(client, prompts, max_new_tokens, level)
    finally:
        await running.stop(grace_s=1.0)
    return results


async def _drive(client: Any, prompts: list[str], max_new_tokens: int, concurrency: int) -> dict:
    from featurelens.client import pb

    queue = list(prompts)
    ttfts: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            started = time.perf_counter()
            first = None
            request = pb.GenerateStreamRequest(text=prompt, sampling=pb.SamplingOptions(temperature=0.0),
                                               stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens,
                                                                           ignore_eos=True))
            async for chunk in client.stub.GenerateStream(request):
                if first is None and chunk.tokens:
                    first = time.perf_counter() - started
                tokens += len(chunk.tokens)
            ttfts.append(first or 0.0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_s": statistics.median(ttfts), "tokens": tokens}


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


def main(args: argparse.Namespace) -> int:
    if args.which == "generate":
        return bench_generate(args)
    import importlib

    return int(importlib.import_module(f"featurelens.server.bench_{args.which}").main(args))


def bench_generate(args: argparse.Namespace) -> int:
    from featurelens.server.model_assets import resolve_model

    levels = args.concurrency or [1, 32]
    model_path = resolve_model(args.model)
    prompts = _prompts(args.num_prompts)
    print(f"bench generate: {len(prompts)} prompts × {args.max_new_tokens} tokens, concurrency {levels}")
    ours = asyncio.run(_bench_ours(args.model, prompts, args.max_new_tokens, levels))
    raw = _bench_raw(model_path, prompts, args.max_new_tokens, levels)
    print(f"{'concurrency':>11} {'ours tok/s':>11} {'vLLM tok/s':>11} {'ratio':>6} {'ours TTFT':>10} {'vLLM TTFT':>10}")
    for level in levels:
        o, r = ours[level], raw[level]
        print(f"{level:>11} {o['tokens_per_s']:>11.1f} {r['tokens_per_s']:>11.1f} "
              f"{o['tokens_per_s'] / r['tokens_per_s']:>6.2f} {o['ttft_p50_s']:>9.3f}s {r['ttft_p50_s']:>9.3f}s")
    return 0
