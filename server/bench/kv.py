"""`featurelens bench kv`: the KV cache in the model's dtype (auto, bf16) vs fp8 e4m3 and e5m2 (--kv-cache-dtype),
side by side in one run.

Three of our servers, one per KV cache dtype, are up for the whole run and every timed measurement alternates
between them inside each round, so load from other processes hits them alike.

1. Capacity: the tokens each KV cache holds in the same --kv-cache-gib (GetModelInfo.kv_cache_tokens).
2. Quality, teacher-forced through each engine with vLLM's prompt logprobs (vLLM's CPU attention reads every key
   and value back from the cache, prefill included, so a scored prompt sees the fp8 cache as decoding does):
   perplexity on held-out documents packed into long sequences (--context-tokens), and the fraction of the bf16
   engine's greedy answers' tokens that each engine ranks first. The bf16 engine scoring its own answers is the
   floor of that measure: a prefill and a decode step round differently.
3. Speed: decode tokens/s at batch 1 after a short prompt and after a long one (where the keys and values are a
   larger share of the bytes each step reads), at batch 32, and prefill tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import time
from typing import Any

from featurelens.server.bench.common import add_load, add_model, add_rounds, parser, prompts

DTYPES = ("auto", "fp8", "fp8_e5m2")  # fp8 is e4m3 (vLLM's default fp8)
SCORED_TOKENS = 32  # greedy answer tokens scored per chat prompt


async def _start(model: str, dtype: str, batch: int) -> Any:
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    return await start_server(Settings(model=model, port=0, metrics_port=-1, kv_cache_dtype=dtype,
                                       max_num_seqs=max(8, batch), max_in_flight=10_000))


async def _final(engine: Any, ids: list[int], params: Any, tag: str) -> Any:
    """The last RequestOutput of one request through the engine."""
    final = None
    async for output in engine.generate(f"kvbench-{tag}-{random.getrandbits(48):x}", ids, params):
        final = output
    return final


async def _prompt_logprobs(engine: Any, ids: list[int], tag: str) -> list[tuple[float, int]]:
    """(log p, rank) of every token of `ids` after the first, teacher-forced through the engine."""
    from vllm import SamplingParams

    final = await _final(engine, ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1), tag)
    scored = final.prompt_logprobs[1:]
    return [(entry[token].logprob, entry[token].rank) for token, entry in zip(ids[1:], scored, strict=True)]


async def _greedy(engine: Any, ids: list[int], tag: str) -> list[int]:
    from vllm import SamplingParams

    final = await _final(engine, ids, SamplingParams(max_tokens=SCORED_TOKENS, temperature=0.0), tag)
    return list(final.outputs[0].token_ids)


def _documents(engine: Any, context_tokens: int, n_sequences: int) -> list[list[int]]:
    """Held-out documents of the sparsity calibration corpus, packed into sequences of `context_tokens`."""
    from featurelens.server.bench.modes import HELDOUT_TEXTS
    from featurelens.server.offline.sparsity.data import corpus_texts

    _, held = corpus_texts(0, HELDOUT_TEXTS * 4)  # enough text for several long sequences
    stream: list[int] = []
    for text in held:
        stream += engine.encode_text(text)
    return [stream[i * context_tokens:(i + 1) * context_tokens] for i in range(len(stream) // context_tokens)
            ][:n_sequences]


async def _quality(servers: dict[str, Any], n_prompts: int, context_tokens: int, n_sequences: int) -> dict:
    from featurelens.server.offline.sae import corpus

    ref = servers["auto"].engine
    docs = _documents(ref, context_tokens, n_sequences)
    chats = [ref.encode_chat(corpus.chat_messages(s, u)) for s, u in corpus.make_instructions(random.Random(2),
                                                                                             n_prompts)]
    answers = await asyncio.gather(*(_greedy(ref, p, f"ans{i}") for i, p in enumerate(chats)))
    out: dict[str, dict[str, float]] = {}
    for dtype, running in servers.items():
        engine = running.engine
        scored = await asyncio.gather(*(_prompt_logprobs(engine, d, f"doc{i}") for i, d in enumerate(docs)))
        nll = [-lp for seq in scored for lp, _ in seq]
        agree = total = 0
        forced = await asyncio.gather(*(_prompt_logprobs(engine, p + a, f"tf{i}")
                                        for i, (p, a) in enumerate(zip(chats, answers, strict=True))))
        for prompt, answer, seq in zip(chats, answers, forced, strict=True):
            tail = seq[len(prompt) - 1:]  # the scores of the answer's tokens
            agree += sum(rank == 1 for _, rank in tail)
            total += len(answer)
        out[dtype] = {"ppl": math.exp(sum(nll) / len(nll)), "tf_agreement": agree / max(total, 1),
                      "scored_tokens": len(nll), "answer_tokens": total}
    return out


async def _speed(servers: dict[str, Any], prompts: list[str], long_prompt: str, new_tokens: int, batch: int,
                 rounds: int) -> dict[str, dict[str, float]]:
    from featurelens.client import AsyncClient
    from featurelens.server.bench.modes import _request, _stream

    samples: dict[str, dict[str, list[float]]] = {dtype: {} for dtype in servers}
    clients = {dtype: AsyncClient(f"127.0.0.1:{running.port}", timeout_s=3600) for dtype, running in servers.items()}
    rng = random.Random(0)
    try:
        for client in clients.values():  # warm-up
            await _stream(client.stub, _request("Hello", 0, 4))
        for r in range(rounds):
            for dtype, client in clients.items():
                stub, per = client.stub, samples[dtype]
                for rep in range(3):
                    ids, _, first, end = await _stream(stub, _request([prompts[(r + rep) % len(prompts)]], 0,
                                                                      new_tokens))
                    per.setdefault("b1", []).append((len(ids) - 1) / (end - first))
                    # A unique prefix: the prefix cache never answers the long prompt.
                    ids, _, first, end = await _stream(stub, _request(f"[{rng.getrandbits(64):x}] {long_prompt}",
                                                                      0, new_tokens))
                    per.setdefault("b1_long", []).append((len(ids) - 1) / (end - first))
                reqs = [_request([prompts[(r * batch + i) % len(prompts)]], 0, new_tokens) for i in range(batch)]
                results = await asyncio.gather(*(_stream(stub, q) for q in reqs))
                per.setdefault(f"b{batch}", []).append(
                    sum(len(x[0]) for x in results) / (max(x[3] for x in results) - min(x[1] for x in results)))
                unique = f"[{rng.getrandbits(64):x}] {long_prompt}"
                _, started, first, _ = await _stream(stub, _request(unique, 0, 1))
                per.setdefault("prefill", []).append(
                    len(servers[dtype].engine.encode_text(unique)) / (first - started))
    finally:
        for client in clients.values():
            await client.close()
    return {dtype: {k: statistics.median(v) for k, v in per.items()} for dtype, per in samples.items()}


def _long_prompt(engine: Any, n_tokens: int) -> str:
    from featurelens.server.offline.sparsity.data import corpus_texts

    calibration, _ = corpus_texts(1, 40)
    return engine.tokenizer.decode(engine.encode_text(" ".join(calibration))[1:n_tokens])


async def _run(args: argparse.Namespace, prompts: list[str], batch: int) -> tuple[dict, dict, dict]:
    servers: dict[str, Any] = {}
    try:
        for dtype in DTYPES:
            servers[dtype] = await _start(args.model, dtype, batch)
        capacity = {dtype: running.engine.kv_cache_tokens for dtype, running in servers.items()}
        started = time.perf_counter()
        quality = await _quality(servers, args.num_prompts, args.context_tokens, args.sequences)
        print(f"quality done ({time.perf_counter() - started:.0f} s)", flush=True)
        long_prompt = _long_prompt(servers["auto"].engine, args.context_tokens)
        speed = await _speed(servers, prompts, long_prompt, args.max_new_tokens, batch, args.rounds)
        return capacity, quality, speed
    finally:
        for running in servers.values():
            await running.stop(grace_s=1.0)


def main(argv: list[str] | None = None) -> int:
    ap = parser("kv", __doc__)
    add_model(ap)
    add_load(ap, concurrency_help="the batch of the throughput run (default 32)")
    add_rounds(ap)
    ap.add_argument("--context-tokens", type=int, default=1536, help="tokens per held-out sequence and in the long prompt")
    ap.add_argument("--sequences", type=int, default=8, help="held-out sequences scored")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    args.max_new_tokens = min(args.max_new_tokens, 64)
    limit = 2048 - args.max_new_tokens - 16  # the servers' default max_model_len, room for the answer
    if not 64 <= args.context_tokens <= limit:
        print(f"--context-tokens must be in [64, {limit}]")
        return 2
    batch = max(args.concurrency or [32])
    texts = prompts(max(batch, 8))
    print(f"bench kv: KV cache {' vs '.join(DTYPES)}; teacher-forced over {args.num_prompts} chat answers and "
          f"{args.sequences} held-out sequences of {args.context_tokens} tokens; decode at batch 1 (short and "
          f"{args.context_tokens}-token prompts) and {batch}; {args.rounds} rounds, alternating", flush=True)
    capacity, quality, speed = asyncio.run(_run(args, texts, batch))
    base_q, base_s = quality["auto"], speed["auto"]
    print(f"\n{'kv cache':<9} {'tokens held':>11} {'x':>5} {'ppl':>7} {'x':>6} {'tf agree':>8} "
          f"{'b1 tok/s':>9} {'x':>5} {'b1 long':>8} {'x':>5} {f'b{batch} tok/s':>10} {'x':>5} {'prefill/s':>9} {'x':>5}")
    for dtype in DTYPES:
        q, s = quality[dtype], speed[dtype]
        print(f"{dtype:<9} {capacity[dtype]:>11} {capacity[dtype] / capacity['auto']:>4.2f}x {q['ppl']:>7.3f} "
              f"{q['ppl'] / base_q['ppl']:>5.3f}x {q['tf_agreement']:>8.1%} "
              + " ".join(f"{s[k]:>{w}.1f} {s[k] / base_s[k]:>4.2f}x"
                         for k, w in (("b1", 9), ("b1_long", 8), (f"b{batch}", 10), ("prefill", 9))))
    print(f"\ntokens held: KV cache capacity at the same --kv-cache-gib; ppl: held-out perplexity over "
          f"{base_q['scored_tokens']} tokens in {args.context_tokens}-token sequences; tf agree: the bf16 engine's "
          f"greedy answers ({base_q['answer_tokens']} tokens) ranked first by each engine, teacher-forced (auto: "
          f"the floor, prefill vs decode rounding); b1 long: batch-1 decode after a {args.context_tokens}-token "
          f"prompt\ntotal {time.perf_counter() - started:.0f} s")
    return 0
