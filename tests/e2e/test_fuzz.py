"""Fuzzing every RPC's request handling without an engine: hypothesis-built messages over all fields (out-of-range
ints, NaN/inf floats, huge strings, unknown enum values) and mutated serialized bytes.

Property, for every request: it validates, or it is refused with an `ApiError` whose code is INVALID_ARGUMENT,
FAILED_PRECONDITION, UNIMPLEMENTED or RESOURCE_EXHAUSTED and whose message starts with the path of a real field
of that request ("steering[3].strength: ..."). Never another exception, never a hang.

Two layers are fuzzed:
- the pure validation functions (validate_generate, plan_interpretability, parse_vector, ...), whose promise is
  that nothing invalid reaches the engine;
- the real servicer handlers in front of a stand-in engine (the vLLM engine cannot be started per example) that
  refuses to generate: this covers the RPCs whose checks live in the handler (ScoreHallucination, SearchFeatures,
  GetFeature, GetModelInfo), shows handler and validators agree, and proves that what passes validation is
  accepted by vLLM's own `SamplingParams` constructor.

Examples per fuzz test (two per RPC, 18 tests): 25 by default, ~430 examples in CI; the soak run raises it to
over 10,000 requests through the handlers with `FEATURELENS_FUZZ_EXAMPLES=1200 .venv/bin/pytest
tests/test_fuzz.py` (the last test prints the counts; mutated bytes that do not parse never reach a handler).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from featurelens.server.config import Settings
from featurelens.server.interp.catalog import FeatureCatalog
from featurelens.server.interp.steering import parse_vector
from featurelens.server.interp_plan import parse_feature_selection, plan_interpretability
from featurelens.server.state import MemoryVectorStore, StoredVector
from featurelens.server.validation import ApiError, prompt_token_ids, validate_generate
from featurelens.v1 import featurelens_pb2 as pb
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FEATURELENS_FUZZ_EXAMPLES", "25"))
settings.register_profile("featurelens-fuzz", max_examples=EXAMPLES, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.large_base_example])
FUZZ = settings.get_profile("featurelens-fuzz")  # applied per test, so other modules keep their own settings
CALL_TIMEOUT_S = 30.0  # one request's handling; beyond this it counts as a hang
# A hang in synchronous code cannot be interrupted by asyncio; pytest-timeout is the backstop, scaled so
# that a long soak is not mistaken for one.
FUZZ_TIMEOUT = pytest.mark.timeout(max(600, EXAMPLES // 10))

FIELD_PATH = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
WHOLE_RPC_REFUSALS = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION}
SERVICE = pb.DESCRIPTOR.services_by_name["FeatureLensService"]
RPCS = [method.name for method in SERVICE.methods]

# -- stand-ins for the engine ----------------------------------------------------------------------------------

MAX_MODEL_LEN, VOCAB_SIZE, HIDDEN_SIZE, NUM_LAYERS, SAE_LAYER = 100, 1000, 16, 30, 12
SETTINGS = Settings()  # the shipped limits
VECTORS = {"v1": HIDDEN_SIZE}  # the registered vectors a request may name (id -> dimension)
TOY_SAE = SimpleNamespace(d_sae=512, sae_id="toy", layer=SAE_LAYER, version="1",
                          cfg=SimpleNamespace(architecture="standard", k=None, hook_name="blocks.12.hook_resid_post",
                                              d_in=HIDDEN_SIZE))


class WordTokenizer:
    """One token per whitespace-separated word (as in test_validation); chat adds 3 template tokens a message."""

    eos_token_id = 0

    def encode_text(self, text: str) -> list[int]:
        return [hash(w) % VOCAB_SIZE for w in text.split()]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return [t for m in messages for t in [1, 2, *self.encode_text(m["content"]), 3]]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_text(text)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


class ReachedEngine(Exception):
    """Raised where the stand-in engine would start generating: the request passed validation."""


# Explanations of the toy SAE, in the shipped file format (featurelens.server.offline.sae.explanations).
TOY_CATALOG = FeatureCatalog({"version": 1, "sae_id": "toy", "layer": SAE_LAYER, "d_sae": TOY_SAE.d_sae, "features": [
    {"id": i, "density": 0.01, "max_activation": 2.0, "label": f"toy feature {i}", "label_machine_generated": True,
     "examples": [[f"the «cat{i}» sat", 2.0]], "promoted": [[i, f"tok{i}", 1.5]], "suppressed": [[i + 1, "x", -1.0]]}
    for i in range(TOY_SAE.d_sae)]})


SPARSITY_LEVELS = (25, 40, 50)  # WINA levels the stand-in engine "serves"


class StandInEngine(WordTokenizer):
    """What the servicer reads from the engine, minus the engine: it refuses to generate (ReachedEngine) and
    remembers the vLLM SamplingParams it was handed, so the test can check them."""

    def __init__(self) -> None:
        self.shape = SimpleNamespace(model_id="toy-model", num_layers=NUM_LAYERS, hidden_size=HIDDEN_SIZE,
                                     vocab_size=VOCAB_SIZE, max_model_len=MAX_MODEL_LEN)
        self.saes = {SAE_LAYER: TOY_SAE}
        self.interpretability_available = True
        self.sparsity_levels = SPARSITY_LEVELS
        self.sparsity_rotated = ("attn", "mlp")
        self.sparse_logits = "int8-rescored"
        self.quantized = {"backend": "native", "weight_bytes": 0}
        self.kv_cache_tokens = 4096
        self.dtype = "bfloat16"
        self.codes_identity = "weights=toy;dtype=bfloat16"
        self.risk_probe = SimpleNamespace(layers=[SAE_LAYER], probe_id="toy-probe", start=SimpleNamespace,
                                          trained_top_k=None, needs_logprobs=False)
        self.worker_logprobs = False
        self.tokenizer = WordTokenizer()
        self.features = SimpleNamespace(open=lambda key, risk_layers=(), wants_logprob=False: None, close=lambda key: None)
        self.errored = False
        self.reached: list[Any] = []

    def token_text(self, token_id: int) -> str:
        return f"t{token_id}"

    def explain(self, layer: int, feature_id: int) -> str:
        return TOY_CATALOG.label(feature_id) if layer == SAE_LAYER else ""

    def catalog(self, layer: int) -> FeatureCatalog | None:
        return TOY_CATALOG if layer == SAE_LAYER else None

    def num_unfinished_requests(self) -> int:
        return 0

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: Any,
                       cache_salt: str | None = None, priority: int = 0, adapter: str = "") -> Any:
        self.reached.append(params)
        raise ReachedEngine
        yield  # an async generator, like Engine.generate

    async def use_vectors(self, vectors: dict[str, Any]) -> None:
        self.pinned = dict(vectors)

    async def release_vectors(self, keys: Any) -> None:
        pass

    async def abort(self, request_id: str) -> None:
        pass


# -- strategies over every field of a message, driven by its descriptor ------------------------------------------

INT32 = st.one_of(st.integers(-3, 40),
                  st.sampled_from([-2**31, -1, 0, 1, 64, 65, 100, 101, 256, 511, 512, 513, 1000, 2048, 2049, 2**31 - 1]),
                  st.integers(-2**31, 2**31 - 1))
INT64 = st.one_of(INT32, st.sampled_from([-2**63, 2**63 - 1, 2**32]), st.integers(-2**63, 2**63 - 1))
UINT32 = st.one_of(st.integers(0, 40), st.sampled_from([511, 512, 999, 1000, 2**31, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))
UINT64 = st.one_of(UINT32, st.integers(0, 2**64 - 1))
FLOAT = st.one_of(st.floats(width=32),  # NaN and ±inf included
                  st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 2.0000002, 1e-45, 1000.0, 1000.0001, 3.4e38,
                                   math.nan, math.inf, -math.inf]))
ANY_TEXT = st.text(max_size=40)  # hypothesis leaves out surrogates, which protobuf strings cannot hold anyway
WORDS = st.lists(st.sampled_from(["hello", "world", "a", "ünï", "🙂", "\x00", "\t", "#"]), max_size=12).map(" ".join)
HUGE = st.builds(lambda piece, n: piece * n, st.sampled_from(["w ", "x", "🙂 ", " "]), st.integers(1_000, 300_000))
PROMPT_TEXT = st.one_of(WORDS, ANY_TEXT, HUGE)

# Field-specific strategies (by field name) so that fuzzing also walks past the first check into the deep ones.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": PROMPT_TEXT, "content": PROMPT_TEXT, "response": PROMPT_TEXT, "example_text": PROMPT_TEXT,
    "text_query": PROMPT_TEXT,
    "request_id": st.one_of(st.just(""), st.just(""), st.sampled_from(["req-1", "a" * 128, "a" * 129, "bad id"]),
                            ANY_TEXT),
    "vector_id": st.one_of(st.sampled_from(["v1", "unknown", "", "V1", "a" * 63, "a" * 64]), ANY_TEXT),
    "sae_id": st.one_of(st.sampled_from(["", "toy", "other"]), ANY_TEXT),
    "layer": st.one_of(st.sampled_from([SAE_LAYER, SAE_LAYER, 0, NUM_LAYERS - 1, NUM_LAYERS, -1]), INT32),
    "feature_id": st.one_of(st.integers(0, 600), UINT32),
    "stop_sequences": st.one_of(ANY_TEXT, st.text(min_size=250, max_size=300)),
}
MAX_REPEATED = {"steering": 20, "stop_sequences": 10, "stop_token_ids": 10, "features": 4, "messages": 5}
VALUES = st.one_of(st.lists(FLOAT, min_size=HIDDEN_SIZE, max_size=HIDDEN_SIZE),
                   st.lists(st.floats(-10, 10, width=32), min_size=HIDDEN_SIZE, max_size=HIDDEN_SIZE),
                   st.lists(FLOAT, max_size=3 * HIDDEN_SIZE))

_SCALARS = {
    FieldDescriptor.CPPTYPE_INT32: INT32, FieldDescriptor.CPPTYPE_INT64: INT64,
    FieldDescriptor.CPPTYPE_UINT32: UINT32, FieldDescriptor.CPPTYPE_UINT64: UINT64,
    FieldDescriptor.CPPTYPE_FLOAT: FLOAT, FieldDescriptor.CPPTYPE_DOUBLE: st.floats(),
    FieldDescriptor.CPPTYPE_BOOL: st.booleans(), FieldDescriptor.CPPTYPE_STRING: ANY_TEXT,
}


def _is_synthetic(oneof: Any) -> bool:
    # proto3 `optional x` is a one-field oneof named "_x"; presence is handled per field instead.
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def _element(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.name in FIELD_VALUES:
        return FIELD_VALUES[field.name]
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        # Mostly known values (so later checks are reached too), and unknown ones: proto3 enums are open, so
        # any int32 arrives intact.
        known = st.sampled_from([v.number for v in field.enum_type.values])
        return st.one_of(known, known, known, INT32)
    return _SCALARS[field.cpp_type]


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: every field drawn (optional ones sometimes unset, one member per oneof)."""
    return _messages(descriptor.full_name, depth)


