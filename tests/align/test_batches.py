"""Preference batches: the prompt is the context chunks then the question, synthesised positions stay inside the
window (the longest decoder-only response ends on its last position), iteration resumes exactly, and rows that do
not fit are errors naming the row (or documented truncation)."""

import pytest
import torch

from align.batches import BatchConfig, PreferenceBatches
from align.data import load_rows
from align.positions import PositionConfig
from core.checkpoint import load_tokenizer
from core.errors import UserError

POSITION = PositionConfig(window=4096, chunk_size=128, max_chunks=8)


def batches(workspace, encoder_decoder=False, position=POSITION, rank=0, world=1, **settings) -> PreferenceBatches:
    rows = load_rows(workspace / "data")
    tokenizer = load_tokenizer(workspace / "tokenizer")
    return PreferenceBatches(rows, tokenizer, position, BatchConfig(**{"batch_size": 3, **settings}), 3,
                             encoder_decoder, rank=rank, world=world)


def test_prompt_is_chunks_then_question_and_responses_end_with_eos(workspace):
    data = batches(workspace, shuffle=False)
    tokenizer = load_tokenizer(workspace / "tokenizer")
    row = load_rows(workspace / "data")[0]
    batch = data.collate([0], epoch=0)
    prompt = batch["input_ids"][0, : int(batch["attention_mask"][0].sum())]
    assert tokenizer.decode(prompt) == "".join(row["chunks"]) + row["question"]
    for i, response in enumerate(row["responses"]):
        ids = batch["response_ids"][0, i, : int(batch["response_mask"][0, i].sum())]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]) == response


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_positions_increase_inside_the_window_and_the_tail_reaches_its_end(workspace, encoder_decoder):
    data = batches(workspace, encoder_decoder)
    for batch in data:
        for b in range(batch["input_ids"].shape[0]):
            p = int(batch["attention_mask"][b].sum())
            positions = batch["position_ids"][b, :p]
            assert (positions[1:] > positions[:-1]).all()
            assert positions[-1] < POSITION.window
            longest = int(batch["response_mask"][b].sum(-1).max())
            end = positions[-1] + (longest if not encoder_decoder else 0)
            assert end == POSITION.window - 1  # the longest response (decoder-only) or the question ends the window


def test_iteration_resumes_exactly_and_epochs_reshuffle(workspace):
    data = batches(workspace)
    first = iter(data)
    next(first)
    state = data.state_dict()
    expected = next(first)
    resumed = batches(workspace)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    for key in ("input_ids", "position_ids", "response_ids"):
        assert torch.equal(expected[key], again[key])
    epoch0 = [b["row_ids"] for b in batches(workspace)]
    data = batches(workspace)
    list(data)
    epoch1 = [b["row_ids"] for b in data]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) and epoch0 != epoch1


def test_processes_share_one_process_batches_between_them(workspace):
    """Two ranks with batch 2 read, step by step, the rows (and positions) one process reads with batch 4."""
    one = list(batches(workspace, batch_size=4))
    ranks = [list(batches(workspace, batch_size=2, rank=r, world=2)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2  # 8 rows
    for step, whole in enumerate(one):
        parts = [ranks[0][step], ranks[1][step]]
        assert parts[0]["row_ids"] + parts[1]["row_ids"] == whole["row_ids"]
        for part, rows in zip(parts, (slice(0, 2), slice(2, 4))):
            width = part["input_ids"].shape[1]
            assert torch.equal(part["position_ids"], whole["position_ids"][rows, :width])
    odd = [[b["row_ids"] for b in batches(workspace, batch_size=3, rank=r, world=2)] for r in (0, 1)]
    assert [len(o) for o in odd] == [1, 1] and set(odd[0][0]).isdisjoint(odd[1][0])  # 3 batches: the last left out
    with pytest.raises(UserError, match="fewer batches of 8 than the 2 processes"):
        batches(workspace, batch_size=8, rank=1, world=2)


def test_long_responses_fail_naming_the_row_or_are_truncated_when_asked(workspace):
    with pytest.raises(UserError, match=r"row logo-0-\d+: response 2 has \d+ tokens"):
        batches(workspace, max_response_tokens=10)
    data = batches(workspace, max_response_tokens=10, truncate_responses=True)
    assert data.truncated > 0
    assert int(next(iter(data))["response_mask"].sum(-1).max()) == 10


def test_context_beyond_the_chunks_or_window_is_an_error_naming_the_row(workspace):
    with pytest.raises(UserError, match=r"row logo-0-\d+: context of \d+ tokens in 6 chunks exceeds"):
        batches(workspace, position=PositionConfig(window=4096, chunk_size=128, max_chunks=4))
    with pytest.raises(UserError, match="exceeds the synthesised window"):
        batches(workspace, position=PositionConfig(window=600, chunk_size=128, max_chunks=8))
    with pytest.raises(UserError, match="chunk_size"):
        batches(workspace, position=PositionConfig(window=4096, chunk_size=64, max_chunks=16))
