"""The SAEs a server runs with: parsed from `--sae LAYER=PATH` (or just PATH: the layer comes from the SAE's
hook name), described to the frontend by their config alone (any format `sae.detect_format` reads); the
weights load inside the worker."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from featurelens.server.interp.sae import (
    SaeConfig,
    detect_format,
    hook_name_to_layer,
    read_sae_config,
    sae_files,
)


@dataclass(frozen=True)
class SaeEntry:
    sae_id: str
    layer: int
    path: str
    cfg: SaeConfig
    version: str  # content hash of cfg + weights: cache keys change when the SAE does

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae


def parse_sae_arg(arg: str) -> SaeEntry:
    """'12=/path/to/sae' or '/path/to/sae' → SaeEntry; ValueError with a clear message otherwise."""
    layer_text, sep, path_text = arg.partition("=")
    if not sep:
        layer_text, path_text = "", arg
    path = Path(path_text).expanduser()
    try:
        fmt = detect_format(path)
    except ValueError as error:
        raise ValueError(f"--sae {arg!r}: {error}") from None
    given: int | None = None
    if layer_text:
        try:
            given = int(layer_text)
        except ValueError:
            raise ValueError(f"--sae {arg!r}: layer must be an integer") from None
    try:
        cfg = read_sae_config(path, given)
    except ValueError as error:
        raise ValueError(f"--sae {arg!r} ({fmt}): {error}") from None
    hook_layer = hook_name_to_layer(cfg.hook_name) if cfg.hook_name else None
    if given is not None:
        layer = given
        if hook_layer is not None and hook_layer != layer:
            raise ValueError(f"--sae {arg!r}: its hook {cfg.hook_name!r} is layer {hook_layer}, not {layer}")
    elif hook_layer is None:
        raise ValueError(f"--sae {arg!r}: the SAE names no hook; pass LAYER=PATH")
    else:
        layer = hook_layer
    digest = hashlib.sha256()
    for file in sae_files(path):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023 - read in this iteration
                digest.update(block)
    return SaeEntry(sae_id=path.resolve().name, layer=layer, path=str(path.resolve()), cfg=cfg,
                    version=digest.hexdigest()[:16])


def build_registry(args: list[str], hidden_size: int, num_layers: int) -> dict[int, SaeEntry]:
    registry: dict[int, SaeEntry] = {}
    for arg in args:
        entry = parse_sae_arg(arg)
        if entry.cfg.d_in != hidden_size:
            raise ValueError(f"--sae {arg!r}: d_in {entry.cfg.d_in} does not match the model hidden size {hidden_size}")
        if not 0 <= entry.layer < num_layers:
            raise ValueError(f"--sae {arg!r}: layer {entry.layer} outside the model's 0..{num_layers - 1}")
        if entry.layer in registry:
            raise ValueError(f"--sae {arg!r}: layer {entry.layer} already has SAE {registry[entry.layer].sae_id}")
        registry[entry.layer] = entry
    return registry