@functools.cache  # building strategies is costly; the request types are few
def _messages(full_name: str, depth: int) -> st.SearchStrategy[Message]:
    descriptor = pb.DESCRIPTOR.message_types_by_name[full_name.rsplit(".", 1)[-1]]
    cls = _message_class(descriptor)

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        message = cls()
        chosen = {oneof.name: draw(st.sampled_from([None, *[f.name for f in oneof.fields]]))
                  for oneof in descriptor.oneofs if not _is_synthetic(oneof)}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and not _is_synthetic(oneof):
                if chosen[oneof.name] != field.name:
                    continue
            elif field.has_presence and not draw(st.booleans()):
                continue
            if field.is_repeated:
                if field.name == "values":
                    getattr(message, field.name).extend(draw(VALUES))
                    continue
                items = draw(st.lists(_element(field, depth), max_size=MAX_REPEATED.get(field.name, 4)))
                target = getattr(message, field.name)
                if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    for item in items:
                        target.add().CopyFrom(item)
                else:
                    target.extend(items)
            elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(_element(field, depth)))
            else:
                setattr(message, field.name, draw(_element(field, depth)))
        return message

    return build()


def _message_class(descriptor: Descriptor) -> type[Message]:
    return getattr(pb, descriptor.name)  # every featurelens.v1 message is top-level in featurelens_pb2


