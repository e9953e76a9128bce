"""Fitting WINA sparsity tables offline: thresholds from calibration scores (uniform, greedy, per-block and
per-projection allocations), and the input bases (principal and Fisher) with their int8 storage. The serving
side (masking, loading the shipped tables and bases) is featurelens.server.modes.sparsity.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch

MAX_QUANTILE_SAMPLES = 1 << 22  # sort cost bound; 4M samples put the quantile within ~0.05 points


def _subsample(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flat = scores.detach().flatten().float()
    if flat.numel() > MAX_QUANTILE_SAMPLES:
        pick = torch.randint(flat.numel(), (MAX_QUANTILE_SAMPLES,), generator=generator, device=flat.device)
        flat = flat[pick]
    return flat


def quantile_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """Threshold t such that a fraction `sparsity` of `scores` lies strictly below t.

    t is the smallest score at or above the quantile, so masking `score >= t` zeroes exactly the scores
    below it (ties at t are kept, which errs on the side of quality).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = _subsample(scores)
    if flat.numel() == 0:
        raise ValueError("no calibration scores")
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return 0.0
    return float(flat.sort().values[k].item()) if k < flat.numel() else float("inf")


def calibrate_thresholds(scores_by_proj: Mapping[str, torch.Tensor], target_sparsity: float) -> dict[str, float]:
    """Uniform allocation: per projection, the score quantile that zeroes `target_sparsity` of its inputs.

    Args:
        scores_by_proj: "<layer>.<proj>" -> sampled WINA scores (any shape) from calibration text.
        target_sparsity: fraction in [0, 1), e.g. 0.4.
    """
    return {name: quantile_threshold(s, target_sparsity) for name, s in scores_by_proj.items()}


def measured_sparsity(scores: torch.Tensor, threshold: float) -> float:
    """Fraction of inputs a threshold zeroes (scores of exactly-zero inputs count as zeroed)."""
    flat = scores.detach().flatten()
    return float(((flat < threshold) | (flat == 0)).float().mean().item())


