"""Row-wise top-k (kernels/topk.py, native C++ with torch.topk fallback) against torch.topk."""

from __future__ import annotations

import pytest
import torch
from featurelens.kernels import topk as tk

native = pytest.mark.skipif(tk.native_status() != "native", reason=f"native top-k: {tk.native_status()}")


def _check(x: torch.Tensor, k: int, backend: str) -> None:
    values, indices = tk.topk_rows(x, k, backend=backend)
    expected = torch.topk(x, k, dim=-1).values
    assert values.shape == indices.shape == (x.shape[0], k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    torch.testing.assert_close(values, expected, rtol=0, atol=0, equal_nan=True)
    # The indices point at those values, each at most once per row.
    torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row)) == k for row in indices.tolist())


@native
@pytest.mark.parametrize("rows", [1, 3, 32, 70])
@pytest.mark.parametrize("n,k", [(4096, 1), (4096, 8), (4096, 32), (4096, 80), (4096, 4096), (4100, 80),
                                 (100, 7), (96, 96), (16384, 64)])
def test_native_equals_torch_topk_on_random_rows(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows * 7919 + n + k)
    _check(torch.randn(rows, n, generator=g) * 3 - 1, k, "native")


@native
def test_native_handles_ties_adversarial_layouts_and_non_finite_values() -> None:
    g = torch.Generator().manual_seed(0)
    n = 4096
    ties = torch.randint(0, 5, (8, n), generator=g).float()  # thousands of exact ties per row
    zeros = torch.zeros(4, n)
    ascending = torch.arange(n, dtype=torch.float32).repeat(3, 1)  # the top k all sit in the last groups
    one_group = torch.full((2, n), -5.0)
    one_group[:, ::256] = torch.arange(16, dtype=torch.float32)  # every large value in the same stride group
    special = torch.randn(6, n, generator=g)
    special[0, 17] = float("nan")
    special[1, [3, 900, 4000]] = float("nan")
    special[2, 5] = float("inf")
    special[3, :] = float("-inf")
    special[4, 100:] = float("nan")
    special[5, ::2] = float("-inf")
    for x in (ties, zeros, ascending, one_group, special):
        for k in (1, 8, 80, 300):
            _check(x, k, "native")


@native
def test_native_accepts_non_contiguous_input() -> None:
    x = torch.randn(4096, 40).t()  # [40, 4096], transposed view
    _check(x, 16, "native")


def test_fallback_and_errors() -> None:
    x = torch.randn(5, 300, dtype=torch.float64)
    _check(x, 10, "auto")  # not float32: torch.topk
    _check(x.float(), 10, "torch")
    with pytest.raises(ValueError, match="backend"):
        tk.topk_rows(x, 3, backend="fast")
    with pytest.raises(ValueError, match="float32"):
        tk.topk_rows(x, 3, backend="native")
    if tk.native_status() == "native":
        with pytest.raises(RuntimeError, match="k must be"):
            tk.topk_rows(x.float(), 301, backend="native")
