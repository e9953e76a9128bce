"""Risk pipeline without an engine: grading, splits, probe training on a planted signal, calibration, the
probe file and the exact scoring semantics the server implements."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from featurelens.server.interp import risk_probe as rp
from featurelens.server.offline.risk import data as rd
from featurelens.server.offline.risk import train as rptrain
from featurelens.server.offline.risk.evaluate import ece, ranking_metrics


def _q(answers, fictional=False, case_sensitive=False, domain="capital", entity="country:X"):
    return rd.Question(qid="q", domain=domain, entity=entity, prompt="?", answers=list(answers),
                       fictional=fictional, case_sensitive=case_sensitive)


# -------------------------------------------------------------------------------------------- grading

@pytest.mark.parametrize("response", ["The capital of Colombia is Bogotá.", "bogota", "BOGOTA!", "It's Bogota, D.C."])
def test_grading_accepts_case_punctuation_and_diacritics(response):
    assert rd.grade(_q(["Bogotá"]), response) == {"label": 0, "verdict": "correct"}


def test_grading_accepts_any_alias_and_ignores_articles():
    q = _q(["Pound Sterling", "GBP", "British pound"])
    assert rd.grade(q, "The currency is the British Pound.")["label"] == 0
    assert rd.grade(q, "They pay in GBP")["label"] == 0
    assert rd.grade(q, "The currency is the pound-sterling")["label"] == 0  # hyphen → space
    assert rd.grade(q, "The currency is the euro.") == {"label": 1, "verdict": "wrong"}


def test_grading_matches_whole_words_only():
    assert rd.grade(_q(["Rome"]), "The capital is Romeville.")["label"] == 1
    assert rd.grade(_q(["12"]), "The answer is 123.")["label"] == 1
    assert rd.grade(_q(["1234"]), "The answer is 1,234.")["label"] == 0


def test_grading_case_sensitive_element_symbols():
    q = _q(["Fe"], case_sensitive=True, domain="element")
    assert rd.grade(q, "The chemical symbol for iron is Fe.")["label"] == 0
    assert rd.grade(q, "The symbol is FE or fe maybe")["label"] == 1


@pytest.mark.parametrize("response", [
    "I don't know the capital of Veltrania.", "Veltrania is a fictional country.", "There is no country called Veltrania.",
    "I'm not familiar with Veltrania.", "Veltrania does not exist.", "Veltrania isn't a real place.", "",
])
def test_refusals_about_invented_entities_are_not_hallucinations(response):
    assert rd.grade(_q([], fictional=True), response) == {"label": 0, "verdict": "refusal"}


def test_confident_answer_about_invented_entity_is_a_hallucination():
    assert rd.grade(_q([], fictional=True), "The capital of Veltrania is Veltra City.") == {
        "label": 1, "verdict": "confabulated"}


def test_honest_refusal_on_a_real_question_is_not_a_hallucination():
    assert rd.grade(_q(["Paris"]), "I'm not sure.")["label"] == 0


def test_normalize():
    assert rd.normalize("  The Côte-d'Ivoire!  ") == "cote d ivoire"


# --------------------------------------------------------------------------------------- question bank

@pytest.fixture(scope="module")
def questions():
    return rd.build_questions(seed=0)


def test_question_bank_is_deterministic_and_mixed(questions):
    again = rd.build_questions(seed=0)
    assert [q.qid for q in questions] == [q.qid for q in again]
    assert len({q.qid for q in questions}) == len(questions)
    assert {q.domain for q in questions} == set(rd.DOMAINS)
    for domain in ("capital", "currency", "language", "element", "subdivision"):
        kinds = {q.fictional for q in questions if q.domain == domain}
        assert kinds == {True, False}, domain  # every family but arithmetic has invented entities too
    assert all(q.answers for q in questions if not q.fictional)


def test_known_answers_are_right(questions):
    by_prompt_entity = {(q.domain, q.entity): q for q in questions}
    assert rd.grade(by_prompt_entity[("capital", "country:FRA")], "The capital of France is Paris.")["label"] == 0
    assert rd.grade(by_prompt_entity[("currency", "country:JPN")], "It is the Japanese yen.")["label"] == 0
    assert rd.grade(by_prompt_entity[("language", "country:DEU")], "German.")["label"] == 0


def test_invented_names_are_not_real(questions):
    real = {rd.normalize(q.prompt) for q in questions if not q.fictional}
    fake = [q for q in questions if q.fictional]
    assert fake and not any(rd.normalize(q.prompt) in real for q in fake)


# ---------------------------------------------------------------------------------------------- splits

def test_entity_split_never_leaks(questions):
    rows = rd.assign_splits([q.to_dict() for q in questions])
    splits_of: dict[str, set[str]] = {}
    for row in rows:
        splits_of.setdefault(row["entity"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    # A country's capital, currency and language questions share one entity, hence one split.
    fra = {r["split"] for r in rows if r["entity"] == "country:FRA"}
    assert len(fra) == 1


def test_held_out_domain_split_never_leaks(questions):
    from featurelens.server.offline.risk.evaluate import held_out_domains

    assert callable(held_out_domains)
    rows = rd.assign_splits([q.to_dict() for q in questions])
    for domain in rd.DOMAINS:
        train = [r for r in rows if r["domain"] != domain]
        test = [r for r in rows if r["domain"] == domain]
        assert not {r["qid"] for r in train} & {r["qid"] for r in test}
        assert {r["domain"] for r in train}.isdisjoint({domain})


# ---------------------------------------------------------------------------------- synthetic signal

D_SAE, K = 200, 8
SIGNAL = {(12, 7): 1.5, (12, 42): 1.0, (24, 3): -1.2}


def _synthetic(n: int, seed: int) -> list[dict]:
    """Records whose labels follow a logistic model of three planted features' mean activations; every
    token also has random noise features, as top-k codes."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        n_tok = rng.randint(2, 8)
        feats, pooled = {}, {key: 0.0 for key in SIGNAL}
        for layer in (12, 24):
            idx, val = [], []
            for _ in range(n_tok):
                ids = rng.sample(range(D_SAE), K)
                # The planted features fire on about half the tokens, like a concept that is there or not.
                ids[:3] = [fid for (lay, fid) in SIGNAL if lay == layer and rng.random() < 0.5][:3] + ids[:3]
                ids = list(dict.fromkeys(ids))[:K]
                vals = [round(rng.expovariate(1.0), 4) for _ in ids]
                for fid, v in zip(ids, vals, strict=True):
                    if (layer, fid) in pooled:
                        pooled[(layer, fid)] += v / n_tok
                idx.append(ids)
                val.append(vals)
            feats[str(layer)] = {"sae_id": f"sae-l{layer}", "idx": idx, "val": val}
        logit = -0.3 + 8 * sum(w * pooled[key] for key, w in SIGNAL.items())
        label = int(rng.random() < 1 / (1 + math.exp(-logit)))
        records.append({"qid": str(i), "entity": f"e{i}", "domain": "synthetic", "label": label,
                        "token_ids": list(range(n_tok)), "features": feats, "logprobs": [-1.0] * n_tok,
                        "entropies": [1.0] * n_tok, "true_logit": logit})
    return records


