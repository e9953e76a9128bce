"""The worker → frontend code channel, without the engine: what `pack_codes` puts in a step record is what
the receiver files per request (top-k codes by (layer, position), risk-probe features by (layer, position))."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import torch
from featurelens.server.interp.capture import FeatureReceiver
from featurelens.server.worker.extension import ProbeLayer, _StepRecord, pack_codes


def codes(rows: int, k: int, d_sae: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes as the worker holds them after its encode: float16 values strongest first, int64 indices."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, k, generator=g).sort(dim=1, descending=True).values * 10
    values[:, -2:] = 0.0  # fewer than k fired
    indices = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(rows)])
    return values.to(torch.float16).numpy(), indices.numpy()


def test_records_round_trip_to_the_open_request():
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("req-a")
        other = receiver.open("req-b")
        receiver.close("req-b")  # finished: its late records are dropped
        values, indices = codes(3, 12, 4096, seed=0)
        ids = np.unique(indices[:, ::3].flatten())  # some of the rows' features are probe features
        weights = np.linspace(-1.0, 2.0, len(ids))
        probes = {layer: ProbeLayer.build(4096, ids.tolist(), (weights * layer).tolist(), "identity")
                  for layer in (12, 22)}
        record = _StepRecord(received.tag, first=40, count=3)
        late = _StepRecord(other.tag, first=0, count=3)
        for layer, probe in probes.items():
            # The worker selects over the whole batch (here: these 3 rows under another one) and slices.
            batch_v, batch_i = np.concatenate([values[:1], values]), np.concatenate([indices[:1], indices])
            counts, pair_i, pair_v, starts, scores = probe.select(batch_v, batch_i.astype(np.uint16), 12)
            risk = (counts[1:], pair_i[starts[1]:starts[4]], pair_v[starts[1]:starts[4]], scores[1:])
            pack_codes(record, layer, values, indices.astype(np.uint16), False, top_k=5 if layer == 12 else None,
                       risk=risk)
            pack_codes(late, layer, values, indices.astype(np.uint16), False, top_k=5)
        timings = []
        receiver.on_step = lambda encode_s, risk_s: timings.append((encode_s, risk_s))
        receiver._dispatch(msgspec.msgpack.encode([[[record.as_list(), late.as_list()], [0.004, 0.0005]]]))
        assert timings == [(0.004, 0.0005)]
        weight_of = dict(zip(ids.tolist(), weights.tolist(), strict=True))
        for row in range(3):
            got_i, got_v = await received.get(12, 40 + row, timeout_s=1)
            np.testing.assert_array_equal(got_i, indices[row, :5])
            np.testing.assert_array_equal(got_v, values[row, :5])
            wanted = [(int(i), float(v)) for i, v in zip(indices[row], values[row], strict=True)
                      if int(i) in weight_of and v > 0]
            assert len(wanted) >= 1
            arrived = received.risk_codes_arrived((12, 22), 40 + row)
            for layer in (12, 22):
                risk_i, risk_v = await received.get_risk(layer, 40 + row, timeout_s=1)
                assert [(int(i), float(v)) for i, v in zip(risk_i, risk_v, strict=True)] == wanted
                assert arrived[layer][0] is risk_i and arrived[layer][1] is risk_v
            # The row's linear term, summed over both layers: sum over its probe features of w * x.
            term = sum(weight_of[i] * layer * v for layer in (12, 22) for i, v in wanted)
            assert await received.get_risk_score(40 + row, timeout_s=1) == pytest.approx(term, rel=1e-5)
        assert other.rows == {} and receiver.rows_received == 3
        with pytest.raises(TimeoutError):
            await received.get(12, 43, timeout_s=0.05)
        with pytest.raises(TimeoutError):
            await received.get(22, 40, timeout_s=0.05)  # layer 22 shipped risk codes only
        with pytest.raises(TimeoutError, match="risk score of position 43"):
            await received.get_risk_score(43, timeout_s=0.05)

    asyncio.run(run())


def test_wide_indices_for_large_dictionaries():
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("wide")
        values, indices = codes(2, 4, 100_000, seed=1)
        record = _StepRecord(received.tag, first=7, count=2)
        pack_codes(record, 3, values, indices.astype(np.int32), True, top_k=4)
        receiver._dispatch(msgspec.msgpack.encode([[[record.as_list()], [0.0, 0.0]]]))
        got_i, _ = await received.get(3, 8, timeout_s=1)
        np.testing.assert_array_equal(got_i, indices[1])
        assert int(got_i.max()) >= 0 and indices.max() > 65535

    asyncio.run(run())


def test_codes_are_few_bytes_per_token():
    """Top-8 at two layers of a 4096-feature SAE: uint16 indices + fp16 values, one record per request."""
    values, indices = codes(1, 8, 4096, seed=2)
    record = _StepRecord(123, first=1000, count=1)
    for layer in (12, 22):
        pack_codes(record, layer, values, indices.astype(np.uint16), False, top_k=8)
    size = len(msgspec.msgpack.encode([record.as_list()]))
    assert size <= 100, size  # a dense bf16 capture of the same two layers is 2 x 576 x 2 = 2304 bytes


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable CPUs")
def test_feature_socket_io_thread_runs_off_the_workers_cores():
    """vLLM binds its CPU worker to its cores; the feature socket's ZMQ I/O thread must not compete there."""
    code = """
import json, os, time
first = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {first})                       # what vLLM does to its CPU worker
from featurelens.server.worker.extension import _sender_context
import zmq
socket = _sender_context().socket(zmq.PUSH)
socket.connect("ipc:///tmp/featurelens-affinity-test.sock")
time.sleep(0.2)
threads = {open(f"/proc/self/task/{t}/comm").read().strip(): sorted(os.sched_getaffinity(int(t)))
           for t in os.listdir("/proc/self/task")}
print(json.dumps({"first": first, "threads": threads}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    io = [cpus for name, cpus in got["threads"].items() if name.startswith("ZMQbg/IO")]
    assert io and all(got["first"] not in cpus for cpus in io), got


def test_cpu_attention_is_kept_off_the_amx_kernel(monkeypatch):
    """vLLM's AMX bf16 attention gave wrong tokens on an AMX box; the worker module swaps it for "vec"."""
    cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")
    from featurelens.server.worker import extension as worker

    monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *a, **k: "amx")
    monkeypatch.setenv("FEATURELENS_CPU_AMX_ATTENTION", "1")
    worker._avoid_amx_attention()
    assert cpu_attn._get_attn_isa() == "amx"  # allowed on request
    monkeypatch.delenv("FEATURELENS_CPU_AMX_ATTENTION")
    worker._avoid_amx_attention()
    assert cpu_attn._get_attn_isa() == "vec"
    worker._avoid_amx_attention()  # idempotent: wrapped once
    assert cpu_attn._get_attn_isa.featurelens_wrapped
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *a, **k: "vec16")
    worker._avoid_amx_attention()
    assert cpu_attn._get_attn_isa() == "vec16"  # other kernels untouched


