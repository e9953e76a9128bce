"""Generalization machinery of the risk probe (offline/risk/generalize.py) and the v2 probe file: leave-one-
family-out selection picks the signal that transfers to unseen families, the OOD share is higher for a family
absent from training than for held-out entities, and the served v2 scoring (uncertainty terms, OOD share)
equals the offline reference token by token."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from featurelens.server.interp import risk_probe as rp
from featurelens.server.interp.risk import RiskProbe
from featurelens.server.offline.risk import generalize as gz
from featurelens.server.worker.extension import ProbeLayer

FAMILIES = [f"fam{i}" for i in range(8)]


def _record(family: str, label: int, split: str, rng: np.random.Generator, fam_index: int,
            topic_shift: int = 0) -> dict:
    """Layer 1: feature 0 fires (noisily) on hallucinated answers in every family — the transferable signal.
    Layer 2: a family-specific feature (10 + family index) fires exactly on that family's hallucinated
    answers — perfect inside the training families, meaningless on a family never seen. Both layers also
    carry the family's topic features (100 + 5·family ...), which the OOD share should notice."""
    tokens = 3
    idx1, val1, idx2, val2 = [], [], [], []
    topic = [100 + 5 * fam_index + j + topic_shift for j in range(3)]
    for _ in range(tokens):
        ids1 = list(topic) + [int(rng.integers(40, 60))]
        vals1 = [1.0, 1.0, 1.0, 1.0]
        if rng.random() < (0.8 if label else 0.3):
            ids1.append(0)
            vals1.append(float(rng.uniform(1.0, 2.0)))
        ids2 = list(topic) + [int(rng.integers(40, 60))]
        vals2 = [1.0, 1.0, 1.0, 1.0]
        if label:
            ids2.append(10 + fam_index)
            vals2.append(2.0)
        idx1.append(ids1)
        val1.append(vals1)
        idx2.append(ids2)
        val2.append(vals2)
    return {"domain": family, "label": label, "split": split, "token_ids": list(range(tokens)),
            "logprobs": [-0.1] * tokens, "features": {"1": {"sae_id": "s1", "idx": idx1, "val": val1},
                                                      "2": {"sae_id": "s2", "idx": idx2, "val": val2}}}


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(3)
    records = []
    for i, family in enumerate(FAMILIES):
        for j in range(60):
            split = ("train", "train", "train", "val", "test")[j % 5]
            records.append(_record(family, int(rng.random() < 0.5), split, rng, i))
    return records


def test_lofo_selection_picks_the_signal_that_transfers(synthetic):
    configs = gz.grid([(1,), (2,)], poolings=("mean",), Cs=(0.3,))
    # Inside the training families (fit on train, score val) the family-specific layer looks better...
    in_family = {}
    y = np.asarray([r["label"] for r in synthetic])
    split = np.asarray([r["split"] for r in synthetic])
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    for config in configs:
        design = gz.build_design(synthetic, config.layers, config.pooling, config.transform)
        model = gz.fit(design, train, y[train], [synthetic[i]["domain"] for i in train], config)
        in_family[config.layers] = gz.auroc(y[val], model.logits(design.X[val], design.terms[val][:, :0]))
    assert in_family[(2,)] > in_family[(1,)] + 0.1
    # ...but on families left out it is chance, and LOFO selection picks the transferable layer.
    chosen, table = gz.select(synthetic, configs, log=lambda _m: None, one_se_fewer_layers=False)
    assert chosen.layers == (1,)
    by = {tuple(row["layers"]): row["lofo_mean_auroc"] for row in table}
    assert by[(1,)] > 0.75 and by[(2,)] < 0.65
    # The pooled LOFO AUROC and the held-out-entity AUROC (train → val) are kept per configuration.
    entity = {tuple(row["layers"]): row["entity_val_auroc"] for row in table}
    assert entity[(2,)] == pytest.approx(in_family[(2,)], abs=1e-4)
    assert entity[(1,)] == pytest.approx(in_family[(1,)], abs=1e-4)
    assert all(0.0 <= row["lofo_pooled_auroc"] <= 1.0 for row in table)
    # A floor on held-out entities that only the family-specific layer reaches makes it the only candidate.
    floor = (entity[(1,)] + entity[(2,)]) / 2
    chosen, _ = gz.select(synthetic, configs, log=lambda _m: None, one_se_fewer_layers=False, min_entity_auroc=floor)
    assert chosen.layers == (2,)
    # Keeping within a margin of the best pooled and entity AUROC: layer 1 is far below on entities, layer 2
    # on the pooled figure, so a tight margin leaves neither (and says so); a wide one leaves both.
    pooled = {tuple(row["layers"]): row["lofo_pooled_auroc"] for row in table}
    assert pooled[(1,)] > pooled[(2,)] + 0.1
    said: list[str] = []
    gz.select(synthetic, configs, log=said.append, one_se_fewer_layers=False,
              keep_within=(entity[(2,)] - entity[(1,)]) / 2)
    assert any("no configuration reaches" in m for m in said)
    chosen, _ = gz.select(synthetic, configs, log=lambda _m: None, one_se_fewer_layers=False, keep_within=1.0)
    assert chosen.layers == (1,)
    # A floor nothing reaches leaves every configuration in (and says so).
    said = []
    chosen, _ = gz.select(synthetic, configs, log=said.append, one_se_fewer_layers=False, min_entity_auroc=1.01)
    assert chosen.layers == (1,) and any("no configuration reaches" in m for m in said)


