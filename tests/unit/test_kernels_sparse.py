"""Sparse GEMV kernels (native C++, Triton interpreted, torch fallback) against the dense matmul of the masked input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from featurelens.kernels import sparse_gemv as sg

IN, OUT = 200, 130  # odd sizes: exercise the 4-row, 8-column and 64-column-block tails


def _case(sparsity: float, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(IN, generator=g)
    x[torch.rand(IN, generator=g) < sparsity] = 0
    weight = torch.randn(OUT, IN, generator=g).to(dtype)  # nn.Linear layout [out, in]
    return x, weight


def _dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().t()


@pytest.fixture(scope="module")
def native() -> None:
    if not sg.native_available():
        pytest.skip(f"native kernel unavailable: {sg.native_status()}")


# Triton decides interpretation when `triton` is first imported and patches `triton.language` for it; once
# vLLM (imported by other test modules in the same session) has imported triton normally, the interpreter
# fails with "Cannot call @triton.jit'd outside of the scope of a kernel". So the Triton cases run in a fresh
# interpreter with TRITON_INTERPRET=1 set from the start; inputs and outputs travel as safetensors files.
_TRITON_SCRIPT = """
import sys
from safetensors.torch import load_file, save_file
import torch
from featurelens.kernels.triton_sparse import sparse_gemv_parts_triton, sparse_gemv_triton
cases = load_file(sys.argv[1])
out = {}
parts = {key.split(".", 1)[1]: value for key, value in cases.items() if key.startswith("parts.")}
if parts:
    result = torch.full((parts["w0"].shape[1] + parts["w1"].shape[1],), float("nan"))
    zeroed = sparse_gemv_parts_triton(parts["x"], [parts["w0"], parts["w1"]], parts["norms"],
                                      parts["thresholds"].tolist(), result)
    out["parts.out"], out["parts.zeroed"] = result, torch.tensor(zeroed)
for name in sorted({key.split(".")[0] for key in cases} - {"parts"}):
    norms = cases.get(name + ".norms")
    threshold = float(cases[name + ".threshold"]) if norms is not None else 0.0
    out[name] = sparse_gemv_triton(cases[name + ".x"], cases[name + ".w_t"], norms, threshold)
save_file(out, sys.argv[2])
"""
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def _wina_case() -> tuple[torch.Tensor, torch.Tensor]:
    return _case(0.0, seed=1)


def _wina_threshold(x: torch.Tensor, norms: torch.Tensor) -> float:
    return float((x.abs() * norms).median())


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Every Triton case of this module, computed in one interpreted subprocess."""
    pytest.importorskip("triton")
    from featurelens.server.modes.sparsity import column_norms
    from safetensors.torch import load_file, save_file

    flat: dict[str, torch.Tensor] = {}
    for sparsity in SPARSITIES:
        x, weight = _case(sparsity)
        flat[f"masked{int(sparsity * 100)}.x"] = x
        flat[f"masked{int(sparsity * 100)}.w_t"] = sg.transpose_weight(weight)
    x, weight = _wina_case()
    norms = column_norms(weight)
    flat.update({"wina.x": x, "wina.w_t": sg.transpose_weight(weight), "wina.norms": norms,
                 "wina.threshold": torch.tensor(_wina_threshold(x, norms))})
    # The engine's GPU entry: two parts (like gate|up) of one input, each with its own WINA threshold.
    x, w0 = _case(0.2, seed=7)
    w1 = _case(0.2, seed=8)[1][:57]
    parts_norms = torch.stack([column_norms(w0), column_norms(w1)])
    flat.update({"parts.x": x, "parts.w0": sg.transpose_weight(w0), "parts.w1": sg.transpose_weight(w1),
                 "parts.norms": parts_norms,
                 "parts.thresholds": torch.tensor([_wina_threshold(x, parts_norms[0]), 0.0])})
    tmp = tmp_path_factory.mktemp("triton")
    save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp / "in.safetensors"))
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(tmp / "in.safetensors"), str(tmp / "out.safetensors")],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(tmp / "out.safetensors"))


