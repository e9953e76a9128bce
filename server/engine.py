"""Owns the vLLM engine (AsyncLLM): start-up, warm-up, request lifecycle, abort, worker RPCs.

Kept thin on purpose: vLLM does the batching and scheduling; this module only turns our validated requests
into vLLM calls and makes sure a request that ends early (cancel, deadline, error) is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurelens.server.config import Settings, SettingsError

if TYPE_CHECKING:
    from featurelens.server.adapters import Adapter
    from featurelens.server.interp.capture import FeatureReceiver
    from featurelens.server.interp.catalog import FeatureCatalog
    from featurelens.server.interp.registry import SaeEntry
    from featurelens.server.interp.risk import RiskProbe
    from vllm import RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.tokenizers import TokenizerLike
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

WORKER_EXTENSION = "featurelens.server.worker.extension.FeatureLensWorkerExtension"
WORKER_VECTOR_CACHE = 64  # unpinned steering vectors kept in the workers for the next request
# Structured output compiles with xgrammar only: the frontend validates constraints with vLLM's xgrammar check
# (server/structured_output.py), and 'auto' could hand a constraint xgrammar refuses to another backend.
STRUCTURED_OUTPUT_BACKEND = "xgrammar"


def check_kv_cache_dtype(dtype: str) -> None:
    """vLLM's CPU attention keeps an fp8 KV cache only on CPUs with AVX-512 or AMX (its worker fails at start-up
    otherwise); say so in one line before the engine is built."""
    if not dtype.startswith("fp8"):
        return
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        raise SettingsError(f"kv_cache_dtype: {dtype} needs a GPU or a CPU with AVX-512 or AMX (vLLM's CPU "
                            "attention has no fp8 KV cache without them); use --kv-cache-dtype auto")


def cpu_threads_bind(workers: int, cpus: Sequence[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers (tensor x pipeline parallel): this process's CPUs in
    `workers` consecutive groups, "0|1" on a 2-core box. vLLM's default ("auto") binds a worker per NUMA node
    and cannot start two workers on a one-node machine."""
    if len(cpus) < workers:
        raise SettingsError(f"{workers} CPU workers (tensor x pipeline parallel) need at least {workers} CPUs; "
                            f"this process may use {len(cpus)}")
    size = len(cpus) // workers
    groups = [cpus[i * size:(i + 1) * size] for i in range(workers)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def _on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (vllm-cpu), which decides the dtype, eager and compile defaults."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def resolve_dtype(setting: str, on_cpu: bool | None = None) -> tuple[str, str]:
    """The dtype vLLM is given for `--dtype setting`, and why (the start-up log says both).

    'auto' on CPU: bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates bf16 and decoding slows with the batch: plain vLLM on an AVX2-only EPYC (Zen 2) ran 24 tok/s in
    bf16 and 159 tok/s in float32 at concurrency 32 (equal at concurrency 1). On GPUs vLLM's 'auto' applies.
    """
    if setting != "auto":
        return setting, "set by --dtype"
    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    if not on_cpu:
        return "auto", "vLLM's rule on GPU (the checkpoint's dtype; float16 for float32 checkpoints)"
    import torch

    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "bfloat16", "this CPU computes bf16 natively (AVX512-BF16 or AMX)"
    return "float32", "this CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated (several times slower)"


def resolve_eager(setting: bool | None, on_cpu: bool | None = None) -> tuple[bool, str]:
    """Whether vLLM runs the model eagerly (`--enforce-eager`) or compiled, and why (the start-up banner says
    both). Unset: compiled on GPUs, where torch.compile and CUDA graphs pay most (hooked eager vLLM decodes
    4-11x slower than its graphs on GPUs, public figures). Eager on CPUs, although compiling paid there too
    (plain vLLM 1.43-1.61x on a Zen 5 box, docs/measurements/2026-12-07-compiled-mode.md): a compiled engine
    cannot serve sparse or int8 mode (they wrap Python forwards), Inductor needs a C++ compiler the CPU image
    does not ship, and compiling costs about a minute at every start. Features, steering and risk run in both
    (server/worker/tap.py)."""
    if setting is not None:
        return setting, "set by --enforce-eager / --no-enforce-eager"
    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    if on_cpu:
        return True, ("CPU default: eager, so sparse and int8 mode stay available; --no-enforce-eager compiles "
                      "(faster decoding, needs a C++ compiler, ~1 min at start-up)")
    return False, "GPU default: compiled (torch.compile + piecewise CUDA graphs; --enforce-eager turns it off)"


def compilation_config(on_cpu: bool | None = None) -> dict[str, Any]:
    """vLLM's compilation settings for a compiled engine with the taps: the tap op is a splitting op (the graph
    is split around it, so it runs eagerly between compiled pieces), which also puts it in vLLM's compile-cache
    key (a graph compiled without call sites is never reused with them, nor the other way round). On GPUs the
    CUDA graphs are PIECEWISE: a FULL graph would capture the tap's Python once and replay it frozen."""
    from featurelens.server.worker.tap import SPLITTING_OPS
    from vllm.config import CompilationConfig

    if os.environ.get("FEATURELENS_NO_TAPS") == "1":  # a benchmark's engine without call sites: vLLM's defaults
        return {}
    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    # vLLM's own defaults when splitting_ops is unset (CompilationConfig.set_splitting_ops_for_v1), plus ours.
    ops = list(getattr(CompilationConfig, "_attention_ops", [])) + [
        "vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update", *SPLITTING_OPS]
    config: dict[str, Any] = {"splitting_ops": ops}
    if not on_cpu:
        config["cudagraph_mode"] = "PIECEWISE"
    return config


def model_max_len(model_path: str) -> int | None:
    """The longest context the checkpoint's config allows (max_position_embeddings, GPT-2's n_positions), or
    None when its config.json cannot be read (a hub id, an unusual config)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)  # multimodal wrappers keep the language model's config inside
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return None


def effective_max_model_len(settings: Settings, model_path: str) -> int:
    """--max-model-len, except that the default (2048) is lowered to what a shorter model allows (a GPT-2
    checkpoint's 1024 positions) instead of failing at start-up; an explicit value is passed through."""
    if "max_model_len" in settings.model_fields_set:
        return settings.max_model_len
    limit = model_max_len(model_path)
    return min(settings.max_model_len, limit) if limit else settings.max_model_len


def vllm_engine_kwargs(settings: Settings, model_path: str) -> dict[str, Any]:
    """The engine settings that decide what vLLM computes and how fast. Our engine and every benchmark's
    plain-vLLM baseline are built from this one dict, so a ratio never compares unlike engines."""
    lora = {"enable_lora": True, "max_lora_rank": settings.max_lora_rank, "max_loras": settings.max_loras} \
        if settings.lora else {}
    eager = resolve_eager(settings.enforce_eager)[0]
    config = {} if eager else compilation_config()
    compiled = {"compilation_config": config} if config else {}
    return lora | compiled | {
        "model": model_path,
        "dtype": resolve_dtype(settings.dtype)[0],
        "max_model_len": effective_max_model_len(settings, model_path),
        "max_num_seqs": settings.max_num_seqs,
        "scheduling_policy": settings.scheduling_policy,
        "enforce_eager": eager,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "structured_outputs_config": {"backend": STRUCTURED_OUTPUT_BACKEND,
                                      "disable_any_whitespace": settings.structured_output_whitespace == "compact"},
        "num_gpu_blocks_override": settings.kv_cache_blocks,
    }


TURN_MARK = "\u2063featurelens-turn\u2063"  # an assistant message no template rewrites (invisible separators)


def chat_turn_terminator(tokenizer: TokenizerLike) -> tuple[int | None, str]:
    """The token a chat model ends its turn with — what ScoreHallucination appends after a response — and how
    it was found. Read from the chat template: a one-turn conversation is rendered and the first token after
    the assistant's message, when it is a special token, is the terminator (ChatML's <|im_end|>, Llama-3's
    <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Mistral's </s>). Without a chat template, or when the
    template writes plain text after the message, the tokenizer's EOS."""
    eos: int | None = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos, "EOS (the tokenizer has no chat template)"
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[arg-type]  # plain dicts
    except Exception as error:  # noqa: BLE001 - any template failure: fall back to EOS, say why
        return eos, f"EOS (the chat template failed: {type(error).__name__}: {error})"
    if not isinstance(text, str) or TURN_MARK not in text:
        return eos, "EOS (the chat template did not render the assistant message)"
    after = text[text.index(TURN_MARK) + len(TURN_MARK):]
    ids = list(tokenizer.encode(after, add_special_tokens=False)) if after else []
    if not ids:
        return eos, "EOS (the chat template writes nothing after the assistant message)"
    if ids[0] not in set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()):
        return eos, f"EOS (the chat template ends a turn with plain text {after[:20]!r})"
    return int(ids[0]), f"the chat template ends a turn with {tokenizer.convert_ids_to_tokens([ids[0]])[0]!r}"


@dataclass(frozen=True)
class ModelShape:
    model_id: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]


