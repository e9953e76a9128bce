"""Feature cache: top-k SAE codes (and risk numbers) of a token sequence, keyed by everything that made them.

One interface, two backends: Redis when a URL is configured (shared by all replicas), an in-process LRU
otherwise. The cache is an optimisation only, so it never fails a request: a Redis that is down, slow or
returns garbage makes `get` answer None and `set` do nothing; the failure is counted, logged at most once
per interval, and the next call after a short back-off tries Redis again, so the cache heals by itself.

Values use a compact versioned binary codec (little-endian):

    header   magic "FLCF" | version u8 | flags u8 | n_layers u16 | n_tokens u32
    tokens   n_tokens × u32
    layer ×  layer i32 | k u16 | index bytes u8 (2|4) | pad u8 | indices n_tokens×k | values n_tokens×k f16
    risk     f32                                   (flags bit 0)
    risks    count u32 | count × f32               (flags bit 1)
    logprobs n_tokens × f32                        (flags bit 2: token t's log-probability given the tokens
                                                    before it, NaN at t = 0)
    crc32    u32 over everything before it

Indices take 2 bytes whenever every index fits (any SAE with d_sae ≤ 65536), else 4.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import logging
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from featurelens.server.metrics import Metrics
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import InvalidResponse

log = logging.getLogger(__name__)

MAGIC = b"FLCF"
CODEC_VERSION = 1
# The codec version is part of the key namespace: a format change makes old entries miss, never misparse.
KEY_NAMESPACE = f"featurelens:feat:v{CODEC_VERSION}:"

_HEADER = struct.Struct("<4sBBHI")
_LAYER = struct.Struct("<iHBx")
_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
_FLAG_RISK = 1
_FLAG_TOKEN_RISKS = 2
_FLAG_TOKEN_LOGPROBS = 4


class CacheCorrupt(ValueError):
    """A cached value that is not a well-formed value of this codec version."""


@dataclass
class LayerCodes:
    """Top-k SAE codes of one layer: row t holds token t's features, largest activation first."""

    layer: int
    indices: np.ndarray  # [n_tokens, k] unsigned ints
    values: np.ndarray  # [n_tokens, k] float16 (what the cache stores; compare with fp16-rounded inputs)


@dataclass
class CachedFeatures:
    token_ids: np.ndarray  # [n_tokens] uint32
    layers: list[LayerCodes] = field(default_factory=list)
    response_risk: float | None = None  # whole-response risk score, when scored
    token_risks: np.ndarray | None = None  # float32 per scored token (may be fewer than n_tokens)
    # float32 [n_tokens]: log P(token t | tokens before it), NaN at t = 0 (teacher forcing, for risk probes with
    # uncertainty terms; None when not asked for)
    token_logprobs: np.ndarray | None = None


# ---- key ------------------------------------------------------------------------------------------------


def cache_key(
    model_id: str,
    sae_id: str,
    sae_version: str,
    layers: Sequence[int],
    token_ids: Sequence[int] | np.ndarray,
    options: dict[str, Any],
) -> str:
    """Namespaced blake2b digest of a canonical encoding of every input that changes the cached value.

    `options` holds the rest (top-k per layer, mode, probe id...) and must be JSON-serialisable; its key
    order does not matter. Token ids are hashed as packed uint32 so long prompts stay cheap to key.
    """
    meta = json.dumps(
        {"model": model_id, "sae": sae_id, "sae_version": sae_version,
         "layers": [int(x) for x in layers], "options": options, "n_tokens": len(token_ids)},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
    ).encode()
    digest = hashlib.blake2b(digest_size=20, person=b"featurelens-key")
    digest.update(_U32.pack(len(meta)) + meta)
    digest.update(np.asarray(token_ids, dtype="<u4").tobytes())
    return KEY_NAMESPACE + digest.hexdigest()


# ---- codec ----------------------------------------------------------------------------------------------


