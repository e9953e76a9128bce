"""Sparse autoencoders in the SAELens on-disk format: config, one class per architecture, load/save.

A folder holds `cfg.json` + `sae_weights.safetensors` (`W_enc[d_in,d_sae]`, `b_enc[d_sae]`,
`W_dec[d_sae,d_in]`, `b_dec[d_in]`, and `threshold[d_sae]` for jumprelu), so SAEs published for SAELens load
unchanged. The encode math copies SAELens op for op (cast -> normalise -> subtract b_dec -> `@ W_enc + b_enc`
-> activation) because features are only meaningful if we compute exactly what the SAE was trained with.

Other published layouts load unchanged too (`detect_format`), read into the same classes:
- "sparsify" (EleutherAI): a hookpoint folder `layers.N/` with `cfg.json` + `sae.safetensors`, a TopK SAE
  (server/interp/sparsify_convert.py);
- "gemma_scope" (Google's original release): `layer_N/width_16k/average_l0_82/params.npz` (W_enc, W_dec,
  b_enc, b_dec, threshold), JumpReLU with no b_dec subtracted before encoding, as SAELens's gemma_2 loader;
- "llama_scope" (OpenMOSS): `hyperparams.json` + `checkpoints/final.safetensors` (encoder/decoder as
  nn.Linear), TopK (`act_fn: topk`) or JumpReLU with one threshold for every latent, inputs scaled by
  sqrt(d_model) / the dataset's average norm (`norm_activation: dataset-wise`), as SAELens's llama_scope loader.

Layers: "layer N" everywhere in featurelens is the residual stream *after* decoder block N, which SAELens
calls `blocks.N.hook_resid_post` (and `blocks.N+1.hook_resid_pre`) and Hugging Face module paths call the
output of `layers.N` (`model.layers.N`, GPT-2's `transformer.h.N`, GPT-NeoX's `gpt_neox.layers.N`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from featurelens.kernels.sae_encode import Architecture, Gemm, topk_encode
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

ARCHITECTURE_ALIASES = {"relu": "standard"}
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported SAE dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------
# Hook names <-> layer numbers

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
# A decoder block's output named by its module path in a Hugging Face model (sparsify's hookpoints, SAELens
# cfgs of SAEs trained on HF models): layers.N, model.layers.N, model.language_model.layers.N,
# language_model.model.layers.N, transformer.h.N (GPT-2), gpt_neox.layers.N.
_MODULE_RE = re.compile(r"^(?:model\.(?:language_model\.)?|language_model\.model\.|transformer\.|gpt_neox\.)?"
                        r"(?:layers|h)\.(\d+)$")


def hook_name_to_layer(hook_name: str) -> int:
    """`blocks.N.hook_resid_post` -> N; `blocks.N.hook_resid_pre` -> N-1 (both: output of that block); a
    block's module path (`layers.N`, `model.layers.N`, `transformer.h.N`, ...) -> N (its output)."""
    module = _MODULE_RE.match(hook_name)
    if module is not None:
        return int(module.group(1))
    m = _HOOK_RE.match(hook_name)
    if m is None:
        raise ValueError(
            f"unsupported SAE hook {hook_name!r}: only residual-stream hooks "
            "'blocks.N.hook_resid_post' or 'blocks.N.hook_resid_pre', or a decoder block's output "
            "'layers.N' / 'model.layers.N' / 'transformer.h.N' can be served"
        )
    block, where = int(m.group(1)), m.group(2)
    if where == "post":
        return block
    if block == 0:
        raise ValueError(f"{hook_name!r} is the embedding output, not a decoder block's; it cannot be hooked")
    return block - 1


