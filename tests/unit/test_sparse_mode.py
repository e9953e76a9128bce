"""Per-request WINA sparse mode: the worker's wrapped projections on fake vLLM-style layers (the real engine:
tests/engine/test_sparse_mode_engine.py)."""

from __future__ import annotations

import json

import pytest
import torch
from featurelens.server.modes import sparsity as sp
from featurelens.server.offline.sparsity import fit as spfit
from featurelens.server.worker.sparse import PROJ_NAMES, SparseRuntime, weight_files

D, D_KV, D_FF, N_LAYERS = 16, 8, 24, 2
SHAPES = {"q_proj": (D, D), "k_proj": (D_KV, D), "v_proj": (D_KV, D), "o_proj": (D, D),
          "gate_proj": (D_FF, D), "up_proj": (D_FF, D), "down_proj": (D, D_FF)}


class FakeLinear(torch.nn.Module):
    """Like vLLM's (merged) linear layers: fused weight, `output_sizes`, forward returns (out, bias)."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.fused = torch.cat(weights)
        self.output_sizes = [w.shape[0] for w in weights]
        self.output_size = sum(self.output_sizes)
        self.bias = None
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.calls.append(x.shape[0])
        return x @ self.fused.T, None


class FakeLayer(torch.nn.Module):
    def __init__(self, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.qkv_proj = FakeLinear([w["q_proj"], w["k_proj"], w["v_proj"]])
        self.self_attn.o_proj = FakeLinear([w["o_proj"]])
        self.mlp = torch.nn.Module()
        self.mlp.gate_up_proj = FakeLinear([w["gate_proj"], w["up_proj"]])
        self.mlp.down_proj = FakeLinear([w["down_proj"]])


@pytest.fixture
def fake(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    weights = [{p: torch.randn(*SHAPES[p], generator=g) * torch.rand(SHAPES[p][1], generator=g)
                for p in PROJ_NAMES} for _ in range(N_LAYERS)]
    save_file({f"model.layers.{i}.{sp.PROJECTIONS[p]}.weight": w for i in range(N_LAYERS)
               for p, w in weights[i].items()}, str(tmp_path / "model.safetensors"))
    levels = {"25": 0.3, "50": 0.9}  # one threshold per level, the same for every projection
    (tmp_path / "thr.json").write_text(json.dumps({"levels": {
        lv: {f"{i}.{p}": t for i in range(N_LAYERS) for p in PROJ_NAMES} for lv, t in levels.items()}}))
    layers = torch.nn.ModuleList([FakeLayer(w) for w in weights])
    runtime = SparseRuntime(str(tmp_path), str(tmp_path / "thr.json"), N_LAYERS, torch.device("cpu"))
    assert runtime.install(layers) == 4 * N_LAYERS
    runtime.install(layers)  # idempotent: wrapping twice must not nest wrappers
    return runtime, layers, weights, levels


def reference(x: torch.Tensor, weights: dict[str, torch.Tensor], parts: tuple[str, ...], threshold: float):
    return torch.cat([sp.wina_sparsify(x, sp.column_norms(weights[p]), threshold) @ weights[p].T for p in parts], -1)


def test_no_sparse_row_runs_the_dense_forward_only(fake):
    runtime, layers, weights, _ = fake
    x = torch.randn(5, D)
    qkv = layers[0].self_attn.qkv_proj
    out, _ = qkv(x)
    torch.testing.assert_close(out, x @ qkv.fused.T)
    assert qkv.calls == [5]
    assert runtime.rotated_groups == []


def test_masks_only_the_sparse_rows_each_subprojection_with_its_own_norms(fake):
    runtime, layers, weights, levels = fake
    x = torch.randn(6, D)
    dense, _ = layers[1].self_attn.qkv_proj(x)
    runtime.begin([("a", 1, 3, "25"), ("b", 4, 5, "50")], total_rows=6)
    out, _ = layers[1].self_attn.qkv_proj(x)
    parts = ("q_proj", "k_proj", "v_proj")
    for rows, level in ((slice(1, 3), "25"), (slice(4, 5), "50")):
        torch.testing.assert_close(out[rows], reference(x[rows], weights[1], parts, levels[level]))
    for row in (0, 3, 5):  # other requests' rows: bit-identical to the dense forward
        assert torch.equal(out[row], dense[row])
    down, _ = layers[1].mlp.down_proj(torch.cat([x, x[:, :D_FF - D]], 1))
    runtime.end()
    stats = runtime.report()
    assert set(stats) == {"a", "b"} and stats["a"]["rows"] == 2 and stats["b"]["rows"] == 1
    assert stats["b"]["zeroed_fraction"] > stats["a"]["zeroed_fraction"] > 0
    assert runtime.step is None


def test_all_sparse_batch_skips_the_dense_forward(fake):
    runtime, layers, weights, levels = fake
    x = torch.randn(3, D)
    gate_up = layers[0].mlp.gate_up_proj
    runtime.begin([("a", 0, 3, "25")], total_rows=3)
    out, _ = gate_up(x)
    runtime.end()
    torch.testing.assert_close(out, reference(x, weights[0], ("gate_proj", "up_proj"), levels["25"]))
    assert gate_up.calls == [6]  # one stacked call (two masked copies), no dense call


def test_single_row_fast_path_uses_the_sparse_gemv_and_matches_masking(fake):
    runtime, layers, weights, levels = fake
    x = torch.randn(1, D)
    qkv = layers[0].self_attn.qkv_proj
    runtime.begin([("a", 0, 1, "50")], total_rows=1)
    out, bias = qkv(x)
    runtime.end()
    assert bias is None and qkv.calls == [] and runtime.fast_path_calls == 1
    torch.testing.assert_close(out, reference(x, weights[0], ("q_proj", "k_proj", "v_proj"), levels["50"]),
                               rtol=1e-5, atol=1e-5)
    scores = torch.cat([sp.wina_scores(x[0], sp.column_norms(weights[0][p])) for p in ("q_proj", "k_proj", "v_proj")])
    assert runtime.report()["a"]["sparse_gemv_rows"] == 1
    assert runtime.report()["a"]["zeroed_fraction"] == pytest.approx(float((scores < levels["50"]).float().mean()))


@pytest.fixture(params=["orthogonal", "general"])
def rotated(request, tmp_path, fake):
    """The fake model with inputs in another basis: attention's q/k/v and the MLP's gate/up of every block read
    x T, T orthogonal (a principal rotation) or a general invertible matrix (a Fisher basis)."""
    from safetensors.torch import save_file

    _, layers, weights, levels = fake
    g = torch.Generator().manual_seed(1)

    def basis() -> torch.Tensor:
        q = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
        if request.param == "orthogonal":
            return q.contiguous()
        scale = torch.rand(D, generator=g) * 2.7 + 0.3  # condition number up to 10
        return (q * scale @ torch.linalg.qr(torch.randn(D, D, generator=g))[0]).contiguous()

    rot = {f"{i}.{grp}": basis() for i in range(N_LAYERS) for grp in ("attn", "mlp")}
    save_file(rot, str(tmp_path / "thr-rotation.safetensors"))
    doc = json.loads((tmp_path / "thr.json").read_text())
    doc["rotation"] = {"file": "thr-rotation.safetensors", "groups": ["attn", "mlp"]}
    (tmp_path / "thr-rot.json").write_text(json.dumps(doc))
    fresh = torch.nn.ModuleList([FakeLayer(w) for w in weights])
    runtime = SparseRuntime(str(tmp_path), str(tmp_path / "thr-rot.json"), N_LAYERS, torch.device("cpu"))
    runtime.install(fresh)
    return runtime, fresh, weights, levels, rot


def rotated_reference(x, weights, parts, threshold, t):
    """Mask x T with the column norms of W T⁻ᵀ, multiply by (W T⁻ᵀ)ᵀ: the WINA projection in basis T (W T⁻ᵀ is
    computed here by solving, not by sparsity.basis_weight, so the engine's helper is checked too)."""
    xr = x @ t
    out = []
    for p in parts:
        w = torch.linalg.solve(t.double(), weights[p].double().T).T.float()  # W T⁻ᵀ
        if torch.allclose(t.T @ t, torch.eye(t.shape[0]), atol=1e-5):
            torch.testing.assert_close(w, weights[p] @ t, rtol=1e-4, atol=1e-5)  # orthogonal: W T
        out.append(sp.wina_sparsify(xr, sp.column_norms(w), threshold) @ w.T)
    return torch.cat(out, -1)


def test_rotated_inputs_are_masked_in_the_rotated_basis_on_both_paths(rotated):
    runtime, layers, weights, levels, rot = rotated
    assert runtime.rotated_groups == ["attn", "mlp"]
    x = torch.randn(5, D)
    gate_up, qkv, down = layers[1].mlp.gate_up_proj, layers[0].self_attn.qkv_proj, layers[1].mlp.down_proj
    dense, _ = gate_up(x)
    runtime.begin([("a", 1, 3, "25")], total_rows=5)
    out, _ = gate_up(x)
    hx = torch.randn(5, D_FF)
    down_out, _ = down(hx)
    runtime.end()
    parts = ("gate_proj", "up_proj")
    torch.testing.assert_close(out[1:3], rotated_reference(x[1:3], weights[1], parts, levels["25"], rot["1.mlp"]),
                               rtol=1e-5, atol=1e-5)
    # Not the unrotated mask: the basis changes which inputs go.
    assert not torch.allclose(out[1:3], reference(x[1:3], weights[1], parts, levels["25"]), atol=1e-3)
    for row in (0, 3, 4):
        assert torch.equal(out[row], dense[row])
    # down_proj has no rotation: the plain WINA mask.
    torch.testing.assert_close(down_out[1:3], reference(hx[1:3], weights[1], ("down_proj",), levels["25"]))
    # Zeroed counts are of the rotated inputs.
    scores = torch.cat([sp.wina_scores(x[1:3] @ rot["1.mlp"],
                                       sp.column_norms(sp.basis_weight(weights[1][p], rot["1.mlp"])))
                        for p in parts], 1)
    down_scores = sp.wina_scores(hx[1:3], sp.column_norms(weights[1]["down_proj"]))
    expected = float((scores < levels["25"]).sum() + (down_scores < levels["25"]).sum()) / (2 * (2 * D + D_FF))
    assert runtime.report()["a"]["zeroed_fraction"] == pytest.approx(expected)

    x1 = torch.randn(1, D)  # batch-1 fast path: the GEMV runs on x Q with (W Q)ᵀ
    runtime.begin([("b", 0, 1, "50")], total_rows=1)
    fast, _ = qkv(x1)
    runtime.end()
    assert qkv.calls == [] and runtime.fast_path_calls == 1
    expected_fast = rotated_reference(x1, weights[0], ("q_proj", "k_proj", "v_proj"), levels["50"], rot["0.attn"])
    torch.testing.assert_close(fast, expected_fast, rtol=1e-5, atol=1e-5)
    runtime.rotate_gemv = None  # GPU / no native extension: x Q by a plain matmul, the same result
    runtime.begin([("c", 0, 1, "50")], total_rows=1)
    fast_mm, _ = qkv(x1)
    runtime.end()
    assert runtime.fast_path_calls == 2
    torch.testing.assert_close(fast_mm, expected_fast, rtol=1e-5, atol=1e-5)


def test_int8_bases_are_read_rounded_everywhere_and_walked_in_int8_on_the_fast_path(rotated, tmp_path):
    """A rotation file with int8 bases (`sparsity.quantize_rotations`): the mask path, the column norms and the
    weights use T~ = q * scale, and the batch-1 path computes x T~ with the int8 walk; both match the WINA
    reference in the basis T~."""
    from safetensors.torch import save_file

    _, layers, weights, levels, rot = rotated
    save_file(spfit.quantize_rotations(rot), str(tmp_path / "thr-rotation-int8.safetensors"))
    doc = json.loads((tmp_path / "thr-rot.json").read_text())
    doc["rotation"]["file"] = "thr-rotation-int8.safetensors"
    (tmp_path / "thr-int8.json").write_text(json.dumps(doc))
    rounded = sp.load_rotations(tmp_path / "thr-int8.json")
    assert 0 < float((rounded["0.attn"] - rot["0.attn"]).abs().max()) < 0.02  # really rounded, not much
    fresh = torch.nn.ModuleList([FakeLayer(w) for w in weights])
    runtime = SparseRuntime(str(tmp_path), str(tmp_path / "thr-int8.json"), N_LAYERS, torch.device("cpu"))
    runtime.install(fresh)
    qkv, gate_up = fresh[0].self_attn.qkv_proj, fresh[1].mlp.gate_up_proj
    parts = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(3, D)
    runtime.begin([("m", 0, 2, "25")], total_rows=3)
    out, _ = qkv(x)
    runtime.end()
    torch.testing.assert_close(out[:2], rotated_reference(x[:2], weights[0], parts, levels["25"], rounded["0.attn"]),
                               rtol=1e-5, atol=1e-5)
    calls = []
    walk = runtime.basis_int8
    runtime.basis_int8 = lambda *a: (calls.append(a[1].dtype), walk(*a))[1]
    x1 = torch.randn(1, D)
    runtime.begin([("f", 0, 1, "50")], total_rows=1)
    fast, _ = gate_up(x1)
    runtime.end()
    assert calls == [torch.int8] and runtime.fast_path_calls == 1
    expected = rotated_reference(x1, weights[1], ("gate_proj", "up_proj"), levels["50"], rounded["1.mlp"])
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)


