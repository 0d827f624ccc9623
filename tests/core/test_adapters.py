"""Adapter surgery on tiny random models of every family: blocks, heads, channels, hidden size, config shapes; the
family tables cover every module, and the registry finds a new family from one class."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from core.adapters import ADAPTERS, adapter_class, get_adapter, register_adapter, supported_model_types
from core.adapters.llama import Qwen2MistralAdapter
from core.errors import UserError
from tests.child_env import ROOT, child_env
from tests.factory import FAMILIES, model_inputs, tiny_model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def reload(model, path):
    model.save_pretrained(str(path))
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(str(path)).eval()


def hidden_size(model):
    return get_adapter(model).input_embeddings().embedding_dim


def test_keeping_every_block_head_channel_and_hidden_dim_is_the_identity(family):
    model = tiny_model(family)
    inputs = model_inputs(model)
    before = logits(model, inputs)
    adapter = get_adapter(model)
    for stack in adapter.stacks:
        adapter.keep_blocks(stack, list(range(len(adapter.blocks(stack)))))
    for _, _, block in adapter.all_blocks():
        adapter.keep_channels(adapter.mlp(block), torch.arange(adapter.mlp(block).width))
        if adapter.supports_head_pruning:
            for view in adapter.attentions(block):
                adapter.keep_heads(view, torch.arange(view.num_kv_heads))
    if adapter.supports_hidden_pruning:
        adapter.keep_hidden(torch.arange(hidden_size(model)))
    adapter.sync_widths()
    assert torch.equal(logits(model, inputs), before)


def test_pruned_blocks_channels_and_heads_reload_with_equal_logits(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    for stack in adapter.stacks:
        adapter.keep_blocks(stack, [0, len(adapter.blocks(stack)) - 1])
    for _, _, block in adapter.all_blocks():
        adapter.keep_channels(adapter.mlp(block), torch.arange(0, adapter.mlp(block).width, 2))
        if adapter.supports_head_pruning:
            for view in adapter.attentions(block):
                adapter.keep_heads(view, torch.tensor([0, view.num_kv_heads - 1]))
    adapter.sync_widths()
    inputs = model_inputs(model)
    assert torch.equal(logits(reload(model, tmp_path), inputs), logits(model, inputs))


def test_pruning_a_zeroed_kv_group_leaves_logits_unchanged():
    model = tiny_model("llama")  # 8 query heads in 4 kv groups of 2
    adapter = get_adapter(model)
    view = adapter.attentions(adapter.blocks("decoder")[1])[0]
    columns = torch.arange(2 * view.group_size * view.head_dim, 3 * view.group_size * view.head_dim)  # group 2
    view.linear(view.o).weight.data[:, columns] = 0
    inputs = model_inputs(model)
    before = logits(model, inputs)
    adapter.keep_heads(view, torch.tensor([0, 1, 3]))
    assert view.module.q_proj.out_features == 6 * view.head_dim
    assert view.module.k_proj.out_features == 3 * view.head_dim
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-6, rtol=0)


def test_hidden_pruning_keeps_exactly_the_chosen_rows_and_columns(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    if not adapter.supports_hidden_pruning:
        with pytest.raises(UserError, match="hidden"):
            adapter.keep_hidden(torch.arange(8))
        return
    size = hidden_size(model)
    keep = torch.arange(0, size, 2)
    block = adapter.all_blocks()[0][2]
    attention, mlp = adapter.attentions(block)[0], adapter.mlp(block)
    reader = attention.linear(attention.projections[0].name).weight.detach().clone()
    writer = attention.linear(attention.o).weight.detach().clone()
    down = mlp.linear(mlp.down).weight.detach().clone()
    embed = adapter.input_embeddings().weight.detach().clone()
    norm = adapter.hidden_norms()[-1].weight.detach().clone()
    adapter.keep_hidden(keep)
    assert torch.equal(attention.linear(attention.projections[0].name).weight, reader[:, keep])
    assert torch.equal(attention.linear(attention.o).weight, writer[keep])
    assert torch.equal(mlp.linear(mlp.down).weight, down[keep])
    assert torch.equal(adapter.input_embeddings().weight, embed[:, keep])
    assert torch.equal(adapter.hidden_norms()[-1].weight, norm[keep])
    assert adapter.output_head().weight.shape[1] == len(keep)
    assert adapter.tied() == (family == "t5")  # T5's tied head follows the new embedding


def test_hidden_pruned_model_reloads_with_equal_logits(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    if not adapter.supports_hidden_pruning:
        pytest.skip(adapter.hidden_pruning_reason())
    generator = torch.Generator().manual_seed(3)
    size = hidden_size(model)
    adapter.keep_hidden(torch.randperm(size, generator=generator)[: size // 2])
    inputs = model_inputs(model)
    reloaded = reload(model, tmp_path)
    assert hidden_size(reloaded) == size // 2
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_hidden_index_out_of_range_or_empty_is_a_user_error_before_any_change():
    model = tiny_model("openba")
    adapter = get_adapter(model)
    with pytest.raises(UserError, match="out of range"):
        adapter.keep_hidden(torch.tensor([0, 999]))
    with pytest.raises(UserError, match="every hidden"):
        adapter.keep_hidden(torch.tensor([], dtype=torch.long))
    assert hidden_size(model) == 192 and model.config.hidden_size == 192


def test_config_shape_round_trips_through_reshape_config(family):
    config = tiny_model(family).config
    cls = adapter_class(config.model_type)
    shape = cls.config_shape(config)
    smaller = dataclasses.replace(shape, depths={s: d - 1 for s, d in shape.depths.items()}, ffn=shape.ffn // 2,
                                  vocab=64)
    reshaped = cls.reshape_config(config, smaller)
    assert cls.config_shape(reshaped) == smaller
    assert cls.config_shape(config) == shape  # the original is untouched


def test_shapes_a_family_config_cannot_hold_are_user_errors():
    llama = tiny_model("llama").config
    shape = adapter_class("llama").config_shape(llama)
    with pytest.raises(UserError, match="divisible"):  # LlamaConfig: hidden 64 % 6 heads
        adapter_class("llama").reshape_config(llama, dataclasses.replace(shape, heads=6, kv_heads=3))
    with pytest.raises(UserError, match="key/value groups"):
        adapter_class("qwen2").reshape_config(llama, dataclasses.replace(shape, heads=6, kv_heads=4))
    neox = tiny_model("gpt_neox").config
    neox_shape = adapter_class("gpt_neox").config_shape(neox)
    with pytest.raises(UserError, match="GPT-NeoX"):
        adapter_class("gpt_neox").reshape_config(neox, dataclasses.replace(neox_shape, hidden=32))


def test_every_family_is_covered():
    assert {get_adapter(tiny_model(f)).config.model_type for f in FAMILIES} == set(FAMILIES)


def test_the_tables_name_every_norm_and_every_linear_of_the_blocks(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    norms = {id(m) for m in model.modules() if "norm" in type(m).__name__.lower()}
    assert {id(n) for n in adapter.hidden_norms()} == norms
    for _, _, block in adapter.all_blocks():
        linears = {id(m) for m in block.modules() if isinstance(m, torch.nn.Linear)}
        mlp = adapter.mlp(block)
        named = [mlp.linear(n) for n in (mlp.up, mlp.gate, mlp.fused_gate_up, mlp.down) if n]
        named += [view.linear(p.name) for view in adapter.attentions(block) for p in view.projections]
        assert {id(m) for m in named} == linears


def test_per_layer_config_lists_follow_the_kept_blocks_and_a_new_depth():
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    model.config.max_window_layers = 3
    adapter = get_adapter(model)
    adapter.keep_blocks("decoder", [1, 2])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert (model.config.max_window_layers, model.config.num_hidden_layers) == (2, 2)
    shape = adapter.config_shape(model.config)
    deeper = adapter.reshape_config(model.config, dataclasses.replace(shape, depths={"decoder": 5}))
    assert deeper.layer_types == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    assert deeper.max_window_layers == 2


def test_openba_per_layer_widths_collapse_to_the_plain_fields_once_uniform():
    model = tiny_model("openba")
    adapter = get_adapter(model)
    width = model.config.ffn_hidden_size
    adapter.keep_channels(adapter.mlp(adapter.blocks("decoder")[0]), torch.arange(width // 2))
    adapter.sync_widths()
    assert model.config.decoder_ffn_sizes == [width // 2] + [width] * (model.config.num_decoder_layers - 1)
    for _, _, block in adapter.all_blocks():
        adapter.keep_channels(adapter.mlp(block), torch.arange(width // 2))
    adapter.sync_widths()
    assert model.config.ffn_hidden_size == width // 2
    assert model.config.decoder_ffn_sizes is None and model.config.encoder_head_counts is None


def test_a_new_family_is_one_registered_class():
    with pytest.raises(UserError, match="unsupported architecture 'my_llama'.*llama"):
        adapter_class("my_llama")
    cls = register_adapter(type("MyLlamaAdapter", (Qwen2MistralAdapter,), {"model_types": ("my_llama",)}))
    try:
        assert adapter_class("my_llama") is cls
        assert "my_llama" in supported_model_types()
    finally:
        ADAPTERS.remove(cls)


def test_each_adapter_module_imports_alone_and_below_the_stage_packages():
    code = ("import sys, importlib\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'compress', 'pretrain', 'align', 'eval', 'recipes'}))")
    for module in ("core.adapters.openba", "core.adapters.t5", "core.adapters.llama"):
        done = subprocess.run([sys.executable, "-c", code, module], cwd=ROOT, env=child_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
