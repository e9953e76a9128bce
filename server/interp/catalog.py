"""The served feature catalog: an SAE's explanations (`explanations.json.gz`, built offline by
`featurelens sae explain`, see featurelens.server.offline.sae.explanations for the format), looked up by id
and searched by text for `SearchFeatures` / `ExplainFeature`.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "explanations.json.gz"
FORMAT_VERSION = 1
MARK_OPEN, MARK_CLOSE = "«", "»"


_WORD = re.compile(r"[\w']+", re.UNICODE)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


class FeatureCatalog:
    """The explanations of one SAE, loaded once, with a small word index for text search."""

    def __init__(self, data: dict[str, Any]) -> None:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"explanations format version {data.get('version')!r}, expected {FORMAT_VERSION}")
        self.sae_id: str = data["sae_id"]
        self.layer: int = int(data["layer"])
        self.features: list[dict[str, Any]] = data["features"]
        # word -> {feature: weight}: activating tokens 3, promoted tokens 2, each context containing it 0.25.
        # (Machine labels are made from the same tokens plus boilerplate words, so they are not indexed.)
        self._index: dict[str, dict[int, float]] = {}
        for feature in self.features:
            fid = feature["id"]
            weights: dict[str, float] = {}
            for text, _ in feature["examples"]:
                m = re.search(f"{MARK_OPEN}(.*?){MARK_CLOSE}", text)
                for w in _words(m.group(1) if m else ""):
                    weights[w] = max(weights.get(w, 0.0), 3.0)
                for w in _words(text):
                    weights[w] = weights.get(w, 0.0) + 0.25
            for _, token, _ in feature["promoted"]:
                for w in _words(token):
                    weights[w] = max(weights.get(w, 0.0), 2.0)
            for w, weight in weights.items():
                self._index.setdefault(w, {})[fid] = weight

    @classmethod
    def load(cls, sae_dir: str | Path) -> FeatureCatalog | None:
        path = Path(sae_dir) / FILENAME
        if not path.is_file():
            return None
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return cls(json.load(fh))

    def __len__(self) -> int:
        return len(self.features)

    def get(self, feature_id: int) -> dict[str, Any] | None:
        if 0 <= feature_id < len(self.features):
            return self.features[feature_id]
        return None

    def label(self, feature_id: int) -> str:
        feature = self.get(feature_id)
        return feature["label"] if feature else ""

    def search_text(self, query: str, limit: int) -> list[tuple[int, float]]:
        """Features ranked by how many query words their activating tokens, promoted tokens and contexts
        contain (weighted; a feature must match at least one word)."""
        scores: dict[int, float] = {}
        for word in _words(query):
            for fid, weight in self._index.get(word, {}).items():
                scores[fid] = scores.get(fid, 0.0) + weight
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:limit]


def rank_by_activation(indices: np.ndarray, values: np.ndarray, limit: int) -> list[tuple[int, float]]:
    """Features most active on a text, from its per-token top-k codes: score = mean activation over tokens."""
    totals: dict[int, float] = {}
    for idx_row, val_row in zip(indices.tolist(), values.tolist(), strict=True):
        for i, v in zip(idx_row, val_row, strict=True):
            if v > 0:
                totals[i] = totals.get(i, 0.0) + float(v)
    n = max(1, len(indices))
    ranked = sorted(((fid, total / n) for fid, total in totals.items()), key=lambda kv: (-kv[1], kv[0]))
    return ranked[:limit]
