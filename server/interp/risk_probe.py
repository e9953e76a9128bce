"""Hallucination-risk probe: pooled SAE features → sparse logistic regression → Platt-calibrated probability.

The probe file (`server/assets/probes/<probe_id>.json`) is all the server needs; its semantics, implemented
by `running_risks` below and mirrored by the server:

  per scored token t (response tokens; a token's codes are those of the position that predicted it)
    x_t      = activations of the listed (layer, feature_id) pairs in that token's top-k (0 when absent),
               passed through `input_transform` ("identity" | "log1p")
    p_t      = pooled x_1..x_t: "mean" (running mean), "max" (running max) or "last_prompt" (x_1: the codes
               of the last prompt position, which predicted the first response token)
    logit_t  = bias + Σ weight · p_t
    risk_t   = sigmoid(a · logit_t + b)          (calibration: Platt)
  response risk = risk at the last scored token; label HIGH ≥ thresholds.high > MEDIUM ≥ thresholds.medium.

Version 2 (version 1 files load unchanged) adds two optional parts:
  "terms": [{"name", "weight"}]   named uncertainty terms of the scored tokens' log-probabilities so far
               (`TERMS`, `term_values`): logit_t += Σ weight · term(logprob_1..t)
  "ood": how far the response lies from the training data, in [0, 1]; it does not change the risk. Methods:
     {"method": "nearest_cosine", "layer", "k", "reference_file", "n_reference", "reference"}
               1 − the largest cosine similarity between the response's code vector (mean over its scored
               tokens of their top-k codes at `layer`, fired values) and the training answers' code vectors,
               stored beside the file in `reference_file` (an .npz: CSR rows, unit norm; `OodReference`).
               0 = an answer exactly like one seen in training (`ood_nearest`).
     {"method": "unseen_share", "min_count", "k", "unseen": {layer: [feature_id, ...]}}
               the share of the scored tokens' top-k codes that fall on features seen in fewer than
               min_count training answers (`ood_share`).

Scoring needs only the standard library; training (numpy/scipy/scikit-learn) lives in
featurelens.server.offline.risk.train.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

POOLINGS = ("mean", "max", "last_prompt")
# Uncertainty terms over the scored tokens' log-probabilities (of the tokens chosen): the answer's mean and
# worst surprise, and the first token's (where a made-up answer usually commits).
TERMS = ("neg_mean_logprob", "neg_min_logprob", "neg_first_logprob")
VERSIONS = (1, 2)
OOD_METHODS = ("nearest_cosine", "unseen_share")
TRANSFORMS = ("identity", "log1p")
FeatureKey = tuple[int, int]  # (layer, feature_id)


@dataclass
class ProbeFeature:
    layer: int
    sae_id: str
    feature_id: int
    weight: float


@dataclass
class ProbeTerm:
    name: str
    weight: float


@dataclass
class Probe:
    probe_id: str
    features: list[ProbeFeature]
    bias: float
    pooling: str = "mean"
    input_transform: str = "identity"
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "platt", "a": 1.0, "b": 0.0})
    thresholds: dict[str, float] = field(default_factory=lambda: {"medium": 0.4, "high": 0.7})
    metrics: dict[str, Any] = field(default_factory=dict)
    model: str = "SmolLM2-135M-Instruct"
    version: int = 2
    kind: str = "sparse_logreg"
    terms: list[ProbeTerm] = field(default_factory=list)
    ood: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for term in self.terms:
            if term.name not in TERMS:
                raise ValueError(f"unknown uncertainty term {term.name!r}; known: {TERMS}")
        if self.ood is not None and self.ood.get("method") not in OOD_METHODS:
            raise ValueError(f"unknown ood method {self.ood.get('method')!r}; known: {OOD_METHODS}")
        self.ood_reference: OodReference | None = None  # nearest_cosine: loaded from reference_file
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.input_transform not in TRANSFORMS:
            raise ValueError(f"input_transform must be one of {TRANSFORMS}, got {self.input_transform!r}")
        self._weights = {(f.layer, f.feature_id): f.weight for f in self.features}

    @property
    def weights(self) -> dict[FeatureKey, float]:
        return self._weights

    @property
    def needs_logprobs(self) -> bool:
        return bool(self.terms)

    def ood_sets(self) -> dict[int, frozenset[int]]:
        """layer → the feature ids the training data (almost) never saw; empty unless "unseen_share"."""
        if not self.ood or self.ood.get("method") != "unseen_share":
            return {}
        return {int(layer): frozenset(int(i) for i in ids) for layer, ids in self.ood["unseen"].items()}

    def to_dict(self) -> dict[str, Any]:
        out = {"probe_id": self.probe_id, "version": self.version, "kind": self.kind, "model": self.model,
               "features": [asdict(f) for f in self.features], "bias": self.bias, "pooling": self.pooling,
               "input_transform": self.input_transform, "calibration": self.calibration,
               "thresholds": self.thresholds, "metrics": self.metrics}
        if self.version >= 2:
            out["terms"] = [asdict(t) for t in self.terms]
            out["ood"] = self.ood
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Probe:
        if data.get("kind", "sparse_logreg") != "sparse_logreg" or data.get("version", 1) not in VERSIONS:
            raise ValueError(f"unsupported probe kind/version: {data.get('kind')}/{data.get('version')}")
        return cls(probe_id=data["probe_id"], features=[ProbeFeature(**f) for f in data["features"]],
                   bias=float(data["bias"]), pooling=data.get("pooling", "mean"),
                   input_transform=data.get("input_transform", "identity"),
                   calibration=dict(data.get("calibration") or {"method": "platt", "a": 1.0, "b": 0.0}),
                   thresholds=dict(data.get("thresholds") or {"medium": 0.4, "high": 0.7}),
                   metrics=dict(data.get("metrics") or {}), model=data.get("model", ""),
                   version=int(data.get("version", 1)), kind=data.get("kind", "sparse_logreg"),
                   terms=[ProbeTerm(name=t["name"], weight=float(t["weight"])) for t in data.get("terms") or ()],
                   ood=dict(data["ood"]) if data.get("ood") else None)


@dataclass
class OodReference:
    """The training answers' code vectors for "nearest_cosine": CSR rows (indptr, indices, values), each of
    unit norm, over `d` features."""

    indptr: Any
    indices: Any
    values: Any
    d: int

    def rows(self) -> list[dict[int, float]]:
        ptr, idx, val = (list(map(int, self.indptr)), [int(i) for i in self.indices], [float(v) for v in self.values])
        return [dict(zip(idx[ptr[i]:ptr[i + 1]], val[ptr[i]:ptr[i + 1]], strict=True)) for i in range(len(ptr) - 1)]

    def save(self, path: Path) -> None:
        import numpy as np

        with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a name without it
            np.savez_compressed(f, indptr=np.asarray(self.indptr, dtype=np.int32),
                                indices=np.asarray(self.indices, dtype=np.uint16 if self.d <= 65536 else np.int32),
                                values=np.asarray(self.values, dtype=np.float16), d=np.asarray(self.d))

    @classmethod
    def load(cls, path: Path) -> OodReference:
        import numpy as np

        with np.load(path) as z:
            return cls(z["indptr"].astype(np.int64), z["indices"].astype(np.int64), z["values"].astype(np.float32),
                       int(z["d"]))


def save_probe(probe: Probe, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if probe.ood_reference is not None and probe.ood:
        probe.ood["reference_file"] = f"{path.stem}.ood.npz"
        probe.ood_reference.save(path.parent / probe.ood["reference_file"])
    path.write_text(json.dumps(probe.to_dict(), indent=1) + "\n")
    return path


def load_probe(path: str | Path) -> Probe:
    path = Path(path)
    probe = Probe.from_dict(json.loads(path.read_text()))
    if probe.ood and probe.ood.get("method") == "nearest_cosine":
        probe.ood_reference = OodReference.load(path.parent / probe.ood["reference_file"])
    return probe


# ---------------------------------------------------------------------------------------------- scoring

def _transform(value: float, kind: str) -> float:
    return math.log1p(value) if kind == "log1p" else value


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def calibrate(probe: Probe, logit: float) -> float:
    return _sigmoid(probe.calibration.get("a", 1.0) * logit + probe.calibration.get("b", 0.0))


def term_values(logprobs: Sequence[float]) -> dict[str, float]:
    """The uncertainty terms of the scored tokens' log-probabilities so far (0 before any token)."""
    if not logprobs:
        return dict.fromkeys(TERMS, 0.0)
    return {"neg_mean_logprob": -sum(logprobs) / len(logprobs), "neg_min_logprob": -min(logprobs),
            "neg_first_logprob": -logprobs[0]}


