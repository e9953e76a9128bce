"""Frontend end of the worker → frontend feature channel.

The worker pushes one msgpack message per engine step over ZMQ (PUSH → PULL on an IPC socket): one record per
request that asked (its small integer tag, first position, row count, top-k codes per layer, risk-probe
features per layer; format in server/worker/extension.py). This side files them per request so a handler can await the
codes of a given (layer, token position).

Why a side channel and not a `collective_rpc` per step: a utility RPC is served by the engine-core loop
between steps, so polling it for every step would stall generation; a PUSH socket costs the worker one
non-blocking send. `featurelens bench interp` measures both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import zmq.asyncio
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


class FeatureChannelError(RuntimeError):
    """The worker → frontend channel failed while a request waited on it: its codes may be lost."""


@dataclass
class RequestFeatures:
    """The codes of one request as they arrive: top-k codes filed by (layer, position), the risk probe's
    features present at (layer, position) (risk captures ship only those), and per position the probe's
    linear term per layer, summed. A position's score is filed once every probe layer's term is in
    (`risk_layers`): with pipeline parallelism the layers of one step come from different stages, in separate
    records, and a waiter must never see a partial sum.

    Idempotent per (request, layer, position): a preempted request is prefilled again and its positions are
    sent again; they replace what was filed, never add to it. Bounded: a top-k row is dropped once read (reads
    of a layer go by increasing position, and rows re-sent for positions already read are ignored), so what a
    stream holds is its unread rows plus the probe's features (at most its feature count per layer and
    position) and one float per position and probe layer.
    """

    tag: int = 0
    rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    risk_rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    risk_terms: dict[int, dict[int, float]] = field(default_factory=dict)  # position -> {layer: linear term}
    risk_scores: dict[int, float] = field(default_factory=dict)  # position -> sum of its layers' terms
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    read_through: dict[int, int] = field(default_factory=dict)  # layer -> highest position read
    error: BaseException | None = None
    risk_layers: frozenset[int] = frozenset()  # the probe's layers (empty: file each record's sum as it comes)
    # The worker sends each sampled token's logprob (a probe with uncertainty terms, `Engine.worker_logprobs`):
    # a position's score is then filed once its logprob is in too, so a waiter finds both.
    wants_logprob: bool = False
    risk_logprobs: dict[int, float] = field(default_factory=dict)  # position -> logprob of the token it sampled

    def add(self, layer: int, first: int, count: int, k: int, indices: np.ndarray, values: np.ndarray) -> None:
        indices, values = indices.reshape(count, k), values.reshape(count, k)
        start = max(0, self.read_through.get(layer, -1) + 1 - first)  # rows re-sent for positions already read
        for row in range(start, count):
            self.rows[(layer, first + row)] = (indices[row], values[row])
        self.arrived.set()

    def add_risk(self, layer: int, first: int, counts: np.ndarray, indices: np.ndarray, values: np.ndarray,
                 scores: np.ndarray) -> None:
        begin = 0
        for position, (count, score) in enumerate(zip(counts.tolist(), scores.tolist(), strict=True), first):
            self.risk_rows[(layer, position)] = (indices[begin:begin + count], values[begin:begin + count])
            terms = self.risk_terms.setdefault(position, {})
            terms[layer] = score
            self._file_score(position)
            begin += count
        self.arrived.set()

    def add_logprob(self, position: int, logprob: float) -> None:
        """The logprob of the token sampled from `position`'s row (NaN: the worker could not give it)."""
        self.risk_logprobs[position] = logprob
        self._file_score(position)
        self.arrived.set()

    def _file_score(self, position: int) -> None:
        terms = self.risk_terms.get(position)
        if terms is not None and self.risk_layers <= terms.keys() and (
                not self.wants_logprob or position in self.risk_logprobs):
            self.risk_scores[position] = sum(terms.values())

    def risk_logprob(self, position: int) -> float:
        """The sampled token's logprob at a position whose score has arrived (`wants_logprob`)."""
        logprob = self.risk_logprobs[position]
        if logprob != logprob:  # NaN
            raise RuntimeError(f"the worker sent no logprob for position {position} (see the worker's log)")
        return logprob

    def fail(self, error: BaseException) -> None:
        """Wake every waiter of this request with `error` (the channel broke; its codes may never come)."""
        self.error = error
        self.arrived.set()

    async def get(self, layer: int, position: int, timeout_s: float = 30.0,
                  keep: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The top-k codes at (layer, position), removed once read (each is read once) unless `keep`: the last
        prompt position is read twice with prompt features, as that token's features and as the first generated
        token's."""
        row = await self._wait(self.rows, (layer, position), timeout_s, f"codes for layer {layer} position {position}")
        if keep:
            return row
        del self.rows[(layer, position)]
        self.read_through[layer] = max(self.read_through.get(layer, -1), position)
        return row

    async def get_risk(self, layer: int, position: int, timeout_s: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
        return await self._wait(self.risk_rows, (layer, position), timeout_s,
                                f"risk codes for layer {layer} position {position}")

    def risk_codes_arrived(self, layers: Iterable[int], position: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The risk codes of a position whose score has arrived (they travel in the same record)."""
        return {layer: self.risk_rows[(layer, position)] for layer in layers}

    async def get_risk_score(self, position: int, timeout_s: float = 30.0) -> float:
        """The risk probe's linear term at `position`, summed over its layers."""
        return await self._wait(self.risk_scores, position, timeout_s, f"the risk score of position {position}")

    async def _wait(self, table: dict[_Key, _Value], where: _Key, timeout_s: float, what: str) -> _Value:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while where not in table:
            if self.error is not None:
                raise FeatureChannelError(f"{what}: the feature channel failed ({self.error})") from self.error
            self.arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{what} never arrived")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        return table[where]


def _index_dtype(wide: bool) -> type:
    return np.int32 if wide else np.uint16


class FeatureReceiver:
    """Dispatches the worker's records to open requests. transport="zmq" (default): binds the PULL socket
    the worker connects to. transport="rpc": polls the worker with `collective_rpc("featurelens_drain")`
    (kept for `featurelens bench interp`, which measures both)."""

    def __init__(self, transport: str = "zmq", llm: AsyncLLM | None = None, poll_interval_s: float = 0.002) -> None:
        self.transport = transport
        self._llm = llm
        self._poll_interval_s = poll_interval_s
        self._dir = tempfile.mkdtemp(prefix="featurelens-")
        self.endpoint = f"ipc://{os.path.join(self._dir, 'features.sock')}" if transport == "zmq" else None
        self._open: dict[str, RequestFeatures] = {}
        self._by_tag: dict[int, RequestFeatures] = {}
        self._next_tag = 0
        # called with (encode_seconds, risk_seconds) of every engine step that sent codes
        self.on_step: Callable[[float, float], None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Called when the receiving loop raised (the open requests are failed, the loop restarts) and when it
        # runs again: the app turns health NOT_SERVING and back.
        self.on_failure: Callable[[BaseException], None] | None = None
        self.on_recovered: Callable[[], None] | None = None
        self.failures = 0
        self._socket: zmq.asyncio.Socket | None = None
        self.bytes_received = 0
        self.rows_received = 0  # (layer, token) rows of top-k codes

    def start(self) -> None:
        if self.transport == "rpc":
            if self._llm is None:
                raise ValueError("feature transport 'rpc' polls the engine: FeatureReceiver needs its llm")
            llm = self._llm
            self._task = asyncio.create_task(self._supervise(lambda: self._poll(llm)))
            return
        import zmq
        import zmq.asyncio

        assert self.endpoint is not None  # set for every transport but rpc
        socket = self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.bind(self.endpoint)
        self._task = asyncio.create_task(self._supervise(lambda: self._run(socket)))

    async def _supervise(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Runs the receiving loop; if it raises, the requests waiting on it fail at once (their records may be
        lost) instead of timing out, health goes NOT_SERVING, and the loop starts again."""
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - anything: a silent death would stall every feature RPC
                self.failures += 1
                log.exception("feature receiver failed (%d so far); failing %d open requests, restarting",
                              self.failures, len(self._open))
                for features in self._open.values():
                    features.fail(error)
                if self.on_failure is not None:
                    self.on_failure(error)
                await asyncio.sleep(0.2)
                if self.on_recovered is not None:
                    self.on_recovered()

    async def _run(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            self._dispatch(await socket.recv(copy=True))

    async def _poll(self, llm: AsyncLLM) -> None:
        while True:
            if self._open:
                payloads = await llm.collective_rpc("featurelens_drain")
                self._dispatch(payloads[0])
            await asyncio.sleep(self._poll_interval_s)

    def _dispatch(self, payload: bytes) -> None:
        import msgspec

        self.bytes_received += len(payload)
        try:
            steps = msgspec.msgpack.decode(payload)
        except msgspec.DecodeError:
            log.error("dropping an undecodable feature message (%d bytes)", len(payload))
            return
        for records, timings in steps:
            if self.on_step is not None and timings:  # a logprob message carries none (worker `_fl_send`)
                self.on_step(*timings)
            self._file(records)

    def _file(self, records: list[Any]) -> None:
        for tag, first, count, topk, risk, logprob in records:
            target = self._by_tag.get(tag)
            if target is None:  # the request already finished or was cancelled
                continue
            self.rows_received += count * len(topk)
            for layer, k, wide, indices, values in topk:
                target.add(layer, first, count, k, np.frombuffer(indices, dtype=_index_dtype(wide)),
                           np.frombuffer(values, dtype=np.float16))
            for layer, counts, wide, indices, values, scores in risk:
                target.add_risk(layer, first, np.frombuffer(counts, dtype=np.int16),
                                np.frombuffer(indices, dtype=_index_dtype(wide)),
                                np.frombuffer(values, dtype=np.float16), np.frombuffer(scores, dtype=np.float32))
            if logprob is not None:
                target.add_logprob(int(logprob[0]), float(logprob[1]))

    def open(self, key: str, risk_layers: Iterable[int] = (), wants_logprob: bool = False) -> RequestFeatures:
        """Start filing codes for engine request `key`; its spec must carry `tag` (`features.tag`).
        `risk_layers`: the risk probe's layers, when the request is scored; `wants_logprob`: the worker also
        sends each sampled token's logprob."""
        self._next_tag += 1
        features = self._open[key] = self._by_tag[self._next_tag] = RequestFeatures(
            tag=self._next_tag, risk_layers=frozenset(risk_layers), wants_logprob=wants_logprob)
        return features

    def close(self, key: str) -> None:
        features = self._open.pop(key, None)
        if features is not None:
            self._by_tag.pop(features.tag, None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)  # the IPC socket's folder