class Engine:
    """One AsyncLLM plus the tokenizer the API validates against."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.llm: AsyncLLM | None = None
        self.tokenizer: TokenizerLike | None = None
        self.turn_end_id: int | None = None  # what ScoreHallucination appends after a response (chat_turn_terminator)
        self.shape: ModelShape | None = None
        self.model_path: str = ""
        self.dtype = settings.dtype  # what vLLM was given (resolve_dtype), then the model's actual dtype
        self.codes_identity = ""  # weights, dtype, KV dtype, SAE matmul dtype: see _codes_identity
        self.saes: dict[int, SaeEntry] = {}
        self.features: FeatureReceiver | None = None
        # Steering vectors the workers hold (state.worker_key -> pins by running requests); unpinned ones stay
        # cached up to WORKER_VECTOR_CACHE and are dropped oldest first.
        self._worker_vectors: OrderedDict[str, int] = OrderedDict()
        self._vector_lock = asyncio.Lock()
        self.risk_probe: RiskProbe | None = None
        # The worker of the last pipeline stage sends each sampled token's logprob for risk probes with
        # uncertainty terms (server/worker/extension.py `_fl_wrap_sampler`); else they come from vLLM's logprobs.
        self.worker_logprobs = False
        self.sparsity_levels: tuple[int, ...] = ()  # WINA sparse-mode levels (percent) the worker can serve
        self.sparsity_rotated: tuple[str, ...] = ()  # input groups sparse mode masks in a rotated basis ("mlp")
        self.quantized: dict[str, Any] | None = None  # int8 mode as installed in the worker (backend, bytes)
        self.adapters: dict[str, Adapter] = {}  # LoRA adapters by name (--lora), loaded into the engine at start
        self.modes_refused: dict[str, str] = {}  # mode -> why the worker cannot run it on this model's architecture
        self.sparse_logits = "dense"  # sparse requests' logits: "int8-rescored" once the worker installed it
        self.kv_cache_tokens = 0  # tokens the engine's KV cache holds (blocks x block size), known once started
        self._catalogs: dict[int, FeatureCatalog | None] = {}
        # The taps run in eager and compiled mode; False only when the worker could not put them in before
        # vLLM compiled the model (then interpretability is refused instead of faked).
        self.interpretability_available = True
        self.eager = True  # how vLLM runs the model (resolve_eager), known once started
        self.python_modes = True  # sparse and int8 mode wrap Python forwards: eager engines only

    # -- lifecycle -----------------------------------------------------------------------------------

    def _running(self) -> AsyncLLM:
        """The AsyncLLM. RPCs can reach the servicer while it starts (health NOT_SERVING) and after shutdown."""
        if self.llm is None:
            raise RuntimeError("the vLLM engine is not running (not started yet, or shut down)")
        return self.llm

    def _tok(self) -> TokenizerLike:
        if self.tokenizer is None:
            raise RuntimeError("the vLLM engine has not started yet: no tokenizer")
        return self.tokenizer

    async def start(self) -> None:
        from featurelens.server.model_assets import resolve_model

        s = self.settings
        # vLLM reads its CPU KV cache size from the environment; set it before the engine is built.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(s.kv_cache_gib)))))
        workers = s.tensor_parallel_size * s.pipeline_parallel_size
        if workers > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                bind = cpu_threads_bind(workers, sorted(os.sched_getaffinity(0)))
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
                log.info("%d CPU workers: VLLM_CPU_OMP_THREADS_BIND=%s", workers, bind)
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        check_kv_cache_dtype(s.kv_cache_dtype)
        from featurelens.server.adapters import load_adapters

        self.adapters = load_adapters(s.lora, s.max_lora_rank)  # a bad --lora fails here, before the engine
        self.model_path = resolve_model(s.model)
        self.eager, why_eager = resolve_eager(s.enforce_eager)
        log.info("engine mode: %s (%s)", "eager" if self.eager else "compiled", why_eager)
        # Sparse and int8 mode replace projection forwards in Python after the model is loaded: a compiled
        # graph never calls them, so a compiled engine refuses both (FAILED_PRECONDITION naming the mode).
        self.python_modes = self.eager
        self.dtype, why = resolve_dtype(s.dtype)
        log.info("dtype %s (--dtype %s): %s", self.dtype, s.dtype, why)
        kwargs = vllm_engine_kwargs(s, self.model_path)
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(**kwargs["structured_outputs_config"])
        args = AsyncEngineArgs(
            **kwargs,
            served_model_name=[self.model_id_for(s.model, self.model_path)],
            worker_extension_cls=WORKER_EXTENSION,
            enable_log_requests=False,
        )
        started = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.llm.get_tokenizer()
        hf = self.llm.model_config.hf_text_config
        eos = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        generation_eos = (self.llm.model_config.get_diff_sampling_param() or {}).get("stop_token_ids") or []
        eos.update(generation_eos)
        self.turn_end_id, why = chat_turn_terminator(self.tokenizer)
        log.info("chat turn terminator %s: %s", self.turn_end_id, why)
        self.shape = ModelShape(
            model_id=self.model_id_for(s.model, self.model_path),
            num_layers=int(hf.num_hidden_layers),
            hidden_size=int(hf.hidden_size),
            vocab_size=int(self.llm.model_config.get_vocab_size()),
            max_model_len=int(self.llm.model_config.max_model_len),
            eos_token_ids=tuple(sorted(eos)),
        )
        self.dtype = str(self.llm.model_config.dtype).removeprefix("torch.")
        self.codes_identity = self._codes_identity()
        cache = self.llm.vllm_config.cache_config
        self.kv_cache_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size)
        log.info("engine started in %.1fs: %s; dtype %s; KV cache %s, %d tokens", time.perf_counter() - started,
                 self.shape, self.dtype, cache.cache_dtype, self.kv_cache_tokens)
        await self._setup_interpretability()
        for adapter in self.adapters.values():  # loaded now: a broken adapter fails start-up, not a request
            if not await self._running().add_lora(adapter.request()):
                raise SettingsError(f"lora: vLLM refused adapter {adapter.name!r} ({adapter.path})")
            log.info("LoRA adapter %s: rank %d on %s (%s)", adapter.name, adapter.rank,
                     ", ".join(adapter.target_modules), adapter.path)

    def _codes_identity(self) -> str:
        """Everything engine-wide that changes the SAE codes a prompt gets: the weights, the dtype the model
        runs in, the KV cache element type and the SAE encode's matmul dtype. Part of every feature-cache
        key, so replicas started with other settings never share codes through Redis."""
        from featurelens.server.model_assets import weights_fingerprint

        s = self.settings
        parts = {"weights": weights_fingerprint(self.model_path), "dtype": self.dtype,
                 "kv_cache_dtype": s.kv_cache_dtype, "sae_gemm": s.sae_gemm_dtype}
        return ";".join(f"{k}={v}" for k, v in parts.items())

    async def _setup_interpretability(self) -> None:
        from featurelens.server.interp.capture import FeatureReceiver
        from featurelens.server.interp.registry import build_registry

        assert self.shape is not None
        self.saes = build_registry(self._sae_args(), self.shape.hidden_size, self.shape.num_layers)
        self.features = FeatureReceiver(self.settings.feature_transport, self.llm)
        self.features.start()
        config: dict[str, Any] = {"endpoint": self.features.endpoint,
                  "saes": [{"layer": e.layer, "path": e.path, "sae_id": e.sae_id} for e in self.saes.values()],
                  "sae_gemm": self.settings.sae_gemm_dtype}
        thresholds = self._sparsity_thresholds()
        if thresholds:
            config["sparsity"] = {"path": thresholds, "prompt": self.settings.sparse_prompt,
                                  "logits": self.settings.sparse_logits}
        # Quantized mode wraps Python forwards like sparse mode, so compiled mode cannot serve it either.
        config["quantized"] = self.settings.quantized_mode == "int8" and self.python_modes
        installed = await self._running().collective_rpc("featurelens_setup", args=(config,))
        self.sparsity_levels = tuple(int(level) for level in installed[0].get("sparsity_levels", ()))
        self.sparsity_rotated = tuple(installed[0].get("sparsity_rotated", ()))
        self.quantized = installed[0].get("quantized")
        self.modes_refused = dict(installed[0].get("modes_refused", {}))
        if not self.eager:
            for mode in ("sparse", "quantized"):
                self.modes_refused.setdefault(mode, "the engine runs compiled (--no-enforce-eager); this mode "
                                                    "wraps Python forwards, which a compiled graph never calls: "
                                                    "serve it with --enforce-eager")
            if installed[0].get("taps") != "load" or not installed[0].get("tap_calls"):
                self.interpretability_available = False
                log.error("compiled engine without tap call sites (%s): features, steering and risk are refused",
                          "installed after vLLM compiled the model" if installed[0].get("taps") != "load" else
                          "the warm-up forward never called them: a compile cache from an engine without them?")
        self.sparse_logits = installed[0].get("sparse_logits", "dense")
        self.worker_logprobs = any(entry.get("logprobs") == "worker" for entry in installed)
        log.info("worker extension installed: %s", installed[0])
        for entry in self.saes.values():
            log.info("SAE %s at layer %d: d_sae=%d, %s", entry.sae_id, entry.layer, entry.d_sae,
                     entry.cfg.architecture)
        self.risk_probe = self._load_probe()
        if self.risk_probe is not None:
            probe = self.risk_probe
            await self._running().collective_rpc("featurelens_set_probe", args=(
                probe.feature_ids, probe.feature_weights, probe.probe.input_transform))

    def _is_default_model(self) -> bool:
        return self.settings.model.lower() in ("default", "smollm2", "")

    def _sae_args(self) -> list[str]:
        """--sae as given; for the default model with none given, the SAEs shipped in server/assets/saes."""
        if self.settings.sae or not self._is_default_model():
            return list(self.settings.sae)
        from featurelens.server.interp.risk import PROBES_DIR

        return [str(p.parent) for p in sorted(PROBES_DIR.parent.joinpath("saes").glob("*/cfg.json"))]

    def _sparsity_thresholds(self) -> str | None:
        """The WINA thresholds file for sparse mode, or None (sparse mode then answers FAILED_PRECONDITION)."""
        from featurelens.server.modes.sparsity import DEFAULT_THRESHOLDS

        choice = self.settings.sparsity_thresholds
        if choice == "none" or not self.python_modes:  # a compiled graph calls no Python wrappers
            return None
        if choice != "default":
            return choice
        if self._is_default_model() and DEFAULT_THRESHOLDS.exists():
            return str(DEFAULT_THRESHOLDS)
        log.info("no WINA thresholds for this model: sparse mode unavailable")
        return None

    async def sparsity_stats(self) -> dict[str, dict[str, float]]:
        """Per sparse-mode engine request id: fraction of projection inputs the worker zeroed."""
        return (await self._running().collective_rpc("featurelens_sparsity_stats"))[0]

    async def sparse_profile(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Worker step timings by kind of step (ms per step), {} unless FEATURELENS_SPARSE_PROFILE=1 was set
        when the engine started (worker.sparse.StepProfile)."""
        if not self.python_modes:
            return {}
        return (await self._running().collective_rpc("featurelens_sparse_profile", args=(reset,)))[0]

    async def head_stats(self) -> dict[str, Any]:
        """The worker's int8 unembedding: logits rows computed in int8 and re-scored ({} when not installed)."""
        if not self.python_modes:
            return {}
        return (await self._running().collective_rpc("featurelens_head_stats"))[0]

    async def quant_stats(self) -> dict[str, dict[str, Any]]:
        """Per quantized-mode engine request id: rows the worker computed with the int8 projections."""
        return (await self._running().collective_rpc("featurelens_quant_stats"))[0]

    def _load_probe(self) -> RiskProbe | None:
        from featurelens.server.interp.risk import RiskProbe, default_probe_path

        choice = self.settings.risk_probe
        if choice == "none":
            return None
        path = default_probe_path() if choice == "default" else choice
        if path is None or (choice == "default" and not self._is_default_model()):
            log.info("no risk probe loaded: hallucination-risk scoring unavailable")
            return None
        probe = RiskProbe.load(path)
        try:
            probe.check_saes(self.saes)
        except ValueError as error:
            if choice != "default":
                raise
            log.warning("shipped risk probe not loaded: %s", error)
            return None
        if self.settings.risk_medium_threshold is not None:
            probe.medium = self.settings.risk_medium_threshold
        if self.settings.risk_high_threshold is not None:
            probe.high = self.settings.risk_high_threshold
        log.info("risk probe %s: %d features, thresholds medium=%.2f high=%.2f", probe.probe_id, len(probe.weights),
                 probe.medium, probe.high)
        return probe

    def catalog(self, layer: int) -> FeatureCatalog | None:
        """The explanations of the SAE at `layer` (FeatureCatalog), loaded on first use; None without a file."""
        if layer not in self._catalogs:
            from featurelens.server.interp.catalog import FeatureCatalog

            entry = self.saes.get(layer)
            catalog = FeatureCatalog.load(entry.path) if entry is not None else None
            if entry is not None and catalog is not None and catalog.sae_id != entry.sae_id:
                log.warning("explanations in %s are for SAE %s, not %s: ignored", entry.path, catalog.sae_id,
                            entry.sae_id)
                catalog = None
            self._catalogs[layer] = catalog
        return self._catalogs[layer]

    def explain(self, layer: int, feature_id: int) -> str:
        """A short explanation of a feature, when its SAE ships explanations (else empty)."""
        catalog = self.catalog(layer)
        return catalog.label(feature_id) if catalog is not None else ""

    async def use_vectors(self, vectors: Mapping[str, Sequence[float]]) -> None:
        """Make every worker hold these vectors (worker key -> values; sent only when missing) and pin them
        until `release_vectors`: a vector a running request steers with is never dropped."""
        async with self._vector_lock:
            for key, values in vectors.items():
                if key not in self._worker_vectors:
                    await self._running().collective_rpc("featurelens_register_vector", args=(key, list(values)))
                    self._worker_vectors[key] = 0
                self._worker_vectors[key] += 1
                self._worker_vectors.move_to_end(key)

    async def release_vectors(self, keys: Iterable[str]) -> None:
        async with self._vector_lock:
            for key in keys:
                self._worker_vectors[key] -= 1
            unpinned = [k for k, pins in self._worker_vectors.items() if pins <= 0]
            drop = unpinned[:max(0, len(unpinned) - WORKER_VECTOR_CACHE)]  # oldest first
            if drop:
                for key in drop:
                    del self._worker_vectors[key]
                await self._running().collective_rpc("featurelens_drop_vectors", args=(drop,))

    @staticmethod
    def model_id_for(requested: str, path: str) -> str:
        if requested in ("default", "smollm2", ""):
            return "SmolLM2-135M-Instruct"
        return requested.rstrip("/").split("/")[-1] if os.path.isdir(requested) else requested

    async def warmup(self) -> None:
        """One tiny generation so the first real request does not pay for lazy initialisation."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in self.generate("warmup", [self._tok().bos_token_id or 1, 2, 3], params):
            pass

    async def shutdown(self) -> None:
        if self.features is not None:
            await self.features.stop()
            self.features = None
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def errored(self) -> bool:
        return self.llm is not None and bool(self.llm.errored)

    # -- tokenization ----------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return list(self._tok().encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # vLLM's TokenizerLike types the messages as OpenAI TypedDicts and the result as str | list[int]; HF
        # tokenizers take plain role/content dicts and may return a BatchEncoding (handled below).
        ids: Any = self._tok().apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt)  # type: ignore[arg-type]
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def token_text(self, token_id: int) -> str:
        return self._tok().decode([token_id])

    # -- requests ----------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       cache_salt: str | None = None, priority: int = 0,
                       adapter: str = "") -> AsyncIterator[RequestOutput]:
        """Yields vLLM RequestOutputs. If the consumer stops early (cancel, deadline, error), the request is
        aborted in the engine so its slot and KV blocks are freed at once. A `cache_salt` keeps the request's
        KV blocks apart from others in the prefix cache (steered requests must not share with unsteered).
        `priority`: lower is scheduled earlier, with --scheduling-policy priority (vLLM ignores it otherwise).
        `adapter`: a loaded LoRA adapter's name (self.adapters), or "" for the base model."""
        prompt: TokensPrompt = {"prompt_token_ids": prompt_token_ids}
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        finished = False
        try:
            lora = self.adapters[adapter].request() if adapter else None
            async for output in self._running().generate(prompt, params, request_id, priority=priority,
                                                         lora_request=lora):
                finished = output.finished
                yield output
        finally:
            if not finished and self.llm is not None:
                await self.llm.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await self._running().abort(request_id)

    def num_unfinished_requests(self) -> int:
        """Requests the frontend still tracks (queued or running)."""
        return int(self._running().get_num_unfinished_requests())

    async def worker_active_requests(self) -> int:
        """Requests the model runner inside the worker process still holds: the engine-side truth."""
        counts = await self._running().collective_rpc("featurelens_active_requests")
        return int(max(counts))
