"""Long-context extension: RoPE base, NTK and linear interpolation on OpenBA and Llama, and the length checks."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from core.errors import UserError
from pretrain.long_context import (
    LongContextConfig,
    apply_long_context,
    attach_rope_scaling,
    check_sequence_lengths,
    ntk_theta,
    supported_lengths,
)
from pretrain.trainer import Trainer, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pretrain.test_trainer import VOCAB, seq2seq_batches, tiny_llama, tiny_openba  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharp_openba():
    """Initialised large enough that attention is far from uniform, so positions visibly matter."""
    return tiny_openba(initializer_range=0.5)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def long_batch(source: int = 40, target: int = 20):
    return seq2seq_batches(1, rows=2, source=source, target=target, seed=7)[0]


# ------------------------------------------------------------------------------------------------ OpenBA


def test_openba_rope_base_change_is_saved_in_the_config_and_reloads(tmp_path):
    from core.checkpoint import load_model, save_checkpoint

    model = sharp_openba()
    before = logits(model, long_batch())
    changed = apply_long_context(model, LongContextConfig(rope_theta=1e6, train_seq_len=128, eval_seq_len=96))
    assert changed["before"]["rope_theta"] == 10000.0 and changed["after"]["rope_theta"] == 1e6
    assert (model.config.max_seq_length, model.config.decoder_max_seq_length) == (128, 128)
    after = logits(model, long_batch())
    assert (after - before).abs().max() > 1e-3  # positions now rotate at other frequencies
    save_checkpoint(model, None, tmp_path / "extended")
    reloaded = load_model(tmp_path / "extended")
    assert reloaded.config.rope_theta == 1e6
    torch.testing.assert_close(logits(reloaded, long_batch()), after, rtol=0, atol=0)


def test_ntk_scaling_is_the_ntk_aware_base():
    assert ntk_theta(10000.0, 4.0, 8) == pytest.approx(10000.0 * 4.0 ** (8 / 6))
    model = sharp_openba()
    apply_long_context(model, LongContextConfig(scaling="ntk", factor=4.0))
    assert model.config.rope_theta == pytest.approx(10000.0 * 4.0 ** (8 / 6))  # kv_channels 8


def test_openba_linear_interpolation_divides_positions_and_survives_a_reload(tmp_path):
    from core.checkpoint import load_model, save_checkpoint

    batch = long_batch()
    plain = sharp_openba()
    rows, source, target = 2, batch["input_ids"].shape[1], batch["labels"].shape[1]
    interpolated = {**batch,
                    "position_ids": (torch.arange(source) / 4.0).expand(rows, source),
                    "decoder_position_ids": (torch.arange(target) / 4.0).expand(rows, target)}
    expected = logits(plain, interpolated)
    assert (expected - logits(plain, batch)).abs().max() > 1e-3

    model = sharp_openba()
    apply_long_context(model, LongContextConfig(scaling="linear", factor=4.0, train_seq_len=256))
    assert model.config.position_interpolation == 4.0
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)

    save_checkpoint(model, None, tmp_path / "linear")
    reloaded = load_model(tmp_path / "linear")
    assert reloaded.config.position_interpolation == 4.0
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)  # a plain reload keeps it
    assert attach_rope_scaling(reloaded)


def test_openba_linear_interpolation_holds_during_cached_generation():
    model = tiny_openba()
    apply_long_context(model, LongContextConfig(scaling="linear", factor=2.0))
    batch = long_batch()
    model.eval()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], decoder_input_ids=torch.tensor([[0, 5, 9]] * 2)).logits
        step = model(input_ids=batch["input_ids"], decoder_input_ids=torch.tensor([[0, 5]] * 2), use_cache=True)
        last = model(input_ids=batch["input_ids"], decoder_input_ids=torch.tensor([[9]] * 2),
                     cache=step.cache, use_cache=True).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_dynamic_ntk_on_openba_is_a_user_error():
    with pytest.raises(UserError, match="dynamic NTK scaling is not available for OpenBA"):
        apply_long_context(tiny_openba(), LongContextConfig(scaling="dynamic", factor=2.0))


# ------------------------------------------------------------------------------------------------ Llama


def test_llama_rope_base_change_rebuilds_the_rotary_frequencies():
    model = tiny_llama()
    apply_long_context(model, LongContextConfig(rope_theta=500000.0, train_seq_len=256))
    head_dim = 8
    expected = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    assert model.config.rope_parameters["rope_theta"] == 500000.0 and model.config.max_position_embeddings == 256
    fresh = LlamaForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    ids = {"input_ids": torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(logits(model, ids), logits(fresh, ids), rtol=0, atol=0)


def test_llama_linear_and_dynamic_scaling_set_rope_parameters_and_the_supported_length():
    linear = tiny_llama()
    default_freq = linear.model.rotary_emb.inv_freq.clone()
    apply_long_context(linear, LongContextConfig(scaling="linear", factor=4.0))
    assert linear.config.rope_parameters["rope_type"] == "linear"
    torch.testing.assert_close(linear.model.rotary_emb.inv_freq, default_freq / 4.0)
    assert supported_lengths(linear.config) == (256, None)  # 64 trained positions, stretched 4x

    dynamic = tiny_llama()
    apply_long_context(dynamic, LongContextConfig(scaling="dynamic", factor=2.0, train_seq_len=512))
    # dynamic NTK reads max_position_embeddings as the trained length: it must stay 64
    assert dynamic.config.max_position_embeddings == 64
    assert dynamic.config.rope_parameters["rope_type"] == "dynamic"
    assert supported_lengths(dynamic.config) == (128, None)
    ids = {"input_ids": torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(0))}
    assert torch.isfinite(logits(dynamic, ids)).all()


# ------------------------------------------------------------------------------------------------ lengths


def test_length_check_counts_synthesised_position_ids():
    config = tiny_llama().config
    check_sequence_lengths(config, {"input_ids": torch.zeros(1, 64, dtype=torch.long)})
    logo_like = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 40, 41,
                                                                                                  42, 70, 71]])}
    with pytest.raises(UserError, match="sequence length 72 exceeds"):
        check_sequence_lengths(config, logo_like)


def test_training_beyond_the_supported_length_needs_an_extension_first(tmp_path):
    batches = [long_batch(source=100, target=60)]
    config = TrainConfig(steps=2, lr=1e-3, min_lr=1e-4, save_every=0, log_every=1)
    with pytest.raises(UserError, match="encoder sequence length 100 exceeds"):
        Trainer(tiny_openba(), config, batches).train(tmp_path / "short")
    model = tiny_openba()
    apply_long_context(model, LongContextConfig(rope_theta=1e5, train_seq_len=128, eval_seq_len=64))
    result = Trainer(model, config, batches).train(tmp_path / "long")
    assert result["step"] == 2 and result["loss"] > 0


@pytest.mark.parametrize("settings, message", [
    ({"scaling": "yarn"}, "scaling must be one of"),
    ({"scaling": "linear"}, "factor 1 changes nothing"),
    ({"factor": 0.5}, "factor must be >= 1"),
    ({"rope_theta": -1.0}, "rope_theta must be positive"),
    ({"train_seq_len": 100, "eval_seq_len": 200}, "train at least as long as you evaluate"),
])
def test_bad_long_context_config_is_a_user_error(settings, message):
    with pytest.raises(UserError, match=message):
        LongContextConfig(**settings)