def _difficulty_records(seed: int) -> list[dict]:
    """Feature 0 fires a little more often on hallucinated answers in every family (weak, transferable).
    Feature 1 tracks how hard the family is: its value is the family's hallucination rate plus per-answer
    noise that has nothing to do with the answer's label. Across families it predicts the label well; inside
    one family it is noise."""
    rng = np.random.default_rng(seed)
    records = []
    for i, family in enumerate(FAMILIES):
        rate = 0.1 + 0.8 * i / (len(FAMILIES) - 1)
        for j in range(80):
            label = int(rng.random() < rate)
            idx, val = [], []
            for _ in range(3):
                ids, vals = [1, int(rng.integers(40, 60))], [max(0.01, 6 * rate + float(rng.normal(0, 1.0))), 1.0]
                if rng.random() < (0.6 if label else 0.35):
                    ids.append(0)
                    vals.append(float(rng.uniform(1.0, 2.0)))
                idx.append(ids)
                val.append(vals)
            records.append({"domain": family, "label": label, "split": ("train", "train", "val", "test")[j % 4],
                            "token_ids": [0, 1, 2], "logprobs": [-0.1] * 3,
                            "features": {"1": {"sae_id": "s1", "idx": idx, "val": val}}})
    return records


def test_family_centering_learns_the_within_family_signal():
    records = _difficulty_records(5)
    plain, centred = (gz.Config((1,), "mean", C=1.0, family_weights=False, penalty="l2", centering=c)
                      for c in ("none", "family"))
    design = gz.build_design(records, (1,), "mean", "identity")
    y = np.asarray([r["label"] for r in records])
    rows = np.arange(len(records))
    fams = [r["domain"] for r in records]
    col = {f: design.columns[(1, f)] for f in (0, 1)}
    sd = design.X.toarray().std(axis=0)

    def standardized(config: gz.Config) -> dict[int, float]:
        w = gz.fit(design, rows, y, fams, config).weights
        return {f: abs(w[c]) * sd[c] for f, c in col.items()}

    w_plain, w_centred = standardized(plain), standardized(centred)
    # The plain fit leans on the difficulty feature (it explains the families' base rates) at least as much
    # as on the answer-level one; the centred fit mostly on the one that separates answers inside a family.
    assert w_plain[1] > w_plain[0]
    assert w_centred[0] > w_centred[1]
    # On families left out, that is what ranks their answers.
    lofo_plain = gz.mean_auroc(gz.lofo(records, design, plain))
    lofo_centred = gz.mean_auroc(gz.lofo(records, design, centred))
    assert lofo_centred > lofo_plain + 0.02
    # The intercept is set on raw inputs: the mean raw logit is the centred fit's mean logit (about the
    # log-odds of the classes), not shifted by the families' mean activations.
    fitted = gz.fit(design, rows, y, fams, centred)
    assert abs(float(np.mean(fitted.logits(design.X, design.terms[:, :0])))) < 1.0


