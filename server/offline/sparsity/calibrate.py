"""Offline WINA calibration and quality check (HF transformers, CPU, float32), for the default model or any
model of a family with an architecture adapter (server/worker/model.py) whose MLPs are dense:

    featurelens sparsity --texts 150 --prompts 60 --projection \
        --serve projection --rotate mlp --threads 2
    featurelens sparsity --model /path/to/model --out /path/to/model-wina.json     # then serve with
        featurelens serve --model /path/to/model --sparsity-thresholds /path/to/model-wina.json

The tables are keyed "<layer>.<proj>" with the family's projection names (`Family.projection_names`: Llama's
q/k/v/o/gate/up/down, GPT-2's without gate, GPT-NeoX's fused qkv_proj), each projection's weight as the
family's `WeightSource` reads it from the checkpoint, as the server's sparse mode masks them. A projection the
Hugging Face model computes inside a fused module (Phi-3's qkv_proj, GPT-2's Conv1D c_attn) is split into one
linear per projection first (`prepare_model`, the same function). Mixture-of-experts families are refused.

1. Text (offline/sparsity/data.py): by default (`--calibration chat`) the dense model's greedy continuations of three
   disjoint sets of chat prompts, counted at the generated positions only, since a sparse request masks its
   generated tokens and runs its prompt dense: one set gives the rotations, one the thresholds, one the held-out
   sparsity report. Corpus documents (package docstrings/READMEs + entity fact paragraphs, see offline/sae/corpus.py,
   seeded, split into calibration and held-out documents) give held-out perplexity and a second held-out
   sparsity report; `--calibration documents` calibrates on them instead, as earlier shipped tables were.
2. Scores: forward pre-hooks on every q/k/v/o/gate/up/down projection record a random sample of the WINA
   scores |x_i| * ||W[:, i]|| of its input on calibration text; thresholds are per-projection quantiles.
   Allocations: uniform (every projection at the level); optionally `--greedy` (TEAL-style, per block),
   `--layerwise` (across blocks, from each block's measured output-KL sensitivity on separate calibration
   prompts) and `--projection` (every projection on its own, across blocks, from a Fisher estimate of the
   same KL on the same prompts); `--serve` names the one written as the served `levels` table.
   With `--rotate mlp` (the shipped table) the MLP input of every block is first mapped into another basis
   (`input_rotations` on the rotation text: with `--basis fisher`, the default, the principal rotation in the
   input's Fisher metric; with `--basis pca`, the eigenvectors of its second moment), written beside the JSON
   as "<out stem>-rotation.safetensors"; scores, thresholds and allocations are then of the inputs in that
   basis (`rotate_model`: gate/up read x T with weights W T⁻ᵀ).
3. Check: the same hooks on held-out text measure the sparsity the thresholds actually give; pre-hooks that
   zero inputs measure perplexity on held-out documents (every token masked, the harsher setting) and
   teacher-forced greedy-token agreement with dense on evaluation chat prompts, both with every token masked
   and with the prompt dense (as the server runs a sparse request).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from featurelens.server.modes.sparsity import (
    DEFAULT_THRESHOLDS,
    LEVELS,
    ROTATION_GROUPS,
    basis_weight,
    column_norms,
    rotation_of,
    wina_scores,
    wina_sparsify,
)
from featurelens.server.offline.sparsity.data import (  # noqa: F401 - chat_prompts: the benches' import path
    MAX_TOKENS,
    Sequence,
    chat_continuations,
    chat_prompts,
    corpus_texts,
    dense_continuations,
    document_ids,
    documents,
    fresh_chat_prompts,
)
from featurelens.server.offline.sparsity.fit import (
    curve_allocation,
    fisher_basis,
    greedy_allocation,
    measured_sparsity,
    principal_rotation,
    quantize_rotations,
)
from featurelens.server.worker.model import Family


def load_model(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return prepare_model(model), AutoTokenizer.from_pretrained(path)


class SplitLinear(torch.nn.Module):
    """A fused projection module (Phi-3's qkv_proj, GPT-2's Conv1D c_attn) as one nn.Linear per projection
    (`parts`, in output-column order) whose outputs are concatenated: the same function, and each projection
    can be hooked, masked and rotated on its own as the server's sparse mode does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, names: list[str], sizes: list[int]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict()
        start = 0
        for name, size in zip(names, sizes, strict=True):
            linear = torch.nn.Linear(weight.shape[1], size, bias=bias is not None, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight[start:start + size])
                if bias is not None:
                    linear.bias.copy_(bias[start:start + size])
            self.parts[name] = linear
            start += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts.values()], dim=-1)


class Layout:
    """Where the calibration finds a model's decoder, its blocks and each block's projections."""

    def __init__(self, family: Family, layers: list[torch.nn.Module], paths: dict[str, str]) -> None:
        self.family, self.layers, self.paths = family, layers, paths  # paths: proj -> module path in a block

    def group_first(self, group: str) -> str | None:
        """The first of a rotation group's projections this family has (they all read one input)."""
        return next((p for p in ROTATION_GROUPS[group] if p in self.paths), None)


