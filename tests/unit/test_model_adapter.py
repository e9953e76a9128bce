"""The model-architecture adapter (server/worker/model.py) on fake vLLM module trees: family lookup, where the
layers are, what they return, which modules the modes wrap and where their weights are in a checkpoint; and
the chat-turn terminator the frontend appends in ScoreHallucination (server/engine.py)."""

from __future__ import annotations

import pytest
import torch
from featurelens.server.worker import model as adapter
from featurelens.server.worker.model import (
    FAMILIES,
    UnsupportedModel,
    family_of,
    resolve_layout,
    stream_parts,
)


class Linear(torch.nn.Module):
    """Like vLLM's (merged) linear layers: output sizes, forward returns (out, bias)."""

    def __init__(self, sizes: list[int], d_in: int, bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = sizes
        self.output_size = sum(sizes)
        self.input_size = d_in
        g = torch.Generator().manual_seed(sum(sizes) * 7 + d_in)
        self.w = torch.randn(sum(sizes), d_in, generator=g)
        self.bias = torch.randn(sum(sizes), generator=g) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = x @ self.w.T
        return (out if self.bias is None else out + self.bias), None


def named(cls_name: str, **children: torch.nn.Module) -> torch.nn.Module:
    module = type(cls_name, (torch.nn.Module,), {})()
    for name, child in children.items():
        module.add_module(name, child)
    return module


D, Q, KV, FF = 16, 16, 8, 24


def llama_layer(moe: bool = False) -> torch.nn.Module:
    attn = named("Attention", qkv_proj=Linear([Q, KV, KV], D), o_proj=Linear([D], Q))
    mlp = (named("Qwen3MoeSparseMoeBlock", gate=Linear([4], D), experts=named("MoERunner")) if moe else
           named("MLP", gate_up_proj=Linear([FF, FF], D), down_proj=Linear([D], FF)))
    return named("DecoderLayer", self_attn=attn, mlp=mlp)


def causal_lm(cls_name: str, layers: list[torch.nn.Module]) -> torch.nn.Module:
    inner = named("Model", layers=torch.nn.ModuleList(layers), norm=named("RMSNorm"))
    return named(cls_name, model=inner, lm_head=named("ParallelLMHead"))


def test_every_family_entry_is_consistent():
    names = {f.name for f in FAMILIES}
    assert {"llama", "qwen2", "qwen3_moe", "mistral", "mixtral", "gemma", "phi3", "olmo2", "gpt2",
            "gpt_neox"} <= names
    for family in FAMILIES:
        assert set(family.projection_names) == set(family.weights), family.name  # every projection has a source
        assert len(set(family.projection_names)) == len(family.projection_names), family.name
    assert family_of("LlamaForCausalLM").projection_names == adapter.LLAMA_PROJECTIONS  # the shipped tables' columns
    for cls in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM",
                "Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM",
                "GPT2LMHeadModel", "Olmo2Model", "GPTNeoXModel"):
        assert family_of(cls) is not None


def test_an_unknown_model_class_is_a_clear_error():
    model = causal_lm("FalconForCausalLM", [llama_layer()])
    with pytest.raises(UnsupportedModel, match="FalconForCausalLM") as error:
        resolve_layout(model)
    assert "LlamaForCausalLM" in str(error.value)  # and says what is supported