def test_center_by_family_removes_each_familys_mean():
    M = np.asarray([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0], [20.0, 0.0]])
    out = gz.center_by_family(M, ["a", "a", "b", "b"])
    assert out.tolist() == [[-1.0, -2.0], [1.0, 2.0], [-5.0, 0.0], [5.0, 0.0]]
    assert M[0, 0] == 1.0  # the input is left alone


def test_family_weights_give_every_family_the_same_total():
    y = np.asarray([1, 1, 1, 0, 1, 0])
    w = gz.sample_weights(["a", "a", "a", "a", "b", "b"], y)
    assert w[:4].sum() == pytest.approx(w[4:].sum())
    assert w[:3].sum() == pytest.approx(w[3])  # within a family, each class half


def test_ood_share_is_higher_for_a_family_absent_from_training(synthetic):
    report = gz.ood_lofo(synthetic, [1], {1: 200}, k=8, min_counts=(1,))["1"]
    for family, row in report["by_family"].items():
        assert row["family_mean"] > row["entities_mean"], family
    assert report["mean_auroc"] > 0.95


def test_ood_share_by_hand():
    unseen = {3: frozenset({7, 9})}
    tokens = [{3: [(7, 1.0), (1, 2.0), (9, 0.0)]}, {3: [(9, 0.5), (7, 0.1)]}]
    # token 1: 7 counts (9 has value 0); token 2: both; k = 2 → 3 of 2 × 2 codes.
    assert rp.ood_share(unseen, tokens, 2) == pytest.approx(3 / 4)
    assert rp.ood_share(unseen, tokens, 1) == pytest.approx(2 / 2)
    assert rp.ood_share({}, tokens, 2) == 0.0 and rp.ood_share(unseen, [], 2) == 0.0


def _v2_file(tmp_path, pooling: str, transform: str = "identity"):
    rng = np.random.default_rng(11)
    features = [{"layer": layer, "sae_id": f"s{layer}", "feature_id": int(f), "weight": float(w)}
                for layer in (3, 5) for f, w in zip(rng.choice(20, 5, replace=False), rng.normal(size=5), strict=True)]
    data = {"probe_id": "p2", "version": 2, "kind": "sparse_logreg", "model": "m", "features": features,
            "bias": 0.2, "pooling": pooling, "input_transform": transform,
            "calibration": {"method": "platt", "a": 1.3, "b": -0.1}, "thresholds": {"medium": 0.5, "high": 0.8},
            "metrics": {"feature_top_k": 4},
            "terms": [{"name": "neg_mean_logprob", "weight": 0.7}, {"name": "neg_first_logprob", "weight": -0.2},
                      {"name": "neg_min_logprob", "weight": 0.3}],
            "ood": {"method": "unseen_share", "min_count": 1, "k": 4,
                    "unseen": {"3": [0, 1, 2, 3, 4, 5], "5": [15, 16, 17, 18, 19]}}}
    path = tmp_path / "p2.json"
    path.write_text(json.dumps(data))
    return path


def test_the_server_loads_a_probe_with_uncertainty_terms_and_names_them(tmp_path):
    served = RiskProbe.load(_v2_file(tmp_path, "mean"))
    assert served.needs_logprobs
    running = served.start()
    for lp in (-0.5, -2.0, -0.1):
        running.add_logprob(lp)
        running.add({3: (np.asarray([0]), np.asarray([1.0])), 5: (np.asarray([15]), np.asarray([1.0]))})
    out = running.response_risk()
    terms = {t.name: t for t in out.terms}
    assert set(terms) == {"neg_mean_logprob", "neg_min_logprob", "neg_first_logprob"}
    assert terms["neg_mean_logprob"].value == pytest.approx(2.6 / 3, rel=1e-6)
    assert terms["neg_min_logprob"].value == pytest.approx(2.0) and terms["neg_first_logprob"].value == pytest.approx(0.5)
    assert terms["neg_mean_logprob"].contribution == pytest.approx(0.7 * 2.6 / 3, rel=1e-6)
    # Without terms the response names none.
    assert not RiskProbe(rp.Probe(probe_id="p", features=[], bias=0.0), 0.5, 0.8).start().response_risk().terms


