"""Steering vectors as shared state: the in-process store and the Redis store (a real redis-server) keep
each caller's vectors apart, enforce the count and byte limits atomically, and name content by digest."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from featurelens.server.state import MemoryVectorStore, RedisVectorStore, StoredVector, worker_key
from featurelens.server.validation import ApiError


@pytest.fixture(params=["memory", "redis"])
async def store(request, session_redis):
    if request.param == "memory":
        yield MemoryVectorStore("m", max_vectors=3, max_bytes=1 << 20)
        return
    import redis

    redis.Redis.from_url(session_redis.url).flushdb()
    s = RedisVectorStore(session_redis.url, "m", max_vectors=3, max_bytes=1 << 20)
    yield s
    await s.close()


async def test_round_trip_list_and_delete(store):
    await store.put("alice", StoredVector("b", (1.0, 2.0, 3.0)))
    await store.put("alice", StoredVector("a", (0.5, -0.25, 4.0)))
    got = await store.get("alice", "a")
    assert got is not None and got.values == (0.5, -0.25, 4.0)
    assert [v.vector_id for v in await store.list("alice")] == ["a", "b"]
    assert await store.delete("alice", "a") and not await store.delete("alice", "a")
    assert await store.get("alice", "a") is None


async def test_callers_never_see_each_others_vectors(store):
    await store.put("alice", StoredVector("dir", (1.0, 0.0)))
    assert await store.get("bob", "dir") is None and await store.list("bob") == []
    await store.put("bob", StoredVector("dir", (0.0, 1.0)))  # bob's own "dir": alice's is untouched
    assert (await store.get("alice", "dir")).values == (1.0, 0.0)
    assert (await store.get("bob", "dir")).values == (0.0, 1.0)
    assert not await store.delete("bob", "missing")


async def test_count_limit_is_resource_exhausted_but_replacing_is_not(store):
    for i in range(3):
        await store.put("alice", StoredVector(f"v{i}", (float(i),)))
    with pytest.raises(ApiError) as refused:
        await store.put("alice", StoredVector("v3", (3.0,)))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.message.startswith("vector_id:")
    await store.put("alice", StoredVector("v0", (9.0,)))  # re-registering an id replaces it
    assert (await store.get("alice", "v0")).values == (9.0,)
    await store.put("bob", StoredVector("v3", (3.0,)))  # limits are per caller


async def test_byte_limit(store):
    store.max_bytes = 100  # header 8 bytes + 4 per value
    await store.put("alice", StoredVector("a", (1.0,) * 10))  # 48 bytes
    with pytest.raises(ApiError) as refused:
        await store.put("alice", StoredVector("b", (1.0,) * 20))  # 88 more
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "bytes" in refused.value.message
    await store.put("alice", StoredVector("a", (1.0,) * 20))  # replacing frees the old bytes first
    await store.delete("alice", "a")
    await store.put("alice", StoredVector("b", (1.0,) * 20))  # deleting freed them


async def test_concurrent_registrations_respect_the_limit(store):
    """Replicas registering at once: the Redis store checks and sets in one script."""
    results = await asyncio.gather(*(store.put("alice", StoredVector(f"c{i}", (float(i),))) for i in range(10)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 3 and len(await store.list("alice")) == 3
    assert all(isinstance(r, ApiError) for r in results if r is not None)


def test_worker_keys_name_content():
    a, b = StoredVector("v", (1.0, 2.0)), StoredVector("v", (1.0, 2.5))
    assert worker_key("ns", a) == worker_key("ns", StoredVector("v", (1.0, 2.0)))
    assert worker_key("ns", a) != worker_key("ns", b) and worker_key("ns", a) != worker_key("other", a)


async def test_an_unreachable_redis_is_unavailable():
    s = RedisVectorStore("redis://127.0.0.1:1/0", "m", max_vectors=3, max_bytes=1 << 20)
    with pytest.raises(ApiError) as refused:
        await s.get("alice", "v")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    await s.close()
