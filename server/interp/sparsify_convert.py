"""Convert an EleutherAI `sparsify` SAE folder into our SAELens-format topk SAE.

sparsify saves one folder per hookpoint (`layers.6/`) holding `cfg.json` (`k`, `num_latents`,
`expansion_factor`, `d_in`, ...) and `sae.safetensors` with `encoder.weight[d_sae,d_in]`,
`encoder.bias[d_sae]`, `W_dec[d_sae,d_in]`, `b_dec[d_in]`. Its encode is
`topk(relu(encoder(x - b_dec)))`; SAELens topk is `relu(topk((x - b_dec) @ W_enc + b_enc))` — the same
non-zero features, so a transpose of the encoder weight is all the conversion needs.

`layers.N` in a Hugging Face decoder is the output of block N, i.e. our layer N = `blocks.N.hook_resid_post`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from featurelens.server.interp.sae import (
    SaeConfig,
    TopKSae,
    dtype_name,
    layer_to_hook_name,
    save_sae,
)
from safetensors.torch import load_file

SPARSIFY_WEIGHTS = "sae.safetensors"
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


def convert_sparsify(src_dir: str | Path, dst_dir: str | Path, layer: int,
                     model_name: str | None = None) -> SaeConfig:
    """Write a SAELens-format topk SAE for `layer` to `dst_dir`; returns its config."""
    hook_dir = _find_hookpoint_dir(Path(src_dir), layer)
    raw: dict[str, Any] = json.loads((hook_dir / "cfg.json").read_text())
    for flag, why in (("signed", "signed activations"), ("transcode", "transcoders"),
                      ("skip_connection", "skip connections")):
        if raw.get(flag):
            raise ValueError(f"{hook_dir}: {why} have no SAELens topk equivalent")
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{hook_dir}: activation {raw['activation']!r} is not supported, only 'topk'")

    tensors = load_file(str(hook_dir / SPARSIFY_WEIGHTS))
    W = tensors["encoder.weight"]  # [d_sae, d_in], nn.Linear layout
    d_sae, d_in = W.shape
    if raw.get("d_in", d_in) != d_in:
        raise ValueError(f"{hook_dir}: cfg d_in={raw['d_in']} but encoder.weight is {tuple(W.shape)}")
    if "W_dec" not in tensors:
        raise ValueError(f"{hook_dir}: saved without a decoder (W_dec); cannot build a full SAE")

    cfg = SaeConfig(
        architecture="topk", d_in=d_in, d_sae=d_sae, k=int(raw["k"]),
        hook_name=layer_to_hook_name(layer), dtype=dtype_name(W.dtype),
        apply_b_dec_to_input=True, normalize_activations="none", model_name=model_name,
        extra={"converted_from": {"format": "sparsify", "cfg": raw}},
    )
    sae = TopKSae(cfg, device="meta")
    weights = {"W_enc": W.T.contiguous(), "b_enc": tensors["encoder.bias"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    for name, t in weights.items():
        setattr(sae, name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
    save_sae(sae, dst_dir)
    return cfg
