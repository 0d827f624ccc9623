"""The model's own mistakes at long positions as dis-preferred answers (`rule_rejected: [own_mistake, ...]`).

LOGO aligns a model for a window longer than its training sequences, so the mistakes worth pushing down are the
ones the model makes when its context sits far apart in that window. This asks the generator model (the model before
LOGO) the row's question over the row's context C' at positions synthesised over `window` positions (align/positions.py,
the distribution training draws from, not the very draws of a training step), greedily; an answer whose first number
is not the asked value becomes the dis-preferred one. Where the model already answers right (or says nothing) there
is no mistake to push down, and a random number stands in ("hallucinated").

Measured on the instructed tiny teacher (single-fact rows of the evidence run): it answers 100% of them at plain
positions and 62% at positions synthesised over a 4x window; its wrong answers there are near misses of the gold
(one or two digits off): what it actually writes when positions drift, not a corruption drawn by a rule.

Greedy decoding with the context computed once, laid out as align/batches.py and align/packing.py train the model:
encoder-decoders encode C' + question at the synthesised positions and decode from position 0; decoder-only models
get an explicit attention mask (transformers would read a jump in positions as a new packed document) and a KV cache,
the answer's positions continuing after the question's. A generator whose RoPE base LOGO will change
(`position.rope_theta`) should be given that base first.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from align.packing import encoder_kwargs
from align.positions import PositionConfig, sample_generator, synthesize_positions
from core.errors import UserError


def _stops(tokenizer, new: list[int]) -> bool:
    """An answer ends at its first line break (the released LOGO code stops on "\\n")."""
    return "\n" in tokenizer.decode(new[-1:])


@torch.no_grad()
def answer_at_positions(model, tokenizer, prompt_ids: Sequence[int], positions: torch.Tensor,
                        max_new_tokens: int) -> list[int]:
    """Greedy answer tokens (EOS and what follows a line break excluded) to a prompt whose tokens carry `positions`."""
    device = next(model.parameters()).device
    prompt = {"input_ids": torch.tensor([list(prompt_ids)], device=device),
              "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
              "position_ids": positions.view(1, -1).to(device)}
    if model.config.is_encoder_decoder:
        start = model.config.decoder_start_token_id
        if start is None:
            start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise UserError("the generator has no decoder_start_token_id; set it in its config")
        encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(**encoder_kwargs(model, prompt))[0])

        def next_logits(new: list[int]) -> torch.Tensor:
            decoder_ids = torch.tensor([[start, *new]], device=device)
            return model(encoder_outputs=encoded, attention_mask=prompt["attention_mask"],
                         decoder_input_ids=decoder_ids).logits[0, -1]
    else:
        cached = {"output": model(**prompt, use_cache=True)}

        def next_logits(new: list[int]) -> torch.Tensor:
            if new:  # one call per answer token: feed the last one, its position continuing the prompt's
                length = len(prompt_ids) + len(new)
                cached["output"] = model(
                    input_ids=torch.tensor([new[-1:]], device=device),
                    attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
                    position_ids=torch.tensor([[int(positions[-1]) + len(new)]], device=device),
                    past_key_values=cached["output"].past_key_values, use_cache=True)
            return cached["output"].logits[0, -1]

    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(next_logits(new).argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        if _stops(tokenizer, new):
            break
    return new


def first_number_is(value: str) -> Callable[[str], bool]:
    """A synthetic fact's answer is right when the first number it names is the value."""
    return lambda answer: re.findall(r"\d+", answer)[:1] == [value]


def own_mistake(model, tokenizer, chunks: Sequence[str], question: str, value: str, positions: PositionConfig,
                max_new_tokens: int, seed: int, index: int, fallback: str,
                is_right: Callable[[str], bool] | None = None, fallback_kind: str = "hallucinated",
                fallback_source: str = "random number (the generator answered right, or nothing)",
                ) -> tuple[str, str, str]:
    """(response, kind, source): the model's answer with the row's context at positions drawn from (seed, index)
    when it is not right (`is_right`; default: its first number is `value`) or names nothing, else `fallback`."""
    is_right = is_right or first_number_is(value)
    chunk_ids = tokenizer(list(chunks), add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    # decoder-only: the answer continues the prompt's positions, so the window keeps room for the longest answer
    tail = len(question_ids) + (0 if model.config.is_encoder_decoder else max_new_tokens + 1)
    synthesized, _ = synthesize_positions([len(c) for c in chunk_ids], tail, positions, sample_generator(seed, index))
    prompt = [t for chunk in chunk_ids for t in chunk] + question_ids
    answer = tokenizer.decode(answer_at_positions(model, tokenizer, prompt, synthesized[: len(prompt)],
                                                  max_new_tokens), skip_special_tokens=True)
    answer = answer.split("\n", 1)[0]
    if answer.strip() and not is_right(answer):
        return answer, "own_mistake", "the generator's answer at synthesised positions"
    return fallback, fallback_kind, fallback_source
