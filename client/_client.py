"""Sync and asyncio clients for featurelens.v1.FeatureLensService.

Retries: only UNAVAILABLE is retried, by gRPC's own retry machinery (service config), with exponential
backoff; a stream is retried only before its first message arrives, so no token is ever seen twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from featurelens.client.types import GenerateResult, ModelInfo, SteeringVector, StreamChunk
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_ROLES = {"system": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER, "assistant": pb.CHAT_ROLE_ASSISTANT}


def _service_config(max_attempts: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": "featurelens.v1.FeatureLensService"}],
        "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.2s", "maxBackoff": "5s",
                        "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})


def _channel_options(max_attempts: int, max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(max(2, max_attempts))),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _metadata(token: str | None, request_id: str | None) -> list[tuple[str, str]]:
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if request_id:
        md.append(("x-request-id", request_id))
    return md


def build_generate_request(prompt: str | Sequence[dict[str, str]], *, stream: bool = False,
                           max_new_tokens: int | None = None, min_new_tokens: int = 0,
                           temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                           seed: int | None = None, n: int | None = None, stop: Sequence[str] = (),
                           stop_token_ids: Sequence[int] = (),
                           logprobs: bool = False, top_logprobs: int = 0, request_id: str = "",
                           interpretability: pb.InterpretabilityOptions | None = None,
                           steering: Sequence[pb.SteeringIntervention] = (),
                           mode: pb.InferenceMode = pb.INFERENCE_MODE_UNSPECIFIED, sparsity_percent: int = 0,
                           json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
                           choice: Sequence[str] | None = None, grammar: str | None = None, priority: int = 0,
                           adapter: str = "") -> Any:
    """A GenerateRequest (or GenerateStreamRequest) from keyword arguments; `prompt` is text or chat
    messages like [{"role": "user", "content": "Hi"}]. `n`: independent samples (sample i seeded seed + i). At most one of `json_schema` (a JSON Schema as a dict or
    JSON text), `regex`, `choice` and `grammar` (EBNF `root ::= ...` or Lark) constrains the text. `priority`:
    lower is scheduled earlier, on a server started with --scheduling-policy priority (0 elsewhere). `adapter`:
    a LoRA adapter the server loaded (ModelInfo.adapters), "" for the base model."""
    message = (pb.GenerateStreamRequest if stream else pb.GenerateRequest)(request_id=request_id, mode=mode,
                                                                          sparsity_percent=sparsity_percent,
                                                                          priority=priority, adapter=adapter)
    _set_prompt(message, prompt)
    s = message.sampling
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("num_samples", n)):
        if value is not None:
            setattr(s, name, value)
    if max_new_tokens is not None:
        message.stopping.max_new_tokens = max_new_tokens
    message.stopping.min_new_tokens = min_new_tokens
    message.stopping.stop_sequences.extend(stop)
    message.stopping.stop_token_ids.extend(stop_token_ids)
    message.logprobs.token_logprobs = logprobs
    message.logprobs.top_logprobs = top_logprobs
    if interpretability is not None:
        message.interpretability.CopyFrom(interpretability)
    message.steering.extend(steering)
    structured = structured_output(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar)
    if structured is not None:
        message.structured_output.CopyFrom(structured)
    return message


def structured_output(*, json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
                      choice: Sequence[str] | None = None, grammar: str | None = None) -> pb.StructuredOutput | None:
    """The request's `structured_output` from at most one constraint (None when none is given)."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                                      ("grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of json_schema, regex, choice and grammar, got {', '.join(given)}")
    if json_schema is not None:
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return pb.StructuredOutput(json_schema=text)
    if regex is not None:
        return pb.StructuredOutput(regex=regex)
    if choice is not None:
        if isinstance(choice, str):
            raise TypeError("choice is a sequence of strings, not one string")
        return pb.StructuredOutput(choice=pb.ChoiceList(choices=list(choice)))
    if grammar is not None:
        return pb.StructuredOutput(grammar=grammar)
    return None


def _set_prompt(message: Any, prompt: str | Sequence[dict[str, str]]) -> None:
    if isinstance(prompt, str):
        message.text = prompt
        return
    for m in prompt:
        message.chat.messages.add(role=_ROLES.get(m["role"], pb.CHAT_ROLE_UNSPECIFIED), content=m["content"])


