"""Serving-side hallucination risk: load a probe file and score tokens as they stream, from sparse codes.

Probe file (`server/assets/probes/<probe_id>.json`, written by `featurelens risk train`):

    {"probe_id", "version": 1, "kind": "sparse_logreg", "model",
     "features": [{"layer", "sae_id", "feature_id", "weight"}],   # the nonzero weights: the explanation
     "bias", "pooling": "mean" | "max" | "last_prompt", "input_transform": "identity" | "log1p",
     "calibration": {"method": "platt", "a", "b"}, "thresholds": {"medium", "high"}, "metrics": {...}}

Per scored token t (a generated or response token; its codes are those at the position that predicted it):
x_t = the token's activations of the listed features (0 when not among its captured top-k; exact for TopK
SAEs, whose top-k *is* the whole code), transformed; p_t = x_1..x_t pooled (running mean, running max, or x_1
for "last_prompt"); risk_t = sigmoid(a · (bias + w·p_t) + b). The response risk is risk at the last token.
One implementation of these semantics: the probe file and `score`/`token_inputs` live in `risk_probe`.

Why here and not in the worker: the worker already ships exactly these sparse codes; scoring them on the
frontend needs no per-request state inside the worker (which would leak when a request is aborted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from featurelens.server.interp.risk_probe import Probe, load_probe, score, token_inputs
from featurelens.v1 import featurelens_pb2 as pb

PROBES_DIR = Path(__file__).resolve().parent.parent / "assets" / "probes"


@dataclass
class RiskProbe:
    """A loaded probe file plus the serving thresholds (which settings may override)."""

    probe: Probe
    medium: float
    high: float

    @classmethod
    def load(cls, path: str | Path) -> RiskProbe:
        try:
            probe = load_probe(path)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a usable probe file: {error}") from None
        return cls(probe, float(probe.thresholds["medium"]), float(probe.thresholds["high"]))

    @property
    def probe_id(self) -> str:
        return self.probe.probe_id

    @property
    def meta(self) -> dict[str, Any]:
        return self.probe.to_dict()

    @property
    def weights(self) -> dict[tuple[int, int], float]:
        return self.probe.weights

    @property
    def layers(self) -> dict[int, str]:
        """layer → sae_id the weights belong to."""
        return {f.layer: f.sae_id for f in self.probe.features}

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
    """The probe's pooled inputs over the scored tokens so far, updated one token at a time with the
    semantics of `risk_probe.running_risks` (the offline reference; a test checks both agree)."""

    def __init__(self, probe: RiskProbe) -> None:
        self.probe = probe
        self.state: dict[tuple[int, int], float] = {}
        self.count = 0

    def add(self, codes: dict[int, tuple[np.ndarray, np.ndarray]]) -> float:
        """`codes`: layer → (indices, values) of one token. Returns risk after this token."""
        self.count += 1
        x = token_inputs(self.probe.probe, {layer: [(i, v) for i, v in zip(codes[layer][0].tolist(),
                                                                          codes[layer][1].tolist(), strict=True)
                                                    if v > 0.0]
                                            for layer in self.probe.layers})
        pooling, t = self.probe.probe.pooling, self.count
        if pooling == "mean":
            for key in self.state.keys() | x.keys():
                self.state[key] = self.state.get(key, 0.0) + (x.get(key, 0.0) - self.state.get(key, 0.0)) / t
        elif pooling == "max":
            for key, value in x.items():
                self.state[key] = max(self.state.get(key, 0.0), value)
        elif t == 1:  # last_prompt: the first scored token's codes are the last prompt position's
            self.state = x
        return self.risk()

    def pooled(self) -> dict[tuple[int, int], float]:
        return dict(self.state)

    def risk(self) -> float:
        return score(self.probe.probe, self.state)

    def response_risk(self, explain: Any = None, top: int = 5) -> pb.ResponseRisk:
        value = self.risk()
        out = pb.ResponseRisk(score=value, label=self.probe.label(value), probe_id=self.probe.probe_id)
        weights = self.probe.weights
        ranked = sorted(((weights[key] * v, key, v) for key, v in self.state.items() if v != 0.0 and key in weights),
                        key=lambda item: -abs(item[0]))
        for contribution, (layer, feature), v in ranked[:top]:
            out.top_features.add(layer=layer, feature_id=feature, activation=v, weight=weights[(layer, feature)],
                                 contribution=contribution, explanation=explain(layer, feature) if explain else "")
        return out


def default_probe_path() -> Path | None:
    found = sorted(PROBES_DIR.glob("*.json"))
    return found[-1] if found else None
