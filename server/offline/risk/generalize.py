"""Model selection for generalization: leave-one-family-out (LOFO) AUROC over the question families, named
uncertainty terms from the answer's token log-probabilities, and the out-of-distribution (OOD) score.

LOFO: for each family D, fit on the other families' answers and score every answer of D. A configuration
(layers × pooling × input transform × uncertainty terms × L1 strength) is chosen by its mean LOFO AUROC over
families, computed on the train and validation splits only (entity splits: the test split's entities stay
unseen for the held-out-entity figure); the spread across configurations is kept so the gain from choosing
is visible.

Uncertainty terms (`TERMS`): running statistics of the response tokens' log-probabilities that the engine
computes anyway; the probe file lists them with their weights, so the explanation names them.

OOD ("nearest_cosine", shipped): 1 − the cosine similarity of the response's code vector (mean of its tokens'
top-k codes at the probe layer) to the nearest training answer's — "the training data never saw an answer like
this". The probe file's sidecar .npz stores the training answers' vectors. ("unseen_share", measured and
kept: the share of the codes on features seen in fewer than `min_count` training answers; weaker.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from featurelens.server.interp.risk_probe import TERMS, term_values
from featurelens.server.offline.risk.train import auroc_standard_error, platt, pooled_matrix


def terms_matrix(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """(n, len(names)) uncertainty terms per record (the serving formulas, risk_probe.term_values)."""
    return np.asarray([[term_values(r["logprobs"])[name] for name in names] for r in records],
                      dtype=np.float64).reshape(len(records), len(names))


@dataclass(frozen=True)
class Config:
    layers: tuple[int, ...]
    pooling: str = "mean"
    transform: str = "identity"
    terms: tuple[str, ...] = ()
    C: float = 0.03
    family_weights: bool = True  # each family weighs the same in the fit, each class within it half
    penalty: str = "l1"  # "l1" (sparse) or "l2" (small weights everywhere; with max_features, then pruned)
    max_features: int = 0  # l2: keep the largest |weight × RMS| features and refit on them (0: keep all)
    # "family": fit on inputs centred within each training family (see `center_by_family`); "none": as they are;
    # "mixB" (e.g. "mix0.5"): both fits, each scaled to unit spread of its training logits, summed with weight
    # B on the centred one — what separates answers inside a family, without forgetting which families'
    # answers are made up more often (see `fit`).
    centering: str = "none"
    # The uncertainty terms' standardized columns are multiplied by this before the L2/L1 fit (their weights
    # divided back): their penalty is term_scale² times weaker than a residual direction's. Measured on the
    # 30-family bank (2026-12-08): at 1 the three terms compete with 576 residual columns under one strong
    # penalty and are shrunk to almost nothing; at 3–10 they keep the weight that transfers to unseen families.
    term_scale: float = 1.0

    def row(self) -> dict[str, Any]:
        """The fields as JSON values (a `select` table row, a selection file's "chosen"); `config_from_row`
        reads them back."""
        return {**self.__dict__, "layers": list(self.layers), "terms": list(self.terms)}

    def name(self) -> str:
        terms = "+".join(self.terms) if self.terms else "none"
        prune = f"/top{self.max_features}" if self.max_features else ""
        center = f"/center={self.centering}" if self.centering != "none" else ""
        scale = f"/ts={self.term_scale:g}" if self.terms and self.term_scale != 1.0 else ""
        return (f"L{'+'.join(map(str, self.layers))}/{self.pooling}/{self.transform}/terms={terms}/{self.penalty}"
                f"/C={self.C}{prune}/{'famw' if self.family_weights else 'plain'}{center}{scale}")


@dataclass
class Design:
    """Pooled SAE features for every record (built once per layers × pooling × transform) plus terms."""

    X: Any  # scipy CSR (n, d)
    columns: dict[tuple[int, int], int]
    terms: np.ndarray  # (n, len(TERMS))


def build_design(records: Sequence[dict], layers: Sequence[int], pooling: str, transform: str) -> Design:
    X, columns = pooled_matrix(records, layers, pooling, transform)
    return Design(X.tocsr(), columns, terms_matrix(records, TERMS))


CENTERINGS = ("none", "family")


def center_by_family(M: np.ndarray, families: Sequence[str]) -> np.ndarray:
    """M minus each family's own mean row. A family's base rate and its typical activations then carry no
    signal, and the fit can only learn what separates right from wrong answers *within* a family, which is
    what a family it never saw needs (its base rate and typical activations are new). The weights apply to
    raw inputs unchanged: within a family, centering shifts every logit by the same constant, so rankings
    (AUROC) are the same; the constant is absorbed by the calibration, fitted on raw logits."""
    out = np.asarray(M, dtype=np.float64).copy()
    fams = np.asarray(families)
    for f in set(fams.tolist()):
        mask = fams == f
        out[mask] -= out[mask].mean(axis=0)
    return out


def sample_weights(families: Sequence[str], y: np.ndarray) -> np.ndarray:
    """Every family the same total weight, and within it each class half (a family with few positives still
    counts): the fit then looks for what separates right from wrong in all families, not in the largest."""
    w = np.zeros(len(y))
    fams = np.asarray(families)
    for f in set(families):
        mask = fams == f
        for label in (0, 1):
            m = mask & (y == label)
            if m.any():
                w[m] = 0.5 / m.sum() if (mask & (y != label)).any() else 1.0 / m.sum()
    return w * len(y) / w.sum()


@dataclass
class Fitted:
    weights: np.ndarray  # raw-space weights over [SAE columns..., terms...]
    bias: float
    term_names: tuple[str, ...]

    def logits(self, X: Any, terms: np.ndarray) -> np.ndarray:
        d = X.shape[1]
        z = X @ self.weights[:d] + self.bias
        if self.term_names:
            z = z + terms @ self.weights[d:]
        return np.asarray(z).ravel()


def fit(design: Design, rows: np.ndarray, y: np.ndarray, families: Sequence[str], config: Config,
        seed: int = 0) -> Fitted:
    """L1 logistic regression on columns scaled to unit RMS (weights mapped back to raw values)."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    if config.centering.startswith("mix"):
        return fit_mix(design, rows, y, families, config)
    if config.penalty == "residual":
        return fit_residual(design, rows, y, families, config)
    term_idx = [TERMS.index(t) for t in config.terms]
    X = raw = design.X[rows]
    if term_idx:
        X = raw = sparse.hstack([X, sparse.csr_matrix(design.terms[rows][:, term_idx])]).tocsr()
    if config.centering == "family":
        X = sparse.csr_matrix(center_by_family(X.toarray(), families))
    rms = np.sqrt(np.asarray(X.multiply(X).mean(axis=0))).ravel()
    scale = 1.0 / np.where(rms > 0, rms, 1.0)
    if term_idx:
        scale[X.shape[1] - len(term_idx):] *= config.term_scale  # a weaker penalty on the terms (Config)
    weights = sample_weights(families, y) if config.family_weights else None
    Xs = X.multiply(scale).tocsr()

    def logreg(columns: np.ndarray) -> tuple[np.ndarray, float]:
        model = LogisticRegression(l1_ratio=1.0 if config.penalty == "l1" else 0.0, C=config.C, solver="liblinear",
                                   max_iter=3000, random_state=seed,
                                   class_weight=None if config.family_weights else "balanced")
        model.fit(Xs[:, columns], y, sample_weight=weights)
        coef = np.zeros(X.shape[1])
        coef[columns] = model.coef_.ravel()
        return coef, float(model.intercept_[0])

    coef, bias = logreg(np.arange(X.shape[1]))
    if config.max_features and config.penalty == "l2":
        # The explanation stays readable and the worker ships few pairs: the strongest standardized weights
        # (uncertainty terms always kept), refit on them.
        d = X.shape[1] - len(term_idx)
        top = np.argsort(-np.abs(coef[:d]))[: config.max_features]
        coef, bias = logreg(np.sort(np.r_[top, np.arange(d, X.shape[1])]).astype(np.int64))
    if config.centering == "family":
        # The intercept of a centred fit is meaningless on raw inputs: put the raw mean logit where the
        # centred fit had its mean (the calibration then fixes the scale on raw logits).
        bias -= float(np.mean(raw @ (coef * scale)))
    return Fitted(coef * scale, bias, config.terms)


def mix_weight(centering: str) -> float:
    """B of a "mixB" centering."""
    try:
        beta = float(centering[3:]) if centering.startswith("mix") else float("nan")
    except ValueError:
        beta = float("nan")
    if not beta >= 0.0:
        raise ValueError(f"centering {centering!r}: expected none, family or mixB with B >= 0 (e.g. mix0.5)")
    return beta


def check_centering(centering: str) -> None:
    if centering not in ("none", "family"):
        mix_weight(centering)


def fit_mix(design: Design, rows: np.ndarray, y: np.ndarray, families: Sequence[str], config: Config) -> Fitted:
    """The plain fit plus B × the family-centred fit, each divided by the spread of its logits over the
    training rows (so B is a share, not a scale). Measured on the 30-family bank (2026-12-07): the centred fit
    alone ranks answers inside unseen families best but loses the held-out-entity and pooled AUROC (it no
    longer knows that some kinds of question are answered wrong more often); the mix keeps most of both."""
    from dataclasses import replace

    beta = mix_weight(config.centering)
    parts = [fit(design, rows, y, families, replace(config, centering=c)) for c in ("none", "family")]
    terms = design_terms(design, rows, config.terms)
    spreads = [float(np.std(part.logits(design.X[rows], terms))) or 1.0 for part in parts]
    scales = (1.0 / spreads[0], beta / spreads[1])
    return Fitted(parts[0].weights * scales[0] + parts[1].weights * scales[1],
                  parts[0].bias * scales[0] + parts[1].bias * scales[1], config.terms)


# layer → the SAE's decoder (d_sae, d_model), for "residual" probes: set by the caller (cli: from the SAE files).
RESIDUAL_BASES: dict[int, np.ndarray] = {}


def fit_residual(design: Design, rows: np.ndarray, y: np.ndarray, families: Sequence[str], config: Config) -> Fitted:
    """An L2 logistic regression in the residual stream rebuilt from the codes (pooled codes @ W_dec,
    standardized), folded back into one weight per SAE feature: w_f = W_dec[f] · (w / σ), bias b − Σ w μ / σ.
    The same linear function of the pooled codes, so the probe file and the server stay as they are; the
    regulariser prefers directions of the residual stream over single features. Uncertainty terms, when the
    configuration names them, are standardized columns beside the residual's and keep their own weights."""
    from sklearn.linear_model import LogisticRegression

    # One block of columns per layer: that layer's rebuilt residual (several layers: side by side).
    widths = [RESIDUAL_BASES[layer].shape[1] for layer in config.layers]
    offsets = np.cumsum([0, *widths])
    B = np.zeros((design.X.shape[1], int(offsets[-1])))
    for (layer, feature), c in design.columns.items():
        i = config.layers.index(layer)
        B[c, offsets[i]:offsets[i + 1]] = RESIDUAL_BASES[layer][feature]
    R = np.asarray(design.X[rows] @ B)
    if config.terms:
        R = np.hstack([R, design_terms(design, rows, config.terms)])
    raw_mean = R.mean(axis=0)
    if config.centering == "family":
        R = center_by_family(R, families)
    mu, sd = R.mean(axis=0), R.std(axis=0) + 1e-6
    d_model = int(offsets[-1])
    # Standardized columns; the terms' then times term_scale, so their penalty is weaker (Config.term_scale).
    unit = sd.copy()
    unit[d_model:] /= config.term_scale
    weights = sample_weights(families, y) if config.family_weights else None
    model = LogisticRegression(C=config.C, max_iter=3000, class_weight=None if config.family_weights else "balanced")
    model.fit((R - mu) / unit, y, sample_weight=weights)
    w = model.coef_.ravel() / unit
    # Centred fits: the mean raw logit lands where the centred fit's mean logit was.
    bias = float(model.intercept_[0] - w @ (raw_mean if config.centering == "family" else mu))
    return Fitted(np.r_[B @ w[:d_model], w[d_model:]], bias, config.terms)


def design_terms(design: Design, rows: np.ndarray, names: Sequence[str]) -> np.ndarray:
    return design.terms[rows][:, [TERMS.index(t) for t in names]]


# A family's AUROC is reported when it has at least this many answers of each label: with one or two right
# answers among a hundred wrong ones (the model gets almost no Roman numeral right) it is noise.
MIN_PER_CLASS = 5


def auroc(y: np.ndarray, scores: np.ndarray, min_per_class: int = 1) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(set(y.tolist())) < 2 or min(int(y.sum()), int(len(y) - y.sum())) < min_per_class:
        return None
    return float(roc_auc_score(y, scores))


@dataclass
class Fold:
    family: str
    n: int
    positive_rate: float
    auroc: float | None
    probs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    y: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    logits: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # the fold's raw logits


def lofo(records: Sequence[dict], design: Design, config: Config, calibrate: bool = False,
         train_rows: np.ndarray | None = None, log: Callable[[str], None] | None = None) -> list[Fold]:
    """Leave-one-family-out: for each family, fit on the other families' rows among `train_rows` (default all),
    score every row of the family. With `calibrate`, the other families' val-split rows set a Platt
    calibration (fit then on their train split only) and each fold carries calibrated probabilities."""
    fams = np.asarray([r["domain"] for r in records])
    y = np.asarray([r["label"] for r in records])
    split = np.asarray([r.get("split", "train") for r in records])
    pool = np.arange(len(records)) if train_rows is None else np.asarray(train_rows)
    folds = []
    for family in sorted(set(fams.tolist())):
        test = np.flatnonzero(fams == family)
        rest = pool[fams[pool] != family]
        fit_rows = rest[split[rest] == "train"] if calibrate else rest
        model = fit(design, fit_rows, y[fit_rows], fams[fit_rows].tolist(), config)
        z = model.logits(design.X[test], design_terms(design, test, config.terms))
        probs = np.zeros(0)
        if calibrate:
            cal_rows = rest[split[rest] == "val"]
            zc = model.logits(design.X[cal_rows], design_terms(design, cal_rows, config.terms))
            cal = platt(zc, y[cal_rows])
            probs = 1.0 / (1.0 + np.exp(-(cal["a"] * z + cal["b"])))
        folds.append(Fold(family, len(test), float(y[test].mean()), auroc(y[test], z, MIN_PER_CLASS), probs,
                          y[test], z))
        if log:
            log(f"  {config.name()} without {family}: {folds[-1].auroc}")
    return folds


def mean_auroc(folds: Iterable[Fold]) -> float:
    values = [f.auroc for f in folds if f.auroc is not None]
    return float(np.mean(values)) if values else float("nan")


def pooled_auroc(folds: Sequence[Fold]) -> float | None:
    """AUROC over every held-out family's answers together, each scored by the fit that never saw its family:
    what a dashboard over mixed traffic of unseen kinds sees (a family of made-up answers must score above a
    family of right ones, not only rank its own answers). Per-family AUROC ignores that."""
    if not folds:
        return None
    return auroc(np.concatenate([f.y for f in folds]), np.concatenate([f.logits for f in folds]))


def entity_auroc(records: Sequence[dict], design: Design, config: Config) -> float | None:
    """Held-out entities of the training families: fit on the train split, score the val split."""
    split = np.asarray([r.get("split", "train") for r in records])
    y = np.asarray([r["label"] for r in records])
    fams = [r["domain"] for r in records]
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    if not len(train) or not len(val):
        return None
    model = fit(design, train, y[train], [fams[i] for i in train], config)
    return auroc(y[val], model.logits(design.X[val], design_terms(design, val, config.terms)))


def grid(layer_sets: Sequence[tuple[int, ...]], poolings: Sequence[str] = ("mean", "max"),
         transforms: Sequence[str] = ("identity",), term_sets: Sequence[tuple[str, ...]] = ((),),
         Cs: Sequence[float] = (0.01, 0.03, 0.1), family_weights: Sequence[bool] = (True,),
         penalties: Sequence[tuple[str, int]] = (("l1", 0),),
         centerings: Sequence[str] = ("none",), term_scales: Sequence[float] = (1.0,)) -> list[Config]:
    """Every combination; `penalties`: (penalty, max_features) pairs. A term scale only varies configurations
    with terms (without, every scale is the same fit)."""
    return [Config(tuple(ls), p, t, tuple(ts), C, fw, pen, top, ce, s) for ls in layer_sets for p in poolings
            for t in transforms for ts in term_sets for C in Cs for fw in family_weights for pen, top in penalties
            for ce in centerings for s in (term_scales if ts else term_scales[:1])]


def select(records: Sequence[dict], configs: Sequence[Config], log: Callable[[str], None] = print,
           one_se_fewer_layers: bool = True, min_entity_auroc: float = 0.0,
           keep_within: float | None = None) -> tuple[Config, list[dict]]:
    """Mean LOFO AUROC of each configuration over the train+val rows (test-split entities never used). The
    highest wins, or with `one_se_fewer_layers`, the one with the fewest layers within one standard error of it
    (every probe layer costs the server an SAE encode per token). Only configurations whose held-out-entity
    AUROC (fit on train, scored on val) reaches `min_entity_auroc` compete, when any does: a fit that ranks
    answers inside unseen families a little better but has forgotten which answers of known families are
    made up is no better probe. Each row also keeps the pooled LOFO AUROC (`pooled_auroc`). With
    `keep_within`, a configuration competes only if its pooled LOFO AUROC and its held-out-entity AUROC are
    each within that much of the best in the table: the per-family mean is not bought with the others."""
    rows = np.flatnonzero(np.asarray([r.get("split", "train") != "test" for r in records]))
    sub = [records[i] for i in rows]
    designs: dict[tuple[Any, ...], Design] = {}
    table: list[dict[str, Any]] = []
    for config in configs:
        key = (config.layers, config.pooling, config.transform)
        if key not in designs:
            designs[key] = build_design(sub, config.layers, config.pooling, config.transform)
        folds = lofo(sub, designs[key], config)
        row: dict[str, Any] = {"config": config.name(), **config.row(),
               "lofo_pooled_auroc": _round(pooled_auroc(folds)),
               "entity_val_auroc": _round(entity_auroc(sub, designs[key], config)),
               "lofo_mean_auroc": round(mean_auroc(folds), 4),
               "lofo_min_auroc": round(min(f.auroc for f in folds if f.auroc is not None), 4),
               "by_family": {f.family: None if f.auroc is None else round(f.auroc, 4) for f in folds}}
        table.append(row)
        log(f"{row['config']}: LOFO mean {row['lofo_mean_auroc']} min {row['lofo_min_auroc']} pooled "
            f"{row['lofo_pooled_auroc']}; held-out entities (val) {row['entity_val_auroc']}")
    return configs[choose(table, configs, log, one_se_fewer_layers, min_entity_auroc, keep_within)], table


def choose(table: Sequence[Mapping[str, Any]], configs: Sequence[Config], log: Callable[[str], None] = print,
           one_se_fewer_layers: bool = True, min_entity_auroc: float = 0.0, keep_within: float | None = None) -> int:
    """The index `select` picks from its table (see there); also applied to a saved table by
    `risk select --rechoose`, so a rule can change without refitting the grid."""
    eligible = [i for i, row in enumerate(table) if (row.get("entity_val_auroc") or 0.0) >= min_entity_auroc]
    if keep_within is not None:
        tops = {key: max((row.get(key) or 0.0) for row in table) for key in ("lofo_pooled_auroc", "entity_val_auroc")}
        eligible = [i for i in eligible
                    if all((table[i].get(key) or 0.0) >= top - keep_within for key, top in tops.items())]
    if not eligible:
        log(f"no configuration reaches held-out-entity AUROC {min_entity_auroc} (and keeps within "
            f"{keep_within} of the best pooled and entity AUROC): choosing among all")
        eligible = list(range(len(table)))
    best = max(eligible, key=lambda i: table[i]["lofo_mean_auroc"])
    chosen = best
    if one_se_fewer_layers:
        # The standard error of a mean over families: their spread / sqrt(number of families).
        values = [v for v in table[best]["by_family"].values() if v is not None]
        se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        close = [i for i in eligible if table[i]["lofo_mean_auroc"] >= table[best]["lofo_mean_auroc"] - se]
        chosen = min(close, key=lambda i: (len(configs[i].layers), -table[i]["lofo_mean_auroc"]))
    return chosen


def config_from_row(row: Mapping[str, Any]) -> Config:
    """The Config of a `select` table row (or of a selection file's "chosen", or a probe's metrics with its
    layers, pooling, transform and terms): `Config.row` read back, older files' missing fields defaulted."""
    return Config(tuple(row["layers"]), row["pooling"], row["transform"], tuple(row["terms"]), float(row["C"]),
                  bool(row["family_weights"]), row.get("penalty", "l1"), int(row.get("max_features", 0)),
                  row.get("centering", "none"), float(row.get("term_scale", 1.0)))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ------------------------------------------------------------------------------------------------- OOD

def feature_counts(records: Sequence[dict], layers: Sequence[int], k: int) -> dict[int, np.ndarray]:
    """Per layer: in how many answers each feature is among some scored token's top-k codes."""
    counts: dict[int, np.ndarray] = {}
    for layer in layers:
        d = 1 + max((max(idx[:k], default=0) for r in records for idx in r["features"][str(layer)]["idx"]),
                    default=0)
        c = np.zeros(max(d, 1), dtype=np.int64)
        for r in records:
            seen = {f for idx, val in zip(r["features"][str(layer)]["idx"], r["features"][str(layer)]["val"],
                                          strict=False)
                    for f, v in zip(idx[:k], val[:k], strict=False) if v > 0}
            c[list(seen)] += 1
        counts[layer] = c
    return counts


def unseen_sets(counts: Mapping[int, np.ndarray], d_sae: Mapping[int, int], min_count: int) -> dict[int, list[int]]:
    """Per layer: the feature ids seen in fewer than `min_count` training answers (all ids up to d_sae)."""
    out = {}
    for layer, c in counts.items():
        full = np.zeros(d_sae[layer], dtype=np.int64)
        full[: min(len(c), d_sae[layer])] = c[: d_sae[layer]]
        out[layer] = np.flatnonzero(full < min_count).tolist()
    return out


def ood_scores(records: Sequence[dict], unseen: Mapping[int, Iterable[int]], k: int) -> np.ndarray:
    """risk_probe.ood_share per record: unseen codes / (scored tokens × k), averaged over the layers."""
    from featurelens.server.interp.risk_probe import ood_share

    sets = {layer: frozenset(ids) for layer, ids in unseen.items()}
    out = []
    for r in records:
        tokens = [{layer: list(zip(r["features"][str(layer)]["idx"][t], r["features"][str(layer)]["val"][t],
                                   strict=False)) for layer in sets}
                  for t in range(len(r["token_ids"]))]
        out.append(ood_share(sets, tokens, k))
    return np.asarray(out)


def code_vectors(records: Sequence[dict], layer: int, k: int, d: int) -> Any:
    """(n, d) CSR of each record's code vector (risk_probe.pooled_codes: mean over its scored tokens of their
    first k fired codes at `layer`), rows of unit norm (zero rows stay zero)."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    for i, r in enumerate(records):
        entry = r["features"][str(layer)]
        n_tokens = len(r["token_ids"])
        pooled: dict[int, float] = {}
        for idx, val in list(zip(entry["idx"], entry["val"], strict=False))[:n_tokens]:
            for f, v in list(zip(idx, val, strict=False))[:k]:
                if v > 0:
                    pooled[int(f)] = pooled.get(int(f), 0.0) + float(v) / n_tokens
        norm = math.sqrt(sum(v * v for v in pooled.values())) or 1.0
        rows += [i] * len(pooled)
        cols += list(pooled)
        vals += [v / norm for v in pooled.values()]
    return sparse.csr_matrix((np.asarray(vals), (rows, cols)), shape=(len(records), d))


def nearest_reference(records: Sequence[dict], layer: int, k: int, d: int) -> Any:
    """risk_probe.OodReference of the records' unit code vectors (float16 values, as stored in the file)."""
    from featurelens.server.interp.risk_probe import OodReference

    X = code_vectors(records, layer, k, d)
    X.sort_indices()
    return OodReference(X.indptr.astype(np.int64), X.indices.astype(np.int64),
                        X.data.astype(np.float16).astype(np.float32), d)


def nearest_scores(records: Sequence[dict], reference: Any, layer: int, k: int) -> np.ndarray:
    """risk_probe.ood_nearest per record (vectorised): 1 − max cosine similarity to the reference rows."""
    from scipy import sparse

    R = sparse.csr_matrix((reference.values, reference.indices, reference.indptr),
                          shape=(len(reference.indptr) - 1, reference.d))
    X = code_vectors(records, layer, k, reference.d)
    sims = (X @ R.T).toarray() if len(records) else np.zeros((0, 1))
    best = sims.max(axis=1) if sims.shape[1] else np.zeros(len(records))
    empty = np.asarray(X.getnnz(axis=1) == 0)
    return np.where(empty, 0.0, 1.0 - np.clip(best, 0.0, 1.0))


def ood_lofo(records: Sequence[dict], layers: Sequence[int], d_sae: Mapping[int, int], k: int,
             min_counts: Sequence[int] = (1, 2, 5, 10), method: str = "unseen_share") -> dict[str, Any]:
    """For each held-out family D: the unseen set from the other families' train split; OOD AUROC of D's
    answers (positives) against the other families' test-split answers (held-out entities, negatives).
    Reported per min_count: the mean over folds and the pooled AUROC (every fold's scores together)."""
    fams = np.asarray([r["domain"] for r in records])
    split = np.asarray([r.get("split", "train") for r in records])
    out: dict[str, Any] = {}
    layer = max(layers)
    for m in (min_counts if method == "unseen_share" else (0,)):
        per_family, pooled_s, pooled_y = {}, [], []
        for family in sorted(set(fams.tolist())):
            train = [r for r, f, s in zip(records, fams, split, strict=True) if f != family and s == "train"]
            held_fam = [r for r, f in zip(records, fams, strict=True) if f == family]
            held_ent = [r for r, f, s in zip(records, fams, split, strict=True) if f != family and s == "test"]
            if method == "nearest_cosine":
                reference = nearest_reference(train, layer, k, d_sae[layer])
                s_fam, s_ent = nearest_scores(held_fam, reference, layer, k), nearest_scores(held_ent, reference,
                                                                                             layer, k)
            else:
                unseen = unseen_sets(feature_counts(train, layers, k), d_sae, m)
                s_fam, s_ent = ood_scores(held_fam, unseen, k), ood_scores(held_ent, unseen, k)
            y = np.r_[np.ones(len(s_fam)), np.zeros(len(s_ent))]
            scores = np.r_[s_fam, s_ent]
            per_family[family] = {"auroc": auroc(y, scores), "family_mean": float(s_fam.mean()),
                                  "entities_mean": float(s_ent.mean())}
            pooled_s.append(scores)
            pooled_y.append(y)
        values = [v["auroc"] for v in per_family.values() if v["auroc"] is not None]
        out[str(m) if method == "unseen_share" else method] = {"mean_auroc": float(np.mean(values)), "min_auroc": float(np.min(values)),
                       "pooled_auroc": auroc(np.concatenate(pooled_y), np.concatenate(pooled_s)),
                       "by_family": per_family}
    return out


def standard_error(auc: float, y: np.ndarray) -> float:
    return auroc_standard_error(auc, int(y.sum()), int(len(y) - y.sum()))


# ------------------------------------------------------------------------------------------ the probe

def train_final(records: Sequence[dict], config: Config, probe_id: str, d_sae: Mapping[int, int], k: int,
                min_count: int, metrics: dict[str, Any] | None = None, ood_method: str = "nearest_cosine") -> Any:
    """The shipped probe for `config`: fit on every family's train split, Platt-calibrated and thresholded on
    the val split, with the OOD reference (features seen in fewer than `min_count` train answers)."""
    from featurelens.server.interp.risk_probe import Probe, ProbeFeature, ProbeTerm
    from featurelens.server.offline.risk.train import choose_thresholds

    split = np.asarray([r.get("split", "train") for r in records])
    y = np.asarray([r["label"] for r in records])
    fams = [r["domain"] for r in records]
    design = build_design(records, config.layers, config.pooling, config.transform)
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    model = fit(design, train, y[train], [fams[i] for i in train], config)
    d = design.X.shape[1]
    inverse = {c: key for key, c in design.columns.items()}
    sae_ids = {int(layer): v["sae_id"] for layer, v in records[0]["features"].items()}
    features = [ProbeFeature(layer=inverse[c][0], sae_id=sae_ids[inverse[c][0]], feature_id=int(inverse[c][1]),
                             weight=round(float(w), 6)) for c, w in enumerate(model.weights[:d]) if abs(w) > 1e-9]
    features.sort(key=lambda f: -abs(f.weight))
    terms = [ProbeTerm(name=name, weight=round(float(w), 6))
             for name, w in zip(config.terms, model.weights[d:], strict=True) if abs(w) > 1e-9]
    train_records = [records[i] for i in train]
    test_records = [records[i] for i in split_rows(split, "test")]
    layer = max(config.layers)
    if ood_method == "nearest_cosine":
        ref = nearest_reference(train_records, layer, k, d_sae[layer])
        held = nearest_scores(test_records, ref, layer, k)
        ood: dict[str, Any] = {"method": "nearest_cosine", "layer": layer, "k": k, "n_reference": len(train)}
    else:
        unseen = unseen_sets(feature_counts(train_records, config.layers, k), d_sae, min_count)
        held = ood_scores(test_records, unseen, k)
        ood = {"method": "unseen_share", "min_count": min_count, "k": k,
               "unseen": {str(layer): ids for layer, ids in unseen.items()}}
    ood["reference"] = {"heldout_entities_median": round(float(np.median(held)), 4),
                        "heldout_entities_p95": round(float(np.quantile(held, 0.95)), 4)}
    probe = Probe(probe_id=probe_id, features=features, bias=round(model.bias, 6), pooling=config.pooling,
                  input_transform=config.transform, terms=terms, version=2, ood=ood)
    if ood_method == "nearest_cosine":
        probe.ood_reference = ref
    zv = model.logits(design.X[val], design_terms(design, val, config.terms))
    probe.calibration = platt(zv, y[val])
    pv = 1.0 / (1.0 + np.exp(-(probe.calibration["a"] * zv + probe.calibration["b"])))
    probe.thresholds = choose_thresholds(pv, y[val])
    # The fit's settings; layers, pooling, transform and terms are the probe file's own fields.
    fit_settings = {key: value for key, value in config.row().items()
                    if key not in ("layers", "pooling", "transform", "terms")}
    probe.metrics = {"feature_top_k": k, "config": config.name(), **fit_settings, "n_train": len(train), "n_val": len(val),
                     "val_auroc": round(auroc(y[val], zv) or float("nan"), 4), **(metrics or {})}
    return probe


def split_rows(split: np.ndarray, name: str) -> np.ndarray:
    return np.flatnonzero(split == name)


def probe_scores(probe: Any, records: Sequence[dict]) -> np.ndarray:
    """Raw logits of a (v1 or v2) probe on records, the server's semantics in bulk (train.probe_logits)."""
    from featurelens.server.offline.risk.train import probe_logits

    return np.asarray(probe_logits(probe, records), dtype=np.float64)
