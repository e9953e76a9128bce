"""Request validation as pure functions (no engine): every bad field → ApiError naming the field."""

from __future__ import annotations

import grpc
import pytest
from featurelens.server.config import Settings
from featurelens.server.validation import ApiError, validate_generate
from featurelens.v1 import featurelens_pb2 as pb


class WordTokenizer:
    """One token per whitespace-separated word; chat adds 3 template tokens per message."""

    def encode_text(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [t for m in messages for t in [1, 2, *self.encode_text(m["content"]), 3]]


SETTINGS = Settings(max_new_tokens=512, default_max_new_tokens=64, max_stop_sequences=4)


def plan(**fields):
    return validate_generate(pb.GenerateRequest(**fields), WordTokenizer(), SETTINGS, max_model_len=100,
                             vocab_size=1000, request_id="r1")


def error_of(**fields) -> ApiError:
    with pytest.raises(ApiError) as info:
        plan(**fields)
    return info.value


def test_defaults():
    p = plan(text="hello world")
    assert p.prompt_token_ids == WordTokenizer().encode_text("hello world")
    assert p.sampling_kwargs["max_tokens"] == 64
    assert p.sampling_kwargs["logprobs"] is None
    assert p.mode == pb.INFERENCE_MODE_DENSE


def test_max_new_tokens_clamped_to_context():
    p = plan(text=" ".join(["w"] * 90), stopping=pb.StoppingOptions(max_new_tokens=500))
    assert p.sampling_kwargs["max_tokens"] == 10


@pytest.mark.parametrize("fields, field, code", [
    (dict(), "prompt", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="   "), "text", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text=" ".join(["w"] * 100)), "text", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(chat=pb.ChatMessages()), "chat.messages", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(content="x")])), "chat.messages[0].role",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER)])), "chat.messages[0].content",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(max_new_tokens=0)), "stopping.max_new_tokens",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(max_new_tokens=-1)), "stopping.max_new_tokens",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(max_new_tokens=513)), "stopping.max_new_tokens",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(max_new_tokens=5, min_new_tokens=6)), "stopping.min_new_tokens",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(stop_sequences=["a"] * 5)), "stopping.stop_sequences",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(stop_sequences=[""])), "stopping.stop_sequences[0]",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", stopping=pb.StoppingOptions(stop_token_ids=[5000])), "stopping.stop_token_ids[0]",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sampling=pb.SamplingOptions(temperature=-0.1)), "sampling.temperature",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sampling=pb.SamplingOptions(temperature=float("inf"))), "sampling.temperature",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sampling=pb.SamplingOptions(top_p=0.0)), "sampling.top_p", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sampling=pb.SamplingOptions(top_k=-2)), "sampling.top_k", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sampling=pb.SamplingOptions(seed=-5)), "sampling.seed", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sampling=pb.SamplingOptions(repetition_penalty=0)), "sampling.repetition_penalty",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", logprobs=pb.LogprobOptions(top_logprobs=99)), "logprobs.top_logprobs",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", mode=17), "mode", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", sparsity_percent=40), "sparsity_percent", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text="a", request_id="bad id with spaces"), "request_id", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_fields_are_named(fields, field, code):
    error = error_of(**fields)
    assert error.code == code
    assert error.message.startswith(field + ":"), error.message


def test_stop_and_seed_pass_through():
    p = plan(text="a", sampling=pb.SamplingOptions(temperature=0.5, seed=7, top_k=5),
             stopping=pb.StoppingOptions(stop_sequences=["x"], stop_token_ids=[9], max_new_tokens=3))
    assert p.sampling_kwargs["stop"] == ["x"] and p.sampling_kwargs["stop_token_ids"] == [9]
    assert p.stop_token_ids == frozenset({9})
    assert (p.sampling_kwargs["temperature"], p.sampling_kwargs["seed"], p.sampling_kwargs["top_k"]) == (0.5, 7, 5)


def test_sparse_mode_needs_a_loaded_level():
    def sparse(percent, levels=(25, 40, 50)):
        return validate_generate(pb.GenerateRequest(text="a", mode=pb.INFERENCE_MODE_SPARSE, sparsity_percent=percent),
                                 WordTokenizer(), SETTINGS, max_model_len=100, vocab_size=1000, request_id="r1",
                                 sparsity_levels=levels)

    assert sparse(40).sparsity_percent == 40 and sparse(40).mode == pb.INFERENCE_MODE_SPARSE
    assert plan(text="a").sparsity_percent == 0
    for bad in (0, 33, -1, 100):
        with pytest.raises(ApiError) as info:
            sparse(bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message.startswith("sparsity_percent:") and "25, 40, 50" in info.value.message
    with pytest.raises(ApiError) as info:
        sparse(40, levels=())
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.message.startswith("mode:")