def layer_to_hook_name(layer: int) -> str:
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return f"blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class SaeConfig:
    """Typed view of SAELens `cfg.json`. Unknown keys live in `extra` and are written back unchanged.

    SAELens >= 6 nests `hook_name`/`model_name` under `metadata`; older files keep them at top level.
    We read both and write them back where we found them, so a third-party cfg survives a round trip.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None = None
    k: int | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    # Only for "expected_average_only_in": inputs are multiplied by this before encoding. SAELens keeps it
    # outside cfg.json (in its pretrained directory), so we store it under our own key.
    norm_scaling_factor: float | None = None
    model_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN: ClassVar[tuple[str, ...]] = (
        "architecture", "d_in", "d_sae", "hook_name", "k", "dtype", "apply_b_dec_to_input",
        "normalize_activations", "norm_scaling_factor", "model_name",
    )

    def __post_init__(self) -> None:
        self.architecture = ARCHITECTURE_ALIASES.get(self.architecture, self.architecture)
        if self.architecture not in SAE_CLASSES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; known: {sorted(SAE_CLASSES)}")
        if self.architecture == "topk" and (self.k is None or self.k < 1):
            raise ValueError("a topk SAE needs k >= 1 in cfg.json")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, "
                             f"got {self.normalize_activations!r}")
        parse_dtype(self.dtype)

    @property
    def layer(self) -> int:
        if self.hook_name is None:
            raise ValueError("SAE cfg has no hook_name, so its layer is unknown")
        return hook_name_to_layer(self.hook_name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SaeConfig:
        d = dict(raw)
        raw_meta = d.get("metadata")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        if "hook_point" in d and "hook_name" not in d:  # pre-3.0 SAELens name
            d["hook_name"] = d.pop("hook_point")
        for key in ("hook_name", "model_name"):
            if key not in d and key in meta:
                d[key] = meta[key]
        if isinstance(d.get("normalize_activations"), bool):  # pre-3.0: a bool meant the April-update scaling
            d["normalize_activations"] = "expected_average_only_in" if d["normalize_activations"] else "none"
        d.setdefault("architecture", "standard")
        # SAELens < 6 encoded topk SAEs as architecture "standard" + activation_fn "topk".
        act = d.get("activation_fn", d.get("activation_fn_str"))
        if ARCHITECTURE_ALIASES.get(d["architecture"], d["architecture"]) == "standard" and act == "topk":
            d["architecture"] = "topk"
            d.setdefault("k", (d.get("activation_fn_kwargs") or {}).get("k"))
        if d.get("finetuning_scaling_factor"):
            raise ValueError("SAEs with finetuning_scaling_factor are not supported")
        known = {k: d.pop(k) for k in cls._KNOWN if k in d}
        return cls(**known, extra=d)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        meta = out.get("metadata")
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("hook_name", "model_name") and isinstance(meta, dict) and f.name in meta:
                out["metadata"] = meta = {**meta, f.name: value}
            elif value is not None or f.name in ("hook_name", "model_name"):
                out[f.name] = value
        return out


# ---------------------------------------------------------------------------------------------------------
# Models


class Sae(torch.nn.Module):
    """Base SAE: standard ReLU encoder. Subclasses override `_activate` and register themselves."""

    architecture: ClassVar[Architecture] = "standard"

    def __init__(self, cfg: SaeConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        dtype = parse_dtype(cfg.dtype)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W_enc = torch.nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw), requires_grad=False)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae, **kw), requires_grad=False)
        self.W_dec = torch.nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw), requires_grad=False)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in, **kw), requires_grad=False)
        # Tensors in a third-party file that we do not use; kept so save_sae writes them back.
        self.extra_tensors: dict[str, torch.Tensor] = {}
        self.gemm: Gemm | None = None  # a faster `x @ W_enc` for encode_topk (set by `use_fast_gemm`)

    def use_fast_gemm(self, compute_dtype: str | torch.dtype | None = None) -> bool:
        """Serve `encode_topk` with oneDNN's matmul where available (see kernels.sae_encode.onednn_gemm),
        optionally in bf16; it then equals the reference up to the matmul's rounding. Call after the weights
        are final."""
        from featurelens.kernels.sae_encode import onednn_gemm

        self.gemm = onednn_gemm(self.W_enc.data, parse_dtype(compute_dtype) if compute_dtype else None)
        return self.gemm is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def layer(self) -> int:
        return self.cfg.layer

    @property
    def max_k(self) -> int:
        """Largest k `encode_topk` can return without inventing features the SAE would not fire."""
        return self.cfg.d_sae

    # -- input normalisation (SAELens `run_time_activation_norm_fn_in/out`) --

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Return the normalised input and what `_denormalize` needs to undo it for the same rows."""
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            s = self.cfg.norm_scaling_factor
            return (x, None) if s is None else (x * s, s)
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, coeff
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), (mu, std)
        return x, None

    def _denormalize(self, y: torch.Tensor, state: Any) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if state is None:
            return y
        if mode == "layer_norm":
            mu, std = state
            return y * std + mu
        return y / state

    def process_sae_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Cast and normalise; b_dec is subtracted later, inside the encode op."""
        return self._normalize(x.to(self.dtype))

    def _b_dec_in(self) -> torch.Tensor | None:
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    # -- encode / decode --

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def _encode_normalized(self, sae_in: torch.Tensor) -> torch.Tensor:
        b_dec_in = self._b_dec_in()
        if b_dec_in is not None:
            sae_in = sae_in - b_dec_in
        return self._activate(sae_in @ self.W_enc + self.b_enc)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [..., d_sae], exactly as SAELens `SAE.encode`."""
        sae_in, _ = self.process_sae_in(x)
        return self._encode_normalized(sae_in)

    @torch.no_grad()
    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k strongest features per row: (values [..., k] sorted descending, indices [..., k] int64).

        Equals `torch.topk(self.encode(x), k)` on every non-zero value. A zero value means fewer than k
        features fired and its index is meaningless. `k` defaults to cfg.k (topk SAEs) or 32.
        """
        k = k if k is not None else (self.cfg.k or 32)
        if k > self.max_k:
            raise ValueError(f"k={k} exceeds what this {self.architecture} SAE can fire (max {self.max_k})")
        sae_in, _ = self.process_sae_in(x)
        lead = sae_in.shape[:-1]
        values, indices = topk_encode(
            sae_in.reshape(-1, self.cfg.d_in), self.W_enc, self.b_enc, self._b_dec_in(), k,
            threshold=getattr(self, "threshold", None), architecture=self.architecture,
            gemm=self.gemm,
        )
        return values.reshape(*lead, k), indices.reshape(*lead, k)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, norm_state: Any = None) -> torch.Tensor:
        """Reconstruction in the model's activation space. For per-row normalisations (constant_norm_rescale,
        layer_norm) pass the `norm_state` from `process_sae_in`, or use `forward`."""
        if norm_state is None and self.cfg.normalize_activations == "expected_average_only_in":
            norm_state = self.cfg.norm_scaling_factor
        return self._denormalize(codes @ self.W_dec + self.b_dec, norm_state)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sae_in, state = self.process_sae_in(x)
        return self.decode(self._encode_normalized(sae_in), state)


class TopKSae(Sae):
    architecture = "topk"

    @property
    def max_k(self) -> int:
        return self._k

    @property
    def _k(self) -> int:
        assert self.cfg.k is not None  # SaeConfig refuses a topk SAE without k
        return int(self.cfg.k)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        # SAELens TopK: pick the k largest pre-activations, relu only those, zero the rest.
        top = torch.topk(pre, k=self._k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))


class JumpReluSae(Sae):
    architecture = "jumprelu"

    def __init__(self, cfg: SaeConfig, device: str | torch.device = "cpu") -> None:
        super().__init__(cfg, device)
        self.threshold = torch.nn.Parameter(
            torch.zeros(cfg.d_sae, dtype=self.dtype, device=device), requires_grad=False
        )

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        return acts * (pre > self.threshold).to(acts.dtype)


SAE_CLASSES: dict[str, type[Sae]] = {cls.architecture: cls for cls in (Sae, TopKSae, JumpReluSae)}


# ---------------------------------------------------------------------------------------------------------
# Disk I/O


SAE_FORMATS = ("saelens", "sparsify", "gemma_scope", "llama_scope")
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
LLAMA_SCOPE_HYPERPARAMS = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = ("checkpoints/final.safetensors", "final.safetensors")
_GEMMA_SCOPE_LAYER_RE = re.compile(r"^layer_(\d+)$")


def detect_format(path: str | Path) -> str:
    """Which published layout the SAE folder `path` is in (SAE_FORMATS); ValueError naming what was expected."""
    path = Path(path)
    if (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).is_file():
        return "saelens"
    if (path / CFG_FILENAME).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (path / GEMMA_SCOPE_PARAMS).is_file():
        return "gemma_scope"
    if (path / LLAMA_SCOPE_HYPERPARAMS).is_file() and any((path / w).is_file() for w in LLAMA_SCOPE_WEIGHTS):
        return "llama_scope"
    raise ValueError(
        f"{path} is not an SAE folder featurelens reads: expected SAELens ({CFG_FILENAME} + {WEIGHTS_FILENAME}), "
        f"sparsify ({CFG_FILENAME} + {SPARSIFY_WEIGHTS}), Gemma Scope ({GEMMA_SCOPE_PARAMS}) or Llama Scope "
        f"({LLAMA_SCOPE_HYPERPARAMS} + {LLAMA_SCOPE_WEIGHTS[0]})")


def sae_files(path: str | Path) -> list[Path]:
    """The files that define the SAE in `path` (what a content hash of it covers)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "saelens":
        return [path / CFG_FILENAME, path / WEIGHTS_FILENAME]
    if fmt == "sparsify":
        return [path / CFG_FILENAME, path / SPARSIFY_WEIGHTS]
    if fmt == "gemma_scope":
        return [path / GEMMA_SCOPE_PARAMS]
    return [path / LLAMA_SCOPE_HYPERPARAMS, next(path / w for w in LLAMA_SCOPE_WEIGHTS if (path / w).is_file())]


