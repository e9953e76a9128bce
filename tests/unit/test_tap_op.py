"""The tap op (server/worker/tap.py) on the CPU: its registration passes torch's own op checks, and a small
fused-residual stack with call sites gives the same rows under torch.compile (Inductor) as in eager mode, with
the handler really called at every active layer each step (the op is not traced away) and rows nobody steers
left bit-identical. tools/gpu_check.py repeats this with CUDA graphs on a GPU."""

from __future__ import annotations

import pytest
import torch
from featurelens.server.worker import tap
from torch import nn

D, ROWS, LAYERS = 16, 6, 3
STEERED = [1, 4]  # rows the handler edits; the others must not change by a bit


class Block(nn.Module):
    """vLLM's fused-residual shape: returns (hidden, residual), the stream being their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.up = nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)

    def forward(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return self.down(torch.nn.functional.silu(self.up(self.norm(residual)))), residual


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x):
        hidden, residual = x, None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        return hidden + residual


def _stack(taps: bool) -> Stack:
    torch.manual_seed(0)
    stack = Stack().eval()
    if taps:
        for layer, block in enumerate(stack.blocks):
            block.register_forward_hook(tap.call_site(layer))
    return stack


class Steer:
    """A handler like the server's: adds strength * direction to the rows in a persistent index buffer (rewritten
    per step), and counts its calls per layer."""

    def __init__(self) -> None:
        self.rows = torch.tensor(STEERED)
        self.direction = torch.linspace(-1.0, 1.0, D)
        self.strength = torch.tensor([2.0, -3.0])
        self.calls: list[int] = []

    def __call__(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        self.calls.append(layer)
        hidden.index_add_(0, self.rows, self.strength[:, None] * self.direction)


@pytest.fixture(autouse=True)
def _quiet_tap():
    yield
    tap.set_handler(None)
    tap.set_active(frozenset())


@pytest.fixture(scope="module")
def compiled():
    """One Inductor compile for the module (the call sites are in place before it, as install_taps does);
    `graphs` counts how often Dynamo handed a graph to Inductor."""
    from torch._inductor.compile_fx import compile_fx

    graphs: list[int] = []

    def backend(gm, example_inputs):
        graphs.append(sum(1 for node in gm.graph.nodes if "featurelens.tap" in str(node.target)))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    stack = _stack(taps=True)
    yield stack, torch.compile(stack, backend=backend, fullgraph=True), graphs
    torch._dynamo.reset()


def _run(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.clone())


def test_opcheck_the_registered_op():
    steer = Steer()
    tap.set_handler(steer)
    tap.set_active(frozenset({0, 2}))
    hidden, residual = torch.randn(ROWS, D), torch.randn(ROWS, D)
    for args in ((hidden, residual, 0), (hidden, None, 2), (hidden, residual, 1)):  # 1: inactive
        torch.library.opcheck(torch.ops.featurelens.tap.default, args)
    assert steer.calls and set(steer.calls) == {0, 2}


def test_op_edits_hidden_in_place_only_for_active_layers():
    steer = Steer()
    tap.set_handler(steer)
    tap.set_active(frozenset({1}))
    hidden = torch.randn(ROWS, D)
    before = hidden.clone()
    torch.ops.featurelens.tap(hidden, None, 0)
    assert torch.equal(hidden, before) and steer.calls == []
    torch.ops.featurelens.tap(hidden, None, 1)
    assert steer.calls == [1]
    untouched = [row for row in range(ROWS) if row not in STEERED]
    assert torch.equal(hidden[untouched], before[untouched])
    assert torch.allclose(hidden[STEERED], before[STEERED] + steer.strength[:, None] * steer.direction)


def test_idle_call_sites_are_bit_identical_to_none():
    x = torch.randn(ROWS, D)
    want = _run(_stack(taps=False), x)
    tapped = _stack(taps=True)
    assert torch.equal(_run(tapped, x), want)  # no handler
    tap.set_handler(Steer())
    assert torch.equal(_run(tapped, x), want)  # a handler, no active layer


def test_call_sites_on_a_plain_tensor_output():
    block = nn.Linear(D, D)
    block.register_forward_hook(tap.call_site(5))
    seen: list[tuple[int, bool]] = []
    tap.set_handler(lambda layer, hidden, residual: seen.append((layer, residual is None)))
    tap.set_active(frozenset({5}))
    block(torch.randn(ROWS, D))
    assert seen == [(5, True)]


def test_compiled_steering_equals_eager_and_calls_the_handler_every_step(compiled):
    stack, model, graphs = compiled
    steer = Steer()
    tap.set_handler(steer)
    untouched = [row for row in range(ROWS) if row not in STEERED]
    traced = len(graphs)
    # Steps with different active layers and inputs: the same compiled code serves all of them, and the
    # handler runs at exactly the active layers of each step (traced away, it would run once or never).
    for step, (active, seed) in enumerate((({1}, 1), ({0, 2}, 2), (set(), 3), ({0, 2}, 4))):
        x = torch.randn(ROWS, D, generator=torch.Generator().manual_seed(seed))
        tap.set_active(frozenset())
        base = _run(model, x)
        tap.set_active(frozenset(active))
        steer.calls = []
        eager = _run(stack, x)
        assert sorted(steer.calls) == sorted(active)
        steer.calls = []
        got = _run(model, x)
        assert sorted(steer.calls) == sorted(active), f"step {step}: handler calls {steer.calls}"
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[untouched], base[untouched]), f"step {step}: an unsteered row changed"
        if active:  # steering reached the compiled output (not trivially equal to the unsteered run)
            assert (got[STEERED] - base[STEERED]).abs().max() > 0.1
        else:
            assert torch.equal(got, base)
    # At most one trace for all the steps (none if an earlier test traced), each graph holding every call site
    assert len(graphs) - traced <= 1 and set(graphs) == {LAYERS}


def test_compiled_idle_taps_are_bit_identical_to_a_compiled_stack_without_them(compiled):
    _, model, _ = compiled
    x = torch.randn(ROWS, D)
    # A fresh Dynamo cache: the stack without call sites gets a trace of its own rather than a guard-matched
    # reuse of the tapped one (`model` then traces again on its next call, still with its call sites).
    torch._dynamo.reset()
    want = _run(torch.compile(_stack(taps=False), fullgraph=True), x)
    assert torch.equal(_run(model, x), want)  # no handler
    tap.set_handler(Steer())
    assert torch.equal(_run(model, x), want)  # a handler, no active layer
