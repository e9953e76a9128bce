"""Feature cache: codec, key, LRU backend, and the Redis backend against a real redis-server we can kill."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from featurelens.server.cache import (
    KEY_NAMESPACE,
    CacheCorrupt,
    CachedFeatures,
    LayerCodes,
    LruFeatureCache,
    RedisFeatureCache,
    cache_key,
    decode_features,
    encode_features,
    make_cache,
)
from featurelens.server.metrics import Metrics
from tests_support import RedisProcess


def _features(n_tokens: int = 6, k: int = 4, d_sae: int = 16384, seed: int = 0, risk: bool = True,
              layers: tuple[int, ...] = (3, 9)) -> CachedFeatures:
    rng = np.random.default_rng(seed)
    codes = [LayerCodes(layer, rng.integers(0, d_sae, size=(n_tokens, k)),
                        rng.normal(size=(n_tokens, k)).astype(np.float32) * 10) for layer in layers]
    return CachedFeatures(
        token_ids=rng.integers(0, 49152, size=n_tokens), layers=codes,
        response_risk=0.8125 if risk else None,
        token_risks=rng.random(3).astype(np.float32) if risk else None)


def _assert_same(got: CachedFeatures, want: CachedFeatures) -> None:
    np.testing.assert_array_equal(got.token_ids, np.asarray(want.token_ids, dtype=np.uint32))
    assert [c.layer for c in got.layers] == [c.layer for c in want.layers]
    for g, w in zip(got.layers, want.layers, strict=True):
        np.testing.assert_array_equal(g.indices, w.indices)
        assert g.values.dtype == np.float16
        # fp16 rounding is the only loss, and it is exact: same bits as casting the input once.
        np.testing.assert_array_equal(g.values.view(np.uint16), w.values.astype(np.float16).view(np.uint16))
    assert got.response_risk == (None if want.response_risk is None else np.float32(want.response_risk))
    if want.token_risks is None:
        assert got.token_risks is None
    else:
        np.testing.assert_array_equal(got.token_risks, want.token_risks.astype(np.float32))
    if want.token_logprobs is None:
        assert got.token_logprobs is None
    else:
        np.testing.assert_array_equal(got.token_logprobs, want.token_logprobs.astype(np.float32))


def _cache_counts(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """{(sample, backend, result|kind): value} of the cache counters."""
    out = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name in ("featurelens_cache_requests_total", "featurelens_cache_errors_total"):
                out[(s.name, s.labels["backend"], s.labels.get("result") or s.labels["kind"])] = s.value
    return out


def _errors(metrics: Metrics, kind: str | None = None) -> float:
    return sum(v for (name, _, k), v in _cache_counts(metrics).items()
               if name == "featurelens_cache_errors_total" and kind in (None, k))


# ---- codec ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_sae", [1000, 65536, 2**20])
def test_codec_round_trip(d_sae: int) -> None:
    want = _features(d_sae=d_sae)
    _assert_same(decode_features(encode_features(want)), want)


def test_codec_without_risk_and_empty() -> None:
    want = _features(risk=False)
    _assert_same(decode_features(encode_features(want)), want)
    empty = CachedFeatures(np.zeros(0, dtype=np.uint32), [LayerCodes(0, np.zeros((0, 3)), np.zeros((0, 3)))])
    _assert_same(decode_features(encode_features(empty)), empty)


def test_codec_keeps_token_logprobs() -> None:
    """ScoreHallucination's teacher-forced logprobs (NaN at the first token) ride in the entry; their length
    must match the tokens, and an unknown flag is rejected rather than misread."""
    import struct
    import zlib

    want = _features()
    want.token_logprobs = np.r_[np.nan, -np.arange(1, len(want.token_ids), dtype=np.float32) / 3]
    got = decode_features(encode_features(want))
    _assert_same(got, want)
    assert got.token_logprobs is not None and np.isnan(got.token_logprobs[0])
    without = _features()
    assert decode_features(encode_features(without)).token_logprobs is None
    with pytest.raises(ValueError, match="token_logprobs"):
        encode_features(CachedFeatures(want.token_ids, want.layers, token_logprobs=np.zeros(2)))
    body = bytearray(encode_features(without)[:-4])
    body[5] |= 0x80  # the flags byte
    with pytest.raises(CacheCorrupt, match="flags"):
        decode_features(bytes(body) + struct.pack("<I", zlib.crc32(body)))


def test_codec_is_compact() -> None:
    """uint16 indices + fp16 values: 4 bytes per (feature, token) when d_sae fits 16 bits."""
    small = encode_features(_features(n_tokens=100, k=32, d_sae=16384, risk=False, layers=(3,)))
    large = encode_features(_features(n_tokens=100, k=32, d_sae=2**17, risk=False, layers=(3,)))
    assert len(small) < 100 * 32 * 4 + 100 * 4 + 64
    assert len(large) > len(small) + 100 * 32 * 2 - 1


def test_codec_rejects_garbage() -> None:
    good = encode_features(_features())
    garbage = [b"", b"junk", b"\x00" * 64, b"XXXX" + good[4:], good[:4] + b"\x63" + good[5:],  # magic, version
               good[:-1], good + b"\x00", good[:-20] + good[-4:],  # lengths
               good[:30] + bytes([good[30] ^ 0xFF]) + good[31:]]  # one flipped byte → checksum
    for blob in garbage:
        with pytest.raises(CacheCorrupt):
            decode_features(blob)
    with pytest.raises(CacheCorrupt):
        decode_features("not bytes")  # type: ignore[arg-type]


def test_codec_rejects_bad_shapes() -> None:
    bad = CachedFeatures(np.arange(3), [LayerCodes(1, np.zeros((2, 4)), np.zeros((2, 4)))])
    with pytest.raises(ValueError, match="layer 1"):
        encode_features(bad)


# ---- key ------------------------------------------------------------------------------------------------


def test_key_changes_with_every_input() -> None:
    base = {"model_id": "smollm2-135m", "sae_id": "res-l9", "sae_version": "1", "layers": [9],
            "token_ids": [1, 2, 3], "options": {"top_k": 8, "mode": "dense"}}
    key = cache_key(**base)
    assert key.startswith(KEY_NAMESPACE) and len(key) == len(KEY_NAMESPACE) + 40
    assert cache_key(**{**base, "options": {"mode": "dense", "top_k": 8}}) == key  # dict order is irrelevant
    assert cache_key(**{**base, "token_ids": np.array([1, 2, 3])}) == key
    variants = [{"model_id": "other"}, {"sae_id": "res-l9b"}, {"sae_version": "2"}, {"layers": [10]},
                {"layers": [9, 10]}, {"token_ids": [1, 2, 4]}, {"token_ids": [1, 2]}, {"token_ids": [1, 2, 3, 0]},
                {"options": {"top_k": 9, "mode": "dense"}}, {"options": {"top_k": 8, "mode": "sparse"}},
                {"options": {"top_k": 8}}]
    keys = {cache_key(**{**base, **v}) for v in variants}
    assert key not in keys and len(keys) == len(variants)


# ---- LRU ------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lru_hit_after_miss_and_ttl() -> None:
    metrics, clock = Metrics(), _Clock()
    cache = LruFeatureCache(ttl_s=10, max_value_bytes=1 << 20, metrics=metrics, clock=clock)
    want = _features()
    assert await cache.get("k") is None
    await cache.set("k", want)
    _assert_same(await cache.get("k"), want)
    clock.now += 10.5
    assert await cache.get("k") is None and len(cache) == 0 and cache.bytes_used == 0
    counts = _cache_counts(metrics)
    assert counts[("featurelens_cache_requests_total", "lru", "hit")] == 1
    assert counts[("featurelens_cache_requests_total", "lru", "miss")] == 2


async def test_lru_evicts_least_recently_used() -> None:
    size = len(encode_features(_features()))
    cache = LruFeatureCache(ttl_s=60, max_value_bytes=1 << 20, max_bytes=3 * size, max_entries=100)
    for name in "abc":
        await cache.set(name, _features())
    assert await cache.get("a") is not None  # a is now the most recent; b is the oldest
    await cache.set("d", _features())
    assert await cache.get("b") is None
    assert all([await cache.get(n) for n in "acd"]) and cache.bytes_used == 3 * size
    by_entries = LruFeatureCache(ttl_s=60, max_value_bytes=1 << 20, max_entries=2)
    for name in "xyz":
        await by_entries.set(name, _features())
    assert len(by_entries) == 2 and await by_entries.get("x") is None


async def test_lru_skips_oversized_values() -> None:
    metrics = Metrics()
    cache = LruFeatureCache(ttl_s=60, max_value_bytes=64, metrics=metrics)
    await cache.set("big", _features())
    assert await cache.get("big") is None and _errors(metrics, "oversize") == 1


def test_make_cache_picks_backend() -> None:
    assert isinstance(make_cache(None, 60, 1 << 20), LruFeatureCache)
    assert isinstance(make_cache("redis://127.0.0.1:1", 60, 1 << 20), RedisFeatureCache)


# ---- Redis ----------------------------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (apt-get install -y redis-server)")
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


async def test_redis_hit_after_miss_and_ttl(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisFeatureCache(redis_server.url, ttl_s=0.3, max_value_bytes=1 << 20, metrics=metrics)
    want = _features()
    assert await cache.get("k") is None
    await cache.set("k", want)
    _assert_same(await cache.get("k"), want)
    assert 0 < redis_server.client().pttl("k") <= 300
    await asyncio.sleep(0.4)
    assert await cache.get("k") is None
    counts = _cache_counts(metrics)
    assert counts[("featurelens_cache_requests_total", "redis", "hit")] == 1
    assert counts[("featurelens_cache_requests_total", "redis", "miss")] == 2
    assert _errors(metrics) == 0
    await cache.close()


async def test_redis_outage_is_survived_and_recovered(redis_server: RedisProcess,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    cache = RedisFeatureCache(redis_server.url, ttl_s=60, max_value_bytes=1 << 20, metrics=metrics,
                              backoff_s=0.2, warn_interval_s=30)
    want = _features()
    await cache.set("k", want)
    assert await cache.get("k") is not None

    redis_server.stop()
    started = time.monotonic()
    for _ in range(5):  # first call fails fast; the rest skip Redis during the back-off
        assert await cache.get("k") is None
        await cache.set("k2", want)
    assert time.monotonic() - started < 1.0
    errors_down = _errors(metrics, "connection")
    assert errors_down >= 1
    await asyncio.sleep(0.25)
    assert await cache.get("k") is None  # back-off over: tries again, fails again, counts again
    assert _errors(metrics, "connection") > errors_down
    warnings = [r for r in caplog.records if "serving without it" in r.getMessage()]
    assert len(warnings) == 1  # throttled to one per warn_interval_s

    redis_server.start()  # empty: persistence is off
    await asyncio.sleep(0.25)
    assert await cache.get("k") is None  # reconnects by itself; a plain miss now
    await cache.set("k", want)
    _assert_same(await cache.get("k"), want)
    await cache.close()


async def test_redis_slow_counts_timeout(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisFeatureCache(redis_server.url, ttl_s=60, max_value_bytes=1 << 20, metrics=metrics,
                              socket_timeout_s=0.1, connect_timeout_s=0.1, backoff_s=0.0)
    await cache.set("k", _features())
    # CLIENT PAUSE stalls every client's commands, as an overloaded or stuck Redis would.
    redis_server.client().execute_command("CLIENT", "PAUSE", "600", "ALL")
    started = time.monotonic()
    assert await cache.get("k") is None
    assert time.monotonic() - started < 0.5
    assert _errors(metrics, "timeout") == 1
    await asyncio.sleep(0.6)
    assert await cache.get("k") is not None
    await cache.close()


async def test_redis_corrupt_value_ignored_then_overwritten(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisFeatureCache(redis_server.url, ttl_s=60, max_value_bytes=1 << 20, metrics=metrics)
    raw = redis_server.client()
    raw.set("k", b"FLCF\x01garbage")
    assert await cache.get("k") is None
    assert _errors(metrics, "corrupt") == 1
    raw.delete("h")
    raw.hset("h", "field", "value")  # wrong type: Redis answers an error, which must not escape either
    assert await cache.get("h") is None and _errors(metrics, "response") == 1
    want = _features()
    await cache.set("k", want)
    _assert_same(await cache.get("k"), want)
    await cache.close()


async def test_redis_unreachable_from_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    metrics = Metrics()
    cache = make_cache(f"redis://127.0.0.1:{port}", 60, 1 << 20, metrics=metrics)
    assert await cache.get("k") is None
    await cache.set("k", _features())
    assert _errors(metrics) >= 1
    await cache.close()


async def test_redis_oversized_value_not_stored(redis_server: RedisProcess) -> None:
    metrics = Metrics()
    cache = RedisFeatureCache(redis_server.url, ttl_s=60, max_value_bytes=64, metrics=metrics)
    await cache.set("k", _features())
    assert redis_server.client().exists("k") == 0 and _errors(metrics, "oversize") == 1
    await cache.close()