def terms_logit(probe: Probe, logprobs: Sequence[float] | None) -> float:
    """Σ weight · term over the probe's uncertainty terms (0 for a probe without terms)."""
    if not probe.terms:
        return 0.0
    if logprobs is None:
        raise ValueError(f"probe {probe.probe_id} has uncertainty terms: it needs the tokens' logprobs")
    values = term_values(logprobs)
    return sum(t.weight * values[t.name] for t in probe.terms)


def raw_logit(probe: Probe, pooled: Mapping[FeatureKey, float], logprobs: Sequence[float] | None = None) -> float:
    """bias + Σ w·p over the probe's features (+ its uncertainty terms); `pooled` maps (layer, feature_id) →
    pooled (transformed) value."""
    return probe.bias + sum(w * pooled.get(key, 0.0) for key, w in probe.weights.items()) + \
        terms_logit(probe, logprobs)


def score(probe: Probe, pooled: Mapping[FeatureKey, float], logprobs: Sequence[float] | None = None) -> float:
    """Calibrated risk from already pooled, already transformed features (and the logprobs so far)."""
    return calibrate(probe, raw_logit(probe, pooled, logprobs))


def ood_share(unseen: Mapping[int, frozenset[int]], tokens: Sequence[Mapping[int, Iterable[tuple[int, float]]]],
              k: int) -> float:
    """The share of the tokens' top-k codes (the first k of each, fired: value > 0) at the `unseen` layers that
    fall on unseen features: count / (tokens × k × layers). 0 without tokens or layers."""
    if not tokens or not unseen:
        return 0.0
    hits = 0
    for codes in tokens:
        for layer, ids in unseen.items():
            hits += sum(1 for feature_id, value in list(codes.get(layer, ()))[:k] if value > 0 and feature_id in ids)
    return hits / (len(tokens) * k * len(unseen))


