"""Between the API and the worker: validate a request's interpretability block and steering list into the
plain-data spec the worker reads from `extra_args`, and turn captured codes back into protobuf.

Token convention: a generated token's features are those of the residual stream at the position that
*predicted* it (the state that chose the token); prompt token i's features are those at position i.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import numpy as np
from featurelens.server.interp.capture import RequestFeatures
from featurelens.server.interp.steering import SteeringSpec, parse_interventions
from featurelens.server.validation import ApiError, invalid
from featurelens.v1 import featurelens_pb2 as pb

if TYPE_CHECKING:
    from featurelens.server.config import Settings
    from featurelens.server.engine import ModelShape
    from featurelens.server.interp.registry import SaeEntry
    from featurelens.server.interp.risk import RiskProbe

Codes = tuple[np.ndarray, np.ndarray]  # (feature indices, activations) of one token at one layer


class PlanEngine(Protocol):
    """What planning reads from the engine: `featurelens.server.engine.Engine`, or a stand-in in tests."""

    @property
    def saes(self) -> Mapping[int, SaeEntry]: ...
    @property
    def risk_probe(self) -> RiskProbe | None: ...
    @property
    def interpretability_available(self) -> bool: ...
    @property
    def shape(self) -> ModelShape | None: ...
    @property
    def worker_logprobs(self) -> bool: ...
    def token_text(self, token_id: int) -> str: ...


@dataclass
class InterpPlan:
    capture: dict[int, int] = field(default_factory=dict)  # layer → top_k captured in the worker
    returned: dict[int, int] = field(default_factory=dict)  # layer → top_k returned to the caller
    include_prompt: bool = False
    steer: list[SteeringSpec] = field(default_factory=list)
    risk: RiskProbe | None = None  # when the request scores risk
    # layer → codes the probe reads there; the worker ships only the probe's features among them
    risk_capture: dict[int, int] = field(default_factory=dict)
    # the probe reads each sampled token's logprob and the worker sends it (else vLLM's logprobs are asked for)
    risk_logprobs: bool = False
    # added steering vectors by worker key (state.worker_key) -> values, pinned in the workers while it runs
    vectors: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.capture or self.steer or self.risk_capture)

    @property
    def receives(self) -> bool:
        """Whether codes come back from the worker for this request."""
        return bool(self.capture or self.risk_capture)

    def extra_args(self, key: str, tag: int | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "key": key,
            "capture": [{"layer": layer, "k": k, "prompt": self.include_prompt} for layer, k in self.capture.items()],
            "steer": self.steer,
        }
        if self.risk_capture:
            spec["risk"] = [{"layer": layer, "k": k} for layer, k in self.risk_capture.items()]
        if self.risk_logprobs:
            spec["logprob"] = True
        if tag is not None:
            spec["tag"] = tag
        return {"featurelens": spec}

    def cache_salt(self, num_prompt_tokens: int) -> str | None:
        """Steered requests get their own prefix-cache namespace: only requests that would compute the same KV
        share it. The salt covers the specs, whose added vectors are named by content (`state.worker_key`:
        re-registering an id changes it), and, when a spec steers only PROMPT or only GENERATED positions,
        where this prompt ends: a multi-turn follow-up whose prompt holds the last answer must not reuse KV
        that was steered (or not) under the other boundary."""
        if not self.steer:
            return None
        content: dict[str, Any] = {"steer": self.steer}
        if any(spec["positions"] != "all" for spec in self.steer):
            content["prompt_tokens"] = num_prompt_tokens
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def parse_feature_selection(selections: Iterable[pb.FeatureSelection], engine: PlanEngine, max_k: int,
                            field_name: str) -> dict[int, int]:
    capture: dict[int, int] = {}
    for i, sel in enumerate(selections):
        where = f"{field_name}[{i}]"
        entry = engine.saes.get(sel.layer)
        if entry is None:
            raise invalid(f"{where}.layer", f"no SAE at layer {sel.layer}; layers with SAEs: {sorted(engine.saes)}")
        if sel.sae_id and sel.sae_id != entry.sae_id:
            raise invalid(f"{where}.sae_id", f"unknown SAE {sel.sae_id!r} at layer {sel.layer} "
                                             f"(loaded: {entry.sae_id!r})")
        limit = min(max_k, entry.cfg.k or entry.d_sae) if entry.cfg.architecture == "topk" else min(max_k, entry.d_sae)
        top_k = sel.top_k or min(8, limit)
        if not 1 <= top_k <= limit:
            raise invalid(f"{where}.top_k", f"must be in [1, {limit}], got {sel.top_k}")
        if sel.layer in capture:
            raise invalid(f"{where}.layer", f"layer {sel.layer} selected twice")
        capture[sel.layer] = top_k
    return capture


def plan_interpretability(request: pb.GenerateRequest | pb.GenerateStreamRequest, engine: PlanEngine,
                          settings: Settings, vectors: Mapping[str, int] | None = None) -> InterpPlan:
    """Generate/GenerateStream request → InterpPlan, or ApiError naming the field. `vectors`: the caller's
    registered vectors the request names (id → dimension), looked up in the shared store beforehand."""
    interp = request.interpretability
    plan = InterpPlan()
    wants = bool(interp.features or interp.include_prompt_features or interp.score_risk or len(request.steering))
    if wants and not engine.interpretability_available:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       "interpretability: this compiled engine has no tap call sites (they could not be "
                       "installed before vLLM compiled the model; see the server log); restart it with "
                       "--enforce-eager to use features, risk or steering")
    plan.returned = parse_feature_selection(interp.features, engine, settings.max_features_per_token,
                                            "interpretability.features")
    plan.capture = dict(plan.returned)
    if interp.score_risk:
        probe = engine.risk_probe
        if probe is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           "interpretability.score_risk: no risk probe is loaded on this server "
                           "(GetModelInfo.risk_available)")
        plan.risk = probe
        plan.risk_capture = {layer: risk_capture_k(engine.saes[layer], settings, probe) for layer in probe.layers}
        plan.risk_logprobs = probe.needs_logprobs and engine.worker_logprobs
    if interp.include_prompt_features and not plan.returned:
        raise invalid("interpretability.include_prompt_features", "needs at least one interpretability.features")
    plan.include_prompt = interp.include_prompt_features
    shape = engine.shape
    if shape is None:  # RPCs can arrive while the engine starts (health NOT_SERVING)
        raise RuntimeError("the engine has not started yet")
    plan.steer = parse_interventions(request.steering, num_layers=shape.num_layers, saes=engine.saes,
                                     vectors=vectors or {}, max_interventions=settings.max_interventions,
                                     max_strength=settings.max_steering_strength)
    return plan


def risk_capture_k(entry: SaeEntry, settings: Settings, probe: RiskProbe | None = None) -> int:
    """Codes the risk probe reads per token: as many top features as it was trained on (`feature_top_k` in
    the probe file: serving then sees exactly the inputs the probe was fitted and evaluated on, and the
    top-k costs less), capped by what the SAE fires; a probe without that record reads a TopK SAE's whole
    code (its k), else the per-token limit."""
    whole = int(entry.cfg.k) if entry.cfg.architecture == "topk" and entry.cfg.k else settings.max_features_per_token
    trained = probe.trained_top_k if probe is not None else None
    return min(trained, whole) if trained else whole


def to_layer_features(layer: int, sae_id: str, indices: np.ndarray, values: np.ndarray, k: int) -> pb.LayerFeatures:
    lf = pb.LayerFeatures(layer=layer, sae_id=sae_id)
    for index, value in zip(indices[:k].tolist(), values[:k].tolist(), strict=True):
        if value > 0.0:  # a zero means fewer than k features fired; its index means nothing
            lf.activations.add(feature_id=index, activation=value)
    return lf


async def token_codes(received: RequestFeatures, plan: InterpPlan, position: int,
                      keep: bool = False) -> dict[int, Codes]:
    return {layer: await received.get(layer, position, keep=keep) for layer in plan.capture}


async def risk_codes(received: RequestFeatures, plan: InterpPlan, position: int) -> dict[int, Codes]:
    """The risk probe's features present in the codes at `position`, per probe layer."""
    return {layer: await received.get_risk(layer, position) for layer in plan.risk_capture}


def layer_features(codes: Mapping[int, Codes], plan: InterpPlan, engine: PlanEngine) -> list[pb.LayerFeatures]:
    return [to_layer_features(layer, engine.saes[layer].sae_id, *codes[layer], k) for layer, k in plan.returned.items()]


async def prompt_features(received: RequestFeatures, plan: InterpPlan, engine: PlanEngine,
                          prompt_ids: list[int]) -> list[pb.TokenFeatures]:
    tokens = []
    last = len(prompt_ids) - 1  # also predicts the first generated token, which reads it again
    for position, token_id in enumerate(prompt_ids):
        tf = pb.TokenFeatures(token_id=token_id, token_text=engine.token_text(token_id))
        tf.features.extend(layer_features(await token_codes(received, plan, position, keep=position == last),
                                          plan, engine))
        tokens.append(tf)
    return tokens
