"""Honest evaluation of the risk probe: held-out entities and each held-out domain, side by side with the
cheap baselines (mean / min token logprob, mean entropy), an unsupervised concept-dispersion score and a dense
L2 probe on the same features. Every score is oriented so that higher = more likely hallucinated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from featurelens.server.interp.risk_probe import Probe
from featurelens.server.offline.risk.train import (
    calibrated,
    fit_logreg,
    platt,
    pooled_matrix,
    probe_logits,
    train_probe,
    usable,
)

# -------------------------------------------------------------------------------------------- metrics


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error with equal-width bins (weighted |accuracy − confidence|)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - probs[mask].mean())
    return float(total)


def ranking_metrics(scores: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(set(y.tolist())) < 2:
        return {"auroc": None, "auprc": None}  # one class only: ranking is undefined, say so
    return {"auroc": round(float(roc_auc_score(y, scores)), 4),
            "auprc": round(float(average_precision_score(y, scores)), 4)}


# ------------------------------------------------------------------------------------------- baselines

def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def dispersion(rec: dict) -> float:
    """Concept dispersion (unsupervised, after the seed paper's idea that confabulation lights up many loosely
    related concepts): distinct features active over the answer ÷ all activations, averaged over layers.
    1 = every token used new features, 1/T = the same concepts throughout."""
    values = []
    for entry in rec["features"].values():
        flat = [f for idx in entry["idx"] for f in idx]
        values.append(len(set(flat)) / max(1, len(flat)))
    return _mean(values)


BASELINES: dict[str, Callable[[dict], float]] = {
    "neg_mean_logprob": lambda r: -_mean(r["logprobs"]),
    "neg_min_logprob": lambda r: -min(r["logprobs"]),
    "mean_entropy": lambda r: _mean(r["entropies"]),
    "concept_dispersion": dispersion,
}


# The literature does not fix which way dispersion points, so its sign is read off the validation split.
ORIENT_ON_VAL = {"concept_dispersion"}


def baseline_scores(records: Sequence[dict]) -> dict[str, np.ndarray]:
    return {name: np.asarray([fn(r) for r in records]) for name, fn in BASELINES.items()}


def _platt_probs(train_scores: np.ndarray, y_train: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Baselines get the same Platt calibration as the probe, so their ECE is comparable."""
    cal = platt(train_scores, y_train)
    return 1.0 / (1.0 + np.exp(-(cal["a"] * scores + cal["b"])))


# ------------------------------------------------------------------------------------------ evaluation

