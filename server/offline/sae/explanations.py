"""Feature explanations for a shipped SAE: top activating contexts, density, logit lens, a machine-made label,
stored compactly beside the SAE (`explanations.json.gz`) and searched by `SearchFeatures`.

Built offline by `featurelens sae explain` from the same harvested shards the SAE was trained on (so from the
serving hook path), without another model pass: the harvest writes each prompt's rows with their positions,
so the token behind every row is recovered by replaying the harvest's windows through vLLM's scheduling order
(`align_rows`); rows that cannot be replayed are an error, never a guess.

File format (gzip JSON, version 1):
    {"version": 1, "sae_id", "layer", "d_sae", "tokens_scanned", "context": [left, right],
     "features": [{"id", "density", "max_activation", "label", "label_machine_generated",
                   "examples": [[text with the activating token marked «tok», activation], ...],
                   "promoted": [[token_id, token_text, logit], ...], "suppressed": [...]}, ...]}
Labels are machine-made from the examples and the logit lens (no language model writes them), and say so.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from featurelens.server.interp.catalog import FILENAME, FORMAT_VERSION, MARK_CLOSE, MARK_OPEN

LEFT, RIGHT = 14, 4  # context tokens shown before / after the activating token


def align_rows(windows: Sequence[Sequence[int]], positions: np.ndarray) -> np.ndarray:
    """Which window every harvested row belongs to, given the harvest's windows in submission order and the
    rows' positions. vLLM starts prompts in submission order (FCFS) but chunked prefill may split a long one
    across steps, with other prompts between its pieces: a row at position 0 starts the next window; a row
    at position p > 0 continues the earliest unfinished window that has exactly p rows so far. Raises
    ValueError where the rows cannot be such a replay (then no explanation is built from a guess)."""
    positions = np.asarray(positions, dtype=np.int64)
    window_ids = np.empty(len(positions), dtype=np.int64)
    done: dict[int, int] = {}  # unfinished window -> rows seen so far (dicts keep submission order)
    next_window, r = 0, 0
    while r < len(positions):
        p = int(positions[r])
        if p == 0:
            if next_window >= len(windows):
                raise ValueError(f"row {r} starts a window, but all {len(windows)} windows have started")
            wi, next_window = next_window, next_window + 1
        else:
            wi = next((w for w, n in done.items() if n == p), -1)
            if wi < 0:
                raise ValueError(f"row {r} at position {p} continues no unfinished window")
        # Consume the consecutive positions that belong to this window.
        end = r + 1
        limit = r + len(windows[wi]) - p
        while end < min(limit, len(positions)) and positions[end] == positions[end - 1] + 1:
            end += 1
        window_ids[r:end] = wi
        seen = p + end - r
        if seen == len(windows[wi]):
            done.pop(wi, None)
        else:
            done[wi] = seen
        r = end
    if done or next_window != len(windows):
        raise ValueError(f"the rows end with windows unfinished ({len(done)}) or unstarted "
                         f"({len(windows) - next_window}): they do not replay the corpus windows")
    return window_ids


@dataclass
class Codes:
    """Sparse codes of every row: `indices[r, j]` fires with `values[r, j]` (0 = not active)."""

    indices: np.ndarray  # [rows, k] int32
    values: np.ndarray  # [rows, k] float32


def top_examples(codes: Codes, window_of_row: np.ndarray, d_sae: int, n: int = 6,
                 scan: int = 400) -> list[list[tuple[int, float]]]:
    """For each latent, up to n (row, activation) pairs of its highest activations, at most one per window."""
    rows = np.repeat(np.arange(codes.indices.shape[0], dtype=np.int64), codes.indices.shape[1])
    latents = codes.indices.reshape(-1).astype(np.int64)
    values = codes.values.reshape(-1)
    active = values > 0
    rows, latents, values = rows[active], latents[active], values[active]
    order = np.lexsort((-values, latents))  # by latent, then by activation descending
    latents, rows, values = latents[order], rows[order], values[order]
    starts = np.searchsorted(latents, np.arange(d_sae + 1))
    out: list[list[tuple[int, float]]] = []
    for f in range(d_sae):
        picked: list[tuple[int, float]] = []
        seen: set[int] = set()
        for i in range(starts[f], min(starts[f + 1], starts[f] + scan)):
            window = int(window_of_row[rows[i]])
            if window in seen:
                continue
            seen.add(window)
            picked.append((int(rows[i]), float(values[i])))
            if len(picked) == n:
                break
        out.append(picked)
    return out


def clean_text(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", " ")


def context_text(decode: Any, window: Sequence[int], position: int) -> str:
    """`left «token» right` around one token of a window."""
    left = decode(list(window[max(0, position - LEFT):position]))
    mid = decode([int(window[position])])
    right = decode(list(window[position + 1:position + 1 + RIGHT]))
    return clean_text(f"{left}{MARK_OPEN}{mid}{MARK_CLOSE}{right}")


def logit_lens(w_dec: np.ndarray, unembed: np.ndarray, final_norm: np.ndarray | None,
               n: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per latent: (top-n promoted token ids, their logits, top-n suppressed ids, their logits) of its unit
    decoder direction read through the final norm's gain and the unembedding."""
    import torch

    directions = torch.from_numpy(w_dec).float()
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if final_norm is not None:
        directions = directions * torch.from_numpy(final_norm).float()
    logits = directions @ torch.from_numpy(unembed).float().T  # [d_sae, vocab]
    top = logits.topk(n, dim=1)
    bottom = logits.topk(n, dim=1, largest=False)
    return top.indices.numpy(), top.values.numpy(), bottom.indices.numpy(), bottom.values.numpy()