def _risk_record(tag: int, first: int, count: int, values, indices, probe) -> list:
    record = _StepRecord(tag, first=first, count=count)
    counts, pair_i, pair_v, _, scores = probe.select(values, indices.astype(np.uint16), 12)
    pack_codes(record, 22, values, indices.astype(np.uint16), False, top_k=4, risk=(counts, pair_i, pair_v, scores))
    return record.as_list()


def _stage_record(tag: int, layer: int, first: int, count: int, values, indices, probe) -> list:
    record = _StepRecord(tag, first=first, count=count)
    counts, pair_i, pair_v, _, scores = probe.select(values, indices.astype(np.uint16), 12)
    pack_codes(record, layer, values, indices.astype(np.uint16), False, top_k=None,
               risk=(counts, pair_i, pair_v, scores))
    return record.as_list()


def test_pipeline_stages_risk_terms_make_one_score_only_when_all_arrived():
    """With pipeline parallelism each stage ships the probe layers it owns, in its own message: a position's
    score must not be readable after the first stage's term alone."""
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("req", risk_layers=[6, 22])
        values, indices = codes(3, 12, 4096, seed=5)
        ids = np.unique(indices).tolist()[:20]
        probe = ProbeLayer.build(4096, ids, [0.5] * len(ids), "identity")
        early = _stage_record(received.tag, 6, 20, 3, values, indices, probe)
        late = _stage_record(received.tag, 22, 20, 3, values, indices, probe)
        receiver._dispatch(msgspec.msgpack.encode([[[early], [0.0, 0.0]]]))
        with pytest.raises(TimeoutError):
            await received.get_risk_score(20, timeout_s=0.05)
        receiver._dispatch(msgspec.msgpack.encode([[[late], [0.0, 0.0]]]))
        one = probe.select(values, indices.astype(np.uint16), 12)[4]
        got = [await received.get_risk_score(20 + r, timeout_s=1) for r in range(3)]
        assert got == pytest.approx([2 * float(x) for x in one]) and any(x != 0 for x in got)

    asyncio.run(run())