def token_inputs(probe: Probe, token_codes: Mapping[int, Iterable[tuple[int, float]]]) -> dict[FeatureKey, float]:
    """x_t: one token's top-k codes {layer: [(feature_id, activation), ...]} restricted to the probe's features."""
    x: dict[FeatureKey, float] = {}
    for layer, pairs in token_codes.items():
        for feature_id, value in pairs:
            if (layer, feature_id) in probe.weights:
                x[(layer, feature_id)] = _transform(float(value), probe.input_transform)
    return x


def pooled_codes(tokens: Sequence[Mapping[int, Iterable[tuple[int, float]]]], layer: int, k: int) -> dict[int, float]:
    """The response's code vector for "nearest_cosine": mean over the tokens of their first k codes at `layer`
    (fired: value > 0)."""
    pooled: dict[int, float] = {}
    for codes in tokens:
        for feature_id, value in list(codes.get(layer, ()))[:k]:
            if value > 0:
                pooled[int(feature_id)] = pooled.get(int(feature_id), 0.0) + float(value) / len(tokens)
    return pooled


def ood_nearest(reference: OodReference, tokens: Sequence[Mapping[int, Iterable[tuple[int, float]]]], layer: int,
                k: int) -> float:
    """1 − max cosine similarity between the tokens' code vector and the reference rows (0 without tokens)."""
    x = pooled_codes(tokens, layer, k)
    norm = math.sqrt(sum(v * v for v in x.values()))
    if not tokens or norm == 0.0:
        return 0.0
    best = max((sum(v * row.get(f, 0.0) for f, v in x.items()) for row in reference.rows()), default=0.0)
    return 1.0 - max(0.0, min(1.0, best / norm))


def running_risks(probe: Probe, tokens: Sequence[Mapping[int, Iterable[tuple[int, float]]]],
                  logprobs: Sequence[float] | None = None) -> list[float]:
    """risk_t after each scored token (the server's streaming semantics); the last one is the response risk.
    `logprobs`: the scored tokens' log-probabilities, needed by a probe with uncertainty terms."""
    if probe.terms and (logprobs is None or len(logprobs) < len(tokens)):
        raise ValueError(f"probe {probe.probe_id} has uncertainty terms: pass one logprob per scored token")
    pooled: dict[FeatureKey, float] = {}
    risks = []
    for t, codes in enumerate(tokens, start=1):
        x = token_inputs(probe, codes)
        if probe.pooling == "mean":
            for key in pooled.keys() | x.keys():
                pooled[key] = pooled.get(key, 0.0) + (x.get(key, 0.0) - pooled.get(key, 0.0)) / t
        elif probe.pooling == "max":
            for key, value in x.items():
                pooled[key] = max(pooled.get(key, 0.0), value)
        elif t == 1:  # last_prompt: the first scored token's codes are those of the last prompt position
            pooled = x
        risks.append(score(probe, pooled, None if logprobs is None else logprobs[:t]))
    return risks


def risk_label(probe: Probe, risk: float) -> str:
    if risk >= probe.thresholds["high"]:
        return "HIGH"
    return "MEDIUM" if risk >= probe.thresholds["medium"] else "LOW"


class Contribution(TypedDict):
    """One row of `contributions`."""

    layer: int
    sae_id: str
    feature_id: int
    activation: float
    weight: float
    contribution: float


def contributions(probe: Probe, pooled: Mapping[FeatureKey, float], top: int = 5) -> list[Contribution]:
    """The explanation: features whose weight × pooled activation pushed the logit most."""
    sae_ids = {(f.layer, f.feature_id): f.sae_id for f in probe.features}
    rows: list[Contribution] = [{"layer": k[0], "sae_id": sae_ids[k], "feature_id": k[1], "activation": pooled.get(k, 0.0),
             "weight": w, "contribution": w * pooled.get(k, 0.0)} for k, w in probe.weights.items()]
    rows.sort(key=lambda r: -abs(r["contribution"]))
    return [r for r in rows if r["contribution"] != 0.0][:top]