@pytest.fixture(scope="module")
def synthetic_probe():
    train, val, test = _synthetic(1500, 1), _synthetic(600, 2), _synthetic(1500, 3)
    probe, table = rptrain.train_probe(train, val, "synthetic", poolings=["mean"], transforms=["identity"],
                                  log=lambda _m: None)
    return probe, table, test


def test_probe_recovers_planted_signal(synthetic_probe):
    probe, table, test = synthetic_probe
    y = np.asarray([r["label"] for r in test])
    logits = rptrain.probe_logits(probe, test)
    assert ranking_metrics(np.asarray([r["true_logit"] for r in test]), y)["auroc"] > 0.96  # the signal is there
    assert ranking_metrics(logits, y)["auroc"] > 0.95
    top = {(f.layer, f.feature_id): f.weight for f in probe.features[:3]}
    assert set(top) == set(SIGNAL)  # the L1 probe's largest weights are exactly the planted features
    assert all(np.sign(top[k]) == np.sign(w) for k, w in SIGNAL.items())
    assert len(probe.features) < 0.5 * 2 * D_SAE  # sparse
    assert {row["layers"][0] for row in table if len(row["layers"]) == 1} == {12, 24}


def test_calibration_is_good_on_held_out_synthetic_data(synthetic_probe):
    probe, _, test = synthetic_probe
    y = np.asarray([r["label"] for r in test])
    probs = rptrain.calibrated(probe, rptrain.probe_logits(probe, test))
    assert ece(probs, y) < 0.05
    assert 0 < probe.thresholds["medium"] <= probe.thresholds["high"] <= 1


def test_vectorised_and_streaming_scores_agree(synthetic_probe):
    probe, _, test = synthetic_probe
    probs = rptrain.calibrated(probe, rptrain.probe_logits(probe, test[:20]))
    for rec, p in zip(test[:20], probs, strict=True):
        tokens = [{int(layer): list(zip(e["idx"][t], e["val"][t], strict=True)) for layer, e in rec["features"].items()}
                  for t in range(len(rec["token_ids"]))]
        assert rp.running_risks(probe, tokens)[-1] == pytest.approx(p, abs=1e-9)