class Client:
    """Blocking client. `Client("host:port")`; use as a context manager or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float | None = 120.0, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, max_attempts: int = 4,
                 max_message_bytes: int = 8 * 1024 * 1024) -> None:
        options = _channel_options(max_attempts, max_message_bytes)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.FeatureLensServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.token = token

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout_s: float | None, request_id: str | None = None) -> dict[str, Any]:
        return {"timeout": timeout_s if timeout_s is not None else self.timeout_s,
                "metadata": _metadata(self.token, request_id)}

    def generate(self, prompt: str | Sequence[dict[str, str]], *, timeout_s: float | None = None,
                 **options: Any) -> GenerateResult:
        request = build_generate_request(prompt, **options)
        return GenerateResult.from_pb(self.stub.Generate(request, **self._kw(timeout_s)))

    def generate_stream(self, prompt: str | Sequence[dict[str, str]], *, timeout_s: float | None = None,
                        **options: Any) -> Iterator[StreamChunk]:
        """Iterates chunks as tokens arrive; breaking out of the loop cancels the request on the server."""
        call = self.stub.GenerateStream(build_generate_request(prompt, stream=True, **options),
                                        **self._kw(timeout_s))
        try:
            for message in call:
                yield StreamChunk.from_pb(message)
        finally:
            call.cancel()

    def tokenize(self, prompt: str | Sequence[dict[str, str]], *, timeout_s: float | None = None) -> list[int]:
        request = pb.TokenizeRequest()
        _set_prompt(request, prompt)
        return list(self.stub.Tokenize(request, **self._kw(timeout_s)).token_ids)

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout_s)))

    def register_vector(self, vector_id: str, values: Sequence[float], *,
                        timeout_s: float | None = None) -> SteeringVector:
        """Register (or replace) a steering vector; interventions then name it by id (ADD)."""
        reply = self.stub.RegisterSteeringVector(
            pb.RegisterSteeringVectorRequest(vector_id=vector_id, values=list(values)), **self._kw(timeout_s))
        return self.get_vector(reply.vector_id, timeout_s=timeout_s)

    def list_vectors(self, *, timeout_s: float | None = None) -> list[SteeringVector]:
        reply = self.stub.ListSteeringVectors(pb.ListSteeringVectorsRequest(), **self._kw(timeout_s))
        return [SteeringVector.from_pb(v) for v in reply.vectors]

    def get_vector(self, vector_id: str, *, timeout_s: float | None = None) -> SteeringVector:
        reply = self.stub.GetSteeringVector(pb.GetSteeringVectorRequest(vector_id=vector_id), **self._kw(timeout_s))
        return SteeringVector.from_pb(reply.vector, tuple(reply.values))

    def delete_vector(self, vector_id: str, *, timeout_s: float | None = None) -> None:
        self.stub.DeleteSteeringVector(pb.DeleteSteeringVectorRequest(vector_id=vector_id), **self._kw(timeout_s))


class AsyncClient:
    """asyncio client with the same methods as Client (awaitable / async-iterable)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float | None = 120.0, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, max_attempts: int = 4,
                 max_message_bytes: int = 8 * 1024 * 1024) -> None:
        options = _channel_options(max_attempts, max_message_bytes)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.FeatureLensServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.token = token

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def _kw(self, timeout_s: float | None) -> dict[str, Any]:
        return {"timeout": timeout_s if timeout_s is not None else self.timeout_s,
                "metadata": _metadata(self.token, None)}

    async def generate(self, prompt: str | Sequence[dict[str, str]], *, timeout_s: float | None = None,
                       **options: Any) -> GenerateResult:
        request = build_generate_request(prompt, **options)
        return GenerateResult.from_pb(await self.stub.Generate(request, **self._kw(timeout_s)))

    async def generate_stream(self, prompt: str | Sequence[dict[str, str]], *, timeout_s: float | None = None,
                              **options: Any) -> AsyncIterator[StreamChunk]:
        call = self.stub.GenerateStream(build_generate_request(prompt, stream=True, **options), **self._kw(timeout_s))
        try:
            async for message in call:
                yield StreamChunk.from_pb(message)
        finally:
            call.cancel()

    async def tokenize(self, prompt: str | Sequence[dict[str, str]], *, timeout_s: float | None = None) -> list[int]:
        request = pb.TokenizeRequest()
        _set_prompt(request, prompt)
        return list((await self.stub.Tokenize(request, **self._kw(timeout_s))).token_ids)

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout_s)))

    async def register_vector(self, vector_id: str, values: Sequence[float], *,
                              timeout_s: float | None = None) -> SteeringVector:
        """Register (or replace) a steering vector; interventions then name it by id (ADD)."""
        reply = await self.stub.RegisterSteeringVector(
            pb.RegisterSteeringVectorRequest(vector_id=vector_id, values=list(values)), **self._kw(timeout_s))
        return await self.get_vector(reply.vector_id, timeout_s=timeout_s)

    async def list_vectors(self, *, timeout_s: float | None = None) -> list[SteeringVector]:
        reply = await self.stub.ListSteeringVectors(pb.ListSteeringVectorsRequest(), **self._kw(timeout_s))
        return [SteeringVector.from_pb(v) for v in reply.vectors]

    async def get_vector(self, vector_id: str, *, timeout_s: float | None = None) -> SteeringVector:
        reply = await self.stub.GetSteeringVector(pb.GetSteeringVectorRequest(vector_id=vector_id),
                                                  **self._kw(timeout_s))
        return SteeringVector.from_pb(reply.vector, tuple(reply.values))

    async def delete_vector(self, vector_id: str, *, timeout_s: float | None = None) -> None:
        await self.stub.DeleteSteeringVector(pb.DeleteSteeringVectorRequest(vector_id=vector_id),
                                             **self._kw(timeout_s))
