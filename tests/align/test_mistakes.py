"""Own mistakes: the greedy answer at synthesised positions is what step-by-step decoding without a cache gives (both
families), a wrong answer becomes the dis-preferred response and a right one a random stand-in, and the preference
rows that ask for it keep every other response as the rules made it."""

import pytest
import torch

from align.data import build_preference_rows
from align.mistakes import answer_at_positions, own_mistake
from core.checkpoint import load_model, load_tokenizer
from core.errors import UserError
from tests.align.test_data import small_config


def uncached_greedy(model, prompt: list[int], positions: torch.Tensor, steps: int) -> list[int]:
    """The reference: the whole sequence through the model for every new token."""
    new = []
    with torch.no_grad():
        for _ in range(steps):
            if model.config.is_encoder_decoder:
                logits = model(input_ids=torch.tensor([prompt]), position_ids=positions[None],
                               decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id, *new]])).logits
            else:
                ids = torch.tensor([prompt + new])
                continued = torch.cat([positions, positions[-1] + torch.arange(1, len(new) + 1)])
                logits = model(input_ids=ids, position_ids=continued[None]).logits
            new.append(int(logits[0, -1].argmax()))
    return new


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_greedy_answer_at_synthesised_positions_matches_uncached_decoding(workspace, family):
    model = load_model(workspace / family).eval()
    prompt = list(range(5, 45))
    positions = torch.cat([torch.arange(0, 20), torch.arange(300, 320)])  # a jump, as synthesis makes
    answer = answer_at_positions(model, prompt, positions, max_new_tokens=6, eos_id=None)
    assert answer == uncached_greedy(model, prompt, positions, 6)
    plain = answer_at_positions(model, prompt, torch.arange(40), max_new_tokens=6, eos_id=None)
    assert plain == uncached_greedy(model, prompt, torch.arange(40), 6)


def test_a_wrong_answer_is_the_mistake_and_a_right_one_falls_back(workspace):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    model = load_model(workspace / "llama").eval()
    chunks, question = ["alpha beta gamma\n", "delta epsilon\n"], "\nQuestion: what?\nAnswer:"
    settings = dict(window=512, chunk_size=32, max_chunks=4, max_new_tokens=4, seed=0, index=3)
    said, kind, source = own_mistake(model, tokenizer, chunks, question, " 123456", fallback=" 999", **settings)
    assert kind == "own_mistake" and said.strip() and said != " 123456" and "synthesised" in source
    # asked again with its own answer as the gold: it is right, so the stand-in is used
    again = own_mistake(model, tokenizer, chunks, question, said, fallback=" 999", **settings)
    assert again[:2] == (" 999", "hallucinated")
    # other positions (another row index) are another draw; the answer is the model's argmax under them
    other = own_mistake(model, tokenizer, chunks, question, " 123456", fallback=" 999", **{**settings, "index": 4})
    assert other[1] in ("own_mistake", "hallucinated")


def test_rows_with_own_mistakes_keep_the_other_responses(workspace):
    from datasets import load_from_disk

    corpus = load_from_disk(str(workspace / "corpus"))["train"]
    tokenizer = load_tokenizer(workspace / "tokenizer")
    model = load_model(workspace / "llama").eval()
    config = small_config(samples=3, rule_rejected=["own_mistake", "irrelevant"], mistake_window=2048)
    config.generation.max_new_tokens = 4
    rows, _ = build_preference_rows(config, corpus["text"], corpus["doc_id"], tokenizer, model)
    plain, _ = build_preference_rows(small_config(samples=3), corpus["text"], corpus["doc_id"], tokenizer)
    for row, reference in zip(rows, plain):
        assert row["chunks"] == reference["chunks"] and row["responses"][2] == reference["responses"][2]
        index = int(row["id"].rsplit("-", 1)[1])
        expected = own_mistake(model, tokenizer, row["chunks"], row["question"], row["answer"], 2048,
                               config.chunk_size, config.context_chunks, 4, config.seed, index, fallback="?")
        if expected[1] == "own_mistake":
            assert (row["responses"][1], row["response_kinds"][1]) == expected[:2]
        else:
            assert row["response_kinds"][1] == "hallucinated" and row["responses"][1] != row["answer"]
        assert row["generator"].startswith("rule + ")
    with pytest.raises(UserError, match="generator"):
        build_preference_rows(config, corpus["text"], corpus["doc_id"], tokenizer)
