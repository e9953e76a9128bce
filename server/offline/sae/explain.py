"""`featurelens sae explain`: explanations of a trained SAE from the harvest it was trained on (no model pass).

Each harvest chunk is flushed as exactly one shard per layer (the sink is stopped after every chunk), so shard
j holds the rows of the j-th finished chunk's windows, which `align_rows` replays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def harvest_chunks(shard_dir: Path) -> list[list[list[int]]]:
    """The windows of each finished chunk, in the order the chunks (= shards) were written."""
    from featurelens.server.offline.sae.corpus import read_corpus
    from featurelens.server.offline.sae.harvest import PROGRESS_FILE, chunk_windows, token_windows
    from transformers import AutoTokenizer

    progress = json.loads((shard_dir / PROGRESS_FILE).read_text())
    settings = progress["settings"]
    tok = AutoTokenizer.from_pretrained(settings["model"])
    texts = [r["text"] for r in read_corpus(settings["corpus"])]
    chunks = chunk_windows(token_windows(texts, tok, settings["max_len"]), settings["chunk_tokens"])
    return [chunks[i] for i in progress["done"]]


# Checkpoint names of the unembedding (its own, else the tied embedding) and of the final norm's scale, first
# present wins: Llama-style families (Qwen, Mistral, Gemma, Phi-3, OLMo 2), GPT-2, GPT-NeoX.
UNEMBEDDING_KEYS = ("lm_head.weight", "embed_out.weight", "model.embed_tokens.weight", "transformer.wte.weight",
                    "gpt_neox.embed_in.weight")
FINAL_NORM_KEYS = ("model.norm.weight", "transformer.ln_f.weight", "gpt_neox.final_layer_norm.weight")


def _unembedding(model_path: str) -> tuple[np.ndarray, np.ndarray | None]:
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in (*UNEMBEDDING_KEYS, *FINAL_NORM_KEYS):
                if name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    tensors[name] = fh.get_tensor(name).float().numpy()
    unembed = next((tensors[k] for k in UNEMBEDDING_KEYS if k in tensors), None)
    if unembed is None:
        raise SystemExit(f"{model_path}: no unembedding ({', '.join(UNEMBEDDING_KEYS)})")
    return unembed, next((tensors[k] for k in FINAL_NORM_KEYS if k in tensors), None)


def explain_from_harvest(sae_dir: str, shard_dir: str, model_path: str, max_rows: int = 300_000,
                         n_examples: int = 6) -> Path:
    import torch
    from featurelens.server.interp.sae import load_sae
    from featurelens.server.offline.sae.explanations import (
        Codes,
        align_rows,
        build_explanations,
        iter_harvest,
        write_explanations,
    )
    from tqdm import tqdm
    from transformers import AutoTokenizer

    sae = load_sae(sae_dir, dtype=torch.float32)
    layer = sae.cfg.layer
    shards = Path(shard_dir)
    chunks = harvest_chunks(shards)
    windows: list[list[int]] = []
    parts_i, parts_v, parts_w, parts_p = [], [], [], []
    total = 0
    bar = tqdm(total=max_rows, unit="row", desc=f"encode L{layer}")
    for j, (rows, pos) in enumerate(iter_harvest(shards, layer)):
        if j >= len(chunks) or total >= max_rows:
            break
        parts_w.append(align_rows(chunks[j], pos) + len(windows))  # whole shards only: each is one chunk
        windows.extend(chunks[j])
        parts_p.append(pos)
        for start in range(0, len(rows), 8192):
            x = torch.from_numpy(rows[start:start + 8192]).float()
            values, indices = sae.encode_topk(x)
            values[torch.from_numpy(pos[start:start + 8192] == 0)] = 0  # window-start rows: attention-sink outliers
            parts_i.append(indices.to(torch.int32).numpy())
            parts_v.append(values.numpy())
            bar.update(len(x))
        total += len(rows)
    bar.close()
    tok = AutoTokenizer.from_pretrained(model_path)
    unembed, final_norm = _unembedding(model_path)
    data = build_explanations(sae_id=Path(sae_dir).resolve().name, layer=layer,
                              codes=Codes(indices=np.concatenate(parts_i), values=np.concatenate(parts_v)),
                              windows=windows, window_ids=np.concatenate(parts_w), positions=np.concatenate(parts_p),
                              decode=tok.decode, w_dec=sae.W_dec.detach().float().numpy(), unembed=unembed,
                              final_norm=final_norm, n_examples=n_examples)
    return write_explanations(data, sae_dir)