def encode_features(features: CachedFeatures) -> bytes:
    tokens = np.asarray(features.token_ids)
    if tokens.ndim != 1 or (tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF)):
        raise ValueError("token_ids must be a 1-D array of uint32 values")
    n = tokens.shape[0]
    flags = (_FLAG_RISK if features.response_risk is not None else 0) | (
        _FLAG_TOKEN_RISKS if features.token_risks is not None else 0) | (
        _FLAG_TOKEN_LOGPROBS if features.token_logprobs is not None else 0)
    parts = [_HEADER.pack(MAGIC, CODEC_VERSION, flags, len(features.layers), n), tokens.astype("<u4").tobytes()]
    for codes in features.layers:
        indices, values = np.asarray(codes.indices), np.asarray(codes.values)
        if indices.ndim != 2 or indices.shape[0] != n or values.shape != indices.shape:
            raise ValueError(f"layer {codes.layer}: indices and values must both be [{n}, k]")
        k = indices.shape[1]
        if k > 0xFFFF:
            raise ValueError(f"layer {codes.layer}: k={k} exceeds 65535")
        top = int(indices.max()) if indices.size else 0
        if indices.size and (indices.min() < 0 or top > 0xFFFFFFFF):
            raise ValueError(f"layer {codes.layer}: feature indices must fit uint32")
        width = 2 if top <= 0xFFFF else 4
        parts += [_LAYER.pack(codes.layer, k, width),
                  indices.astype("<u2" if width == 2 else "<u4").tobytes(), values.astype("<f2").tobytes()]
    if features.response_risk is not None:
        parts.append(_F32.pack(features.response_risk))
    if features.token_risks is not None:
        risks = np.asarray(features.token_risks, dtype="<f4").reshape(-1)
        parts += [_U32.pack(risks.shape[0]), risks.tobytes()]
    if features.token_logprobs is not None:
        logprobs = np.asarray(features.token_logprobs, dtype="<f4").reshape(-1)
        if logprobs.shape[0] != n:
            raise ValueError(f"token_logprobs must have one value per token ({n}), got {logprobs.shape[0]}")
        parts.append(logprobs.tobytes())
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def decode_features(data: bytes) -> CachedFeatures:
    """Inverse of `encode_features`; raises CacheCorrupt for anything else (never another exception)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CacheCorrupt(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(data)
    if len(buf) < _HEADER.size + _U32.size:
        raise CacheCorrupt(f"value too short ({len(buf)} bytes)")
    magic, version, flags, n_layers, n = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CacheCorrupt(f"bad magic {bytes(magic)!r}")
    if version != CODEC_VERSION:
        raise CacheCorrupt(f"unsupported codec version {version}")
    if flags & ~(_FLAG_RISK | _FLAG_TOKEN_RISKS | _FLAG_TOKEN_LOGPROBS):
        raise CacheCorrupt(f"unknown flags {flags:#x}")
    body, (crc,) = buf[:-_U32.size], _U32.unpack_from(buf, len(buf) - _U32.size)
    if zlib.crc32(body) != crc:
        raise CacheCorrupt("checksum mismatch")
    reader = _Reader(body, _HEADER.size)
    tokens = reader.array("<u4", n).astype(np.uint32)
    layers = []
    for _ in range(n_layers):
        layer, k, width = reader.unpack(_LAYER)
        if width not in (2, 4):
            raise CacheCorrupt(f"bad index width {width}")
        indices = reader.array("<u2" if width == 2 else "<u4", n * k).astype(np.uint32).reshape(n, k)
        values = reader.array("<f2", n * k).astype(np.float16).reshape(n, k)
        layers.append(LayerCodes(layer, indices, values))
    risk = float(reader.unpack(_F32)[0]) if flags & _FLAG_RISK else None
    token_risks = None
    if flags & _FLAG_TOKEN_RISKS:
        (count,) = reader.unpack(_U32)
        token_risks = reader.array("<f4", count).astype(np.float32)
    token_logprobs = reader.array("<f4", n).astype(np.float32) if flags & _FLAG_TOKEN_LOGPROBS else None
    if reader.offset != len(body):
        raise CacheCorrupt(f"{len(body) - reader.offset} trailing bytes")
    return CachedFeatures(tokens, layers, risk, token_risks, token_logprobs)


class _Reader:
    """Bounds-checked cursor: every length is checked against the buffer before anything is allocated."""

    def __init__(self, buf: memoryview, offset: int) -> None:
        self.buf, self.offset = buf, offset

    def _take(self, size: int) -> memoryview:
        if size < 0 or self.offset + size > len(self.buf):
            raise CacheCorrupt("value truncated")
        chunk = self.buf[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self._take(fmt.size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self._take(count * dt.itemsize), dtype=dt)


# ---- backends -------------------------------------------------------------------------------------------


class FeatureCache(abc.ABC):
    """Async get/set of CachedFeatures. Implementations never raise to the caller on cache trouble."""

    backend: str = "abstract"

    @abc.abstractmethod
    async def get(self, key: str) -> CachedFeatures | None: ...

    @abc.abstractmethod
    async def set(self, key: str, value: CachedFeatures) -> None: ...

    async def close(self) -> None:
        return None


class _ThrottledWarning:
    """Logs the first failure of a burst and then at most once per interval, with a count of the rest."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar since last warning)" if self._suppressed else ""
        log.warning(message + suffix, *args)
        self._last, self._suppressed = now, 0


