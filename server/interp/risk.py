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
One implementation of these semantics: the probe file and the reference `running_risks` live in `risk_probe`;
`RunningRisk` below is its vectorised streaming form (a test checks they agree).

Split between worker and frontend: the worker encodes the rows and ships, per token, only the probe's
features present among its codes (the probe's layers and feature ids are sent to the worker at start-up,
`featurelens_set_probe`) — a few dozen bytes per token instead of the whole top-k code. The pooling and the
logistic score run here, per request, so the worker keeps no per-request state that an abort could leak.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from featurelens.server.interp.risk_probe import Probe, calibrate, load_probe, term_values, terms_logit
from featurelens.server.paths import ASSETS_DIR
from featurelens.v1 import featurelens_pb2 as pb

if TYPE_CHECKING:
    from featurelens.server.interp.registry import SaeEntry

PROBES_DIR = ASSETS_DIR / "probes"


@dataclass
class RiskProbe:
    """A loaded probe file plus the serving thresholds (which settings may override)."""

    probe: Probe
    medium: float
    high: float

    def __post_init__(self) -> None:
        # Column order = the probe file's feature order; per layer, a feature id → column table (-1: none).
        self.columns: list[tuple[int, int]] = [(f.layer, f.feature_id) for f in self.probe.features]
        self.vector = np.asarray([f.weight for f in self.probe.features], dtype=np.float64)
        probe_ids: dict[int, list[int]] = {}
        for f in self.probe.features:
            probe_ids.setdefault(f.layer, []).append(f.feature_id)
        self.slots: dict[int, np.ndarray] = {layer: np.full(max(ids) + 1, -1, dtype=np.int64)
                                             for layer, ids in probe_ids.items()}
        for column, (layer, feature) in enumerate(self.columns):
            self.slots[layer][feature] = column
        self._layers = {f.layer: f.sae_id for f in self.probe.features}
        # The OOD reference (probe file v2): per layer, a bool table of the features training (almost) never
        # saw. The worker ships them beside the probe's own features (weight 0: the linear term is unchanged),
        # so the frontend counts them among the codes it already receives.
        self.ood_k = int(self.probe.ood["k"]) if self.probe.ood else 0
        self.unseen: dict[int, np.ndarray] = {}
        for layer, ids in self.probe.ood_sets().items():
            if layer in self._layers and ids:
                table = np.zeros(max(ids) + 1, dtype=bool)
                table[sorted(ids)] = True
                self.unseen[layer] = table
        # What the worker selects per layer: the probe's features, then the unseen ones it lacks (weight 0).
        self.feature_ids: dict[int, list[int]] = {}  # layer → feature ids the worker ships
        self.feature_weights: dict[int, list[float]] = {}  # layer → their weights, same order
        for f in self.probe.features:
            self.feature_ids.setdefault(f.layer, []).append(f.feature_id)
            self.feature_weights.setdefault(f.layer, []).append(float(f.weight))
        for layer, table in self.unseen.items():
            own = set(self.feature_ids[layer])
            extra = [int(i) for i in np.flatnonzero(table) if int(i) not in own]
            self.feature_ids[layer] += extra
            self.feature_weights[layer] += [0.0] * len(extra)
        # "nearest_cosine": the response's whole code vector at one layer against the training answers'
        # (probe_file's reference, unit rows, as a float64 CSR matrix). The worker then ships every code of
        # that layer's top-k (all feature ids, the missing ones weight 0).
        self.nearest_layer: int | None = None
        reference = self.probe.ood_reference
        if self.probe.ood and self.probe.ood.get("method") == "nearest_cosine" and reference is not None:
            layer = int(self.probe.ood["layer"])
            if layer not in self._layers:
                raise ValueError(f"risk probe {self.probe.probe_id}: its OOD layer {layer} is not a probe layer")
            self.nearest_layer, self.ood_k = layer, int(self.probe.ood["k"])
            from scipy import sparse

            indptr = np.asarray(reference.indptr, dtype=np.int64)
            self.ref_n = len(indptr) - 1
            self.ood_d = reference.d
            self.ref_matrix = sparse.csr_matrix(
                (np.asarray(reference.values, dtype=np.float64), np.asarray(reference.indices), indptr),
                shape=(self.ref_n, self.ood_d))
            own = set(self.feature_ids.get(layer, []))
            extra = [i for i in range(reference.d) if i not in own]
            self.feature_ids[layer] = self.feature_ids.get(layer, []) + extra
            self.feature_weights[layer] = self.feature_weights.get(layer, []) + [0.0] * len(extra)

    def nearest_ood(self, pooled: np.ndarray) -> float:
        """1 − max cosine similarity of a pooled code vector (length d) to the reference rows."""
        norm = float(np.sqrt((pooled ** 2).sum()))
        if norm == 0.0:
            return 0.0
        # scipy's CSR product over all 592k reference entries: 0.5 ms for a 30-token answer's ~700 features,
        # against 1.4 ms gathering only those features' columns with numpy (2-core Zen 4; answers touch the
        # common features, whose columns are long). The frontend shares its core with the engine core.
        sims = self.ref_matrix @ np.asarray(pooled, dtype=np.float64)
        return 1.0 - max(0.0, min(1.0, float(sims.max()) / norm))

    @property
    def needs_logprobs(self) -> bool:
        """The probe adds uncertainty terms of the scored tokens' logprobs: the server must feed them."""
        return self.probe.needs_logprobs

    @property
    def reports_ood(self) -> bool:
        return bool(self.unseen) or self.nearest_layer is not None

    @classmethod
    def load(cls, path: str | Path) -> RiskProbe:
        try:
            probe = load_probe(path)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a usable probe file: {error}") from None
        return cls(probe, float(probe.thresholds["medium"]), float(probe.thresholds["high"]))

    @property
    def trained_top_k(self) -> int | None:
        """Codes per token and layer the probe was trained on (`metrics.feature_top_k`), if recorded."""
        value = self.probe.metrics.get("feature_top_k")
        return int(value) if value else None

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
        return self._layers

    def check_saes(self, saes: Mapping[int, SaeEntry]) -> None:
        for layer, sae_id in self.layers.items():
            entry = saes.get(layer)
            if entry is None or entry.sae_id != sae_id:
                loaded = entry.sae_id if entry else "none"
                raise ValueError(f"risk probe {self.probe_id} needs SAE {sae_id!r} at layer {layer}; loaded: {loaded}")

    def label(self, risk: float) -> pb.RiskLabel:
        if risk >= self.high:
            return pb.RISK_LABEL_HIGH
        return pb.RISK_LABEL_MEDIUM if risk >= self.medium else pb.RISK_LABEL_LOW

    def start(self) -> RunningRisk:
        return RunningRisk(self)


