"""The engine settings vLLM gets: --dtype auto's choice per CPU, and one dict for our engine and every
benchmark's plain-vLLM baseline (the real Settings, torch's own CPU capability probes)."""

from __future__ import annotations

import json

import pytest
import torch
from featurelens.server.bench.generate import baseline_kwargs, engine_settings
from featurelens.server.config import Settings
from featurelens.server.engine import resolve_dtype, vllm_engine_kwargs


def test_an_explicit_dtype_is_kept():
    assert resolve_dtype("float16", on_cpu=True) == ("float16", "set by --dtype")
    assert resolve_dtype("bfloat16", on_cpu=False)[0] == "bfloat16"


def test_auto_on_gpu_is_vllms_rule():
    assert resolve_dtype("auto", on_cpu=False)[0] == "auto"


@pytest.mark.parametrize("bf16, amx, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                  (False, False, "float32")])
def test_auto_on_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch, bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    dtype, why = resolve_dtype("auto", on_cpu=True)
    assert dtype == expected and why


def test_auto_is_the_default():
    assert Settings().dtype == "auto"


def test_this_cpu_gets_what_its_flags_say():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_dtype("auto", on_cpu=True)[0] == ("bfloat16" if native else "float32")


def test_benchmark_baseline_gets_exactly_our_engine_settings(monkeypatch):
    """The bug this guards: FEATURELENS_DTYPE=float32 set our server to float32 while the baseline stayed
    bf16. Both sides now come from one Settings, environment included."""
    monkeypatch.setenv("FEATURELENS_ENFORCE_EAGER", "false")
    monkeypatch.setenv("FEATURELENS_KV_CACHE_DTYPE", "fp8")
    monkeypatch.setenv("FEATURELENS_MAX_MODEL_LEN", "1024")
    settings = engine_settings("default", "float32", 32)
    ours = vllm_engine_kwargs(settings, "/models/m")
    baseline = baseline_kwargs(settings, "/models/m")
    assert {k: baseline[k] for k in ours} == ours
    assert set(baseline) - set(ours) == {"disable_log_stats"}  # logging only: nothing that changes the engine
    assert (ours["dtype"], ours["enforce_eager"], ours["kv_cache_dtype"], ours["max_model_len"],
            ours["max_num_seqs"]) == ("float32", False, "fp8", 1024, 32)


def test_the_default_context_fits_a_shorter_model(tmp_path):
    """The 2048-token default is lowered to a GPT-2 checkpoint's 1024 positions instead of failing at
    start-up; an explicit --max-model-len is passed through (vLLM then names the problem)."""
    from featurelens.server.config import Settings

    short, long_, unreadable = tmp_path / "gpt2", tmp_path / "llama", tmp_path / "hub"
    for folder, config in ((short, {"n_positions": 1024}), (long_, {"max_position_embeddings": 8192})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    assert vllm_engine_kwargs(Settings(), str(short))["max_model_len"] == 1024
    assert vllm_engine_kwargs(Settings(), str(long_))["max_model_len"] == 2048
    assert vllm_engine_kwargs(Settings(), str(unreadable))["max_model_len"] == 2048
    assert vllm_engine_kwargs(Settings(max_model_len=4096), str(short))["max_model_len"] == 4096