def _run(backend: str, request: pytest.FixtureRequest, key: str, x: torch.Tensor, w_t: torch.Tensor,
         *extra: object) -> torch.Tensor:
    """The backend's result: Triton's comes from the interpreted subprocess, computed on the same inputs."""
    if backend == "triton":
        return request.getfixturevalue("triton_results")[key]
    if backend == "native":
        request.getfixturevalue("native")
    return sg.sparse_gemv(x, w_t, *extra, backend=backend)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_fp32_equals_dense_matmul_of_masked_input(sparsity: float, backend: str, request: pytest.FixtureRequest) -> None:
    x, weight = _case(sparsity)
    y = _run(backend, request, f"masked{int(sparsity * 100)}", x, sg.transpose_weight(weight))
    assert y.shape == (OUT,) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _dense(x, weight), rtol=1e-5, atol=1e-4)
    if sparsity == 1.0:
        assert torch.count_nonzero(y) == 0


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_fused_wina_threshold_equals_masking_first(backend: str, request: pytest.FixtureRequest) -> None:
    from featurelens.server.modes.sparsity import column_norms, wina_sparsify

    x, weight = _wina_case()
    norms = column_norms(weight)
    threshold = _wina_threshold(x, norms)
    y = _run(backend, request, "wina", x, sg.transpose_weight(weight), norms, threshold)
    torch.testing.assert_close(y.double(), _dense(wina_sparsify(x, norms, threshold), weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bf16_weights_and_activations(backend: str, native: None) -> None:
    x, weight = _case(0.5, torch.bfloat16, seed=2)
    x = x.to(torch.bfloat16)
    y = sg.sparse_gemv(x[None], sg.transpose_weight(weight), backend=backend)  # [1, in] -> [1, out]
    assert y.shape == (1, OUT) and y.dtype == torch.bfloat16
    # fp32 accumulation of exact bf16 products, then one rounding to bf16.
    torch.testing.assert_close(y[0].float(), _dense(x.float(), weight.float()).float(), rtol=1e-2, atol=2e-2)


def test_fallback_when_native_disabled(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FEATURELENS_SPARSE_NATIVE", "0")
    sg._native_module.cache_clear()
    sg._log_fallback_once.cache_clear()
    try:
        assert not sg.native_available()
        assert "FEATURELENS_SPARSE_NATIVE=0" in sg.native_status()
        assert "pure-torch fallback" in caplog.text
        x, weight = _case(0.5, seed=3)
        torch.testing.assert_close(sg.sparse_gemv(x, sg.transpose_weight(weight)).double(), _dense(x, weight),
                                   rtol=1e-5, atol=1e-4)
        with pytest.raises(RuntimeError, match="unavailable"):
            sg.sparse_gemv(x, sg.transpose_weight(weight), backend="native")
    finally:
        sg._native_module.cache_clear()


def test_rejects_batches_and_mismatched_shapes() -> None:
    x, weight = _case(0.5)
    with pytest.raises(ValueError, match="batch-1"):
        sg.sparse_gemv(torch.stack([x, x]), sg.transpose_weight(weight))
    with pytest.raises(ValueError, match="does not match"):
        sg.sparse_gemv(x, weight)  # not transposed


def _parts_kernel(backend: str, request: pytest.FixtureRequest):  # noqa: ANN202 - the kernel callable
    if backend == "native":
        request.getfixturevalue("native")
        return sg._native_module()[0].sparse_gemv_parts
    return sg.sparse_gemv_parts_torch


@pytest.mark.parametrize("out_dtype", ["x", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_parts_mask_each_part_by_its_own_threshold(backend: str, dtype: torch.dtype, out_dtype: str,
                                                   request: pytest.FixtureRequest) -> None:
    """The engine's entry for a fused module (q|k|v): each part is the dense matmul of the input masked by that
    part's WINA threshold, written into its own columns of `out`; the count is the inputs zeroed over all parts.
    One part is wider than a 2048-column pass and one is narrower than a SIMD vector."""
    from featurelens.server.modes.sparsity import column_norms, wina_mask, wina_sparsify

    g = torch.Generator().manual_seed(7)
    x = torch.randn(IN, generator=g)
    x[:9] = 0  # exact zeros are zeroed inputs too
    x = x.to(dtype)
    weights = [torch.randn(width, IN, generator=g).to(dtype) for width in (130, 2100, 5)]
    norms = torch.stack([column_norms(w) for w in weights]).contiguous()
    scores = x.float().abs() * norms
    thresholds = [float(torch.quantile(s, q)) for s, q in zip(scores, (0.2, 0.5, 0.8), strict=True)]
    out = torch.full((sum(w.shape[0] for w in weights),), float("nan"),
                     dtype=dtype if out_dtype == "x" else torch.float32)
    zeroed = _parts_kernel(backend, request)(x, [sg.transpose_weight(w) for w in weights], norms, thresholds, out)
    expected = torch.cat([_dense(wina_sparsify(x.float(), n, t), w.float())
                          for w, n, t in zip(weights, norms, thresholds, strict=True)])
    tol = {"rtol": 1e-5, "atol": 1e-4} if out.dtype == torch.float32 and dtype == torch.float32 else \
        {"rtol": 1e-2, "atol": 3e-2}
    torch.testing.assert_close(out.double(), expected, **tol)
    assert zeroed == sum(int((~wina_mask(x.float(), n, t) | (x == 0)).sum())
                         for n, t in zip(norms, thresholds, strict=True))
    assert 0.45 * 3 * IN < zeroed < 0.6 * 3 * IN  # 20% + 50% + 80% of the inputs (and the 9 zeros)


def test_parts_reject_a_wrong_output_size(native: None) -> None:
    x, weight = _case(0.5)
    norms = torch.ones(1, IN)
    with pytest.raises(RuntimeError, match="out has"):
        sg._native_module()[0].sparse_gemv_parts(x, [sg.transpose_weight(weight)], norms, [0.1], torch.empty(OUT + 1))
    with pytest.raises(RuntimeError, match="one threshold per weight"):
        sg._native_module()[0].sparse_gemv_parts(x, [sg.transpose_weight(weight)], norms, [0.1, 0.2], torch.empty(OUT))


@pytest.mark.parametrize("n_out", [576, 2100, 13])
@pytest.mark.parametrize("out_dtype", ["x", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_basis_walk_equals_x_times_the_dequantized_basis(dtype: torch.dtype, out_dtype: str, n_out: int,
                                                              native: None) -> None:
    """`basis_gemv_int8` (x T for a basis stored as int8 rows with per-row scales) equals x @ (q * scale) in
    float32, the torch reference equals it too, and a wrong shape is refused."""
    from featurelens.kernels.int8_gemm import quantize_weight

    g = torch.Generator().manual_seed(11)
    x = torch.randn(IN, generator=g)
    x[:5] = 0
    x = x.to(dtype)
    q, scale = quantize_weight(torch.randn(IN, n_out, generator=g) * torch.rand(IN, 1, generator=g))
    expected = (x.double() * scale.double()) @ q.double()
    out = torch.full((n_out,), float("nan"), dtype=dtype if out_dtype == "x" else torch.float32)
    sg._native_module()[0].basis_gemv_int8(x, q, scale, out)
    tol = {"rtol": 1e-5, "atol": 1e-4} if out.dtype == torch.float32 else {"rtol": 1e-2, "atol": 3e-2}
    torch.testing.assert_close(out.double(), expected, **tol)
    ref = torch.empty_like(out)
    sg.basis_gemv_int8_torch(x, q, scale, ref)
    torch.testing.assert_close(ref.double(), expected, **tol)
    with pytest.raises(RuntimeError, match="out must be"):
        sg._native_module()[0].basis_gemv_int8(x, q, scale, torch.empty(n_out + 1))
    with pytest.raises(RuntimeError, match="q must be"):
        sg._native_module()[0].basis_gemv_int8(x, q.float(), scale, out)


def test_allocation_bench_times_every_shipped_allocation_on_real_decode_inputs() -> None:
    """bench.kernels.allocation_step_times (what `bench modes` prints per allocation): dense and every shipped
    allocation are timed, and the kernel calls really zero about the level's share of the inputs (the count
    comes from the native call with each allocation's thresholds; dense zeroes none)."""
    from featurelens.server.bench.kernels import allocation_step_times
    from featurelens.server.modes.sparsity import DEFAULT_THRESHOLDS

    data = json.loads(DEFAULT_THRESHOLDS.read_text())
    res = allocation_step_times(("40",), rounds=1, prompts=2, tokens=2)["40"]
    shipped = {"uniform", data["allocation"]} | {k[len("levels_"):] for k in data if k.startswith("levels_")}
    assert set(res) == {"dense"} | (shipped & {"uniform", "layerwise", "projection"})
    assert res["dense"]["zeroed"] == 0.0
    for name, r in res.items():
        assert r["us"] > 0
        if name != "dense":
            assert 0.3 < r["zeroed"] < 0.5, (name, r)


@pytest.mark.parametrize("level", ["l1", "l2"])
def test_prefetch_level_changes_speed_not_results(level: str, native: None) -> None:
    """The walks at either prefetch level give bit-identical results (prefetches carry no data), for the
    bf16 walk, the fused parts and the int8 basis walk; `set_prefetch` reports the level it switched to."""
    default = sg.prefetch_level()
    assert default in ("l1", "l2")
    x, weight = _case(0.4, torch.bfloat16, seed=5)
    x = x.to(torch.bfloat16)
    w_t = sg.transpose_weight(weight)
    norms = torch.stack([weight.float().norm(dim=0)] * 2)
    q = torch.randint(-127, 128, (IN, 576), dtype=torch.int8)
    scales = torch.rand(IN) * 0.01

    def run() -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        parts = torch.empty(2 * OUT, dtype=torch.bfloat16)
        zeroed = sg.parts_kernel()(x, [w_t, w_t], norms, [0.0, 0.5], parts)
        basis = torch.empty(576, dtype=torch.float32)
        sg.basis_int8_kernel()(x, q, scales, basis)
        return sg.sparse_gemv(x, w_t, backend="native"), parts, zeroed, basis

    try:
        reference = run()
        assert sg.set_prefetch(level) == level and sg.prefetch_level() == level
        switched = run()
    finally:
        assert sg.set_prefetch(default) == default
    for a, b in zip(reference, switched, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    with pytest.raises(RuntimeError, match="'l1', 'l2' or 'auto'"):
        sg.set_prefetch("l3")
    assert sg.prefetch_level() == default


_PREFETCH_SCRIPT = """
import json, logging
logging.basicConfig(level=logging.WARNING)
from featurelens.kernels import sparse_gemv as sg
print(json.dumps({"level": sg.prefetch_level(), "auto": sg.set_prefetch("auto")}))
"""


@pytest.mark.parametrize(("env", "expected"), [("l1", "l1"), ("l2", "l2"), ("bogus", None)])
def test_prefetch_env_sets_the_level_at_load(env: str, expected: str | None, native: None) -> None:
    """FEATURELENS_PREFETCH=l1|l2 picks the level when the extension loads; an unknown value is named in a
    warning and auto (L2 on AMD, L1 elsewhere) is used."""
    proc = subprocess.run([sys.executable, "-c", _PREFETCH_SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FEATURELENS_PREFETCH": env}, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    is_amd = "AuthenticAMD" in open("/proc/cpuinfo").read()
    assert result["auto"] == ("l2" if is_amd else "l1")
    assert result["level"] == (expected or result["auto"])
    if expected is None:
        assert "FEATURELENS_PREFETCH='bogus' is not one of l1, l2, auto; using auto" in proc.stderr


def test_triton_parts_entry_matches_the_torch_reference(triton_results: dict[str, torch.Tensor]) -> None:
    """`sparse_gemv_parts_triton` (what the engine's fast path runs on GPU) fills every part's columns with the
    masked GEMV under that part's threshold and counts the zeroed inputs as the reference does."""
    from featurelens.server.modes.sparsity import column_norms

    x, w0 = _case(0.2, seed=7)
    w1 = _case(0.2, seed=8)[1][:57]
    norms = torch.stack([column_norms(w0), column_norms(w1)])
    thresholds = [_wina_threshold(x, norms[0]), 0.0]
    expected = torch.empty(OUT + 57)
    zeroed = sg.sparse_gemv_parts_torch(x, [sg.transpose_weight(w0), sg.transpose_weight(w1)], norms, thresholds,
                                        expected)
    torch.testing.assert_close(triton_results["parts.out"], expected, rtol=1e-5, atol=1e-4)
    assert int(triton_results["parts.zeroed"]) == zeroed > 0


def test_parts_kernel_is_chosen_by_device() -> None:
    assert sg.parts_kernel("cpu") in (sg.sparse_gemv_parts_torch, getattr(sg._native_module()[0], "sparse_gemv_parts", None))
    assert sg.parts_kernel("meta") is sg.sparse_gemv_parts_torch  # neither CPU nor CUDA: the torch gather
    pytest.importorskip("triton")
    from featurelens.kernels.triton_sparse import sparse_gemv_parts_triton

    assert sg.parts_kernel("cuda") is sparse_gemv_parts_triton  # chosen by device type; no GPU needed to pick it
