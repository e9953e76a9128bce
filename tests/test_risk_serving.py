"""Serving-side risk probe, without the engine: file format, running mean, calibration, labels, thresholds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from featurelens.server.config import Settings
from featurelens.server.interp.risk import RiskProbe
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