def greedy_allocation(
    proj_sizes: Mapping[str, int],
    block_error: Callable[[dict[str, float]], float],
    target_sparsity: float,
    step: float = 0.05,
    max_sparsity: float = 0.95,
    start: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """TEAL-style greedy per-projection sparsities for ONE block.

    Starting from all-dense, each round tries raising every projection's sparsity by `step`, keeps the one
    whose increase gives the smallest `block_error`, and stops when the parameter-weighted mean sparsity
    (weights = `proj_sizes`, e.g. weight numel: bytes read is what decode time follows) reaches the target.
    `block_error(sparsities)` is measured by the caller on calibration activations (e.g. relative MSE of the
    block's output against dense). The last step is shrunk so the mean lands on the target exactly.
    `start` continues a previous allocation (25% -> 40% -> 50% reuses the path, as TEAL does).
    """
    if not 0.0 <= target_sparsity <= max_sparsity:
        raise ValueError(f"target sparsity must be in [0, {max_sparsity}], got {target_sparsity}")
    total = float(sum(proj_sizes.values()))
    levels = {name: float((start or {}).get(name, 0.0)) for name in proj_sizes}

    def mean(lv: Mapping[str, float]) -> float:
        return sum(lv[n] * proj_sizes[n] for n in lv) / total

    while mean(levels) < target_sparsity - 1e-9:
        best: tuple[float, str, float] | None = None
        for name in proj_sizes:
            if levels[name] >= max_sparsity - 1e-9:
                continue
            # Never overshoot: the increment that would land the mean exactly on the target, if smaller.
            room = (target_sparsity - mean(levels)) * total / proj_sizes[name]
            inc = min(step, max_sparsity - levels[name], room)
            err = block_error({**levels, name: levels[name] + inc})
            if best is None or err < best[0]:
                best = (err, name, inc)
        if best is None:
            break
        levels[best[1]] += best[2]
    return levels


def sensitivity_at(curve: Sequence[float], grid: Sequence[float], sparsity: float) -> float:
    """A layer's error at `sparsity` from its measured `curve` on `grid`: a power law between neighbouring grid
    points (straight in log-log), the first segment's law below the first point, 0 at sparsity 0.

    A power law, not a straight line, because measured errors grow ~s^3..s^5: straight segments make every
    step inside a segment cost the same, and an allocation built on them snaps to grid points.
    """
    if sparsity <= 0.0:
        return 0.0
    logs = [math.log(float(g)) for g in grid]
    logv = [math.log(max(float(v), 1e-12)) for v in curve]
    x = math.log(sparsity)
    j = next((k for k in range(1, len(logs)) if x <= logs[k]), len(logs) - 1) if len(logs) > 1 else 0
    if j == 0:
        return math.exp(logv[0])
    slope = (logv[j] - logv[j - 1]) / (logs[j] - logs[j - 1])
    return math.exp(logv[j] + slope * (x - logs[j]))


def curve_allocation(
    curves: Mapping[str, Sequence[float]],
    grid: Sequence[float],
    target_sparsity: float,
    step: float = 0.05,
    start: Mapping[str, float] | None = None,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Sparsities for many units (blocks, or single projections) from their sensitivity curves.

    `curves[unit][j]` is the error measured with only that unit masked at sparsity `grid[j]`; between and
    below grid points `sensitivity_at` interpolates, beyond the last point no unit goes. Treating the errors
    as additive, each round raises by `step` the unit whose next step adds the least error per parameter
    skipped (`sizes`, weight numel; all 1 when None) until the size-weighted mean sparsity reaches the target
    (the last step shrunk to land on it): for convex curves that is the allocation with the smallest summed
    error. A heap of next-step costs keeps this cheap: 210 projections to 40% take 0.04 s, where re-summing
    every curve for every candidate (`greedy_allocation`'s way, fine for a block's seven projections) took
    over two minutes (measured). Over blocks with equal sizes it gives `greedy_allocation`'s result.
    """
    if not grid or any(b <= a for a, b in itertools.pairwise([0.0, *grid])):
        raise ValueError(f"grid must be increasing and above 0, got {list(grid)}")
    for unit, c in curves.items():
        if len(c) != len(grid):
            raise ValueError(f"curve of {unit} has {len(c)} points for a grid of {len(grid)}")
    top = float(grid[-1])
    if not 0.0 <= target_sparsity <= top:
        raise ValueError(f"target sparsity must be in [0, {top}], got {target_sparsity}")
    size = {u: float(sizes[u]) if sizes else 1.0 for u in curves}
    total = sum(size.values())
    levels = {u: float((start or {}).get(u, 0.0)) for u in curves}
    mean = sum(levels[u] * size[u] for u in curves) / total

    def next_cost(u: str) -> float:
        inc = min(step, top - levels[u])
        gain = sensitivity_at(curves[u], grid, levels[u] + inc) - sensitivity_at(curves[u], grid, levels[u])
        return gain / (inc * size[u])

    heap = [(next_cost(u), u) for u in curves if levels[u] < top - 1e-9]
    heapq.heapify(heap)
    while mean < target_sparsity - 1e-9 and heap:
        _, u = heapq.heappop(heap)
        inc = min(step, top - levels[u], (target_sparsity - mean) * total / size[u])
        levels[u] += inc
        mean += inc * size[u] / total
        if levels[u] < top - 1e-9:
            heapq.heappush(heap, (next_cost(u), u))
    return levels


def thresholds_for_sparsities(scores_by_proj: Mapping[str, torch.Tensor], sparsities: Mapping[str, float]) -> dict[str, float]:
    """Per-projection thresholds for per-projection target sparsities (the greedy allocation's output)."""
    return {name: quantile_threshold(scores_by_proj[name], sparsities[name]) for name in sparsities}


def principal_rotation(second_moment: torch.Tensor) -> torch.Tensor:
    """Q [in, in] float32 from E[x xᵀ] [in, in]: its eigenvectors as columns, largest eigenvalue first, rounded
    to float16 (the shipped precision, so calibration and engine use the same matrix; Q Qᵀ = I within ~1e-3,
    below bf16's rounding of the activations)."""
    _, vectors = torch.linalg.eigh(second_moment.double())
    return vectors.flip(-1).to(torch.float16).float()


def fisher_basis(fisher: torch.Tensor, second_moment: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """T [in, in] float32 (float16-rounded, as shipped) from F = E[g gᵀ] (g: gradient of the sampled label's
    log-likelihood with respect to the input, summed over the projections that read it) and E[x xᵀ].

    Zeroing a change e of the input costs about ½ eᵀ F e of next-token KL. With F = L L (L its symmetric
    square root, `ridge` x its mean diagonal added so L is invertible) and P the eigenvectors of L E[x xᵀ] L
    (largest first), the coordinates x' = x T, T = L P, have that cost exactly ½ Σ x'_i² over the zeroed i:
    in this basis the cheapest inputs to zero are the smallest, and the principal part of P puts the input's
    (Fisher-weighted) energy in few coordinates. T is not orthogonal: the projection's weight in this basis is
    W T⁻ᵀ (`basis_weight`) and a masked x' maps back as x' T⁻¹. Scale: F is divided by its mean diagonal."""
    f = fisher.double()
    f = f / f.diagonal().mean()
    f = f + ridge * torch.eye(f.shape[0], dtype=f.dtype)
    values, vectors = torch.linalg.eigh(f)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    _, p = torch.linalg.eigh(root @ second_moment.double() @ root)
    return (root @ p.flip(-1)).to(torch.float16).float()


def quantize_rotations(rotations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an int8 rotation file: every basis T as int8 rows with one float32 scale per row
    (symmetric, round to nearest: `int8_gemm.quantize_weight`). Everything that reads the file
    (`load_rotations`) then uses the rounded basis T~ = q * scale, so the weights W T~^-T, the column norms and
    the mask path stay consistent with what the engine's int8 walk computes. The rounded basis costs little
    greedy agreement; weights still built for the exact T would cost several points, because T's condition
    number amplifies the ~1.3% rounding (figures in docs/measurements/)."""
    from featurelens.kernels.int8_gemm import quantize_weight

    out: dict[str, torch.Tensor] = {}
    for key, t in rotations.items():
        q, scale = quantize_weight(t.float())
        out[key], out[f"{key}.scale"] = q.contiguous(), scale.float().contiguous()
    return out
