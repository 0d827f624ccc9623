"""Preference rows -> token batches with synthesised positions, iterated with a position that resumes exactly.

Each row is tokenized once: its context chunks one by one (so chunk boundaries are exact for position synthesis),
the question, and its 1 + M responses (EOS appended). Every row is checked before training: the context must fit
`position.max_chunks` chunks of `position.chunk_size`, the responses `max_response_tokens` (or are cut to it when
`truncate_responses`, which is counted), and everything the window. Errors name the row.

A batch (see align/packing.py) carries the prompt (context + question) as `input_ids` / `attention_mask` /
`position_ids` and the responses as `response_ids` / `response_mask`. Positions are drawn per (row, epoch) from a
seeded generator, so a resumed run sees the same positions, and each epoch sees new ones.

Decoder-only: the prompt's positions come from `synthesize_positions(chunks, question + longest response)`, so the
longest response ends on the window's last position. Encoder-decoder: the prompt (encoder) gets the synthesised
positions with the question at the window's end; responses are decoded from position 0 and must fit the window.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from align.data import check_rows
from align.positions import PositionConfig, check_fits, sample_generator, synthesize_positions
from core.errors import UserError


@dataclasses.dataclass
class BatchConfig:
    """How rows become batches."""

    batch_size: int = 1
    """Rows per micro-batch. LOGO: 64 samples per step as 8 GPUs x 1 row x 8 accumulation steps."""
    max_response_tokens: int = 512
    """Longest response (EOS included); the released code samples at most 512 new tokens."""
    truncate_responses: bool = False
    """Cut longer responses to max_response_tokens (counted in `truncated_responses`) instead of failing."""
    append_eos: bool = True
    """End every response with EOS so the model learns to stop."""
    shuffle: bool = True
    """Visit rows in a seeded random order, a new one each epoch."""
    seed: int = 0


@dataclasses.dataclass
class EncodedRow:
    row_id: str
    chunks: list[list[int]]
    question: list[int]
    responses: list[list[int]]


class PreferenceBatches:
    """Iterable of preference batches over a dataset of rows (`align.data` format), for `pretrain.trainer.Trainer`."""

    def __init__(self, rows, tokenizer, position: PositionConfig, config: BatchConfig, responses: int,
                 encoder_decoder: bool, rank: int = 0, world: int = 1):
        check_rows(rows, num_rejected=max(responses - 1, 0))
        if config.batch_size < 1:
            raise UserError("batch_size must be at least 1")
        self.rank, self.world = rank, world
        self.position, self.config, self.responses = position, config, responses
        self.encoder_decoder = encoder_decoder
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        if config.append_eos and self.eos_id is None:
            raise UserError("append_eos needs a tokenizer with an EOS token")
        self.truncated = 0
        self.rows = [self._encode(row, tokenizer) for row in rows]
        if len(self) == 0:
            raise UserError(f"{len(self.rows)} rows make fewer batches of {config.batch_size} than the {world} "
                            "processes: lower batch_size or use fewer processes")
        self.epoch, self.next_batch = 0, 0

    # ------------------------------------------------------------------ encoding and checks

    def _encode(self, row: dict, tokenizer) -> EncodedRow:
        def ids(texts: Sequence[str]) -> list[list[int]]:
            return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

        row_id = str(row.get("id", "?"))
        responses = ids(row["responses"][: self.responses])
        if self.config.append_eos:
            responses = [r + [self.eos_id] for r in responses]
        limit = self.config.max_response_tokens
        for i, response in enumerate(responses):
            if len(response) > limit:
                if not self.config.truncate_responses:
                    raise UserError(f"row {row_id}: response {i} has {len(response)} tokens, more than "
                                    f"max_response_tokens={limit}; raise it or set truncate_responses")
                responses[i] = response[:limit]
                self.truncated += 1
            if not responses[i]:
                raise UserError(f"row {row_id}: response {i} is empty after tokenization")
        encoded = EncodedRow(row_id, ids(row["chunks"]), ids([row["question"]])[0], responses)
        try:
            check_fits(self.position, [len(c) for c in encoded.chunks], self._tail(encoded))
            if self.encoder_decoder and max(map(len, responses)) > self.position.window:
                raise UserError(f"a response of {max(map(len, responses))} tokens exceeds the window "
                                f"{self.position.window}")
        except UserError as err:
            raise UserError(f"row {row_id}: {err}") from None
        return encoded

    def _tail(self, row: EncodedRow) -> int:
        """Tokens after the context that the window must hold: the question, plus the longest response when the
        responses continue the same positions (decoder-only)."""
        return len(row.question) + (0 if self.encoder_decoder else max(map(len, row.responses)))

    # ------------------------------------------------------------------ batches

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        rows = [self.rows[i] for i in indices]
        prompts, positions, strategies = [], [], []
        for index, row in zip(indices, rows):
            prompt = [t for chunk in row.chunks for t in chunk] + row.question
            generator = sample_generator(self.config.seed, index, epoch)
            synthesized, strategy = synthesize_positions([len(c) for c in row.chunks], self._tail(row),
                                                         self.position, generator)
            prompts.append(prompt)
            positions.append(synthesized[: len(prompt)])
            strategies.append(strategy)
        width = max(map(len, prompts))
        length = max(len(r) for row in rows for r in row.responses)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        position_ids = torch.zeros(batch, width, dtype=torch.long)
        response_ids = torch.full((batch, self.responses, length), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros(batch, self.responses, length, dtype=torch.long)
        for b, (prompt, synthesized, row) in enumerate(zip(prompts, positions, rows)):
            input_ids[b, : len(prompt)] = torch.tensor(prompt)
            attention_mask[b, : len(prompt)] = 1
            position_ids[b, : len(prompt)] = synthesized
            for i, response in enumerate(row.responses):
                response_ids[b, i, : len(response)] = torch.tensor(response)
                response_mask[b, i, : len(response)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "response_ids": response_ids, "response_mask": response_mask,
                "row_ids": [row.row_id for row in rows], "position_strategy": strategies}

    def order(self, epoch: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def batch_rows(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch: under several processes (RANK/WORLD_SIZE), consecutive batches of the
        shuffled order go to consecutive ranks, so one step of all ranks reads what one process would read with a
        `world` times larger batch; the last batches that cannot give every rank one are left out of that epoch."""
        order, size = self.order(epoch), self.config.batch_size
        batches = [order[start:start + size] for start in range(0, len(order), size)]
        if self.world == 1:
            return batches
        return [batches[group * self.world + self.rank] for group in range(len(batches) // self.world)]

    def __len__(self) -> int:
        batches = (len(self.rows) + self.config.batch_size - 1) // self.config.batch_size
        return batches if self.world == 1 else batches // self.world

    def __iter__(self):
        batches = self.batch_rows(self.epoch)
        while self.next_batch < len(self):
            indices = batches[self.next_batch]
            batch = self.collate(indices, self.epoch)
            self.next_batch += 1
            yield batch
        self.epoch, self.next_batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])

    def max_position(self) -> int:
        """The largest position id any batch can carry (the window's last position, or the plain length)."""
        if self.position.synthesize:
            return self.position.window - 1
        return max(sum(map(len, r.chunks)) + self._tail(r) for r in self.rows) - 1


class WithTextBatches:
    """Preference batches, each carrying the next plain-text batch under "text" (`align.logo.TextRegulariser`).

    The text batches cycle on their own (a new shuffled epoch when they run out), and both positions are part of the
    state, so a resumed run sees the same pairs of batches."""

    def __init__(self, preference: PreferenceBatches, text: PreferenceBatches):
        self.preference, self.text = preference, text
        self._text_iterator = None

    def _next_text(self) -> dict[str, Any]:
        for _ in range(2):  # a finished epoch ends one iterator; the next one starts the new epoch
            if self._text_iterator is None:
                self._text_iterator = iter(self.text)
            try:
                return next(self._text_iterator)
            except StopIteration:
                self._text_iterator = None
        raise UserError("the text regulariser's data yields no batch")

    def __len__(self) -> int:
        return len(self.preference)

    def __iter__(self):
        for batch in self.preference:
            yield {**batch, "text": self._next_text()}

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"preference": self.preference.state_dict(), "text": self.text.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self.preference.load_state_dict(state["preference"])
        self.text.load_state_dict(state["text"])
        self._text_iterator = None

    def max_position(self) -> int:
        return max(self.preference.max_position(), self.text.max_position())
