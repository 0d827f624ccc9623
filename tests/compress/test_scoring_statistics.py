"""The scoring pass's statistics against a plain reference computation: the hooks' one-read reductions and the
host-computed padding rows must collect what the textbook formulas give on the same activations."""

import math

import pytest
import torch

from compress.calibration import as_calibration_set, calibration_pass
from compress.scoring import StatisticsCollector, column_abs_sums, column_square_sums, token_cosines
from core.adapters import block_hidden_in, block_hidden_out, get_adapter
from tests.factory import VOCAB, tiny_model

EVERY_STATISTIC = {"layers": {"cosine", "angular"}, "heads": {"act_abs", "act_norm"},
                   "channels": {"act_abs", "act_norm"}}


def padded_batches(model) -> list[dict]:
    """Two batches, the second right-padded on every side, so the hooks must drop padding rows."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for padded in (False, True):
        ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        if padded:
            mask[1, 7:] = 0
        if model.config.is_encoder_decoder:
            labels = torch.randint(3, VOCAB, (2, 8), generator=generator)
            if padded:
                labels[0, 5:] = -100
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        else:
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def reference_statistics(model, calib) -> dict:
    """Every activation kept whole, padding dropped with boolean masks, statistics computed in float64 at the end."""
    adapter = get_adapter(model)
    seen: dict[tuple, list[torch.Tensor]] = {}
    current: dict[str, torch.Tensor | None] = {}

    def real(x, stack):
        mask = current.get(stack)
        x = x.detach().double()
        return x[mask] if mask is not None else x.reshape(-1, x.shape[-1])

    def block_hook(key, stack):
        def hook(module, args, kwargs, output):
            h_in, h_out = real(block_hidden_in(args, kwargs), stack), real(block_hidden_out(output), stack)
            seen.setdefault(("block", *key), []).append(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1))
        return hook

    def column_hook(key, stack):
        return lambda module, args: seen.setdefault(key, []).append(real(args[0], stack))

    handles = []
    for stack, index, block in adapter.all_blocks():
        handles.append(block.register_forward_hook(block_hook((stack, index), stack), with_kwargs=True))
        for view in adapter.attentions(block):
            handles.append(view.linear(view.o).register_forward_pre_hook(
                column_hook(("heads", stack, view.kind, index), stack)))
        mlp = adapter.mlp(block)
        handles.append(mlp.linear(mlp.down).register_forward_pre_hook(column_hook(("channels", stack, None, index),
                                                                                  stack)))
    try:
        with torch.no_grad():
            for batch, masks in zip(calib.batches, calib.token_masks):
                current.update(masks)
                model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for key, parts in seen.items():
        values = torch.cat(parts)
        if key[0] == "block":
            stats[key] = {"cosine": values.mean(), "angular": torch.arccos(values.clamp(-1, 1)).mean() / math.pi}
        else:
            stats[key] = {"act_abs": values.abs().mean(0), "act_norm": values.pow(2).sum(0).sqrt()}
    return stats


@pytest.mark.parametrize("family", ["llama", "openba", "t5"])
def test_collected_statistics_equal_a_plain_float64_computation_with_padding_dropped(family):
    model = tiny_model(family)
    calib = as_calibration_set(padded_batches(model), model)
    assert any(mask is not None for masks in calib.token_masks for mask in masks.values())  # padding is exercised
    adapter = get_adapter(model)
    collector = StatisticsCollector(adapter, EVERY_STATISTIC).attach()
    try:
        calibration_pass(model, calib, on_batch=collector.on_batch, progress=False)
    finally:
        collector.detach()
    expected = reference_statistics(model, calib)
    for stack in adapter.stacks:
        layers = collector.layer_stats(stack, len(adapter.blocks(stack)))
        for name in ("cosine", "angular"):
            reference = torch.stack([expected[("block", stack, i)][name] for i in range(len(adapter.blocks(stack)))])
            torch.testing.assert_close(layers[name], reference.float(), rtol=1e-5, atol=1e-6, msg=f"{stack} {name}")
    column_keys = [key for key in expected if key[0] != "block"]
    assert column_keys and all(key in collector.column_sums for key in column_keys)
    for key in column_keys:
        collected = collector.column_stats(*key)
        for name in ("act_abs", "act_norm"):
            torch.testing.assert_close(collected[name], expected[key][name].float(), rtol=1e-5, atol=1e-7,
                                       msg=f"{key} {name}")


def test_fused_reductions_equal_the_functions_they_replace_in_float32_and_bfloat16():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 48, generator=generator)
    b = a + 0.2 * torch.randn(64, 48, generator=generator)
    b[5] = 0.0  # a zero row: the eps clamp decides, as in cosine_similarity
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        expected = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1, 1)
        torch.testing.assert_close(token_cosines(x, y), expected, rtol=1e-6, atol=1e-6)
        assert token_cosines(x, y).dtype == torch.float32 and token_cosines(x, y)[5] == 0.0
        torch.testing.assert_close(column_abs_sums(x), x.float().abs().sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(column_square_sums(x), x.float().pow(2).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hooks_on_cuda_never_wait_for_the_device_and_match_the_cpu_reductions():
    """A host sync per hook (a boolean mask's row count, .item()) stalls the GPU once per module per batch."""
    model = tiny_model("llama").cuda()
    collector = StatisticsCollector(get_adapter(model), EVERY_STATISTIC)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    collector.on_batch(0, {"decoder": mask})
    block = collector._block_hook(("decoder", 0), "decoder", angular=True)
    column = collector._column_hook(("channels", "decoder", None, 0), "decoder", {"act_abs", "act_norm"})
    generator = torch.Generator().manual_seed(0)
    h_in, h_out, x = (torch.randn(2, 12, 64, generator=generator) for _ in range(3))
    for dtype in (torch.float32, torch.bfloat16):
        cuda = [t.to("cuda", dtype) for t in (h_in, h_out, x)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            block(None, (cuda[0],), {}, (cuda[1],))
            column(None, (cuda[2],))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        real = [t.to(dtype)[mask] for t in (h_in, h_out, x)]
        torch.testing.assert_close(token_cosines(cuda[0][mask.cuda()], cuda[1][mask.cuda()]).cpu(),
                                   token_cosines(real[0], real[1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(column_abs_sums(cuda[2][mask.cuda()]).cpu(), column_abs_sums(real[2]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(column_square_sums(cuda[2][mask.cuda()]).cpu(), column_square_sums(real[2]),
                                   rtol=1e-5, atol=1e-5)
    sums = collector.block_sums[("decoder", 0)]
    assert sums["tokens"] == 2 * int(mask.sum()) and collector.column_sums[("channels", "decoder", None, 0)]["tokens"] \
        == 2 * int(mask.sum())