@pytest.mark.parametrize("pooling", ["mean", "max", "last_prompt"])
def test_v2_served_scores_equal_the_offline_reference(tmp_path, pooling):
    """Uncertainty terms and the OOD share, served (per-token codes or the worker's per-row linear term plus
    the codes it ships) and offline (risk_probe.running_risks / ood_share), token by token. (RunningRisk
    implements the terms, add_logprob; the server feeds it each scored token's logprob.)"""
    path = _v2_file(tmp_path, pooling)
    reference = rp.load_probe(path)
    served = RiskProbe(reference, 0.5, 0.8)
    # The worker ships the unseen features too, with weight 0: the linear term is the probe's alone.
    workers = {layer: ProbeLayer.build(20, served.feature_ids[layer], served.feature_weights[layer], "identity")
               for layer in (3, 5)}
    assert set(served.feature_ids[3]) >= set(range(6)) and set(served.feature_ids[5]) >= set(range(15, 20))
    rng = np.random.default_rng(5)
    running, scored = served.start(), served.start()
    tokens, raw, shipped, logprobs = [], [], [], []
    for _ in range(10):
        token = {}
        for layer in (3, 5):
            idx = rng.choice(20, 4, replace=False).astype(np.int64)
            val = np.where(rng.random(4) < 0.2, 0.0, rng.exponential(2.0, 4)).astype(np.float32)
            token[layer] = (idx, val)
        lp = float(-rng.exponential(1.0))
        logprobs.append(lp)
        raw.append(token)
        tokens.append({layer: list(zip(idx.tolist(), val.tolist(), strict=True)) for layer, (idx, val) in token.items()})
        running.add_logprob(lp)
        running.add(token)
        expected = rp.running_risks(reference, tokens, logprobs)[-1]
        assert running.risk() == pytest.approx(expected, rel=1e-6, abs=1e-9)
        # What the worker ships for this token: the probe's and the unseen features present, and the term.
        picked = {}
        term = 0.0
        for layer, (idx, val) in token.items():
            counts, pair_idx, pair_val, _starts, scores = workers[layer].select(val[None], idx[None], 4)
            picked[layer] = (pair_idx.astype(np.int64), pair_val.astype(np.float32))
            term += float(scores[0])
        shipped.append(picked)
        if scored.takes_scores:
            scored.add_logprob(lp)
            assert scored.add_score(term) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    ood = rp.ood_share(reference.ood_sets(), tokens, 4)
    assert running.ood() == pytest.approx(ood) and 0 < ood < 1
    assert running.response_risk().ood == pytest.approx(ood, rel=1e-6)
    if scored.takes_scores:  # the end of a streamed response: the explanation and the OOD share from shipped codes
        scored.pool(shipped)
        assert scored.ood() == pytest.approx(ood)
        assert scored.response_risk().score == pytest.approx(running.response_risk().score, rel=1e-5)


def test_v2_probe_needs_logprobs_and_v1_files_still_load(tmp_path):
    probe = rp.load_probe(_v2_file(tmp_path, "mean"))
    assert probe.needs_logprobs and probe.version == 2
    with pytest.raises(ValueError, match="logprob"):
        rp.running_risks(probe, [{3: [(1, 1.0)]}])
    again = rp.Probe.from_dict(json.loads(json.dumps(probe.to_dict())))
    assert again.terms == probe.terms and again.ood == probe.ood
    v1 = rp.Probe.from_dict({"probe_id": "old", "version": 1, "features": [], "bias": 0.0})
    assert not v1.terms and v1.ood is None and not v1.needs_logprobs and v1.ood_sets() == {}
    assert "terms" not in v1.to_dict()
    with pytest.raises(ValueError, match="uncertainty term"):
        rp.Probe.from_dict({"probe_id": "x", "version": 2, "features": [], "bias": 0.0,
                            "terms": [{"name": "vibes", "weight": 1.0}]})
    with pytest.raises(ValueError, match="version"):
        rp.Probe.from_dict({"probe_id": "x", "version": 3, "features": [], "bias": 0.0})


