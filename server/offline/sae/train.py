"""TopK sparse autoencoder training, after Gao et al. 2024 ("Scaling and evaluating sparse autoencoders").

The recipe, and why:
- activations are scaled by one constant so that E[||x||^2] = d_in: hyperparameters then transfer across
  layers whose residual norms differ by orders of magnitude. The constant is saved as
  `normalize_activations="expected_average_only_in"` + `norm_scaling_factor`, which our `Sae` (and SAELens)
  apply before encoding and undo after decoding, so the saved weights live in the normalised space;
- decoder rows are unit-norm: otherwise the model can shrink a row and inflate its latent. The component of
  each row's gradient parallel to the row is removed before the Adam step and rows are renormalised after;
- the encoder starts as the decoder's transpose and b_dec at the geometric median of a sample: both put
  early latents on sensible directions and cut the number of latents that die at the start;
- AuxK: latents that have not fired for `dead_tokens` tokens get a second top-k (k_aux = d_in/2) fitted to
  the main reconstruction's residual (loss weight 1/32), which gives dead latents a gradient and revives them;
- lr = 2e-4 / sqrt(d_sae / 2^14) (the paper's scaling), Adam, short warm-up, linear decay over the last 20%.
- rows at token position 0 (BOS / first token: attention-sink outliers) are excluded from training.

`architecture="abstopk"` keeps the k largest |pre-activations| with their sign (signed features). Our
serving `Sae` has no such architecture, so an AbsTopK SAE is training/eval-only: it is saved with the same
tensors but `architecture: "abstopk"`, which `load_trainer_sae` reads and `load_sae` refuses.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    layer: int
    d_sae: int = 4096
    k: int = 32
    architecture: str = "topk"  # or "abstopk"
    batch_size: int = 2048
    max_tokens: int | None = None  # training tokens (rows); epochs are repeated to reach it
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 2**14)
    aux_k: int | None = None  # None: d_in // 2
    aux_coef: float = 1 / 32
    dead_tokens: int = 500_000
    warmup_steps: int = 50
    seed: int = 0
    save_dtype: str = "float16"
    model_name: str = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------------------
# Data


def load_rows(shard_dir: str | Path, layer: int, max_rows: int | None = None,
              exclude_first_position: bool = True) -> torch.Tensor:
    """All float16 rows of one layer's shards (in shard order), without position-0 rows."""
    paths = sorted(Path(shard_dir).glob(f"L{layer}_[0-9][0-9][0-9][0-9][0-9].npy"))
    if not paths:
        raise FileNotFoundError(f"no shards L{layer}_*.npy in {shard_dir}")
    parts, total = [], 0
    for path in paths:
        rows = np.load(path)
        if exclude_first_position:
            pos = np.load(path.with_name(path.stem + "_pos.npy"))
            rows = rows[pos != 0]
        parts.append(rows)
        total += len(rows)
        if max_rows is not None and total >= max_rows:
            break
    return torch.from_numpy(np.concatenate(parts)[:max_rows])


def norm_scaling_factor(x: torch.Tensor) -> float:
    """The constant s with E[||s x||^2] = d_in."""
    return math.sqrt(x.shape[1] / x.float().pow(2).sum(1).mean().item())


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: robust to the heavy-tailed norms of residual rows, unlike the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * y.norm().clamp_min(1.0):
            return y_new
        y = y_new
    return y


# ---------------------------------------------------------------------------------------------------------
# Model