def request_class(rpc: str) -> type[Message]:
    return _message_class(SERVICE.methods_by_name[rpc].input_type)


# Valid requests, one or more per RPC: seeds for byte mutation, and a check that the stand-ins let valid requests
# through (otherwise "everything is refused" would satisfy the property vacuously).
STEER = [pb.SteeringIntervention(layer=SAE_LAYER, feature_id=7, op=pb.STEERING_OP_NUDGE, strength=4.0,
                                 condition=pb.SteeringCondition(feature_id=3, threshold=0.5)),
         pb.SteeringIntervention(layer=3, vector_id="v1", op=pb.STEERING_OP_ADD, strength=-2.0,
                                 positions=pb.TOKEN_POSITIONS_GENERATED, preserve_norm=True)]
GENERATE_FIELDS = dict(
    chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="be brief"),
                                   pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="hello there")]),
    sampling=pb.SamplingOptions(temperature=0.7, top_p=0.9, top_k=40, seed=7, repetition_penalty=1.1),
    stopping=pb.StoppingOptions(max_new_tokens=32, min_new_tokens=2, stop_sequences=["\n\n"], stop_token_ids=[5]),
    logprobs=pb.LogprobOptions(token_logprobs=True, top_logprobs=3),
    interpretability=pb.InterpretabilityOptions(features=[pb.FeatureSelection(layer=SAE_LAYER, top_k=5)],
                                                score_risk=True, include_prompt_features=True),
    steering=STEER, mode=pb.INFERENCE_MODE_DENSE, request_id="req-1")
