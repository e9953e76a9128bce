"""Request validation: every bad field becomes an ApiError naming the field; nothing invalid reaches the engine.

Pure functions over the protobuf messages, so they are unit-tested without an engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from featurelens.server.config import Settings
from featurelens.v1 import featurelens_pb2 as pb

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant"}


class ApiError(Exception):
    """An error with a gRPC status; the message starts with the offending field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field_path: str, problem: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_path}: {problem}")


class Tokenizes(Protocol):
    def encode_text(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]: ...


@dataclass
class GenerationPlan:
    """A validated generation request, ready to become vLLM SamplingParams."""

    prompt_token_ids: list[int]
    sampling_kwargs: dict[str, Any]
    stop_token_ids: frozenset[int]
    token_logprobs: bool
    top_logprobs: int
    mode: pb.InferenceMode
    request_id: str
    extra_args: dict[str, Any] = field(default_factory=dict)
    sparsity_percent: int = 0  # WINA level with INFERENCE_MODE_SPARSE, else 0
    # vLLM StructuredOutputsParams keyword arguments (json / regex / choice / grammar), checked by xgrammar
    structured_output: dict[str, Any] | None = None
    num_samples: int = 1  # independent samples, one engine request each (SamplingOptions.num_samples)
    priority: int = 0  # vLLM scheduling priority, lower first (only with --scheduling-policy priority)
    adapter: str = ""  # LoRA adapter name (a loaded one), "" for the base model

    def sample_kwargs(self, index: int) -> dict[str, Any]:
        """vLLM sampling arguments of sample `index`: its own seed stream, seed + index, when a seed was given."""
        if index == 0 or self.sampling_kwargs.get("seed") is None:
            return self.sampling_kwargs
        return {**self.sampling_kwargs, "seed": self.sampling_kwargs["seed"] + index}


def check_finite(field_path: str, value: float) -> None:
    if not math.isfinite(value):
        raise invalid(field_path, f"must be a finite number, got {value}")


def check_enum(field_path: str, value: int, enum: Any) -> None:
    if value not in enum.values():
        raise invalid(field_path, f"unknown value {value}; expected one of {', '.join(enum.keys())}")


def chat_messages(chat: pb.ChatMessages) -> list[dict[str, str]]:
    if not chat.messages:
        raise invalid("chat.messages", "must contain at least one message")
    messages = []
    for i, message in enumerate(chat.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise invalid(f"chat.messages[{i}].role", f"must be SYSTEM, USER or ASSISTANT, got {message.role}")
        if not message.content.strip():
            raise invalid(f"chat.messages[{i}].content", "must not be empty")
        messages.append({"role": role, "content": message.content})
    return messages


def prompt_token_ids(request: Any, tokenizer: Tokenizes, max_model_len: int) -> list[int]:
    """Tokenizes the request's `text` or `chat` oneof; the prompt must leave room for one new token."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise invalid("prompt", "set either text or chat")
    if kind == "text":
        if not request.text.strip():
            raise invalid("text", "must not be empty")
        ids = tokenizer.encode_text(request.text)
    else:
        ids = tokenizer.encode_chat(chat_messages(request.chat))
    if len(ids) >= max_model_len:
        raise invalid(kind, f"prompt is {len(ids)} tokens; the model's context is {max_model_len} tokens "
                            f"and at least one must be left for the answer")
    return ids


def validate_generate(request: Any, tokenizer: Tokenizes, settings: Settings, max_model_len: int,
                      vocab_size: int, request_id: str, sparsity_levels: Sequence[int] = (),
                      quantized_available: bool = False, adapters: Collection[str] = ()) -> GenerationPlan:
    """GenerateRequest or GenerateStreamRequest → GenerationPlan, or ApiError naming the field.

    `sparsity_levels`: the WINA levels (percent) the engine serves; empty means sparse mode is unavailable.
    `quantized_available`: the worker installed the int8 projections (INFERENCE_MODE_QUANTIZED).
    `adapters`: the names of the LoRA adapters the engine loaded.
    """
    if request.request_id and not _REQUEST_ID.match(request.request_id):
        raise invalid("request_id", "must be 1-128 characters of letters, digits and . _ : / -")
    check_enum("mode", request.mode, pb.InferenceMode)
    sampling = _sampling_kwargs(request.sampling, vocab_size)
    num_samples = _num_samples(request.sampling, sampling.get("seed"), settings)
    stopping, stop_ids = _stopping_kwargs(request.stopping, settings, vocab_size)
    top_logprobs = request.logprobs.top_logprobs
    if not 0 <= top_logprobs <= settings.max_top_logprobs:
        raise invalid("logprobs.top_logprobs", f"must be in [0, {settings.max_top_logprobs}], got {top_logprobs}")
    mode, sparsity_percent = check_mode(request.mode, request.sparsity_percent, sparsity_levels,
                                        quantized_available)
    structured = _structured_output(request, stopping, settings)

    ids = prompt_token_ids(request, tokenizer, max_model_len)
    room = max_model_len - len(ids)
    # Never ask the engine for more than the context holds; the answer then ends with FINISH_REASON_LENGTH.
    stopping["max_tokens"] = min(stopping["max_tokens"], room)
    stopping["min_tokens"] = min(stopping["min_tokens"], stopping["max_tokens"])
    want_logprobs = request.logprobs.token_logprobs or top_logprobs > 0
    return GenerationPlan(
        prompt_token_ids=ids,
        sampling_kwargs={**sampling, **stopping, "logprobs": top_logprobs if want_logprobs else None},
        stop_token_ids=frozenset(stop_ids),
        token_logprobs=want_logprobs,
        top_logprobs=top_logprobs,
        mode=mode,
        request_id=request_id,
        sparsity_percent=sparsity_percent,
        structured_output=structured,
        num_samples=num_samples,
        priority=_priority(request.priority, settings),
        adapter=_adapter(request.adapter, adapters, mode),
    )


def _adapter(name: str, adapters: Collection[str], mode: pb.InferenceMode) -> str:
    """A request's LoRA adapter: one the server loaded, or "" for the base model. Dense mode only: the sparse and
    int8 modes compute the projections themselves and would leave the adapter's update out."""
    if name and mode != pb.INFERENCE_MODE_DENSE:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"adapter: LoRA adapters run in INFERENCE_MODE_DENSE only; the sparse and int8 modes compute "
                       f"the projections themselves, without the adapter's update (got mode "
                       f"{pb.InferenceMode.Name(mode)})")
    if not name or name in adapters:
        return name
    if not adapters:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"adapter: this server loads no LoRA adapters (start it with --lora NAME=PATH), got {name!r}")
    raise invalid("adapter", f"unknown adapter {name[:64]!r}; loaded: {', '.join(sorted(adapters))} "
                             "(GetModelInfo.adapters)")


