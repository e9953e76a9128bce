"""Code that runs inside vLLM's worker process, mixed into the worker via `worker_extension_cls`.

The frontend reaches these methods with `collective_rpc("featurelens_<name>", args=...)`; requests carry
their interpretability spec as plain data in `SamplingParams.extra_args["featurelens"]`:

    {"key": "<engine request id>",
     "capture": [{"layer": 12, "k": 8, "prompt": false}],            # top-k SAE features per token
     "steer":   [{"layer": 12, "op": "nudge", "feature": 7, "strength": 4.0, "positions": "all",
                  "norm": false, "cond": [feature, threshold]?, "vector": "id"?}],
     "sparse":  "40"?,                                              # WINA sparse mode at that level
     "quant":   "int8"?}                                            # int8-weight quantized mode

Each forward step: a pre-hook on the model builds a view of the flattened batch (which rows belong to which
request, their token positions); a hook on every decoder layer edits/encodes only the rows of requests that
asked for that layer, so every other row stays bit-identical; a post-hook ships the step's sparse codes
(feature index, activation) to the frontend over a ZMQ PUSH socket — never dense residuals. Sparse-mode
requests are handled by the wrapped projections of server/worker_sparsity.py, quantized-mode requests by
those of server/worker_quant.py, on their rows only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class _RequestRows:
    key: str
    start: int
    end: int
    positions: torch.Tensor
    num_prompt_tokens: int
    capture: dict[int, dict[str, Any]]
    steer: dict[int, list[dict[str, Any]]]
    sparse: str | None = None
    quant: str | None = None


@dataclass
class _BatchView:
    requests: list[_RequestRows] = field(default_factory=list)
    layers: set[int] = field(default_factory=set)
    records: list[tuple[Any, ...]] = field(default_factory=list)


_EMPTY = _BatchView()


class FeatureLensWorkerExtension:
    """Mixed into vLLM's Worker class; `self.model_runner` is vLLM's model runner."""

    model_runner: Any

    # -- set-up (called once by the frontend) --------------------------------------------------------------

    def featurelens_setup(self, config: dict[str, Any]) -> dict[str, Any]:
        """Load SAEs, connect the feature socket, hook every decoder layer. Returns what was installed."""
        import zmq
        from featurelens.server.interp.sae import load_sae, validate_for_model

        model = self.model_runner.get_model()
        layers = _decoder_layers(model)
        hidden_size = int(self.model_runner.model_config.get_hidden_size())
        device = next(model.parameters()).device
        self._fl_saes: dict[int, Any] = {}
        for entry in config.get("saes", []):
            sae = load_sae(entry["path"], device=device, dtype=entry.get("dtype", "float32"))
            layer = validate_for_model(sae, hidden_size, len(layers))
            sae.sae_id = entry["sae_id"]
            self._fl_saes[layer] = sae
        self._fl_vectors: dict[str, torch.Tensor] = {}
        self._fl_view = _EMPTY
        self._fl_harvest: Any = None
        self._fl_harvest_layers: set[int] = set()
        self._fl_is_sender = int(getattr(self, "rank", 0)) == 0
        self._fl_socket = None
        self._fl_buffer: list[Any] = []  # used when the frontend polls with featurelens_drain instead of ZMQ
        if self._fl_is_sender and config.get("endpoint"):
            self._fl_socket = zmq.Context.instance().socket(zmq.PUSH)
            self._fl_socket.setsockopt(zmq.SNDHWM, 100_000)
            self._fl_socket.connect(config["endpoint"])
        for handle in getattr(self, "_fl_handles", []):
            handle.remove()
        self._fl_handles = [model.register_forward_pre_hook(self._fl_begin_step, with_kwargs=True),
                            model.register_forward_hook(self._fl_end_step)]
        for index, layer in enumerate(layers):
            self._fl_handles.append(layer.register_forward_hook(self._fl_layer_hook(index)))
        self._fl_sparse = None
        sparsity = config.get("sparsity")
        if sparsity:
            from featurelens.server.worker_sparsity import SparseRuntime

            self._fl_sparse = SparseRuntime(self.model_runner.model_config.model, sparsity["path"], len(layers),
                                            device)
            self._fl_sparse.install(layers)
        self._fl_quant, self._fl_quant_head = None, False
        if config.get("quantized"):
            from featurelens.server.worker_quant import QuantRuntime

            try:
                quant = QuantRuntime(self.model_runner.model_config.model)
                quant.install(layers)  # after sparse mode: wraps the sparse wrapper
                self._fl_quant_head = quant.install_lm_head(model)
                self._fl_quant = quant
            except (OSError, KeyError, RuntimeError) as error:
                # Only a module whose forward was replaced reaches the runtime, and it stays inert (no rows).
                log.warning("quantized mode unavailable: %s: %s", type(error).__name__, error)
        return {"layers_hooked": len(layers), "saes": {layer: sae.cfg.d_sae for layer, sae in self._fl_saes.items()},
                "sparsity_levels": self._fl_sparse.levels if self._fl_sparse is not None else [],
                "quantized": None if self._fl_quant is None else
                {"backend": self._fl_quant.backend, "weight_bytes": self._fl_quant.weight_bytes,
                 "lm_head": self._fl_quant_head}}

    def featurelens_quant_stats(self) -> dict[str, dict[str, Any]]:
        """Per quantized-mode request key (the most recent few thousand): rows computed in int8."""
        quant = getattr(self, "_fl_quant", None)
        return quant.report() if quant is not None else {}

    def featurelens_sparsity_stats(self) -> dict[str, dict[str, float]]:
        """Per sparse-mode request key (the most recent few thousand): the fraction of projection inputs
        zeroed over all its rows so far, the inputs counted and the rows."""
        sparse = getattr(self, "_fl_sparse", None)
        return sparse.report() if sparse is not None else {}

    def featurelens_register_vector(self, vector_id: str, values: list[float]) -> int:
        device = next(self.model_runner.get_model().parameters()).device
        self._fl_vectors[vector_id] = torch.tensor(values, dtype=torch.float32, device=device)
        return len(values)

    def featurelens_harvest_start(self, out_dir: str, layers: list[int], shard_rows: int = 65536) -> None:
        """Offline tooling only (never reachable from a request): from now on, write the residual stream of
        EVERY row at `layers` to float16 shards in `out_dir` — the same hook path the server captures from,
        so SAEs are trained on exactly what they will see when serving."""
        from featurelens.server.interp.harvest_sink import HarvestSink

        self._fl_harvest = HarvestSink(out_dir, layers, shard_rows) if self._fl_is_sender else None
        self._fl_harvest_layers = set(layers)

    def featurelens_harvest_stop(self) -> dict[str, Any]:
        sink, self._fl_harvest, self._fl_harvest_layers = getattr(self, "_fl_harvest", None), None, set()
        return sink.close() if sink is not None else {}

    def featurelens_drain(self) -> bytes:
        """The alternative transport (no ZMQ endpoint configured): the frontend polls this with
        collective_rpc; returns the buffered steps' records as one msgpack payload."""
        import msgspec

        records = [record for step in self._fl_buffer for record in step]
        self._fl_buffer = []
        return msgspec.msgpack.encode(records)

    def featurelens_active_requests(self) -> int:
        """Requests the model runner holds state for (running or preempted, not yet freed)."""
        return len(self.model_runner.requests)

    # -- hooks -------------------------------------------------------------------------------------------

    def _fl_begin_step(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Map rows of the flattened batch to requests that carry a featurelens spec."""
        self._fl_view = _EMPTY
        self._fl_positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        sparse = getattr(self, "_fl_sparse", None)
        if sparse is not None:
            sparse.step = None
        quant = getattr(self, "_fl_quant", None)
        if quant is not None:
            quant.rows, quant.logit_rows = None, None
        runner = self.model_runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        specs = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            extra = params.extra_args if params is not None else None
            if extra and "featurelens" in extra:
                specs.append((i, state, extra["featurelens"]))
        if not specs:
            return
        positions = self._fl_positions
        query_start = runner.query_start_loc.np
        view = _BatchView()
        for i, state, spec in specs:
            start, end = int(query_start[i]), int(query_start[i + 1])
            if end <= start:
                continue
            rows = _RequestRows(
                key=spec["key"], start=start, end=end, positions=positions[start:end].to(torch.long),
                num_prompt_tokens=int(state.num_prompt_tokens),
                capture={c["layer"]: c for c in spec.get("capture", ())}, steer={}, sparse=spec.get("sparse"),
                quant=spec.get("quant"))
            for s in spec.get("steer", ()):
                rows.steer.setdefault(s["layer"], []).append(s)
            view.requests.append(rows)
            view.layers.update(rows.capture, rows.steer)
        self._fl_view = view
        if sparse is not None:
            sparse.begin([(r.key, r.start, r.end, r.sparse) for r in view.requests if r.sparse],
                         int(query_start[num_reqs]))
        if quant is not None:
            quant.begin([(r.key, r.start, r.end) for r in view.requests if r.quant], int(query_start[num_reqs]))
            quant.begin_logits([i for i, _, spec in specs if spec.get("quant")], num_reqs)

    def _fl_layer_hook(self, layer: int) -> Any:
        from featurelens.server.interp.steering import steering_delta

        def hook(module: Any, inputs: Any, output: Any) -> None:
            if layer in self._fl_harvest_layers and self._fl_harvest is not None:
                hidden, residual = output
                self._fl_harvest.add(layer, hidden + residual, self._fl_positions)
            view = self._fl_view
            if layer not in view.layers:
                return
            hidden, residual = output
            sae = self._fl_saes.get(layer)
            for rows in view.requests:
                steer, capture = rows.steer.get(layer), rows.capture.get(layer)
                if not steer and not capture:
                    continue
                # vLLM defers the residual add: the residual stream after this block is hidden + residual.
                stream = hidden[rows.start:rows.end] + residual[rows.start:rows.end]
                if steer:
                    delta = steering_delta(stream, rows.positions, rows.num_prompt_tokens, steer, sae,
                                           self._fl_vectors)
                    if delta is not None:
                        hidden[rows.start:rows.end] += delta.to(hidden.dtype)
                        stream = hidden[rows.start:rows.end] + residual[rows.start:rows.end]
                if capture and sae is not None:
                    self._fl_capture(view, rows, layer, sae, stream, capture)

        return hook

    def _fl_capture(self, view: _BatchView, rows: _RequestRows, layer: int, sae: Any, stream: torch.Tensor,
                    capture: dict[str, Any]) -> None:
        positions = rows.positions
        if not capture.get("prompt"):
            # Only rows that predict a generated token: the last prompt position and every later one.
            keep = positions >= rows.num_prompt_tokens - 1
            if not bool(keep.any()):
                return
            stream, positions = stream[keep], positions[keep]
        values, indices = sae.encode_topk(stream, int(capture["k"]))
        view.records.append((rows.key, layer, positions.to(torch.int32).cpu().numpy().tobytes(),
                             int(capture["k"]), indices.to(torch.int32).cpu().numpy().tobytes(),
                             values.float().cpu().numpy().tobytes()))

    def _fl_end_step(self, module: Any, args: Any, output: Any) -> None:
        if getattr(self, "_fl_sparse", None) is not None:
            self._fl_sparse.end()
        if getattr(self, "_fl_quant", None) is not None:
            self._fl_quant.end()
        view = self._fl_view
        if view.records and self._fl_is_sender:
            if self._fl_socket is not None:
                import msgspec

                self._fl_socket.send(msgspec.msgpack.encode(view.records), copy=False)
            else:
                self._fl_buffer.append(view.records)
        self._fl_view = _EMPTY


def _decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a vLLM causal LM (Llama-style `model.model.layers`)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"cannot find decoder layers on {type(model).__name__}")
    return layers
