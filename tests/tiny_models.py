"""Tiny random-weight checkpoints of real decoder architectures, built from transformers configs (no download):
hidden 64, 2-4 layers, the default model's tokenizer (SmolLM2, vocabulary 49152) copied in. Used by the
per-family engine tests (tests/engine/test_model_families.py) and the adapter's unit tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

HIDDEN = 64
VOCAB = 49152  # the SmolLM2 tokenizer's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _common(layers: int = 2) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": layers, "num_attention_heads": 2,
            "num_key_value_heads": 1, "intermediate_size": 128, "max_position_embeddings": 1024,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": True}


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(3), head_dim=32))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common()))


def _qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_common(), head_dim=32))


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_common(), head_dim=32, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]))


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(), head_dim=32, sliding_window=None))


def _mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_common(), head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=None))


def _gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_common(), head_dim=32, sliding_window=256,
                                          query_pre_attn_scalar=32))


def _gemma3() -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**_common(), head_dim=32, sliding_window=256,
                                              query_pre_attn_scalar=32))


def _phi3() -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = _common()
    config["num_key_value_heads"] = 2
    return Phi3ForCausalLM(Phi3Config(**config))


def _olmo2() -> Any:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM(Olmo2Config(**_common()))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=1024,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True))


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=128,
                                            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                                            rotary_pct=0.25, tie_word_embeddings=False))


# family -> builder of a random-weight transformers model (seeded by `build`)
FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "qwen3_moe": _qwen3_moe, "mistral": _mistral,
    "mixtral": _mixtral, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "olmo2": _olmo2, "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
}


def tokenizer_source() -> str:
    from featurelens.server.model_assets import resolve_model

    return resolve_model("default")


def build(family: str, path: Path, seed: int = 0, eos_token: str | None = None) -> Path:
    """Save a tiny `family` checkpoint (bf16 safetensors, the SmolLM2 tokenizer) into `path`; returns it.

    `eos_token`: give the tokenizer another EOS (e.g. "<|endoftext|>") while its chat template still ends a turn
    with <|im_end|>, as Llama-3 ends turns with <|eot_id|> and Gemma with <end_of_turn>, not with EOS."""
    import torch

    torch.manual_seed(seed)
    model = FAMILIES[family]()
    with torch.no_grad():
        for param in model.parameters():  # wider than transformers' 0.02 init: tokens and features vary
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    model = model.to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    source = Path(tokenizer_source())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    if eos_token is not None:
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["eos_token"] = eos_token
        config_file.write_text(json.dumps(config, indent=2))
    return path