def test_the_shipped_v2_probe_file_still_loads():
    from featurelens.server.interp.risk import PROBES_DIR

    old = RiskProbe.load(PROBES_DIR / "smollm2-risk-v2.json")
    assert old.probe.version == 1 and not old.unseen and old.start().ood() == 0.0


def test_term_values():
    values = rp.term_values([-0.5, -2.0, -0.1])
    assert values == pytest.approx({"neg_mean_logprob": 2.6 / 3, "neg_min_logprob": 2.0, "neg_first_logprob": 0.5})
    assert rp.term_values([]) == dict.fromkeys(rp.TERMS, 0.0)
    assert not math.isnan(gz.terms_matrix([{"logprobs": [-1.0]}], rp.TERMS).sum())


def _nearest_probe(tmp_path, pooling: str = "mean"):
    """A v2 probe with a "nearest_cosine" OOD reference of three training answers over 20 features."""
    from scipy import sparse

    rng = np.random.default_rng(2)
    dense = np.zeros((3, 20))
    for row in dense:
        row[rng.choice(20, 6, replace=False)] = rng.exponential(1.0, 6)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    X = sparse.csr_matrix(dense)
    probe = rp.Probe(probe_id="near", features=[rp.ProbeFeature(5, "s5", 3, 0.4), rp.ProbeFeature(5, "s5", 9, -0.2)],
                     bias=0.1, pooling=pooling, metrics={"feature_top_k": 4},
                     ood={"method": "nearest_cosine", "layer": 5, "k": 4, "n_reference": 3})
    probe.ood_reference = rp.OodReference(X.indptr, X.indices, X.data.astype(np.float16).astype(np.float32), 20)
    path = rp.save_probe(probe, tmp_path / "near.json")
    return path, dense


def test_nearest_cosine_reference_round_trips_and_scores_by_hand(tmp_path):
    path, dense = _nearest_probe(tmp_path)
    assert (tmp_path / "near.ood.npz").exists()
    probe = rp.load_probe(path)
    assert probe.ood["reference_file"] == "near.ood.npz" and probe.ood_reference is not None
    # A response whose code vector is exactly reference row 1: distance 0 (float16 storage aside).
    ids = np.flatnonzero(dense[1])
    tokens = [{5: [(int(i), float(dense[1, i])) for i in ids[:4]]}, {5: [(int(i), float(dense[1, i])) for i in ids[4:]]}]
    # Each token holds half the features; the mean of the two halves points the same way as row 1.
    assert rp.ood_nearest(probe.ood_reference, tokens, 5, 4) == pytest.approx(0.0, abs=2e-3)
    unused = int(np.flatnonzero(dense.sum(axis=0) == 0)[0])  # no training answer has this feature
    assert rp.ood_nearest(probe.ood_reference, [{5: [(unused, 1.0)]}], 5, 4) == pytest.approx(1.0)
    assert rp.ood_nearest(probe.ood_reference, [], 5, 4) == 0.0


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_nearest_cosine_served_equals_the_reference(tmp_path, pooling):
    path, _ = _nearest_probe(tmp_path, pooling)
    served, reference = RiskProbe.load(path), rp.load_probe(path)
    assert served.reports_ood and served.nearest_layer == 5
    assert sorted(served.feature_ids[5]) == list(range(20))  # the worker ships every code of the layer
    worker = ProbeLayer.build(20, served.feature_ids[5], served.feature_weights[5], "identity")
    rng = np.random.default_rng(9)
    running, scored = served.start(), served.start()
    tokens, shipped = [], []
    for _ in range(6):
        idx = rng.choice(20, 4, replace=False).astype(np.int64)
        val = np.where(rng.random(4) < 0.25, 0.0, rng.exponential(1.0, 4)).astype(np.float32)
        tokens.append({5: list(zip(idx.tolist(), val.tolist(), strict=True))})
        running.add({5: (idx, val)})
        _counts, pair_idx, pair_val, _starts, scores = worker.select(val[None], idx[None], 4)
        shipped.append({5: (pair_idx.astype(np.int64), pair_val.astype(np.float32))})
        if scored.takes_scores:
            scored.add_score(float(scores[0]))
        expected = rp.ood_nearest(reference.ood_reference, tokens, 5, 4)
        assert running.ood() == pytest.approx(expected, abs=1e-9)
        assert running.risk() == pytest.approx(rp.running_risks(reference, tokens)[-1], rel=1e-6)
    if scored.takes_scores:
        scored.pool(shipped)
        assert scored.ood() == pytest.approx(running.ood(), abs=1e-9)
    assert running.response_risk().ood == pytest.approx(running.ood(), rel=1e-6)
    from featurelens.server.offline.risk import generalize as gz

    record = {"token_ids": list(range(len(tokens))),
              "features": {"5": {"idx": [[i for i, _ in t[5]] for t in tokens],
                                 "val": [[v for _, v in t[5]] for t in tokens]}}}
    assert gz.nearest_scores([record], reference.ood_reference, 5, 4)[0] == pytest.approx(running.ood(), abs=1e-6)


