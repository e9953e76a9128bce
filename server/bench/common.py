"""What several benchmarks share: the prompt set, the flags they have in common and the streaming driver."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from featurelens.server.paths import ASSETS_DIR

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn.", "What is a binary search tree?",
    "Give three tips for learning a language.", "Describe the water cycle.", "What causes inflation?",
    "Summarise the plot of Hamlet.", "How do vaccines work?", "What is the Pythagorean theorem?",
    "Name some uses of copper.", "Why do cats purr?", "How does a refrigerator work?",
]


def prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(n)]


def machine() -> str:
    """What the figures were measured on, for the header: CPU model, family/model, the ISA features that change
    the kernels' speed, and the GPU when there is one."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    isa = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"), ("avx512f", "AVX-512"),
                                   ("avx2", "AVX2")) if flag in flags]
    cpu = (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} model "
           f"{info.get('model', '?')}; {', '.join(isa[:2]) or 'no AVX2'}; {os.cpu_count()} cores)")
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}; host {cpu}"
    except ImportError:
        pass
    return cpu


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"featurelens bench {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="default", help="'default', a model folder or a hub id")


def add_load(ap: argparse.ArgumentParser, *, num_prompts: int = 64, max_new_tokens: int = 64,
             concurrency_help: str = "levels to measure (repeatable; default 1 and 32)") -> None:
    ap.add_argument("--num-prompts", type=int, default=num_prompts)
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--concurrency", type=int, action="append", help=concurrency_help)


def add_rounds(ap: argparse.ArgumentParser, default: int = 2) -> None:
    ap.add_argument("--rounds", type=int, default=default, help="timed rounds (the median is printed)")


async def drive(client: Any, texts: list[str], max_new_tokens: int, concurrency: int) -> dict:
    """Stream every text through `client` with `concurrency` in flight: tokens/s and median TTFT."""
    from featurelens.client import pb

    queue = list(texts)
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


def saes_for_bench() -> list[str]:
    """Shipped SAEs when present, else random ones built here (speed does not depend on training)."""
    shipped = sorted((ASSETS_DIR / "saes").glob("*/cfg.json"))
    if shipped:
        return [str(p.parent) for p in shipped]
    import torch
    from featurelens.server.interp.sae import SAE_CLASSES, SaeConfig, layer_to_hook_name, save_sae

    root = Path(tempfile.mkdtemp(prefix="bench-saes-"))
    paths = []
    for layer in (12, 24):
        cfg = SaeConfig(architecture="topk", d_in=576, d_sae=8192, k=32, hook_name=layer_to_hook_name(layer))
        sae = SAE_CLASSES["topk"](cfg)
        sae.W_dec.data = torch.nn.functional.normalize(torch.randn(8192, 576), dim=-1)
        sae.W_enc.data = sae.W_dec.data.T.contiguous()
        save_sae(sae, root / f"random-l{layer}")
        paths.append(str(root / f"random-l{layer}"))
    return paths
