"""Honest evaluation of the risk probe: held-out entities and each held-out domain, side by side with the
cheap baselines (mean / min token logprob, mean entropy), an unsupervised concept-dispersion score and a dense
L2 probe on the same features. Every score is oriented so that higher = more likely hallucinated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
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


# ------------------------------------------------------------------------- generalization (issue 29)

LOGPROB_BASELINES = ("neg_mean_logprob", "neg_min_logprob", "mean_entropy")


def residual_design(records: Sequence[dict], layer: int, sae_dir: str | Path) -> np.ndarray:
    """A dense-residual stand-in: each token's residual rebuilt from its top-k SAE codes (codes @ W_dec),
    mean-pooled over the response; (n, d_model)."""
    from safetensors.numpy import load_file

    w_dec = load_file(str(Path(sae_dir) / "sae_weights.safetensors"))["W_dec"].astype(np.float32)
    out = np.zeros((len(records), w_dec.shape[1]), dtype=np.float32)
    for i, r in enumerate(records):
        entry = r["features"][str(layer)]
        for idx, val in zip(entry["idx"], entry["val"], strict=False):
            out[i] += np.asarray(val, dtype=np.float32) @ w_dec[np.asarray(idx)]
        out[i] /= max(1, len(entry["idx"]))
    return out


def _dense_lofo(X: np.ndarray, records: Sequence[dict], C: float = 0.1) -> dict[str, float | None]:
    from featurelens.server.offline.risk.generalize import MIN_PER_CLASS, auroc, sample_weights
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    fams = np.asarray([r["domain"] for r in records])
    y = np.asarray([r["label"] for r in records])
    out: dict[str, float | None] = {}
    for family in sorted(set(fams.tolist())):
        tr, te = fams != family, fams == family
        scaler = StandardScaler().fit(X[tr])
        model = LogisticRegression(C=C, max_iter=2000)
        model.fit(scaler.transform(X[tr]), y[tr], sample_weight=sample_weights(fams[tr].tolist(), y[tr]))
        out[family] = auroc(y[te], model.decision_function(scaler.transform(X[te])), MIN_PER_CLASS)
    return out


def config_of(probe: Probe) -> Any:
    """The generalize.Config a probe file was trained with (v1 files: their layers/pooling/transform, L1 C)."""
    from featurelens.server.offline.risk.generalize import config_from_row

    return config_from_row({"C": 0.03, "family_weights": False, **probe.metrics,
                            "layers": sorted({f.layer for f in probe.features}), "pooling": probe.pooling,
                            "transform": probe.input_transform, "terms": [t.name for t in probe.terms]})


def evaluate_generalization(records: Sequence[dict], probe: Probe, out_dir: str | Path, *,
                            saes: Mapping[int, str] | None = None, compare: Sequence[Probe] = (),
                            ood_min_counts: Sequence[int] | None = None,
                            consistency: Mapping[str, float] | None = None,
                            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Issue 29's report, per family and overall: LOFO AUROC of the probe's configuration (refit without each
    family, tested on all of it) beside the logprob baselines, a logprob-terms-only LOFO model, a dense
    (SAE-reconstructed residual) LOFO probe and other probes' configurations (`compare`, e.g. v2's) under the
    same protocol; held-out entities (the probe as given, test split); ECE of the LOFO fits calibrated on the
    other families' val split; the OOD AUROC (held-out family vs held-out entities). `consistency` (question
    id → `consistency.consistency_score`, from `featurelens risk consistency`): the sampling-consistency
    reference's AUROC on the answers it covers, beside the probe's LOFO AUROC on the same answers."""
    from featurelens.server.offline.risk import generalize as gz

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = usable(records)
    y = np.asarray([r["label"] for r in records])
    fams = np.asarray([r["domain"] for r in records])
    families = sorted(set(fams.tolist()))
    config = config_of(probe)
    design = gz.build_design(records, config.layers, config.pooling, config.transform)
    folds = {f.family: f for f in gz.lofo(records, design, config, calibrate=True)}
    base = baseline_scores(records)
    # The baselines below (terms only, dense residual) are fit on every row of the other families: more data
    # than the probe's fits get, so the comparison errs in the baselines' favour.
    terms_only = gz.Config(config.layers, config.pooling, config.transform, gz.TERMS, 1.0, True, "l2")
    term_design = gz.Design(design.X[:, :0], {}, design.terms)
    term_folds = {f.family: f.auroc for f in gz.lofo(records, term_design, terms_only)}
    others = {}
    for other in compare:
        oc = config_of(other)
        od = gz.build_design(records, oc.layers, oc.pooling, oc.transform)
        # The probe's own protocol (fits on the other families' train split): a compared configuration fitted
        # on their val and test rows as well would get ~75% more data than the probe it is compared with.
        others[other.probe_id] = {f.family: f.auroc for f in gz.lofo(records, od, oc, calibrate=True)}
    dense: dict[str, float | None] = {}
    if saes:
        layer = max(config.layers)
        dense = _dense_lofo(residual_design(records, layer, saes[layer]), records)
    table = []
    for family in families:
        mask = fams == family
        row: dict[str, Any] = {"family": family, "n": int(mask.sum()), "positive_rate": round(float(y[mask].mean()), 3),
                               "probe_lofo": folds[family].auroc}
        for name in (*LOGPROB_BASELINES, "concept_dispersion"):
            row[name] = gz.auroc(y[mask], base[name][mask], gz.MIN_PER_CLASS)
        valid = [row[n] for n in LOGPROB_BASELINES if row[n] is not None]
        row["best_logprob_baseline"] = max(valid) if valid else None
        row["logprob_terms_lofo"] = term_folds[family]
        row["dense_residual_lofo"] = dense.get(family)
        if consistency:
            qids = [r["qid"] for r, m in zip(records, mask, strict=True) if m]
            have = np.asarray([q in consistency for q in qids])
            yf = y[mask][have]
            row["sampling_consistency"] = gz.auroc(yf, np.asarray([consistency[q] for q in qids if q in consistency]),
                                                   gz.MIN_PER_CLASS) if have.any() else None
            row["probe_lofo_on_consistency_subset"] = gz.auroc(yf, folds[family].probs[have], gz.MIN_PER_CLASS) \
                if have.any() else None
        for pid, by in others.items():
            row[f"{pid}_config_lofo"] = by[family]
        if probe.features and probe.probe_id and probe.metrics.get("feature_top_k"):
            row["probe_as_given"] = gz.auroc(y[mask], gz.probe_scores(probe, [r for r, m in zip(records, mask,
                                                                                                 strict=True) if m]),
                                             gz.MIN_PER_CLASS)
        table.append(row)
    scored = [r for r in table if r["probe_lofo"] is not None and r["best_logprob_baseline"] is not None]
    margin = [r["probe_lofo"] - r["best_logprob_baseline"] for r in scored]
    probs = np.concatenate([folds[f].probs for f in families])
    labels = np.concatenate([folds[f].y for f in families])
    summary: dict[str, Any] = {
        "families": len(families), "n": len(records),
        "lofo_mean_auroc": round(gz.mean_auroc(folds.values()), 4),
        # Every held-out family's answers together, each scored by the fit that never saw its family, against
        # the same pooling of the single best logprob baseline: mixed traffic of unseen kinds.
        "lofo_pooled_auroc": gz.pooled_auroc(list(folds.values())),
        "lofo_pooled_neg_mean_logprob": gz.auroc(y, base["neg_mean_logprob"]),
        "lofo_pooled_neg_min_logprob": gz.auroc(y, base["neg_min_logprob"]),
        "best_logprob_baseline_mean": round(float(np.mean([r["best_logprob_baseline"] for r in scored])), 4),
        "families_ge_baseline_plus_0.02": sum(m >= 0.02 for m in margin),
        "families_below_baseline_minus_0.02": sum(m < -0.02 for m in margin), "families_scored": len(scored),
        "ece_heldout_families": round(ece(probs, labels), 4),
        "ece_heldout_families_mean_per_family": round(float(np.mean([ece(folds[f].probs, folds[f].y)
                                                                      for f in families])), 4),
    }
    for key in ("logprob_terms_lofo", "dense_residual_lofo", *(f"{p}_config_lofo" for p in others),
                "sampling_consistency", "probe_lofo_on_consistency_subset", "concept_dispersion"):
        vals = [r[key] for r in table if r.get(key) is not None]
        if vals:
            summary[f"{key}_mean"] = round(float(np.mean(vals)), 4)
    test = [r for r in records if r["split"] == "test"]
    yt = np.asarray([r["label"] for r in test])
    zt = gz.probe_scores(probe, test)
    summary["heldout_entities_auroc"] = gz.auroc(yt, zt)
    summary["heldout_entities_ece"] = round(ece(calibrated(probe, zt), yt), 4)
    summary["heldout_entities_best_logprob_baseline"] = max(
        gz.auroc(yt, baseline_scores(test)[n]) or 0.0 for n in LOGPROB_BASELINES)
    if probe.ood:
        k = int(probe.ood["k"])
        if probe.ood["method"] == "nearest_cosine":
            layers = [int(probe.ood["layer"])]
            d_sae = {layers[0]: int(probe.ood_reference.d) if probe.ood_reference is not None else 4096}
            ood = gz.ood_lofo(records, layers, d_sae, k, method="nearest_cosine")
            key = "nearest_cosine"
        else:
            layers = [int(layer) for layer in probe.ood["unseen"]]
            d_sae = {layer: 4096 for layer in layers}
            ood = gz.ood_lofo(records, layers, d_sae, k, ood_min_counts or (int(probe.ood["min_count"]),))
            key = str(int(probe.ood["min_count"]))
        summary["ood"] = {m: {x: v[x] for x in ("mean_auroc", "min_auroc", "pooled_auroc")} for m, v in ood.items()}
        summary["ood_by_family"] = ood[key]["by_family"] if key in ood else None
    report = {"probe_id": probe.probe_id, "config": config.name(), "summary": summary, "by_family": table}
    (out / "risk_generalization.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(format_generalization(report))
    return report


def _f(x: Any) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def format_generalization(report: Mapping[str, Any]) -> str:
    """The per-family table and the headline figures as text (what `featurelens risk eval` prints)."""
    rows = report["by_family"]
    extra = [k for k in rows[0] if k.endswith("_config_lofo")] if rows else []
    head = f"{'family':<22}{'n':>5}{'pos':>6}  {'probe':>6}{'best lp':>8}{'diff':>7}{'terms':>7}{'dense':>7}" + \
        "".join(f"{k.replace('_config_lofo', '')[:12]:>14}" for k in extra)
    lines = [f"LOFO AUROC, probe {report['probe_id']} ({report['config']})", head]
    for r in rows:
        diff = None if r["probe_lofo"] is None or r["best_logprob_baseline"] is None else \
            r["probe_lofo"] - r["best_logprob_baseline"]
        lines.append(f"{r['family']:<22}{r['n']:>5}{r['positive_rate']:>6.2f}  {_f(r['probe_lofo']):>6}"
                     f"{_f(r['best_logprob_baseline']):>8}{_f(diff):>7}{_f(r['logprob_terms_lofo']):>7}"
                     f"{_f(r.get('dense_residual_lofo')):>7}" + "".join(f"{_f(r[k]):>14}" for k in extra))
    s = report["summary"]
    lines.append(json.dumps(s, indent=1, default=float))
    return "\n".join(lines)