def _priority(priority: int, settings: Settings) -> int:
    """A request's scheduling priority; only a server started with --scheduling-policy priority honours one."""
    if priority and settings.scheduling_policy != "priority":
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"priority: this server schedules requests first come, first served, so priority must be 0 "
                       f"(got {priority}); start it with --scheduling-policy priority (GetModelInfo."
                       f"scheduling_policy)")
    return priority


def _num_samples(sampling: pb.SamplingOptions, seed: int | None, settings: Settings) -> int:
    """`sampling.num_samples` (0 means 1); sample i's seed is seed + i, which must stay a 63-bit integer."""
    n = sampling.num_samples or 1
    if not 1 <= n <= settings.max_samples:
        raise invalid("sampling.num_samples", f"must be in [1, {settings.max_samples}] (0 means 1), got "
                                              f"{sampling.num_samples}")
    if seed is not None and seed + n - 1 >= 2**63:
        raise invalid("sampling.seed", f"sample {n - 1} would use seed + {n - 1}, past the 63-bit range")
    return n


def _structured_output(request: Any, stopping: dict[str, Any], settings: Settings) -> dict[str, Any] | None:
    """`structured_output` → vLLM StructuredOutputsParams kwargs (server/structured_output.py), or None. The
    constraint decides where the text ends (only end-of-sequence is allowed once it is complete), so stopping
    options that suppress the end-of-sequence token are refused with it."""
    if request.structured_output.WhichOneof("constraint") is None:
        return None
    if stopping["ignore_eos"]:
        raise invalid("stopping.ignore_eos", "cannot be combined with structured_output: the constraint ends "
                                             "the text")
    if stopping["min_tokens"]:
        raise invalid("stopping.min_new_tokens", "must be 0 with structured_output: the constraint decides the "
                                                 "text's length")
    from featurelens.server.structured_output import structured_output_kwargs

    return structured_output_kwargs(request.structured_output, settings.max_structured_output_chars)


def check_mode(mode: pb.InferenceMode, sparsity_percent: int, sparsity_levels: Sequence[int],
               quantized_available: bool) -> tuple[pb.InferenceMode, int]:
    """`mode` + `sparsity_percent` of a request → (mode, sparsity percent or 0), or ApiError naming the field."""
    check_enum("mode", mode, pb.InferenceMode)
    if mode == pb.INFERENCE_MODE_SPARSE:
        check_sparsity(sparsity_percent, sparsity_levels)
        return mode, sparsity_percent
    if sparsity_percent:
        raise invalid("sparsity_percent", "only valid with mode INFERENCE_MODE_SPARSE")
    if mode == pb.INFERENCE_MODE_QUANTIZED and not quantized_available:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       "mode: INFERENCE_MODE_QUANTIZED is not available on this server (disabled with "
                       "--quantized-mode none, a compiled engine (--no-enforce-eager), a device its int8 kernels do not run on, or the "
                       "model's safetensors could not be read; GetModelInfo.modes says which modes are available)")
    return mode or pb.INFERENCE_MODE_DENSE, 0


