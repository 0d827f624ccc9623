"""Graded retrieval scores on long-context probe prompts: the answer's negative log-likelihood and the share of its
value tokens the model ranks first. Exact match says nothing until a model answers whole; these move before that.

These score the training format in process (" answer" + EOS, teacher-forced, per token) for the LOGO evidence
report; the gates' graded measure is lm-eval's answer-choice tasks (probe_<kind>_choices, eval/taskdata.py): the
answer's log-likelihood per character and its rank among candidate values."""

from __future__ import annotations

import json
from typing import Sequence


def probe_rows(task_set, kinds: Sequence[str]) -> list[dict]:
    """The probe rows of `kinds` (eval/probes.py) in an offline task set, as its probe tasks evaluate them."""
    files = dict.fromkeys(info["file"] for name, info in task_set.tasks.items()  # a probe task and its answer-choice
                          if name.startswith("probe_") and "file" in info)     # task share one file
    rows = []
    for file in files:
        with open(task_set.directory / file) as handle:
            rows += [row for row in map(json.loads, handle) if row["kind"] in kinds]
    return rows


def answer_scores(model, tokenizer, rows: Sequence[dict], append_eos: bool = True) -> dict[int, dict[str, float]]:
    """Per probe length: `nll`, the mean per-token NLL of the true answer (" {answer}" + EOS, the training format)
    after each probe prompt, and `value_accuracy`, the share of the answer's value tokens (blank tokens and EOS left
    out: the format, not the retrieval) that are the model's argmax under teacher forcing (chance ~0.1 for digits).
    Plain positions, as the probes run."""
    import torch

    from core.checkpoint import is_encoder_decoder

    scores: dict[int, list[tuple[float, int, int]]] = {}
    encoder_decoder = is_encoder_decoder(model)
    model.eval()
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"]
        answer = answer + ([tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else [])
        value = torch.tensor([bool(tokenizer.decode([t]).strip()) and t != tokenizer.eos_token_id for t in answer])
        with torch.no_grad():
            if encoder_decoder:
                logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0]
            else:
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        target = torch.tensor(answer)
        nll = float(torch.nn.functional.cross_entropy(logits.float(), target))
        hits = int(((logits.argmax(-1) == target) & value).sum())
        scores.setdefault(row["length"], []).append((nll, hits, int(value.sum())))
    return {length: {"nll": sum(s[0] for s in per_row) / len(per_row),
                     "value_accuracy": sum(s[1] for s in per_row) / max(1, sum(s[2] for s in per_row))}
            for length, per_row in sorted(scores.items())}
