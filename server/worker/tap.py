"""The featurelens tap: one registered custom op (`torch.ops.featurelens.tap`) called at every decoder layer's
output, which is where capture, steering and the risk probe's features happen.

Why an op and not a Python forward hook: torch.compile traces a hook's Python into the graph once (with the
batch it saw then) and CUDA-graph replay never runs Python at all, so hooks only work in eager mode. The op is
opaque to the compiler (its fake implementation says it only writes `hidden` in place) and is listed in vLLM's
splitting ops (`SPLITTING_OPS`), so a compiled model keeps one call per layer that runs our Python each step:
- eager mode: the call is a plain op call;
- vLLM's compiled mode on CPU (Dynamo traced once, Inductor): the op is an extern call inside the compiled code;
- vLLM's compiled mode on GPU: the graph is split around it, the pieces between taps are captured as piecewise
  CUDA graphs, and the tap runs eagerly between replays (the engine asks for PIECEWISE graphs, not FULL ones,
  when interpretability is on: a full graph would freeze the tap's Python).

The call sites are installed when vLLM loads the model, before its first forward compiles anything
(`install_at_load` patches the worker's `load_model`; the worker extension module calls it when vLLM imports
it, which is before the worker is built). With nobody listening the op returns at once: a layer no request taps
costs one op dispatch. The worker extension sets the handler (`set_handler`) and the layers it must look at
this step (`set_active`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

OP = "featurelens::tap"
SPLITTING_OPS = (OP,)  # added to vLLM's splitting ops (and so to its compile-cache key) by the engine
Handler = Callable[[int, torch.Tensor, "torch.Tensor | None"], None]

_handler: Handler | None = None
_active: frozenset[int] = frozenset()  # layers some request (or a harvest) taps in the current step
_calls = 0  # times the op ran in this process: > 0 after vLLM's warm-up forward iff the call sites are in the model


def calls() -> int:
    """How often the op ran in this process. The worker reads it after vLLM's warm-up: a compiled model that
    never called it has no call sites (a compile cache from an engine without them), and the engine then
    refuses interpretability instead of serving empty features."""
    return _calls


def tap(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    """The residual stream after decoder layer `layer` is hidden (+ residual, for vLLM's fused-residual
    layers). The handler may edit `hidden` in place (steering) and read both (capture, risk)."""
    global _calls
    _calls += 1
    handler = _handler
    if handler is not None and layer in _active:
        handler(layer, hidden, residual)


def _tap_fake(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    return None


# Registered with torch.library.Library rather than the @custom_op decorator: a call through the decorator's
# wrapper cost 17.8 us, through a plain CompositeExplicitAutograd kernel 1.6 us (both measured on the 2-core
# Zen 5 box, an inactive layer, i.e. what every untapped layer pays per step: ~0.5 ms vs ~0.05 ms per step
# for 30 layers, 3% vs 0.3% of a batch-1 decode step of the default model). Same schema, same fake kernel.
_LIB = torch.library.Library("featurelens", "DEF")
_LIB.define("tap(Tensor(a!) hidden, Tensor? residual, int layer) -> ()")
_LIB.impl("tap", tap, "CompositeExplicitAutograd")
torch.library.register_fake(OP, _tap_fake, lib=_LIB)


def set_handler(handler: Handler | None) -> None:
    global _handler
    _handler = handler


def set_active(layers: frozenset[int]) -> None:
    """The layers the handler is called for until the next call (per step; empty between steps)."""
    global _active
    _active = layers


def active() -> frozenset[int]:
    return _active


TAPPED = "_featurelens_taps"  # attribute on the model: the number of layers with a call site


def install_taps(model: torch.nn.Module) -> int:
    """A call site at the output of every decoder layer of `model` (a vLLM model; the layers are found by the
    family adapter). Idempotent. Returns the number of layers tapped."""
    from featurelens.server.worker.model import resolve_layout

    done = getattr(model, TAPPED, None)
    if done is not None:
        return int(done)
    layout = resolve_layout(model)
    for index, block in enumerate(layout.layers):
        block.register_forward_hook(call_site(index))
    setattr(model, TAPPED, len(layout.layers))
    return len(layout.layers)


def call_site(layer: int) -> Callable[[Any, Any, Any], None]:
    # A forward hook whose only work is the op call: Dynamo inlines module hooks present when it traces, so
    # the compiled graph holds the op and nothing of this Python. Shapes as the layer returns them (HF's
    # [1, tokens, hidden] for vLLM's Transformers backend); the handler takes the [tokens, hidden] view.
    def call(module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            torch.ops.featurelens.tap(output, None, layer)
        elif isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
            second = output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) else None
            torch.ops.featurelens.tap(output[0], second, layer)

    return call


def install_at_load() -> bool:
    """Patch vLLM's GPU/CPU worker so the taps (and the runner adapter's per-step bookkeeping) are installed
    right after the model is loaded, before vLLM compiles or captures it. Idempotent; False when vLLM's
    worker cannot be imported (then nothing is patched)."""
    if os.environ.get("FEATURELENS_NO_TAPS") == "1":  # `featurelens bench interp --compiled` only: the
        return False  # compiled engine without call sites, to measure what the taps cost when unused
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as error:  # noqa: BLE001 - no vLLM worker here (client-only or test process)
        log.debug("featurelens taps: vLLM's worker not importable: %s", error)
        return False
    original = Worker.load_model
    if getattr(original, "featurelens_wrapped", False):
        return True

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        from featurelens.server.worker.runner import attach_adapter

        runner = self.model_runner
        count = install_taps(runner.get_model())
        adapter = attach_adapter(runner)  # UnsupportedRunner names a runner we cannot map, at start-up
        log.info("featurelens: taps at %d decoder layers (op %s); %s", count, OP, adapter.describe())
        return out

    load_model.featurelens_wrapped = True  # type: ignore[attr-defined]
    Worker.load_model = load_model  # type: ignore[method-assign]
    return True