def test_layers_are_found_per_family_and_behind_multimodal_wrappers():
    llama = resolve_layout(causal_lm("LlamaForCausalLM", [llama_layer(), llama_layer()]))
    assert llama.family.name == "llama" and len(llama.layers) == 2 and llama.output == "fused_residual"

    gpt2 = named("GPT2LMHeadModel", transformer=named("GPT2Model", h=torch.nn.ModuleList([named("GPT2Block")] * 3)),
                 lm_head=named("ParallelLMHead"))
    layout = resolve_layout(gpt2)
    assert layout.family.name == "gpt2" and len(layout.layers) == 3 and layout.output == "stream"

    wrapper = named("Gemma3ForConditionalGeneration", vision_tower=named("SiglipVisionModel"),
                    language_model=causal_lm("Gemma3ForCausalLM", [llama_layer()] * 4))
    layout = resolve_layout(wrapper)
    assert layout.family.name == "gemma" and layout.root == "language_model." and len(layout.layers) == 4

    # vLLM's Transformers backend: the family is the Hugging Face base model it wraps.
    hf = named("Olmo2Model", layers=torch.nn.ModuleList([named("Olmo2DecoderLayer")] * 2))
    layout = resolve_layout(named("TransformersForCausalLM", model=hf, lm_head=named("ParallelLMHead")))
    assert layout.family.name == "olmo2" and layout.output == "stream"

    broken = named("LlamaForCausalLM", model=named("Model"))  # a known class without its layers
    with pytest.raises(RuntimeError, match="cannot find decoder layers on LlamaForCausalLM"):
        resolve_layout(broken)


def test_stream_parts_of_each_layer_output():
    hidden, residual = torch.ones(3, 4), torch.full((3, 4), 2.0)
    assert stream_parts((hidden, residual)) == (hidden, residual)  # vLLM's fused residual
    h, r = stream_parts(hidden)  # GPT-2: the stream itself
    assert h is hidden and r is None
    h, r = stream_parts((hidden,))  # HF layers returning a 1-tuple
    assert h is hidden and r is None
    h, r = stream_parts((hidden, None))  # a tuple whose second item is no tensor (attention weights off)
    assert h is hidden and r is None
    with pytest.raises(TypeError, match="decoder layer returned dict"):
        stream_parts({"hidden": hidden})
    batched = torch.zeros(1, 3, 4)  # vLLM's Transformers backend keeps HF's batch dimension
    h, r = stream_parts(batched)
    assert h.shape == (3, 4) and r is None
    h.index_add_(0, torch.tensor([1]), torch.ones(1, 4))  # steering writes through the view into the model's tensor
    assert batched[0, 1].tolist() == [1.0] * 4 and batched.sum() == 4


def test_modes_see_projection_inputs_with_a_batch_dimension(tmp_path):
    """The Transformers backend calls projections with [1, tokens, in]: int8 rows are still recomputed."""
    from featurelens.server.worker.quant import QuantRuntime

    layer = llama_layer()
    w = layer.self_attn.qkv_proj.w
    _save(tmp_path, {"model.layers.0.self_attn.q_proj.weight": w[:Q], "model.layers.0.self_attn.k_proj.weight":
                     w[Q:Q + KV], "model.layers.0.self_attn.v_proj.weight": w[Q + KV:],
                     "model.layers.0.self_attn.o_proj.weight": layer.self_attn.o_proj.w,
                     "model.layers.0.mlp.gate_proj.weight": layer.mlp.gate_up_proj.w[:FF],
                     "model.layers.0.mlp.up_proj.weight": layer.mlp.gate_up_proj.w[FF:],
                     "model.layers.0.mlp.down_proj.weight": layer.mlp.down_proj.w})
    runtime = QuantRuntime(str(tmp_path), resolve_layout(causal_lm("LlamaForCausalLM", [layer])))
    assert runtime.install() == 4
    x = torch.randn(1, 3, D)
    runtime.begin([("r", 1, 3)], 3)  # rows 1 and 2 quantized, row 0 dense
    out, _ = layer.self_attn.qkv_proj.forward(x)
    dense, _ = layer.self_attn.qkv_proj._fl_quant_inner(x[0])
    assert out.shape == (1, 3, Q + 2 * KV)
    torch.testing.assert_close(out[0, 0], dense[0], rtol=0, atol=0)
    assert not torch.equal(out[0, 1:], dense[1:]) and torch.allclose(out[0, 1:], dense[1:], atol=0.1, rtol=0.05)
    runtime.end()


