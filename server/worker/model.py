"""The model-architecture adapter: what the worker needs to know about a decoder-only model vLLM serves, one
small entry per family.

Per family (`Family`): where the decoder layers are, what a layer returns and so where the residual stream
after it is, the projection modules sparse and int8 mode wrap and where each projection's weight lives in the
Hugging Face checkpoint, the final norm and the unembedding. `resolve_layout(model)` picks the entry for a
loaded vLLM model and binds it (`ModelLayout`); anything not listed fails at start-up with an error naming the
model class.

What a decoder layer returns:
- "fused_residual": vLLM's Llama-style layers defer the residual add into the next layer's norm and return
  (hidden, residual); the residual stream after the layer is hidden + residual. Steering adds its delta to
  hidden, so the next layer (and the final norm) sees it in the stream.
- "stream": GPT-2 in vLLM, and the layers of vLLM's Transformers backend (GPT-NeoX, OLMo 2) return the stream
  itself, as a tensor or as the first item of a tuple; steering adds to it in place. The Transformers backend
  keeps HF's batch dimension ([1, tokens, hidden], for projection inputs too): `rows_view` drops it.

Projections (`Projection`): a vLLM module under a decoder layer (a fused `qkv_proj` computes q, k and v) and
the projections it computes, in output-column order, named as in a Llama block (q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj; GPT-2's c_fc is an up_proj: no gate) so the WINA threshold tables and
the calibration tooling keep one naming. Where a module cannot be wrapped (a MoE block has no gate_up_proj:
its experts run in vLLM's fused MoE kernel), the modes skip it and say so; a family whose layers have no
wrappable MLP at all (MoE) refuses sparse mode, whose thresholds cover every projection of a block.

Checkpoint weights (`WeightSource`): vLLM repacks its linear weights for oneDNN and drops `weight`, so both
modes read the model's safetensors. A source names the tensor relative to a layer's prefix, which of a fused
tensor's row blocks is the projection (split like the vLLM module's outputs: Phi-3 stores q|k|v in one
tensor) and whether it is stored transposed (GPT-2's Conv1D keeps [in, out]). Layer prefixes are looked up
among the family's own and the multimodal wrappers' (`language_model.…`, `model.language_model.…`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LayerOutput = Literal["fused_residual", "stream"]
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModel(RuntimeError):
    """The served model's class has no entry in FAMILIES."""


@dataclass(frozen=True)
class Projection:
    """A module under a decoder layer that sparse and int8 mode wrap, and the projections it computes in
    output-column order."""

    path: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class WeightSource:
    """Where one projection's [out, in] weight lives in the checkpoint: `key` under the layer's prefix
    ("model.layers.3." + key), row block `part` of `parts` of a fused tensor, stored transposed or not."""

    key: str
    part: int = 0
    parts: int = 1
    transposed: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]  # vLLM model classes; for vLLM's Transformers backend, the HF base model class
    layers: str  # the decoder ModuleList under the language model
    output: LayerOutput
    projections: tuple[Projection, ...]  # what sparse and int8 mode wrap; () = both refused
    weights: Mapping[str, WeightSource]  # projection -> its checkpoint tensor
    checkpoint_layers: str  # the layers' key prefix in the checkpoint ("model.layers")
    final_norm: str
    unembedding: tuple[str, ...]  # module(s) whose quant_method computes the logits, the first present wins
    unembedding_keys: tuple[str, ...]  # checkpoint tensors of the unembedding, the first present wins
    sparse: str = ""  # why sparse mode cannot run on this family ("" = it can)
    moe_block: str = ""  # the mixture-of-experts block under a layer, which neither mode wraps
    notes: str = ""

    @property
    def projection_names(self) -> tuple[str, ...]:
        """Every projection of a block, in the order the modules list them (a thresholds table's columns)."""
        return tuple(p for projection in self.projections for p in projection.parts)


