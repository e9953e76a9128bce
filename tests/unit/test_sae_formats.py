"""Published SAE layouts load unchanged (server/interp/sae.py detect_format / load_sae, server/interp/registry.py):
SAELens with Hugging Face module hook names, sparsify hookpoint folders, Gemma Scope's params.npz and Llama
Scope's hyperparams.json + checkpoints; each encodes as its own reference, and a mismatch with the served
model is a clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from featurelens.server.interp.registry import build_registry, parse_sae_arg
from featurelens.server.interp.sae import (
    JumpReluSae,
    SaeConfig,
    TopKSae,
    detect_format,
    load_sae,
    save_sae,
    validate_for_model,
)
from safetensors.torch import save_file

D, S = 16, 48
X = torch.randn(7, D, generator=torch.Generator().manual_seed(9)) * 2


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_gemma_scope(root: Path, layer: int) -> tuple[Path, dict[str, np.ndarray]]:
    folder = root / f"layer_{layer}" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    params = {"W_enc": _rand(D, S, seed=1).numpy(), "W_dec": _rand(S, D, seed=2).numpy(),
              "b_enc": (_rand(S, seed=3) * 0.1).numpy(), "b_dec": _rand(D, seed=4).numpy(),
              "threshold": (torch.rand(S, generator=torch.Generator().manual_seed(5)) * 2).numpy()}
    np.savez(folder / "params.npz", **params)
    (folder / "hparams.json").write_text(json.dumps({"l0": 5}))
    return folder, params


def test_gemma_scope_params_npz_is_a_jumprelu_sae_without_b_dec_on_the_input(tmp_path):
    folder, p = write_gemma_scope(tmp_path, layer=3)
    assert detect_format(folder) == "gemma_scope"
    sae = load_sae(folder)
    assert isinstance(sae, JumpReluSae) and sae.layer == 3 and not sae.cfg.apply_b_dec_to_input
    pre = X @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])  # Gemma Scope: no b_dec subtracted
    want = torch.relu(pre) * (pre > torch.from_numpy(p["threshold"]))
    torch.testing.assert_close(sae.encode(X), want)
    entry = parse_sae_arg(str(folder))  # the layer from the layer_N folder, no cfg.json needed
    assert (entry.layer, entry.cfg.d_in, entry.d_sae, entry.cfg.architecture) == (3, D, S, "jumprelu")
    assert parse_sae_arg(f"3={folder}").version == entry.version
    with pytest.raises(ValueError, match="layer 3, not 4"):
        parse_sae_arg(f"4={folder}")
    # Renamed away from layer_N: the layer comes from LAYER=PATH.
    moved = tmp_path / "mine"
    folder.rename(moved)
    with pytest.raises(ValueError, match="layer_N folder or LAYER=PATH"):
        parse_sae_arg(str(moved))
    assert parse_sae_arg(f"5={moved}").layer == 5 and load_sae(moved, layer=5).layer == 5


def write_llama_scope(folder: Path, act_fn: str = "jumprelu") -> dict[str, torch.Tensor]:
    (folder / "checkpoints").mkdir(parents=True)
    tensors = {"encoder.weight": _rand(S, D, seed=11), "encoder.bias": _rand(S, seed=12) * 0.1,
               "decoder.weight": _rand(D, S, seed=13), "decoder.bias": _rand(D, seed=14)}
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": S, "expansion_factor": S // D, "hook_point_in": "blocks.2.hook_resid_post",
        "hook_point_out": "blocks.2.hook_resid_post", "act_fn": act_fn, "top_k": 6, "jump_relu_threshold": 0.7,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 9.5, "out": 9.5},
        "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True}))
    return tensors


@pytest.mark.parametrize("act_fn", ["jumprelu", "topk"])
def test_llama_scope_folder(tmp_path, act_fn):
    t = write_llama_scope(tmp_path / "L2R", act_fn)
    sae = load_sae(tmp_path / "L2R")
    assert detect_format(tmp_path / "L2R") == "llama_scope" and sae.layer == 2
    x = X * math.sqrt(D) / 9.5  # dataset-wise normalisation of the input
    pre = x @ t["encoder.weight"].T + t["encoder.bias"]
    if act_fn == "jumprelu":
        assert isinstance(sae, JumpReluSae)
        want = torch.relu(pre) * (pre > 0.7)
    else:
        assert isinstance(sae, TopKSae) and sae.cfg.k == 6
        top = torch.topk(pre, 6, dim=-1)
        want = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(sae.encode(X), want)
    decoded = sae.decode(sae.encode(X))  # back in the model's scale
    torch.testing.assert_close(decoded, (want @ t["decoder.weight"].T + t["decoder.bias"]) * 9.5 / math.sqrt(D))


def test_llama_scope_transcoders_are_refused(tmp_path):
    write_llama_scope(tmp_path / "tc")
    raw = json.loads((tmp_path / "tc" / "hyperparams.json").read_text())
    raw["hook_point_out"] = "blocks.2.hook_mlp_out"
    (tmp_path / "tc" / "hyperparams.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="transcoder"):
        parse_sae_arg(str(tmp_path / "tc"))


def write_sparsify(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    tensors = {"encoder.weight": _rand(S, D, seed=21), "encoder.bias": _rand(S, seed=22) * 0.1,
               "W_dec": _rand(S, D, seed=23), "b_dec": _rand(D, seed=24)}
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": 5, "expansion_factor": 3, "num_latents": 0, "d_in": D}))
    return tensors


def test_sparsify_hookpoint_folder_loads_as_it_is(tmp_path):
    t = write_sparsify(tmp_path / "run" / "layers.4")
    folder = tmp_path / "run" / "layers.4"
    assert detect_format(folder) == "sparsify"
    sae = load_sae(folder)
    assert isinstance(sae, TopKSae) and sae.layer == 4
    acts = torch.relu(torch.nn.functional.linear(X - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    want = torch.topk(acts, 5, dim=-1)
    torch.testing.assert_close(sae.encode(X), torch.zeros(7, S).scatter(-1, want.indices, want.values))
    assert parse_sae_arg(str(folder)).layer == 4
    with pytest.raises(ValueError, match="layer 4, but layer 6 was requested"):
        parse_sae_arg(f"6={folder}")
    sub = tmp_path / "run" / "layers.4.mlp"
    write_sparsify(sub)
    with pytest.raises(ValueError, match="sub-module hookpoint"):
        parse_sae_arg(str(sub))


def test_saelens_cfg_with_a_module_hook_name(tmp_path):
    cfg = SaeConfig(architecture="standard", d_in=D, d_sae=S, hook_name="model.layers.5")
    sae = load_sae_like(cfg, tmp_path / "hf")
    assert sae.layer == 5 and parse_sae_arg(str(tmp_path / "hf")).layer == 5


def load_sae_like(cfg: SaeConfig, path: Path):
    from featurelens.server.interp.sae import SAE_CLASSES

    sae = SAE_CLASSES[cfg.architecture](cfg)
    for p in sae.parameters():
        p.data = torch.randn(p.shape)
    save_sae(sae, path)
    return load_sae(path)


def test_mismatches_with_the_served_model_are_clear(tmp_path):
    folder, _ = write_gemma_scope(tmp_path, layer=3)
    with pytest.raises(ValueError, match=r"d_in 16 does not match the model hidden size 2304"):
        build_registry([str(folder)], hidden_size=2304, num_layers=26)
    with pytest.raises(ValueError, match=r"layer 3 outside the model's 0..1"):
        build_registry([str(folder)], hidden_size=D, num_layers=2)
    with pytest.raises(ValueError, match="an SAE of another model or of another activation"):
        validate_for_model(load_sae(folder), hidden_size=64, num_layers=26)
    assert build_registry([str(folder)], hidden_size=D, num_layers=26)[3].cfg.d_in == D
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an SAE folder featurelens reads.*Gemma Scope.*Llama Scope"):
        parse_sae_arg(str(tmp_path / "empty"))