def test_moe_blocks_are_skipped_with_a_reason():
    layout = resolve_layout(causal_lm("Qwen3MoeForCausalLM", [llama_layer(moe=True), llama_layer()]))
    wrapped, skipped = layout.wrappable(0)
    assert [p.path for p, _ in wrapped] == ["self_attn.qkv_proj", "self_attn.o_proj"]
    assert len(skipped) == 2 and all("Qwen3MoeSparseMoeBlock" in why for why in skipped), skipped
    wrapped, skipped = layout.wrappable(1)  # a dense MLP layer (mlp_only_layers) is wrapped whole
    assert len(wrapped) == 4 and not skipped
    assert layout.family.sparse  # sparse mode is refused for the family, with its reason

    mixtral = named("MixtralDecoderLayer", self_attn=named("A", qkv_proj=Linear([Q, KV, KV], D),
                                                          o_proj=Linear([D], Q)),
                    block_sparse_moe=named("MixtralMoE", gate=Linear([4], D)))
    layout = resolve_layout(causal_lm("MixtralForCausalLM", [mixtral]))
    wrapped, skipped = layout.wrappable(0)
    assert [p.path for p, _ in wrapped] == ["self_attn.qkv_proj", "self_attn.o_proj"] and not skipped


def _save(tmp_path, tensors: dict[str, torch.Tensor]):
    from featurelens.server.worker.sparse import weight_files
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    return weight_files(str(tmp_path))


def test_fused_and_transposed_checkpoint_weights_are_split_like_the_module(tmp_path):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(Q, D, generator=g), torch.randn(KV, D, generator=g), torch.randn(KV, D, generator=g)
    gate, up = torch.randn(FF, D, generator=g), torch.randn(FF, D, generator=g)
    files = _save(tmp_path, {"model.layers.0.self_attn.qkv_proj.weight": torch.cat([q, k, v]),
                             "model.layers.0.mlp.gate_up_proj.weight": torch.cat([gate, up])})
    phi3 = resolve_layout(causal_lm("Phi3ForCausalLM", [llama_layer()]))
    for name, expected in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("gate_proj", gate), ("up_proj", up)):
        torch.testing.assert_close(phi3.projection_weight(files, 0, name), expected, rtol=0, atol=0)

    # GPT-2's Conv1D stores [in, out]: c_attn is q|k|v along its columns.
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    files = _save(gpt2_dir, {"transformer.h.0.attn.c_attn.weight": torch.cat([q, q, q]).T})
    block = named("GPT2Block", attn=named("GPT2Attention", c_attn=Linear([Q, Q, Q], D, bias=True)))
    gpt2 = resolve_layout(named("GPT2LMHeadModel", transformer=named("GPT2Model", h=torch.nn.ModuleList([block]))))
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(gpt2.projection_weight(files, 0, name), q, rtol=0, atol=0)


def test_checkpoint_keys_behind_a_multimodal_wrapper(tmp_path):
    w = torch.randn(Q, D)
    files = _save(tmp_path, {"model.language_model.layers.0.self_attn.q_proj.weight": w,
                             "model.language_model.embed_tokens.weight": torch.randn(50, D)})
    layout = resolve_layout(named("Gemma3ForConditionalGeneration",
                                  language_model=causal_lm("Gemma3ForCausalLM", [llama_layer()])))
    assert layout.layer_prefix(files) == "model.language_model.layers"
    torch.testing.assert_close(layout.projection_weight(files, 0, "q_proj"), w, rtol=0, atol=0)
    assert layout.unembedding_key(files) == "model.language_model.embed_tokens.weight"

    empty = tmp_path / "other"
    empty.mkdir()
    files = _save(empty, {"something.else": w})
    with pytest.raises(KeyError, match="no gemma decoder weights"):
        layout.layer_prefix(files)


