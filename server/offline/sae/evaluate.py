"""SAE evaluation: explained variance, L0, dead latents and CE-loss recovered by splicing into the model.

CE-loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 means the reconstruction is as good as the
real residual for next-token prediction, 0 means no better than deleting the residual stream at that layer.
The splice is a forward hook on HF transformers' decoder block L (`model.model.layers[L]` in a Llama, found for
any family by the architecture adapter's `hf_layers`; its output is the residual stream after block L,
featurelens "layer L"). Position 0 is left untouched in all three runs: it is the attention
sink, excluded from training, and its huge norm would dominate the comparison.

Activation metrics come from the same clean forward (float32), and optionally from harvested held-out shards,
whose float16 engine activations are exactly what the server encodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (recon, nonzero mask)


# ---------------------------------------------------------------------------------------------------------
# Pure metrics


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


class ActivationStats:
    """Accumulates FVU, L0 and per-latent firing counts over batches of rows."""

    def __init__(self, d_sae: int) -> None:
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.rows = 0
        self.nonzero = 0
        self.sq_err = 0.0
        # Variance around the pooled mean, from running sums (rows arrive in batches).
        self.sum_x: torch.Tensor | None = None
        self.sum_sq = 0.0

    def add(self, x: torch.Tensor, recon: torch.Tensor, active: torch.Tensor) -> None:
        x, recon = x.double(), recon.double()
        self.sq_err += float((x - recon).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.rows += len(x)
        self.nonzero += int(active.sum())
        self.fired += active.sum(0).long()

    def result(self) -> dict[str, Any]:
        assert self.sum_x is not None, "no rows"
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.rows
        fvu = self.sq_err / total_var
        density = self.fired.double() / self.rows
        return {"tokens": self.rows, "fvu": fvu, "explained_variance": 1 - fvu, "l0": self.nonzero / self.rows,
                "dead_fraction": float((self.fired == 0).double().mean()),
                "latent_density": density.tolist()}


# ---------------------------------------------------------------------------------------------------------
# SAE loading (serving class for topk; trainer class for abstopk)


def load_reconstructor(path: str | Path) -> tuple[Reconstruct, int, int, str]:
    """(x -> (recon, active mask), layer, d_sae, architecture) for a saved SAE folder."""
    cfg = json.loads((Path(path) / "cfg.json").read_text())
    if cfg.get("architecture") == "abstopk":
        from featurelens.server.offline.sae.train import load_trainer_sae

        tsae, scale, layer = load_trainer_sae(path)

        @torch.no_grad()
        def recon_abs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xs = x.float() * scale
            pre = tsae.pre_acts(xs)
            vals, idx = tsae.select(pre, tsae.k)
            active = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, vals != 0)
            return (tsae.decode(vals, idx) + tsae.b_dec) / scale, active

        return recon_abs, layer, tsae.d_sae, "abstopk"
    from featurelens.server.interp.sae import load_sae

    sae = load_sae(path, dtype="float32")  # the serving class, exactly what the worker runs

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = sae.encode(x.float())
        return sae.decode(codes), codes != 0

    return recon, sae.layer, sae.cfg.d_sae, sae.architecture


# ---------------------------------------------------------------------------------------------------------
# Live-model splice


def load_hf_model(model_path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_path)


def eval_windows(tokenizer: Any, texts: list[str], max_len: int, max_tokens: int) -> list[torch.Tensor]:
    """First window (≤ max_len tokens) of each held-out text, until max_tokens tokens."""
    windows, total = [], 0
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) < 16 or total >= max_tokens:
            continue
        windows.append(torch.tensor(ids[:max_len])[None])
        total += min(len(ids), max_len)
    return windows


def _hook(layer_out: Any, replace: Callable[[torch.Tensor], torch.Tensor] | None,
          captured: list[torch.Tensor] | None) -> Any:
    hidden = layer_out[0] if isinstance(layer_out, tuple) else layer_out
    if captured is not None:
        captured.append(hidden[0, 1:].detach().clone())
    if replace is None:
        return None
    new = hidden.clone()
    new[0, 1:] = replace(hidden[0, 1:])
    return (new, *layer_out[1:]) if isinstance(layer_out, tuple) else new


def _block(model: Any, layer: int) -> torch.nn.Module:
    """Decoder block `layer` of an HF model of any family the architecture adapter knows."""
    from featurelens.server.worker.model import hf_layers

    blocks = hf_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} outside {type(model).__name__}'s 0..{len(blocks) - 1}")
    return blocks[layer]


@torch.no_grad()
def run_with_splice(model: Any, ids: torch.Tensor, layer: int,
                    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    capture: list[torch.Tensor] | None = None) -> tuple[float, int]:
    """(summed next-token NLL, number of predictions) with layer L's output optionally replaced."""
    handle = _block(model, layer).register_forward_hook(lambda m, i, o: _hook(o, replace, capture))
    try:
        logits = model(ids).logits[0, :-1].float()
    finally:
        handle.remove()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


