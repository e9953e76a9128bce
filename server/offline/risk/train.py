"""Training the hallucination-risk probe: pooled SAE-feature matrices, sparse logistic regression, Platt
calibration and label thresholds. The probe file it writes is read and scored by
featurelens.server.interp.risk_probe (the serving side), whose semantics this module reproduces in bulk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from featurelens.server.interp.risk_probe import (
    POOLINGS,
    TRANSFORMS,
    FeatureKey,
    Probe,
    ProbeFeature,
)


def label_is_certain(record: Mapping[str, Any]) -> bool:
    """False for a real question answered wrongly in a response cut off at the token limit: the right answer
    may have come after the cut (e.g. "To calculate 68 - 23, we subtract 23 from 68, which gives"), so the
    label is unknown, not 1. Records without `max_new_tokens` were built with the old default, 24."""
    cut_off = len(record.get("token_ids") or ()) >= int(record.get("max_new_tokens", 24))
    return not (cut_off and not record.get("fictional") and record.get("verdict") == "wrong")


def usable(records: Iterable[dict]) -> list[dict]:
    """Records the probe can score: at least one response token with features, and a certain label."""
    return [r for r in records if r.get("token_ids") and r.get("features") and label_is_certain(r)]


def pooled_matrix(records: Sequence[dict], layers: Sequence[int], pooling: str, transform: str,
                  columns: dict[FeatureKey, int] | None = None):
    """(n, d) scipy CSR of pooled features, and the (layer, feature_id) → column map (built from the data
    when not given; unseen features get no column, as they would get no weight)."""
    import numpy as np
    from scipy import sparse

    build = columns is None
    columns = {} if columns is None else columns
    rows, cols, vals = [], [], []
    for i, rec in enumerate(records):
        pooled: dict[FeatureKey, float] = {}
        for layer in layers:
            entry = rec["features"][str(layer)]
            token_rows = entry["idx"][:1] if pooling == "last_prompt" else entry["idx"]
            n_tokens = len(token_rows)
            for idx, val in zip(token_rows, entry["val"], strict=False):
                for fid, v in zip(idx, val, strict=True):
                    x = math.log1p(v) if transform == "log1p" else v
                    key = (layer, fid)
                    if pooling == "max":
                        pooled[key] = max(pooled.get(key, 0.0), x)
                    else:
                        pooled[key] = pooled.get(key, 0.0) + x / n_tokens
        for key, value in pooled.items():
            if key not in columns:
                if not build:
                    continue
                columns[key] = len(columns)
            rows.append(i)
            cols.append(columns[key])
            vals.append(value)
    matrix = sparse.csr_matrix((np.asarray(vals, dtype=np.float64), (rows, cols)), shape=(len(records), len(columns)))
    return matrix, columns


@dataclass
class FitResult:
    weights: Any  # (d,) raw-space weights
    bias: float
    C: float
    val_auroc: float


def fit_logreg(X, y, X_val, y_val, penalty: str = "l1", Cs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
               seed: int = 0) -> FitResult:
    """Logistic regression on columns scaled to unit RMS (so one L1 strength suits features of any scale);
    weights are mapped back to raw activations so the file needs no scaler. C is chosen by validation AUROC."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rms = np.sqrt(np.asarray(X.multiply(X).mean(axis=0))).ravel()
    scale = 1.0 / np.where(rms > 0, rms, 1.0)
    Xs, Xv = X.multiply(scale).tocsr(), X_val.multiply(scale).tocsr()
    best: FitResult | None = None
    for C in Cs:
        model = LogisticRegression(l1_ratio=1.0 if penalty == "l1" else 0.0, C=C, solver="liblinear",
                                   max_iter=2000, random_state=seed, class_weight="balanced")
        model.fit(Xs, y)
        auc = roc_auc_score(y_val, model.decision_function(Xv)) if len(set(y_val)) > 1 else float("nan")
        if best is None or auc > best.val_auroc:
            best = FitResult(model.coef_.ravel() * scale, float(model.intercept_[0]), C, float(auc))
    assert best is not None
    return best


