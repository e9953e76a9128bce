"""One typed settings object for the server: environment variables (FEATURELENS_*) and CLI flags.

Precedence: CLI flag > environment variable > default. `Settings.describe()` is printed at start-up.
"""

from __future__ import annotations

import argparse
import json
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SettingsError(ValueError):
    """A setting this machine cannot serve (found at start-up, beyond what the field validators can check)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEATURELENS_", extra="forbid")

    # -- model and engine --
    model: str = Field("default", description="'default' (SmolLM2-135M-Instruct, offline), a local HF folder or a hub id")
    dtype: str = Field("auto", description="weights/activations dtype for vLLM: 'auto' = bfloat16 on CPUs with "
                       "AVX512-BF16 or AMX, float32 on other CPUs (bf16 is emulated there), vLLM's own rule on GPUs; "
                       "or bfloat16 / float16 / float32")
    max_model_len: int = Field(2048, description="context length the engine is built for (tokens)")
    max_num_seqs: int = Field(64, description="max requests batched together in one engine step")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="vLLM's scheduling of waiting requests: 'fcfs' (arrival order; a request's priority "
                            "must be 0) or 'priority' (lower priority value first, then arrival; under KV "
                            "pressure the lowest-priority running request is preempted)")
    enforce_eager: bool | None = Field(None, description="run the model eagerly (true) or compiled by vLLM "
                                       "(false: torch.compile, piecewise CUDA graphs on GPUs); unset: compiled "
                                       "on GPUs, eager on CPUs. Features, steering and risk work in both; "
                                       "sparse and int8 mode need eager")
    kv_cache_gib: float = Field(1.0, description="KV cache size on CPU in GiB (VLLM_CPU_KVCACHE_SPACE)")
    kv_cache_blocks: int | None = Field(None, ge=1, description="cap the KV cache at this many blocks (vLLM's "
                                        "num_gpu_blocks_override): for hosts shared with other work, or to test "
                                        "preemption")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="KV cache element type for every request: 'auto' (the model dtype) or fp8, which "
                            "holds twice the tokens in the same memory (GPU; on CPU it needs AVX-512 or AMX)")
    gpu_memory_utilization: float = Field(0.85, description="fraction of GPU memory vLLM may use (GPU only)")
    tensor_parallel_size: int = Field(1, description="vLLM tensor parallelism (passed through)")
    pipeline_parallel_size: int = Field(1, description="vLLM pipeline parallelism (passed through)")
    # NoDecode: from the environment this comes as "6=/a,20=/b" (or JSON), split by the validator below.
    feature_transport: str = Field("zmq", description="worker→frontend feature channel: zmq (push socket) or "
                                                       "rpc (collective_rpc polling; slower, for comparison)")
    risk_probe: str = Field("default", description="risk probe file; 'default' = the shipped one for the default "
                                                     "model, 'none' disables risk scoring")
    risk_medium_threshold: float | None = Field(None, description="risk ≥ this is MEDIUM (default: the probe's own)")
    risk_high_threshold: float | None = Field(None, description="risk ≥ this is HIGH (default: the probe's own)")
    sparsity_thresholds: str = Field("default", description="WINA thresholds JSON for sparse mode; 'default' = "
                                                            "the shipped ones for the default model, 'none' disables")
    sparse_prompt: bool = Field(False, description="sparse mode also zeroes inputs of prompt tokens (prefill); "
                                                   "default: the prompt runs dense and generated tokens sparse")
    sparse_logits: Literal["int8-rescored", "dense"] = Field(
        "int8-rescored", description="sparse mode's logits: 'int8-rescored' = the int8 unembedding with each "
                                     "row's 64 best candidates recomputed in full precision (same greedy token, "
                                     "half the head's bytes), 'dense' = the full-precision head")
    quantized_mode: str = Field("int8", description="INFERENCE_MODE_QUANTIZED: 'int8' builds "
                                                                      "int8 copies of the decoder projections at start-up "
                                                                      "(~1 byte per weight), 'none' disables the mode")
    sae: Annotated[list[str], NoDecode] = Field(default_factory=list, description="SAEs to load, 'LAYER=PATH' (repeatable)")
    lora: Annotated[list[str], NoDecode] = Field(default_factory=list, description="LoRA adapters (PEFT format) to "
                                                 "load at start-up, 'NAME=PATH' (repeatable); requests choose one "
                                                 "by name")
    max_lora_rank: int = Field(16, description="largest rank of a --lora adapter, one of 1, 8, 16, 32, 64, 128, "
                                               "256, 320, 512 (vLLM sizes its LoRA buffers for it)")
    max_loras: int = Field(4, ge=1, description="distinct LoRA adapters in one engine step (vLLM's max_loras)")
    sae_gemm_dtype: Literal["bfloat16", "float32", "torch"] = Field(
        "bfloat16", description="the worker's SAE encode matmul: oneDNN in bfloat16 (half the weight bytes, ~3 "
                                "significant digits per activation; risk AUROC unchanged, docs/risk.md) or "
                                "float32, or 'torch' (bit-exact float32 reference)")

    # -- network --
    host: str = Field("127.0.0.1", description="gRPC bind address (0.0.0.0 to serve beyond this machine)")
    port: int = Field(50051, description="gRPC port (0 picks a free one)")
    metrics_host: str = Field("127.0.0.1", description="bind address of the Prometheus /metrics endpoint")
    metrics_port: int = Field(9090, description="Prometheus /metrics port (-1 disables)")
    max_message_bytes: int = Field(8 * 1024 * 1024, description="largest gRPC message accepted/sent")
    grace_period_s: float = Field(20.0, description="on SIGTERM, time in-flight RPCs get to finish")
    tls_cert_file: str | None = Field(None, description="PEM certificate chain: serve TLS instead of plaintext")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: str | None = Field(None, description="PEM CA: require client certificates (mutual TLS)")
    auth_token_file: str | None = Field(None, description="bearer tokens, one per line: callers must send one")
    auth_tokens: str | None = Field(None, description="comma-separated bearer tokens (prefer the file)")
    health_open: bool = Field(True, description="health checks need no token (for probes)")
    reflection_open: bool = Field(True, description="server reflection needs no token")

    # -- limits (reported by GetModelInfo) --
    default_max_new_tokens: int = Field(256, description="max_new_tokens when a request leaves it unset")
    max_new_tokens: int = Field(2048, description="upper bound on a request's max_new_tokens")
    max_stop_sequences: int = Field(8, description="stop sequences per request")
    max_stop_sequence_chars: int = Field(256, description="characters per stop sequence")
    max_interventions: int = Field(16, description="steering interventions per request")
    max_vectors_per_caller: int = Field(256, ge=1, description="registered steering vectors per caller (namespace)")
    max_vector_bytes_per_caller: int = Field(64 << 20, ge=1, description="bytes of registered steering vectors "
                                             "per caller (float32 values)")
    max_features_per_token: int = Field(64, description="top-k SAE features per token")
    max_top_logprobs: int = Field(20, description="alternatives per position with logprobs")
    max_steering_strength: float = Field(1000.0, description="bound on |strength| of an intervention")
    max_in_flight: int = Field(256, description="RPCs admitted at once; more get RESOURCE_EXHAUSTED")
    max_structured_output_chars: int = Field(65536, ge=1, description="characters of a request's structured "
                                             "output constraint (JSON Schema, regex, grammar, or all choices)")
    structured_output_whitespace: Literal["compact", "any"] = Field(
        "compact", description="JSON from a json_schema constraint: 'compact' (no whitespace between tokens, the "
                               "engine's choice for every request) or 'any' (the model may put whitespace "
                               "anywhere JSON allows; small models can then loop on newlines)")
    max_samples: int = Field(16, ge=1, description="largest num_samples of a request (each sample is one engine "
                                                   "request: a request with n samples holds n batch slots)")

    # -- cache --
    redis_url: str | None = Field(None, description="redis://host:port/db for the shared feature cache")
    cache_ttl_s: int = Field(3600, description="time to live of cached feature results")
    cache_max_value_bytes: int = Field(4 * 1024 * 1024, description="larger results are not cached")
    cache_lru_bytes: int = Field(64 * 1024 * 1024, description="in-process cache size when no Redis")

    # -- logging --
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_json: bool = Field(False, description="one JSON object per log line")
    otlp_endpoint: str | None = Field(None, description="OpenTelemetry collector (OTLP/gRPC) for traces, e.g. "
                                                        "http://otel-collector:4317 (https:// for TLS); unset: no "
                                                        "tracing")

    @field_validator("sae", "lora", mode="before")
    @classmethod
    def _split_sae(cls, value: Any) -> Any:
        # From the environment a list may come as "6=/a,20=/b" rather than JSON.
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part for part in value.split(",") if part]
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _check_lora_rank(cls, value: int) -> int:
        if value not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError("max_lora_rank must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (vLLM's ranks)")
        return value

    @field_validator("quantized_mode")
    @classmethod
    def _check_quantized_mode(cls, value: str) -> str:
        if value not in ("int8", "none"):
            raise ValueError("quantized_mode must be 'int8' or 'none'")
        return value

    @field_validator("feature_transport")
    @classmethod
    def _check_transport(cls, value: str) -> str:
        if value not in ("zmq", "rpc"):
            raise ValueError("feature_transport must be 'zmq' or 'rpc'")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _check_thresholds(self) -> Settings:
        for name in ("risk_medium_threshold", "risk_high_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        medium, high = self.risk_medium_threshold, self.risk_high_threshold
        if medium is not None and high is not None and medium > high:
            raise ValueError("risk_medium_threshold must not exceed risk_high_threshold")
        return self

    def describe(self) -> str:
        width = max(len(name) for name in type(self).model_fields)
        secret = {"auth_tokens"}  # printed at start-up: never show a token

        def shown(name: str) -> str:
            value = getattr(self, name)
            return "'***'" if name in secret and value else repr(value)

        return "\n".join(f"  {name:<{width}} = {shown(name)}" for name in type(self).model_fields)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one --flag per setting; unset flags fall back to env vars, then defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        help_text = f"{field.description} [env FEATURELENS_{name.upper()}]"
        if annotation is bool or annotation == bool | None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(annotation) is list:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        elif get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=get_args(annotation), default=None, help=help_text)
        else:
            kind = next((t for t in (get_args(annotation) or (annotation,)) if t is not type(None)), str)
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)