# ----------------------------------------------------------------------------------- file & semantics

def _hand_probe(pooling="mean", transform="identity"):
    return rp.Probe(probe_id="hand", features=[rp.ProbeFeature(12, "saeA", 5, 2.0),
                                               rp.ProbeFeature(24, "saeB", 9, -1.0)],
                    bias=-1.0, pooling=pooling, input_transform=transform,
                    calibration={"method": "platt", "a": 0.5, "b": 0.25}, thresholds={"medium": 0.3, "high": 0.6})


TOKENS = [{12: [(5, 1.0), (77, 3.0)], 24: [(9, 2.0)]},   # t=1
          {12: [(77, 1.0)], 24: []},                     # t=2: feature 5 absent from the top-k → 0
          {12: [(5, 4.0)], 24: [(9, 1.0), (1, 9.0)]}]    # t=3


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_score_follows_the_documented_semantics_by_hand():
    probe = _hand_probe()
    # running means of (f5, f9): t1 (1, 2); t2 (0.5, 1); t3 (5/3, 1)
    logits = [-1 + 2 * 1 - 2, -1 + 2 * 0.5 - 1, -1 + 2 * 5 / 3 - 1]
    expected = [_sig(0.5 * z + 0.25) for z in logits]
    assert rp.running_risks(probe, TOKENS) == pytest.approx(expected)
    assert rp.score(probe, {(12, 5): 5 / 3, (24, 9): 1.0}) == pytest.approx(expected[-1])
    assert rp.risk_label(probe, expected[-1]) == ("HIGH" if expected[-1] >= 0.6 else "MEDIUM" if expected[-1] >= 0.3 else "LOW")
    assert [rp.risk_label(probe, r) for r in (0.1, 0.3, 0.59, 0.6)] == ["LOW", "MEDIUM", "MEDIUM", "HIGH"]


def test_score_log1p_max_and_last_prompt_poolings():
    z_log = -1 + 2 * (math.log1p(1) + 0 + math.log1p(4)) / 3 - (math.log1p(2) + 0 + math.log1p(1)) / 3
    assert rp.running_risks(_hand_probe(transform="log1p"), TOKENS)[-1] == pytest.approx(_sig(0.5 * z_log + 0.25))
    assert rp.running_risks(_hand_probe(pooling="max"), TOKENS)[-1] == pytest.approx(_sig(0.5 * (-1 + 8 - 2) + 0.25))
    last_prompt = rp.running_risks(_hand_probe(pooling="last_prompt"), TOKENS)
    assert last_prompt == pytest.approx([_sig(0.5 * (-1 + 2 - 2) + 0.25)] * 3)


def test_probe_file_round_trip_keeps_the_documented_shape(tmp_path):
    probe = _hand_probe()
    probe.metrics = {"val_auroc": 0.9}
    path = rp.save_probe(probe, tmp_path / "probes" / "hand.json")
    data = json.loads(path.read_text())
    assert list(data) == ["probe_id", "version", "kind", "model", "features", "bias", "pooling",
                          "input_transform", "calibration", "thresholds", "metrics", "terms", "ood"]
    assert data["version"] == 2 and data["terms"] == [] and data["ood"] is None  # v2: both optional
    assert data["features"][0] == {"layer": 12, "sae_id": "saeA", "feature_id": 5, "weight": 2.0}
    again = rp.load_probe(path)
    assert again.to_dict() == probe.to_dict()
    assert rp.running_risks(again, TOKENS) == rp.running_risks(probe, TOKENS)


def test_bad_probe_files_are_refused():
    with pytest.raises(ValueError, match="pooling"):
        _hand_probe(pooling="median")
    with pytest.raises(ValueError, match="unsupported"):
        rp.Probe.from_dict({"probe_id": "x", "kind": "mlp", "features": [], "bias": 0})


def test_contributions_explain_the_score():
    probe = _hand_probe()
    rows = rp.contributions(probe, {(12, 5): 5 / 3, (24, 9): 1.0})
    assert [(r["layer"], r["feature_id"]) for r in rows] == [(12, 5), (24, 9)]
    assert rows[0]["contribution"] == pytest.approx(10 / 3)


def test_metrics():
    y = np.asarray([0, 0, 1, 1])
    assert ranking_metrics(np.asarray([0.1, 0.2, 0.8, 0.9]), y)["auroc"] == 1.0
    assert ranking_metrics(np.asarray([0.1, 0.2]), np.asarray([1, 1]))["auroc"] is None
    assert ece(np.asarray([0.0, 0.0, 1.0, 1.0]), y) == pytest.approx(0.0)
    assert ece(np.asarray([1.0, 1.0, 0.0, 0.0]), y) == pytest.approx(1.0)


