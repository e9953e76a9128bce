"""The gRPC servicer: validate → translate to an engine request → stream results back.

Every handler turns ApiError into its gRPC status: INVALID_ARGUMENT naming the field for bad input (bytes that
do not parse included, see add_to_server), FAILED_PRECONDITION for a capability this server has not loaded.
Unary Generate is the stream collected, so both always agree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from featurelens.server.cache import CachedFeatures, FeatureCache, LayerCodes, LruFeatureCache, cache_key
from featurelens.server.config import Settings
from featurelens.server.engine import Engine, ModelShape
from featurelens.server.interp.capture import FeatureChannelError, FeatureReceiver, RequestFeatures
from featurelens.server.interp.steering import parse_vector
from featurelens.server.interp_plan import (
    InterpPlan,
    layer_features,
    parse_feature_selection,
    plan_interpretability,
    prompt_features,
    risk_capture_k,
    risk_codes,
    token_codes,
)
from featurelens.server.metrics import Metrics
from featurelens.server.security import caller_namespace, request_id_var
from featurelens.server.state import StoredVector, VectorStore, worker_key
from featurelens.server.tracing import Tracing, end_rpc, mark_error, monotonic_to_epoch_ns, rpc_span
from featurelens.server.validation import (
    ApiError,
    GenerationPlan,
    chat_messages,
    check_mode,
    invalid,
    prompt_token_ids,
    validate_generate,
)
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from featurelens.server.interp.catalog import FeatureCatalog
    from featurelens.server.interp.risk import RunningRisk
    from opentelemetry.trace import Span
    from vllm import CompletionOutput, SamplingParams
    from vllm.tokenizers import TokenizerLike

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"
MODE_LABELS = {pb.INFERENCE_MODE_DENSE: "dense", pb.INFERENCE_MODE_SPARSE: "sparse",
               pb.INFERENCE_MODE_QUANTIZED: "quantized"}


def _chosen_logprobs(completion: CompletionOutput) -> list[float]:
    """Each new token's own logprob (vLLM lists the chosen token beside any top-k alternatives)."""
    out = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or [], strict=False):
        entry = position.get(token_id) if position else None
        out.append(float(entry.logprob) if entry is not None else 0.0)
    if len(out) < len(completion.token_ids):
        raise RuntimeError("the engine returned fewer logprobs than tokens for a risk request with uncertainty terms")
    return out


def _finish_reason(completion: CompletionOutput, plan: GenerationPlan) -> pb.FinishReason:
    reason, stop_reason = completion.finish_reason, completion.stop_reason
    if reason == "length":
        return pb.FINISH_REASON_LENGTH
    if reason == "abort":
        return pb.FINISH_REASON_CANCELLED
    if reason == "stop":
        if isinstance(stop_reason, str) or (isinstance(stop_reason, int) and stop_reason in plan.stop_token_ids):
            return pb.FINISH_REASON_STOP_SEQUENCE
        return pb.FINISH_REASON_EOS
    return pb.FINISH_REASON_ERROR if reason else pb.FINISH_REASON_UNSPECIFIED


def _cache_salt(steering_salt: str | None, sparsity_percent: int, mode: int = 0, num_prompt_tokens: int = 0,
                sparse_prompt: bool = False) -> str | None:
    """Prefix-cache namespace: sparse-mode and int8 KV differ from dense KV, so each mode (and sparse level)
    gets its own. Sparse mode runs the prompt dense and generated tokens sparse (unless --sparse-prompt), so its
    KV also depends on where the prompt ends: the boundary is part of its namespace."""
    if sparsity_percent:
        boundary = "" if sparse_prompt else f"-p{num_prompt_tokens}"
        return f"sparse{sparsity_percent}{boundary}-{steering_salt or 'plain'}"
    if mode == pb.INFERENCE_MODE_QUANTIZED:
        return f"int8-{steering_salt or 'plain'}"
    return steering_salt


_T = TypeVar("_T")
_ENDED = object()


