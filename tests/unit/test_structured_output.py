"""Structured output validation (no engine): vLLM's own xgrammar check runs before the engine, and a constraint
it refuses is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json

import grpc
import pytest
from featurelens.server.config import Settings
from featurelens.server.engine import STRUCTURED_OUTPUT_BACKEND, vllm_engine_kwargs
from featurelens.server.validation import ApiError, validate_generate
from featurelens.v1 import featurelens_pb2 as pb

SCHEMA = json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "capital": {"type": "boolean"}},
                     "required": ["city", "capital"], "additionalProperties": False})


class WordTokenizer:
    def encode_text(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [t for m in messages for t in [1, 2, *self.encode_text(m["content"]), 3]]


def plan(settings: Settings | None = None, **fields):
    return validate_generate(pb.GenerateStreamRequest(text="hello", **fields), WordTokenizer(),
                             settings or Settings(), max_model_len=100, vocab_size=1000, request_id="r1")


def refused(**fields) -> ApiError:
    with pytest.raises(ApiError) as info:
        plan(**fields)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value


@pytest.mark.parametrize("constraint, expected", [
    (pb.StructuredOutput(json_schema=SCHEMA), {"json": SCHEMA}),
    (pb.StructuredOutput(regex=r"[A-Z][a-z]+, [0-9]{4}"), {"regex": r"[A-Z][a-z]+, [0-9]{4}"}),
    (pb.StructuredOutput(choice=pb.ChoiceList(choices=["yes", "no", "it \"depends\"\n"])),
     {"choice": ["yes", "no", "it \"depends\"\n"]}),
    (pb.StructuredOutput(grammar='root ::= "The answer is " ("A" | "B") "."'),
     {"grammar": 'root ::= "The answer is " ("A" | "B") "."'}),
    (pb.StructuredOutput(grammar='start: "yes" | "no"'), {"grammar": 'start: "yes" | "no"'}),  # Lark
])
def test_valid_constraints_become_structured_outputs_params(constraint, expected):
    assert plan(structured_output=constraint).structured_output == expected


def test_no_constraint_is_none():
    assert plan().structured_output is None
    assert plan(structured_output=pb.StructuredOutput()).structured_output is None


@pytest.mark.parametrize("constraint, field, words", [
    (pb.StructuredOutput(json_schema="{not json"), "structured_output.json_schema", "not valid JSON"),
    (pb.StructuredOutput(json_schema="[1, 2]"), "structured_output.json_schema", "JSON object"),
    (pb.StructuredOutput(json_schema='{"type": "objectx"}'), "structured_output.json_schema", 'Unsupported type "objectx"'),
    (pb.StructuredOutput(json_schema='{"$ref": "#/defs/x"}'), "structured_output.json_schema", "defs"),
    # valid JSON Schema that xgrammar cannot enforce: vLLM's xgrammar check refuses it, so do we
    (pb.StructuredOutput(json_schema='{"type": "array", "uniqueItems": true}'), "structured_output.json_schema",
     "not supported by xgrammar"),
    (pb.StructuredOutput(json_schema="  "), "structured_output.json_schema", "must not be empty"),
    (pb.StructuredOutput(regex="[a-"), "structured_output.regex", "Unclosed '['"),
    (pb.StructuredOutput(regex=""), "structured_output.regex", "must not be empty"),
    (pb.StructuredOutput(grammar="root ::= "), "structured_output.grammar", "EBNF parser error at line 1"),
    (pb.StructuredOutput(grammar='root ::= "a" | b'), "structured_output.grammar", 'Rule "b" is not defined'),
    (pb.StructuredOutput(grammar='start: "a" foo'), "structured_output.grammar", "unknown name 'foo'"),
    (pb.StructuredOutput(choice=pb.ChoiceList()), "structured_output.choice.choices", "at least one"),
    (pb.StructuredOutput(choice=pb.ChoiceList(choices=["a", ""])), "structured_output.choice.choices[1]",
     "must not be empty"),
])
def test_invalid_constraints_name_the_field(constraint, field, words):
    error = refused(structured_output=constraint)
    assert error.message.startswith(field + ": ")
    assert words in error.message
    assert "/project/cpp" not in error.message  # xgrammar's source location is left out


def test_size_limit():
    settings = Settings(max_structured_output_chars=10)
    with pytest.raises(ApiError) as info:
        plan(settings, structured_output=pb.StructuredOutput(regex="[a-z]{1,20}x"))
    assert info.value.message.startswith("structured_output.regex: is 12 characters; at most 10")
    with pytest.raises(ApiError) as info:
        plan(settings, structured_output=pb.StructuredOutput(choice=pb.ChoiceList(choices=["abcdef", "ghijk"])))
    assert info.value.message.startswith("structured_output.choice.choices: is 11 characters")


@pytest.mark.parametrize("stopping, field", [
    (pb.StoppingOptions(ignore_eos=True), "stopping.ignore_eos"),
    (pb.StoppingOptions(min_new_tokens=3), "stopping.min_new_tokens"),
])
def test_stopping_options_that_fight_the_constraint_are_refused(stopping, field):
    """Measured on vLLM 0.32 (CPU): with a choice constraint, ignore_eos kept generating unconstrained text after
    the choice, and min_tokens=5 was silently ignored (2 tokens)."""
    error = refused(structured_output=pb.StructuredOutput(choice=pb.ChoiceList(choices=["yes", "no"])),
                    stopping=stopping)
    assert error.message.startswith(field + ": ")
    assert plan(stopping=stopping).structured_output is None  # fine without a constraint


def test_the_engine_compiles_with_the_backend_validation_checks_against():
    config = vllm_engine_kwargs(Settings(), "/models/m")["structured_outputs_config"]
    assert config["backend"] == STRUCTURED_OUTPUT_BACKEND == "xgrammar"


def test_json_is_compact_unless_asked_otherwise():
    """Any-whitespace JSON let SmolLM2 loop on newlines: 2 of 16 answers finished in 512 tokens, 14 compact."""
    assert vllm_engine_kwargs(Settings(), "/m")["structured_outputs_config"]["disable_any_whitespace"] is True
    loose = Settings(structured_output_whitespace="any")
    assert vllm_engine_kwargs(loose, "/m")["structured_outputs_config"]["disable_any_whitespace"] is False