def test_answers_cut_off_before_the_answer_are_not_labelled_wrong():
    base = {"token_ids": [1] * 24, "features": {12: {}}, "max_new_tokens": 24}
    cut_wrong = {**base, "fictional": False, "verdict": "wrong", "label": 1}
    assert not rptrain.label_is_certain(cut_wrong)
    assert rptrain.label_is_certain({**cut_wrong, "token_ids": [1] * 23})  # ended on its own: a real wrong answer
    assert rptrain.label_is_certain({**cut_wrong, "max_new_tokens": 64})  # the limit was higher
    assert rptrain.label_is_certain({**base, "fictional": False, "verdict": "correct", "label": 0})  # answer seen
    assert rptrain.label_is_certain({**base, "fictional": True, "verdict": "confabulated", "label": 1})
    assert not rptrain.label_is_certain({k: v for k, v in cut_wrong.items() if k != "max_new_tokens"})  # old default 24
    assert rptrain.usable([cut_wrong, {**cut_wrong, "token_ids": [1] * 5}]) == [{**cut_wrong, "token_ids": [1] * 5}]


def test_risk_score_cli_reports_the_shipped_probe_per_file(synthetic_probe, tmp_path, capsys):
    """`featurelens risk score` (dense vs quantized answers, side by side) on two files: the probe as it is."""
    import json as _json

    from featurelens.server.offline.risk import cli as risk_cli

    probe, _, test = synthetic_probe
    rp.save_probe(probe, tmp_path / "probe.json")
    files = []
    for name, records in (("a", test[:600]), ("b", test[600:1200])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(_json.dumps(r | {"split": "test", "verdict": "wrong" if r["label"] else "correct"})
                                + "\n" for r in records))
        files.append(str(path))
    assert risk_cli.main(["score", "--probe", str(tmp_path / "probe.json"), "--data", files[0], "--data", files[1]]) == 0
    report = _json.loads(capsys.readouterr().out)
    for path, records in zip(files, (test[:600], test[600:1200]), strict=True):
        y = np.asarray([r["label"] for r in records])
        assert report[path]["n"] == 600
        assert report[path]["correct_answers"] == int((y == 0).sum())
        assert report[path]["probe"]["auroc"] == ranking_metrics(rptrain.probe_logits(probe, records), y)["auroc"] > 0.9


def test_auroc_standard_error_matches_hanley_mcneil():
    # A = 0.5, 100 + 100: Q1 = 1/3, Q2 = 1/3, variance = (0.25 + 2 * 99 * (1/3 - 1/4)) / 10^4.
    assert rptrain.auroc_standard_error(0.5, 100, 100) == pytest.approx(math.sqrt((0.25 + 198 / 12) / 1e4))
    assert rptrain.auroc_standard_error(0.9, 460, 154) == pytest.approx(0.0124, abs=0.001)
    assert rptrain.auroc_standard_error(0.9, 4600, 1540) < rptrain.auroc_standard_error(0.9, 460, 154) / 3


def test_one_se_rule_prefers_fewer_layers_when_the_extra_layer_is_noise():
    """All the signal is at layer 12: the two-layer probe can only match it (or beat it by noise). The
    one-standard-error rule picks the one-layer probe (half the serving cost); "best" takes the maximum."""
    def only_layer_12(records, seed):
        # Layer 24's codes are shuffled across records: whatever they hold no longer relates to the label.
        shuffled = [r["features"]["24"] for r in records]
        random.Random(seed).shuffle(shuffled)
        return [{**r, "features": {"12": r["features"]["12"], "24": other}}
                for r, other in zip(records, shuffled, strict=True)]

    train, val = only_layer_12(_synthetic(800, 4), 0), only_layer_12(_synthetic(500, 5), 1)
    quiet = {"poolings": ["mean"], "transforms": ["identity"], "log": lambda _m: None}
    chosen, table = rptrain.train_probe(train, val, "one-se", **quiet)
    assert {f.layer for f in chosen.features} == {12}
    assert chosen.metrics["selection_rule"] == "one-se"
    assert chosen.metrics["val_auroc"] >= chosen.metrics["best_val_auroc"] - chosen.metrics["val_auroc_se"]
    best, _ = rptrain.train_probe(train, val, "best", selection="best", **quiet)
    assert best.metrics["val_auroc"] == max(row["val_auroc"] for row in table)
    with pytest.raises(ValueError, match="selection"):
        rptrain.train_probe(train, val, "x", selection="cheapest", **quiet)
