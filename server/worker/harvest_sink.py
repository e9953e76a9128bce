"""Worker-side writer for activation harvesting: residual rows → float16 shards on disk.

Each shard `L{layer}_{n:05d}.npy` holds [rows, d_in] float16 and `…_pos.npy` the rows' token positions
(so position 0 / BOS rows, whose norms are outliers, can be filtered by the trainer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


class HarvestSink:
    def __init__(self, out_dir: str, layers: list[int], shard_rows: int) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.buffers: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {layer: [] for layer in layers}
        self.buffered = dict.fromkeys(layers, 0)
        # Continue numbering after existing shards so an interrupted harvest can resume.
        self.next_shard = {layer: len(list(self.dir.glob(f"L{layer}_*[0-9].npy"))) for layer in layers}
        self.rows_written = dict.fromkeys(layers, 0)

    def add(self, layer: int, stream: torch.Tensor, positions: torch.Tensor | None) -> None:
        n = stream.shape[0]
        pos = (positions[:n] if positions is not None else torch.full((n,), -1)).to(torch.int32)
        self.buffers[layer].append((stream.detach().to(torch.float16).cpu().numpy(), pos.cpu().numpy()))
        self.buffered[layer] += n
        if self.buffered[layer] >= self.shard_rows:
            self._flush(layer)

    def _flush(self, layer: int) -> None:
        if not self.buffers[layer]:
            return
        rows = np.concatenate([b[0] for b in self.buffers[layer]])
        pos = np.concatenate([b[1] for b in self.buffers[layer]])
        name = self.dir / f"L{layer}_{self.next_shard[layer]:05d}"
        tmp = name.with_suffix(".tmp.npy")
        np.save(self.dir / f"{name.name}_pos.npy", pos)
        np.save(tmp, rows)
        os.replace(tmp, f"{name}.npy")  # the rows file appears last, atomically: it marks the shard complete
        self.next_shard[layer] += 1
        self.rows_written[layer] += len(rows)
        self.buffers[layer], self.buffered[layer] = [], 0

    def close(self) -> dict[str, Any]:
        for layer in self.buffers:
            self._flush(layer)
        return {"rows_written": self.rows_written, "shards": self.next_shard}