VALID: dict[str, list[Message]] = {
    "Generate": [pb.GenerateRequest(text="hello world"), pb.GenerateRequest(**GENERATE_FIELDS)],
    "GenerateStream": [pb.GenerateStreamRequest(text="hi"), pb.GenerateStreamRequest(**GENERATE_FIELDS)],
    "ScoreHallucination": [pb.ScoreHallucinationRequest(text="Who wrote Hamlet?", response="Shakespeare",
                                                        return_token_risks=True)],
    "GetFeatureActivations": [pb.GetFeatureActivationsRequest(
        text="the cat sat", features=[pb.FeatureSelection(layer=SAE_LAYER, sae_id="toy", top_k=8)])],
    "SearchFeatures": [pb.SearchFeaturesRequest(layer=SAE_LAYER, text_query="cats", page_size=10)],
    "GetFeature": [pb.GetFeatureRequest(layer=SAE_LAYER, sae_id="toy", feature_id=3)],
    "RegisterSteeringVector": [pb.RegisterSteeringVectorRequest(vector_id="v2", values=[0.5] * HIDDEN_SIZE,
                                                                description="half")],
    "ListSteeringVectors": [pb.ListSteeringVectorsRequest()],
    "GetSteeringVector": [pb.GetSteeringVectorRequest(vector_id="v1")],
    "DeleteSteeringVector": [pb.DeleteSteeringVectorRequest(vector_id="v2")],
    "GetModelInfo": [pb.GetModelInfoRequest()],
    "Tokenize": [pb.TokenizeRequest(chat=GENERATE_FIELDS["chat"]), pb.TokenizeRequest(text="a b c")],
}


def _mutate_field(draw: Callable[[st.SearchStrategy[Any]], Any], message: Message) -> None:
    """Replaces one field somewhere inside `message` (descending into sub-messages) with a generated value."""
    # Sub-messages count thrice: most of the checks are in there.
    fields = [f for f in message.DESCRIPTOR.fields for _ in range(3 if f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE else 1)]
    field = draw(st.sampled_from(fields))
    target = getattr(message, field.name)
    is_message = field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
    if field.is_repeated:
        if is_message and len(target) and draw(st.booleans()):
            _mutate_field(draw, target[draw(st.integers(0, len(target) - 1))])
        elif is_message:
            target.add().CopyFrom(draw(_element(field, 1)))
        else:
            del target[:]
            target.extend(draw(VALUES if field.name == "values" else
                               st.lists(_element(field, 1), max_size=MAX_REPEATED.get(field.name, 4))))
    elif is_message:
        if message.HasField(field.name) and draw(st.booleans()):
            _mutate_field(draw, target)
        else:
            target.CopyFrom(draw(_element(field, 1)))
    else:
        setattr(message, field.name, draw(_element(field, 1)))