def platt(logits, y) -> dict[str, Any]:
    """Platt scaling: one-feature logistic regression on held-out logits (weak L2 only for stability)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e4, max_iter=1000).fit(np.asarray(logits).reshape(-1, 1), y)
    return {"method": "platt", "a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}


def choose_thresholds(probs, y, min_precision: float = 0.95, medium: float = 0.5,
                      min_gap: float = 0.1) -> dict[str, float]:
    """On the calibrated scale: medium = 0.5 (more likely made up than not); high = the lowest threshold, at
    least `min_gap` above medium, at which at least `min_precision` of the flagged validation answers (≥ 10)
    were hallucinations, else 0.9. (A base-rate medium was tried first: with 78 % hallucinated answers in the
    data it put medium and high 0.001 apart, leaving MEDIUM empty.)"""
    import numpy as np

    probs, y = np.asarray(probs), np.asarray(y)
    high = 0.9
    for t in np.unique(np.round(probs, 3)):
        flagged = probs >= t
        if t >= medium + min_gap and flagged.sum() >= 10 and y[flagged].mean() >= min_precision:
            high = float(t)
            break
    return {"medium": medium, "high": round(high, 3)}


def build_probe(fit: FitResult, columns: dict[FeatureKey, int], sae_ids: Mapping[int, str], probe_id: str,
                pooling: str, transform: str, calibration: dict, thresholds: dict, metrics: dict) -> Probe:
    inverse = {c: key for key, c in columns.items()}
    feats = [ProbeFeature(layer=inverse[c][0], sae_id=sae_ids[inverse[c][0]], feature_id=int(inverse[c][1]),
                          weight=round(float(w), 6))
             for c, w in enumerate(fit.weights) if abs(w) > 1e-9]
    feats.sort(key=lambda f: -abs(f.weight))
    return Probe(probe_id=probe_id, features=feats, bias=round(fit.bias, 6), pooling=pooling,
                 input_transform=transform, calibration=calibration, thresholds=thresholds, metrics=metrics)


def probe_logits(probe: Probe, records: Sequence[dict]):
    """Raw logits of `probe` on records, through the same pooling the server uses (vectorised), plus a v2
    probe's uncertainty terms."""
    import numpy as np

    layers = sorted({f.layer for f in probe.features})
    columns = {(f.layer, f.feature_id): i for i, f in enumerate(probe.features)}
    X, _ = pooled_matrix(records, layers, probe.pooling, probe.input_transform, columns=columns)
    w = np.asarray([f.weight for f in probe.features])
    z = np.asarray(X @ w + probe.bias, dtype=np.float64).ravel()
    if probe.terms:  # v2: uncertainty terms over all the response's tokens (risk_probe.term_values)
        from featurelens.server.interp.risk_probe import term_values

        v = np.asarray([t.weight for t in probe.terms])
        z = z + np.asarray([[term_values(r["logprobs"])[t.name] for t in probe.terms] for r in records]) @ v
    return z


def calibrated(probe: Probe, logits):
    import numpy as np

    z = probe.calibration["a"] * np.asarray(logits) + probe.calibration["b"]
    return 1.0 / (1.0 + np.exp(-z))


def layer_options(layers: Sequence[int]) -> list[tuple[int, ...]]:
    return [(layer,) for layer in layers] + ([tuple(layers)] if len(layers) > 1 else [])


def auroc_standard_error(auroc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC measured on n_pos positives and n_neg negatives."""
    a = min(max(auroc, 1e-6), 1 - 1e-6)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / max(1, n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def train_probe(train: Sequence[dict], val: Sequence[dict], probe_id: str, *, penalty: str = "l1",
                poolings: Sequence[str] = POOLINGS, transforms: Sequence[str] = TRANSFORMS,
                layer_sets: Sequence[Sequence[int]] | None = None, selection: str = "one-se",
                log: Any = print) -> tuple[Probe, list[dict]]:
    """Grid over layer set × pooling × transform × C, scored by validation AUROC; the chosen one is
    Platt-calibrated on the validation set. Returns the probe and the table of every configuration.

    `selection`: "best" takes the highest validation AUROC. "one-se" (default) takes, among configurations
    within one standard error of the best (Hanley–McNeil, ~0.012 on 600 validation answers — differences
    smaller than that are noise), the one with the fewest layers, then the highest AUROC: every probe layer
    costs the server one SAE encode per token (measured: a two-layer probe +8% latency at batch 32, one
    layer +3%; docs/risk.md)."""
    import numpy as np

    if selection not in ("best", "one-se"):
        raise ValueError(f"selection must be 'best' or 'one-se', got {selection!r}")
    layers = sorted(int(k) for k in train[0]["features"])
    sae_ids = {int(k): v["sae_id"] for k, v in train[0]["features"].items()}
    y, y_val = np.asarray([r["label"] for r in train]), np.asarray([r["label"] for r in val])
    table, fits = [], []
    for layer_set in layer_sets or layer_options(layers):
        for pooling in poolings:
            for transform in transforms:
                X, columns = pooled_matrix(train, layer_set, pooling, transform)
                X_val, _ = pooled_matrix(val, layer_set, pooling, transform, columns=columns)
                fit = fit_logreg(X, y, X_val, y_val, penalty=penalty)
                row = {"layers": list(layer_set), "pooling": pooling, "transform": transform, "C": fit.C,
                       "val_auroc": round(fit.val_auroc, 4), "nonzero": int((np.abs(fit.weights) > 1e-9).sum())}
                table.append(row)
                fits.append((fit, columns, pooling, transform, len(layer_set)))
                log(f"  {row}")
    assert fits
    top = max(fits, key=lambda f: f[0].val_auroc)
    se = auroc_standard_error(top[0].val_auroc, int(y_val.sum()), int(len(y_val) - y_val.sum()))
    if selection == "best":
        chosen = top
    else:
        close = [f for f in fits if f[0].val_auroc >= top[0].val_auroc - se]
        chosen = min(close, key=lambda f: (f[4], -f[0].val_auroc))
    fit, columns, pooling, transform, _ = chosen
    probe = build_probe(fit, columns, sae_ids, probe_id, pooling, transform, {"method": "platt", "a": 1.0, "b": 0.0},
                        {"medium": 0.5, "high": 0.8}, {})
    val_logits = probe_logits(probe, val)
    probe.calibration = platt(val_logits, y_val)
    probe.thresholds = choose_thresholds(calibrated(probe, val_logits), y_val)
    probe.metrics = {"val_auroc": round(fit.val_auroc, 4), "C": fit.C, "penalty": penalty,
                     "n_train": len(train), "n_val": len(val), "selection_rule": selection,
                     "best_val_auroc": round(top[0].val_auroc, 4), "val_auroc_se": round(se, 4)}
    return probe, table
