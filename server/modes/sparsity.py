"""WINA activation sparsity: which inputs of a linear layer to zero, and the calibrated thresholds to do it.

For a linear layer y = W x with W [out, in], WINA (Chen et al., 2025) scores input i by |x_i| * ||W[:, i]||_2:
the size of the change zeroing x_i makes to y, up to the direction of column i. Inputs scoring below a
per-layer, per-projection threshold are zeroed. With the threshold chosen as a quantile of the scores seen on
a calibration corpus, the expected fraction of zeroed inputs is the target sparsity (TEAL's recipe, with
WINA's score instead of |x_i|).

Thresholds ship as JSON (`load_thresholds`), keyed "<layer>.<proj>" with proj in PROJECTIONS, one table per
sparsity level ("25", "40", "50"). Four ways to reach a level:
- uniform (`calibrate_thresholds`): every projection at the target sparsity;
- greedy (`greedy_allocation`, TEAL-style): per block, repeatedly raise the sparsity of the projection whose
  increase hurts the block output least, until the parameter-weighted mean reaches the target;
- layerwise (`curve_allocation` over blocks): each block's projections at one sparsity, chosen from per-block
  sensitivity curves (the model's output KL with only that block masked) so that the mean reaches the target
  where it costs least;
- projection (`curve_allocation` over all projections, weighted by size): each projection at its own
  sparsity, from per-projection sensitivity curves (a Fisher estimate of the output KL, see
  offline.sparsity.calibrate.projection_sensitivity).

Inputs in another basis (optional, named by the thresholds file's "rotation" entry): the projections of a
group (the MLP's gate/up, which share one input; or attention's q/k/v) read x' = x T_l instead of x, with
T_l [in, in] invertible and the weight W' = W T_l⁻ᵀ (`basis_weight`), so W' x' = W x exactly; WINA then scores
and zeroes the inputs x'_i with W''s column norms. Two bases:
- "pca" (`principal_rotation`): T orthogonal, the eigenvectors of the input's second moment E[x xᵀ] in block l,
  largest first. It puts most of the input's energy in few coordinates, so zeroing the same fraction of them
  removes less of it (the idea of LaRoSa's layerwise rotations; here per block, with WINA's score).
- "fisher" (`fisher_basis`, the shipped table's basis): T = L P with L the square root of the input's
  Fisher matrix, so that the estimated KL of zeroing coordinates is the sum of their squares, and P the
  principal rotation of the input in that metric.

Masking is exact: an input is kept iff x_i != 0 and score_i >= threshold. The sparse GEMV kernels
(featurelens.kernels.sparse_gemv) apply the same test, so masking then dense matmul == the sparse kernel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from featurelens.server.paths import ASSETS_DIR

# Projections of a Llama-style decoder block and the module path of each under `model.layers[i]`.
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
LEVELS = ("25", "40", "50")
ASSETS = ASSETS_DIR / "sparsity"
DEFAULT_THRESHOLDS = ASSETS / "smollm2-135m-wina.json"
# Projections that can share one input rotation: each group reads one tensor in a Llama block.
ROTATION_GROUPS: dict[str, tuple[str, ...]] = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
PROJECTION_GROUP = {p: g for g, projs in ROTATION_GROUPS.items() for p in projs}


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for W [out, in] (an nn.Linear weight) -> [in] float32."""
    return weight.detach().float().norm(dim=0)