def _separate(attn: str = "self_attn", mlp: str = "mlp", gated: bool = True) -> dict[str, WeightSource]:
    names = LLAMA_PROJECTIONS if gated else ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    return {p: WeightSource(f"{attn if p[0] in 'qkvo' else mlp}.{p}.weight") for p in names}


LLAMA_STYLE = (Projection("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
               Projection("self_attn.o_proj", ("o_proj",)),
               Projection("mlp.gate_up_proj", ("gate_proj", "up_proj")),
               Projection("mlp.down_proj", ("down_proj",)))
ATTENTION_ONLY = LLAMA_STYLE[:2]
TIED = ("lm_head.weight", "model.embed_tokens.weight")
LM_HEAD = ("lm_head", "model.embed_tokens")  # vLLM's Gemma 2 computes logits with the embedding itself
MOE = "its MLPs are mixture-of-experts blocks (vLLM's fused MoE kernel), which sparse mode cannot mask"


def _llama_like(name: str, classes: tuple[str, ...], notes: str = "") -> Family:
    return Family(name, classes, "model.layers", "fused_residual", LLAMA_STYLE, _separate(), "model.layers",
                  "model.norm", LM_HEAD, TIED, notes=notes)


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", ("LlamaForCausalLM",), "Llama 2/3, SmolLM, and every architecture vLLM maps onto it"),
    _llama_like("qwen2", ("Qwen2ForCausalLM", "Qwen3ForCausalLM"), "Qwen2, Qwen2.5 and Qwen3 (dense)"),
    _llama_like("mistral", ("MistralForCausalLM",)),
    _llama_like("gemma", ("Gemma2ForCausalLM", "Gemma3ForCausalLM"),
                "Gemma 2 and Gemma 3 text; the norms around attention and the MLP sit inside the layer"),
    Family("phi3", ("Phi3ForCausalLM",), "model.layers", "fused_residual", LLAMA_STYLE,
           {"q_proj": WeightSource("self_attn.qkv_proj.weight", 0, 3),
            "k_proj": WeightSource("self_attn.qkv_proj.weight", 1, 3),
            "v_proj": WeightSource("self_attn.qkv_proj.weight", 2, 3),
            "o_proj": WeightSource("self_attn.o_proj.weight"),
            "gate_proj": WeightSource("mlp.gate_up_proj.weight", 0, 2),
            "up_proj": WeightSource("mlp.gate_up_proj.weight", 1, 2),
            "down_proj": WeightSource("mlp.down_proj.weight")},
           "model.layers", "model.norm", LM_HEAD, TIED, notes="q|k|v and gate|up are fused in the checkpoint"),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "model.layers", "fused_residual",
           LLAMA_STYLE, _separate(), "model.layers", "model.norm", LM_HEAD, TIED, sparse=MOE, moe_block="mlp",
           notes="int8 mode quantizes attention and any dense MLP (mlp_only_layers); experts stay full precision"),
    Family("mixtral", ("MixtralForCausalLM",), "model.layers", "fused_residual", ATTENTION_ONLY,
           {p: w for p, w in _separate().items() if p in ("q_proj", "k_proj", "v_proj", "o_proj")},
           "model.layers", "model.norm", LM_HEAD, TIED, sparse=MOE, moe_block="block_sparse_moe",
           notes="int8 mode quantizes attention; the experts (block_sparse_moe) stay full precision"),
    Family("olmo2", ("Olmo2Model",), "model.layers", "stream", LLAMA_STYLE, _separate(), "model.layers",
           "model.norm", LM_HEAD, TIED, notes="vLLM's Transformers backend: HF layers returning the stream "
           "([1, tokens, hidden]); its fusers build qkv_proj and gate_up_proj as in vLLM's Llama"),
    Family("gpt2", ("GPT2LMHeadModel",), "transformer.h", "stream",
           (Projection("attn.c_attn", ("q_proj", "k_proj", "v_proj")), Projection("attn.c_proj", ("o_proj",)),
            Projection("mlp.c_fc", ("up_proj",)), Projection("mlp.c_proj", ("down_proj",))),
           {"q_proj": WeightSource("attn.c_attn.weight", 0, 3, transposed=True),
            "k_proj": WeightSource("attn.c_attn.weight", 1, 3, transposed=True),
            "v_proj": WeightSource("attn.c_attn.weight", 2, 3, transposed=True),
            "o_proj": WeightSource("attn.c_proj.weight", transposed=True),
            "up_proj": WeightSource("mlp.c_fc.weight", transposed=True),
            "down_proj": WeightSource("mlp.c_proj.weight", transposed=True)},
           "transformer.h", "transformer.ln_f", ("lm_head",), ("lm_head.weight", "transformer.wte.weight"),
           notes="Conv1D weights stored [in, out]; every projection has a bias"),
    Family("gpt_neox", ("GPTNeoXModel",), "model.layers", "stream",
           (Projection("attention.query_key_value", ("qkv_proj",)), Projection("attention.dense", ("o_proj",)),
            Projection("mlp.dense_h_to_4h", ("up_proj",)), Projection("mlp.dense_4h_to_h", ("down_proj",))),
           {"qkv_proj": WeightSource("attention.query_key_value.weight"),
            "o_proj": WeightSource("attention.dense.weight"),
            "up_proj": WeightSource("mlp.dense_h_to_4h.weight"),
            "down_proj": WeightSource("mlp.dense_4h_to_h.weight")},
           "gpt_neox.layers", "model.final_layer_norm", ("lm_head",), ("embed_out.weight", "gpt_neox.embed_in.weight"),
           notes="vLLM's Transformers backend; q|k|v interleaved per head in one projection (qkv_proj)"),
)
BY_CLASS: dict[str, Family] = {cls: family for family in FAMILIES for cls in family.classes}
DEFAULT_FAMILY = BY_CLASS["LlamaForCausalLM"]