async def merge_streams(streams: Sequence[AsyncIterator[_T]]) -> AsyncIterator[_T]:
    """The items of several async generators as they come. The first error ends the merge and is raised; when
    the merge ends early (error, cancel, the consumer stops) every stream is closed, so each aborts its engine
    request. A small queue keeps producers at most a few items ahead of the consumer."""
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue(maxsize=2 * len(streams))

    async def pump(stream: AsyncIterator[_T]) -> None:
        try:
            async for item in stream:
                await queue.put((item, None))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — handed to the consumer, which raises it
            await queue.put((None, error))
            return
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        await queue.put((_ENDED, None))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    running = len(tasks)
    try:
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _ENDED:
                running -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class FeatureLensServicer(pb_grpc.FeatureLensServiceServicer):
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None,
                 cache: FeatureCache | None = None, tracing: Tracing | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.tracing = tracing if tracing is not None else Tracing.from_settings(settings)
        self.metrics = metrics if metrics is not None else Metrics()
        self.cache = cache if cache is not None else LruFeatureCache(settings.cache_ttl_s,
                                                                     settings.cache_max_value_bytes)
        self.in_flight = 0
        self.vectors: VectorStore | None = None  # set once the engine knows the model (app.start_server)

    # -- plumbing ------------------------------------------------------------------------------------

    @staticmethod
    def _metadata_request_id(context: grpc.aio.ServicerContext) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value:
                return str(value)[:128]
        return None

    def _request_id(self, request: Any, context: grpc.aio.ServicerContext) -> str:
        """The request's own id, else x-request-id metadata, else the id made for this RPC's logs."""
        request_id = getattr(request, "request_id", "") or self._metadata_request_id(context) or request_id_var.get()
        request_id_var.set(request_id)
        rpc_span.get().set_attribute("featurelens.request_id", request_id)
        return request_id

    async def _fail(self, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        if isinstance(error, ApiError):
            await context.abort(error.code, error.message)
        log.exception("internal error")
        if self.engine.errored:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is not running; retry on another replica")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")

    async def _guard(self, context: grpc.aio.ServicerContext, method: str,
                     body: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        """Admission, status mapping and RPC metrics around a handler body (an async generator)."""
        started = time.perf_counter()
        code, detail = grpc.StatusCode.OK, ""
        self.in_flight += 1
        request_id_var.set(self._metadata_request_id(context) or uuid.uuid4().hex)  # this RPC's task only
        span = self.tracing.start_rpc(method, context.invocation_metadata())  # this RPC's task only, too
        span.set_attribute("featurelens.request_id", request_id_var.get())
        try:
            with self.metrics.in_flight():
                if self.in_flight > self.settings.max_in_flight:
                    raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"server busy: {self.in_flight - 1} requests in flight (limit "
                                   f"{self.settings.max_in_flight}); retry after ~1s with backoff")
                async for item in body():
                    yield item
        except ApiError as error:
            code, detail = error.code, error.message
            await self._fail(context, error)
        except FeatureChannelError as error:  # the worker's codes stopped coming: retry, maybe elsewhere
            code, detail = grpc.StatusCode.UNAVAILABLE, f"features: {error}"
            await self._fail(context, ApiError(code, f"features: {error}; retry the request"))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # noqa: BLE001 — turned into a status, never a crash
            if isinstance(error, grpc.aio.AbortError):
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            code, detail = grpc.StatusCode.INTERNAL, type(error).__name__
            await self._fail(context, error)
        finally:
            self.in_flight -= 1
            self.metrics.observe_rpc(method, code, time.perf_counter() - started)
            end_rpc(span, code, detail)

    # RPCs reach the servicer as soon as gRPC listens, while the engine still starts (health NOT_SERVING):
    # what only a started engine has is read through these, which say so instead of failing on None.

    @property
    def _shape(self) -> ModelShape:
        shape = self.engine.shape
        if shape is None:
            raise RuntimeError("the engine has not started yet")
        return shape

    @property
    def _features(self) -> FeatureReceiver:
        features = self.engine.features
        if features is None:
            raise RuntimeError("the engine has not started yet: no feature channel")
        return features

    @property
    def _tokenizer(self) -> TokenizerLike:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise RuntimeError("the engine has not started yet: no tokenizer")
        return tokenizer

    async def _unary(self, context: grpc.aio.ServicerContext, method: str, body: Callable[[], Awaitable[Any]]) -> Any:
        async def once() -> AsyncIterator[Any]:
            yield await body()

        results = [item async for item in self._guard(context, method, once)]
        return results[0] if results else None

    # -- generation ------------------------------------------------------------------------------------

    async def _plan(self, request: pb.GenerateRequest | pb.GenerateStreamRequest,
                    context: grpc.aio.ServicerContext) -> tuple[GenerationPlan, InterpPlan]:
        shape = self._shape
        plan = validate_generate(request, self.engine, self.settings, shape.max_model_len, shape.vocab_size,
                                 self._request_id(request, context), sparsity_levels=self.engine.sparsity_levels,
                                 quantized_available=self.engine.quantized is not None,
                                 adapters=getattr(self.engine, "adapters", {}))
        vectors = await self._resolve_vectors(request.steering, context)
        interp = plan_interpretability(request, self.engine, self.settings,
                                       {vector_id: len(v.values) for vector_id, v in vectors.items()})
        namespace = caller_namespace(context.invocation_metadata())
        for spec in interp.steer:  # the workers know vectors by content: see state.worker_key
            if "vector" in spec:
                vector = vectors[spec["vector"]]
                key = spec["vector"] = worker_key(namespace, vector)
                interp.vectors[key] = vector.values
        return plan, interp

    def _sampling_params(self, plan: GenerationPlan, interp: InterpPlan, key: str,
                         received: RequestFeatures | None = None, sample_index: int = 0) -> SamplingParams:
        """vLLM SamplingParams of one sample; `received` is its open RequestFeatures (the tag rides in the spec)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        extra = interp.extra_args(key, getattr(received, "tag", None)) if interp.active else None
        if plan.sparsity_percent:
            extra = extra or {"featurelens": {"key": key}}
            extra["featurelens"]["sparse"] = str(plan.sparsity_percent)
        if plan.mode == pb.INFERENCE_MODE_QUANTIZED:
            extra = extra or {"featurelens": {"key": key}}
            extra["featurelens"]["quant"] = "int8"
        # Prompt features need every prompt position computed, so such requests skip reading the prefix cache.
        # A fresh StructuredOutputsParams per engine request: vLLM's processor rewrites it (choice → grammar).
        structured = StructuredOutputsParams(**plan.structured_output) if plan.structured_output else None
        kwargs = plan.sample_kwargs(sample_index)
        if interp.risk is not None and interp.risk.needs_logprobs and not interp.risk_logprobs \
                and kwargs.get("logprobs") is None:
            # A probe with uncertainty terms reads each chosen token's logprob (0: that token's only), from vLLM
            # when the worker cannot send it (`Engine.worker_logprobs`).
            kwargs = {**kwargs, "logprobs": 0}
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA, extra_args=extra,
                              skip_reading_prefix_cache=True if interp.include_prompt else None,
                              structured_outputs=structured)

    def _tokens(self, completion: CompletionOutput, plan: GenerationPlan) -> list[pb.Token]:
        tokens = []
        logprobs = completion.logprobs or []
        for i, token_id in enumerate(completion.token_ids):
            token = pb.Token(token_id=token_id, token_text=self.engine.token_text(token_id))
            if plan.token_logprobs and i < len(logprobs) and logprobs[i]:
                position = logprobs[i]
                if token_id in position:
                    token.logprob = float(position[token_id].logprob)
                ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
                for alt_id, alt in ranked[: plan.top_logprobs]:
                    token.top_logprobs.add(token_id=alt_id, token_text=alt.decoded_token or "",
                                           logprob=float(alt.logprob))
            tokens.append(token)
        return tokens

    def _samples(self, plan: GenerationPlan, interp: InterpPlan) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Every sample's chunks, interleaved as they come. One engine request per sample, each with its own seed
        (seed + i), feature channel and running risk: vLLM's own n > 1 fans out child requests that share the
        parent's spec, and with it the tag the worker files codes under. Prompt features come with sample 0."""
        if plan.num_samples == 1:
            return self._chunks(plan, interp)
        others = dataclasses.replace(interp, include_prompt=False)
        return merge_streams([self._chunks(plan, interp if i == 0 else others, i) for i in range(plan.num_samples)])

    async def _chunks(self, plan: GenerationPlan, interp: InterpPlan,
                      sample_index: int = 0) -> AsyncIterator[pb.GenerateStreamResponse]:
        """One sample as stream chunks (features attached); the last carries finish reason and usage.
        The request is aborted in the engine if the consumer stops early."""
        engine_id = f"{plan.request_id}-{uuid.uuid4().hex[:8]}"
        received = self._features.open(engine_id, risk_layers=interp.risk_capture,
                                       wants_logprob=interp.risk_logprobs) if interp.receives else None
        running_risk = interp.risk.start() if interp.risk is not None else None
        n_prompt = len(plan.prompt_token_ids)
        mode = MODE_LABELS.get(plan.mode, "dense")
        for spec in interp.steer:
            self.metrics.count_steering(spec["op"])
        started = last = time.perf_counter()
        generated = 0
        risk_positions: list[int] = []  # positions whose codes the risk scored (end of sequence is not)
        span, interp_span = self._trace_sample(plan, interp, engine_id, sample_index)
        submitted_ns, interp_s, finish = time.time_ns(), 0.0, pb.FINISH_REASON_UNSPECIFIED
        if interp.vectors:
            await self.engine.use_vectors(interp.vectors)
        try:
            params = self._sampling_params(plan, interp, engine_id, received, sample_index)
            async for output in self.engine.generate(engine_id, plan.prompt_token_ids, params,
                                                     self._salt(interp, plan.prompt_token_ids, plan.sparsity_percent,
                                                                plan.mode), priority=plan.priority,
                                                     adapter=plan.adapter):
                completion = output.outputs[0]
                if submitted_ns:  # the first output: the request has left vLLM's queue
                    self._trace_queue(span, getattr(output, "metrics", None), submitted_ns)
                    submitted_ns = 0
                chunk = pb.GenerateStreamResponse(text_delta=completion.text, request_id=plan.request_id,
                                                  sample_index=sample_index)
                tokens = self._tokens(completion, plan)
                chosen_logprobs = _chosen_logprobs(completion) if running_risk is not None and \
                    running_risk.needs_logprobs and not interp.risk_logprobs else None
                if received is not None:
                    interp_started = time.perf_counter()
                    if generated == 0 and interp.include_prompt:
                        chunk.prompt_features.extend(
                            await prompt_features(received, interp, self.engine, plan.prompt_token_ids))
                    for i, token in enumerate(tokens):
                        # The residual stream that predicted generated token g sits at position n_prompt + g - 1.
                        position = n_prompt + generated - 1
                        if interp.returned:
                            codes = await token_codes(received, interp, position)
                            token.features.extend(layer_features(codes, interp, self.engine))
                        if running_risk is not None and token.token_id in self._shape.eos_token_ids:
                            # End of sequence is not scored (the probe is trained and documented on the
                            # text's tokens, as ScoreHallucination scores them): it carries the risk so far.
                            token.risk = running_risk.risk()
                        elif running_risk is not None:
                            if chosen_logprobs is not None:
                                running_risk.add_logprob(chosen_logprobs[i])
                            elif interp.risk_logprobs:
                                # The worker's logprob: a score is filed only once it is in (wants_logprob).
                                await received.get_risk_score(position)
                                running_risk.add_logprob(received.risk_logprob(position))
                            if running_risk.takes_scores:
                                token.risk = running_risk.add_score(await received.get_risk_score(position))
                            else:
                                token.risk = running_risk.add(await risk_codes(received, interp, position))
                            risk_positions.append(position)
                        generated += 1
                    for lf in (f for token in tokens for f in token.features):
                        self.metrics.count_features_returned(lf.layer, len(lf.activations))
                    interp_s += time.perf_counter() - interp_started
                else:
                    generated += len(tokens)
                chunk.tokens.extend(tokens)
                now = time.perf_counter()
                if tokens:
                    if generated == len(tokens):
                        self.metrics.observe_time_to_first_token(mode, now - started)
                    else:
                        self.metrics.observe_inter_token_latency(mode, (now - last) / len(tokens))
                    last = now
                if completion.finish_reason is not None:
                    chunk.finish_reason = finish = _finish_reason(completion, plan)
                    chunk.usage.prompt_tokens = n_prompt
                    chunk.usage.completion_tokens = generated
                    self.metrics.observe_request(mode, now - started, n_prompt, generated)
                    if running_risk is not None and generated:
                        if running_risk.scored:  # the explanation's pooled features, once
                            assert received is not None  # a risk request receives its codes
                            running_risk.pool([received.risk_codes_arrived(interp.risk_capture, p)
                                               for p in risk_positions])
                        chunk.risk.CopyFrom(self._response_risk(running_risk, mode))
                        if interp_span is not None:
                            interp_span.set_attributes({"featurelens.risk.score": chunk.risk.score,
                                                        "featurelens.risk.label": pb.RiskLabel.Name(chunk.risk.label)})
                yield chunk
        except Exception as error:
            mark_error(span, error)
            raise
        finally:
            if received is not None:
                self._features.close(engine_id)
            if interp.vectors:
                await self.engine.release_vectors(interp.vectors)
            span.set_attributes({"featurelens.completion_tokens": generated,
                                 "featurelens.finish_reason": pb.FinishReason.Name(finish)})
            if interp_span is not None:
                interp_span.set_attribute("featurelens.interp.frontend_s", interp_s)
                interp_span.end()
            span.end()

    def _trace_sample(self, plan: GenerationPlan, interp: InterpPlan, engine_id: str,
                      sample_index: int) -> tuple[Span, Span | None]:
        """The `engine` span of one sample's engine request and, when it asked for any, its `interpretability`
        span (what was asked; the frontend's time attaching features and risk, waits for codes included)."""
        span = self.tracing.start("engine", attributes={
            "featurelens.engine_request_id": engine_id, "featurelens.sample_index": sample_index,
            "featurelens.prompt_tokens": len(plan.prompt_token_ids), "featurelens.priority": plan.priority,
            "featurelens.mode": MODE_LABELS.get(plan.mode, "dense"), "featurelens.adapter": plan.adapter,
            "featurelens.structured_output": ",".join(plan.structured_output or ())})
        if not interp.active:
            return span, None
        return span, self.tracing.start("interpretability", span, {
            "featurelens.features.layers": list(interp.returned), "featurelens.risk": interp.risk is not None,
            "featurelens.steering.interventions": len(interp.steer), "featurelens.prompt_features": interp.include_prompt})

    def _trace_queue(self, parent: Span, stats: Any, submitted_ns: int) -> None:
        """The `queue` span: from vLLM's own stamps (queued → first scheduled, engine-core monotonic clock) when
        it keeps per-request stats, else from handing the request over to its first output (prefill included)."""
        if not self.tracing.recording:
            return
        queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
        if queued and scheduled >= queued:
            start, end, source = monotonic_to_epoch_ns(queued), monotonic_to_epoch_ns(scheduled), "vllm"
        else:
            start, end, source = submitted_ns, time.time_ns(), "first_output"
        self.tracing.start("queue", parent, {"featurelens.queue.source": source}, start_time=start).end(end_time=end)

    async def GenerateStream(self, request: pb.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async def body() -> AsyncIterator[pb.GenerateStreamResponse]:
            with self.tracing.span("validation"):
                plan, interp = await self._plan(request, context)
            async for chunk in self._samples(plan, interp):
                yield chunk

        async for chunk in self._guard(context, "GenerateStream", body):
            yield chunk

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def body() -> pb.GenerateResponse:
            with self.tracing.span("validation"):
                plan, interp = await self._plan(request, context)
            response = pb.GenerateResponse(request_id=plan.request_id, model=self._shape.model_id,
                                           mode=plan.mode)
            samples = [pb.Sample(sample_index=i) for i in range(plan.num_samples)]
            pieces: list[list[str]] = [[] for _ in samples]
            async for chunk in self._samples(plan, interp):
                sample = samples[chunk.sample_index]
                pieces[chunk.sample_index].append(chunk.text_delta)
                sample.tokens.extend(chunk.tokens)
                response.prompt_features.extend(chunk.prompt_features)
                if chunk.finish_reason:
                    sample.finish_reason = chunk.finish_reason
                    sample.usage.CopyFrom(chunk.usage)
                    sample.risk.CopyFrom(chunk.risk)
            for sample, parts in zip(samples, pieces, strict=True):
                sample.text = "".join(parts)
            first = samples[0]  # the single-answer fields, as before num_samples existed
            response.text, response.finish_reason = first.text, first.finish_reason
            response.tokens.extend(first.tokens)
            response.usage.CopyFrom(first.usage)
            response.risk.CopyFrom(first.risk)
            if plan.num_samples > 1:
                response.samples.extend(samples)
            return response

        return await self._unary(context, "Generate", body)

    def _response_risk(self, running: RunningRisk, mode: str) -> pb.ResponseRisk:
        risk = running.response_risk(self.engine.explain)
        self.metrics.observe_response_risk(self._shape.model_id, mode, risk.score,
                                           risk.label == pb.RISK_LABEL_HIGH)
        if running.probe.reports_ood:  # the probe file carries an OOD reference (v2)
            self.metrics.observe_response_ood(self._shape.model_id, mode, risk.ood)
        return risk

    def _salt(self, interp: InterpPlan | None, prompt_ids: list[int], sparsity_percent: int, mode: int) -> str | None:
        steering = interp.cache_salt(len(prompt_ids)) if interp is not None else None
        return _cache_salt(steering, sparsity_percent, mode, len(prompt_ids), self.settings.sparse_prompt)

    # -- features ----------------------------------------------------------------------------------------

    def _request_mode(self, request: pb.GetFeatureActivationsRequest | pb.ScoreHallucinationRequest
                      ) -> tuple[pb.InferenceMode, int]:
        return check_mode(request.mode, request.sparsity_percent, self.engine.sparsity_levels,
                          self.engine.quantized is not None)

    async def _prompt_codes(self, ids: list[int], capture: dict[int, int], request_id: str,
                            mode: pb.InferenceMode = pb.INFERENCE_MODE_DENSE,
                            sparsity_percent: int = 0, logprobs: bool = False) -> tuple[CachedFeatures, bool]:
        """Top-k codes of every prompt token, from the cache or computed by a 1-token engine pass. Both
        paths return fp16-rounded activations, so a cached answer equals a recomputed one exactly. With
        `logprobs` (a risk probe with uncertainty terms), the same pass also asks vLLM for every token's
        log-probability (prompt_logprobs) and the entry keeps them: one pass instead of two, and none on a hit.
        An entry without them (written by a request that did not need them) is recomputed and replaced."""
        entries = [self.engine.saes[layer] for layer in capture]
        options: dict[str, Any] = {"top_k": capture, "engine": self.engine.codes_identity,
                                   "mode": MODE_LABELS.get(mode, "dense") + (str(sparsity_percent) if sparsity_percent else "")}
        key = cache_key(self._shape.model_id, ",".join(e.sae_id for e in entries),
                        ",".join(e.version for e in entries), list(capture), ids, options)
        cached = await self.cache.get(key)
        hit = cached is not None and [lc.layer for lc in cached.layers] == list(capture) and (
            not logprobs or cached.token_logprobs is not None)
        rpc_span.get().set_attribute("featurelens.feature_cache_hit", hit)
        if cached is not None and hit:
            return cached, True
        interp = InterpPlan(capture=capture, include_prompt=True)
        sampling: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0}
        if logprobs:
            sampling["prompt_logprobs"] = 0
        plan = GenerationPlan(prompt_token_ids=ids, sampling_kwargs=sampling,
                              stop_token_ids=frozenset(), token_logprobs=False, top_logprobs=0,
                              mode=mode, request_id=request_id, sparsity_percent=sparsity_percent)
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        received = self._features.open(engine_id)
        positions: list[Any] = []
        try:
            async for output in self.engine.generate(engine_id, ids,
                                                     self._sampling_params(plan, interp, engine_id, received),
                                                     self._salt(None, ids, sparsity_percent, mode)):
                positions = list(getattr(output, "prompt_logprobs", None) or positions)
            layers = []
            for layer in capture:
                rows = [await received.get(layer, position) for position in range(len(ids))]
                layers.append(LayerCodes(layer=layer, indices=np.stack([r[0] for r in rows]).astype(np.uint32),
                                         values=np.stack([r[1] for r in rows]).astype(np.float16)))
        finally:
            self._features.close(engine_id)
        token_logprobs = None
        if logprobs:
            if len(positions) < len(ids):
                raise ApiError(grpc.StatusCode.INTERNAL, "the engine returned no prompt logprobs")
            # Position 0 has none (vLLM gives None there): NaN, never read by a probe.
            token_logprobs = np.asarray([float(positions[i][ids[i]].logprob) if positions[i] else float("nan")
                                         for i in range(len(ids))], dtype=np.float32)
        result = CachedFeatures(token_ids=np.asarray(ids, dtype=np.uint32), layers=layers,
                                token_logprobs=token_logprobs)
        await self.cache.set(key, result)
        return result, False

    async def GetFeatureActivations(self, request: pb.GetFeatureActivationsRequest,
                                    context: grpc.aio.ServicerContext) -> pb.GetFeatureActivationsResponse:
        async def body() -> pb.GetFeatureActivationsResponse:
            if not self.engine.interpretability_available:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               "features: this compiled engine has no tap call sites (see the server log); "
                               "restart it with --enforce-eager")
            if not request.features:
                raise invalid("features", "select at least one layer (GetModelInfo.saes lists them)")
            capture = parse_feature_selection(request.features, self.engine, self.settings.max_features_per_token,
                                              "features")
            mode, sparsity_percent = self._request_mode(request)
            ids = prompt_token_ids(request, self.engine, self._shape.max_model_len)
            codes, cached = await self._prompt_codes(ids, capture, self._request_id(request, context), mode,
                                                     sparsity_percent)
            response = pb.GetFeatureActivationsResponse(cached=cached)
            for position, token_id in enumerate(ids):
                tf = response.tokens.add(token_id=token_id, token_text=self.engine.token_text(token_id))
                for lc in codes.layers:
                    lf = tf.features.add(layer=lc.layer, sae_id=self.engine.saes[lc.layer].sae_id)
                    for index, value in zip(lc.indices[position].tolist(), lc.values[position].tolist(), strict=True):
                        if value > 0.0:
                            lf.activations.add(feature_id=index, activation=value)
            return response

        return await self._unary(context, "GetFeatureActivations", body)

    # -- steering vectors: shared state, one namespace per caller ------------------------------------------

    def _vector_store(self) -> VectorStore:
        if self.vectors is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "vector_id: the vector store is not ready yet; retry")
        return self.vectors

    async def _resolve_vectors(self, steering: Sequence[pb.SteeringIntervention],
                               context: grpc.aio.ServicerContext) -> dict[str, StoredVector]:
        """The caller's registered vectors that `steering` adds, from the shared store (any replica may have
        registered them). Unknown ids are left out: validation then names the field."""
        ids = {item.vector_id for item in steering if item.WhichOneof("target") == "vector_id"}
        if not ids:
            return {}
        store, namespace = self._vector_store(), caller_namespace(context.invocation_metadata())
        found = {}
        for vector_id in sorted(ids):
            vector = await store.get(namespace, vector_id)
            if vector is not None:
                found[vector_id] = vector
        return found

    def _vector_message(self, vector: StoredVector) -> pb.SteeringVector:
        return pb.SteeringVector(vector_id=vector.vector_id, dimension=len(vector.values), l2_norm=vector.l2_norm,
                                 digest=vector.digest)

    async def RegisterSteeringVector(self, request: pb.RegisterSteeringVectorRequest,
                                     context: grpc.aio.ServicerContext) -> pb.RegisterSteeringVectorResponse:
        async def body() -> pb.RegisterSteeringVectorResponse:
            vector = parse_vector(request.vector_id, request.values, self._shape.hidden_size)
            stored = StoredVector(request.vector_id, tuple(vector.tolist()))
            await self._vector_store().put(caller_namespace(context.invocation_metadata()), stored)
            return pb.RegisterSteeringVectorResponse(vector_id=request.vector_id, dimension=vector.numel(),
                                                     l2_norm=float(vector.norm()))

        return await self._unary(context, "RegisterSteeringVector", body)

    async def ListSteeringVectors(self, request: pb.ListSteeringVectorsRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ListSteeringVectorsResponse:
        async def body() -> pb.ListSteeringVectorsResponse:
            store = self._vector_store()
            vectors = await store.list(caller_namespace(context.invocation_metadata()))
            return pb.ListSteeringVectorsResponse(vectors=[self._vector_message(v) for v in vectors],
                                                  store=store.backend)

        return await self._unary(context, "ListSteeringVectors", body)

    async def GetSteeringVector(self, request: pb.GetSteeringVectorRequest,
                                context: grpc.aio.ServicerContext) -> pb.GetSteeringVectorResponse:
        async def body() -> pb.GetSteeringVectorResponse:
            vector = await self._vector_store().get(caller_namespace(context.invocation_metadata()), request.vector_id)
            if vector is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"vector_id: no registered vector {request.vector_id!r}")
            return pb.GetSteeringVectorResponse(vector=self._vector_message(vector), values=vector.values)

        return await self._unary(context, "GetSteeringVector", body)

    async def DeleteSteeringVector(self, request: pb.DeleteSteeringVectorRequest,
                                   context: grpc.aio.ServicerContext) -> pb.DeleteSteeringVectorResponse:
        async def body() -> pb.DeleteSteeringVectorResponse:
            namespace = caller_namespace(context.invocation_metadata())
            if not await self._vector_store().delete(namespace, request.vector_id):
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"vector_id: no registered vector {request.vector_id!r}")
            return pb.DeleteSteeringVectorResponse()

        return await self._unary(context, "DeleteSteeringVector", body)

    # -- model info and tokenization ---------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async def body() -> pb.TokenizeResponse:
            ids = prompt_token_ids(request, self.engine, self._shape.max_model_len + 1)
            return pb.TokenizeResponse(token_ids=ids, tokens=self._tokenizer.convert_ids_to_tokens(ids))

        return await self._unary(context, "Tokenize", body)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        async def body() -> pb.GetModelInfoResponse:
            shape, s = self._shape, self.settings
            info = pb.GetModelInfoResponse(
                model=shape.model_id, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                vocab_size=shape.vocab_size, max_model_len=shape.max_model_len, server_version=SERVER_VERSION,
                interpretability_available=self.engine.interpretability_available,
                risk_available=self.engine.risk_probe is not None,
                risk_probe_id=self.engine.risk_probe.probe_id if self.engine.risk_probe else "",
                kv_cache_dtype=s.kv_cache_dtype, kv_cache_tokens=self.engine.kv_cache_tokens,
                dtype=self.engine.dtype, scheduling_policy=s.scheduling_policy,
            )
            for adapter in getattr(self.engine, "adapters", {}).values():
                info.adapters.add(name=adapter.name, rank=adapter.rank, target_modules=adapter.target_modules)
            for entry in self.engine.saes.values():
                info.saes.add(sae_id=entry.sae_id, layer=entry.layer, hook_name=entry.cfg.hook_name or "",
                              d_in=entry.cfg.d_in, d_sae=entry.d_sae, architecture=entry.cfg.architecture)
            info.modes.add(mode=pb.INFERENCE_MODE_DENSE, available=True, description="full-precision weights")
            levels = self.engine.sparsity_levels
            rotated = self.engine.sparsity_rotated
            basis = (f"; the {'/'.join(rotated)} input of every block is masked in a calibrated basis "
                     "(x T, W T^-T)" if rotated else "")
            if self.engine.sparse_logits == "int8-rescored":
                basis += ("; logits from the int8 unembedding with each row's 64 best candidates recomputed in "
                          "full precision")
            info.modes.add(mode=pb.INFERENCE_MODE_SPARSE, available=bool(levels), sparsity_levels_percent=levels,
                           description="WINA activation sparsity: per layer and projection, inputs with "
                                       f"|x_i|*||W[:,i]|| below a calibrated threshold are zeroed{basis}" if levels
                                       else "unavailable: " + getattr(self.engine, "modes_refused", {}).get(
                                           "sparse", "no WINA thresholds calibrated for this model"))
            quant = self.engine.quantized
            info.modes.add(mode=pb.INFERENCE_MODE_QUANTIZED, available=quant is not None,
                           description=f"int8 weights for {quant.get('covers', 'the decoder projections')}"
                                       f"{' and the unembedding' if quant.get('lm_head') else ''} (per-channel "
                                       f"scales, weight-only; {quant['backend']} kernel); embeddings, norms, "
                                       f"attention and the KV cache keep the server's precision (GetModelInfo.kv_cache_dtype)" if quant else
                                       "unavailable: " + getattr(self.engine, "modes_refused", {}).get(
                                           "quantized", "disabled (--quantized-mode none or compiled mode)"))
            info.limits.CopyFrom(pb.Limits(
                max_prompt_tokens=shape.max_model_len - 1, max_new_tokens=s.max_new_tokens,
                max_stop_sequences=s.max_stop_sequences, max_interventions=s.max_interventions,
                max_features_per_token=s.max_features_per_token, max_top_logprobs=s.max_top_logprobs,
                max_steering_strength=s.max_steering_strength, max_message_bytes=s.max_message_bytes,
                max_in_flight_requests=s.max_in_flight, max_structured_output_chars=s.max_structured_output_chars,
                max_samples=s.max_samples))
            return info

        return await self._unary(context, "GetModelInfo", body)

    # -- hallucination risk -----------------------------------------------------------------------------

    async def ScoreHallucination(self, request: pb.ScoreHallucinationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.ScoreHallucinationResponse:
        """Teacher forcing: prompt + response + the model's end-of-turn token (Engine.turn_end_id, EOS where the
        chat template names none) through the same capture path as generation; response token
        j is scored from the position that predicts it, exactly as a generated token would be."""
        async def body() -> pb.ScoreHallucinationResponse:
            probe = self.engine.risk_probe
            if probe is None:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               "ScoreHallucination: no risk probe is loaded on this server (GetModelInfo.risk_available; "
                               "start it with --risk-probe)")
            if not self.engine.interpretability_available:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               "ScoreHallucination: this compiled engine has no tap call sites (see the server "
                               "log); restart it with --enforce-eager")
            kind = request.WhichOneof("prompt")
            if kind is None:
                raise invalid("prompt", "set either text or chat")
            if kind == "text" and not request.text.strip():
                raise invalid("text", "must not be empty")
            if not request.response.strip():
                raise invalid("response", "must not be empty")
            messages = [{"role": "user", "content": request.text}] if kind == "text" else chat_messages(request.chat)
            prompt_ids = self.engine.encode_chat(messages)
            response_ids = self._tokenizer.encode(request.response, add_special_tokens=False)
            # The model's own end of turn (chat_turn_terminator: <|eot_id|>, <end_of_turn>, ...; EOS without one).
            turn_end: int | None = getattr(self.engine, "turn_end_id", None)  # stand-in engines may lack it
            end = turn_end if turn_end is not None else self._tokenizer.eos_token_id
            ids = prompt_ids + response_ids + [end]
            limit = self._shape.max_model_len
            if len(ids) >= limit:
                raise invalid("response", f"prompt + response are {len(ids)} tokens; the context is {limit}")
            mode, sparsity_percent = self._request_mode(request)
            capture = {layer: risk_capture_k(self.engine.saes[layer], self.settings, probe) for layer in probe.layers}
            codes, cached = await self._prompt_codes(ids, capture, self._request_id(request, context), mode,
                                                     sparsity_percent, logprobs=probe.needs_logprobs)
            running = probe.start()
            if running.needs_logprobs:
                assert codes.token_logprobs is not None  # _prompt_codes keeps them when asked
                for logprob in codes.token_logprobs[len(prompt_ids):len(ids) - 1]:
                    running.add_logprob(float(logprob))
            token_risks = []
            by_layer = {lc.layer: lc for lc in codes.layers}
            for position in range(len(prompt_ids) - 1, len(ids) - 2):  # the response's tokens, not EOS
                token_risks.append(running.add({layer: (lc.indices[position].astype(np.int64),
                                                        lc.values[position].astype(np.float32))
                                                for layer, lc in by_layer.items()}))
            token_risks.append(running.risk())  # end of sequence carries the risk so far
            response = pb.ScoreHallucinationResponse(response_tokens=len(response_ids) + 1, cached=cached)
            response.risk.CopyFrom(self._response_risk(running, MODE_LABELS[mode]))
            if request.return_token_risks:
                response.token_risks.extend(token_risks)
            return response

        return await self._unary(context, "ScoreHallucination", body)

    # -- feature explanations and search ----------------------------------------------------------------

    def _catalog_for(self, layer: int, sae_id: str) -> FeatureCatalog:
        entry = self.engine.saes.get(layer)
        if entry is None:
            raise invalid("layer", f"no SAE at layer {layer}; layers with SAEs: {sorted(self.engine.saes)}")
        if sae_id and sae_id != entry.sae_id:
            raise invalid("sae_id", f"unknown SAE {sae_id!r} at layer {layer} (loaded: {entry.sae_id!r})")
        catalog = self.engine.catalog(layer)
        if catalog is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"layer: SAE {entry.sae_id!r} at layer {layer} ships no explanations "
                           f"(build them with `featurelens sae explain`)")
        return catalog

    def _feature_pb(self, layer: int, sae_id: str, feature: dict[str, Any]) -> pb.Feature:
        out = pb.Feature(layer=layer, sae_id=sae_id, feature_id=feature["id"], label=feature["label"],
                         label_machine_generated=feature["label_machine_generated"], density=feature["density"])
        for text, activation in feature["examples"]:
            out.top_examples.add(text=text, activation=activation)
        for token_id, text, score in feature["promoted"]:
            out.promoted_tokens.add(token_id=token_id, token_text=text, score=score)
        for token_id, text, score in feature["suppressed"]:
            out.suppressed_tokens.add(token_id=token_id, token_text=text, score=score)
        return out

    async def SearchFeatures(self, request: pb.SearchFeaturesRequest,
                             context: grpc.aio.ServicerContext) -> pb.SearchFeaturesResponse:
        async def body() -> pb.SearchFeaturesResponse:
            from featurelens.server.interp.catalog import rank_by_activation

            catalog = self._catalog_for(request.layer, request.sae_id)
            if not 0 <= request.page_size <= 100:
                raise invalid("page_size", f"must be 0 (default 10) to 100, got {request.page_size}")
            limit = request.page_size or 10
            which = request.WhichOneof("query")
            if which == "text_query":
                if not request.text_query.strip():
                    raise invalid("text_query", "must contain at least one word")
                if len(request.text_query) > 1000:
                    raise invalid("text_query", "at most 1000 characters")
                ranked = catalog.search_text(request.text_query, limit)
            elif which == "example_text":
                if not request.example_text.strip():
                    raise invalid("example_text", "must not be empty")
                ids = self.engine.encode_text(request.example_text)
                limit_tokens = self._shape.max_model_len - 1
                if len(ids) > limit_tokens:
                    raise invalid("example_text", f"{len(ids)} tokens, more than the {limit_tokens} the model takes")
                entry = self.engine.saes[request.layer]
                k = min(self.settings.max_features_per_token, entry.cfg.k or 32)
                codes, _ = await self._prompt_codes(ids, {request.layer: k}, self._request_id(request, context))
                lc = codes.layers[0]
                ranked = rank_by_activation(lc.indices, lc.values.astype(np.float32), limit)
            else:
                raise invalid("query", "set text_query or example_text")
            response = pb.SearchFeaturesResponse()
            for feature_id, score in ranked:
                feature = catalog.get(feature_id)
                if feature is not None:
                    response.matches.add(feature=self._feature_pb(request.layer, catalog.sae_id, feature),
                                         score=score)
            return response

        return await self._unary(context, "SearchFeatures", body)

    async def GetFeature(self, request: pb.GetFeatureRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetFeatureResponse:
        async def body() -> pb.GetFeatureResponse:
            catalog = self._catalog_for(request.layer, request.sae_id)
            feature = catalog.get(request.feature_id)
            if feature is None:
                raise invalid("feature_id", f"{request.feature_id} is outside 0..{len(catalog) - 1}")
            return pb.GetFeatureResponse(feature=self._feature_pb(request.layer, catalog.sae_id, feature))

        return await self._unary(context, "GetFeature", body)


# -- registration --------------------------------------------------------------------------------------------


class MalformedRequest:
    """What the request deserializer hands a handler for bytes that are not a valid message of its type."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type, self.error = message_type, error


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """Parse or return MalformedRequest. gRPC turns a raising deserializer into UNKNOWN/INTERNAL with no word
    on the cause; the caller sent bad bytes, which is INVALID_ARGUMENT and says which message was expected."""
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as error:  # DecodeError, and anything else the parser raises on hostile bytes
            return MalformedRequest(name, error)

    return parse


def _refuse_malformed(request: MalformedRequest) -> ApiError:
    return invalid("request", f"not a valid {request.message_type} message ({request.error})")


def _guarded(method: Any, streaming: bool) -> Any:
    if streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, MalformedRequest):
                error = _refuse_malformed(request)
                await context.abort(error.code, error.message)
            async for item in method(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            error = _refuse_malformed(request)
            await context.abort(error.code, error.message)
        return await method(request, context)

    return unary


def add_to_server(servicer: FeatureLensServicer, server: grpc.aio.Server) -> None:
    """Registers every RPC of featurelens.v1.FeatureLensService, built from the service descriptor, with
    request bytes that do not parse refused as INVALID_ARGUMENT before any handler runs."""
    from google.protobuf import symbol_database

    service = pb.DESCRIPTOR.services_by_name["FeatureLensService"]
    messages = symbol_database.Default()
    handlers = {}
    for method in service.methods:
        request_class = messages.GetSymbol(method.input_type.full_name)
        response_class = messages.GetSymbol(method.output_type.full_name)
        factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(_guarded(getattr(servicer, method.name), method.server_streaming),
                                        request_deserializer=_lenient(request_class),
                                        response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