def test_nearest_ood_is_higher_for_a_family_absent_from_training(synthetic):
    report = gz.ood_lofo(synthetic, [1], {1: 200}, k=8, method="nearest_cosine")["nearest_cosine"]
    for family, row in report["by_family"].items():
        assert row["family_mean"] > row["entities_mean"], family
    assert report["mean_auroc"] > 0.9


def test_ood_histogram_series():
    from featurelens.server.metrics import Metrics
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.observe_response_ood("smollm2-135m", "dense", 0.07)
    m.observe_response_ood("smollm2-135m", "INFERENCE_MODE_SPARSE", 3.0)  # clamped into [0, 1]
    family = next(f for f in text_string_to_metric_families(m.exposition().decode())
                  if f.name == "featurelens_response_risk_ood")
    assert family.type == "histogram" and family.documentation
    counts = {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name.endswith("_count")}
    assert counts == {(("mode", "dense"), ("model", "smollm2-135m")): 1,
                      (("mode", "sparse"), ("model", "smollm2-135m")): 1}
    sums = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert sorted(sums) == pytest.approx([0.07, 1.0])


def test_client_risk_carries_ood():
    from featurelens.client.types import Risk
    from featurelens.v1 import featurelens_pb2 as pb

    risk = Risk.from_pb(pb.ResponseRisk(score=0.2, label=pb.RISK_LABEL_LOW, probe_id="p", ood=0.25))
    assert risk is not None and risk.ood == pytest.approx(0.25) and risk.label == "low" and risk.terms == []
    risk = Risk.from_pb(pb.ResponseRisk(score=0.2, label=pb.RISK_LABEL_LOW, probe_id="p", terms=[
        pb.RiskTerm(name="neg_mean_logprob", value=1.5, weight=0.4, contribution=0.6)]))
    assert risk is not None and [(t.name, t.value, t.contribution) for t in risk.terms] == [
        ("neg_mean_logprob", 1.5, pytest.approx(0.6))]


