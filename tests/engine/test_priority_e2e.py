"""Priority scheduling through a real engine: a server of its own (--scheduling-policy priority, one request in
the batch at a time, so later requests wait in vLLM's queue and the order they finish in shows how it was
served). Tiny prompts and few tokens keep it cheap."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from featurelens.client import AsyncClient
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
async def priority_server():
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings

    settings = Settings(port=0, metrics_port=-1, max_num_seqs=1, max_model_len=256, scheduling_policy="priority",
                        risk_probe="none", sparsity_thresholds="none", quantized_mode="none", grace_period_s=1.0)
    running = await start_server(settings)
    yield running
    await running.stop(grace_s=1.0)


async def _finish_order(server, late_priority: int) -> list[str]:
    """A long request occupies the only batch slot; three priority-5 requests queue behind it, then a fourth,
    "late", with `late_priority`. Returns the names in the order their streams finished."""
    finished: list[str] = []
    started = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.FeatureLensServiceStub(channel)

        async def run(name: str, priority: int, tokens: int) -> None:
            request = pb.GenerateStreamRequest(text=f"Count {name}:", sampling=pb.SamplingOptions(temperature=0.0),
                                               stopping=pb.StoppingOptions(max_new_tokens=tokens, ignore_eos=True),
                                               priority=priority)
            async for chunk in stub.GenerateStream(request):
                started.set()
                if chunk.finish_reason:
                    finished.append(name)

        async def queued(n: int) -> None:
            while server.engine.num_unfinished_requests() < n:
                await asyncio.sleep(0.01)

        blocker = asyncio.create_task(run("blocker", 5, 48))
        await started.wait()  # running: it holds the batch slot
        lows = []
        for i in range(3):  # one at a time, so their arrival order is known
            lows.append(asyncio.create_task(run(f"low{i}", 5, 4)))
            await queued(2 + i)
        late = asyncio.create_task(run("late", late_priority, 4))
        await queued(5)
        assert not finished, "the queue drained before the late request arrived: nothing to overtake"
        await asyncio.wait_for(asyncio.gather(blocker, *lows, late), 300)
    return finished


async def test_a_high_priority_request_overtakes_queued_low_priority_ones(priority_server):
    # control: with the same priority the late request waits its turn (first come, first served)
    assert await _finish_order(priority_server, late_priority=5) == ["blocker", "low0", "low1", "low2", "late"]
    # lower value = earlier: it overtakes the three queued before it, not the running one
    assert await _finish_order(priority_server, late_priority=0) == ["blocker", "late", "low0", "low1", "low2"]


async def test_model_info_and_client_say_priority(priority_server):
    async with AsyncClient(f"127.0.0.1:{priority_server.port}", timeout_s=60) as client:
        info = await client.model_info()
        assert info.scheduling_policy == "priority"
        result = await client.generate("Hi", max_new_tokens=2, temperature=0.0, priority=-3)
        assert result.completion_tokens == 2