def family_of(class_name: str) -> Family:
    family = BY_CLASS.get(class_name)
    if family is None:
        raise UnsupportedModel(
            f"featurelens has no architecture adapter for {class_name}: supported are "
            f"{', '.join(sorted(BY_CLASS))} (server/worker/model.py FAMILIES)")
    return family


def language_model(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The text decoder of a vLLM model and its path: the model itself, or a multimodal wrapper's
    `language_model` (repeatedly, for nested wrappers)."""
    path = ""
    while True:
        inner = getattr(model, "language_model", None)
        if inner is None or inner is model or not hasattr(inner, "modules"):
            return model, path
        model, path = inner, f"{path}language_model."


def model_class(model: torch.nn.Module) -> str:
    """The name the family is looked up by: the language model's class, or for vLLM's Transformers backend
    (TransformersForCausalLM and friends) the Hugging Face base model class it wraps."""
    lm, _ = language_model(model)
    name = type(lm).__name__
    if name.startswith("Transformers"):
        inner = getattr(lm, "model", None)
        if inner is not None:
            return type(inner).__name__
    return name


def stream_parts(output: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, residual) of a decoder layer's output: vLLM's fused-residual pair, or (stream, None) for a layer
    that returns the stream (a tensor, or a tuple whose first item is it). The residual stream after the layer
    is hidden + residual, or hidden alone."""
    import torch

    if isinstance(output, torch.Tensor):
        return rows_view(output), None
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        second = output[1] if len(output) > 1 else None
        return rows_view(output[0]), rows_view(second) if isinstance(second, torch.Tensor) else None
    raise TypeError(f"a decoder layer returned {type(output).__name__}, expected a tensor or (hidden, residual)")


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """[tokens, hidden] of a layer's output or a projection's input: vLLM's Transformers backend keeps HF's
    batch dimension ([1, tokens, hidden]); a view, so writing into it writes into the model's tensor."""
    return x[0] if x.dim() == 3 and x.shape[0] == 1 else x


def is_linear(module: object) -> bool:
    """A module the modes can wrap: a vLLM linear layer (output sizes, a forward returning (out, bias))."""
    return (getattr(module, "output_sizes", None) is not None or getattr(module, "output_size", None) is not None) \
        and callable(getattr(module, "forward", None))


def output_sizes(module: object) -> list[int]:
    """A vLLM linear layer's outputs: one size per projection a fused module computes."""
    sizes = getattr(module, "output_sizes", None)
    return [int(n) for n in sizes] if sizes else [int(getattr(module, "output_size", 0))]


@dataclass
class ModelLayout:
    """A family bound to one loaded model: its decoder layers and language-model path; the checkpoint
    lookups need the model folder's `weight_files` map."""

    family: Family
    layers: list[torch.nn.Module] = field(default_factory=list)
    root: str = ""  # path of the language model in the vLLM model ("" or "language_model.")
    model: torch.nn.Module | None = None
    _sizes: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (layer, module path) -> outputs
    _prefix: dict[int, str] = field(default_factory=dict)  # id(files) -> checkpoint layers prefix

    @property
    def output(self) -> LayerOutput:
        return self.family.output

    def wrappable(self, index: int) -> tuple[list[tuple[Projection, torch.nn.Module]], list[str]]:
        """The projection modules of layer `index` the modes can wrap, and why the others cannot be."""
        layer = self.layers[index]
        found, skipped = [], []
        for projection in self.family.projections:
            try:
                module = layer.get_submodule(projection.path)
            except AttributeError:
                parent = projection.path.rsplit(".", 1)[0]
                what = type(layer.get_submodule(parent)).__name__ if _has(layer, parent) else "nothing"
                skipped.append(f"layer {index} {projection.path}: not found ({parent} is {what})")
                continue
            if not is_linear(module):
                skipped.append(f"layer {index} {projection.path}: {type(module).__name__} is not a linear layer")
                continue
            sizes = output_sizes(module)
            if len(sizes) != len(projection.parts):
                skipped.append(f"layer {index} {projection.path}: outputs {sizes}, expected {projection.parts}")
                continue
            self._sizes[(index, projection.path)] = sizes
            found.append((projection, module))
        return found, skipped

    def layer_prefix(self, files: Mapping[str, str]) -> str:
        """The checkpoint's key prefix of the decoder layers ("model.layers"), multimodal wrappers included."""
        cached = self._prefix.get(id(files))
        if cached is not None:
            return cached
        own = self.family.checkpoint_layers
        candidates = [own, f"language_model.{own}", f"model.language_model.{own.removeprefix('model.')}"]
        first = next(iter(self.family.weights.values()), None)
        for prefix in candidates:
            if first is None or f"{prefix}.0.{first.key}" in files:
                self._prefix[id(files)] = prefix
                return prefix
        raise KeyError(f"no {self.family.name} decoder weights in the checkpoint: looked for "
                       f"{[f'{p}.0.{first.key}' for p in candidates] if first else candidates}")

    def projection_weight(self, files: Mapping[str, str], layer: int, proj: str) -> torch.Tensor:
        """[out, in] weight of projection `proj` of decoder layer `layer`, read from the checkpoint."""
        from featurelens.server.worker.sparse import read_tensor

        source = self.family.weights.get(proj)
        if source is None:
            raise KeyError(f"{self.family.name} has no projection {proj!r}")
        weight = read_tensor(files, f"{self.layer_prefix(files)}.{layer}.{source.key}")
        if source.transposed:
            weight = weight.T.contiguous()
        if source.parts == 1:
            return weight
        sizes = self._fused_sizes(layer, proj, source, weight.shape[0])
        start = sum(sizes[:source.part])
        return weight[start:start + sizes[source.part]].contiguous()

    def _fused_sizes(self, layer: int, proj: str, source: WeightSource, rows: int) -> list[int]:
        """Row blocks of a fused checkpoint tensor: the sizes of the vLLM module computing these projections
        (the same order), or equal blocks where the module was not seen."""
        for projection in self.family.projections:
            if proj in projection.parts:
                sizes = self._sizes.get((layer, projection.path))
                if sizes is None and layer < len(self.layers) and _has(self.layers[layer], projection.path):
                    sizes = output_sizes(self.layers[layer].get_submodule(projection.path))
                if sizes is not None and len(sizes) == source.parts and sum(sizes) == rows:
                    return sizes
        if rows % source.parts:
            raise KeyError(f"layer {layer} {proj}: cannot split {rows} rows into {source.parts} projections")
        return [rows // source.parts] * source.parts

    def unembedding(self) -> torch.nn.Module | None:
        if self.model is None:
            return None
        lm, _ = language_model(self.model)
        for path in self.family.unembedding:
            if _has(lm, path):
                return lm.get_submodule(path)
        return None

    def unembedding_key(self, files: Mapping[str, str]) -> str | None:
        """The checkpoint tensor the unembedding's rows come from (its own, or the tied embedding)."""
        for key in self.family.unembedding_keys:
            for candidate in (key, f"language_model.{key}", key.replace("model.", "model.language_model.", 1)):
                if candidate in files:
                    return candidate
        return None

    def final_norm(self) -> torch.nn.Module | None:
        if self.model is None:
            return None
        lm, _ = language_model(self.model)
        return lm.get_submodule(self.family.final_norm) if _has(lm, self.family.final_norm) else None


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def resolve_layout(model: torch.nn.Module) -> ModelLayout:
    """The layout of a loaded vLLM model; UnsupportedModel (naming the class) when no family fits, RuntimeError
    when the family's layers are not where its entry says."""
    name = model_class(model)
    family = family_of(name)
    lm, root = language_model(model)
    layers = _decoder_layers(lm, family.layers, family, type(model).__name__, f" ({name})", root)
    if not layers:
        raise RuntimeError(f"{type(model).__name__}: {root}{family.layers} is empty")
    return ModelLayout(family=family, layers=layers, root=root, model=model)


def _decoder_layers(owner: torch.nn.Module, path: str, family: Family, model_name: str, qualifier: str = "",
                    root: str = "") -> list[torch.nn.Module]:
    """The decoder layers at `path` under `owner` (a vLLM language model or an HF causal LM); RuntimeError
    naming the model when they are missing or not a ModuleList."""
    if not _has(owner, path):
        raise RuntimeError(f"cannot find decoder layers on {model_name}{qualifier}: expected {root}{path} for the "
                           f"{family.name} family")
    import torch

    container = owner.get_submodule(path)
    if not isinstance(container, torch.nn.ModuleList):
        raise RuntimeError(f"{model_name}: {root}{path} is a {type(container).__name__}, not the decoder layers' "
                           "ModuleList")
    return list(container)


def default_layout(layers: list[torch.nn.Module] | None = None) -> ModelLayout:
    """The Llama layout over given layers (unit tests and callers that predate the adapter)."""
    return ModelLayout(family=DEFAULT_FAMILY, layers=list(layers or []))


def hf_family(model: torch.nn.Module) -> Family:
    """The family of a Hugging Face transformers causal LM, for the offline tools that run one (sparsity
    calibration, SAE evaluation, the benchmarks' HF baselines): its own class, else its base model's
    (Olmo2Model, GPTNeoXModel: the keys of the families vLLM serves through its Transformers backend).
    UnsupportedModel naming the class when neither has an entry."""
    name = type(model).__name__
    if name in BY_CLASS:
        return BY_CLASS[name]
    base = getattr(model, "base_model", None)
    if base is not None and base is not model and type(base).__name__ in BY_CLASS:
        return BY_CLASS[type(base).__name__]
    return family_of(name)


def hf_layers(model: torch.nn.Module, family: Family | None = None) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face transformers causal LM: its checkpoint's layer prefix is their module
    path ("model.layers", "transformer.h", "gpt_neox.layers"). The residual stream after layer L, featurelens'
    "layer L", is the first output of layers[L]."""
    family = family or hf_family(model)
    return _decoder_layers(model, family.checkpoint_layers, family, type(model).__name__)
