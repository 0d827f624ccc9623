"""Packed rows: no attention across documents (packed logits equal each document run alone), restarting positions,
labels, and the share of real tokens on the corpus."""

import numpy as np
import pytest
import torch

from pretrain.objectives import (
    IGNORE_INDEX,
    CausalLM,
    ObjectiveMixture,
    SpecialIds,
    objective_batches,
    token_mean_loss,
    ul2_mixture,
)
from pretrain.objectives.losses import model_inputs
from pretrain.packing import (
    PackedRow,
    collate_packed,
    document_attention_mask,
    flatten_rows,
    non_padding_share,
    positions_from_segments,
    segments_from_positions,
)
from tests.factory import tiny_model

VOCAB = 1200
IDS = SpecialIds(tuple(range(1000, 1100)), {"R": 1100, "S": 1101, "X": 1102}, eos=1, pad=0)


def documents(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 900, int(n)).tolist() for n in rng.integers(low, high, count)]


def tiny_llama(attn: str = "sdpa"):
    """Two blocks of hidden 32 over a vocabulary that holds the UL2 ids of IDS."""
    return tiny_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)


def tiny_openba(attn: str = "sdpa"):
    """The openba-tiny preset over a vocabulary that holds the UL2 ids of IDS."""
    return tiny_model("openba", vocab_size=1104, attn_implementation=attn)


def causal_batch(seq_len: int = 64, rows: int = 2):
    return next(objective_batches(documents(30, 5, 40), ObjectiveMixture([CausalLM()]), batch_size=rows,
                                  input_length=seq_len, encoder_decoder=False, packed=True))


def test_positions_restart_and_segments_come_back_from_positions():
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert positions_from_segments(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert segments_from_positions(positions_from_segments(segments)).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    row = PackedRow()
    row.add_decoder_only([5, 6, 7], [5, 6, 7])
    row.add_decoder_only([8, 9], [IGNORE_INDEX, 9])
    batch = collate_packed([row], encoder_decoder=False, input_length=7, target_length=None, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    # a document's first token is never predicted from the previous document
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100]]