@st.composite
def near_valid(draw: Callable[[st.SearchStrategy[Any]], Any], rpc: str) -> Message:
    """A valid request with one to three fields replaced: reaches the checks that come after the first ones."""
    request = request_class(rpc)()
    request.CopyFrom(draw(st.sampled_from(VALID[rpc])))
    if request.DESCRIPTOR.fields:
        for _ in range(draw(st.integers(1, 3))):
            _mutate_field(draw, request)
    return request


def requests(rpc: str) -> st.SearchStrategy[Message]:
    """Any request of the RPC, or (twice as often) one close to a valid one."""
    return st.one_of(messages(request_class(rpc).DESCRIPTOR), near_valid(rpc), near_valid(rpc))


@st.composite
def mutated(draw: Callable[[st.SearchStrategy[Any]], Any], rpc: str) -> bytes:
    """A serialized request (a valid seed or a generated one) with random bytes flipped, inserted or deleted."""
    seed = draw(st.one_of(st.sampled_from(VALID[rpc]), requests(rpc)))
    data = bytearray(seed.SerializeToString())
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif kind == "duplicate":
            data[at:at] = data[max(0, at - 8):at]
    return bytes(data)


def parse_or_none(rpc: str, data: bytes) -> Message | None:
    try:
        return request_class(rpc).FromString(data)
    except DecodeError:  # malformed bytes are refused before any handler (tests/e2e/test_malformed_bytes.py)
        return None


# -- the property -------------------------------------------------------------------------------------------------


def names_a_field(message: str, descriptor: Descriptor) -> bool:
    """Whether `message` starts with a path through real fields (or oneof names) of the request type."""
    match = FIELD_PATH.match(message)
    if match is None:
        return False
    current: Descriptor | None = descriptor
    for part in match.group(0)[:-2].split("."):
        name, _, index = part.partition("[")
        if current is None:
            return False
        field = current.fields_by_name.get(name)
        if field is None:
            return name in current.oneofs_by_name and not index
        if index and not field.is_repeated:
            return False
        current = field.message_type
    return True


def assert_clear_refusal(error: ApiError, request: Message, rpc: str) -> None:
    assert error.code in REFUSALS, f"refused with {error.code}: {error.message!r}\nrequest: {_short(request)}"
    # A refusal of the whole RPC (its capability is not on this server, as the contract allows) names the
    # method instead of a field: "SearchFeatures: feature search is not implemented on this server yet".
    if error.code in WHOLE_RPC_REFUSALS and error.message.startswith(f"{rpc}: "):
        return
    assert names_a_field(error.message, request.DESCRIPTOR), \
        f"message does not start with a field of {request.DESCRIPTOR.name}: {error.message!r}\nrequest: {_short(request)}"


def _short(request: Message) -> str:
    text = repr(request)
    return text if len(text) < 2000 else text[:2000] + f"... ({len(text)} chars)"


# -- the pure validation layer ---------------------------------------------------------------------------------


def validate_generation(request: Message) -> None:
    """What the servicer runs before the engine for Generate/GenerateStream, in the same order."""
    engine = StandInEngine()
    plan = validate_generate(request, engine, SETTINGS, MAX_MODEL_LEN, VOCAB_SIZE, "fuzz-1",
                             sparsity_levels=engine.sparsity_levels, quantized_available=True)
    interp = plan_interpretability(request, engine, SETTINGS, VECTORS)
    assert 1 <= plan.sampling_kwargs["max_tokens"] <= MAX_MODEL_LEN - len(plan.prompt_token_ids)
    # What crosses into the worker is plain, finite data.
    json.dumps(interp.extra_args("k"), allow_nan=False)


