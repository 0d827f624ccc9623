"""The model's own mistakes at long positions as dis-preferred answers (`rule_rejected: [own_mistake, ...]`).

LOGO aligns a model for a window longer than its training sequences, so the mistakes worth pushing down are the
ones the model makes when its context sits far apart in that window. This asks the generator model (the model before
LOGO) the row's question over the row's context C' at positions synthesised as training will draw them
(align/positions.py, over `window` positions), greedily; a wrong answer becomes the dis-preferred one. Where the
model already answers right, there is no mistake to push down and a random number stands in ("hallucinated").

Measured on the instructed tiny teacher (single-fact rows of the evidence run): it answers 100% of them at plain
positions and 62% at positions synthesised over a 4x window; its wrong answers are near misses of the gold (one or
two digits off), i.e. what it actually writes when positions drift, not a corruption drawn by a rule.

Greedy decoding with the context encoded once: encoder-decoders encode C' + question at the synthesised positions
and decode from position 0 (as align/batches.py trains them); decoder-only models keep a KV cache and continue the
positions after the question's last one.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from align.positions import PositionConfig, sample_generator, synthesize_positions

SOURCE = "the generator's answer at synthesised positions"


@torch.no_grad()
def answer_at_positions(model, prompt_ids: Sequence[int], positions: torch.Tensor, max_new_tokens: int,
                        eos_id: int | None) -> list[int]:
    """Greedy answer tokens (EOS excluded) to a prompt whose tokens carry `positions`."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    positions = positions.view(1, -1).to(device)
    new: list[int] = []
    if model.config.is_encoder_decoder:
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(input_ids=ids, position_ids=positions)[0])
        start = model.config.decoder_start_token_id
        for _ in range(max_new_tokens):
            decoder_ids = torch.tensor([[start, *new]], device=device)
            token = int(model(encoder_outputs=encoded, decoder_input_ids=decoder_ids).logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
        return new
    output = model(input_ids=ids, position_ids=positions, use_cache=True)
    position = int(positions[0, -1])
    for _ in range(max_new_tokens):
        token = int(output.logits[0, -1].argmax())
        if token == eos_id:
            break
        new.append(token)
        position += 1
        output = model(input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[position]],
                       device=device), past_key_values=output.past_key_values, use_cache=True)
    return new


def own_mistake(model, tokenizer, chunks: Sequence[str], question: str, answer: str, window: int, chunk_size: int,
                max_chunks: int, max_new_tokens: int, seed: int, index: int,
                fallback: str) -> tuple[str, str, str]:
    """(response, kind, source): the model's wrong answer with the row's context at positions drawn from (seed, index),
    or `fallback` where it answers right (or nothing)."""
    chunk_ids = tokenizer(list(chunks), add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    tail = len(question_ids) + (0 if model.config.is_encoder_decoder else len(answer_ids) + 1)
    config = PositionConfig(window=window, chunk_size=chunk_size, max_chunks=max_chunks)
    positions, _ = synthesize_positions([len(c) for c in chunk_ids], tail, config, sample_generator(seed, index))
    prompt = [t for chunk in chunk_ids for t in chunk] + question_ids
    response = tokenizer.decode(answer_at_positions(model, prompt, positions[: len(prompt)], max_new_tokens,
                                                    tokenizer.eos_token_id), skip_special_tokens=True)
    response = response.split("\n", 1)[0]
    if response.strip() and response.strip() != answer.strip():
        return response, "own_mistake", SOURCE
    return fallback, "hallucinated", "random number (the generator answered right)"