def test_encoder_decoder_rows_shift_decoder_inputs_per_document():
    row = PackedRow()
    row.add_encoder_decoder([5, 6], [7, 8, 1], decoder_start=0)
    row.add_encoder_decoder([9], [10, 1], decoder_start=0)
    batch = collate_packed([row], encoder_decoder=True, input_length=4, target_length=6, pad_id=0)
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 8, 0, 10, 0]]
    assert batch["decoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0]]
    assert batch["encoder_segment_ids"].tolist() == [[1, 1, 2, 0]]
    assert batch["decoder_position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist() == [[7, 8, 1, 10, 1, -100]]


def llama_alone_logits(model, batch, row, segment):
    starts = batch["position_ids"][row] == 0
    ids = torch.cumsum(starts.long(), 0)
    keep = ids == segment
    return model(input_ids=batch["input_ids"][row][keep][None]).logits[0], keep


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_llama_logits_equal_each_document_alone(attn):
    model = tiny_llama(attn)
    batch = causal_batch()
    packed = model(**model_inputs(model, batch)).logits
    checked = 0
    for row in range(2):
        real = int((batch["input_ids"][row] != 0).sum())
        segments = int((batch["position_ids"][row][:real] == 0).sum())
        assert segments > 1
        for segment in range(1, segments + 1):
            alone, keep = llama_alone_logits(model, batch, row, segment)
            torch.testing.assert_close(packed[row][keep], alone, atol=1e-5, rtol=0)
            checked += 1
    assert checked > 3
    # without the restarting positions attention crosses documents and the logits change
    crossed = model(input_ids=batch["input_ids"]).logits
    assert (crossed - packed).abs().max() > 1e-3


@torch.no_grad()
def test_explicit_4d_document_mask_and_flattened_rows_give_the_same_logits():
    model = tiny_llama()
    batch = causal_batch()
    packed = model(**model_inputs(model, batch)).logits
    segments = segments_from_positions(batch["position_ids"])
    mask = document_attention_mask(segments, segments, causal=True)
    explicit = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(explicit, packed, atol=1e-5, rtol=0)
    flat = flatten_rows(batch)
    assert flat["input_ids"].shape == (1, 128)
    torch.testing.assert_close(model(**model_inputs(model, flat)).logits.view_as(packed), packed, atol=1e-5, rtol=0)


def ul2_packed_batch():
    mixture = ul2_mixture(IDS, [1, 1, 1, 1, 1, 1, 1])
    return next(objective_batches(documents(40, 5, 60), mixture, batch_size=2, input_length=64, target_length=48,
                                  packed=True, seed=1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_openba_logits_equal_each_document_alone_with_encoder_and_decoder_segments(attn):
    model = tiny_openba(attn)
    batch = ul2_packed_batch()
    packed = model(**model_inputs(model, batch)).logits
    checked = 0
    for row in range(2):
        encoder_segments, decoder_segments = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
        assert int(encoder_segments.max()) > 1
        for segment in range(1, int(encoder_segments.max()) + 1):
            inputs = batch["input_ids"][row][encoder_segments == segment][None]
            labels = batch["labels"][row][decoder_segments == segment][None]
            alone = model(input_ids=inputs, labels=labels).logits[0]
            torch.testing.assert_close(packed[row][decoder_segments == segment], alone, atol=1e-5, rtol=0)
            checked += 1
    assert checked > 3
    unsegmented = {k: v for k, v in model_inputs(model, batch).items() if "segment" not in k}
    assert (model(**unsegmented).logits - packed).abs().max() > 1e-3


@torch.no_grad()
def test_openba_segments_cut_attention_changing_one_document_leaves_the_others():
    model = tiny_openba()
    batch = ul2_packed_batch()
    before = model(**model_inputs(model, batch)).logits
    changed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    first_encoder = changed["encoder_segment_ids"][0] == 1
    changed["input_ids"][0][first_encoder] = 7
    first_decoder = changed["decoder_segment_ids"][0] == 1
    changed["decoder_input_ids"][0][first_decoder & (changed["decoder_position_ids"][0] > 0)] = 8
    after = model(**model_inputs(model, changed)).logits
    assert (after[0][first_decoder] - before[0][first_decoder]).abs().max() > 1e-3
    torch.testing.assert_close(after[0][~first_decoder], before[0][~first_decoder], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_openba_segment_masks_equal_what_transformers_builders_make(attn):
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    from core.openba.modeling_openba import same_segment, segment_mask

    config = tiny_openba(attn).config
    encoder = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [1, 2, 2, 3, 3, 3, 0]])
    decoder = torch.tensor([[1, 1, 1, 2, 0], [1, 2, 3, 3, 0]])
    encoder_states, decoder_states = torch.zeros(2, 7, 4), torch.zeros(2, 5, 4)
    encoder_padding, decoder_padding = (encoder != 0).long(), (decoder != 0).long()
    built = [
        create_bidirectional_mask(config, encoder_states, encoder_padding,
                                  and_mask_function=same_segment(encoder, encoder)),
        create_causal_mask(config, decoder_states, decoder_padding, None,
                           and_mask_function=same_segment(decoder, decoder)),
        create_bidirectional_mask(config, decoder_states, encoder_padding, encoder_hidden_states=encoder_states,
                                  and_mask_function=same_segment(decoder, encoder)),
    ]
    direct = [segment_mask(encoder, encoder, encoder_padding, False, attn, torch.float32),
              segment_mask(decoder, decoder, decoder_padding, True, attn, torch.float32),
              segment_mask(decoder, encoder, encoder_padding, False, attn, torch.float32)]
    for expected, got in zip(built, direct):
        assert expected.dtype == got.dtype and torch.equal(expected.expand_as(got), got)


@torch.no_grad()
def test_openba_rejects_segments_on_one_side_only():
    model = tiny_openba()
    batch = ul2_packed_batch()
    with pytest.raises(ValueError, match="both"):
        model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
              encoder_segment_ids=batch["encoder_segment_ids"])


def test_packed_loss_is_the_token_average_of_the_documents_losses():
    model = tiny_llama()
    batch = causal_batch()
    with torch.no_grad():
        loss, metrics = token_mean_loss(model, batch)
        total, tokens = 0.0, 0
        for row in range(2):
            real = int((batch["input_ids"][row] != 0).sum())
            for segment in range(1, int((batch["position_ids"][row][:real] == 0).sum()) + 1):
                _, keep = llama_alone_logits(model, batch, row, segment)
                ids = batch["input_ids"][row][keep][None]
                alone_loss, alone_metrics = token_mean_loss(model, {"input_ids": ids, "labels": ids})
                total += alone_loss.item() * alone_metrics["target_tokens"]
                tokens += alone_metrics["target_tokens"]
    assert metrics["target_tokens"] == tokens
    assert loss.item() == pytest.approx(total / tokens, rel=1e-5)


def test_packing_fills_at_least_99_percent_of_slots_on_the_corpus():
    from pretrain.corpus import CorpusConfig, build_corpus
    from pretrain.data import TokenizedDocuments

    corpus = build_corpus(CorpusConfig(max_documents=40))["train"]

    class Bytes:  # the share depends on document lengths only, so bytes stand in for the tokenizer here
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b + 3 for b in text.encode()]}

    docs = TokenizedDocuments(corpus, Bytes(), append_eos=True, repeat=False)
    packed = objective_batches(docs, ObjectiveMixture([CausalLM()]), batch_size=4, input_length=512,
                               encoder_decoder=False, packed=True)
    for _ in range(20):
        next(packed)
    assert non_padding_share(packed.stats) >= 0.99
    padded = objective_batches(TokenizedDocuments(corpus, Bytes(), append_eos=True, repeat=False),
                               ObjectiveMixture([CausalLM()]), batch_size=4, input_length=512,
                               encoder_decoder=False, packed=False)
    for _ in range(20):
        next(padded)
    assert non_padding_share(padded.stats) < non_padding_share(packed.stats)


