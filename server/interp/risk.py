"""Serving-side hallucination risk: load a probe file and score tokens as they stream, from sparse codes.

Probe file (`server/assets/probes/<probe_id>.json`, written by `featurelens risk train`):

    {"probe_id", "version": 1, "kind": "sparse_logreg", "model",
     "features": [{"layer", "sae_id", "feature_id", "weight"}],   # the nonzero weights: the explanation
     "bias", "pooling": "mean", "input_transform": "identity" | "log1p",
     "calibration": {"method": "platt", "a", "b"}, "thresholds": {"medium", "high"}, "metrics": {...}}

Per scored token t (a generated or response token; its codes are those at the position that predicted it):
x_t = the token's activations of the listed features (0 when not among its captured top-k; exact for TopK
SAEs, whose top-k *is* the whole code), transformed; p_t = running mean of x_1..x_t;
risk_t = sigmoid(a · (bias + w·p_t) + b). The response risk is risk at the last token.

Why here and not in the worker: the worker already ships exactly these sparse codes; scoring them on the
frontend needs no per-request state inside the worker (which would leak when a request is aborted).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from featurelens.v1 import featurelens_pb2 as pb

PROBES_DIR = Path(__file__).resolve().parent.parent / "assets" / "probes"


@dataclass
class RiskProbe:
    probe_id: str
    layers: dict[int, str]  # layer → sae_id the weights belong to
    weights: dict[tuple[int, int], float]  # (layer, feature_id) → weight
    bias: float
    transform: str
    a: float
    b: float
    medium: float
    high: float
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> RiskProbe:
        raw = json.loads(Path(path).read_text())
        if raw.get("kind") != "sparse_logreg" or raw.get("pooling", "mean") != "mean":
            raise ValueError(f"{path}: unsupported probe kind/pooling {raw.get('kind')}/{raw.get('pooling')}")
        layers: dict[int, str] = {}
        weights: dict[tuple[int, int], float] = {}
        for f in raw["features"]:
            layers[int(f["layer"])] = f["sae_id"]
            weights[(int(f["layer"]), int(f["feature_id"]))] = float(f["weight"])
        transform = raw.get("input_transform", "identity")
        if transform not in ("identity", "log1p"):
            raise ValueError(f"{path}: unknown input_transform {transform!r}")
        calibration = raw.get("calibration") or {"a": 1.0, "b": 0.0}
        thresholds = raw.get("thresholds") or {"medium": 0.4, "high": 0.7}
        return cls(raw["probe_id"], layers, weights, float(raw["bias"]), transform, float(calibration["a"]),
                   float(calibration["b"]), float(thresholds["medium"]), float(thresholds["high"]), raw)

    def check_saes(self, saes: dict[int, Any]) -> None:
        for layer, sae_id in self.layers.items():
            entry = saes.get(layer)
            if entry is None or entry.sae_id != sae_id:
                loaded = entry.sae_id if entry else "none"
                raise ValueError(f"risk probe {self.probe_id} needs SAE {sae_id!r} at layer {layer}; loaded: {loaded}")

    def label(self, risk: float) -> int:
        if risk >= self.high:
            return pb.RISK_LABEL_HIGH
        return pb.RISK_LABEL_MEDIUM if risk >= self.medium else pb.RISK_LABEL_LOW

    def start(self) -> RunningRisk:
        return RunningRisk(self)


class RunningRisk:
    """Running mean of the probe's inputs over the scored tokens so far."""

    def __init__(self, probe: RiskProbe) -> None:
        self.probe = probe
        self.sums: dict[tuple[int, int], float] = dict.fromkeys(probe.weights, 0.0)
        self.count = 0

    def add(self, codes: dict[int, tuple[np.ndarray, np.ndarray]]) -> float:
        """`codes`: layer → (indices, values) of one token. Returns risk after this token."""
        self.count += 1
        for layer in self.probe.layers:
            indices, values = codes[layer]
            for index, value in zip(indices.tolist(), values.tolist(), strict=True):
                key = (layer, index)
                if key in self.sums and value > 0.0:
                    self.sums[key] += math.log1p(value) if self.probe.transform == "log1p" else value
        return self.risk()

    def pooled(self) -> dict[tuple[int, int], float]:
        return {key: total / max(1, self.count) for key, total in self.sums.items()}

    def risk(self) -> float:
        p = self.probe
        logit = p.bias + sum(p.weights[key] * value for key, value in self.pooled().items())
        z = p.a * logit + p.b
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def response_risk(self, explain: Any = None, top: int = 5) -> pb.ResponseRisk:
        score = self.risk()
        out = pb.ResponseRisk(score=score, label=self.probe.label(score), probe_id=self.probe.probe_id)
        contributions = sorted(((self.probe.weights[key] * value, key, value) for key, value in self.pooled().items()
                                if value != 0.0), key=lambda item: -abs(item[0]))
        for contribution, (layer, feature), value in contributions[:top]:
            out.top_features.add(layer=layer, feature_id=feature, activation=value, weight=self.probe.weights[(layer, feature)],
                                 contribution=contribution, explanation=explain(layer, feature) if explain else "")
        return out


def default_probe_path() -> Path | None:
    found = sorted(PROBES_DIR.glob("*.json"))
    return found[-1] if found else None
