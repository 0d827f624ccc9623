"""Graded probe scores: the answer's NLL and value-token accuracy, checked against a hand-run forward pass of a
tiny encoder-decoder and a tiny decoder-only model."""

import pytest
import torch

from eval.probe_scores import answer_scores
from tests.factory import byte_tokenizer, save_byte_checkpoint

ROW = {"prompt": "The secret number of the teal yak is 4821.\nQuestion: What is it?\nAnswer:", "answer": "4821",
       "length": 50}


@pytest.mark.parametrize("family", ["openba", "llama"])
def test_answer_scores_count_value_tokens_only(family, tmp_path):
    from core.checkpoint import load_model, load_tokenizer

    save_byte_checkpoint(family, tmp_path / family, byte_tokenizer(tmp_path / "tokenizer"))
    model, tokenizer = load_model(tmp_path / family), load_tokenizer(tmp_path / family)
    scores = answer_scores(model, tokenizer, [ROW, {**ROW, "length": 80}])
    assert sorted(scores) == [50, 80]
    prompt = tokenizer(ROW["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(" 4821", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        if family == "openba":
            logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0]
        else:  # the logits that predict each answer token: from the last prompt token on
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
    expected_nll = float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer)))
    value = [i for i, t in enumerate(answer) if tokenizer.decode([t]).strip() and t != tokenizer.eos_token_id]
    hits = sum(int(logits[i].argmax()) == answer[i] for i in value)
    assert abs(scores[50]["nll"] - expected_nll) < 1e-5
    assert scores[50]["value_accuracy"] == hits / len(value) and 0 < len(value) < len(answer)
