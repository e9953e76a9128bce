"""Feature explanations: row alignment, top contexts, density, logit lens, file round trip and search."""

from __future__ import annotations

import numpy as np
import pytest
from featurelens.server.interp import catalog as cat
from featurelens.server.offline.sae import explanations as ex

VOCAB = ["<s>", "the", "cat", "sat", "on", "mat", "Paris", "capital", "of", "France", "dog", "ran"]


def decode(ids: list[int]) -> str:
    return "".join(" " + VOCAB[i] for i in ids)


def test_align_rows_replays_windows_and_refuses_a_mismatch() -> None:
    windows = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert ex.align_rows(windows, np.array([0, 1, 2, 0, 1, 0, 1, 2, 3])).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # Chunked prefill: window 0 split in two pieces with window 1 (and the start of 2) between them, and a piece
    # of window 0 that directly follows window 1's last position (1 -> 2 looks consecutive, but is not).
    assert ex.align_rows(windows, np.array([0, 1, 0, 1, 2, 0, 1, 2, 3])).tolist() == [0, 0, 1, 1, 0, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="continues no unfinished window"):
        ex.align_rows(windows, np.array([0, 1, 2, 0, 3]))
    with pytest.raises(ValueError, match="unfinished"):
        ex.align_rows(windows, np.array([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="all 3 windows have started"):
        ex.align_rows(windows, np.array([0, 1, 2, 0, 1, 0, 1, 2, 3, 0]))


def _synthetic() -> tuple[list[list[int]], np.ndarray, np.ndarray, ex.Codes, np.ndarray, np.ndarray]:
    """8 windows of 'the capital of France Paris ...'; latent 3 fires on 'Paris' (strength = window index + 1),
    latent 1 fires everywhere weakly, latent 2 never; decoder row 3 points at the unembedding of 'Paris'."""
    rng = np.random.default_rng(0)
    windows = [[1, 7, 8, 9, 6, 1, 2, 3] for _ in range(8)]
    tokens = np.concatenate([np.asarray(w) for w in windows])
    positions = np.concatenate([np.arange(len(w)) for w in windows])
    window_ids = ex.align_rows(windows, positions)
    k = 2
    indices = np.zeros((len(tokens), k), dtype=np.int32)
    values = np.zeros((len(tokens), k), dtype=np.float32)
    indices[:, 0], values[:, 0] = 1, 0.1
    paris = np.flatnonzero(tokens == 6)
    indices[paris, 1] = 3
    values[paris, 1] = 1.0 + np.arange(len(paris))
    unembed = rng.normal(size=(len(VOCAB), 16)).astype(np.float32)
    w_dec = rng.normal(size=(4, 16)).astype(np.float32)
    w_dec[3] = unembed[6] / np.linalg.norm(unembed[6])
    return windows, window_ids, positions, ex.Codes(indices, values), w_dec, unembed


def test_build_explanations_finds_contexts_density_and_logit_lens(tmp_path) -> None:
    windows, window_ids, positions, codes, w_dec, unembed = _synthetic()
    data = ex.build_explanations(sae_id="toy", layer=5, codes=codes, windows=windows, window_ids=window_ids,
                                 positions=positions, decode=decode, w_dec=w_dec, unembed=unembed, final_norm=None,
                                 n_examples=3, n_tokens=3)
    paris = data["features"][3]
    assert paris["density"] == pytest.approx(8 / len(positions))
    assert paris["max_activation"] == pytest.approx(8.0)
    # Top 3 by activation, one per window, strongest first; the activating token is marked.
    assert [a for _, a in paris["examples"]] == [8.0, 7.0, 6.0]
    assert all(text == " the capital of France« Paris» the cat sat" for text, _ in paris["examples"])
    assert paris["promoted"][0][:2] == [6, " Paris"]
    assert "Paris" in paris["label"] and paris["label_machine_generated"] is True
    assert data["features"][2]["examples"] == [] and data["features"][2]["density"] == 0.0
    assert data["features"][1]["density"] == pytest.approx(1.0)
    assert len(data["features"][1]["examples"]) == 3  # one per window, not three from the same window

    path = ex.write_explanations(data, tmp_path)
    catalog = cat.FeatureCatalog.load(tmp_path)
    assert path.name == ex.FILENAME and catalog is not None and len(catalog) == 4
    assert catalog.get(3) == paris and catalog.get(4) is None and catalog.get(-1) is None
    assert catalog.search_text("paris", 5)[0][0] == 3
    assert catalog.search_text("PARIS capital", 1)[0][0] == 3
    assert catalog.search_text("zebra", 5) == []


def test_context_is_cut_at_the_window_edges() -> None:
    window = [1, 7, 8, 9, 6, 1, 2, 3]
    assert ex.context_text(decode, window, 0) == "« the» capital of France Paris"
    assert ex.context_text(decode, window, 7).endswith("« sat»")
    assert ex.clean_text("a\nb") == "a⏎b"


def test_catalog_refuses_unknown_format(tmp_path) -> None:
    with pytest.raises(ValueError, match="format version"):
        cat.FeatureCatalog({"version": 99, "sae_id": "x", "layer": 0, "features": []})
    assert cat.FeatureCatalog.load(tmp_path) is None


def test_rank_by_activation_is_mean_over_tokens() -> None:
    indices = np.array([[3, 1], [3, 2], [5, 1]])
    values = np.array([[2.0, 1.0], [4.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    ranked = cat.rank_by_activation(indices, values, 2)
    assert ranked == [(3, pytest.approx(2.0)), (1, pytest.approx(2 / 3))]