def test_int8_mode_on_a_moe_model_wraps_attention_and_skips_experts(tmp_path):
    from featurelens.server.worker.quant import QuantRuntime

    layers = [llama_layer(moe=True), llama_layer(moe=True)]
    tensors = {}
    for i, layer in enumerate(layers):
        w = layer.self_attn.qkv_proj.w
        tensors.update({f"model.layers.{i}.self_attn.q_proj.weight": w[:Q], f"model.layers.{i}.self_attn.k_proj.weight":
                        w[Q:Q + KV], f"model.layers.{i}.self_attn.v_proj.weight": w[Q + KV:],
                        f"model.layers.{i}.self_attn.o_proj.weight": layer.self_attn.o_proj.w})
    _save(tmp_path, tensors)
    layout = resolve_layout(causal_lm("Qwen3MoeForCausalLM", layers))
    runtime = QuantRuntime(str(tmp_path), layout)
    assert runtime.install() == 4  # qkv and o of both layers; no AttributeError on the MoE blocks
    assert len(runtime.skipped) == 4 and "mixture-of-experts" in runtime.covers
    x = torch.randn(3, D)
    runtime.begin([("r", 0, 3)], 3)
    out, _ = layers[0].self_attn.qkv_proj.forward(x)
    dense, _ = layers[0].self_attn.qkv_proj._fl_quant_inner(x)
    assert not torch.equal(out, dense) and torch.allclose(out, dense, atol=0.1, rtol=0.05)  # int8 ran, close
    runtime.end()

    nothing = resolve_layout(causal_lm("Qwen3MoeForCausalLM", [named("L", mlp=named("MoE"))]))
    with pytest.raises(RuntimeError, match="no projection of qwen3_moe can be wrapped"):
        QuantRuntime(str(tmp_path), nothing).install()


def test_sparse_mode_is_refused_for_moe_and_names_missing_thresholds(tmp_path):
    import json

    from featurelens.server.worker.sparse import SparseRuntime

    _save(tmp_path, {"x": torch.zeros(1)})
    (tmp_path / "thr.json").write_text(json.dumps({"levels": {"25": {"0.q_proj": 0.1}}}))
    moe = resolve_layout(causal_lm("Qwen3MoeForCausalLM", [llama_layer(moe=True)]))
    with pytest.raises(RuntimeError, match="sparse mode cannot run on qwen3_moe: its MLPs are mixture-of-experts"):
        SparseRuntime(str(tmp_path), str(tmp_path / "thr.json"), 1, torch.device("cpu"), layout=moe)
    llama = resolve_layout(causal_lm("LlamaForCausalLM", [llama_layer()]))
    with pytest.raises(KeyError, match=r"no thresholds for \['0.k_proj'"):
        SparseRuntime(str(tmp_path), str(tmp_path / "thr.json"), 1, torch.device("cpu"), layout=llama)


def test_sparse_mode_on_gpt2_masks_conv1d_projections_with_bias(tmp_path):
    """GPT-2: q|k|v in one transposed Conv1D tensor, biases, no gate; the wrapped c_attn computes each part
    from its own masked input, exactly as masking then the dense GEMM."""
    import json

    from featurelens.server.modes import sparsity as sp
    from featurelens.server.worker.sparse import SparseRuntime

    blocks = []
    tensors = {}
    for i in range(2):
        attn = named("GPT2Attention", c_attn=Linear([D, D, D], D, bias=True), c_proj=Linear([D], D, bias=True))
        mlp = named("GPT2MLP", c_fc=Linear([FF], D, bias=True), c_proj=Linear([D], FF, bias=True))
        blocks.append(named("GPT2Block", attn=attn, mlp=mlp))
        for key, module in (("attn.c_attn", attn.c_attn), ("attn.c_proj", attn.c_proj), ("mlp.c_fc", mlp.c_fc),
                            ("mlp.c_proj", mlp.c_proj)):
            tensors[f"transformer.h.{i}.{key}.weight"] = module.w.T  # Conv1D layout
    _save(tmp_path, tensors)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    (tmp_path / "thr.json").write_text(json.dumps({"levels": {"40": {f"{i}.{p}": 3.0 for i in range(2) for p in names}}}))
    model = named("GPT2LMHeadModel", transformer=named("GPT2Model", h=torch.nn.ModuleList(blocks)))
    runtime = SparseRuntime(str(tmp_path), str(tmp_path / "thr.json"), 2, torch.device("cpu"),
                            layout=resolve_layout(model))
    assert runtime.proj_names == names and runtime.install() == 8
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    runtime.begin([("r", 0, 2, "40")], 2)
    out, _ = blocks[1].attn.c_attn.forward(x)
    c_attn = blocks[1].attn.c_attn
    expected = torch.cat([sp.wina_sparsify(x, sp.column_norms(c_attn.w[j * D:(j + 1) * D]), 3.0)
                          @ c_attn.w[j * D:(j + 1) * D].T + c_attn.bias[j * D:(j + 1) * D] for j in range(3)], -1)
    torch.testing.assert_close(out, expected)
    runtime.end()
    assert runtime.report()["r"]["zeroed_fraction"] > 0


