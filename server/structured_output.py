"""Structured output: a request's `structured_output` (JSON Schema, regex, choice list or grammar) checked
before the engine, and turned into the keyword arguments of vLLM's `StructuredOutputsParams`.

The engine compiles constraints with xgrammar only (`engine.STRUCTURED_OUTPUT_BACKEND`, no silent fallback to
another backend), and the check here is vLLM's own xgrammar validation, the one the engine's input processor runs: a
constraint passes it exactly when the engine would accept it. A constraint it refuses is INVALID_ARGUMENT naming
the field, with xgrammar's own words on what is wrong.
"""

from __future__ import annotations

import json
import re
from typing import Any

from featurelens.server.validation import invalid
from featurelens.v1 import featurelens_pb2 as pb

# xgrammar prefixes its messages with "[12:14:35] /project/cpp/json_schema_converter.cc:4944: "
_NATIVE_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+?:\d+: ")


def _reason(error: BaseException) -> str:
    """vLLM's message with xgrammar's own words added where vLLM left them out ('Invalid grammar
    specification.'), without xgrammar's source location."""
    message = str(error).strip()
    cause = str(error.__cause__ or "").strip()
    if cause and cause not in message:
        message = f"{message.rstrip('.')}: {cause}"
    return _NATIVE_PREFIX.sub("", message).strip() or type(error).__name__


def _engine_accepts(kwargs: dict[str, Any], field_path: str) -> None:
    """vLLM's xgrammar validation of these StructuredOutputsParams, as the engine runs it; refusal → ApiError."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    try:
        validate_xgrammar_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)))
    except Exception as error:  # VLLMValidationError, ValueError and whatever xgrammar raises on hostile input
        raise invalid(field_path, _reason(error)) from error


def structured_output_kwargs(message: pb.StructuredOutput, max_chars: int) -> dict[str, Any] | None:
    """`structured_output` → StructuredOutputsParams keyword arguments (None when unset), or ApiError naming
    the field. `max_chars` bounds the constraint's text (the schema, regex, grammar or all choices together)."""
    kind = message.WhichOneof("constraint")
    if kind is None:
        return None
    field_path = f"structured_output.{kind}"
    if kind == "choice":
        choices = list(message.choice.choices)
        if not choices:
            raise invalid("structured_output.choice.choices", "must list at least one choice")
        for i, choice in enumerate(choices):
            if not choice:
                raise invalid(f"structured_output.choice.choices[{i}]", "must not be empty")
        size = sum(len(c) for c in choices)
        kwargs: dict[str, Any] = {"choice": choices}
        field_path = "structured_output.choice.choices"
    else:
        text = getattr(message, kind)
        size = len(text)
        if not text.strip():
            raise invalid(field_path, "must not be empty")
        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except ValueError as error:
                raise invalid(field_path, f"is not valid JSON ({error})") from error
            if not isinstance(schema, dict):
                raise invalid(field_path, f"must be a JSON object (a JSON Schema), got {type(schema).__name__}")
            kwargs = {"json": text}
        else:
            kwargs = {kind: text}
    if size > max_chars:
        raise invalid(field_path, f"is {size} characters; at most {max_chars} (limits.max_structured_output_chars)")
    _engine_accepts(dict(kwargs), field_path)
    return kwargs
