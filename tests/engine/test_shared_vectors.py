"""Steering vectors are shared state: two real servers (one tiny random-weight Llama checkpoint, the real
vLLM engine each) on one Redis. A vector registered on A steers on B; B restarted still has it; another
caller (another bearer token) can neither read nor overwrite it; limits are RESOURCE_EXHAUSTED; a vector
registered again with other values steers with the new values everywhere; a deleted one is refused."""

from __future__ import annotations

import grpc
import pytest
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from tiny_models import HIDDEN, build

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


def _settings(model: str, redis_url: str):
    from featurelens.server.config import Settings

    return Settings(model=model, port=0, metrics_port=-1, max_num_seqs=4, max_model_len=256, kv_cache_gib=1,
                    redis_url=redis_url, auth_tokens=f"{ALICE},{BOB}", max_vectors_per_caller=2,
                    risk_probe="none", sae=[])


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _steered(vector_id: str | None) -> pb.GenerateRequest:
    steering = [pb.SteeringIntervention(layer=1, vector_id=vector_id, op=pb.STEERING_OP_ADD, strength=8.0)] \
        if vector_id else []
    return pb.GenerateRequest(text="The shared state of replicas", sampling=pb.SamplingOptions(temperature=0.0),
                              stopping=pb.StoppingOptions(max_new_tokens=8, ignore_eos=True),
                              logprobs=pb.LogprobOptions(token_logprobs=True), steering=steering)


def _answer(reply: pb.GenerateResponse) -> list[tuple[int, float]]:
    return [(t.token_id, round(t.logprob, 4)) for t in reply.tokens]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(build("llama", tmp_path_factory.mktemp("tiny-llama") / "llama"))


async def test_vectors_are_shared_private_and_survive_a_restart(tiny_llama, session_redis):
    import redis
    from featurelens.server.app import start_server

    redis.Redis.from_url(session_redis.url).flushdb()
    a = await start_server(_settings(tiny_llama, session_redis.url))
    b = await start_server(_settings(tiny_llama, session_redis.url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ca, \
                grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as cb:
            on_a, on_b = pb_grpc.FeatureLensServiceStub(ca), pb_grpc.FeatureLensServiceStub(cb)
            first = [0.5 if i % 2 else -0.5 for i in range(HIDDEN)]
            await on_a.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="dir", values=first),
                                              metadata=_auth(ALICE))
            plain = _answer(await on_b.Generate(_steered(None), metadata=_auth(ALICE)))
            steered_b = _answer(await on_b.Generate(_steered("dir"), metadata=_auth(ALICE)))
            steered_a = _answer(await on_a.Generate(_steered("dir"), metadata=_auth(ALICE)))
            assert steered_b == steered_a != plain  # registered on A, steers on B exactly as on A

            listed = await on_b.ListSteeringVectors(pb.ListSteeringVectorsRequest(), metadata=_auth(ALICE))
            assert listed.store == "redis" and [v.vector_id for v in listed.vectors] == ["dir"]
            got = await on_b.GetSteeringVector(pb.GetSteeringVectorRequest(vector_id="dir"), metadata=_auth(ALICE))
            assert list(got.values) == first and got.vector.dimension == HIDDEN

            # Bob: another namespace. He cannot see, use or overwrite Alice's vector.
            assert not (await on_b.ListSteeringVectors(pb.ListSteeringVectorsRequest(), metadata=_auth(BOB))).vectors
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await on_b.GetSteeringVector(pb.GetSteeringVectorRequest(vector_id="dir"), metadata=_auth(BOB))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await on_b.Generate(_steered("dir"), metadata=_auth(BOB))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith("steering[0].vector_id:")
            await on_b.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="dir", values=[1.0] * HIDDEN),
                                              metadata=_auth(BOB))
            got = await on_a.GetSteeringVector(pb.GetSteeringVectorRequest(vector_id="dir"), metadata=_auth(ALICE))
            assert list(got.values) == first

            # Limits: two vectors per caller here.
            await on_a.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="two", values=first),
                                              metadata=_auth(ALICE))
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await on_a.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="three", values=first),
                                                  metadata=_auth(ALICE))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # B restarts (a new process would be the same: nothing of the vectors lived in B).
        await b.stop(grace_s=0)
        b = await start_server(_settings(tiny_llama, session_redis.url))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ca, \
                grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as cb:
            on_a, on_b = pb_grpc.FeatureLensServiceStub(ca), pb_grpc.FeatureLensServiceStub(cb)
            assert _answer(await on_b.Generate(_steered("dir"), metadata=_auth(ALICE))) == steered_a

            # Registered again with other values on B: both replicas steer with the new values (no stale copy
            # in A's workers, no stale prefix-cache blocks).
            second = [0.5 if i % 3 else -1.0 for i in range(HIDDEN)]
            await on_b.RegisterSteeringVector(pb.RegisterSteeringVectorRequest(vector_id="dir", values=second),
                                              metadata=_auth(ALICE))
            new_a = _answer(await on_a.Generate(_steered("dir"), metadata=_auth(ALICE)))
            new_b = _answer(await on_b.Generate(_steered("dir"), metadata=_auth(ALICE)))
            assert new_a == new_b != steered_a

            await on_a.DeleteSteeringVector(pb.DeleteSteeringVectorRequest(vector_id="dir"), metadata=_auth(ALICE))
            with pytest.raises(grpc.aio.AioRpcError) as deleted:
                await on_b.Generate(_steered("dir"), metadata=_auth(ALICE))
            assert deleted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await b.stop(grace_s=0)
        await a.stop(grace_s=0)