def _fused_sizes(config: Any, names: list[str], rows: int) -> list[int]:
    """Row blocks of a fused tensor: q|k|v by the attention's head counts (grouped-query attention makes k and
    v narrower than q), anything else (gate|up, GPT-2's equal q|k|v) in equal blocks."""
    if names == ["q_proj", "k_proj", "v_proj"]:
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or (int(config.hidden_size) // heads if heads else 0))
        sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
        if heads and sum(sizes) == rows:
            return sizes
    if rows % len(names):
        raise ValueError(f"cannot split {rows} output rows into {names}")
    return [rows // len(names)] * len(names)


def prepare_model(model: Any) -> Any:
    """Bind the model's family (server/worker/model.py) and split its fused projection modules, in place; the
    model computes the same function. Refuses, naming the model class, a family sparse mode cannot run on
    (mixture-of-experts MLPs) and one the adapter does not know."""
    from featurelens.server.worker.model import hf_family, hf_layers

    if isinstance(getattr(model, "_featurelens_layout", None), Layout):
        return model
    cls = type(model).__name__
    family = hf_family(model)
    if family.sparse or not family.projections:
        raise ValueError(f"sparsity calibration cannot run on {cls} (the {family.name} family): "
                         f"{family.sparse or 'it has no projections sparse mode wraps'}")
    layers = hf_layers(model, family)
    by_key: dict[str, list[str]] = {}
    for proj in family.projection_names:
        by_key.setdefault(family.weights[proj].key, []).append(proj)
    paths: dict[str, str] = {}
    for key, names in by_key.items():
        path = key.removesuffix(".weight")
        sources = [family.weights[p] for p in names]
        whole = len(names) == 1 and sources[0].parts == 1 and not sources[0].transposed
        if whole:
            if not all(isinstance(layer.get_submodule(path), torch.nn.Linear) for layer in layers):
                raise ValueError(f"{cls}: {path} is not an nn.Linear in every block")
            paths[names[0]] = path
            continue
        if len(names) != sources[0].parts or [s.part for s in sources] != list(range(len(names))):
            raise ValueError(f"{cls}: {key} holds {sources[0].parts} projections, the family names {names}")
        parent, attr = path.rsplit(".", 1) if "." in path else ("", path)
        for layer in layers:
            module = layer.get_submodule(path)
            weight = cast(torch.Tensor, module.weight).detach()
            weight = weight.T if sources[0].transposed else weight  # [out, in]
            sizes = _fused_sizes(model.config, names, weight.shape[0])
            split = SplitLinear(weight, getattr(module, "bias", None), names, sizes)
            setattr(layer.get_submodule(parent) if parent else layer, attr, split)
        paths.update({p: f"{path}.parts.{p}" for p in names})
    model._featurelens_layout = Layout(family, layers, paths)
    return model


def layout_of(model: Any) -> Layout:
    """The model's calibration layout (`prepare_model` on first use)."""
    return cast(Layout, prepare_model(model)._featurelens_layout)


def decoder(model: Any) -> Any:
    """The decoder without the unembedding: hooking its blocks needs no logits."""
    return model.base_model


def projections(model: Any) -> dict[str, torch.nn.Linear]:
    """"<layer>.<proj>" -> nn.Linear for every decoder block (for a rotated projection, the linear of the
    rotated basis: its hooks see x Q and its weight is W Q)."""
    layout = layout_of(model)
    out: dict[str, torch.nn.Linear] = {}
    for i, layer in enumerate(layout.layers):
        for proj, path in layout.paths.items():
            module = layer.get_submodule(path)
            out[f"{i}.{proj}"] = module.inner if isinstance(module, RotatedLinear) else cast(torch.nn.Linear, module)
    return out


class RotatedLinear(torch.nn.Module):
    """x -> inner(x T): a projection that reads its input in another basis (`inner.weight` = W T⁻ᵀ, which is
    W T for an orthogonal T; see sparsity.basis_weight)."""

    rotation: torch.Tensor  # a buffer

    def __init__(self, linear: torch.nn.Linear, rotation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rotation", rotation.float().clone())  # a normal tensor: Fisher needs autograd
        self.inner = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.inner.weight.copy_(basis_weight(linear.weight.detach(), self.rotation))
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)
        self.inner.requires_grad_(linear.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x @ self.rotation.to(x.dtype))


def rotate_model(model: Any, rotations: dict[str, torch.Tensor] | None) -> Any:
    """Swap every projection with a rotation ("<layer>.<group>" -> Q) for a RotatedLinear, in place; the
    model computes the same function (up to rounding). None or {}: nothing changes."""
    layout = layout_of(model)
    for i, layer in enumerate(layout.layers):
        for proj, path in layout.paths.items():
            q = rotation_of(rotations, i, proj)
            module = layer.get_submodule(path)
            if q is None or isinstance(module, RotatedLinear):
                continue
            parent, name = path.rsplit(".", 1)
            setattr(layer.get_submodule(parent), name, RotatedLinear(cast(torch.nn.Linear, module), q))
    return model


def _group_readers(model: Any, groups: list[str]) -> dict[str, torch.nn.Module]:
    """"<layer>.<group>" -> the group's first projection in that block: they share one input, so hooking one
    sees it."""
    layout = layout_of(model)
    firsts = {g: layout.group_first(g) for g in groups}
    missing = [g for g, p in firsts.items() if p is None]
    if missing:
        raise ValueError(f"the {layout.family.name} family has no projection of rotation group(s) {missing}")
    return {f"{i}.{g}": layer.get_submodule(layout.paths[p]) for i, layer in enumerate(layout.layers)
            for g, p in firsts.items() if p is not None}


@torch.inference_mode()
def input_moments(model: Any, sequences: list[Sequence], groups: list[str]) -> dict[str, torch.Tensor]:
    """"<layer>.<group>" -> second moment Σ x xᵀ (float64) of that group's input over the counted positions of
    `sequences`."""
    mods = _group_readers(model, groups)
    moments: dict[str, torch.Tensor] = {}
    first = [0]

    def make_hook(name: str, _m: torch.nn.Module) -> Any:
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            x = args[0][..., first[0]:, :].reshape(-1, args[0].shape[-1]).double()
            moments[name] = moments[name] + x.T @ x if name in moments else x.T @ x
        return hook

    with hooks(mods, make_hook):
        for ids, start in sequences:
            first[0] = start
            decoder(model)(ids, use_cache=False)
    return moments


def input_fisher(model: Any, sequences: list[Sequence], groups: list[str], samples: int = 2,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """"<layer>.<group>" -> Σ g gᵀ (float64) over the counted positions of `sequences`, g the gradient of
    Σ_u log p(y_u) (y_u sampled from the model at every counted position u, `samples` draws per sequence) with
    respect to the group's input: the Fisher matrix of that input, up to scale (cross terms between positions
    have mean zero under sampling)."""
    mods = _group_readers(model, groups)
    grads: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] = {}

    def make_hook(name: str, _m: torch.nn.Module) -> Any:
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            if args[0].requires_grad:  # the input's total gradient (every projection of the group reads it)
                args[0].register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    gen = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients of the inputs only
    try:
        with hooks(mods, make_hook), torch.enable_grad():
            for ids, start in sequences:
                if ids.shape[1] <= start:
                    continue
                for _ in range(samples):
                    inputs = embed(ids).detach().requires_grad_(True)
                    logp = torch.log_softmax(model(inputs_embeds=inputs).logits[0, start - 1:-1].float(), -1)
                    with torch.no_grad():
                        labels = torch.multinomial(logp.exp(), 1, generator=gen)
                    logp.gather(1, labels).sum().backward()
                    for name, g in grads.items():
                        g = g[0, start:].double()
                        fisher[name] = fisher[name] + g.T @ g if name in fisher else g.T @ g
                    grads.clear()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return fisher


def input_rotations(model: Any, sequences: list[Sequence], groups: list[str], basis: str = "pca",
                    fisher_samples: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """"<layer>.<group>" -> the basis T of that group's input (x' = x T), from the counted positions of
    `sequences`: "pca", the principal rotation of its second moment; "fisher", `fisher_basis` of its Fisher
    matrix and second moment."""
    moments = input_moments(model, sequences, groups)
    if basis == "pca":
        return {name: principal_rotation(m) for name, m in moments.items()}
    if basis != "fisher":
        raise ValueError(f"basis must be 'pca' or 'fisher', not {basis!r}")
    fisher = input_fisher(model, sequences, groups, fisher_samples, seed)
    return {name: fisher_basis(fisher[name], m) for name, m in moments.items()}


@contextmanager
def hooks(modules: Mapping[str, torch.nn.Module], make_hook: Callable[[str, torch.nn.Module], Any]) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(make_hook(name, m)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def collect_scores(model: Any, sequences: list[Sequence], per_call: int = 2048, seed: int = 0) -> dict[str, torch.Tensor]:
    """"<layer>.<proj>" -> 1-D sample of WINA scores of that projection's inputs at the counted positions of
    `sequences` (the model runs dense)."""
    mods = projections(model)
    norms = {name: column_norms(m.weight) for name, m in mods.items()}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in mods}
    gen = torch.Generator().manual_seed(seed)
    first = [0]

    def make_hook(name: str, _m: torch.nn.Module) -> Any:
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            s = wina_scores(args[0][..., first[0]:, :], norms[name]).flatten()
            if s.numel():
                samples[name].append(s[torch.randint(s.numel(), (min(per_call, s.numel()),), generator=gen)])
        return hook

    with hooks(mods, make_hook):
        for ids, start in sequences:
            first[0] = start
            decoder(model)(ids, use_cache=False)  # decoder only: the unembedding is not hooked
    if not all(samples.values()):
        raise ValueError("no positions to score: every sequence ends at its first counted position")
    return {name: torch.cat(v) for name, v in samples.items()}


@contextmanager
def wina_masking(model: Any, thresholds: dict[str, float], first_position: list[int] | None = None) -> Iterator[None]:
    """Zero the inputs below threshold in every listed projection while the context is open. With
    `first_position` (a one-element list the caller may change between forwards) only sequence positions
    >= first_position[0] are masked: the server's default, where a request's prompt runs dense."""
    mods = {n: m for n, m in projections(model).items() if n in thresholds}
    norms = {name: column_norms(m.weight) for name, m in mods.items()}

    def make_hook(name: str, _m: torch.nn.Module) -> Any:
        def hook(_mod: torch.nn.Module, args: tuple) -> tuple:
            x, start = args[0], first_position[0] if first_position else 0
            if start <= 0:
                return (wina_sparsify(x, norms[name], thresholds[name]), *args[1:])
            tail = wina_sparsify(x[..., start:, :], norms[name], thresholds[name])
            return (torch.cat([x[..., :start, :], tail], dim=-2), *args[1:])
        return hook

    with hooks(mods, make_hook):
        yield


def _sorted_samples(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: s.sort().values for n, s in scores.items()}


def _threshold_at(sorted_scores: torch.Tensor, sparsity: float) -> float:
    k = int(round(sparsity * sorted_scores.numel()))
    return 0.0 if k == 0 else float(sorted_scores[min(k, sorted_scores.numel() - 1)])


@torch.inference_mode()
def greedy_levels(model: Any, tok: Any, texts: list[str], sorted_scores: dict[str, torch.Tensor],
                  targets: list[float], step: float = 0.1, n_seqs: int = 2) -> dict[float, dict[str, float]]:
    """Per-block TEAL greedy on captured (dense) block inputs; error = relative MSE of the block output."""
    captured: dict[int, list[tuple[tuple, dict]]] = {}
    handles = []
    layout = layout_of(model)
    for i, layer in enumerate(layout.layers):
        def grab(_mod: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            captured.setdefault(i, []).append((args, kwargs))
        handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    for text in texts[:n_seqs]:
        decoder(model)(document_ids(tok, text), use_cache=False)  # a cache would grow on every replay
    for h in handles:
        h.remove()

    first_block = projections(model)
    sizes = {p: first_block[f"0.{p}"].weight.numel() for p in layout.paths}
    result: dict[float, dict[str, float]] = {t: {} for t in targets}
    for i, layer in enumerate(layout.layers):
        dense = [layer(*a, **k) for a, k in captured[i]]
        dense = [d[0] if isinstance(d, tuple) else d for d in dense]

        def block_error(levels: dict[str, float], i: int = i, layer: Any = layer, dense: list = dense) -> float:
            thr = {f"{i}.{p}": _threshold_at(sorted_scores[f"{i}.{p}"], s) for p, s in levels.items()}
            err = ref = 0.0
            with wina_masking(model, thr):
                for (a, k), d in zip(captured[i], dense, strict=True):
                    out = layer(*a, **k)
                    out = out[0] if isinstance(out, tuple) else out
                    err += float((out - d).pow(2).sum())
                    ref += float(d.pow(2).sum())
            return err / ref

        levels: dict[str, float] = {}
        for t in sorted(targets):  # one path: each level continues from the previous one
            levels = greedy_allocation(sizes, block_error, t, step=step, start=levels)
            result[t].update({f"{i}.{p}": s for p, s in levels.items()})
        print(f"  greedy block {i}: " + " ".join(f"{p}={s:.2f}" for p, s in levels.items()), flush=True)
    return result


@torch.inference_mode()
def layer_sensitivity(model: Any, prompts: list[torch.Tensor], dense_full: list[torch.Tensor],
                      sorted_scores: dict[str, torch.Tensor], grid: list[float]) -> dict[str, list[float]]:
    """"<layer>" -> [mean KL(dense || masked) of the next-token distribution at each grid sparsity], with only
    that layer's projections masked (uniformly) and, as served, only the continuation's tokens: measured on
    dense greedy continuations of calibration prompts."""
    starts = [p.shape[1] for p in prompts]
    dense_logp = [torch.log_softmax(model(full).logits[0, st - 1 : full.shape[1] - 1], -1)
                  for st, full in zip(starts, dense_full, strict=True)]
    n_pos = sum(lp.shape[0] for lp in dense_logp)
    curves: dict[str, list[float]] = {}
    t0 = time.time()
    layout = layout_of(model)
    for i in range(len(layout.layers)):
        curves[str(i)] = []
        for s in grid:
            thr = {f"{i}.{p}": _threshold_at(sorted_scores[f"{i}.{p}"], s) for p in layout.paths}
            first = [0]
            kl = 0.0
            with wina_masking(model, thr, first):
                for st, full, ref in zip(starts, dense_full, dense_logp, strict=True):
                    first[0] = st
                    lp = torch.log_softmax(model(full).logits[0, st - 1 : full.shape[1] - 1], -1)
                    kl += float((ref.exp() * (ref - lp)).sum())
            curves[str(i)].append(kl / max(n_pos, 1))
        print(f"  layer {i}: KL " + " ".join(f"{s:.2f}:{v:.4f}" for s, v in zip(grid, curves[str(i)], strict=True))
              + f" ({time.time() - t0:.0f} s)", flush=True)
    return curves


def curve_levels(curves: dict[str, list[float]], grid: list[float], targets: list[float], step: float = 0.05,
                 sizes: dict[str, int] | None = None) -> dict[float, dict[str, float]]:
    """target -> unit -> sparsity (units: blocks or projections), each level continuing from the previous one."""
    out: dict[float, dict[str, float]] = {}
    levels: dict[str, float] = {}
    for t in sorted(targets):
        levels = curve_allocation(curves, grid, t, step=step, start=levels, sizes=sizes)
        out[t] = dict(levels)
    return out


def _fisher_accumulate(logp: torch.Tensor, mods: dict[str, torch.nn.Linear], norms: dict[str, torch.Tensor],
                       inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                       thresholds: dict[str, list[float]], samples: int, gen: torch.Generator,
                       acc: dict[str, list[float]], blocks: dict[str, list[float]]) -> None:
    """One prompt's share of `projection_sensitivity`: (v . delta)^2 per projection and grid point, summed
    into `acc` (and per block into `blocks`), averaged over `samples` backward passes."""
    positions = logp.shape[0]
    with torch.no_grad():  # output change at every grid point: [grid, positions, out]
        deltas = {n: torch.stack([(wina_sparsify(inputs[n], norms[n], t) - inputs[n]) @ m.weight.detach().T
                                  for t in thresholds[n]]) for n, m in mods.items()}
        probs = logp.detach().exp()
    for k in range(samples):
        y = torch.multinomial(probs, 1, generator=gen)[:, 0]
        signs = torch.randint(0, 2, (positions,), generator=gen).float() * 2 - 1
        for out in outputs.values():
            out.grad = None
        (signs * logp.gather(1, y[:, None])[:, 0]).sum().backward(retain_graph=k < samples - 1)
        with torch.no_grad():
            per_block: dict[str, torch.Tensor] = {}
            for n, d in deltas.items():
                full_grad = outputs[n].grad
                assert full_grad is not None  # the backward above reached every hooked output
                grad = full_grad[0, -d.shape[1]:]  # the continuation's positions
                dots = (d * grad).sum(dim=(1, 2))
                for j, v in enumerate(dots.tolist()):
                    acc[n][j] += v * v / samples
                b = n.split(".")[0]
                per_block[b] = per_block.get(b, 0) + dots
            for b, dots in per_block.items():
                cur = blocks.setdefault(b, [0.0] * len(dots))
                for j, v in enumerate(dots.tolist()):
                    cur[j] += v * v / samples


def projection_sensitivity(model: Any, prompts: list[torch.Tensor], dense_full: list[torch.Tensor],
                           sorted_scores: dict[str, torch.Tensor], grid: list[float], samples: int = 8,
                           seed: int = 0) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-projection sensitivity curves from a Fisher estimate instead of one masked forward per point.

    Masking projection p at sparsity s changes its output at the continuation's positions by
    delta = W (mask(x) - x). To second order, the mean KL(dense || masked) of the next-token distributions is
    1/2 * sum_u E_{y_u ~ p_dense}[(g_u . delta)^2] / positions, g_u = d log p(y_u) / d(p's output). One
    backward of sum_u eps_u log p(y_u) (eps_u random signs, y_u sampled from the dense model) gives
    v = sum_u eps_u g_u for every projection at once, and E[(v . delta)^2] is that sum (the cross terms
    vanish); `samples` backwards per prompt average it. So 210 projections x len(grid) points cost
    `samples` backward passes per prompt, where measuring them would take 210 x len(grid) forwards per prompt.

    Returns ("<layer>.<proj>" -> curve, "<layer>" -> curve of the block's projections masked together). The
    block curves check the estimate against `layer_sensitivity`'s measured ones (the shipped calibration,
    16 prompts, 8 samples: estimate / measured has a median of 1.06 / 1.05 / 1.18 at 20 / 40 / 60% sparsity,
    0.81-1.28 for 80% of the blocks at 40%; block 0 at 80% is 0.12x, where masking is far from a small
    change). Curves are made non-decreasing and positive (the estimate is noisy) so `sensitivity_at` can
    interpolate them.
    """
    mods = projections(model)
    norms = {n: column_norms(m.weight).detach() for n, m in mods.items()}
    thresholds = {n: [_threshold_at(sorted_scores[n], s) for s in grid] for n in mods}
    acc = {n: [0.0] * len(grid) for n in mods}
    blocks: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(seed)
    n_pos = 0
    inputs: dict[str, torch.Tensor] = {}  # this prompt's continuation inputs and outputs (graph kept)
    outputs: dict[str, torch.Tensor] = {}
    first = [0]

    def make_hook(name: str) -> Any:
        def hook(_mod: torch.nn.Module, args: tuple, result: torch.Tensor) -> None:
            inputs[name] = args[0][0, first[0]:].detach()
            result.retain_grad()
            outputs[name] = result
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
    try:
        for prompt, full in zip(prompts, dense_full, strict=True):
            st, length = prompt.shape[1], full.shape[1]
            if length > st:
                first[0] = st
                with torch.enable_grad():
                    logp = torch.log_softmax(model(full.clone()).logits[0, st - 1 : length - 1], -1)
                n_pos += length - st
                _fisher_accumulate(logp, mods, norms, inputs, outputs, thresholds, samples, gen, acc, blocks)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)  # the weights' gradients were a by-product

    def curve(raw: list[float]) -> list[float]:
        out, top = [], 1e-12
        for v in raw:
            top = max(top, 0.5 * v / max(n_pos, 1))
            out.append(top)
        return out

    return {n: curve(c) for n, c in acc.items()}, {b: curve(c) for b, c in blocks.items()}


@torch.inference_mode()
def perplexity(model: Any, tok: Any, texts: list[str]) -> float:
    nll = n = 0.0
    for text in texts:
        ids = document_ids(tok, text)
        if ids.shape[1] < 2:
            continue
        loss = model(ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return math.exp(nll / n)


@torch.inference_mode()
def greedy_agreement(model: Any, prompts: list[torch.Tensor], dense_full: list[torch.Tensor],
                     first_position: list[int] | None = None) -> float:
    """Teacher-forced: fraction of the dense greedy continuation's tokens the masked model also picks. With
    `first_position` (the cell given to `wina_masking`), each prompt's tokens run dense, as the server does."""
    agree = total = 0
    for p, full in zip(prompts, dense_full, strict=True):
        n_new = full.shape[1] - p.shape[1]
        if n_new == 0:
            continue
        if first_position is not None:
            first_position[0] = p.shape[1]
        logits = model(full).logits[0, p.shape[1] - 1 : full.shape[1] - 1]
        agree += int((logits.argmax(-1) == full[0, p.shape[1]:]).sum())
        total += n_new
    return agree / max(total, 1)


def heldout_report(scores: dict[str, torch.Tensor], thresholds: dict[str, float],
                   sizes: dict[str, int]) -> dict[str, Any]:
    """Sparsity the thresholds give on held-out scores: per projection, their mean, and the mean weighted by
    weight size (`bytes`: the fraction of projection weight bytes a decode step skips)."""
    per = {n: measured_sparsity(scores[n], t) for n, t in thresholds.items()}
    vals = list(per.values())
    weighted = sum(v * sizes[n] for n, v in per.items()) / sum(sizes[n] for n in per)
    return {"mean": sum(vals) / len(vals), "bytes": weighted, "min": min(vals), "max": max(vals),
            "per_projection": per}


def main(argv: list[str] | None = None) -> int:
    from featurelens.server.model_assets import MODEL_NAME, resolve_model

    ap = argparse.ArgumentParser(prog="featurelens sparsity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder or a hub id")
    ap.add_argument("--out", default=None, help=f"the thresholds JSON (default model: {DEFAULT_THRESHOLDS}; "
                    "required for any other)")
    ap.add_argument("--texts", type=int, default=250, help="documents in all (20%% held out)")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--greedy", action="store_true", help="also compute TEAL-style greedy allocations")
    ap.add_argument("--layerwise", action="store_true",
                    help="also compute cross-layer allocations from per-layer sensitivity (KL to dense)")
    ap.add_argument("--projection", action="store_true",
                    help="also compute per-projection allocations across all blocks (Fisher estimate of the output KL)")
    ap.add_argument("--fisher-samples", type=int, default=8, help="backward passes per calibration prompt (--projection)")
    ap.add_argument("--calib-prompts", type=int, default=16,
                    help="chat prompts the layer/projection sensitivity is measured on")
    ap.add_argument("--serve", default="uniform", choices=("uniform", "greedy", "layerwise", "projection"),
                    help="the allocation written as the served `levels` table")
    ap.add_argument("--rotate", default="", help="comma-separated input groups masked in another basis (--basis) "
                    f"({', '.join(ROTATION_GROUPS)}; the shipped table: mlp)")
    ap.add_argument("--basis", default="fisher", choices=("pca", "fisher"),
                    help="the basis of --rotate's groups: the principal rotation of the input (pca), or that "
                         "rotation in the input's Fisher metric (fisher, the shipped table since 2026-12-06)")
    ap.add_argument("--basis-samples", type=int, default=2,
                    help="sampled labels (backward passes) per rotation sequence for --basis fisher")
    ap.add_argument("--basis-dtype", default="float16", choices=("float16", "int8"),
                    help="how the bases are stored: int8 rows with per-row scales halve the engine's x T reads "
                         "(thresholds are then calibrated in the rounded basis)")
    ap.add_argument("--calibration", default="chat", choices=("chat", "documents"),
                    help="what rotations and thresholds are calibrated on: the dense model's greedy continuations of "
                         "chat prompts at their generated positions (what a sparse request masks; the default), or "
                         "corpus documents (the shipped tables until 2026-12-06)")
    ap.add_argument("--rotation-prompts", type=int, default=300, help="chat prompts whose continuations give the "
                    "rotations (--calibration chat)")
    ap.add_argument("--threshold-prompts", type=int, default=150, help="other chat prompts whose continuations give "
                    "the thresholds (--calibration chat): a basis fitted on the same tokens underestimates its own "
                    "tail and the thresholds would undershoot on new text")
    ap.add_argument("--heldout-prompts", type=int, default=60, help="chat prompts for the held-out sparsity report")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: results do not depend on the box)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.serve != "uniform" and not getattr(args, args.serve):
        ap.error(f"--serve {args.serve} needs --{args.serve}")
    groups = [g for g in args.rotate.split(",") if g]
    if set(groups) - set(ROTATION_GROUPS):
        ap.error(f"--rotate: unknown groups {sorted(set(groups) - set(ROTATION_GROUPS))}; known: {sorted(ROTATION_GROUPS)}")
    default_model = args.model.lower() in ("default", "smollm2", "")
    if args.out is None:
        if not default_model:
            ap.error("--model needs --out: the shipped table is the default model's")
        args.out = str(DEFAULT_THRESHOLDS)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    model_path = args.model if Path(args.model).is_dir() else str(resolve_model(args.model))
    try:
        model, tok = load_model(model_path)
    except ValueError as error:  # a family sparse mode cannot run on, or a layout the adapter does not know
        ap.error(str(error))
    layout = layout_of(model)
    print(f"{type(model).__name__} ({layout.family.name} family): {len(layout.layers)} blocks, projections "
          f"{', '.join(layout.paths)}", flush=True)
    calib, held = corpus_texts(args.seed, args.texts)
    print(f"{len(calib)} calibration / {len(held)} held-out documents", flush=True)
    dense_model = model  # dense references (continuations, perplexity) come from the model as shipped
    # Evaluation prompts first; every other prompt set is drawn apart from them and from each other.
    prompts = chat_prompts(tok, args.prompts, args.seed + 2)
    seen = {tuple(p[0].tolist()) for p in prompts}
    if args.calibration == "chat":
        def chat_set(n: int, seed: int) -> list[Sequence]:
            return chat_continuations(dense_model, tok, fresh_chat_prompts(tok, n, seed, seen), args.new_tokens)

        rotation_seqs = chat_set(args.rotation_prompts, args.seed + 5)
        threshold_seqs = chat_set(args.threshold_prompts, args.seed + 6)
        heldout_seqs = chat_set(args.heldout_prompts, args.seed + 7)
        print(f"chat continuations: {len(rotation_seqs)} / {len(threshold_seqs)} / {len(heldout_seqs)} "
              f"(rotations / thresholds / held-out) ({time.time() - t0:.0f} s)", flush=True)
    else:
        rotation_seqs = threshold_seqs = documents(tok, calib)
        heldout_seqs = documents(tok, held)
    rotation: dict[str, Any] | None = None
    if groups:
        from safetensors.torch import save_file

        rotations = input_rotations(model, rotation_seqs, groups, args.basis, args.basis_samples, args.seed)
        rot_path = Path(args.out).with_name(Path(args.out).stem + "-rotation.safetensors")
        rot_path.parent.mkdir(parents=True, exist_ok=True)
        if args.basis_dtype == "int8":
            # Rounded before anything else reads them: thresholds, allocation and weights are those of T~.
            stored = quantize_rotations(rotations)
            rotations = {k: stored[k].float() * stored[f"{k}.scale"][:, None] for k in rotations}
        else:
            stored = {k: v.to(torch.float16).contiguous() for k, v in rotations.items()}
        save_file(stored, str(rot_path))
        model = rotate_model(copy.deepcopy(model), rotations)
        text = "generated tokens of chat continuations" if args.calibration == "chat" else "calibration documents"
        rotation = {"file": rot_path.name, "groups": groups, "dtype": args.basis_dtype, "kind": args.basis,
                    "basis": ("per block: eigenvectors of the group's input second moment on the " + text
                              if args.basis == "pca" else
                              "per block: T = L P, L the square root of the group's input Fisher matrix "
                              f"({args.basis_samples} sampled labels per sequence) and P the eigenvectors of "
                              "L E[x xᵀ] L, both on the " + text)}
        print(f"rotations of {groups} computed ({time.time() - t0:.0f} s)", flush=True)
    scores = _sorted_samples(collect_scores(model, threshold_seqs, seed=args.seed))
    held_scores = collect_scores(model, heldout_seqs, seed=args.seed + 1)
    held_doc_scores = collect_scores(model, documents(tok, held), seed=args.seed + 1) \
        if args.calibration == "chat" else held_scores
    sizes = {n: m.weight.numel() for n, m in projections(model).items()}
    print(f"scores collected ({time.time() - t0:.0f} s)", flush=True)

    calibration: dict[str, Any] = {"text": args.calibration, "texts": args.texts, "documents": len(calib),
                                   "heldout_documents": len(held), "max_tokens_per_document": MAX_TOKENS,
                                   "seed": args.seed, "prompts": args.prompts, "torch_threads": args.threads}
    if args.calibration == "chat":
        calibration.update(rotation_prompts=len(rotation_seqs), threshold_prompts=len(threshold_seqs),
                           heldout_prompts=len(heldout_seqs), new_tokens=args.new_tokens,
                           positions="generated tokens only (the prompt runs dense, as served)")
    name = MODEL_NAME if default_model else Path(model_path).name
    out: dict[str, Any] = {"model": name, "criterion": "wina", "calibration": calibration,
                           "levels_uniform": {}, "heldout_sparsity_uniform": {}}
    if rotation:
        out["rotation"] = rotation
    for level in LEVELS:
        thr = {n: _threshold_at(s, int(level) / 100) for n, s in scores.items()}
        out["levels_uniform"][level] = thr
        out["heldout_sparsity_uniform"][level] = heldout_report(held_scores, thr, sizes)

    def write() -> None:
        """The file as it stands: the --serve allocation once computed (uniform until then) is the served
        `levels` table; every other allocation keeps its `levels_<name>` key."""
        served = args.serve if f"levels_{args.serve}" in out else "uniform"
        doc = {"model": out["model"], "criterion": out["criterion"], "allocation": served,
               "calibration": out["calibration"], "levels": out[f"levels_{served}"],
               "heldout_sparsity": out[f"heldout_sparsity_{served}"],
               # the same thresholds on held-out documents: how far the level moves on other text
               "heldout_sparsity_documents": {lv: heldout_report(held_doc_scores, t, sizes)
                                              for lv, t in out[f"levels_{served}"].items()}}
        doc.update((k, v) for k, v in out.items()
                   if k not in doc and k not in (f"levels_{served}", f"heldout_sparsity_{served}"))
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write()  # thresholds first: quality checks below only add to the file

    dense_full = dense_continuations(dense_model, prompts, args.new_tokens)
    quality: dict[str, Any] = {"dense": {"heldout_ppl": perplexity(dense_model, tok, held)}}
    out["quality"] = {"prompts": len(prompts), "new_tokens": args.new_tokens, "heldout_tokens_per_doc": MAX_TOKENS,
                      "agreement": "teacher-forced top-1 match with the dense greedy continuation", **quality}

    def evaluate(name: str, table: dict[str, dict[str, float]]) -> None:
        for level, thr in table.items():
            first = [0]
            with wina_masking(model, thr, first):
                q = {"heldout_ppl": perplexity(model, tok, held),
                     "greedy_agreement": greedy_agreement(model, prompts, dense_full),
                     "greedy_agreement_dense_prompt": greedy_agreement(model, prompts, dense_full, first)}
            q["ppl_ratio"] = q["heldout_ppl"] / quality["dense"]["heldout_ppl"]
            out["quality"][f"{name}-{level}"] = q
            print(name, level, {k: round(v, 4) for k, v in q.items()}, f"({time.time() - t0:.0f} s)", flush=True)
            write()

    def add_allocation(name: str, sparsities: dict[str, dict[str, float]]) -> None:
        """Thresholds, held-out sparsity and quality of an allocation (level -> projection -> sparsity)."""
        out[f"levels_{name}"] = {lv: {n: _threshold_at(scores[n], sp) for n, sp in table.items()}
                                 for lv, table in sparsities.items()}
        out[f"heldout_sparsity_{name}"] = {lv: heldout_report(held_scores, t, sizes)
                                           for lv, t in out[f"levels_{name}"].items()}
        write()
        print(f"{name} done ({time.time() - t0:.0f} s)", flush=True)
        evaluate(name, out[f"levels_{name}"])

    evaluate("uniform", out["levels_uniform"])
    if args.greedy:
        alloc = greedy_levels(model, tok, calib, scores, [int(lv) / 100 for lv in LEVELS])
        out["greedy_sparsities"] = {lv: alloc[int(lv) / 100] for lv in LEVELS}
        add_allocation("greedy", out["greedy_sparsities"])
    if args.layerwise or args.projection:
        cal_prompts = fresh_chat_prompts(tok, args.calib_prompts, args.seed + 3, seen)
        cal_full = dense_continuations(dense_model, cal_prompts, args.new_tokens)
    if args.projection:
        grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
        curves, block_curves = projection_sensitivity(model, cal_prompts, cal_full, scores, grid,
                                                      samples=args.fisher_samples, seed=args.seed)
        per_proj = curve_levels(curves, grid, [int(lv) / 100 for lv in LEVELS], sizes=sizes)
        out["projection_sensitivity"] = {"grid": grid, "prompts": len(cal_prompts), "new_tokens": args.new_tokens,
                                         "samples": args.fisher_samples, "kl": curves, "block_kl": block_curves}
        out["projection_sparsities"] = {lv: per_proj[int(lv) / 100] for lv in LEVELS}
        add_allocation("projection", out["projection_sparsities"])
    if args.layerwise:
        grid = [0.2, 0.4, 0.6, 0.8]
        curves = layer_sensitivity(model, cal_prompts, cal_full, scores, grid)
        per_layer = curve_levels(curves, grid, [int(lv) / 100 for lv in LEVELS])
        out["layer_sensitivity"] = {"grid": grid, "prompts": len(cal_prompts), "new_tokens": args.new_tokens,
                                    "kl": curves}
        out["layer_sparsities"] = {lv: per_layer[int(lv) / 100] for lv in LEVELS}
        add_allocation("layerwise", {lv: {n: layers[n.split(".")[0]] for n in scores}
                                     for lv, layers in out["layer_sparsities"].items()})
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