class TrainableSae(torch.nn.Module):
    """Same tensors and math as `featurelens.server.interp.sae.TopKSae`, differentiable, sparse decode."""

    def __init__(self, d_in: int, d_sae: int, k: int, architecture: str = "topk",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if architecture not in ("topk", "abstopk"):
            raise ValueError(f"architecture must be topk or abstopk, got {architecture!r}")
        self.d_in, self.d_sae, self.k, self.architecture = d_in, d_sae, k, architecture
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def select(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active latents per row."""
        if self.architecture == "abstopk":
            idx = pre.abs().topk(k, dim=-1, sorted=False).indices
            return pre.gather(-1, idx), idx
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.relu(vals), idx

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # sum_j vals[j] * W_dec[idx[j]] without the dense [rows, d_sae] @ W_dec product: k/d_sae of the work.
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.pre_acts(x)
        vals, idx = self.select(pre, self.k)
        return self.decode(vals, idx) + self.b_dec, vals, idx, pre

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec


def aux_k_loss(sae: TrainableSae, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
               aux_k: int, total_variance: torch.Tensor) -> torch.Tensor:
    """Fit the main reconstruction's residual with the top-aux_k dead latents (Gao et al., section A.2)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead[None], 0.0 if sae.architecture == "abstopk" else -torch.inf)
    vals, idx = sae.select(masked, k)
    e_hat = sae.decode(vals, idx)
    # Scaled down while few latents are dead, as in EleutherAI sparsify, so the term cannot dominate.
    return min(n_dead / aux_k, 1.0) * (e_hat - residual.detach()).pow(2).sum() / total_variance


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ||x - recon||^2 / ||x - mean(x)||^2 over the batch."""
    return (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


# ---------------------------------------------------------------------------------------------------------
# Training loop


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def train(rows: torch.Tensor, cfg: TrainConfig, val_rows: torch.Tensor | None = None,
          progress: bool = True) -> tuple[TrainableSae, float, dict[str, Any]]:
    """Train on `rows` [N, d_in] (any float dtype). Returns (sae in normalised space, scale, metrics)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    d_in = rows.shape[1]
    sample = rows[torch.randperm(len(rows), generator=gen)[:16384]].float()
    scale = norm_scaling_factor(sample)
    sae = TrainableSae(d_in, cfg.d_sae, cfg.k, cfg.architecture, generator=gen)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    lr = cfg.lr or default_lr(cfg.d_sae)
    aux_k = cfg.aux_k or d_in // 2
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    max_tokens = cfg.max_tokens or len(rows)
    steps = max(1, max_tokens // cfg.batch_size)
    decay_start = int(0.8 * steps)

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        decay = 1.0 if step < decay_start else max(0.0, (steps - step) / (steps - decay_start))
        return lr * warm * decay

    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    order = torch.randperm(len(rows), generator=gen)
    cursor, ema_fvu, ema_aux, t0 = 0, None, 0.0, time.time()
    bar = tqdm(range(steps), desc=f"train L{cfg.layer}", disable=not progress)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # next epoch, reshuffled
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        x = rows[order[cursor:cursor + cfg.batch_size]].float() * scale
        cursor += cfg.batch_size
        recon, vals, idx, pre = sae(x)
        total_variance = (x - x.mean(0)).pow(2).sum()
        loss_main = (recon - x).pow(2).sum() / total_variance
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[idx[vals != 0]] = True
        since_fired += len(x)
        since_fired[fired] = 0
        dead = since_fired >= cfg.dead_tokens
        loss_aux = aux_k_loss(sae, pre, x - recon, dead, aux_k, total_variance)
        loss = loss_main + cfg.aux_coef * loss_aux
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        f = loss_main.item()
        ema_fvu = f if ema_fvu is None else 0.98 * ema_fvu + 0.02 * f
        ema_aux = 0.98 * ema_aux + 0.02 * float(loss_aux.detach())
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{ema_fvu:.4f}", aux=f"{ema_aux:.3f}", dead=f"{dead.float().mean():.3f}")
    metrics: dict[str, Any] = {
        "config": asdict(cfg), "lr": lr, "aux_k": aux_k, "steps": steps, "train_tokens": steps * cfg.batch_size,
        "unique_train_rows": len(rows), "norm_scaling_factor": scale, "train_seconds": time.time() - t0,
        "final_train_fvu_ema": ema_fvu,
        "dead_fraction_train_window": float((since_fired >= cfg.dead_tokens).float().mean()),
    }
    if val_rows is not None:
        metrics["val"] = evaluate_rows(sae, val_rows, scale)
    return sae, scale, metrics


@torch.no_grad()
def evaluate_rows(sae: TrainableSae, rows: torch.Tensor, scale: float, batch: int = 4096) -> dict[str, float]:
    """FVU / explained variance / L0 / never-fired fraction of a trainer SAE on raw rows."""
    err = 0.0
    n_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    l0 = 0
    x_all = rows.float() * scale
    for i in range(0, len(x_all), batch):
        x = x_all[i:i + batch]
        recon, vals, idx, _ = sae(x)
        err += float((recon - x).pow(2).sum())
        nz = vals != 0
        l0 += int(nz.sum())
        n_fired.index_add_(0, idx[nz], torch.ones(int(nz.sum()), dtype=torch.long))
    total = float((x_all - x_all.mean(0)).pow(2).sum())
    return {"fvu": err / total, "explained_variance": 1 - err / total, "l0": l0 / len(x_all),
            "dead_fraction": float((n_fired == 0).float().mean()), "tokens": len(x_all)}


# ---------------------------------------------------------------------------------------------------------
# Saving


def to_serving_sae(sae: TrainableSae, scale: float, cfg: TrainConfig) -> Any:
    """A `featurelens.server.interp.sae.TopKSae` (SAELens layout) holding the trained weights."""
    from featurelens.server.interp.sae import SaeConfig, TopKSae, layer_to_hook_name, parse_dtype

    if sae.architecture != "topk":
        raise ValueError("only topk SAEs have a serving class; abstopk is saved with save_trainer_sae")
    scfg = SaeConfig(architecture="topk", d_in=sae.d_in, d_sae=sae.d_sae, k=sae.k,
                     hook_name=layer_to_hook_name(cfg.layer), dtype=cfg.save_dtype,
                     apply_b_dec_to_input=True, normalize_activations="expected_average_only_in",
                     norm_scaling_factor=scale, model_name=cfg.model_name)
    out = TopKSae(scfg)
    dtype = parse_dtype(cfg.save_dtype)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        setattr(out, name, torch.nn.Parameter(getattr(sae, name).detach().to(dtype).clone(), requires_grad=False))
    return out


def save_trainer_sae(sae: TrainableSae, scale: float, cfg: TrainConfig, out_dir: str | Path,
                     metrics: dict[str, Any]) -> None:
    out = Path(out_dir)
    if sae.architecture == "topk":
        from featurelens.server.interp.sae import save_sae

        save_sae(to_serving_sae(sae, scale, cfg), out)
    else:  # abstopk: same layout, an architecture only load_trainer_sae understands
        from featurelens.server.interp.sae import layer_to_hook_name, parse_dtype
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        dtype = parse_dtype(cfg.save_dtype)
        save_file({n: p.detach().to(dtype).contiguous() for n, p in sae.named_parameters()},
                  str(out / "sae_weights.safetensors"))
        (out / "cfg.json").write_text(json.dumps({
            "architecture": "abstopk", "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
            "hook_name": layer_to_hook_name(cfg.layer), "dtype": cfg.save_dtype, "apply_b_dec_to_input": True,
            "normalize_activations": "expected_average_only_in", "norm_scaling_factor": scale,
            "model_name": cfg.model_name}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_trainer_sae(path: str | Path) -> tuple[TrainableSae, float, int]:
    """Any SAE this module saved (topk or abstopk) as (float32 TrainableSae, norm scale, layer)."""
    from featurelens.server.interp.sae import hook_name_to_layer
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    sae = TrainableSae(cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["architecture"])
    tensors = load_file(str(path / "sae_weights.safetensors"))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(tensors[name].float())
    return sae, float(cfg.get("norm_scaling_factor") or 1.0), hook_name_to_layer(cfg["hook_name"])
