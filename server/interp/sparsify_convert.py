"""Convert an EleutherAI `sparsify` SAE folder into our SAELens-format topk SAE.

sparsify saves one folder per hookpoint (`layers.6/`) holding `cfg.json` (`k`, `num_latents`,
`expansion_factor`, `d_in`, ...) and `sae.safetensors` with `encoder.weight[d_sae,d_in]`,
`encoder.bias[d_sae]`, `W_dec[d_sae,d_in]`, `b_dec[d_in]`. Its encode is
`topk(relu(encoder(x - b_dec)))`; SAELens topk is `relu(topk((x - b_dec) @ W_enc + b_enc))` — the same
non-zero features, so a transpose of the encoder weight is all the conversion needs.

`layers.N` in a Hugging Face decoder is the output of block N, i.e. our layer N = `blocks.N.hook_resid_post`.
The server loads a hookpoint folder as it is (`featurelens.server.interp.sae.load_sae`, format "sparsify");
`convert_sparsify` writes a SAELens copy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from featurelens.server.interp.sae import (
    SPARSIFY_WEIGHTS,
    SaeConfig,
    TopKSae,
    dtype_name,
    layer_to_hook_name,
    save_sae,
)
from safetensors.torch import load_file

_LAYER_DIR_RE = re.compile(r"^layers\.(\d+)$")


def _find_hookpoint_dir(src_dir: Path, layer: int) -> Path:
    """Accept either the run folder (containing `layers.N/`) or the hookpoint folder itself."""
    candidate = src_dir / f"layers.{layer}"
    if (candidate / "cfg.json").exists():
        return candidate
    if (src_dir / "cfg.json").exists():
        m = _LAYER_DIR_RE.match(src_dir.name)
        if src_dir.name.startswith("layers.") and m is None:
            raise ValueError(f"{src_dir.name!r} is a sub-module hookpoint, not the residual stream after a block")
        if m is not None and int(m.group(1)) != layer:
            raise ValueError(f"{src_dir} is layer {m.group(1)}, but layer {layer} was requested")
        return src_dir
    raise FileNotFoundError(f"no sparsify SAE for layer {layer} under {src_dir} (expected layers.{layer}/cfg.json)")


def sparsify_config(hook_dir: str | Path, layer: int, model_name: str | None = None) -> SaeConfig:
    """The SAELens-format config of the sparsify SAE in hookpoint folder `hook_dir` (its weights' shapes are
    read from the file header); ValueError for what a SAELens topk SAE cannot represent."""
    from safetensors import safe_open

    hook_dir = Path(hook_dir)
    raw: dict[str, Any] = json.loads((hook_dir / "cfg.json").read_text())
    for flag, why in (("signed", "signed activations"), ("transcode", "transcoders"),
                      ("skip_connection", "skip connections")):
        if raw.get(flag):
            raise ValueError(f"{hook_dir}: {why} have no SAELens topk equivalent")
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{hook_dir}: activation {raw['activation']!r} is not supported, only 'topk'")
    with safe_open(str(hook_dir / SPARSIFY_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118 - safe_open is not a dict
        if "encoder.weight" not in keys:
            raise ValueError(f"{hook_dir / SPARSIFY_WEIGHTS}: no encoder.weight")
        d_sae, d_in = f.get_slice("encoder.weight").get_shape()
        dtype = f.get_slice("encoder.weight").get_dtype()
    if raw.get("d_in", d_in) != d_in:
        raise ValueError(f"{hook_dir}: cfg d_in={raw['d_in']} but encoder.weight is {(d_sae, d_in)}")
    if "W_dec" not in keys:
        raise ValueError(f"{hook_dir}: saved without a decoder (W_dec); cannot build a full SAE")
    return SaeConfig(
        architecture="topk", d_in=int(d_in), d_sae=int(d_sae), k=int(raw["k"]),
        hook_name=layer_to_hook_name(layer), dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
            dtype, "float32"),
        apply_b_dec_to_input=True, normalize_activations="none", model_name=model_name,
        extra={"converted_from": {"format": "sparsify", "cfg": raw}},
    )


def sparsify_tensors(hook_dir: str | Path) -> dict[str, torch.Tensor]:
    """The sparsify SAE's weights under SAELens's names: its encode topk(relu(encoder(x - b_dec))) is SAELens
    topk's relu(topk((x - b_dec) @ W_enc + b_enc)) with W_enc the encoder weight transposed."""
    tensors = load_file(str(Path(hook_dir) / SPARSIFY_WEIGHTS))
    return {"W_enc": tensors["encoder.weight"].T.contiguous(), "b_enc": tensors["encoder.bias"].contiguous(),
            "W_dec": tensors["W_dec"].contiguous(), "b_dec": tensors["b_dec"].contiguous()}


def convert_sparsify(src_dir: str | Path, dst_dir: str | Path, layer: int,
                     model_name: str | None = None) -> SaeConfig:
    """Write a SAELens-format topk SAE for `layer` to `dst_dir`; returns its config. (The server also loads
    a sparsify hookpoint folder as it is: `load_sae`.)"""
    hook_dir = _find_hookpoint_dir(Path(src_dir), layer)
    cfg = sparsify_config(hook_dir, layer, model_name)
    sae = TopKSae(cfg, device="meta")
    for name, t in sparsify_tensors(hook_dir).items():
        setattr(sae, name, torch.nn.Parameter(t, requires_grad=False))
    sae.cfg.dtype = dtype_name(sae.W_enc.dtype)
    save_sae(sae, dst_dir)
    return cfg
