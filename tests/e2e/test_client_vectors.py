"""The typed clients' steering-vector calls against the real servicer over a real channel (the fuzz tests'
stand-in engine; vectors in the in-process store), with two bearer tokens: two namespaces."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from featurelens.client import AsyncClient, Client, SteeringVector
from featurelens.server.api import FeatureLensServicer, add_to_server
from featurelens.server.cache import LruFeatureCache
from featurelens.server.state import MemoryVectorStore
from test_fuzz import HIDDEN_SIZE, SETTINGS, StandInEngine


@pytest.fixture
async def target():
    server = grpc.aio.server()
    servicer = FeatureLensServicer(StandInEngine(), SETTINGS,
                                   cache=LruFeatureCache(SETTINGS.cache_ttl_s, SETTINGS.cache_max_value_bytes))
    servicer.vectors = MemoryVectorStore("toy-model", 4, 1 << 20)
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_async_client_registers_lists_gets_and_deletes(target):
    values = [float(i) / HIDDEN_SIZE for i in range(HIDDEN_SIZE)]
    async with AsyncClient(target, token="alice") as alice, AsyncClient(target, token="bob") as bob:
        registered = await alice.register_vector("dir", values)
        assert isinstance(registered, SteeringVector) and registered.dimension == HIDDEN_SIZE
        assert registered.values == pytest.approx(values) and registered.digest
        assert [v.vector_id for v in await alice.list_vectors()] == ["dir"] and await bob.list_vectors() == []
        again = await alice.register_vector("dir", [v + 1.0 for v in values])
        assert again.digest != registered.digest
        await alice.delete_vector("dir")
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await alice.get_vector("dir")
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_blocking_client_has_the_same_calls(target):
    def run() -> list[SteeringVector]:
        with Client(target, token="carol") as carol:
            carol.register_vector("one", [0.5] * HIDDEN_SIZE)
            return carol.list_vectors()

    listed = await asyncio.to_thread(run)
    assert [(v.vector_id, v.dimension) for v in listed] == [("one", HIDDEN_SIZE)]