def evaluate_scores(name: str, scores: np.ndarray, y: np.ndarray, probs: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": name, **ranking_metrics(scores, y)}
    out["ece"] = round(ece(probs, y), 4) if probs is not None else None
    return out


def compare(probe: Probe, val: Sequence[dict], test: Sequence[dict], dense: tuple[Any, ...] | None) -> list[dict]:
    """Probe, dense probe and baselines on the same test examples; baselines are Platt-calibrated on `val`."""
    y_val, y = np.asarray([r["label"] for r in val]), np.asarray([r["label"] for r in test])
    logits = probe_logits(probe, test)
    rows = [evaluate_scores("sae_sparse_probe", logits, y, calibrated(probe, logits))]
    if dense is not None:
        fit, columns, cal = dense
        X, _ = pooled_matrix(test, sorted({k[0] for k in columns}), probe.pooling, probe.input_transform, columns)
        z = X @ fit.weights + fit.bias
        rows.append(evaluate_scores("sae_dense_l2_probe", z, y, 1 / (1 + np.exp(-(cal["a"] * z + cal["b"])))))
    base_val, base_test = baseline_scores(val), baseline_scores(test)
    for name in BASELINES:
        sv, st = base_val[name], base_test[name]
        if name in ORIENT_ON_VAL and (ranking_metrics(sv, y_val)["auroc"] or 0.5) < 0.5:
            sv, st = -sv, -st
        rows.append(evaluate_scores(name, st, y, _platt_probs(sv, y_val, st)))
    return rows


def fit_dense(probe: Probe, train: Sequence[dict], val: Sequence[dict]) -> tuple[Any, ...]:
    """The alternative: an L2 (dense) logistic regression on every feature of the probe's layers/pooling."""
    layers = sorted({f.layer for f in probe.features}) or sorted(int(k) for k in train[0]["features"])
    X, columns = pooled_matrix(train, layers, probe.pooling, probe.input_transform)
    X_val, _ = pooled_matrix(val, layers, probe.pooling, probe.input_transform, columns)
    y, y_val = np.asarray([r["label"] for r in train]), np.asarray([r["label"] for r in val])
    fit = fit_logreg(X, y, X_val, y_val, penalty="l2")
    return fit, columns, platt(X_val @ fit.weights + fit.bias, y_val)


def held_out_domains(records: Sequence[dict], probe: Probe, log: Callable[[str], None] = print) -> dict[str, Any]:
    """For each domain D: train a probe with the shipped configuration (layers, pooling, transform) on the
    other domains' train split, calibrate on their val split, test on every example of D."""
    layers = sorted({f.layer for f in probe.features})
    out: dict[str, Any] = {}
    for domain in sorted({r["domain"] for r in records}):
        rest = [r for r in records if r["domain"] != domain]
        train = [r for r in rest if r["split"] == "train"]
        val = [r for r in rest if r["split"] == "val"]
        test = [r for r in records if r["domain"] == domain]
        held, _ = train_probe(train, val, f"{probe.probe_id}-without-{domain}", poolings=[probe.pooling],
                              transforms=[probe.input_transform], layer_sets=[layers], log=lambda _m: None)
        rows = compare(held, val, test, dense=None)
        out[domain] = {"n": len(test), "positive_rate": round(float(np.mean([r["label"] for r in test])), 3),
                       "results": rows}
        log(f"held-out domain {domain}: n={len(test)} " + ", ".join(f"{r['method']}={r['auroc']}" for r in rows))
    return out


def plots(probe: Probe, test: Sequence[dict], val: Sequence[dict], out_dir: Path) -> list[str]:
    """ROC curves (probe vs baselines) and a reliability diagram of the calibrated probe on held-out entities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y = np.asarray([r["label"] for r in test])
    logits = probe_logits(probe, test)
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, scores in {"SAE probe": logits, **baseline_scores(test)}.items():
        fpr, tpr, _ = roc_curve(y, scores)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, held-out entities")
    ax.legend(loc="lower right", fontsize=8)
    roc_path = out_dir / "roc_heldout_entities.png"
    fig.savefig(roc_path, dpi=110, bbox_inches="tight")
    plt.close(fig)

    probs = calibrated(probe, logits)
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, 9)
    centers = [(probs[which == b].mean(), y[which == b].mean(), (which == b).sum()) for b in range(10) if (which == b).any()]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.scatter([c[0] for c in centers], [c[1] for c in centers], s=[10 + 2 * math.sqrt(c[2]) * 5 for c in centers])
    ax.plot([c[0] for c in centers], [c[1] for c in centers])
    ax.set(xlabel="predicted risk", ylabel="observed hallucination rate", title=f"Calibration (ECE {ece(probs, y):.3f})")
    cal_path = out_dir / "calibration_heldout_entities.png"
    fig.savefig(cal_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [str(roc_path), str(cal_path)]


def evaluate(records: Sequence[dict], probe: Probe, out_dir: str | Path, domains: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The full report: held-out entities (test split) and, optionally, leave-one-domain-out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = usable(records)
    split = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
    dense = fit_dense(probe, split["train"], split["val"])
    report: dict[str, Any] = {
        "probe_id": probe.probe_id, "n": {s: len(v) for s, v in split.items()},
        "positive_rate": {s: round(float(np.mean([r["label"] for r in v])), 3) for s, v in split.items() if v},
        "heldout_entities": compare(probe, split["val"], split["test"], dense),
        "heldout_entities_by_domain": {},
    }
    for domain in sorted({r["domain"] for r in split["test"]}):
        sub = [r for r in split["test"] if r["domain"] == domain]
        report["heldout_entities_by_domain"][domain] = compare(probe, split["val"], sub, None)[:4]
    if domains:
        report["heldout_domains"] = held_out_domains(records, probe, log)
    report["plots"] = plots(probe, split["test"], split["val"], out)
    (out / "risk_eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