def _layer_from_path(path: Path, fmt: str) -> int | None:
    """The layer a folder's name gives: sparsify's hookpoint folder (`layers.N`), Gemma Scope's `layer_N`
    anywhere above the params file."""
    if fmt == "sparsify":
        module = _MODULE_RE.match(path.name)
        if module is None and "." in path.name and path.name.split(".")[0] in ("layers", "h"):
            raise ValueError(f"{path.name!r} is a sub-module hookpoint, not the residual stream after a block")
        return int(module.group(1)) if module else None
    if fmt == "gemma_scope":
        for part in (path, *path.parents):
            m = _GEMMA_SCOPE_LAYER_RE.match(part.name)
            if m is not None:
                return int(m.group(1))
    return None


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array name -> shape of an .npz, from each member's header (a published file is gigabytes)."""
    import zipfile

    import numpy as np

    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as f:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)(f)
            shapes[name.removesuffix(".npy")] = tuple(header[0])
    return shapes


def _gemma_scope_key(name: str) -> str:
    return "W_" + name[2:] if name.startswith("w_") else name


def read_sae_config(path: str | Path, layer: int | None = None) -> SaeConfig:
    """The SaeConfig of an SAE folder in any of SAE_FORMATS, without reading its weights. Formats without a
    hook name in their files take the layer from the folder's name or from `layer` (`--sae LAYER=PATH`)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "saelens":
        return SaeConfig.from_dict(json.loads((path / CFG_FILENAME).read_text()))
    if fmt == "sparsify":
        from featurelens.server.interp.sparsify_convert import sparsify_config

        named = _layer_from_path(path, fmt)
        if named is not None and layer is not None and named != layer:
            raise ValueError(f"{path} is layer {named}, but layer {layer} was requested")
        at = named if named is not None else layer
        if at is None:
            raise ValueError(f"{path}: a sparsify SAE's layer comes from its folder name (layers.N) or LAYER=PATH")
        return sparsify_config(path, at)
    if fmt == "gemma_scope":
        at = _layer_from_path(path, fmt)
        at = layer if at is None else at
        if at is None:
            raise ValueError(f"{path}: a Gemma Scope SAE's layer comes from a layer_N folder or LAYER=PATH")
        shapes = {_gemma_scope_key(k): v for k, v in _npz_shapes(path / GEMMA_SCOPE_PARAMS).items()}
        missing = sorted({"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(shapes))
        if missing:
            raise ValueError(f"{path / GEMMA_SCOPE_PARAMS} lacks {missing}")
        d_in, d_sae = shapes["W_enc"]
        return SaeConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), hook_name=layer_to_hook_name(at),
                         dtype="float32", apply_b_dec_to_input=False, normalize_activations="none",
                         extra={"converted_from": {"format": "gemma_scope"}})
    raw: dict[str, Any] = json.loads((path / LLAMA_SCOPE_HYPERPARAMS).read_text())
    hook = str(raw.get("hook_point_in", ""))
    if raw.get("hook_point_out", hook) != hook:
        raise ValueError(f"{path}: hook_point_out {raw['hook_point_out']!r} differs from hook_point_in {hook!r}: "
                         "a transcoder, not an SAE of one activation")
    act = str(raw.get("act_fn", "jumprelu")).lower()
    if act not in ("jumprelu", "topk", "relu"):
        raise ValueError(f"{path}: act_fn {act!r} is not supported (jumprelu, topk or relu)")
    d_in = int(raw["d_model"])
    norm = raw.get("dataset_average_activation_norm") or {}
    scale = None
    if raw.get("norm_activation") == "dataset-wise":
        if not norm.get("in"):
            raise ValueError(f"{path}: norm_activation dataset-wise without dataset_average_activation_norm.in")
        scale = math.sqrt(d_in) / float(norm["in"])
    elif raw.get("norm_activation", "none") not in ("none", None):
        raise ValueError(f"{path}: norm_activation {raw['norm_activation']!r} is not supported (dataset-wise)")
    return SaeConfig(architecture={"jumprelu": "jumprelu", "topk": "topk", "relu": "standard"}[act], d_in=d_in,
                     d_sae=int(raw["d_sae"]), k=int(raw["top_k"]) if act == "topk" else None,
                     hook_name=layer_to_hook_name(layer) if not hook and layer is not None else hook or None,
                     dtype="float32", apply_b_dec_to_input=bool(raw.get("apply_decoder_bias_to_pre_encoder", False)),
                     normalize_activations="expected_average_only_in" if scale else "none", norm_scaling_factor=scale,
                     extra={"converted_from": {"format": "llama_scope", "hyperparams": raw}})


def _read_tensors(path: Path, fmt: str, cfg: SaeConfig, device: str) -> dict[str, torch.Tensor]:
    """The SAELens-named tensors of a non-SAELens folder (already in SAELens's layout and orientation)."""
    if fmt == "sparsify":
        from featurelens.server.interp.sparsify_convert import sparsify_tensors

        return {k: v.to(device) for k, v in sparsify_tensors(path).items()}
    if fmt == "gemma_scope":
        import numpy as np

        with np.load(path / GEMMA_SCOPE_PARAMS) as data:
            return {_gemma_scope_key(k): torch.from_numpy(np.ascontiguousarray(data[k])).to(device) for k in data.files
                    if _gemma_scope_key(k) in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    weights = next(path / w for w in LLAMA_SCOPE_WEIGHTS if (path / w).is_file())
    raw = load_file(str(weights), device=device)
    tensors = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"],
               "W_dec": raw["decoder.weight"].T.contiguous(), "b_dec": raw["decoder.bias"]}
    if cfg.architecture == "jumprelu":
        if "log_jumprelu_threshold" in raw:
            tensors["threshold"] = raw["log_jumprelu_threshold"].exp()
        else:
            value = float(cfg.extra["converted_from"]["hyperparams"]["jump_relu_threshold"])
            tensors["threshold"] = torch.full((cfg.d_sae,), value, dtype=tensors["b_enc"].dtype, device=device)
    return tensors


def load_sae(path: str | Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype | None = None, layer: int | None = None) -> Sae:
    """Load an SAE folder in any of SAE_FORMATS. `dtype` casts the weights (and cfg.dtype) after loading;
    `layer` names the layer of a format whose files do not (see `read_sae_config`)."""
    path = Path(path)
    fmt = detect_format(path)
    cfg = read_sae_config(path, layer)
    if fmt == "saelens":
        tensors = load_file(str(path / WEIGHTS_FILENAME), device=str(device))
    else:
        tensors = _read_tensors(path, fmt, cfg, str(device))
        cfg.dtype = dtype_name(tensors["W_enc"].dtype)
    if cfg.architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))  # a training checkpoint
    sae = SAE_CLASSES[cfg.architecture](cfg, device="meta")
    expected = dict(sae.named_parameters())
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{sae_files(path)[-1]} lacks tensors {missing}")
    for name, param in expected.items():
        t = tensors.pop(name)
        if t.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, cfg.json implies {tuple(param.shape)}")
        # Keep the file's tensor as-is (no copy into a preallocated buffer) so save_sae is bit-exact.
        setattr(sae, name, torch.nn.Parameter(t, requires_grad=False))
    sae.extra_tensors = tensors
    if cfg.normalize_activations == "expected_average_only_in" and cfg.norm_scaling_factor is None:
        log.warning("%s: normalize_activations=expected_average_only_in but no norm_scaling_factor; "
                    "inputs are used unscaled (as SAELens load_from_disk does)", path)
    if dtype is not None and parse_dtype(dtype) != sae.dtype:
        sae = sae.to(parse_dtype(dtype))
        sae.cfg.dtype = dtype_name(parse_dtype(dtype))
    return sae


def save_sae(sae: Sae, path: str | Path) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` in the SAELens layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in sae.named_parameters()}
    tensors.update({name: t.contiguous() for name, t in sae.extra_tensors.items()})
    save_file(tensors, str(path / WEIGHTS_FILENAME))
    (path / CFG_FILENAME).write_text(json.dumps(sae.cfg.to_dict(), indent=2))


def validate_for_model(sae: Sae, hidden_size: int, num_layers: int) -> int:
    """Check the SAE fits the served model; returns its layer. Raises ValueError naming the mismatch."""
    if sae.cfg.d_in != hidden_size:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match the model hidden size {hidden_size}"
                         f" (hook {sae.cfg.hook_name!r}, trained on {sae.cfg.model_name!r}): an SAE of another "
                         "model or of another activation")
    layer = sae.layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"SAE hook {sae.cfg.hook_name!r} is layer {layer}, but the model has "
                         f"{num_layers} decoder layers (valid 0..{num_layers - 1})")
    if not all(math.isfinite(float(v)) for v in (sae.W_enc.abs().max(), sae.b_enc.abs().max())):
        raise ValueError("SAE encoder weights contain NaN or inf")
    return layer
