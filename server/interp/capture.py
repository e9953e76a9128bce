"""Frontend end of the worker → frontend feature channel.

The worker pushes one msgpack message per engine step over ZMQ (PUSH → PULL on an IPC socket): a list of
records (request key, layer, positions, k, indices, values), only for requests that asked. This side files
them per request so a handler can await the features of a given (layer, token position).

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
    """Top-k features of one request, filed by (layer, position) as they arrive."""

    rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, layer: int, positions: np.ndarray, k: int, indices: np.ndarray, values: np.ndarray) -> None:
        indices, values = indices.reshape(-1, k), values.reshape(-1, k)
        for row, position in enumerate(positions.tolist()):
            self.rows[(layer, position)] = (indices[row], values[row])
        self.arrived.set()

    async def get(self, layer: int, position: int, timeout_s: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (layer, position) not in self.rows:
            self.arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"features for layer {layer} position {position} never arrived")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        return self.rows[(layer, position)]


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
        self._task: asyncio.Task[None] | None = None
        self._socket = None
        self.bytes_received = 0
        self.rows_received = 0

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
            records = msgspec.msgpack.decode(payload)
        except msgspec.DecodeError:
            log.error("dropping an undecodable feature message (%d bytes)", len(payload))
            return
        for key, layer, positions, k, indices, values in records:
            target = self._open.get(key)
            if target is None:  # the request already finished or was cancelled
                continue
            pos = np.frombuffer(positions, dtype=np.int32)
            self.rows_received += len(pos)
            target.add(layer, pos, k, np.frombuffer(indices, dtype=np.int32), np.frombuffer(values, dtype=np.float32))

    def open(self, key: str) -> RequestFeatures:
        features = self._open[key] = RequestFeatures()
        return features

    def close(self, key: str) -> None:
        self._open.pop(key, None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