def machine_label(examples: list[list[Any]], promoted: list[list[Any]]) -> str:
    """A short heuristic label: the tokens it fires on most, and what it pushes the next token towards."""
    fired: Counter[str] = Counter()
    for text, _ in examples:
        m = re.search(f"{MARK_OPEN}(.*?){MARK_CLOSE}", text)
        if m and m.group(1).strip():
            fired[m.group(1).strip()] += 1
    on = ", ".join(repr(t) for t, _ in fired.most_common(2))
    towards = ", ".join(repr(t[1].strip()) for t in promoted[:2] if t[1].strip())
    if on and towards:
        return f"fires on {on}; promotes {towards}"
    return f"fires on {on}" if on else (f"promotes {towards}" if towards else "")


def build_explanations(*, sae_id: str, layer: int, codes: Codes, windows: Sequence[Sequence[int]],
                       window_ids: np.ndarray, positions: np.ndarray, decode: Any, w_dec: np.ndarray,
                       unembed: np.ndarray, final_norm: np.ndarray | None, n_examples: int = 6,
                       n_tokens: int = 10) -> dict[str, Any]:
    """Explanations of every latent from its codes on rows r = (window_ids[r], positions[r])."""
    d_sae = w_dec.shape[0]
    n_rows = len(window_ids)
    counts = np.bincount(codes.indices[codes.values > 0].reshape(-1).astype(np.int64), minlength=d_sae)
    maxima = np.zeros(d_sae, dtype=np.float32)
    np.maximum.at(maxima, codes.indices.reshape(-1).astype(np.int64), codes.values.reshape(-1))
    examples = top_examples(codes, window_ids, d_sae, n_examples)
    p_ids, p_vals, s_ids, s_vals = logit_lens(w_dec, unembed, final_norm, n_tokens)
    token_text: dict[int, str] = {}

    def tok(i: int) -> str:
        if i not in token_text:
            token_text[i] = clean_text(decode([i]))
        return token_text[i]

    features = []
    for f in range(d_sae):
        ex = [[context_text(decode, windows[window_ids[row]], int(positions[row])), round(act, 3)]
              for row, act in examples[f]]
        promoted = [[int(i), tok(int(i)), round(float(v), 3)] for i, v in zip(p_ids[f], p_vals[f], strict=True)]
        suppressed = [[int(i), tok(int(i)), round(float(v), 3)] for i, v in zip(s_ids[f], s_vals[f], strict=True)]
        features.append({"id": f, "density": float(counts[f] / max(1, n_rows)),
                         "max_activation": round(float(maxima[f]), 3), "label": machine_label(ex, promoted),
                         "label_machine_generated": True, "examples": ex, "promoted": promoted,
                         "suppressed": suppressed})
    return {"version": FORMAT_VERSION, "sae_id": sae_id, "layer": layer, "d_sae": d_sae,
            "tokens_scanned": int(n_rows), "context": [LEFT, RIGHT], "features": features}


def write_explanations(data: dict[str, Any], sae_dir: str | Path) -> Path:
    path = Path(sae_dir) / FILENAME
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as fh:
        json.dump(data, fh, ensure_ascii=False, separators=(",", ":"))
    return path


def iter_harvest(shard_dir: str | Path, layer: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows float16 [n, d_in], positions [n]) of one layer's shards, in harvest order."""
    for path in sorted(Path(shard_dir).glob(f"L{layer}_[0-9][0-9][0-9][0-9][0-9].npy")):
        yield np.load(path), np.load(path.with_name(path.stem + "_pos.npy"))