def test_int8_unembedding_on_a_model_without_lm_head(tmp_path):
    """vLLM's Gemma 2 computes logits with its embedding (no lm_head module): the int8 copy wraps that."""
    from featurelens.kernels.int8_gemm import int8_linear
    from featurelens.server.worker.quant import Int8Head

    weight = torch.randn(64, D)
    embed = named("VocabParallelEmbedding")
    embed.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    embed.bias = None
    embed.quant_method = named("UnquantizedEmbeddingMethod")
    embed.quant_method.apply = lambda layer, x, bias=None: x @ weight.T
    inner = named("Gemma2Model", layers=torch.nn.ModuleList([llama_layer()]), embed_tokens=embed)
    model = named("Gemma2ForCausalLM", model=inner)
    files = _save(tmp_path, {"model.embed_tokens.weight": weight})
    head = Int8Head(int8_linear)
    assert head.install(model, files, resolve_layout(model))
    head.begin([0], [], num_reqs=2)
    x = torch.randn(2, D)
    out = embed.quant_method.apply(embed, x)
    dense = x @ weight.T
    torch.testing.assert_close(out[1], dense[1], rtol=0, atol=0)  # the other row: the dense head's, bit for bit
    assert not torch.equal(out[0], dense[0]) and torch.allclose(out[0], dense[0], atol=0.2, rtol=0.05)


# -- the chat-turn terminator (frontend) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from featurelens.server.model_assets import resolve_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("default"))


def test_turn_terminator_from_the_chat_template(tokenizer):
    from featurelens.server.engine import chat_turn_terminator

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_turn_terminator(tokenizer)[0] == im_end == tokenizer.eos_token_id  # SmolLM2: ChatML, EOS = turn end

    # Llama-3 style: the turn ends with a special token that is not EOS.
    llama3 = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, eos_token="<|endoftext|>")
    llama3.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}"
                            "<repo_name>{% endfor %}")
    repo = llama3.convert_tokens_to_ids("<repo_name>")
    token, why = chat_turn_terminator(llama3)
    assert token == repo != llama3.eos_token_id and "<repo_name>" in why

    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    token, why = chat_turn_terminator(plain)
    assert token == plain.eos_token_id and "plain text" in why

    plain.chat_template = None
    assert chat_turn_terminator(plain) == (plain.eos_token_id, "EOS (the tokenizer has no chat template)")

    plain.chat_template = "{{ raise_exception('no assistant turns') }}"
    token, why = chat_turn_terminator(plain)
    assert token == plain.eos_token_id and "failed" in why


def test_cpu_threads_bind_gives_each_worker_its_cpus():
    from featurelens.server.config import SettingsError
    from featurelens.server.engine import cpu_threads_bind

    assert cpu_threads_bind(2, [0, 1]) == "0|1"
    assert cpu_threads_bind(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_threads_bind(4, list(range(8))) == "0,1|2,3|4,5|6,7"
    with pytest.raises(SettingsError, match="need at least 4 CPUs"):
        cpu_threads_bind(4, [0, 1])