def test_packed_ul2_rows_fill_the_encoder_and_the_decoder_side():
    """Every denoiser has its own target/input ratio (S ~1/3, X-1 ~1): sides fitted to the longest row hold no
    more padding than the rounding, where fixed 570/380 sides leave one of them mostly padding."""
    options = dict(batch_size=4, input_length=570, target_length=380, seed=3)
    packed = objective_batches(documents(200, 20, 400), ul2_mixture(IDS, [1] * 7), packed=True, **options)
    padded = objective_batches(documents(200, 20, 400), ul2_mixture(IDS, [1] * 7), packed=False, **options)
    target_lengths = set()
    for _ in range(30):
        batch = next(packed)
        next(padded)
        target_lengths.add(batch["labels"].shape[1])
        assert batch["input_ids"].shape[1] <= 570 and batch["labels"].shape[1] <= 380
    assert len(target_lengths) > 1  # the decoder side follows the batch's denoiser
    stats = packed.stats
    assert stats["tokens"] / stats["slots"] >= 0.95
    assert stats["target_tokens"] / stats["target_slots"] >= 0.95
    assert padded.stats["target_tokens"] / padded.stats["target_slots"] < 0.8


def test_fitted_sides_round_up_to_the_multiple_and_stop_at_the_configured_length():
    row = PackedRow()
    row.add_encoder_decoder([5] * 10, [7] * 3, decoder_start=0)
    batch = collate_packed([row], encoder_decoder=True, input_length=12, target_length=6, pad_id=0,
                           fit_to_rows=True, multiple=8)
    assert batch["input_ids"].shape == (1, 12) and batch["labels"].shape == (1, 6)
    batch = collate_packed([row], encoder_decoder=True, input_length=64, target_length=64, pad_id=0,
                           fit_to_rows=True, multiple=4)
    assert batch["input_ids"].shape == (1, 12) and batch["labels"].shape == (1, 4)
    assert batch["decoder_segment_ids"].tolist() == [[1, 1, 1, 0]]


def test_packed_openba_loss_is_the_token_average_of_each_example_alone():
    model = tiny_openba()
    batch = ul2_packed_batch()
    with torch.no_grad():
        loss, metrics = token_mean_loss(model, batch)
        total, tokens = 0.0, 0
        for row in range(2):
            encoder_segments, decoder_segments = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
            for segment in range(1, int(encoder_segments.max()) + 1):
                alone = {"input_ids": batch["input_ids"][row][encoder_segments == segment][None],
                         "labels": batch["labels"][row][decoder_segments == segment][None]}
                alone_loss, alone_metrics = token_mean_loss(model, alone)
                total += alone_loss.item() * alone_metrics["target_tokens"]
                tokens += alone_metrics["target_tokens"]
    assert metrics["target_tokens"] == tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(total / tokens, rel=1e-5)


def test_t5_refuses_packed_rows_with_one_line():
    """T5ForConditionalGeneration hands the encoder's mask to cross-attention too, so a per-segment cross mask
    (decoder rows x encoder columns) cannot reach it; it would silently ignore segment ids."""
    from core.errors import UserError

    model = tiny_model("t5", vocab_size=1104)
    with pytest.raises(UserError, match="packed: false"):
        token_mean_loss(model, ul2_packed_batch())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and flash-attn")
@torch.no_grad()
def test_openba_flash_varlen_matches_the_mask_path():
    pytest.importorskip("flash_attn")
    model = tiny_openba().cuda().to(torch.bfloat16)
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in ul2_packed_batch().items()}
    model.config.segment_attention = "flash_varlen"
    flash = model(**model_inputs(model, batch)).logits.float()
    model.config.segment_attention = "mask"
    masked = model(**model_inputs(model, batch)).logits.float()
    real = batch["decoder_segment_ids"] != 0
    torch.testing.assert_close(flash[real], masked[real], atol=3e-2, rtol=3e-2)