class RunningRisk:
    """The probe's pooled inputs over the scored tokens so far, updated one token at a time with the
    semantics of `risk_probe.running_risks` (the offline reference; a test checks both agree).

    Two ways to feed it. `add(codes)`: the token's probe features, vectorised over the probe's columns
    (numpy, float64; ~18 µs per token for a 228-feature probe). `add_score(term)`: for mean and
    last-prompt pooling, the token's linear term w · f(x_t) that the worker computed beside the codes — one
    float per token, so a streamed token costs the frontend a few scalar operations (on a 2-core box the
    frontend competes with vLLM's engine-core process for CPU); the pooled features for the explanation
    are then built once at the end (`pool`)."""

    def __init__(self, probe: RiskProbe) -> None:
        self.probe = probe
        self.state = np.zeros(len(probe.columns))
        self.count = 0
        self.linear = 0.0  # with `add_score`: the pooled linear term w · pooled(x)
        self.scored = False
        self.logprobs: list[float] = []  # the scored tokens' logprobs, for a probe with uncertainty terms
        self.unseen_hits = 0  # codes on features training never saw, over the scored tokens (OOD)
        self.ood_tokens = 0
        self.ood_sum = np.zeros(probe.ood_d) if probe.nearest_layer is not None else None  # Σ codes (nearest)

    @property
    def needs_logprobs(self) -> bool:
        return self.probe.needs_logprobs

    def add_logprob(self, logprob: float) -> None:
        """The next scored token's logprob: call it before that token's `add` / `add_score`."""
        self.logprobs.append(float(logprob))

    def _count_unseen(self, codes: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """OOD: one token's codes (its top-k, or what the worker shipped of them): those on unseen features,
        or ("nearest_cosine") their sum."""
        if self.ood_sum is not None:
            layer = self.probe.nearest_layer
            assert layer is not None  # ood_sum exists only for a probe with a nearest-cosine layer
            ids = np.asarray(codes[layer][0], dtype=np.int64)[: self.probe.ood_k]
            vals = np.asarray(codes[layer][1], dtype=np.float64)[: self.probe.ood_k]
            known = (ids < len(self.ood_sum)) & (vals > 0.0)
            np.add.at(self.ood_sum, ids[known], vals[known])
            self.ood_tokens += 1
            return
        if not self.probe.unseen:
            return
        self.ood_tokens += 1
        for layer, table in self.probe.unseen.items():
            ids = np.asarray(codes[layer][0], dtype=np.int64)[: self.probe.ood_k]
            vals = np.asarray(codes[layer][1], dtype=np.float64)[: self.probe.ood_k]
            known = (ids < len(table)) & (vals > 0.0)
            self.unseen_hits += int(table[ids[known]].sum())

    def ood(self) -> float:
        """risk_probe.ood_nearest / ood_share over the scored tokens so far (0 for a probe without an OOD
        reference)."""
        if self.ood_sum is not None:
            return self.probe.nearest_ood(self.ood_sum / self.ood_tokens) if self.ood_tokens else 0.0
        if not self.probe.unseen or not self.ood_tokens:
            return 0.0
        return self.unseen_hits / (self.ood_tokens * self.probe.ood_k * len(self.probe.unseen))

    @property
    def takes_scores(self) -> bool:
        """Mean and last-prompt pooling are linear in each token's term w · f(x_t), which the worker computes
        per row: such a probe is served from one float per token (`add_score`); max pooling needs the codes."""
        return self.probe.probe.pooling in ("mean", "last_prompt")

    def add_score(self, score: float) -> float:
        """One token's linear term w · f(x_t) (summed over the probe's layers); returns risk after it. The
        pooled features behind it, for the explanation, are set once at the end with `pool`."""
        if not self.takes_scores:
            raise ValueError(f"{self.probe.probe.pooling} pooling needs the codes (add), not scores")
        self.count += 1
        self.scored = True
        if self.probe.probe.pooling == "mean":
            self.linear += (score - self.linear) / self.count
        elif self.count == 1:
            self.linear = score
        return self.risk()

    def pool(self, tokens: list[dict[int, tuple[np.ndarray, np.ndarray]]]) -> None:
        """The pooled inputs over `tokens` (each: layer → its codes, as `add` takes them) in a few array
        operations — what `add` builds one token at a time; used for the explanation after `add_score`."""
        pooling = self.probe.probe.pooling
        use = tokens[:1] if pooling == "last_prompt" else tokens
        self.unseen_hits = self.ood_tokens = 0
        if self.ood_sum is not None:
            self.ood_sum[:] = 0.0
        for codes in tokens:
            self._count_unseen(codes)
        state = np.zeros_like(self.state)
        for layer, table in self.probe.slots.items():
            if not use:
                break
            columns, x = _probe_columns(table, np.concatenate([codes[layer][0] for codes in use]),
                                        np.concatenate([codes[layer][1] for codes in use]))
            if self.probe.probe.input_transform == "log1p":
                x = np.log1p(x)
            if pooling == "max":
                np.maximum.at(state, columns, x)
            else:  # a feature appears at most once per token and layer
                state += np.bincount(columns, weights=x, minlength=len(state))
        if pooling == "mean" and use:
            state /= len(use)
        self.state = state

    def add(self, codes: dict[int, tuple[np.ndarray, np.ndarray]]) -> float:
        """`codes`: layer → (indices, values) of one token: its top-k codes, or only the probe's features
        among them (what risk captures ship). Zero values mean "not fired". Returns risk after this token."""
        self.count += 1
        self._count_unseen(codes)
        x = np.zeros_like(self.state)
        for layer, table in self.probe.slots.items():
            columns, values = _probe_columns(table, *codes[layer])
            x[columns] = values
        if self.probe.probe.input_transform == "log1p":
            x = np.log1p(x)
        pooling, t = self.probe.probe.pooling, self.count
        if pooling == "mean":
            self.state += (x - self.state) / t
        elif pooling == "max":
            np.maximum(self.state, x, out=self.state)
        elif t == 1:  # last_prompt: the first scored token's codes are the last prompt position's
            self.state = x
        return self.risk()

    def pooled(self) -> dict[tuple[int, int], float]:
        return {key: float(v) for key, v in zip(self.probe.columns, self.state.tolist(), strict=True) if v != 0.0}

    def risk(self) -> float:
        linear = self.linear if self.scored else float(self.probe.vector @ self.state)
        if self.needs_logprobs:
            linear += terms_logit(self.probe.probe, self.logprobs[: self.count])
        return calibrate(self.probe.probe, self.probe.probe.bias + linear)

    def response_risk(self, explain: Callable[[int, int], str] | None = None, top: int = 5) -> pb.ResponseRisk:
        value = self.risk()
        out = pb.ResponseRisk(score=value, label=self.probe.label(value), probe_id=self.probe.probe_id)
        if self.probe.reports_ood:
            out.ood = self.ood()
        # The largest |weight × pooled activation| first, over every column at once (a 4,000-feature probe:
        # a Python sort of the pooled dict cost ~0.8 ms per response).
        contributions = self.probe.vector * self.state
        fired = np.flatnonzero((self.state != 0.0) & (contributions != 0.0))
        order = fired[np.argsort(-np.abs(contributions[fired]), kind="stable")][:top]
        for column in order.tolist():
            layer, feature = self.probe.columns[column]
            out.top_features.add(layer=layer, feature_id=feature, activation=float(self.state[column]),
                                 weight=float(self.probe.vector[column]), contribution=float(contributions[column]),
                                 explanation=explain(layer, feature) if explain else "")
        if self.needs_logprobs:
            values = term_values(self.logprobs[: self.count])
            for term in self.probe.probe.terms:
                out.terms.add(name=term.name, value=values[term.name], weight=term.weight,
                              contribution=term.weight * values[term.name])
        return out


def _probe_columns(table: np.ndarray, indices: npt.ArrayLike, values: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Codes (feature ids, activations) at one layer → the probe's columns among them and their values
    (float64); features the probe does not use and zero activations ("not fired") are dropped."""
    ids = np.asarray(indices, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float64)
    known = (ids < len(table)) & (vals > 0.0)
    columns = table[ids[known]]
    fired = columns >= 0
    return columns[fired], vals[known][fired]


def default_probe_path() -> Path | None:
    found = sorted(PROBES_DIR.glob("*.json"))
    return found[-1] if found else None