def check_sparsity(percent: int, levels: Sequence[int]) -> None:
    """A sparse-mode request must name one of the calibrated levels the server has loaded."""
    if not levels:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       "mode: INFERENCE_MODE_SPARSE needs WINA thresholds calibrated for the served model and "
                       "none are loaded (GetModelInfo.modes says which modes are available)")
    if percent not in levels:
        got = "unset" if percent == 0 else str(percent)
        raise invalid("sparsity_percent", f"with INFERENCE_MODE_SPARSE must be one of "
                                          f"{', '.join(str(level) for level in sorted(levels))}, got {got}")


def _sampling_kwargs(sampling: pb.SamplingOptions, vocab_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sampling.HasField("temperature"):
        check_finite("sampling.temperature", sampling.temperature)
        if not 0.0 <= sampling.temperature <= 2.0:
            raise invalid("sampling.temperature", f"must be in [0, 2], got {sampling.temperature:g}")
        out["temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        check_finite("sampling.top_p", sampling.top_p)
        if not 0.0 < sampling.top_p <= 1.0:
            raise invalid("sampling.top_p", f"must be in (0, 1], got {sampling.top_p:g}")
        out["top_p"] = sampling.top_p
    if sampling.HasField("top_k"):
        if not 0 <= sampling.top_k <= vocab_size:
            raise invalid("sampling.top_k", f"must be in [0, {vocab_size}] (0 disables), got {sampling.top_k}")
        out["top_k"] = sampling.top_k
    if sampling.HasField("seed"):
        if not 0 <= sampling.seed < 2**63:
            raise invalid("sampling.seed", f"must be a non-negative 63-bit integer, got {sampling.seed}")
        out["seed"] = sampling.seed
    if sampling.HasField("repetition_penalty"):
        check_finite("sampling.repetition_penalty", sampling.repetition_penalty)
        if not 0.0 < sampling.repetition_penalty <= 2.0:
            raise invalid("sampling.repetition_penalty", f"must be in (0, 2], got {sampling.repetition_penalty:g}")
        out["repetition_penalty"] = sampling.repetition_penalty
    return out


def _stopping_kwargs(stopping: pb.StoppingOptions, settings: Settings,
                     vocab_size: int) -> tuple[dict[str, Any], list[int]]:
    max_new = settings.default_max_new_tokens
    if stopping.HasField("max_new_tokens"):
        max_new = stopping.max_new_tokens
        if not 1 <= max_new <= settings.max_new_tokens:
            raise invalid("stopping.max_new_tokens", f"must be in [1, {settings.max_new_tokens}], got {max_new}")
    if not 0 <= stopping.min_new_tokens <= max_new:
        raise invalid("stopping.min_new_tokens", f"must be in [0, max_new_tokens={max_new}], got "
                                                  f"{stopping.min_new_tokens}")
    if len(stopping.stop_sequences) > settings.max_stop_sequences:
        raise invalid("stopping.stop_sequences", f"at most {settings.max_stop_sequences} allowed, got "
                                                  f"{len(stopping.stop_sequences)}")
    for i, stop in enumerate(stopping.stop_sequences):
        if not stop or len(stop) > settings.max_stop_sequence_chars:
            raise invalid(f"stopping.stop_sequences[{i}]",
                          f"must be 1-{settings.max_stop_sequence_chars} characters, got {len(stop)}")
    if len(stopping.stop_token_ids) > settings.max_stop_sequences:
        raise invalid("stopping.stop_token_ids", f"at most {settings.max_stop_sequences} allowed, got "
                                                  f"{len(stopping.stop_token_ids)}")
    for i, token_id in enumerate(stopping.stop_token_ids):
        if token_id >= vocab_size:
            raise invalid(f"stopping.stop_token_ids[{i}]", f"must be < vocab size {vocab_size}, got {token_id}")
    kwargs = {
        "max_tokens": max_new,
        "min_tokens": stopping.min_new_tokens,
        "stop": list(stopping.stop_sequences) or None,
        "stop_token_ids": list(stopping.stop_token_ids) or None,
        "ignore_eos": stopping.ignore_eos,
    }
    return kwargs, list(stopping.stop_token_ids)

