"""The KV cache element type (--kv-cache-dtype): settings, the start-up check, and a real server whose KV cache
is fp8 answering in every inference mode, reporting its dtype and capacity in GetModelInfo and the metrics."""

from __future__ import annotations

import pytest
import torch
from featurelens.server import engine as engine_module
from featurelens.server.config import Settings, SettingsError
from pydantic import ValidationError

# SmolLM2-135M: K and V for 30 layers of 3 KV heads x 64 dims per token.
KV_VALUES_PER_TOKEN = 2 * 30 * 3 * 64
BLOCK_TOKENS = 128  # vLLM's CPU block size
FP8_ON_THIS_CPU = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


def test_kv_cache_dtype_setting_is_checked():
    assert Settings().kv_cache_dtype == "auto"
    assert Settings(kv_cache_dtype="fp8_e5m2").kv_cache_dtype == "fp8_e5m2"
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        Settings(kv_cache_dtype="int4")


def test_fp8_refused_on_a_cpu_without_avx512(monkeypatch):
    """vLLM's CPU attention has fp8 KV only with AVX-512 or AMX: say so before building the engine."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    engine_module.check_kv_cache_dtype("auto")  # the default never needs it
    with pytest.raises(SettingsError, match=r"kv_cache_dtype: fp8 needs a GPU or a CPU with AVX-512 or AMX"):
        engine_module.check_kv_cache_dtype("fp8")
