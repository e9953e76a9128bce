"""Serving-side risk probe, without the engine: file format, running mean, calibration, labels, thresholds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from featurelens.server.config import Settings
from featurelens.server.interp.risk import RiskProbe
from featurelens.server.worker.extension import ProbeLayer
from featurelens.v1 import featurelens_pb2 as pb
from pydantic import ValidationError


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "probe_id": "p1", "version": 1, "kind": "sparse_logreg", "model": "m",
        "features": [{"layer": 3, "sae_id": "s3", "feature_id": 7, "weight": 0.5},
                     {"layer": 5, "sae_id": "s5", "feature_id": 2, "weight": -1.0}],
        "bias": -0.25, "pooling": "mean", "input_transform": "log1p",
        "calibration": {"method": "platt", "a": 2.0, "b": 0.1}, "thresholds": {"medium": 0.4, "high": 0.7}}))
    return RiskProbe.load(path)


def codes(pairs3, pairs5):
    def arr(pairs):
        return (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.float32))

    return {3: arr(pairs3), 5: arr(pairs5)}


def test_running_mean_follows_the_documented_formula(probe):
    running = probe.start()
    r1 = running.add(codes([(7, 3.0), (1, 9.0)], [(2, 1.0)]))
    r2 = running.add(codes([(4, 1.0), (0, 0.0)], [(2, 0.5)]))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    x7, x2 = (math.log1p(3.0) + 0) / 2, (math.log1p(1.0) + math.log1p(0.5)) / 2
    assert r1 == pytest.approx(sig(2.0 * (-0.25 + 0.5 * math.log1p(3.0) - math.log1p(1.0)) + 0.1))
    assert r2 == pytest.approx(sig(2.0 * (-0.25 + 0.5 * x7 - x2) + 0.1))
    risk = running.response_risk()
    assert risk.score == pytest.approx(r2) and risk.probe_id == "p1"
    assert [(f.layer, f.feature_id) for f in risk.top_features] == [(5, 2), (3, 7)]  # by |contribution|


def test_labels_and_sae_check(probe):
    assert [probe.label(v) for v in (0.1, 0.4, 0.69, 0.7)] == [pb.RISK_LABEL_LOW, pb.RISK_LABEL_MEDIUM,
                                                             pb.RISK_LABEL_MEDIUM, pb.RISK_LABEL_HIGH]
    from types import SimpleNamespace

    probe.check_saes({3: SimpleNamespace(sae_id="s3"), 5: SimpleNamespace(sae_id="s5")})
    with pytest.raises(ValueError, match="needs SAE 's5' at layer 5"):
        probe.check_saes({3: SimpleNamespace(sae_id="s3")})


def test_thresholds_are_configurable_and_checked():
    s = Settings(risk_medium_threshold=0.2, risk_high_threshold=0.9)
    assert (s.risk_medium_threshold, s.risk_high_threshold) == (0.2, 0.9)
    for bad in (dict(risk_high_threshold=1.5), dict(risk_medium_threshold=0.8, risk_high_threshold=0.5)):
        with pytest.raises(ValidationError):
            Settings(**bad)


@pytest.mark.parametrize("pooling", ["mean", "max", "last_prompt"])
@pytest.mark.parametrize("transform", ["identity", "log1p"])
def test_streaming_server_scores_equal_the_offline_reference(tmp_path, pooling, transform):
    """The server's incremental RunningRisk and `risk_probe.running_risks` (what training and evaluation use)
    give the same risk after every token, for every pooling and transform a probe file may name."""
    from featurelens.server.interp import risk_probe as rp

    rng = np.random.default_rng(7)
    features = [{"layer": layer, "sae_id": f"s{layer}", "feature_id": int(f), "weight": float(w)}
                for layer in (3, 5) for f, w in zip(rng.choice(20, 6, replace=False), rng.normal(size=6), strict=True)]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"probe_id": "p", "version": 1, "kind": "sparse_logreg", "model": "m",
                                "features": features, "bias": 0.3, "pooling": pooling, "input_transform": transform,
                                "calibration": {"method": "platt", "a": 1.5, "b": -0.2},
                                "thresholds": {"medium": 0.4, "high": 0.7}}))
    served, reference = RiskProbe.load(path), rp.load_probe(path)
    running, scored = served.start(), served.start()
    # What the worker computes per row beside the codes: the probe's linear term at each layer.
    workers = {layer: ProbeLayer.build(20, served.feature_ids[layer], served.feature_weights[layer], transform)
               for layer in (3, 5)}
    tokens, raw = [], []
    for _ in range(12):
        token = {}
        for layer in (3, 5):
            idx = rng.choice(20, 4, replace=False)
            val = np.where(rng.random(4) < 0.2, 0.0, rng.exponential(2.0, 4)).astype(np.float32)
            token[layer] = (idx.astype(np.int64), val)
        raw.append(token)
        tokens.append({layer: [(int(i), float(v)) for i, v in zip(*token[layer], strict=True) if v > 0]
                       for layer in token})
        running.add(token)
        expected = rp.running_risks(reference, tokens)[-1]
        assert running.risk() == pytest.approx(expected, rel=1e-6, abs=1e-9)
        if scored.takes_scores:
            term = sum(float(workers[layer].select(val[None], idx[None], 4)[4][0]) for layer, (idx, val) in token.items())
            assert scored.add_score(term) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert scored.takes_scores == (pooling != "max")
    if pooling == "max":
        with pytest.raises(ValueError, match="needs the codes"):
            scored.add_score(0.0)
    # The explanation's pooled features, built at once, equal the incremental ones.
    scored.pool(raw)
    np.testing.assert_allclose(scored.state, running.state, rtol=1e-12, atol=1e-12)
    assert scored.pooled().keys() == running.pooled().keys()


def test_unusable_probe_files_are_refused_clearly(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"probe_id": "p", "version": 1, "kind": "sparse_logreg", "features": [],
                                "bias": 0.0, "pooling": "median"}))
    with pytest.raises(ValueError, match="not a usable probe file: pooling must be one of"):
        RiskProbe.load(path)


def test_risk_reads_as_many_codes_as_the_probe_was_trained_on(probe):
    from types import SimpleNamespace

    from featurelens.server.interp_plan import risk_capture_k

    settings = SimpleNamespace(max_features_per_token=64)
    topk80 = SimpleNamespace(cfg=SimpleNamespace(architecture="topk", k=80))
    relu = SimpleNamespace(cfg=SimpleNamespace(architecture="standard", k=None))
    assert risk_capture_k(topk80, settings, probe) == 80  # no feature_top_k recorded: the SAE's whole code
    assert risk_capture_k(relu, settings, probe) == 64
    probe.probe.metrics["feature_top_k"] = 32
    assert risk_capture_k(topk80, settings, probe) == 32  # what the probe was fitted on
    assert risk_capture_k(relu, settings, probe) == 32
    probe.probe.metrics["feature_top_k"] = 200
    assert risk_capture_k(topk80, settings, probe) == 80  # never more than the SAE fires
    from featurelens.server.interp.risk import default_probe_path

    shipped = RiskProbe.load(default_probe_path())
    assert risk_capture_k(topk80, settings, shipped) == shipped.probe.metrics["feature_top_k"] == 32
