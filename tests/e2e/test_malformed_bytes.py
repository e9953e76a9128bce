"""Undecodable requests over a real gRPC channel: random bytes sent to every RPC of the real servicer (in front
of the fuzz tests' stand-in engine) are refused as INVALID_ARGUMENT naming the expected message, never
UNKNOWN or INTERNAL; a valid request on the same server still answers; a capability the server has not
loaded is FAILED_PRECONDITION."""

from __future__ import annotations

import random

import grpc
import pytest
from featurelens.server.api import FeatureLensServicer, add_to_server
from featurelens.server.cache import LruFeatureCache
from featurelens.v1 import featurelens_pb2 as pb
from google.protobuf import symbol_database
from google.protobuf.message import DecodeError
from test_fuzz import SERVICE, SETTINGS, StandInEngine

PAYLOADS_PER_RPC = 8


def undecodable(message_class, rng: random.Random, n: int) -> list[bytes]:
    """Random payloads that the message's own parser refuses (most random bytes are; the rest are skipped)."""
    out: list[bytes] = []
    while len(out) < n:
        data = rng.randbytes(rng.randint(1, 64))
        try:
            message_class.FromString(data)
        except DecodeError:
            out.append(data)
    return out


@pytest.fixture
async def engine():
    return StandInEngine()


@pytest.fixture
async def channel(engine):
    server = grpc.aio.server()
    servicer = FeatureLensServicer(engine, SETTINGS,
                                   cache=LruFeatureCache(SETTINGS.cache_ttl_s, SETTINGS.cache_max_value_bytes))
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
async def test_random_bytes_are_invalid_argument(channel, method):
    request_class = symbol_database.Default().GetSymbol(method.input_type.full_name)
    path = f"/{SERVICE.full_name}/{method.name}"
    call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)
    for data in undecodable(request_class, random.Random(method.name), PAYLOADS_PER_RPC):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if method.server_streaming:
                async for _ in call(data, timeout=10):
                    pass
            else:
                await call(data, timeout=10)
        error = refused.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, data, error.details())
        assert error.details().startswith(f"request: not a valid {method.input_type.full_name} message")


async def test_a_valid_request_still_answers(channel):
    call = channel.unary_unary(f"/{SERVICE.full_name}/GetModelInfo",
                               request_serializer=pb.GetModelInfoRequest.SerializeToString,
                               response_deserializer=pb.GetModelInfoResponse.FromString)
    info = await call(pb.GetModelInfoRequest(), timeout=10)
    assert info.model == "toy-model" and info.dtype == "bfloat16"


async def test_score_hallucination_without_a_probe_is_a_failed_precondition(channel, engine):
    """The method exists; what is missing is a loaded probe: FAILED_PRECONDITION, not UNIMPLEMENTED."""
    engine.risk_probe = None
    call = channel.unary_unary(f"/{SERVICE.full_name}/ScoreHallucination",
                               request_serializer=pb.ScoreHallucinationRequest.SerializeToString,
                               response_deserializer=pb.ScoreHallucinationResponse.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(pb.ScoreHallucinationRequest(text="Q", response="A"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no risk probe is loaded" in refused.value.details()