def test_step_profile_splits_each_kind_of_step(rotated):
    from featurelens.server.worker.sparse import StepProfile

    runtime, layers, _, _, _ = rotated
    assert runtime.profile is None  # off unless FEATURELENS_SPARSE_PROFILE=1
    runtime.profile = StepProfile()

    def forward(x: torch.Tensor) -> None:
        for layer in layers:
            layer.self_attn.qkv_proj(x)
            layer.mlp.gate_up_proj(x)

    forward(torch.randn(1, D))  # a dense batch-1 step
    runtime.end()
    runtime.begin([("a", 0, 1, "50")], total_rows=1)  # a sparse batch-1 step: the fast path, inputs in basis T
    forward(torch.randn(1, D))
    runtime.end()
    runtime.begin([("b", 1, 2, "25")], total_rows=3)  # a mixed batch: the mask path
    forward(torch.randn(3, D))
    runtime.end()
    forward(torch.randn(4, D))  # a batch of quantized-mode rows (their own wrappers are not timed here)
    runtime.end(quantized=True)
    runtime.end()  # a forward without wrapped projections leaves no step
    report = runtime.profile.report()
    assert set(report) == {"dense 1 row", "sparse gemv", "sparse masked", "quantized batch"}
    assert all(row["steps"] == 1 for row in report.values())
    fast = report["sparse gemv"]
    assert fast["kernels"] > 0 and fast["basis"] > 0 and fast["wrappers"] > 0
    assert fast["projections"] == pytest.approx(fast["kernels"] + fast["basis"] + fast["wrappers"])
    for row in report.values():
        assert row["forward"] >= row["projections"] > 0 and row["rest"] == pytest.approx(row["forward"] - row["projections"])
    assert report["dense 1 row"]["kernels"] == report["sparse masked"]["kernels"] == 0
    runtime.profile.reset()
    assert runtime.profile.report() == {}


