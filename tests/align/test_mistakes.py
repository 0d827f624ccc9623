"""Own mistakes: the greedy answer at synthesised positions is what step-by-step decoding over the whole sequence
gives (both families), EOS ends it, an answer whose first number is not the asked value becomes the dis-preferred
response and a right or empty one the random stand-in, and rows that ask for it keep every other response."""

import random

import pytest
import torch

import align.mistakes
from align.data import build_preference_rows, draw_value
from align.mistakes import answer_at_positions, own_mistake
from align.positions import PositionConfig, sample_generator, synthesize_positions
from core.checkpoint import load_model, load_tokenizer
from core.errors import UserError
from tests.align.test_data import small_config


def uncached_greedy(model, prompt: list[int], positions: torch.Tensor, steps: int, eos_id=None) -> list[int]:
    """The reference: the whole sequence through the model for every new token, with full causal attention."""
    new = []
    with torch.no_grad():
        for _ in range(steps):
            if model.config.is_encoder_decoder:
                logits = model(input_ids=torch.tensor([prompt]), position_ids=positions[None],
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id, *new]])).logits
            else:
                ids = torch.tensor([prompt + new])
                continued = torch.cat([positions, positions[-1] + torch.arange(1, len(new) + 1)])
                logits = model(input_ids=ids, position_ids=continued[None], attention_mask=torch.ones_like(ids)).logits
            if int(logits[0, -1].argmax()) == eos_id:
                break
            new.append(int(logits[0, -1].argmax()))
    return new


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_greedy_answer_at_synthesised_positions_matches_uncached_decoding(workspace, family):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    tokenizer.eos_token_id = None  # a random model may say EOS at once; here every step counts
    model = load_model(workspace / family).eval()
    prompt = list(range(5, 45))
    jumped = torch.cat([torch.arange(0, 20), torch.arange(300, 320)])  # a jump, as synthesis makes
    for positions in (jumped, torch.arange(40)):
        expected = uncached_greedy(model, prompt, positions, 6)
        if tokenizer.convert_tokens_to_ids("\u010a") in expected:  # a byte-level line break ends the answer early
            expected = expected[: expected.index(tokenizer.convert_tokens_to_ids("\u010a")) + 1]
        assert answer_at_positions(model, tokenizer, prompt, positions, max_new_tokens=6) == expected


def test_eos_ends_the_answer(workspace):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    model = load_model(workspace / "llama").eval()
    prompt, positions = list(range(5, 25)), torch.arange(20)
    first = uncached_greedy(model, prompt, positions, 1)[0]
    tokenizer.eos_token_id = first
    assert answer_at_positions(model, tokenizer, prompt, positions, max_new_tokens=4) == []


@pytest.mark.parametrize("said, kind, response", [
    (" 123457", "own_mistake", " 123457"),         # one digit off: the mistake
    (" 123456.", "hallucinated", " 999"),          # right, with a full stop: not a mistake
    (" 123456 is it", "hallucinated", " 999"),
    (" no idea\nmore", "own_mistake", " no idea"),  # ignores the question; cut at the line break
    ("", "hallucinated", " 999"),                   # says nothing: nothing to push down
])
def test_the_first_number_decides_whether_the_answer_is_a_mistake(workspace, monkeypatch, said, kind, response):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    model = load_model(workspace / "llama").eval()
    monkeypatch.setattr(align.mistakes, "answer_at_positions",
                        lambda *args, **kwargs: tokenizer(said, add_special_tokens=False)["input_ids"])
    positions = PositionConfig(window=512, chunk_size=32, max_chunks=4)
    got = own_mistake(model, tokenizer, ["alpha beta\n", "gamma\n"], "\nQuestion: what?\nAnswer:", "123456",
                      positions, max_new_tokens=8, seed=0, index=3, fallback=" 999")
    assert got[:2] == (response, kind)


def test_rows_with_own_mistakes_keep_the_other_responses(workspace):
    from datasets import load_from_disk

    corpus = load_from_disk(str(workspace / "corpus"))["train"]
    tokenizer = load_tokenizer(workspace / "tokenizer")
    model = load_model(workspace / "llama").eval()
    config = small_config(samples=3, rule_rejected=["own_mistake", "irrelevant"], mistake_window=2048)
    config.generation.max_new_tokens = 4
    rows, _ = build_preference_rows(config, corpus["text"], corpus["doc_id"], tokenizer, model)
    plain, _ = build_preference_rows(small_config(samples=3), corpus["text"], corpus["doc_id"], tokenizer)
    window = PositionConfig(window=2048, chunk_size=config.chunk_size, max_chunks=config.context_chunks)
    for row, reference in zip(rows, plain):
        assert row["chunks"] == reference["chunks"] and row["responses"][2] == reference["responses"][2]
        index, value = int(row["id"].rsplit("-", 1)[1]), row["answer"].strip()
        chunks = tokenizer(row["chunks"], add_special_tokens=False)["input_ids"]
        question = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
        positions, _ = synthesize_positions([len(c) for c in chunks], len(question) + 5, window,
                                            sample_generator(config.seed, index))
        prompt = [t for c in chunks for t in c] + question
        said = tokenizer.decode(uncached_greedy(model, prompt, positions[: len(prompt)], 4, tokenizer.eos_token_id),
                                skip_special_tokens=True).split("\n", 1)[0]
        if row["response_kinds"][1] == "own_mistake":
            assert row["responses"][1] == said and said.strip()
        else:
            stand_in = draw_value(random.Random(f"{config.seed}:own-mistake:{index}"), {value})
            assert row["responses"][1] == f" {stand_in}" and not said.strip()
        assert row["generator"].startswith("rule + ")
    with pytest.raises(UserError, match="generator"):
        build_preference_rows(config, corpus["text"], corpus["doc_id"], tokenizer)