def wina_scores(x: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|x_i| * ||W[:, i]||, float32, broadcast over leading dims of x [..., in]."""
    return x.float().abs() * col_norms


def wina_mask(x: torch.Tensor, col_norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean keep-mask, shape of x: True where x_i != 0 and |x_i| * ||W[:, i]|| >= threshold."""
    return (x != 0) & (wina_scores(x, col_norms) >= threshold)


def wina_sparsify(x: torch.Tensor, col_norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with the inputs below the WINA threshold set to zero (same dtype and shape)."""
    return torch.where(wina_mask(x, col_norms, threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))


@lru_cache(maxsize=4)
def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_thresholds(level: str | int, path: str | Path = DEFAULT_THRESHOLDS, allocation: str | None = None) -> dict[str, float]:
    """"<layer>.<proj>" -> threshold for a shipped level ("25" | "40" | "50"); KeyError names what exists.

    allocation: None for the served table (`levels`, the one the engine loads; the file's "allocation" names
    it), or "uniform" / "greedy" / "layerwise" for `levels_<name>` when the file has it.
    """
    data = _read(str(path))
    if allocation is None or (allocation == data.get("allocation", "uniform") and "levels" in data):
        table = data["levels"]
    else:
        table = data.get(f"levels_{allocation}", {})
    key = str(level)
    if key not in table:
        raise KeyError(f"no {allocation or 'served'} sparsity level {key!r} in {path}; available: {sorted(table)}")
    return dict(table[key])


def available_levels(path: str | Path = DEFAULT_THRESHOLDS) -> list[str]:
    return sorted(_read(str(path))["levels"], key=int)


def basis_inverse(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T⁻¹ [in, in] in `dtype` (inverted in float64): x = x' T⁻¹ maps coordinates in the basis back."""
    return torch.linalg.inv(t.double()).to(dtype)


def basis_weight(weight: torch.Tensor, t: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """[out, in] float32 weight that reads x' = x T: W T⁻ᵀ, so (x T)(W T⁻ᵀ)ᵀ = x Wᵀ. For an orthogonal T
    this is W T (up to T's float16 rounding, which the inverse undoes exactly). `inverse`: T⁻¹ in float64
    when the caller already has it (`basis_inverse(t, torch.float64)`), else it is computed here."""
    inv = basis_inverse(t, torch.float64) if inverse is None else inverse
    return (weight.double() @ inv.T).float()


def load_rotation_file(path: str | Path = DEFAULT_THRESHOLDS
                       ) -> tuple[dict[str, torch.Tensor] | None, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The thresholds file's bases in one read: ("<layer>.<group>" -> T [in, in] float32, or None without a
    rotation file; "<layer>.<group>" -> (q int8 [in, in], scale float32 [in]) for the bases stored in int8).

    The file's "rotation" entry: {"file": safetensors name beside the JSON, "groups": [...]}; the tensors are
    keyed "<layer>.<group>" with group in ROTATION_GROUPS, float (float16) or int8 with a per-row
    "<layer>.<group>.scale" (`quantize_rotations`): then T = q * scale[:, None], the rounded basis every
    consumer reads, and the engine's fast path walks q directly.
    """
    entry = _read(str(path)).get("rotation")
    if not entry:
        return None, {}
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path).parent / entry["file"]))
    bases = {k: v for k, v in tensors.items() if not k.endswith(".scale")}
    unknown = {k.split(".", 1)[-1] for k in bases} - set(ROTATION_GROUPS)
    if unknown:
        raise ValueError(f"{entry['file']}: unknown rotation groups {sorted(unknown)}; known: {sorted(ROTATION_GROUPS)}")
    out: dict[str, torch.Tensor] = {}
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, t in bases.items():
        if t.dtype == torch.int8:
            scale = tensors.get(f"{key}.scale")
            if scale is None or scale.shape != (t.shape[0],):
                raise ValueError(f"{entry['file']}: int8 basis {key} needs a [{t.shape[0]}] '{key}.scale' tensor")
            int8[key] = (t.contiguous(), scale.float().contiguous())
            out[key] = t.float() * int8[key][1][:, None]
        else:
            out[key] = t.float()
    return out, int8


def load_rotations(path: str | Path = DEFAULT_THRESHOLDS) -> dict[str, torch.Tensor] | None:
    """"<layer>.<group>" -> T [in, in] float32 when the thresholds file names a rotation file, else None
    (`load_rotation_file`)."""
    return load_rotation_file(path)[0]


def load_rotations_int8(path: str | Path = DEFAULT_THRESHOLDS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """"<layer>.<group>" -> (q int8, scale float32) for the bases the rotation file stores in int8; {} for float
    bases or no rotation (`load_rotation_file`)."""
    return load_rotation_file(path)[1]


_Basis = TypeVar("_Basis")  # a basis as stored: T (a tensor), or its int8 rows and scales


def rotation_of(rotations: Mapping[str, _Basis] | None, layer: int, proj: str) -> _Basis | None:
    """The input rotation of projection `proj` in block `layer`, or None (its inputs are not rotated)."""
    if not rotations or proj not in PROJECTION_GROUP:
        return None
    return rotations.get(f"{layer}.{PROJECTION_GROUP[proj]}")
