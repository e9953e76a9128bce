from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHAT_ROLE_UNSPECIFIED: _ClassVar[ChatRole]
    CHAT_ROLE_SYSTEM: _ClassVar[ChatRole]
    CHAT_ROLE_USER: _ClassVar[ChatRole]
    CHAT_ROLE_ASSISTANT: _ClassVar[ChatRole]

class SteeringOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEERING_OP_UNSPECIFIED: _ClassVar[SteeringOp]
    STEERING_OP_NUDGE: _ClassVar[SteeringOp]
    STEERING_OP_PIN: _ClassVar[SteeringOp]
    STEERING_OP_SCALE: _ClassVar[SteeringOp]
    STEERING_OP_ABLATE: _ClassVar[SteeringOp]
    STEERING_OP_ADD: _ClassVar[SteeringOp]

class TokenPositions(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_POSITIONS_UNSPECIFIED: _ClassVar[TokenPositions]
    TOKEN_POSITIONS_ALL: _ClassVar[TokenPositions]
    TOKEN_POSITIONS_PROMPT: _ClassVar[TokenPositions]
    TOKEN_POSITIONS_GENERATED: _ClassVar[TokenPositions]

class InferenceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INFERENCE_MODE_UNSPECIFIED: _ClassVar[InferenceMode]
    INFERENCE_MODE_DENSE: _ClassVar[InferenceMode]
    INFERENCE_MODE_SPARSE: _ClassVar[InferenceMode]
    INFERENCE_MODE_QUANTIZED: _ClassVar[InferenceMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class RiskLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RISK_LABEL_UNSPECIFIED: _ClassVar[RiskLabel]
    RISK_LABEL_LOW: _ClassVar[RiskLabel]
    RISK_LABEL_MEDIUM: _ClassVar[RiskLabel]
    RISK_LABEL_HIGH: _ClassVar[RiskLabel]
CHAT_ROLE_UNSPECIFIED: ChatRole
CHAT_ROLE_SYSTEM: ChatRole
CHAT_ROLE_USER: ChatRole
CHAT_ROLE_ASSISTANT: ChatRole
STEERING_OP_UNSPECIFIED: SteeringOp
STEERING_OP_NUDGE: SteeringOp
STEERING_OP_PIN: SteeringOp
STEERING_OP_SCALE: SteeringOp
STEERING_OP_ABLATE: SteeringOp
STEERING_OP_ADD: SteeringOp
TOKEN_POSITIONS_UNSPECIFIED: TokenPositions
TOKEN_POSITIONS_ALL: TokenPositions
TOKEN_POSITIONS_PROMPT: TokenPositions
TOKEN_POSITIONS_GENERATED: TokenPositions
INFERENCE_MODE_UNSPECIFIED: InferenceMode
INFERENCE_MODE_DENSE: InferenceMode
INFERENCE_MODE_SPARSE: InferenceMode
INFERENCE_MODE_QUANTIZED: InferenceMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason
RISK_LABEL_UNSPECIFIED: RiskLabel
RISK_LABEL_LOW: RiskLabel
RISK_LABEL_MEDIUM: RiskLabel
RISK_LABEL_HIGH: RiskLabel

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: ChatRole
    content: str
    def __init__(self, role: _Optional[_Union[ChatRole, str]] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "num_samples")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    repetition_penalty: float
    num_samples: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...

class StoppingOptions(_message.Message):
    __slots__ = ("max_new_tokens", "min_new_tokens", "stop_sequences", "stop_token_ids", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    min_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class LogprobOptions(_message.Message):
    __slots__ = ("token_logprobs", "top_logprobs")
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_logprobs: bool
    top_logprobs: int
    def __init__(self, token_logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class FeatureSelection(_message.Message):
    __slots__ = ("layer", "sae_id", "top_k")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    layer: int
    sae_id: str
    top_k: int
    def __init__(self, layer: _Optional[int] = ..., sae_id: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class InterpretabilityOptions(_message.Message):
    __slots__ = ("features", "score_risk", "include_prompt_features")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCORE_RISK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROMPT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureSelection]
    score_risk: bool
    include_prompt_features: bool
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureSelection, _Mapping]]] = ..., score_risk: _Optional[bool] = ..., include_prompt_features: _Optional[bool] = ...) -> None: ...

