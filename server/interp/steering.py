"""Steering: API-side validation into plain-data specs, and the worker-side math that edits residual rows.

A spec is a dict of numbers and short strings (it rides in SamplingParams.extra_args); nothing executable
crosses into the worker. Ops, for a feature f with decoder row d_f = W_dec[f] and current activation a_f:

    NUDGE   x += s · d_f / ‖d_f‖          (s in units of residual-stream norm)
    PIN     x += (s − a_f) · d_f          (the feature then reads ≈ s)
    SCALE   x += (s − 1) · a_f · d_f
    ABLATE  x −= a_f · d_f
    ADD     x += s · v                    (v a registered raw vector)

Activations a_f come from encoding the unedited rows once; several interventions add up. With
`preserve_norm` the edited rows are rescaled back to their original L2 norm.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NotRequired, TypedDict

import grpc
import torch
from featurelens.server.validation import ApiError, invalid
from featurelens.v1 import featurelens_pb2 as pb

if TYPE_CHECKING:
    from featurelens.server.interp.registry import SaeEntry
    from featurelens.server.interp.sae import Sae

OPS = {pb.STEERING_OP_NUDGE: "nudge", pb.STEERING_OP_PIN: "pin", pb.STEERING_OP_SCALE: "scale",
       pb.STEERING_OP_ABLATE: "ablate", pb.STEERING_OP_ADD: "add"}
POSITIONS = {pb.TOKEN_POSITIONS_UNSPECIFIED: "all", pb.TOKEN_POSITIONS_ALL: "all",
             pb.TOKEN_POSITIONS_PROMPT: "prompt", pb.TOKEN_POSITIONS_GENERATED: "generated"}
VECTOR_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class SteeringSpec(TypedDict):
    """One validated intervention as it rides to the worker in `extra_args` (plain data only)."""

    layer: int
    op: str  # "nudge" | "pin" | "scale" | "ablate" | "add"
    strength: float
    positions: str  # "all" | "prompt" | "generated"
    norm: bool  # preserve_norm
    feature: NotRequired[int]  # every op but "add"
    vector: NotRequired[str]  # "add": a registered vector id
    cond: NotRequired[list[int | float]]  # [feature_id, threshold]: only rows where that feature is above it


def parse_interventions(interventions: Sequence[pb.SteeringIntervention], *, num_layers: int,
                        saes: Mapping[int, SaeEntry], vectors: Mapping[str, int],
                        max_interventions: int, max_strength: float) -> list[SteeringSpec]:
    """Repeated SteeringIntervention → list of plain specs, or ApiError naming the field.

    `saes` maps layer → its SAE entry (`sae_id`, `d_sae`); `vectors` maps registered vector id → its length.
    """
    if len(interventions) > max_interventions:
        raise invalid("steering", f"at most {max_interventions} interventions allowed, got {len(interventions)}")
    specs = []
    for i, item in enumerate(interventions):
        where = f"steering[{i}]"
        if item.op not in OPS:
            raise invalid(f"{where}.op", "must be one of NUDGE, PIN, SCALE, ABLATE, ADD")
        op = OPS[item.op]
        if not 0 <= item.layer < num_layers:
            raise invalid(f"{where}.layer", f"must be in [0, {num_layers - 1}], got {item.layer}")
        if not math.isfinite(item.strength):
            raise invalid(f"{where}.strength", f"must be a finite number, got {item.strength}")
        if abs(item.strength) > max_strength:
            raise invalid(f"{where}.strength", f"|strength| must be <= {max_strength:g}, got {item.strength:g}")
        if item.positions not in POSITIONS:
            raise invalid(f"{where}.positions", f"unknown value {item.positions}")
        spec: SteeringSpec = {"layer": item.layer, "op": op, "strength": float(item.strength),
                                "positions": POSITIONS[item.positions], "norm": bool(item.preserve_norm)}
        target = item.WhichOneof("target")
        sae = saes.get(item.layer)
        if op == "add":
            if target != "vector_id":
                raise invalid(f"{where}.vector_id", "ADD needs a registered vector_id")
            if item.vector_id not in vectors:
                raise invalid(f"{where}.vector_id", f"no registered vector {item.vector_id!r} "
                                                    "(RegisterSteeringVector first)")
            spec["vector"] = item.vector_id
        else:
            if target != "feature_id":
                raise invalid(f"{where}.feature_id", f"{op.upper()} needs a feature_id")
            if sae is None:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{where}.layer: no SAE is loaded at layer {item.layer}; "
                               f"layers with SAEs: {sorted(saes)}")
            if item.sae_id and item.sae_id != sae.sae_id:
                raise invalid(f"{where}.sae_id", f"unknown SAE {item.sae_id!r} at layer {item.layer}")
            if item.feature_id >= sae.d_sae:
                raise invalid(f"{where}.feature_id", f"must be < d_sae {sae.d_sae}, got {item.feature_id}")
            spec["feature"] = int(item.feature_id)
        if item.HasField("condition"):
            if sae is None:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{where}.condition: needs an SAE at layer {item.layer}")
            if item.condition.feature_id >= sae.d_sae:
                raise invalid(f"{where}.condition.feature_id",
                              f"must be < d_sae {sae.d_sae}, got {item.condition.feature_id}")
            if not math.isfinite(item.condition.threshold):
                raise invalid(f"{where}.condition.threshold", "must be a finite number")
            spec["cond"] = [int(item.condition.feature_id), float(item.condition.threshold)]
        specs.append(spec)
    return specs


def parse_vector(vector_id: str, values: Sequence[float], hidden_size: int) -> torch.Tensor:
    if not VECTOR_ID.match(vector_id):
        raise invalid("vector_id", "must match [a-z0-9][a-z0-9._-]{0,62}")
    if len(values) != hidden_size:
        raise invalid("values", f"length must equal the model hidden size {hidden_size}, got {len(values)}")
    vector = torch.tensor(list(values), dtype=torch.float32)
    if not torch.isfinite(vector).all():
        raise invalid("values", "must all be finite numbers")
    return vector


def row_mask(positions: torch.Tensor, num_prompt_tokens: int | torch.Tensor, where: str) -> torch.Tensor:
    """Rows at the chosen positions. `num_prompt_tokens` is one int, or one per row when the rows of several
    requests are steered together."""
    if where == "prompt":
        return positions < num_prompt_tokens
    if where == "generated":
        return positions >= num_prompt_tokens
    return torch.ones_like(positions, dtype=torch.bool)


@torch.no_grad()
def steering_delta(x: torch.Tensor, positions: torch.Tensor, num_prompt_tokens: int | torch.Tensor,
                   specs: list[SteeringSpec], sae: Sae | None, vectors: Mapping[str, torch.Tensor]
                   ) -> torch.Tensor:
    """The float32 change to residual rows `x` [n, d] that share one steering list at one layer (zero on rows
    no spec touches; computed without a host-device sync). `positions` [n] are the rows' token positions and `num_prompt_tokens` their request's
    prompt length (an int, or an [n] tensor when rows of several requests with the same list are stacked);
    `sae` is this layer's SAE (or None). Each row's change depends on that row alone."""
    x32 = x.float()
    delta = torch.zeros_like(x32)
    codes = None
    # Only PIN/SCALE/ABLATE and conditions read current activations; NUDGE and ADD skip the SAE encode.
    if sae is not None and any(s["op"] in ("pin", "scale", "ablate") or "cond" in s for s in specs):
        codes = sae.encode(x).float()
    keep_norm = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for spec in specs:
        mask = row_mask(positions, num_prompt_tokens, spec["positions"])
        if "cond" in spec:
            assert codes is not None, "a steering condition needs the layer's SAE"  # parse_interventions checks
            feature, threshold = spec["cond"]
            mask = mask & (codes[:, int(feature)] > threshold)
        # No test of the mask on the host (that would wait for the device): a spec whose rows are all masked
        # out adds zeros.
        s = spec["strength"]
        if spec["op"] == "add":
            change = s * vectors[spec["vector"]].to(x32).expand_as(x32)
        else:
            assert sae is not None, f"{spec['op']} needs the layer's SAE"  # parse_interventions checks
            f = spec["feature"]
            direction = sae.W_dec[f].float()
            if spec["op"] == "nudge":
                change = (s / direction.norm().clamp_min(1e-12)) * direction.expand_as(x32)
            else:
                assert codes is not None  # encoded above for pin, scale and ablate
                a_f = codes[:, f:f + 1]
                if spec["op"] == "pin":
                    change = (s - a_f) * direction
                elif spec["op"] == "scale":
                    change = (s - 1.0) * a_f * direction
                else:  # ablate
                    change = -a_f * direction
        delta += change * mask[:, None]
        if spec["norm"]:
            keep_norm |= mask
    if any(spec["norm"] for spec in specs):
        edited = x32 + delta
        scale = x32.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        delta = torch.where(keep_norm[:, None], edited * scale - x32, delta)
    return delta