def test_residual_probe_over_two_layers_folds_back_to_feature_weights(synthetic, monkeypatch):
    """A residual-direction fit over two layers and the logprob terms: the folded per-feature weights give the
    same logits as the regression on the rebuilt residual streams (codes @ W_dec, side by side, plus terms)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    bases = {1: rng.normal(size=(200, 6)), 2: rng.normal(size=(200, 4))}
    monkeypatch.setattr(gz, "RESIDUAL_BASES", bases)
    terms = ("neg_mean_logprob", "neg_min_logprob")
    records = [r | {"logprobs": [float(-rng.exponential(1.0)) for _ in r["token_ids"]]} for r in synthetic]
    design = gz.build_design(records, (1, 2), "mean", "identity")
    rows = np.arange(len(records))
    y = np.asarray([r["label"] for r in records])
    fams = [r["domain"] for r in records]
    config = gz.Config((1, 2), "mean", "identity", terms, 0.1, False, "residual")
    fitted = gz.fit(design, rows, y, fams, config)
    # The same regression by hand.
    X = design.X.toarray()
    dense = {layer: np.zeros((len(records), 200)) for layer in (1, 2)}
    for (layer, feature), c in design.columns.items():
        dense[layer][:, feature] = X[:, c]
    R = np.hstack([dense[1] @ bases[1], dense[2] @ bases[2], gz.design_terms(design, rows, terms)])
    mu, sd = R.mean(axis=0), R.std(axis=0) + 1e-6
    model = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced").fit((R - mu) / sd, y)
    expected = model.decision_function((R - mu) / sd)
    got = fitted.logits(design.X, gz.design_terms(design, rows, terms))
    assert np.allclose(got, expected, atol=1e-6)
    assert fitted.term_names == terms and len(fitted.weights) == X.shape[1] + 2


def test_term_scale_weakens_the_penalty_on_the_terms(synthetic, monkeypatch):
    """term_scale s: the same regression with the terms' standardized columns times s (their L2 penalty s²
    weaker), folded back to raw weights; under a strong penalty the terms then keep more of their weight.
    The l2 path on the codes does the same."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    bases = {1: rng.normal(size=(200, 6))}
    monkeypatch.setattr(gz, "RESIDUAL_BASES", bases)
    terms = ("neg_mean_logprob", "neg_min_logprob")
    # A logprob that carries the label in every family: the term is worth keeping.
    records = [r | {"logprobs": [float(-rng.exponential(2.0 if r["label"] else 0.5)) for _ in r["token_ids"]]}
               for r in synthetic]
    design = gz.build_design(records, (1,), "mean", "identity")
    rows = np.arange(len(records))
    y = np.asarray([r["label"] for r in records])
    fams = [r["domain"] for r in records]
    X = design.X.toarray()
    dense = np.zeros((len(records), 200))
    for (_, feature), c in design.columns.items():
        dense[:, feature] = X[:, c]
    R = np.hstack([dense @ bases[1], gz.design_terms(design, rows, terms)])
    mu, sd = R.mean(axis=0), R.std(axis=0) + 1e-6
    term_weight = {}
    for s in (1.0, 3.0):
        config = gz.Config((1,), "mean", "identity", terms, 0.003, False, "residual", term_scale=s)
        fitted = gz.fit(design, rows, y, fams, config)
        unit = (R - mu) / sd
        unit[:, 6:] *= s
        model = LogisticRegression(C=0.003, max_iter=3000, class_weight="balanced").fit(unit, y)
        got = fitted.logits(design.X, gz.design_terms(design, rows, terms))
        assert np.allclose(got, model.decision_function(unit), atol=1e-6)
        term_weight[s] = float(np.abs(fitted.weights[-2:] * sd[6:]).sum())  # per standard deviation
        assert ("/ts=3" in config.name()) == (s == 3.0)
    assert term_weight[3.0] > 1.5 * term_weight[1.0]
    # l2 on the codes: the same scaling of the term columns.
    l2 = [gz.fit(design, rows, y, fams, gz.Config((1,), "mean", "identity", terms, 0.003, False, "l2", term_scale=s))
          for s in (1.0, 3.0)]
    assert abs(l2[1].weights[-2]) > abs(l2[0].weights[-2])
    # The grid varies the scale only where there are terms; a saved row restores it.
    configs = gz.grid([(1,)], ["mean"], term_sets=[(), terms], Cs=[0.01], penalties=[("residual", 0)],
                      term_scales=[1.0, 3.0])
    assert [(c.terms, c.term_scale) for c in configs] == [((), 1.0), (terms, 1.0), (terms, 3.0)]
    row = {"layers": [1], "pooling": "mean", "transform": "identity", "terms": list(terms), "C": 0.01,
           "family_weights": False, "penalty": "residual", "term_scale": 3.0}
    assert gz.config_from_row(row).term_scale == 3.0