@torch.no_grad()
def residuals(model: Any, windows: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Layer-L residual rows (positions ≥ 1) of the windows, stopping the forward after block L."""
    class _Stop(Exception):
        pass

    rows: list[torch.Tensor] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        _hook(output, None, rows)
        raise _Stop

    handle = _block(model, layer).register_forward_hook(hook)
    try:
        for ids in windows:
            try:
                model.base_model(ids)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(rows)


def evaluate(sae_path: str, model: Any, windows: list[torch.Tensor], shards: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    recon_fn, layer, d_sae, arch = load_reconstructor(sae_path)
    stats = ActivationStats(d_sae)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n = 0
    for ids in tqdm(windows, desc=f"eval L{layer}", disable=not progress):
        captured: list[torch.Tensor] = []
        nll, count = run_with_splice(model, ids, layer, capture=captured)
        ce["clean"] += nll
        recon, active = recon_fn(captured[0])
        stats.add(captured[0], recon, active)
        ce["sae"] += run_with_splice(model, ids, layer, replace=lambda h: recon_fn(h)[0].to(h.dtype))[0]
        ce["zero"] += run_with_splice(model, ids, layer, replace=torch.zeros_like)[0]
        n += count
    ce = {key: value / n for key, value in ce.items()}
    report: dict[str, Any] = {
        "sae": str(sae_path), "layer": layer, "d_sae": d_sae, "architecture": arch,
        "ce_clean": ce["clean"], "ce_with_sae": ce["sae"], "ce_zero_ablated": ce["zero"],
        "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]), "ce_tokens": n,
        "activations_hf": stats.result(),
    }
    if shards:
        from featurelens.server.offline.sae.train import load_rows

        rows = load_rows(shards, layer)
        shard_stats = ActivationStats(d_sae)
        for i in range(0, len(rows), 4096):
            x = rows[i:i + 4096].float()
            r, a = recon_fn(x)
            shard_stats.add(x, r, a)
        report["activations_shards"] = shard_stats.result()
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without per-latent arrays (what goes into docs and test thresholds)."""
    out = {k: v for k, v in report.items() if not k.startswith("activations")}
    for key in ("activations_hf", "activations_shards"):
        if key in report:
            out[key] = {k: v for k, v in report[key].items() if k != "latent_density"}
    return out


def plot(reports: list[dict[str, Any]], path: str | Path) -> None:
    """Per SAE: latent firing-density histogram and the three CE losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(10, 3.2 * len(reports)), squeeze=False)
    for (ax_d, ax_ce), rep in zip(axes, reports, strict=True):
        acts = rep.get("activations_shards", rep["activations_hf"])
        dens = [math.log10(d) if d > 0 else -7.0 for d in acts["latent_density"]]
        ax_d.hist(dens, bins=60)
        ax_d.set_xlabel("log10 firing density (dead latents at -7)")
        ax_d.set_title(f"L{rep['layer']} d_sae={rep['d_sae']}: EV={acts['explained_variance']:.3f}, "
                       f"L0={acts['l0']:.1f}, dead={acts['dead_fraction']:.3f}", fontsize=9)
        names = ["clean", "with SAE", "zero-ablated"]
        values = [rep["ce_clean"], rep["ce_with_sae"], rep["ce_zero_ablated"]]
        ax_ce.bar(names, values, color=["tab:green", "tab:blue", "tab:red"])
        ax_ce.set_ylabel("CE loss (nats/token)")
        ax_ce.set_title(f"CE loss recovered = {rep['ce_loss_recovered']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
