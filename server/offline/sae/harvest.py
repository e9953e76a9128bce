"""Harvest residual-stream activations through the serving engine: corpus -> vLLM prefill -> fp16 shards.

The rows come from the worker extension's harvest hook (`featurelens_harvest_start/stop`), i.e. the very
hook path the server encodes features from, so an SAE is trained on exactly the activations it will see.
Each prompt is prefilled with `max_tokens=1`; every prompt token's residual row is written by the worker's
`HarvestSink` as `L{layer}_{n:05d}.npy` (+ `_pos.npy`).

Resumable: the corpus is cut into chunks of ~`chunk_tokens` tokens. The sink is started and stopped around
each chunk (stop flushes it), and only then is the chunk recorded in `progress.json` together with the
shard count per layer. On restart, shards beyond the recorded counts (from an interrupted chunk) are deleted
and the remaining chunks are harvested; the sink numbers new shards after the existing ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"


def token_windows(texts: list[str], tokenizer: Any, max_len: int) -> list[list[int]]:
    """Tokenise each text and cut it into windows of at most max_len tokens (tails under 8 tokens dropped)."""
    windows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        for start in range(0, len(ids), max_len):
            piece = ids[start:start + max_len]
            if len(piece) >= 8:
                windows.append(piece)
    return windows


def chunk_windows(windows: list[list[int]], chunk_tokens: int) -> list[list[list[int]]]:
    chunks: list[list[list[int]]] = [[]]
    size = 0
    for w in windows:
        if size >= chunk_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(w)
        size += len(w)
    return [c for c in chunks if c]


def _shard_index(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def _drop_unrecorded_shards(out: Path, layers: list[int], recorded: dict[str, int]) -> None:
    for layer in layers:
        keep = recorded.get(str(layer), 0)
        for path in out.glob(f"L{layer}_*.npy"):
            if path.name.endswith(".tmp.npy") or _shard_index(path) >= keep:
                path.unlink()


def _write_progress(out: Path, progress: dict[str, Any]) -> None:
    tmp = out / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(progress, indent=1))
    os.replace(tmp, out / PROGRESS_FILE)


def harvest(corpus_path: str, model_path: str, out_dir: str, layers: list[int], max_len: int = 512,
            chunk_tokens: int = 65536, max_tokens: int | None = None) -> dict[str, Any]:
    from featurelens.server.offline.sae.corpus import read_corpus
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in read_corpus(corpus_path)]
    tok = AutoTokenizer.from_pretrained(model_path)
    windows = token_windows(texts, tok, max_len)
    if max_tokens is not None:
        kept, total = [], 0
        for w in windows:
            if total >= max_tokens:
                break
            kept.append(w)
            total += len(w)
        windows = kept
    chunks = chunk_windows(windows, chunk_tokens)
    settings = {"corpus": str(Path(corpus_path).resolve()), "model": model_path, "layers": sorted(layers),
                "max_len": max_len, "chunk_tokens": chunk_tokens, "chunks": len(chunks)}
    progress_path = out / PROGRESS_FILE
    progress: dict[str, Any] = {"settings": settings, "done": [], "shards": {}, "rows": 0}
    if progress_path.exists():
        progress = json.loads(progress_path.read_text())
        if progress["settings"] != settings:
            raise SystemExit(f"{out} holds a harvest with other settings {progress['settings']}; "
                             f"use another --out or delete it")
    _drop_unrecorded_shards(out, layers, progress["shards"])
    done = set(progress["done"])
    todo = [i for i in range(len(chunks)) if i not in done]
    total_tokens = sum(len(w) for w in windows)
    done_tokens = sum(len(w) for i in done for w in chunks[i])

    # Prefix caching off: a cached prefix is not recomputed, so its rows would never reach the hook.
    llm = LLM(model=model_path, enforce_eager=True, dtype="bfloat16", max_model_len=max(2048, max_len),
              enable_prefix_caching=False, worker_extension_cls="featurelens.server.worker.extension.FeatureLensWorkerExtension")
    llm.collective_rpc("featurelens_setup", args=({"saes": [], "endpoint": None},))
    params = SamplingParams(max_tokens=1, skip_reading_prefix_cache=True)
    bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="harvest")
    for i in todo:
        chunk = chunks[i]
        n_tokens = sum(len(w) for w in chunk)
        llm.collective_rpc("featurelens_harvest_start", args=(str(out), layers, chunk_tokens * 4))
        llm.generate([TokensPrompt(prompt_token_ids=w) for w in chunk], params, use_tqdm=False)
        result = llm.collective_rpc("featurelens_harvest_stop")[0]
        written = {str(k): int(v) for k, v in result["rows_written"].items()}
        if any(v != n_tokens for v in written.values()):
            raise RuntimeError(f"chunk {i}: sent {n_tokens} prompt tokens but the sink wrote {written} rows")
        progress["shards"] = {str(k): int(v) for k, v in result["shards"].items()}
        progress["done"].append(i)
        progress["rows"] += n_tokens
        _write_progress(out, progress)
        bar.update(n_tokens)
    bar.close()
    return progress
