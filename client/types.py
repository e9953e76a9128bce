"""Typed results of the client: plain dataclasses built from the protobuf responses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from featurelens.v1 import featurelens_pb2 as pb


def _enum_name(enum: object, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FeatureActivation:
    feature_id: int
    activation: float


@dataclass(frozen=True)
class LayerFeatures:
    layer: int
    sae_id: str
    activations: list[FeatureActivation]

    @classmethod
    def from_pb(cls, m: pb.LayerFeatures) -> LayerFeatures:
        return cls(m.layer, m.sae_id, [FeatureActivation(a.feature_id, a.activation) for a in m.activations])


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    features: list[LayerFeatures] = field(default_factory=list)
    risk: float | None = None

    @classmethod
    def from_pb(cls, m: pb.Token) -> TokenInfo:
        return cls(
            token_id=m.token_id,
            text=m.token_text,
            logprob=m.logprob if m.HasField("logprob") else None,
            top_logprobs=[(t.token_id, t.token_text, t.logprob) for t in m.top_logprobs],
            features=[LayerFeatures.from_pb(f) for f in m.features],
            risk=m.risk if m.HasField("risk") else None,
        )


@dataclass(frozen=True)
class FeatureContribution:
    layer: int
    feature_id: int
    activation: float
    weight: float
    contribution: float
    explanation: str


@dataclass(frozen=True)
class RiskTerm:
    """A named uncertainty term of the answer's own token logprobs that the probe adds (ResponseRisk.terms)."""

    name: str  # neg_mean_logprob | neg_min_logprob | neg_first_logprob
    value: float
    weight: float
    contribution: float  # value × weight: its push on the logit


@dataclass(frozen=True)
class Risk:
    score: float
    label: str  # "low" | "medium" | "high"
    top_features: list[FeatureContribution]
    probe_id: str
    # How far the response lies from the probe's training data, in [0, 1] (ResponseRisk.ood; 0 when the
    # probe has no OOD reference): a low score with a high ood means "never seen this", not "safe".
    ood: float = 0.0
    # The probe's uncertainty terms, beside the features (empty for a probe without terms).
    terms: list[RiskTerm] = field(default_factory=list)

    @classmethod
    def from_pb(cls, m: pb.ResponseRisk) -> Risk | None:
        if m.label == pb.RISK_LABEL_UNSPECIFIED:
            return None
        return cls(m.score, _enum_name(pb.RiskLabel, m.label, "RISK_LABEL_"),
                   [FeatureContribution(f.layer, f.feature_id, f.activation, f.weight, f.contribution, f.explanation)
                    for f in m.top_features], m.probe_id, m.ood,
                   [RiskTerm(t.name, t.value, t.weight, t.contribution) for t in m.terms])


@dataclass(frozen=True)
class SampleResult:
    """One sample of a response (`n` > 1): its own tokens, features, risk and finish reason."""

    sample_index: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    risk: Risk | None = None

    @classmethod
    def from_pb(cls, m: pb.Sample) -> SampleResult:
        return cls(m.sample_index, m.text, [TokenInfo.from_pb(t) for t in m.tokens],
                   _enum_name(pb.FinishReason, m.finish_reason, "FINISH_REASON_"), m.usage.prompt_tokens,
                   m.usage.completion_tokens, Risk.from_pb(m.risk))

    def json(self) -> Any:
        """The text parsed as JSON (see GenerateResult.json)."""
        return json.loads(self.text)


@dataclass(frozen=True)
class GenerateResult:
    """A response; with `n` > 1 the top-level fields are sample 0's and `samples` has every sample."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str  # "length" | "stop_sequence" | "eos" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    risk: Risk | None = None
    samples: list[SampleResult] = field(default_factory=list)  # every sample, by index; [this one] when n is 1

    @classmethod
    def from_pb(cls, m: pb.GenerateResponse) -> GenerateResult:
        tokens = [TokenInfo.from_pb(t) for t in m.tokens]
        finish_reason = _enum_name(pb.FinishReason, m.finish_reason, "FINISH_REASON_")
        risk = Risk.from_pb(m.risk)
        samples = ([SampleResult.from_pb(s) for s in m.samples] if m.samples else
                   [SampleResult(0, m.text, tokens, finish_reason, m.usage.prompt_tokens, m.usage.completion_tokens,
                                 risk)])
        return cls(
            text=m.text,
            tokens=tokens,
            finish_reason=finish_reason,
            prompt_tokens=m.usage.prompt_tokens,
            completion_tokens=m.usage.completion_tokens,
            request_id=m.request_id,
            risk=risk,
            samples=samples,
        )

    def json(self) -> Any:
        """The text parsed as JSON (for a request with a `json_schema`); ValueError if it is not JSON, which
        with a schema happens only when max_new_tokens cut it short (finish_reason "length")."""
        return json.loads(self.text)


@dataclass(frozen=True)
class StreamChunk:
    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None  # set on the last chunk only
    request_id: str
    risk: Risk | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sample_index: int = 0  # the sample this chunk belongs to (n > 1); finish_reason ends that sample only

    @classmethod
    def from_pb(cls, m: pb.GenerateStreamResponse) -> StreamChunk:
        done = m.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        return cls(
            text=m.text_delta,
            tokens=[TokenInfo.from_pb(t) for t in m.tokens],
            finish_reason=_enum_name(pb.FinishReason, m.finish_reason, "FINISH_REASON_") if done else None,
            request_id=m.request_id,
            risk=Risk.from_pb(m.risk),
            prompt_tokens=m.usage.prompt_tokens,
            completion_tokens=m.usage.completion_tokens,
            sample_index=m.sample_index,
        )


@dataclass(frozen=True)
class ModelInfo:
    model: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    server_version: str
    interpretability_available: bool
    kv_cache_dtype: str  # "auto" (the model's dtype) or an fp8 variant; engine-wide
    kv_cache_tokens: int  # tokens the server's KV cache holds across all running requests
    dtype: str  # the model's dtype as the engine runs it ("bfloat16", "float32", ...)
    raw: pb.GetModelInfoResponse
    scheduling_policy: str = "fcfs"  # "priority" when requests' priority is honoured (lower first)
    adapters: list[AdapterInfo] = field(default_factory=list)  # LoRA adapters a request may name

    @classmethod
    def from_pb(cls, m: pb.GetModelInfoResponse) -> ModelInfo:
        return cls(m.model, m.num_layers, m.hidden_size, m.vocab_size, m.max_model_len, m.server_version,
                   m.interpretability_available, m.kv_cache_dtype, m.kv_cache_tokens, m.dtype, m,
                   m.scheduling_policy or "fcfs",
                   [AdapterInfo(a.name, a.rank, tuple(a.target_modules)) for a in m.adapters])


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter the server loaded (`adapter=` of a generation names it)."""

    name: str
    rank: int
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class SteeringVector:
    """A registered steering vector: shared by the server's replicas, private to the caller's token."""

    vector_id: str
    dimension: int
    l2_norm: float
    digest: str  # changes whenever the vector is registered again with other values
    values: tuple[float, ...] = ()  # filled by get_vector only

    @classmethod
    def from_pb(cls, m: pb.SteeringVector, values: tuple[float, ...] = ()) -> SteeringVector:
        return cls(m.vector_id, m.dimension, m.l2_norm, m.digest, values)
