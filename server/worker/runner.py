"""The runner adapter: which rows of a step's flattened batch belong to which featurelens request, read from
whichever vLLM model runner the worker has. Everything it returns is host data the runner already keeps on the
host for its own input preparation, so building a step's view never synchronises with the device.

- V1 (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, and its CPU subclass): the persistent `input_batch`
  (req_ids, num_computed_tokens_cpu), `query_start_loc.np`, and `requests[req_id]` with its SamplingParams.
- V2 (`vllm.v1.worker.gpu.model_runner.GPUModelRunner`, vLLM's default on CUDA when Triton works): the step's
  `InputBatch` (req_ids, query_start_loc_np, num_computed_tokens_np, prefill_len_np) is a local of
  execute_model, so the adapter keeps the one `prepare_inputs` returns, and keeps each request's featurelens
  spec from the scheduler's new-request data (V2 keeps no SamplingParams per request).

Anything else fails at start-up with `UnsupportedRunner` naming the runner class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

ADAPTER_ATTR = "_featurelens_adapter"


class UnsupportedRunner(RuntimeError):
    """The worker's model runner is not one the adapter can map to requests."""


@dataclass(frozen=True)
class StepRow:
    """One featurelens request's rows in this step: rows [start, end) of the flattened batch hold its token
    positions first, first + 1, ...; `index` is its row in the runner's batch (logits order)."""

    index: int
    spec: dict[str, Any]
    start: int
    end: int
    first: int
    num_prompt_tokens: int


class RunnerAdapter(Protocol):
    def step_rows(self) -> tuple[list[StepRow], int]:
        """This step's featurelens requests and the number of requests in the batch."""
        ...

    def active_requests(self) -> int:
        ...

    def describe(self) -> str:
        ...


def _spec_of(params: Any) -> dict[str, Any] | None:
    extra = getattr(params, "extra_args", None) if params is not None else None
    return extra.get("featurelens") if extra else None


class V1Adapter:
    """vLLM's V1 model runner (GPU and CPU): reads its persistent batch."""

    def __init__(self, runner: Any) -> None:
        for name in ("input_batch", "requests", "query_start_loc"):
            if not hasattr(runner, name):
                raise UnsupportedRunner(f"{type(runner).__name__} looks like vLLM's V1 runner but has no {name}")
        self.runner = runner

    def step_rows(self) -> tuple[list[StepRow], int]:
        runner = self.runner
        batch = runner.input_batch
        num_reqs = int(batch.num_reqs)
        query_start = runner.query_start_loc.np
        computed = batch.num_computed_tokens_cpu
        out = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            spec = _spec_of(getattr(state, "sampling_params", None))
            if spec is None:
                continue
            start, end = int(query_start[i]), int(query_start[i + 1])
            if end > start:
                out.append(StepRow(i, spec, start, end, int(computed[i]), int(state.num_prompt_tokens)))
        return out, num_reqs

    def active_requests(self) -> int:
        return len(self.runner.requests)

    def describe(self) -> str:
        return f"runner {type(self.runner).__name__} (vLLM V1)"


class V2Adapter:
    """vLLM's Model Runner V2: keeps the step's InputBatch and the specs of the requests it serves."""

    def __init__(self, runner: Any) -> None:
        for name in ("execute_model", "prepare_inputs"):
            if not callable(getattr(runner, name, None)):
                raise UnsupportedRunner(f"{type(runner).__name__} looks like vLLM's V2 runner but has no {name}")
        self.runner = runner
        self.specs: dict[str, tuple[dict[str, Any], int]] = {}  # req_id -> (spec, prompt length)
        self.batch: Any = None  # the InputBatch of the step being run, None outside execute_model
        self._wrap()

    def _wrap(self) -> None:
        runner = self.runner
        execute, prepare = runner.execute_model, runner.prepare_inputs

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            self.observe(scheduler_output)
            self.batch = None
            try:
                return execute(scheduler_output, *args, **kwargs)
            finally:
                self.batch = None

        def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
            self.batch = prepare(*args, **kwargs)
            return self.batch

        runner.execute_model = execute_model
        runner.prepare_inputs = prepare_inputs

    def observe(self, scheduler_output: Any) -> None:
        """Specs of the step's new requests (vLLM's NewRequestData), and forget finished ones."""
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            spec = _spec_of(getattr(new, "sampling_params", None))
            if spec is not None:
                prompt = getattr(new, "prompt_len", None)
                if prompt is None:
                    prompt = len(new.prompt_token_ids or ())
                self.specs[new.req_id] = (spec, int(prompt))
        for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
            self.specs.pop(req_id, None)

    def rows_of(self, batch: Any) -> tuple[list[StepRow], int]:
        """The featurelens rows of a V2 InputBatch."""
        num_reqs = int(batch.num_reqs)
        query_start = np.asarray(batch.query_start_loc_np)
        computed = np.asarray(batch.num_computed_tokens_np)
        out = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            entry = self.specs.get(req_id)
            if entry is None:
                continue
            start, end = int(query_start[i]), int(query_start[i + 1])
            if end > start:
                out.append(StepRow(i, entry[0], start, end, int(computed[i]), entry[1]))
        return out, num_reqs

    def step_rows(self) -> tuple[list[StepRow], int]:
        if self.batch is None:  # a dummy, warm-up or capture run: no request of ours
            return [], 0
        return self.rows_of(self.batch)

    def active_requests(self) -> int:
        """Requests the runner holds state for (V2: its RequestState table)."""
        states = getattr(self.runner, "req_states", None)
        index = getattr(states, "req_id_to_index", None)
        return len(index) if index is not None else len(self.specs)

    def describe(self) -> str:
        return f"runner {type(self.runner).__name__} (vLLM Model Runner V2)"


def adapter_kind(runner: Any) -> str:
    """'v2' for vLLM's Model Runner V2 (and subclasses: its CPU runner), 'v1' for the V1 runner."""
    for cls in type(runner).__mro__:
        module = cls.__module__
        if module.startswith("vllm.v1.worker.gpu.") or module.startswith("vllm.v1.worker.cpu.model_runner"):
            return "v2"
        if module in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.cpu_model_runner"):
            return "v1"
    raise UnsupportedRunner(
        f"featurelens cannot map the batch of model runner {type(runner).__module__}.{type(runner).__name__} "
        "to requests: it supports vLLM's V1 runner (gpu_model_runner / cpu_model_runner) and Model Runner V2 "
        "(vllm.v1.worker.gpu.model_runner); set VLLM_USE_V2_MODEL_RUNNER to pick one of them")


def attach_adapter(runner: Any) -> RunnerAdapter:
    """The adapter for `runner`, built once (V2's wraps the runner's methods) and kept on it."""
    adapter: RunnerAdapter | None = getattr(runner, ADAPTER_ATTR, None)
    if adapter is None:
        adapter = V2Adapter(runner) if adapter_kind(runner) == "v2" else V1Adapter(runner)
        setattr(runner, ADAPTER_ATTR, adapter)
    return adapter
