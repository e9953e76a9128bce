"""Frontend end of the worker → frontend feature channel.

The worker pushes one msgpack message per engine step over ZMQ (PUSH → PULL on an IPC socket): one record per
request that asked (its small integer tag, first position, row count, top-k codes per layer, risk-probe
features per layer; format in server/worker.py). This side files them per request so a handler can await the
codes of a given (layer, token position).

Why a side channel and not a `collective_rpc` per step: a utility RPC is served by the engine-core loop
between steps, so polling it for every step would stall generation; a PUSH socket costs the worker one
non-blocking send. `featurelens bench interp` measures both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class RequestFeatures:
    """The codes of one request as they arrive: top-k codes filed by (layer, position), the risk probe's
    features present at (layer, position) (risk captures ship only those), and per position the probe's
    linear term summed over its layers (the worker computes it per layer; a request's layers of one step
    arrive in one record, so a position's sum is complete when a waiter sees it)."""

    tag: int = 0
    rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    risk_rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    risk_scores: dict[int, float] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, layer: int, first: int, count: int, k: int, indices: np.ndarray, values: np.ndarray) -> None:
        indices, values = indices.reshape(count, k), values.reshape(count, k)
        for row in range(count):
            self.rows[(layer, first + row)] = (indices[row], values[row])
        self.arrived.set()

    def add_risk(self, layer: int, first: int, counts: np.ndarray, indices: np.ndarray, values: np.ndarray,
                 scores: np.ndarray) -> None:
        begin = 0
        for position, (count, score) in enumerate(zip(counts.tolist(), scores.tolist(), strict=True), first):
            self.risk_rows[(layer, position)] = (indices[begin:begin + count], values[begin:begin + count])
            self.risk_scores[position] = self.risk_scores.get(position, 0.0) + score
            begin += count
        self.arrived.set()

    async def get(self, layer: int, position: int, timeout_s: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
        return await self._wait(self.rows, (layer, position), timeout_s, f"codes for layer {layer} position {position}")

    async def get_risk(self, layer: int, position: int, timeout_s: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
        return await self._wait(self.risk_rows, (layer, position), timeout_s,
                                f"risk codes for layer {layer} position {position}")

    def risk_codes_arrived(self, layers: Any, position: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The risk codes of a position whose score has arrived (they travel in the same record)."""
        return {layer: self.risk_rows[(layer, position)] for layer in layers}

    async def get_risk_score(self, position: int, timeout_s: float = 30.0) -> float:
        """The risk probe's linear term at `position`, summed over its layers."""
        return await self._wait(self.risk_scores, position, timeout_s, f"the risk score of position {position}")

    async def _wait(self, table: dict[Any, Any], where: Any, timeout_s: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while where not in table:
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

    def __init__(self, transport: str = "zmq", llm: Any = None, poll_interval_s: float = 0.002) -> None:
        self.transport = transport
        self._llm = llm
        self._poll_interval_s = poll_interval_s
        self._dir = tempfile.mkdtemp(prefix="featurelens-")
        self.endpoint = f"ipc://{os.path.join(self._dir, 'features.sock')}" if transport == "zmq" else None
        self._open: dict[str, RequestFeatures] = {}
        self._by_tag: dict[int, RequestFeatures] = {}
        self._next_tag = 0
        self.on_step: Any = None  # called with (encode_seconds, risk_seconds) of every engine step that sent codes
        self._task: asyncio.Task[None] | None = None
        self._socket = None
        self.bytes_received = 0
        self.rows_received = 0  # (layer, token) rows of top-k codes

    def start(self) -> None:
        if self.transport == "rpc":
            self._task = asyncio.create_task(self._poll())
            return
        import zmq
        import zmq.asyncio

        self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.bind(self.endpoint)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._dispatch(await self._socket.recv(copy=True))

    async def _poll(self) -> None:
        while True:
            if self._open:
                payloads = await self._llm.collective_rpc("featurelens_drain")
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
            if self.on_step is not None:
                self.on_step(*timings)
            self._file(records)

    def _file(self, records: list[Any]) -> None:
        for tag, first, count, topk, risk in records:
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

    def open(self, key: str) -> RequestFeatures:
        """Start filing codes for engine request `key`; its spec must carry `tag` (`features.tag`)."""
        self._next_tag += 1
        features = self._open[key] = self._by_tag[self._next_tag] = RequestFeatures(tag=self._next_tag)
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