class LruFeatureCache(FeatureCache):
    """In-process LRU bounded by entries and by encoded bytes, with a TTL. Stores encoded values, so the
    byte bound is exact and callers can mutate what they got back without touching the cache."""

    backend = "lru"

    def __init__(self, ttl_s: float, max_value_bytes: int, max_bytes: int = 256 << 20,
                 max_entries: int = 100_000, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_value_bytes = ttl_s, max_value_bytes
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._metrics, self._clock = metrics, clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedFeatures | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= self._clock():
            self._drop(key)
            entry = None
        if entry is None:
            self._count(hit=False)
            return None
        self._entries.move_to_end(key)
        self._count(hit=True)
        return decode_features(entry[1])

    async def set(self, key: str, value: CachedFeatures) -> None:
        data = encode_features(value)
        if len(data) > self.max_value_bytes or len(data) > self.max_bytes:
            if self._metrics:
                self._metrics.count_cache_error(self.backend, "oversize")
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self.ttl_s, data)
        self.bytes_used += len(data)
        while len(self._entries) > self.max_entries or self.bytes_used > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, data = self._entries.pop(key)
        self.bytes_used -= len(data)

    def _count(self, hit: bool) -> None:
        if self._metrics:
            self._metrics.count_cache_lookup(self.backend, hit)


