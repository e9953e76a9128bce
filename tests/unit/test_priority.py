"""Per-request priority, without an engine: honoured only where the server schedules by priority."""

from __future__ import annotations

import grpc
import pytest
from featurelens.server.config import Settings
from featurelens.server.engine import vllm_engine_kwargs
from featurelens.server.validation import ApiError, validate_generate
from featurelens.v1 import featurelens_pb2 as pb


class OneTokenPerWord:
    def encode_text(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [1, 2, 3]


def plan(priority: int, policy: str):
    return validate_generate(pb.GenerateStreamRequest(text="hello", priority=priority), OneTokenPerWord(),
                             Settings(scheduling_policy=policy), max_model_len=100, vocab_size=1000, request_id="r")


@pytest.mark.parametrize("priority", [-7, 0, 3])
def test_a_priority_server_takes_any_priority(priority):
    assert plan(priority, "priority").priority == priority


def test_a_first_come_first_served_server_refuses_a_priority_it_would_ignore():
    assert plan(0, "fcfs").priority == 0
    with pytest.raises(ApiError) as info:
        plan(2, "fcfs")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.message.startswith("priority: ") and "--scheduling-policy priority" in info.value.message


def test_the_policy_reaches_vllm_and_defaults_to_fcfs():
    assert Settings().scheduling_policy == "fcfs"
    assert vllm_engine_kwargs(Settings(scheduling_policy="priority"), "/m")["scheduling_policy"] == "priority"
