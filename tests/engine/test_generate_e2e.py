"""Foundation, end to end: real vLLM engine, real gRPC server on a free localhost port, real clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from featurelens.client import AsyncClient, build_generate_request
from featurelens.v1 import featurelens_pb2 as pb

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy(prompt, **kw):
    return build_generate_request(prompt, temperature=0.0, **kw)


async def _stream_text(stub, request) -> tuple[str, list[int], int]:
    text, ids, finish = [], [], pb.FINISH_REASON_UNSPECIFIED
    async for chunk in stub.GenerateStream(request):
        text.append(chunk.text_delta)
        ids.extend(t.token_id for t in chunk.tokens)
        finish = chunk.finish_reason or finish
    return "".join(text), ids, finish


async def test_health_went_from_not_serving_to_serving(served):
    assert served.health_seen[0] == "NOT_SERVING"
    assert served.health_seen[-1] == "SERVING"


async def test_capital_of_france_contains_paris(stub):
    reply = await stub.Generate(_greedy(FRANCE, max_new_tokens=32))
    assert "Paris" in reply.text
    assert reply.usage.completion_tokens == len(reply.tokens) > 0
    assert reply.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)


async def test_unary_and_streaming_agree_greedy(stub):
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]
    unary = await stub.Generate(_greedy(prompt, max_new_tokens=24))
    text, ids, finish = await _stream_text(stub, _greedy(prompt, max_new_tokens=24, stream=True))
    assert ids == [t.token_id for t in unary.tokens]
    assert text == unary.text
    assert finish == unary.finish_reason


async def test_two_concurrent_requests_batch_and_finish(served, stub):
    """Both streams are in the engine at once (continuous batching) and both complete."""
    peak = 0

    async def run(i: int) -> int:
        request = pb.GenerateStreamRequest(text=f"Count to forty, request {i}:",
                                           sampling=pb.SamplingOptions(temperature=0.0),
                                           stopping=pb.StoppingOptions(max_new_tokens=40, ignore_eos=True))
        n = 0
        async for chunk in stub.GenerateStream(request):
            n += len(chunk.tokens)
        return n

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, served.engine.num_unfinished_requests())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    counts = await asyncio.gather(run(0), run(1))
    watcher.cancel()
    assert counts == [40, 40]
    assert peak >= 2


async def _wait_engine_idle(served, timeout_s: float = 10.0) -> tuple[int, int]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        frontend = served.engine.num_unfinished_requests()
        worker = await served.engine.worker_active_requests()
        if (frontend, worker) == (0, 0) or asyncio.get_running_loop().time() > deadline:
            return frontend, worker
        await asyncio.sleep(0.1)


async def test_cancel_aborts_in_engine(served, stub):
    request = pb.GenerateStreamRequest(text="Tell me a very long story.", sampling=pb.SamplingOptions(temperature=0),
                                       stopping=pb.StoppingOptions(max_new_tokens=1500, ignore_eos=True))
    call = stub.GenerateStream(request)
    got = 0
    async for chunk in call:
        got += len(chunk.tokens)
        if got >= 3:
            break
    assert served.engine.num_unfinished_requests() == 1
    assert await served.engine.worker_active_requests() == 1
    call.cancel()
    assert await _wait_engine_idle(served) == (0, 0)


async def test_deadline_aborts_in_engine(served, stub):
    request = pb.GenerateRequest(text="Tell me a very long story.", sampling=pb.SamplingOptions(temperature=0),
                                 stopping=pb.StoppingOptions(max_new_tokens=1500, ignore_eos=True))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _wait_engine_idle(served) == (0, 0)


async def test_stop_sequence_stops(stub):
    prompt = [{"role": "user", "content": "List the days of the week, separated by commas."}]
    free = await stub.Generate(_greedy(prompt, max_new_tokens=40))
    words = [w.strip(" ,.\n") for w in free.text.split(",")]
    stop_word = next(w for w in words[1:] if w)
    stopped = await stub.Generate(_greedy(prompt, max_new_tokens=40, stop=[stop_word]))
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert stop_word not in stopped.text
    assert free.text.startswith(stopped.text)
    assert len(stopped.text) < len(free.text)


async def test_stop_token_id_reports_stop_sequence(stub):
    free = await stub.Generate(_greedy(FRANCE, max_new_tokens=16))
    stop_id = free.tokens[2].token_id
    stopped = await stub.Generate(_greedy(FRANCE, max_new_tokens=16, stop_token_ids=[stop_id]))
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert [t.token_id for t in stopped.tokens][:2] == [t.token_id for t in free.tokens][:2]


async def test_seed_reproduces(stub):
    def sampled(seed: int):
        return build_generate_request("Once upon a time", temperature=1.0, seed=seed, max_new_tokens=24)

    a = await stub.Generate(sampled(1234))
    b = await stub.Generate(sampled(1234))
    c = await stub.Generate(sampled(999))
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    assert [t.token_id for t in a.tokens] != [t.token_id for t in c.tokens]


async def test_logprobs_returned(stub):
    reply = await stub.Generate(_greedy(FRANCE, max_new_tokens=5, logprobs=True, top_logprobs=3))
    for token in reply.tokens:
        assert token.HasField("logprob") and token.logprob <= 0.0
        assert len(token.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].token_id == token.token_id


async def test_chat_template_applied(stub):
    tokens = await stub.Tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Hi")])))
    assert "<|im_start|>" in tokens.tokens and "assistant" in "".join(tokens.tokens)


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(text=""), "text"),
    (dict(), "prompt"),
    (dict(text="hi", stopping=pb.StoppingOptions(max_new_tokens=-3)), "stopping.max_new_tokens"),
    (dict(text="hi", stopping=pb.StoppingOptions(max_new_tokens=10**7)), "stopping.max_new_tokens"),
    (dict(text="hi", sampling=pb.SamplingOptions(temperature=7.0)), "sampling.temperature"),
    (dict(text="hi", sampling=pb.SamplingOptions(temperature=float("nan"))), "sampling.temperature"),
    (dict(text="hi", mode=42), "mode"),
    (dict(text="hi", stopping=pb.StoppingOptions(stop_sequences=["x"] * 50)), "stopping.stop_sequences"),
    (dict(text="hello " * 5000), "text"),
    (dict(chat=pb.ChatMessages()), "chat.messages"),
])
async def test_invalid_requests_get_invalid_argument(stub, served, request_kwargs, field):
    before = served.engine.num_unfinished_requests()
    for message in (pb.GenerateRequest(**request_kwargs), pb.GenerateStreamRequest(**request_kwargs)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if isinstance(message, pb.GenerateRequest):
                await stub.Generate(message)
            else:
                async for _ in stub.GenerateStream(message):
                    pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":"), info.value.details()
    assert served.engine.num_unfinished_requests() == before


async def test_feature_rpcs_name_the_missing_sae_or_explanations(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SearchFeatures(pb.SearchFeaturesRequest(layer=0, text_query="capital"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("layer: no SAE at layer 0")
    # The in-test toy SAE at layer 6 has no explanations file: a precondition, not a fake answer.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetFeature(pb.GetFeatureRequest(layer=6, feature_id=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "featurelens sae explain" in info.value.details()


async def test_model_info(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model == "SmolLM2-135M-Instruct"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert info.limits.max_new_tokens > 0 and info.max_model_len == 2048


async def test_model_info_reports_the_dtype_auto_chose_for_this_cpu(stub):
    from featurelens.server.engine import resolve_dtype

    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.dtype == resolve_dtype("auto", on_cpu=True)[0]


async def test_reflection_lists_the_service(served):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def list_services() -> set[str]:
        # A blocking client must not run on the event loop that hosts the server: use a thread.
        with grpc.insecure_channel(served.target) as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    services = await asyncio.to_thread(list_services)
    assert "featurelens.v1.FeatureLensService" in services
    assert "grpc.health.v1.Health" in services


async def test_async_client_typed_results(served):
    async with AsyncClient(served.target) as client:
        result = await client.generate(FRANCE, temperature=0.0, max_new_tokens=16)
        assert "Paris" in result.text and result.finish_reason in ("eos", "length")
        chunks = [chunk async for chunk in client.generate_stream(FRANCE, temperature=0.0, max_new_tokens=16)]
        assert "".join(c.text for c in chunks) == result.text
        assert chunks[-1].finish_reason == result.finish_reason


async def test_cli_prints_streamed_answer(served):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "featurelens.client.cli", "generate", "What is the capital of France?",
        "--target", served.target, "--max-new-tokens", "24",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "Paris" in out.decode()
    assert "[finish:" in err.decode()