class SteeringCondition(_message.Message):
    __slots__ = ("feature_id", "threshold")
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    feature_id: int
    threshold: float
    def __init__(self, feature_id: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class SteeringIntervention(_message.Message):
    __slots__ = ("layer", "feature_id", "vector_id", "op", "strength", "positions", "condition", "preserve_norm", "sae_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_NORM_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature_id: int
    vector_id: str
    op: SteeringOp
    strength: float
    positions: TokenPositions
    condition: SteeringCondition
    preserve_norm: bool
    sae_id: str
    def __init__(self, layer: _Optional[int] = ..., feature_id: _Optional[int] = ..., vector_id: _Optional[str] = ..., op: _Optional[_Union[SteeringOp, str]] = ..., strength: _Optional[float] = ..., positions: _Optional[_Union[TokenPositions, str]] = ..., condition: _Optional[_Union[SteeringCondition, _Mapping]] = ..., preserve_norm: _Optional[bool] = ..., sae_id: _Optional[str] = ...) -> None: ...

class ChoiceList(_message.Message):
    __slots__ = ("choices",)
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, choices: _Optional[_Iterable[str]] = ...) -> None: ...

class StructuredOutput(_message.Message):
    __slots__ = ("json_schema", "regex", "choice", "grammar")
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    json_schema: str
    regex: str
    choice: ChoiceList
    grammar: str
    def __init__(self, json_schema: _Optional[str] = ..., regex: _Optional[str] = ..., choice: _Optional[_Union[ChoiceList, _Mapping]] = ..., grammar: _Optional[str] = ...) -> None: ...

class FeatureActivation(_message.Message):
    __slots__ = ("feature_id", "activation")
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    feature_id: int
    activation: float
    def __init__(self, feature_id: _Optional[int] = ..., activation: _Optional[float] = ...) -> None: ...

class LayerFeatures(_message.Message):
    __slots__ = ("layer", "sae_id", "activations")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    sae_id: str
    activations: _containers.RepeatedCompositeFieldContainer[FeatureActivation]
    def __init__(self, layer: _Optional[int] = ..., sae_id: _Optional[str] = ..., activations: _Optional[_Iterable[_Union[FeatureActivation, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "token_text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token_text: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., token_text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("token_id", "token_text", "logprob", "top_logprobs", "features", "risk")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token_text: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    features: _containers.RepeatedCompositeFieldContainer[LayerFeatures]
    risk: float
    def __init__(self, token_id: _Optional[int] = ..., token_text: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., features: _Optional[_Iterable[_Union[LayerFeatures, _Mapping]]] = ..., risk: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("layer", "feature_id", "activation", "weight", "contribution", "explanation")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature_id: int
    activation: float
    weight: float
    contribution: float
    explanation: str
    def __init__(self, layer: _Optional[int] = ..., feature_id: _Optional[int] = ..., activation: _Optional[float] = ..., weight: _Optional[float] = ..., contribution: _Optional[float] = ..., explanation: _Optional[str] = ...) -> None: ...

class ResponseRisk(_message.Message):
    __slots__ = ("score", "label", "top_features", "probe_id", "ood", "terms")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TOP_FEATURES_FIELD_NUMBER: _ClassVar[int]
    PROBE_ID_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    score: float
    label: RiskLabel
    top_features: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    probe_id: str
    ood: float
    terms: _containers.RepeatedCompositeFieldContainer[RiskTerm]
    def __init__(self, score: _Optional[float] = ..., label: _Optional[_Union[RiskLabel, str]] = ..., top_features: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ..., probe_id: _Optional[str] = ..., ood: _Optional[float] = ..., terms: _Optional[_Iterable[_Union[RiskTerm, _Mapping]]] = ...) -> None: ...

class RiskTerm(_message.Message):
    __slots__ = ("name", "value", "weight", "contribution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    weight: float
    contribution: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., weight: _Optional[float] = ..., contribution: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "chat", "sampling", "stopping", "logprobs", "interpretability", "steering", "mode", "sparsity_percent", "request_id", "structured_output", "priority", "adapter")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INTERPRETABILITY_FIELD_NUMBER: _ClassVar[int]
    STEERING_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    sampling: SamplingOptions
    stopping: StoppingOptions
    logprobs: LogprobOptions
    interpretability: InterpretabilityOptions
    steering: _containers.RepeatedCompositeFieldContainer[SteeringIntervention]
    mode: InferenceMode
    sparsity_percent: int
    request_id: str
    structured_output: StructuredOutput
    priority: int
    adapter: str
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., stopping: _Optional[_Union[StoppingOptions, _Mapping]] = ..., logprobs: _Optional[_Union[LogprobOptions, _Mapping]] = ..., interpretability: _Optional[_Union[InterpretabilityOptions, _Mapping]] = ..., steering: _Optional[_Iterable[_Union[SteeringIntervention, _Mapping]]] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., sparsity_percent: _Optional[int] = ..., request_id: _Optional[str] = ..., structured_output: _Optional[_Union[StructuredOutput, _Mapping]] = ..., priority: _Optional[int] = ..., adapter: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_index", "text", "tokens", "finish_reason", "usage", "risk")
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    sample_index: int
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    finish_reason: FinishReason
    usage: Usage
    risk: ResponseRisk
    def __init__(self, sample_index: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., risk: _Optional[_Union[ResponseRisk, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "tokens", "finish_reason", "usage", "risk", "prompt_features", "request_id", "model", "mode", "samples")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    finish_reason: FinishReason
    usage: Usage
    risk: ResponseRisk
    prompt_features: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    request_id: str
    model: str
    mode: InferenceMode
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., risk: _Optional[_Union[ResponseRisk, _Mapping]] = ..., prompt_features: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("text", "chat", "sampling", "stopping", "logprobs", "interpretability", "steering", "mode", "sparsity_percent", "request_id", "structured_output", "priority", "adapter")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INTERPRETABILITY_FIELD_NUMBER: _ClassVar[int]
    STEERING_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    sampling: SamplingOptions
    stopping: StoppingOptions
    logprobs: LogprobOptions
    interpretability: InterpretabilityOptions
    steering: _containers.RepeatedCompositeFieldContainer[SteeringIntervention]
    mode: InferenceMode
    sparsity_percent: int
    request_id: str
    structured_output: StructuredOutput
    priority: int
    adapter: str
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., stopping: _Optional[_Union[StoppingOptions, _Mapping]] = ..., logprobs: _Optional[_Union[LogprobOptions, _Mapping]] = ..., interpretability: _Optional[_Union[InterpretabilityOptions, _Mapping]] = ..., steering: _Optional[_Iterable[_Union[SteeringIntervention, _Mapping]]] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., sparsity_percent: _Optional[int] = ..., request_id: _Optional[str] = ..., structured_output: _Optional[_Union[StructuredOutput, _Mapping]] = ..., priority: _Optional[int] = ..., adapter: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text_delta", "tokens", "finish_reason", "usage", "risk", "prompt_features", "request_id", "sample_index")
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    text_delta: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    finish_reason: FinishReason
    usage: Usage
    risk: ResponseRisk
    prompt_features: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    request_id: str
    sample_index: int
    def __init__(self, text_delta: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., risk: _Optional[_Union[ResponseRisk, _Mapping]] = ..., prompt_features: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., request_id: _Optional[str] = ..., sample_index: _Optional[int] = ...) -> None: ...

class TokenFeatures(_message.Message):
    __slots__ = ("token_id", "token_text", "features")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token_text: str
    features: _containers.RepeatedCompositeFieldContainer[LayerFeatures]
    def __init__(self, token_id: _Optional[int] = ..., token_text: _Optional[str] = ..., features: _Optional[_Iterable[_Union[LayerFeatures, _Mapping]]] = ...) -> None: ...

class ScoreHallucinationRequest(_message.Message):
    __slots__ = ("text", "chat", "response", "return_token_risks", "mode", "sparsity_percent")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_RISKS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    response: str
    return_token_risks: bool
    mode: InferenceMode
    sparsity_percent: int
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., response: _Optional[str] = ..., return_token_risks: _Optional[bool] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., sparsity_percent: _Optional[int] = ...) -> None: ...

class ScoreHallucinationResponse(_message.Message):
    __slots__ = ("risk", "token_risks", "response_tokens", "cached")
    RISK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RISKS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    risk: ResponseRisk
    token_risks: _containers.RepeatedScalarFieldContainer[float]
    response_tokens: int
    cached: bool
    def __init__(self, risk: _Optional[_Union[ResponseRisk, _Mapping]] = ..., token_risks: _Optional[_Iterable[float]] = ..., response_tokens: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class GetFeatureActivationsRequest(_message.Message):
    __slots__ = ("text", "chat", "features", "mode", "sparsity_percent")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    features: _containers.RepeatedCompositeFieldContainer[FeatureSelection]
    mode: InferenceMode
    sparsity_percent: int
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., features: _Optional[_Iterable[_Union[FeatureSelection, _Mapping]]] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., sparsity_percent: _Optional[int] = ...) -> None: ...

class GetFeatureActivationsResponse(_message.Message):
    __slots__ = ("tokens", "cached")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    cached: bool
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., cached: _Optional[bool] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("token_id", "token_text", "score")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token_text: str
    score: float
    def __init__(self, token_id: _Optional[int] = ..., token_text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ActivatingExample(_message.Message):
    __slots__ = ("text", "activation")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    activation: float
    def __init__(self, text: _Optional[str] = ..., activation: _Optional[float] = ...) -> None: ...

class Feature(_message.Message):
    __slots__ = ("layer", "sae_id", "feature_id", "label", "label_machine_generated", "density", "top_examples", "promoted_tokens", "suppressed_tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_MACHINE_GENERATED_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    TOP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    sae_id: str
    feature_id: int
    label: str
    label_machine_generated: bool
    density: float
    top_examples: _containers.RepeatedCompositeFieldContainer[ActivatingExample]
    promoted_tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    suppressed_tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    def __init__(self, layer: _Optional[int] = ..., sae_id: _Optional[str] = ..., feature_id: _Optional[int] = ..., label: _Optional[str] = ..., label_machine_generated: _Optional[bool] = ..., density: _Optional[float] = ..., top_examples: _Optional[_Iterable[_Union[ActivatingExample, _Mapping]]] = ..., promoted_tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., suppressed_tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ...) -> None: ...

class GetFeatureRequest(_message.Message):
    __slots__ = ("layer", "sae_id", "feature_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    sae_id: str
    feature_id: int
    def __init__(self, layer: _Optional[int] = ..., sae_id: _Optional[str] = ..., feature_id: _Optional[int] = ...) -> None: ...

class GetFeatureResponse(_message.Message):
    __slots__ = ("feature",)
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    feature: Feature
    def __init__(self, feature: _Optional[_Union[Feature, _Mapping]] = ...) -> None: ...

class SearchFeaturesRequest(_message.Message):
    __slots__ = ("layer", "sae_id", "text_query", "example_text", "page_size")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_QUERY_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_TEXT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    sae_id: str
    text_query: str
    example_text: str
    page_size: int
    def __init__(self, layer: _Optional[int] = ..., sae_id: _Optional[str] = ..., text_query: _Optional[str] = ..., example_text: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class FeatureMatch(_message.Message):
    __slots__ = ("feature", "score")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    feature: Feature
    score: float
    def __init__(self, feature: _Optional[_Union[Feature, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchFeaturesResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[FeatureMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[FeatureMatch, _Mapping]]] = ...) -> None: ...

class RegisterSteeringVectorRequest(_message.Message):
    __slots__ = ("vector_id", "values", "description")
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    vector_id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    description: str
    def __init__(self, vector_id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., description: _Optional[str] = ...) -> None: ...

class RegisterSteeringVectorResponse(_message.Message):
    __slots__ = ("vector_id", "dimension", "l2_norm")
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    vector_id: str
    dimension: int
    l2_norm: float
    def __init__(self, vector_id: _Optional[str] = ..., dimension: _Optional[int] = ..., l2_norm: _Optional[float] = ...) -> None: ...

class SteeringVector(_message.Message):
    __slots__ = ("vector_id", "dimension", "l2_norm", "digest")
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    vector_id: str
    dimension: int
    l2_norm: float
    digest: str
    def __init__(self, vector_id: _Optional[str] = ..., dimension: _Optional[int] = ..., l2_norm: _Optional[float] = ..., digest: _Optional[str] = ...) -> None: ...

class ListSteeringVectorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSteeringVectorsResponse(_message.Message):
    __slots__ = ("vectors", "store")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[SteeringVector]
    store: str
    def __init__(self, vectors: _Optional[_Iterable[_Union[SteeringVector, _Mapping]]] = ..., store: _Optional[str] = ...) -> None: ...

class GetSteeringVectorRequest(_message.Message):
    __slots__ = ("vector_id",)
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    vector_id: str
    def __init__(self, vector_id: _Optional[str] = ...) -> None: ...

class GetSteeringVectorResponse(_message.Message):
    __slots__ = ("vector", "values")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    vector: SteeringVector
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, vector: _Optional[_Union[SteeringVector, _Mapping]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class DeleteSteeringVectorRequest(_message.Message):
    __slots__ = ("vector_id",)
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    vector_id: str
    def __init__(self, vector_id: _Optional[str] = ...) -> None: ...

class DeleteSteeringVectorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "rank", "target_modules")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class SaeInfo(_message.Message):
    __slots__ = ("sae_id", "layer", "hook_name", "d_in", "d_sae", "architecture")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    layer: int
    hook_name: str
    d_in: int
    d_sae: int
    architecture: str
    def __init__(self, sae_id: _Optional[str] = ..., layer: _Optional[int] = ..., hook_name: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., architecture: _Optional[str] = ...) -> None: ...

class ModeInfo(_message.Message):
    __slots__ = ("mode", "available", "sparsity_levels_percent", "description")
    MODE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_LEVELS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    mode: InferenceMode
    available: bool
    sparsity_levels_percent: _containers.RepeatedScalarFieldContainer[int]
    description: str
    def __init__(self, mode: _Optional[_Union[InferenceMode, str]] = ..., available: _Optional[bool] = ..., sparsity_levels_percent: _Optional[_Iterable[int]] = ..., description: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_new_tokens", "max_stop_sequences", "max_interventions", "max_features_per_token", "max_top_logprobs", "max_steering_strength", "max_message_bytes", "max_in_flight_requests", "max_structured_output_chars", "max_samples")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_FEATURES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEERING_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STRUCTURED_OUTPUT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_new_tokens: int
    max_stop_sequences: int
    max_interventions: int
    max_features_per_token: int
    max_top_logprobs: int
    max_steering_strength: float
    max_message_bytes: int
    max_in_flight_requests: int
    max_structured_output_chars: int
    max_samples: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_stop_sequences: _Optional[int] = ..., max_interventions: _Optional[int] = ..., max_features_per_token: _Optional[int] = ..., max_top_logprobs: _Optional[int] = ..., max_steering_strength: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., max_in_flight_requests: _Optional[int] = ..., max_structured_output_chars: _Optional[int] = ..., max_samples: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "num_layers", "hidden_size", "vocab_size", "max_model_len", "saes", "modes", "limits", "server_version", "interpretability_available", "risk_available", "risk_probe_id", "kv_cache_dtype", "kv_cache_tokens", "dtype", "scheduling_policy", "adapters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    SAES_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    INTERPRETABILITY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RISK_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RISK_PROBE_ID_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_POLICY_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    saes: _containers.RepeatedCompositeFieldContainer[SaeInfo]
    modes: _containers.RepeatedCompositeFieldContainer[ModeInfo]
    limits: Limits
    server_version: str
    interpretability_available: bool
    risk_available: bool
    risk_probe_id: str
    kv_cache_dtype: str
    kv_cache_tokens: int
    dtype: str
    scheduling_policy: str
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, model: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., saes: _Optional[_Iterable[_Union[SaeInfo, _Mapping]]] = ..., modes: _Optional[_Iterable[_Union[ModeInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., interpretability_available: _Optional[bool] = ..., risk_available: _Optional[bool] = ..., risk_probe_id: _Optional[str] = ..., kv_cache_dtype: _Optional[str] = ..., kv_cache_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., scheduling_policy: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...
