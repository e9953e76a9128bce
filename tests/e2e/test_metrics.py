"""Metrics: series names and labels, the /metrics endpoint, promtool, and a real Prometheus scrape."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from featurelens.server.metrics import Metrics, MetricsServer, start_metrics_server
from prometheus_client.parser import text_string_to_metric_families
from tests_support import PrometheusProcess, prometheus_query

EXPECTED_FAMILIES = {
    # family name (as the parser reports it) → (type, label names)
    "featurelens_rpc_requests": ("counter", {"method", "code"}),
    "featurelens_rpc_duration_seconds": ("histogram", {"method"}),
    "featurelens_time_to_first_token_seconds": ("histogram", {"mode"}),
    "featurelens_inter_token_latency_seconds": ("histogram", {"mode"}),
    "featurelens_request_duration_seconds": ("histogram", {"mode"}),
    "featurelens_prompt_tokens": ("counter", {"mode"}),
    "featurelens_generated_tokens": ("counter", {"mode"}),
    "featurelens_requests_in_flight": ("gauge", set()),
    "featurelens_requests_queued": ("gauge", set()),
    "featurelens_response_risk": ("histogram", {"model", "mode"}),
    "featurelens_high_risk_responses": ("counter", {"model", "mode"}),
    "featurelens_steering_interventions": ("counter", {"op"}),
    "featurelens_features_returned": ("counter", {"layer"}),
    "featurelens_cache_requests": ("counter", {"backend", "result"}),
    "featurelens_cache_errors": ("counter", {"backend", "kind"}),
    "featurelens_sae_encode_seconds": ("histogram", set()),
    "featurelens_risk_seconds": ("histogram", set()),
    # An Info is exposed in the text format as a gauge `<name>_info` with value 1.
    "featurelens_engine_info": ("gauge", {"model", "saes", "version", "kv_cache_dtype"}),
}


def _record_everything(m: Metrics) -> None:
    m.observe_rpc("Generate", grpc.StatusCode.OK, 0.2)
    m.observe_rpc("Generate", "INVALID_ARGUMENT", 0.001)
    m.observe_time_to_first_token("dense", 0.05)
    m.observe_inter_token_latency("INFERENCE_MODE_SPARSE", 0.01)
    m.observe_request("dense", 1.5, prompt_tokens=12, generated_tokens=30)
    with m.in_flight(), m.queued():
        pass
    m.observe_response_risk("smollm2-135m", "dense", 0.91, high=True)
    m.observe_response_risk("smollm2-135m", "dense", 0.12, high=False)
    m.count_steering("STEERING_OP_NUDGE")
    m.count_features_returned(9, 64)
    m.count_cache_lookup("redis", hit=True)
    m.count_cache_lookup("redis", hit=False)
    m.count_cache_error("redis", "timeout")
    m.observe_step_timing(0.002, 0.0003)
    m.set_engine_info("smollm2-135m", ["res-l9", "res-l15"], "0.1.0", "fp8")


def _families(text: str) -> dict:
    """Family name → family; a counter's `_created` lines may come back as a second family of the same
    name, so samples of same-named families are merged."""
    families: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name in families:
            families[family.name].samples.extend(family.samples)
        else:
            families[family.name] = family
    return families


def test_series_names_and_labels() -> None:
    m = Metrics()
    _record_everything(m)
    families = _families(m.exposition().decode())
    for name, (kind, labels) in EXPECTED_FAMILIES.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        assert family.documentation, f"{name} has no help string"
        assert family.samples, f"{name} recorded nothing"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)


def test_helper_values_and_bounded_labels() -> None:
    m = Metrics()
    _record_everything(m)
    m.observe_time_to_first_token("some-free-text-mode", 0.1)  # unknown values collapse into "other"
    m.count_steering("drop table")
    m.count_features_returned(10**6, 1)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in _families(m.exposition().decode()).values() for s in f.samples}
    assert samples[("featurelens_rpc_requests_total", (("code", "OK"), ("method", "Generate")))] == 1
    assert samples[("featurelens_rpc_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Generate")))] == 1
    assert samples[("featurelens_generated_tokens_total", (("mode", "dense"),))] == 30
    assert samples[("featurelens_inter_token_latency_seconds_count", (("mode", "sparse"),))] == 1
    risk = (("mode", "dense"), ("model", "smollm2-135m"))  # sorted label names
    assert samples[("featurelens_high_risk_responses_total", risk)] == 1
    assert samples[("featurelens_response_risk_count", risk)] == 2
    assert samples[("featurelens_response_risk_bucket", (("le", "0.95"), *risk))] == 2
    assert samples[("featurelens_response_risk_bucket", (("le", "0.5"), *risk))] == 1
    assert samples[("featurelens_steering_interventions_total", (("op", "nudge"),))] == 1
    assert samples[("featurelens_steering_interventions_total", (("op", "other"),))] == 1
    assert samples[("featurelens_features_returned_total", (("layer", "9"),))] == 64
    assert samples[("featurelens_features_returned_total", (("layer", "other"),))] == 1
    assert samples[("featurelens_time_to_first_token_seconds_count", (("mode", "other"),))] == 1
    assert samples[("featurelens_requests_in_flight", ())] == 0
    engine = (("kv_cache_dtype", "fp8"), ("model", "smollm2-135m"), ("saes", "res-l9,res-l15"), ("version", "0.1.0"))
    assert samples[("featurelens_engine_info", engine)] == 1


def test_registries_are_private() -> None:
    """Two Metrics in one process (two tests, or vLLM's own metrics) never clash."""
    a, b = Metrics(), Metrics()
    a.count_steering("pin")
    assert b"op=\"pin\"" not in b.exposition()


@pytest.fixture
def metrics_server() -> Iterator[tuple[Metrics, MetricsServer]]:
    m = Metrics()
    _record_everything(m)
    server = start_metrics_server(0, "127.0.0.1", m)
    yield m, server
    server.stop()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def test_metrics_endpoint_serves_parseable_text(metrics_server: tuple[Metrics, MetricsServer]) -> None:
    _, server = metrics_server
    families = _families(_scrape(server.port))
    assert set(EXPECTED_FAMILIES) <= set(families)


def test_promtool_check_metrics(metrics_server: tuple[Metrics, MetricsServer]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    _, server = metrics_server
    result = subprocess.run([promtool, "check", "metrics"], input=_scrape(server.port), text=True,
                            capture_output=True, timeout=30)
    # promtool exits non-zero for lint findings as well as errors; we want neither.
    assert result.returncode == 0, result.stdout + result.stderr


def test_real_prometheus_scrapes_us(metrics_server: tuple[Metrics, MetricsServer], tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus server not installed (apt-get install -y prometheus)")
    _, server = metrics_server
    prom = PrometheusProcess(prometheus, server.port, tmp_path)
    try:
        result = prom.wait_for('featurelens_high_risk_responses_total{job="featurelens"}')
        assert result[0]["metric"]["model"] == "smollm2-135m"
        assert float(result[0]["value"][1]) == 1
        up = prometheus_query(prom.port, 'up{job="featurelens"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        prom.stop()