PURE: dict[str, Callable[[Message], Any]] = {
    "Generate": validate_generation,
    "GenerateStream": validate_generation,
    "GetFeatureActivations": lambda r: (parse_feature_selection(r.features, StandInEngine(), SETTINGS.max_features_per_token,
                                                                "features"),
                                        prompt_token_ids(r, WordTokenizer(), MAX_MODEL_LEN)),
    "Tokenize": lambda r: prompt_token_ids(r, WordTokenizer(), MAX_MODEL_LEN + 1),
    "RegisterSteeringVector": lambda r: parse_vector(r.vector_id, r.values, HIDDEN_SIZE),
}


# GetFeatureActivations' handler adds checks of its own (at least one layer) before the pure ones.
HANDLER_IS_PURE = {"Generate", "GenerateStream", "Tokenize", "RegisterSteeringVector"}
Refusal = tuple[grpc.StatusCode, str]  # (code, message); None stands for "validated"


def check_pure(rpc: str, request: Message) -> Refusal | None:
    try:
        PURE[rpc](request)
    except ApiError as error:
        assert_clear_refusal(error, request, rpc)
        return error.code, error.message
    return None


# -- the real handlers in front of the stand-in engine ---------------------------------------------------------------


class Aborted(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    """The part of grpc.aio.ServicerContext the handlers use; abort raises like the real one."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "fuzz-meta"),)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self._code = code
        raise Aborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float | None:
        return None


class Harness:
    """One servicer on one event loop for the module; each call gets a fresh stand-in engine."""

    def __init__(self) -> None:
        from featurelens.server.api import FeatureLensServicer
        from featurelens.server.cache import LruFeatureCache

        self.loop = asyncio.new_event_loop()
        self.handled = 0
        self.servicer = FeatureLensServicer(StandInEngine(), SETTINGS,
                                            cache=LruFeatureCache(SETTINGS.cache_ttl_s, SETTINGS.cache_max_value_bytes))
        self.store = MemoryVectorStore("toy-model", SETTINGS.max_vectors_per_caller,
                                       SETTINGS.max_vector_bytes_per_caller)
        self.internal_errors: list[logging.LogRecord] = []

    def call(self, rpc: str, request: Message) -> Refusal | None:
        """Runs the real handler; None when it answered or got as far as the engine, else its refusal."""
        self.handled += 1
        engine = StandInEngine()
        self.servicer.engine = engine
        # The registered vectors the pure layer assumes (VECTORS), as each call's starting state: a fuzzed
        # DeleteSteeringVector of "v1" must not make a later Generate disagree with the pure validator.
        self.servicer.vectors = self.store
        self.loop.run_until_complete(self.store.put("public", StoredVector("v1", (0.5,) * HIDDEN_SIZE)))
        self.internal_errors.clear()
        handler = getattr(self.servicer, rpc)
        streaming = SERVICE.methods_by_name[rpc].server_streaming

        async def run() -> None:
            if streaming:
                async for _ in handler(request, FakeContext()):
                    pass
            else:
                await handler(request, FakeContext())

        try:
            self.loop.run_until_complete(asyncio.wait_for(run(), CALL_TIMEOUT_S))
        except TimeoutError:
            pytest.fail(f"{rpc} did not finish within {CALL_TIMEOUT_S}s: {_short(request)}")
        except Aborted as aborted:
            if engine.reached and aborted.code == grpc.StatusCode.INTERNAL and "ReachedEngine" in aborted.details:
                self._check_engine_input(engine.reached[0])
                return None  # validated: the request got as far as the engine
            causes = "\n".join(self._format(record) for record in self.internal_errors)
            assert aborted.code != grpc.StatusCode.INTERNAL, \
                f"{rpc} failed with INTERNAL {aborted.details!r}\n{causes}\nrequest: {_short(request)}"
            assert_clear_refusal(ApiError(aborted.code, aborted.details), request, rpc)
            return aborted.code, aborted.details
        return None

    @staticmethod
    def _check_engine_input(params: Any) -> None:
        # The servicer built a real vLLM SamplingParams (vLLM validated it in its constructor); the
        # per-request interpretability data in it is plain JSON with finite numbers.
        extra = getattr(params, "extra_args", None)
        if extra is not None:
            json.dumps(extra, allow_nan=False)

    @staticmethod
    def _format(record: logging.LogRecord) -> str:
        import traceback

        return "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else record.getMessage()


class _Collect(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    pytest.importorskip("vllm")  # the handlers build vLLM SamplingParams
    harness = Harness()
    # The servicer logs every internal error with its traceback; keep them for the failure message instead
    # of printing thousands of expected "ReachedEngine" tracebacks.
    api_log = logging.getLogger("featurelens.server.api")
    handler, propagate = _Collect(harness.internal_errors), api_log.propagate
    api_log.addHandler(handler)
    api_log.propagate = False
    yield harness
    api_log.removeHandler(handler)
    api_log.propagate = propagate
    harness.loop.close()


EXAMPLES_RUN: dict[tuple[str, str], int] = {}  # (kind, rpc) -> hypothesis examples executed


def check(harness: Harness, rpc: str, request: Message) -> None:
    """The property, on both layers. Where the handler runs nothing but the pure validators before the engine,
    both must come to the same answer, to the letter."""
    handled = harness.call(rpc, request)
    if rpc in PURE:
        validated = check_pure(rpc, request)
        if rpc in HANDLER_IS_PURE:
            assert validated == handled, f"validator and handler disagree on {_short(request)}"


@pytest.mark.parametrize("rpc", RPCS)
def test_valid_requests_pass(harness: Harness, rpc: str) -> None:
    for request in VALID[rpc]:
        if rpc in PURE:
            PURE[rpc](request)
        outcome = harness.call(rpc, request)
        assert outcome is None, outcome


@FUZZ_TIMEOUT
@pytest.mark.parametrize("rpc", RPCS)
def test_fuzz_generated_requests(harness: Harness, rpc: str) -> None:
    @FUZZ
    @given(request=requests(rpc))
    def run(request: Message) -> None:
        EXAMPLES_RUN[("generated", rpc)] = EXAMPLES_RUN.get(("generated", rpc), 0) + 1
        check(harness, rpc, request)

    run()


@FUZZ_TIMEOUT
@pytest.mark.parametrize("rpc", RPCS)
def test_fuzz_mutated_bytes(harness: Harness, rpc: str) -> None:
    @FUZZ
    @given(data=mutated(rpc))
    def run(data: bytes) -> None:
        EXAMPLES_RUN[("mutated", rpc)] = EXAMPLES_RUN.get(("mutated", rpc), 0) + 1
        request = parse_or_none(rpc, data)
        if request is not None:
            check(harness, rpc, request)

    run()


def test_field_path_check_is_strict() -> None:
    descriptor = pb.GenerateRequest.DESCRIPTOR
    assert names_a_field("steering[3].strength: bad", descriptor)
    assert names_a_field("interpretability.features[0].top_k: bad", descriptor)
    assert names_a_field("prompt: set either text or chat", descriptor)
    assert not names_a_field("steering.nope: bad", descriptor)
    assert not names_a_field("mode[1]: bad", descriptor)
    assert not names_a_field("Something went wrong", descriptor)


def test_fuzz_volume_is_what_was_asked(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this module: every fuzz test ran its examples (hypothesis stops early only when a search
    space is exhausted, which these are not), and the count is printed for the soak's record."""
    if len(EXAMPLES_RUN) < 2 * len(RPCS):
        pytest.skip("only part of the fuzz tests ran (-k): nothing to count")
    total = sum(EXAMPLES_RUN.values())
    with capsys.disabled():
        print(f"\nfuzz: {total} examples over {len(RPCS)} RPCs, {harness.handled} requests through the handlers")
    # A request type without fields (GetModelInfoRequest) has only a handful of distinct generated values.
    empty = {rpc for rpc in RPCS if not SERVICE.methods_by_name[rpc].input_type.fields}
    short = {k: v for k, v in EXAMPLES_RUN.items() if v < EXAMPLES and not (k[0] == "generated" and k[1] in empty)}
    assert not short, short
