"""LoRA adapters without an engine: --lora parsing and checks, the request's adapter field, the engine flags."""

from __future__ import annotations

import json

import grpc
import pytest
from featurelens.server.adapters import load_adapters
from featurelens.server.config import Settings, SettingsError
from featurelens.server.engine import vllm_engine_kwargs
from featurelens.server.validation import ApiError, validate_generate
from featurelens.v1 import featurelens_pb2 as pb


def adapter_dir(tmp_path, name: str, rank: int = 8, **config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                            "target_modules": ["q_proj", "v_proj"], **config}))
    return folder


def test_adapters_get_ids_ranks_and_targets_in_order(tmp_path):
    a, b = adapter_dir(tmp_path, "a", 8), adapter_dir(tmp_path, "b", 4, target_modules="all-linear")
    adapters = load_adapters([f"support={a}", f"legal.v2={b}"], max_rank=16)
    assert list(adapters) == ["support", "legal.v2"]
    assert [(x.lora_id, x.rank, x.target_modules) for x in adapters.values()] == [
        (1, 8, ("q_proj", "v_proj")), (2, 4, ("all-linear",))]
    request = adapters["legal.v2"].request()
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("legal.v2", 2, str(b.resolve()))


@pytest.mark.parametrize("spec, words", [
    ("noequals", "is not NAME=PATH"),
    ("bad name=/x", "adapter name"),
    ("a=/does/not/exist", "cannot read"),
])
def test_bad_lora_specs_fail_start_up_with_the_reason(spec, words):
    with pytest.raises(SettingsError, match=words):
        load_adapters([spec], max_rank=16)


def test_rank_over_the_engines_limit_and_duplicates_fail(tmp_path):
    big = adapter_dir(tmp_path, "big", rank=32)
    with pytest.raises(SettingsError, match="rank 32 is outside 1..16"):
        load_adapters([f"big={big}"], max_rank=16)
    ok = adapter_dir(tmp_path, "ok")
    with pytest.raises(SettingsError, match="given twice"):
        load_adapters([f"x={ok}", f"x={ok}"], max_rank=16)
    ia3 = adapter_dir(tmp_path, "ia3", peft_type="IA3")
    with pytest.raises(SettingsError, match="is not LORA"):
        load_adapters([f"x={ia3}"], max_rank=16)


def test_lora_switches_the_engine_on_only_when_adapters_are_given():
    assert "enable_lora" not in vllm_engine_kwargs(Settings(), "/m")
    kwargs = vllm_engine_kwargs(Settings(lora=["a=/x"], max_lora_rank=8, max_loras=2), "/m")
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 8, 2)
    with pytest.raises(ValueError, match="max_lora_rank"):
        Settings(max_lora_rank=12)


class Words:
    def encode_text(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [1, 2, 3]


def plan(adapters=(), **fields):
    return validate_generate(pb.GenerateRequest(text="hello", **fields), Words(), Settings(), max_model_len=100,
                             vocab_size=1000, request_id="r", sparsity_levels=(40,), quantized_available=True,
                             adapters=adapters)


def test_the_request_names_a_loaded_adapter_or_none():
    assert plan(("a", "b"), adapter="b").adapter == "b"
    assert plan(("a",)).adapter == ""


@pytest.mark.parametrize("adapters, fields, code, start", [
    (("a",), dict(adapter="zz"), grpc.StatusCode.INVALID_ARGUMENT, "adapter: unknown adapter 'zz'; loaded: a"),
    ((), dict(adapter="a"), grpc.StatusCode.FAILED_PRECONDITION, "adapter: this server loads no LoRA adapters"),
    (("a",), dict(adapter="a", mode=pb.INFERENCE_MODE_SPARSE, sparsity_percent=40),
     grpc.StatusCode.FAILED_PRECONDITION, "adapter: LoRA adapters run in INFERENCE_MODE_DENSE only"),
    (("a",), dict(adapter="a", mode=pb.INFERENCE_MODE_QUANTIZED), grpc.StatusCode.FAILED_PRECONDITION,
     "adapter: LoRA adapters run in INFERENCE_MODE_DENSE only"),
])
def test_adapter_refusals(adapters, fields, code, start):
    with pytest.raises(ApiError) as info:
        plan(adapters, **fields)
    assert info.value.code == code and info.value.message.startswith(start), info.value.message