def test_eval_compares_configurations_under_the_probe_s_own_protocol(synthetic, tmp_path):
    """`risk eval --compare`: a compared probe's configuration is refit exactly as the probe's own (on the
    other families' train split), so comparing a probe with itself gives the same AUROC in every family."""
    from featurelens.server.offline.risk.evaluate import evaluate_generalization

    rng = np.random.default_rng(5)
    records = [r | {"logprobs": [float(-rng.exponential(1.0)) for _ in r["token_ids"]],
                    "entropies": [float(rng.exponential(1.0)) for _ in r["token_ids"]], "qid": f"q{i}"}
               for i, r in enumerate(synthetic)]
    config = gz.Config((1,), "mean", C=0.3, family_weights=False, penalty="l2")
    probe = gz.train_final(records, config, "self", {1: 200, 2: 200}, 5, 1, ood_method="unseen_share")
    from featurelens.server.offline.risk.evaluate import config_of

    assert config_of(probe) == config and gz.config_from_row(config.row()) == config  # the fit settings round-trip
    report = evaluate_generalization(records, probe, tmp_path, compare=[probe], log=lambda _m: None)
    rows = [r for r in report["by_family"] if r["probe_lofo"] is not None]
    assert rows and all(r["self_config_lofo"] == pytest.approx(r["probe_lofo"]) for r in rows)
    assert report["summary"]["self_config_lofo_mean"] == pytest.approx(report["summary"]["lofo_mean_auroc"], abs=1e-4)


def test_mix_centering_sums_the_plain_and_the_centred_fit():
    records = _difficulty_records(5)
    design = gz.build_design(records, (1,), "mean", "identity")
    y = np.asarray([r["label"] for r in records])
    rows = np.arange(len(records))
    fams = [r["domain"] for r in records]
    base = gz.Config((1,), "mean", C=1.0, family_weights=False, penalty="l2")
    parts = [gz.fit(design, rows, y, fams, gz.Config(**{**base.__dict__, "centering": c})) for c in ("none", "family")]
    mixed = gz.fit(design, rows, y, fams, gz.Config(**{**base.__dict__, "centering": "mix0.5"}))
    no_terms = design.terms[:, :0]
    spread = [np.std(p.logits(design.X, no_terms)) for p in parts]
    expected = parts[0].logits(design.X, no_terms) / spread[0] + 0.5 * parts[1].logits(design.X, no_terms) / spread[1]
    assert np.allclose(mixed.logits(design.X, no_terms), expected)
    # mix0 is the plain fit up to scale: the same ranking.
    mix0 = gz.fit(design, rows, y, fams, gz.Config(**{**base.__dict__, "centering": "mix0"}))
    assert np.allclose(mix0.logits(design.X, no_terms) * spread[0], parts[0].logits(design.X, no_terms))
    assert gz.Config(**{**base.__dict__, "centering": "mix0.5"}).name().endswith("/center=mix0.5")
    for bad in ("mix", "mix-1", "mixed", "half"):
        with pytest.raises(ValueError, match="centering"):
            gz.check_centering(bad)
    gz.check_centering("mix1.5")


def test_rechoose_applies_the_rule_to_a_saved_table(synthetic, tmp_path, capsys):
    from featurelens.server.offline.risk.cli import main

    configs = gz.grid([(1,), (2,)], poolings=("mean",), Cs=(0.3,))
    _chosen, table = gz.select(synthetic, configs, log=lambda _m: None, one_se_fewer_layers=False)
    saved = tmp_path / "select.json"
    saved.write_text(json.dumps({"chosen": {}, "table": table, "ood": {}, "feature_top_k": 8}))
    entity = {tuple(row["layers"]): row["entity_val_auroc"] for row in table}
    floor = (entity[(1,)] + entity[(2,)]) / 2
    out = tmp_path / "again.json"
    assert main(["select", "--rechoose", str(saved), "--out", str(out), "--selection", "best",
                 "--min-entity-auroc", str(floor), "--keep-within", "-1"]) == 0
    again = json.loads(out.read_text())
    assert again["chosen"]["layers"] == [2] and again["rule"]["min_entity_auroc"] == floor
    assert gz.config_from_row(again["chosen"]) == configs[1]
    assert main(["select", "--out", str(out)]) == 2  # no data, no saved table
    assert "--data is required" in capsys.readouterr().err
