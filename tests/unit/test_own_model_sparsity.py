"""Sparsity calibration (`featurelens sparsity --model PATH`) for models other than the default: tiny random-weight
checkpoints built here (tests/tiny_models.py), a few prompts and documents. The tables are keyed by the family's
projection names, each projection's column norms in the calibration equal those the server's sparse runtime reads
from the checkpoint (GPT-2: Conv1D c_attn split into q/k/v, inputs of the MLP rotated), the runtime loads the file,
and a mixture-of-experts model is refused naming its class. ~25 s on the 2-core dev box."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch

SMALL = ["--texts", "10", "--prompts", "3", "--rotation-prompts", "4", "--threshold-prompts", "6",
         "--heldout-prompts", "4", "--new-tokens", "8", "--seed", "1"]


@pytest.mark.parametrize(("family", "extra"), [("qwen3", []), ("gpt2", ["--rotate", "mlp", "--basis", "pca"])])
def test_calibrates_a_non_default_model_for_the_server(tmp_path, family, extra):
    from featurelens.server.modes.sparsity import LEVELS, column_norms
    from featurelens.server.offline.sparsity import calibrate
    from featurelens.server.worker.model import ModelLayout
    from featurelens.server.worker.sparse import SparseRuntime

    path = tiny_models.build(family, tmp_path / family, seed=3)
    out = tmp_path / f"{family}-wina.json"
    assert calibrate.main(["--model", str(path), "--out", str(out), *SMALL, *extra]) == 0

    doc = json.loads(out.read_text())
    model, _ = calibrate.load_model(str(path))
    layout = calibrate.layout_of(model)
    layers = json.loads((path / "config.json").read_text())
    num_layers = int(layers.get("num_hidden_layers") or layers["n_layer"])
    expected = {f"{i}.{p}" for i in range(num_layers) for p in layout.family.projection_names}
    assert doc["model"] == family and sorted(doc["levels"]) == sorted(LEVELS)
    for level, table in doc["levels"].items():
        assert set(table) == expected
        assert all(v >= 0 and v == v for v in table.values())
        # on held-out continuations the thresholds zero about the level's share of inputs
        assert abs(doc["heldout_sparsity"][level]["mean"] - int(level) / 100) < 0.2

    runtime = SparseRuntime(str(path), str(out), num_layers, torch.device("cpu"), layout=ModelLayout(layout.family))
    assert runtime.levels == sorted(LEVELS, key=int)
    if extra:
        assert runtime.rotated_groups == ["mlp"]
    # the calibration's (split, rotated) projections are the weights the runtime masks with
    calibrated = calibrate.projections(calibrate.rotate_model(model, runtime.rotations))
    for i in range(num_layers):
        for j, p in enumerate(runtime.proj_names):
            torch.testing.assert_close(runtime.norms[i][j], column_norms(calibrated[f"{i}.{p}"].weight),
                                       rtol=1e-4, atol=1e-4)


def test_split_projections_compute_the_same_function(tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj and GPT-2's Conv1D modules become one linear per projection."""
    from featurelens.server.offline.sparsity import calibrate
    from transformers import AutoModelForCausalLM

    for family in ("phi3", "gpt2"):
        path = tiny_models.build(family, tmp_path / family, seed=3)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = model(ids).logits
            calibrate.prepare_model(model)
            after = model(ids).logits
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert any(".parts." in p for p in calibrate.layout_of(model).paths.values())


def test_mixture_of_experts_is_refused_naming_the_class(tmp_path, capsys):
    from featurelens.server.offline.sparsity import calibrate

    path = tiny_models.build("qwen3_moe", tmp_path / "moe", seed=3)
    with pytest.raises(SystemExit):
        calibrate.main(["--model", str(path), "--out", str(tmp_path / "x.json"), *SMALL])
    err = capsys.readouterr().err
    assert "Qwen3MoeForCausalLM" in err and "mixture-of-experts" in err
    assert not (tmp_path / "x.json").exists()


def test_a_non_default_model_needs_out(tmp_path, capsys):
    from featurelens.server.offline.sparsity import calibrate

    with pytest.raises(SystemExit):
        calibrate.main(["--model", str(tmp_path)])
    assert "--out" in capsys.readouterr().err