def test_a_rotation_file_with_an_unknown_group_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.down": torch.eye(4)}, str(tmp_path / "r.safetensors"))
    (tmp_path / "t.json").write_text(json.dumps({"levels": {"25": {}}, "rotation": {"file": "r.safetensors"}}))
    with pytest.raises(ValueError, match="unknown rotation groups"):
        sp.load_rotations(tmp_path / "t.json")
    (tmp_path / "plain.json").write_text(json.dumps({"levels": {"25": {}}}))
    assert sp.load_rotations(tmp_path / "plain.json") is None


def test_weight_files_maps_every_shard_once_and_is_read_only(tmp_path):
    """Sparse mode, quantized mode and the int8 head share one name -> file map per model folder."""
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.ones(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    files = weight_files(str(tmp_path))
    assert dict(files) == {"a.weight": str(tmp_path / "model-00001-of-00002.safetensors"),
                           "b.weight": str(tmp_path / "model-00002-of-00002.safetensors")}
    assert weight_files(str(tmp_path)) is files  # cached: the headers are read once
    with pytest.raises(TypeError):
        files["c.weight"] = "elsewhere"  # type: ignore[index]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        weight_files(str(empty))


def test_prompt_rows_run_dense_unless_the_server_sparsifies_prompts(fake):
    """Each request's rows in a step are consecutive positions; by default only positions >= its prompt length
    (generated tokens) run sparse: a prefill chunk not at all, a decode row fully, and a chunk that re-computes
    prompt + generated tokens (a resumed request) only from the prompt's end on."""
    from types import SimpleNamespace as Req

    runtime = fake[0]
    reqs = [Req(key="prefill", start=0, end=4, first=0, sparse="25", num_prompt_tokens=10),  # positions 0..3
            Req(key="decode", start=4, end=5, first=7, sparse="50", num_prompt_tokens=3),  # position 7
            Req(key="resumed", start=5, end=10, first=6, sparse="25", num_prompt_tokens=8)]  # positions 6..10
    assert runtime.rows_of(reqs) == [("decode", 4, 5, "50"), ("resumed", 7, 10, "25")]
    runtime.prompt = True
    assert runtime.rows_of(reqs) == [("prefill", 0, 4, "25"), ("decode", 4, 5, "50"), ("resumed", 5, 10, "25")]
    assert runtime.rows_of([]) == []


def test_sparse_requests_get_their_own_prefix_cache_namespace():
    from featurelens.server.api import _cache_salt

    assert _cache_salt(None, 0) is None and _cache_salt("steer", 0) == "steer"  # dense: unchanged
    salts = {_cache_salt(None, 25), _cache_salt(None, 40), _cache_salt("steer", 40)}
    assert len(salts) == 3 and None not in salts
    # The prompt runs dense and generated tokens sparse: KV depends on where the prompt ends, so a follow-up
    # turn whose prompt holds the last (sparse) answer gets another namespace; with --sparse-prompt it does not.
    assert _cache_salt(None, 40, num_prompt_tokens=12) != _cache_salt(None, 40, num_prompt_tokens=30)
    assert _cache_salt(None, 40, 0, 12, sparse_prompt=True) == _cache_salt(None, 40, 0, 30, sparse_prompt=True)


# -- the real engine over gRPC -----------------------------------------------------------------------------
