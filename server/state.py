"""Shared state that must survive a replica: registered steering vectors.

Vectors live in Redis when the server has one (`--redis-url`), so any replica can steer with a vector any
other replica registered, and a restart or scale-up loses nothing; without Redis they live in this process.
Each caller has its own namespace (the authenticated identity, `security.caller_namespace`): one caller can
neither read nor overwrite another's vectors. A namespace holds at most `max_vectors` vectors and
`max_bytes` bytes (RESOURCE_EXHAUSTED beyond). Vectors belong to one model: the model id is part of the key.

The engine's workers hold copies keyed by `worker_key` (namespace, id and content digest): a re-registered
vector gets a new key, so no step ever runs with a mix of old and new values (see Engine.use_vectors).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from featurelens.server.validation import ApiError

_HEADER = struct.Struct("<4sI")  # magic, dimension
_MAGIC = b"FLV1"
KEY_PREFIX = "featurelens:vectors:v1"
_T = TypeVar("_T")


@dataclass(frozen=True)
class StoredVector:
    vector_id: str
    values: tuple[float, ...]

    @property
    def digest(self) -> str:
        return hashlib.blake2b(pack_values(self.values), digest_size=10).hexdigest()

    @property
    def l2_norm(self) -> float:
        return float(sum(v * v for v in self.values) ** 0.5)


def pack_values(values: tuple[float, ...] | list[float]) -> bytes:
    return _HEADER.pack(_MAGIC, len(values)) + struct.pack(f"<{len(values)}f", *values)


def unpack_values(data: bytes) -> tuple[float, ...]:
    magic, dimension = _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + 4 * dimension:
        raise ValueError("not a stored featurelens vector")
    return struct.unpack_from(f"<{dimension}f", data, _HEADER.size)


def worker_key(namespace: str, vector: StoredVector) -> str:
    return f"{namespace}/{vector.vector_id}@{vector.digest}"


def _exhausted(namespace_size: int, limit: int, what: str) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"vector_id: this caller's vectors would exceed {limit} {what} (has {namespace_size}); "
                    "delete some with DeleteSteeringVector")


class VectorStore(Protocol):
    backend: str

    async def put(self, namespace: str, vector: StoredVector) -> None: ...
    async def get(self, namespace: str, vector_id: str) -> StoredVector | None: ...
    async def list(self, namespace: str) -> list[StoredVector]: ...
    async def delete(self, namespace: str, vector_id: str) -> bool: ...
    async def close(self) -> None: ...


class MemoryVectorStore:
    """This process only: vectors are lost on restart and unknown to other replicas."""

    backend = "memory"

    def __init__(self, model_id: str, max_vectors: int, max_bytes: int) -> None:
        self.model_id, self.max_vectors, self.max_bytes = model_id, max_vectors, max_bytes
        self._data: dict[str, dict[str, bytes]] = {}

    async def put(self, namespace: str, vector: StoredVector) -> None:
        space = self._data.setdefault(namespace, {})
        data = pack_values(vector.values)
        others = {k: v for k, v in space.items() if k != vector.vector_id}
        if len(others) + 1 > self.max_vectors:
            raise _exhausted(len(others), self.max_vectors, "vectors")
        if sum(map(len, others.values())) + len(data) > self.max_bytes:
            raise _exhausted(sum(map(len, others.values())), self.max_bytes, "bytes")
        space[vector.vector_id] = data

    async def get(self, namespace: str, vector_id: str) -> StoredVector | None:
        data = self._data.get(namespace, {}).get(vector_id)
        return StoredVector(vector_id, unpack_values(data)) if data is not None else None

    async def list(self, namespace: str) -> list[StoredVector]:
        return [StoredVector(k, unpack_values(v)) for k, v in sorted(self._data.get(namespace, {}).items())]

    async def delete(self, namespace: str, vector_id: str) -> bool:
        return self._data.get(namespace, {}).pop(vector_id, None) is not None

    async def close(self) -> None:
        return None


# Atomic check-and-set: count and byte limits hold even when replicas register at the same time.
_PUT = """
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1])
local old = 0
if exists == 1 then old = redis.call('HSTRLEN', KEYS[1], ARGV[1]) end
local count = redis.call('HLEN', KEYS[1]) - exists
if count + 1 > tonumber(ARGV[3]) then return {-1, count} end
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0') - old
if bytes + string.len(ARGV[2]) > tonumber(ARGV[4]) then return {-2, bytes} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], 'bytes', bytes + string.len(ARGV[2]))
return {1, 0}
"""
_DELETE = """
local old = redis.call('HSTRLEN', KEYS[1], ARGV[1])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then redis.call('HINCRBY', KEYS[2], 'bytes', -old) end
return removed
"""


class RedisVectorStore:
    """One Redis hash per (model, caller): field = vector id, value = packed float32 values."""

    backend = "redis"

    def __init__(self, url: str, model_id: str, max_vectors: int, max_bytes: int, timeout_s: float = 2.0) -> None:
        import redis.asyncio as aioredis

        self.model_id, self.max_vectors, self.max_bytes = model_id, max_vectors, max_bytes
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)

    def _keys(self, namespace: str) -> list[str]:
        base = f"{KEY_PREFIX}:{self.model_id}:{namespace}"
        return [base, base + ":meta"]

    async def _call(self, pending: Awaitable[_T]) -> _T:
        import redis.asyncio as aioredis

        try:
            return await pending
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as error:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"vector_id: the shared vector store (Redis) is unreachable: {error}") from error

    async def put(self, namespace: str, vector: StoredVector) -> None:
        status, size = await self._call(self._put(keys=self._keys(namespace), args=[
            vector.vector_id, pack_values(vector.values), self.max_vectors, self.max_bytes]))
        if int(status) == -1:
            raise _exhausted(int(size), self.max_vectors, "vectors")
        if int(status) == -2:
            raise _exhausted(int(size), self.max_bytes, "bytes")

    async def get(self, namespace: str, vector_id: str) -> StoredVector | None:
        data = await self._call(self._client.hget(self._keys(namespace)[0], vector_id))
        return StoredVector(vector_id, unpack_values(_raw(data))) if data is not None else None

    async def list(self, namespace: str) -> list[StoredVector]:
        items = await self._call(self._client.hgetall(self._keys(namespace)[0]))
        return [StoredVector(_raw(k).decode(), unpack_values(_raw(v))) for k, v in sorted(items.items())]

    async def delete(self, namespace: str, vector_id: str) -> bool:
        return bool(await self._call(self._delete(keys=self._keys(namespace), args=[vector_id])))

    async def close(self) -> None:
        await self._client.aclose()


def _raw(value: bytes | str) -> bytes:
    """Redis replies of a client without decode_responses are bytes (its types allow str as well)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")
    return value


def make_vector_store(redis_url: str | None, model_id: str, max_vectors: int, max_bytes: int) -> VectorStore:
    if redis_url:
        return RedisVectorStore(redis_url, model_id, max_vectors, max_bytes)
    return MemoryVectorStore(model_id, max_vectors, max_bytes)