def test_a_score_that_needs_the_sampled_tokens_logprob_waits_for_it():
    """A probe with uncertainty terms: the worker sends the codes when the forward ends and each sampled
    token's logprob in a message of its own once the sampler has run. A position's score is readable only when
    both are in, so the frontend never scores a token without its logprob; a NaN (the worker could not give
    it) fails that request's risk instead of scoring it."""
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("req", risk_layers=[22], wants_logprob=True)
        values, indices = codes(1, 12, 4096, seed=9)
        probe = ProbeLayer.build(4096, np.unique(indices).tolist()[:8], [0.5] * 8, "identity")
        receiver._dispatch(msgspec.msgpack.encode([[[_risk_record(received.tag, 30, 1, values, indices, probe)],
                                                    [0.0, 0.0]]]))
        with pytest.raises(TimeoutError):
            await received.get_risk_score(30, timeout_s=0.05)
        logprob = _StepRecord(received.tag, first=31, count=0)
        logprob.logprob = [30, -1.25]
        receiver._dispatch(msgspec.msgpack.encode([[[logprob.as_list()], [0.0, 0.001]]]))
        score = await received.get_risk_score(30, timeout_s=1)
        assert score == pytest.approx(float(probe.select(values, indices.astype(np.uint16), 12)[4][0]))
        assert received.risk_logprob(30) == -1.25
        missing = _StepRecord(received.tag, first=32, count=0)
        missing.logprob = [31, float("nan")]
        receiver._dispatch(msgspec.msgpack.encode([[[_risk_record(received.tag, 31, 1, values, indices, probe),
                                                     missing.as_list()], [0.0, 0.0]]]))
        await received.get_risk_score(31, timeout_s=1)
        with pytest.raises(RuntimeError, match="no logprob for position 31"):
            received.risk_logprob(31)

    asyncio.run(run())


def test_a_prefill_sent_again_after_preemption_replaces_what_was_filed():
    """vLLM recomputes a preempted request from its prompt: the same positions arrive twice. Risk terms are
    filed per (layer, position), so the second copy replaces the first instead of doubling the score."""
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("req")
        values, indices = codes(6, 12, 4096, seed=3)
        probe = ProbeLayer.build(4096, np.unique(indices).tolist()[:40], [0.5] * 40, "identity")
        message = msgspec.msgpack.encode([[[_risk_record(received.tag, 10, 6, values, indices, probe)], [0.0, 0.0]]])
        receiver._dispatch(message)
        once = [await received.get_risk_score(10 + r, timeout_s=1) for r in range(6)]
        receiver._dispatch(message)  # the re-prefill
        again = [await received.get_risk_score(10 + r, timeout_s=1) for r in range(6)]
        assert again == once and any(score != 0 for score in once)

    asyncio.run(run())


