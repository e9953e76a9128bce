"""SAE training and evaluation (`featurelens sae train` / `sae eval`) for a model other than the default: a tiny
random-weight GPT-2 checkpoint (tests/tiny_models.py: hidden 64, decoder blocks under `transformer.h`). The shards
hold its layer-1 residual rows in the harvest's layout (computed here with an HF forward: the harvest itself runs
through vLLM, exercised per family by tests/engine/test_model_families.py's capture path). The trained SAE records
the model's hidden size and name and loads into the server's SAE registry; eval splices it into the model.
~15 s on the 2-core dev box."""

from __future__ import annotations

import json

import numpy as np
import tiny_models
import torch

LAYER = 1
TEXTS = [f"The river {i} flows past the old mill, where the miller counts {i * 7} sacks of grain before noon."
         for i in range(40)]


def test_sae_train_and_eval_on_a_non_default_model(tmp_path):
    from featurelens.server.interp.registry import build_registry
    from featurelens.server.offline.sae import cli
    from featurelens.server.offline.sae.evaluate import eval_windows, load_hf_model, residuals

    path = tiny_models.build("gpt2", tmp_path / "tiny-gpt2", seed=3)
    model, tok = load_hf_model(str(path))
    windows = eval_windows(tok, TEXTS, 64, 4096)
    rows = residuals(model, windows, LAYER)  # positions >= 1 of every window: [rows, 64]
    assert rows.shape[1] == tiny_models.HIDDEN
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / f"L{LAYER}_00000.npy", rows.to(torch.float16).numpy())
    np.save(shards / f"L{LAYER}_00000_pos.npy", np.ones(len(rows), dtype=np.int32))
    (shards / "progress.json").write_text(json.dumps({"settings": {"model": str(path)}, "done": [0]}))

    sae_dir = tmp_path / "sae"
    assert cli.main(["train", "--shards", str(shards), "--layer", str(LAYER), "--out", str(sae_dir),
                     "--d-sae", "256", "--k", "8", "--batch-size", "256", "--max-tokens", "20000",
                     "--dead-tokens", "5000", "--threads", "2"]) == 0
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["d_in"] == tiny_models.HIDDEN and cfg["d_sae"] == 256 and cfg["model_name"] == "tiny-gpt2"
    registry = build_registry([f"{LAYER}={sae_dir}"], hidden_size=tiny_models.HIDDEN, num_layers=2)
    assert registry[LAYER].cfg.d_in == tiny_models.HIDDEN
    metrics = json.loads((sae_dir / "metrics.json").read_text())
    assert metrics["final_train_fvu_ema"] < 0.5  # it learned the rows (a random SAE explains ~nothing)

    texts = tmp_path / "heldout.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:6]))
    out = tmp_path / "eval"
    assert cli.main(["eval", "--sae", str(sae_dir), "--texts", str(texts), "--out", str(out),
                     "--model", str(path), "--max-len", "32", "--max-tokens", "256"]) == 0
    report = json.loads((out / "eval.json").read_text())[0]
    assert report["layer"] == LAYER
    assert np.isfinite(report["ce_loss_recovered"]) and report["activations_hf"]["explained_variance"] > 0.5