class RedisFeatureCache(FeatureCache):
    """Redis backend shared by replicas. Short socket timeouts and no client-side retries keep a sick Redis
    from adding more than ~`op_timeout_s` to a request; after a failure, calls skip Redis for `backoff_s`
    (a tiny circuit breaker) so a dead Redis costs nothing per request, then the next call probes it again."""

    backend = "redis"

    def __init__(self, url: str, ttl_s: float, max_value_bytes: int, *, socket_timeout_s: float = 0.25,
                 connect_timeout_s: float = 0.25, max_connections: int = 64, backoff_s: float = 1.0,
                 warn_interval_s: float = 30.0, metrics: Metrics | None = None) -> None:
        self.ttl_s, self.max_value_bytes, self.backoff_s = ttl_s, max_value_bytes, backoff_s
        # Bound each call as a whole too: socket_timeout applies per read, not to connect + send + read.
        self.op_timeout_s = connect_timeout_s + socket_timeout_s
        self._metrics = metrics
        self._warn_interval_s = warn_interval_s
        self._warnings: dict[str, _ThrottledWarning] = {}  # per kind: a corrupt value must not hide an outage
        self._skip_until = 0.0
        self._healthy = True
        self._client = aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(
            url, max_connections=max_connections, socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s, retry=Retry(NoBackoff(), 0), health_check_interval=0))

    async def get(self, key: str) -> CachedFeatures | None:
        if self._circuit_open():
            self._count(hit=False)
            return None
        try:
            data = await asyncio.wait_for(self._client.get(key), self.op_timeout_s)
        except Exception as exc:  # noqa: BLE001 — any Redis trouble means "no cache", never a failed RPC
            self._failed(exc)
            self._count(hit=False)
            return None
        self._succeeded()
        if data is None:
            self._count(hit=False)
            return None
        try:
            if not isinstance(data, bytes):  # this client does not decode responses: bytes or nothing
                raise CacheCorrupt(f"a {type(data).__name__} value, not bytes")
            value = decode_features(data)
        except CacheCorrupt as exc:
            # Left in place: the caller computes the features again and its `set` overwrites this value.
            self._error("corrupt", "ignoring corrupt feature cache value for %s: %s", key, exc)
            self._count(hit=False)
            return None
        self._count(hit=True)
        return value

    async def set(self, key: str, value: CachedFeatures) -> None:
        data = encode_features(value)
        if len(data) > self.max_value_bytes:
            self._error("oversize", "not caching %s: %d bytes exceed max_value_bytes=%d",
                        key, len(data), self.max_value_bytes)
            return
        if self._circuit_open():
            return
        try:
            await asyncio.wait_for(
                self._client.set(key, data, px=max(1, int(self.ttl_s * 1000))), self.op_timeout_s)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        self._succeeded()

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # noqa: BLE001 — closing a broken pool must not fail shutdown
            log.debug("closing the redis pool failed: %s", exc)

    def _circuit_open(self) -> bool:
        return time.monotonic() < self._skip_until

    def _failed(self, exc: BaseException) -> None:
        kind = _error_kind(exc)
        if kind != "response":  # an error *answer* means Redis is up: no reason to back off
            self._skip_until = time.monotonic() + self.backoff_s
            self._healthy = False
        self._error(kind, "feature cache (redis) failed, serving without it: %s: %s",
                    type(exc).__name__, exc)

    def _succeeded(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.info("feature cache (redis) is reachable again")

    def _error(self, kind: str, message: str, *args: object) -> None:
        if self._metrics:
            self._metrics.count_cache_error(self.backend, kind)
        warning = self._warnings.setdefault(kind, _ThrottledWarning(self._warn_interval_s))
        warning.warn(message, *args)

    def _count(self, hit: bool) -> None:
        if self._metrics:
            self._metrics.count_cache_lookup(self.backend, hit)


def _error_kind(exc: BaseException) -> str:
    # redis' TimeoutError subclasses neither asyncio's nor the builtin one, hence both checks.
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aioredis.TimeoutError)):
        return "timeout"
    if isinstance(exc, (aioredis.ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, (aioredis.ResponseError, InvalidResponse)):
        return "response"  # e.g. WRONGTYPE, or something that is not Redis answering on that port
    return "other"


def make_cache(redis_url: str | None, ttl_s: float, max_value_bytes: int, *, lru_max_bytes: int = 256 << 20,
               lru_max_entries: int = 100_000, metrics: Metrics | None = None,
               **redis_options: Any) -> FeatureCache:
    """Redis when a URL is given (replicas share it), otherwise an in-process LRU."""
    if redis_url:
        return RedisFeatureCache(redis_url, ttl_s, max_value_bytes, metrics=metrics, **redis_options)
    return LruFeatureCache(ttl_s, max_value_bytes, max_bytes=lru_max_bytes, max_entries=lru_max_entries,
                           metrics=metrics)
