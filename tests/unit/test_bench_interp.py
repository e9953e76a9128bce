"""`featurelens bench interp --risk-breakdown`: each variant changes the engine's frontend state for its round
as it says, and restores it after (also when the round fails)."""

from __future__ import annotations

import pytest
from featurelens.server.bench.interp import RISK_BREAKDOWN, _risk_variant, main
from featurelens.server.config import Settings
from featurelens.server.engine import Engine
from featurelens.server.interp.risk import RiskProbe, default_probe_path


@pytest.fixture
def engine() -> Engine:
    path = default_probe_path()
    assert path is not None
    engine = Engine(Settings())  # not started: the bench only switches its frontend attributes
    engine.risk_probe = RiskProbe.load(path)
    engine.worker_logprobs = True
    return engine


def test_risk_breakdown_switches_and_restores(engine):
    shipped = engine.risk_probe
    assert shipped is not None and shipped.needs_logprobs  # the shipped probe has logprob terms
    assert set(RISK_BREAKDOWN) == {"risk/vllm-logprobs", "risk/no-terms"}
    with _risk_variant(engine, "risk/no-terms"):
        probe = engine.risk_probe
        assert probe is not shipped and probe.probe.terms == [] and not probe.needs_logprobs
        # The worker's probe (features, weights) is the same: only the frontend's terms go.
        assert probe.feature_ids == shipped.feature_ids and probe.feature_weights == shipped.feature_weights
        assert probe.reports_ood == shipped.reports_ood and probe.nearest_layer == shipped.nearest_layer
        assert engine.worker_logprobs
    assert engine.risk_probe is shipped and shipped.probe.terms
    with _risk_variant(engine, "risk/vllm-logprobs"):
        assert engine.risk_probe is shipped and not engine.worker_logprobs
    assert engine.worker_logprobs
    with pytest.raises(RuntimeError), _risk_variant(engine, "risk/no-terms"):
        raise RuntimeError("a failed round")
    assert engine.risk_probe is shipped
    for plain in ("plain", "risk", "features"):
        with _risk_variant(engine, plain):
            assert engine.risk_probe is shipped and engine.worker_logprobs


def test_risk_breakdown_needs_risk_only(capsys):
    with pytest.raises(SystemExit):
        main(["--risk-breakdown"])
    assert "--risk-breakdown goes with --risk-only" in capsys.readouterr().err