def test_a_long_stream_holds_only_its_unread_rows():
    """A 2,000-token stream: each row is dropped once read, and rows re-sent for read positions are ignored,
    so the per-stream state stays at the unread rows (here at most one step's) plus one float per position."""
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("long")
        values, indices = codes(1, 16, 4096, seed=4)
        probe = ProbeLayer.build(4096, indices[0, :3].tolist(), [1.0, -1.0, 0.5], "identity")
        most = 0
        for position in range(2000):
            receiver._dispatch(msgspec.msgpack.encode(
                [[[_risk_record(received.tag, position, 1, values, indices, probe)], [0.0, 0.0]]]))
            most = max(most, len(received.rows))
            await received.get(22, position, timeout_s=1)
            await received.get_risk_score(position, timeout_s=1)
        assert most == 1 and not received.rows
        assert len(received.risk_scores) == 2000 and len(received.risk_rows) == 2000
        receiver._dispatch(msgspec.msgpack.encode(  # a late copy of an early step
            [[[_risk_record(received.tag, 5, 1, values, indices, probe)], [0.0, 0.0]]]))
        assert not received.rows

    asyncio.run(run())


def test_a_kept_row_can_be_read_again():
    """With prompt features the last prompt position is read twice: as that prompt token's features and as the
    features of the first generated token, which it predicts."""
    async def run() -> None:
        receiver = FeatureReceiver(transport="rpc")
        received = receiver.open("prompt")
        values, indices = codes(3, 8, 4096, seed=5)
        probe = ProbeLayer.build(4096, indices[0, :3].tolist(), [1.0, -1.0, 0.5], "identity")
        receiver._dispatch(msgspec.msgpack.encode([[[_risk_record(received.tag, 0, 3, values, indices, probe)],
                                                    [0.0, 0.0]]]))
        first = [await received.get(22, p, timeout_s=1, keep=p == 2) for p in range(3)]
        again = await received.get(22, 2, timeout_s=1)
        assert np.array_equal(again[0], first[2][0]) and not received.rows
        with pytest.raises(TimeoutError):
            await received.get(22, 1, timeout_s=0.05)  # an unkept row is gone once read

    asyncio.run(run())


def test_a_failing_receiver_fails_its_waiters_at_once_and_restarts(tmp_path):
    """The receiving loop raising must not stall feature RPCs for their 30 s timeout: the open requests fail
    at once, the owner hears of it (health NOT_SERVING) and the loop runs again (SERVING)."""
    import zmq
    from featurelens.server.interp.capture import FeatureChannelError

    async def run() -> None:
        receiver = FeatureReceiver(transport="zmq")
        events: list[str] = []
        receiver.on_failure = lambda error: events.append(f"failed: {error}")
        receiver.on_recovered = lambda: events.append("recovered")
        receiver.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(receiver.endpoint)
        try:
            waiting = receiver.open("waiting")
            real_file = receiver._file

            def broken(records):
                receiver._file = real_file
                raise RuntimeError("decoder bug")

            receiver._file = broken
            push.send(msgspec.msgpack.encode([[[], [0.0, 0.0]]]))
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(FeatureChannelError, match="decoder bug"):
                await waiting.get(12, 0, timeout_s=30)
            assert loop.time() - started < 1.0
            await asyncio.sleep(0.5)
            assert events == ["failed: decoder bug", "recovered"] and receiver.failures == 1
            fresh = receiver.open("fresh")  # the restarted loop files records again
            values, indices = codes(1, 8, 4096, seed=5)
            record = _StepRecord(fresh.tag, first=0, count=1)
            pack_codes(record, 12, values, indices.astype(np.uint16), False, top_k=8)
            push.send(msgspec.msgpack.encode([[[record.as_list()], [0.0, 0.0]]]))
            got_i, _ = await fresh.get(12, 0, timeout_s=5)
            np.testing.assert_array_equal(got_i, indices[0])
        finally:
            push.close(linger=0)
            folder = os.path.dirname(receiver.endpoint.removeprefix("ipc://"))
            await receiver.stop()
        assert not os.path.exists(folder)  # the socket's temporary folder is removed

    asyncio.run(run())
