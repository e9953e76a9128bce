"""SAE training, evaluation math and the shipped SAEs (no vLLM engine: the trainer is pure torch)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from featurelens.server.interp.sae import load_sae, save_sae
from featurelens.server.offline.sae.evaluate import ActivationStats, ce_loss_recovered
from featurelens.server.offline.sae.train import (
    TrainableSae,
    TrainConfig,
    geometric_median,
    save_trainer_sae,
    to_serving_sae,
    train,
)

SHIPPED = Path(__file__).resolve().parents[2] / "server" / "assets" / "saes"


def _planted(n_true: int = 32, d: int = 64, rows: int = 40_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are sparse non-negative combinations (~3 active) of unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    mask = (torch.rand(rows, n_true, generator=g) < 3 / n_true).float()
    coef = mask * (torch.rand(rows, n_true, generator=g) * 2 + 0.5)
    return coef @ dirs + 0.5, dirs


@pytest.fixture(scope="module")
def planted_run() -> tuple[TrainableSae, float, dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, dirs = _planted()
    cfg = TrainConfig(layer=3, d_sae=64, k=4, batch_size=256, max_tokens=len(x) * 5, lr=1e-3, aux_k=32,
                      dead_tokens=5000, warmup_steps=20, save_dtype="float32")
    sae, scale, metrics = train(x, cfg, val_rows=x[:4000], progress=False)
    return sae, scale, metrics, x, dirs


def test_training_recovers_planted_directions(planted_run) -> None:
    sae, _, metrics, _, dirs = planted_run
    w = sae.W_dec.detach()
    best = (dirs @ (w / w.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert best.min() > 0.9, best
    assert metrics["val"]["explained_variance"] > 0.9


def test_decoder_rows_stay_unit_norm(planted_run) -> None:
    sae = planted_run[0]
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)


def test_gradient_projection_removes_parallel_component() -> None:
    sae = TrainableSae(8, 16, 2, generator=torch.Generator().manual_seed(0))
    sae.W_dec.grad = torch.randn(16, 8)
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * sae.W_dec.detach()).sum(dim=1).abs().max() < 1e-6


def test_encoder_starts_as_decoder_transpose_and_abstopk_keeps_sign() -> None:
    sae = TrainableSae(8, 16, 3, architecture="abstopk", generator=torch.Generator().manual_seed(0))
    assert torch.equal(sae.W_enc.detach(), sae.W_dec.detach().T)
    pre = torch.tensor([[0.5, -3.0, 1.0, 2.0, -0.1]])
    vals, idx = sae.select(pre, 2)
    assert sorted(zip(idx[0].tolist(), vals[0].tolist(), strict=True)) == [(1, -3.0), (3, 2.0)]


def test_geometric_median_ignores_an_outlier() -> None:
    x = torch.cat([torch.zeros(20, 2) + torch.tensor([1.0, 1.0]), torch.tensor([[1000.0, 1000.0]])])
    assert torch.allclose(geometric_median(x), torch.tensor([1.0, 1.0]), atol=1e-2)


def test_serving_sae_matches_trainer_and_round_trips_bit_exactly(planted_run, tmp_path: Path) -> None:
    sae, scale, metrics, x, _ = planted_run
    cfg = TrainConfig(layer=3, d_sae=64, k=4, save_dtype="float32")
    save_trainer_sae(sae, scale, cfg, tmp_path / "a", metrics)
    loaded = load_sae(tmp_path / "a")
    assert loaded.cfg.normalize_activations == "expected_average_only_in"
    assert loaded.cfg.norm_scaling_factor == pytest.approx(scale)
    with torch.no_grad():
        expected = (sae(x[:100] * scale)[0]) / scale
    torch.testing.assert_close(loaded(x[:100]), expected, atol=1e-4, rtol=1e-4)
    save_sae(loaded, tmp_path / "b")
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["steps"] == metrics["steps"]
    fp16 = to_serving_sae(sae, scale, TrainConfig(layer=3, d_sae=64, k=4, save_dtype="float16"))
    assert fp16.W_enc.dtype == torch.float16 and fp16.cfg.dtype == "float16"


def test_activation_metrics_match_hand_computed_values() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # mean (2, 0); total variance 10
    recon = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # squared error 1
    active = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    stats = ActivationStats(3)
    stats.add(x[:2], recon[:2], active[:2])  # in two batches: the pooled variance must still be exact
    stats.add(x[2:], recon[2:], active[2:])
    result = stats.result()
    assert result["fvu"] == pytest.approx(0.1)
    assert result["explained_variance"] == pytest.approx(0.9)
    assert result["l0"] == pytest.approx(6 / 4)
    assert result["dead_fraction"] == pytest.approx(1 / 3)
    assert result["latent_density"] == pytest.approx([0.75, 0.75, 0.0])


def test_ce_loss_recovered_formula() -> None:
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=7.0) == pytest.approx(0.9)
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=2.0, ce_zero=7.0) == pytest.approx(1.0)
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=7.0, ce_zero=7.0) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------
# The shipped SAEs, on text that is in none of the corpus sources

HELD_OUT_TEXTS = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could see the "
    "fishing boats returning to the harbour, their lanterns swaying with the waves, while gulls circled above "
    "the cliffs and the wind carried the smell of salt and seaweed across the quiet village.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow should I water a "
    "cactus in winter?<|im_end|>\n<|im_start|>assistant\nIn winter, a cactus needs very little water. Water it "
    "lightly about once a month, let the soil dry out completely between waterings, and keep it in a bright, "
    "cool spot away from heaters.<|im_end|>\n",
    "def moving_average(values, window):\n    \"\"\"Return the moving average of `values` over `window` items."
    "\"\"\"\n    if window <= 0:\n        raise ValueError('window must be positive')\n    total = sum(values[:window])"
    "\n    out = [total / window]\n    for i in range(window, len(values)):\n        total += values[i] - "
    "values[i - window]\n        out.append(total / window)\n    return out\n",
    "Mount Kilimanjaro, the highest mountain in Africa, rises about 5,895 metres above sea level in Tanzania. "
    "It is a dormant volcano with three cones, Kibo, Mawenzi and Shira, and its glaciers have shrunk "
    "considerably during the last century.",
]


def _shipped_dirs() -> list[Path]:
    return sorted(p for p in SHIPPED.iterdir() if (p / "cfg.json").is_file()) if SHIPPED.is_dir() else []


def test_shipped_saes_fit_the_budget_and_load() -> None:
    dirs = _shipped_dirs()
    assert len(dirs) >= 2, f"expected at least two shipped SAEs in {SHIPPED}"
    total = sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())
    assert total <= 40 * 2**20
    layers = set()
    for d in dirs:
        sae = load_sae(d)
        assert sae.cfg.d_in == 576 and sae.cfg.model_name == "SmolLM2-135M-Instruct"
        assert sae.dtype in (torch.float16, torch.bfloat16) and sae.cfg.dtype in ("float16", "bfloat16")
        assert math.isfinite(float(sae.cfg.norm_scaling_factor))
        layers.add(sae.layer)
    assert len(layers) >= 2


@pytest.fixture(scope="module")
def hf_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from featurelens.server.model_assets import resolve_model

        path = resolve_model("default")
    except Exception as exc:  # the model wheel is not installed in this environment
        pytest.skip(f"default model unavailable: {exc}")
    from featurelens.server.offline.sae.evaluate import load_hf_model

    return load_hf_model(path)


@pytest.mark.parametrize("name", [p.name for p in _shipped_dirs()])
def test_shipped_sae_meets_recorded_figures_on_held_out_text(hf_model, name: str) -> None:
    """The quick CI check: on a small sample of the held-out corpus split (shipped in tests/data), the SAE
    reproduces the explained variance recorded for that sample (numerics only may differ), which is in line
    with the full held-out evaluation, and fires at most k latents; the recorded full figures meet the
    targets. The hand-written paragraphs (another distribution) must stay well explained too."""
    from featurelens.server.offline.sae.evaluate import eval_windows, load_reconstructor, residuals

    model, tok = hf_model
    path = SHIPPED / name
    recorded = json.loads((path / "eval.json").read_text())
    assert recorded["activations_hf"]["explained_variance"] >= 0.85
    assert recorded["ce_loss_recovered"] >= 0.90 and recorded["activations_hf"]["dead_fraction"] < 0.05
    recon_fn, layer, d_sae, _ = load_reconstructor(path)
    sample = [t["text"] for t in json.loads((Path(__file__).parents[1] / "data" / "sae_heldout_sample.json").read_text())]

    def measure(texts: list[str]) -> dict:
        x = residuals(model, eval_windows(tok, texts, 256, 10_000), layer)
        stats = ActivationStats(d_sae)
        recon, active = recon_fn(x)
        stats.add(x, recon, active)
        return stats.result()

    result = measure(sample)
    assert result["explained_variance"] >= recorded["ci_sample"]["explained_variance"] - 0.01
    assert abs(result["explained_variance"] - recorded["activations_hf"]["explained_variance"]) < 0.05
    assert result["l0"] <= recorded["k"]
    assert measure(HELD_OUT_TEXTS)["explained_variance"] >= 0.7
