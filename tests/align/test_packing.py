"""Shared-context scoring: one packed sequence (decoder-only) or one encoder pass (encoder-decoder) gives the same
per-response log-likelihoods as scoring every (prompt, response) pair as its own sequence, also with gaps in the
position ids; the separate path itself equals a hand loop over full logits."""

import pytest
import torch
import torch.nn.functional as F

from align.packing import packed_layout, response_logps, shared_context_mask
from core.errors import UserError
from tests.align.conftest import preference_batch
from tests.factory import tiny_model


@pytest.mark.parametrize("family", ["llama", "openba", "qwen2"])
@pytest.mark.parametrize("gap", [False, True])
def test_shared_context_equals_separate_sequences(family, gap):
    model = tiny_model(family)
    batch = preference_batch(gap=gap)
    with torch.no_grad():
        shared = response_logps(model, batch, shared=True)
        separate = response_logps(model, batch, shared=False)
    assert torch.equal(shared.num_tokens, batch["response_mask"].sum(-1))
    torch.testing.assert_close(shared.sum_logp, separate.sum_logp, atol=1e-5, rtol=0)


def test_shared_context_equals_separate_with_eager_attention():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"  # an additive float mask instead of a boolean one
    batch = preference_batch(gap=True)
    with torch.no_grad():
        torch.testing.assert_close(response_logps(model, batch).sum_logp,
                                   response_logps(model, batch, shared=False).sum_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_separate_path_equals_a_hand_loop_over_full_logits(family):
    model = tiny_model(family)
    batch = preference_batch(gap=True)
    with torch.no_grad():
        separate = response_logps(model, batch, shared=False)
        for row in range(2):
            p = int(batch["attention_mask"][row].sum())
            prompt, positions = batch["input_ids"][row, :p], batch["position_ids"][row, :p]
            for i in range(3):
                r = int(batch["response_mask"][row, i].sum())
                response = batch["response_ids"][row, i, :r]
                if family == "openba":
                    decoder = torch.cat([torch.tensor([model.config.decoder_start_token_id]), response[:-1]])
                    logits = model(input_ids=prompt[None], position_ids=positions[None],
                                   decoder_input_ids=decoder[None]).logits[0]
                else:
                    ids = torch.cat([prompt, response])[None]
                    pos = torch.cat([positions, positions[-1] + 1 + torch.arange(r)])[None]
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos).logits[0]
                    logits = logits[p - 1:p + r - 1]
                expected = F.log_softmax(logits.float(), -1).gather(-1, response[:, None]).sum()
                torch.testing.assert_close(separate.sum_logp[row, i], expected, atol=1e-5, rtol=0)


def test_gapped_positions_without_a_mask_would_cut_attention_in_transformers():
    """Why the packed and separate paths always pass a mask: transformers reads a jump as a new document."""
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 12))
    positions = torch.cat([torch.arange(6), 40 + torch.arange(6)])[None]
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                       use_cache=False).logits
        unmasked = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # as in training
    assert not torch.allclose(masked[:, 6:], unmasked[:, 6:], atol=1e-3)


def test_mask_lets_each_response_see_the_prompt_and_itself_only():
    batch = preference_batch(rows=1, responses=3, prompt=4, length=2)
    layout = packed_layout(batch)
    mask = shared_context_mask(layout["segment"], "bool", torch.float32)[0, 0]
    segment = layout["segment"][0]
    for q in range(len(segment)):
        for k in range(len(segment)):
            expected = k <= q and (segment[k] == 0 or segment[k] == segment[q])
            assert bool(mask[q, k]) == bool(expected)
    # every response's positions continue from the prompt's last position
    positions, prompt = layout["position_ids"][0], int(batch["attention_mask"].sum())
    for i in range(3):
        assert positions[segment == 1 + i][0] == positions[prompt - 1] + 1


def test_rows_without_rejected_or_with_empty_responses_are_errors():
    model = tiny_model("llama")
    batch = preference_batch()
    with pytest.raises(UserError, match="M >= 1"):
        response_logps(model, {**batch, "response_ids": batch["response_ids"][:, :1],
                               "response_mask": batch["response_mask"][:, :1]})
    empty = batch["response_mask"].clone()
    empty[0, 2] = 0
    with pytest.raises(UserError, match="no tokens"):
        response_logps(model, {**batch, "response_mask": empty})


def test_flash_attention_cannot_take_the_shared_context_mask():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="4D attention mask"):
        response_logps(model, preference_batch())


def test_t5_without_decoder_positions_shares_the_encoder_by_repeating_its_output():
    model = tiny_model("t5")
    batch = {k: v for k, v in preference_batch().items() if k != "position_ids"}  # relative buckets: no positions
    with torch.no_grad():
        torch.testing.assert_close(response_logps(model, batch).sum_logp,
                                   response_logps(model, batch, shared=False).sum_logp, atol=1e-5, rtol=0)
        # plain positions 0..k-1 are what T5 uses anyway (LOGO's position.synthesize=false)
        torch.testing.assert_close(response_logps(model, preference_batch()).sum_logp,
                                   response_logps(model, batch).sum_logp, atol=0, rtol=0)
    with pytest.raises(UserError, match="cannot be synthesised"):
        response_logps(model, preference_batch(gap=True))


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_responses_still_read_the_context_before_a_position_gap(family):
    """A synthesised gap must not cut attention: changing the first chunk changes every response's score."""
    model = tiny_model(family)
    batch = preference_batch(gap=True)  # positions jump by 40 in the middle of the prompt
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, :3] = (changed["input_ids"][:, :3] + 7) % 90 + 3
    with torch.no_grad():
        a = response_logps(model, batch).sum_logp
        b = response_logps(model, changed).sum_logp
    assert ((a - b).abs() > 1e-4).all()
