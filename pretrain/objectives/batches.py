"""The trainer's data: batches of objective examples cut from tokenized documents, padded or packed."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from core.errors import UserError
from pretrain.objectives.base import IGNORE_INDEX, Example, Objective
from pretrain.objectives.mixture import ObjectiveMixture


def to_features(example: Example, encoder_decoder: bool) -> dict[str, list[int]]:
    """Encoder-decoder: input_ids = inputs, labels = targets. Decoder-only: input_ids = inputs + targets with labels
    IGNORE_INDEX on the inputs (transformers shifts labels inside the model, so labels align with input_ids)."""
    if encoder_decoder:
        return {"input_ids": list(example.inputs), "labels": list(example.targets)}
    return {"input_ids": example.inputs + example.targets,
            "labels": [IGNORE_INDEX] * len(example.inputs) + list(example.targets)}


class ObjectiveBatches:
    """Batches of objective examples cut from tokenized documents; the trainer's data protocol.

    Each batch uses one objective sampled from `mixture` (so the batch's loss is that objective's loss and is
    logged under `batch["objective"]`); over many batches the objectives follow the mixture's weights. Examples
    are cut from the current document to fit the length budget (`Objective.raw_length`), so a document longer than
    one example gives several and a short one gives a short example.

    `packed=False`: one example per row, padded to the fixed lengths. `packed=True`: rows filled with several
    examples (see pretrain/packing.py); a row is closed when the objective cannot fit even its smallest example.
    Encoder-decoder lengths: `input_length` (encoder) and `target_length` (decoder) are the most a row holds;
    packed batches are cut to their longest row per side, so a batch of S-denoising (targets ~1/3 of the inputs)
    fills the encoder and a short decoder, and an X batch (targets ~ inputs) a shorter encoder and the decoder:
    one denoiser per batch is what makes both sides full. `fit_to_rows=False` keeps packed encoder-decoder batches
    at the fixed lengths instead (the slower layout, kept for benchmarks/teacher_packing.py's comparison).
    Decoder-only models use `input_length` for inputs and targets together.

    `state_dict()` holds the document position, the offset in the current document, the RNG and the mixture
    weights; `load_state_dict` continues with exactly the batches an uninterrupted run would have produced.
    """

    def __init__(self, documents, mixture: ObjectiveMixture, *, batch_size: int, input_length: int,
                 target_length: int | None = None, encoder_decoder: bool = True, packed: bool = False,
                 pad_id: int = 0, decoder_start_id: int = 0, max_spans: int | None = None, seed: int = 0,
                 fit_to_rows: bool = True):
        if isinstance(documents, (list, tuple)):
            documents = ListDocuments(documents)
        if batch_size < 1 or input_length < 1:
            raise UserError(f"batch_size and input_length must be positive, got {batch_size}, {input_length}")
        if encoder_decoder and (target_length is None or target_length < 1):
            raise UserError("encoder-decoder batches need a positive target_length")
        self.documents, self.mixture = documents, mixture
        self.batch_size, self.input_length, self.target_length = batch_size, input_length, target_length
        self.encoder_decoder, self.packed, self.fit_to_rows = encoder_decoder, packed, fit_to_rows
        self.pad_id, self.decoder_start_id, self.max_spans = pad_id, decoder_start_id, max_spans
        self.rng = np.random.default_rng(seed)
        for objective in mixture.objectives:
            if objective.raw_length(self._fits(input_length, target_length), max_spans=max_spans) == 0:
                raise UserError(f"objective {objective.name} cannot fit an example into input_length "
                                f"{input_length}" + (f" / target_length {target_length}" if encoder_decoder else ""))
        self._document: np.ndarray | None = None
        self._offset = 0
        self._document_state = copy.deepcopy(documents.state_dict())
        self.stats = {"tokens": 0, "slots": 0, "target_tokens": 0, "target_slots": 0, "batches": 0}

    def _fits(self, input_room: int, target_room: int | None):
        if self.encoder_decoder:
            return lambda i, t: i <= input_room and t <= target_room
        return lambda i, t: i + t <= input_room

    def _next_example(self, objective: Objective, input_room: int, target_room: int | None) -> Example | None:
        """An example cut from the current document that fits the room left; None if the objective cannot fit."""
        variant = objective.sample_variant(self.rng)
        fits = self._fits(input_room, target_room)
        if objective.raw_length(fits, variant, max_spans=self.max_spans) == 0:
            return None
        if self._document is None or len(self._document) - self._offset < objective.min_tokens:
            self._document_state = copy.deepcopy(self.documents.state_dict())
            self._document = next(self.documents)
            self._offset = 0
            while len(self._document) < objective.min_tokens:
                self._document_state = copy.deepcopy(self.documents.state_dict())
                self._document = next(self.documents)
        left = len(self._document) - self._offset
        n = objective.raw_length(fits, variant, limit=left, max_spans=self.max_spans)
        tokens = self._document[self._offset:self._offset + n]
        self._offset += n
        return objective.apply(tokens.tolist(), variant, self.rng)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from pretrain.packing import PackedRow, collate_packed, collate_padded, padding_stats

        objective = self.mixture.sample(self.rng)
        if not self.packed:
            features = [to_features(self._next_example(objective, self.input_length, self.target_length),
                                    self.encoder_decoder) for _ in range(self.batch_size)]
            batch = collate_padded(features, self.encoder_decoder, self.input_length, self.target_length, self.pad_id)
        else:
            rows = []
            for _ in range(self.batch_size):
                row = PackedRow()
                while True:
                    input_room = self.input_length - len(row.inputs)
                    target_room = None if not self.encoder_decoder else self.target_length - len(row.targets)
                    example = self._next_example(objective, input_room, target_room)
                    if example is None:
                        break
                    features = to_features(example, self.encoder_decoder)
                    if self.encoder_decoder:
                        row.add_encoder_decoder(features["input_ids"], features["labels"], self.decoder_start_id)
                    else:
                        row.add_decoder_only(features["input_ids"], features["labels"])
                rows.append(row)
            batch = collate_packed(rows, self.encoder_decoder, self.input_length, self.target_length, self.pad_id,
                                   fit_to_rows=self.fit_to_rows)
        for key, value in padding_stats(batch, self.pad_id).items():
            self.stats[key] += value
        self.stats["batches"] += 1
        batch["objective"] = objective.name
        return batch

    def state_dict(self) -> dict:
        return {"documents": copy.deepcopy(self._document_state), "offset": self._offset, "in_document": self._document is not None,
                "rng": self.rng.bit_generator.state, "mixture": self.mixture.state_dict(), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state["documents"])
        self._document_state = state["documents"]
        self._document, self._offset = None, state["offset"]
        if state["in_document"]:
            self._document = next(self.documents)
        self.rng.bit_generator.state = state["rng"]
        self.mixture.load_state_dict(state["mixture"])
        self.stats = dict(state["stats"])


class ListDocuments:
    """In-memory token lists as a repeating document source with a position (tests, small data)."""

    def __init__(self, documents: Sequence[Sequence[int]], repeat: bool = True):
        if not documents:
            raise UserError("no documents: the dataset is empty")
        self.documents = [np.asarray(d, dtype=np.int64) for d in documents]
        self.repeat, self.index = repeat, 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.index >= len(self.documents) and not self.repeat:
            raise StopIteration
        document = self.documents[self.index % len(self.documents)]
        self.index += 1
        return document

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def objective_batches(documents, mixture: ObjectiveMixture, **options) -> ObjectiveBatches:
    """Turn tokenized documents (a list of token lists, or a resumable source from pretrain/data.py) into the
    trainer's batch iterator; `options` as `ObjectiveBatches`."""
    return ObjectiveBatches(documents, mixture, **options)


def batches_per_objective(documents: Sequence[Sequence[int]], mixture: ObjectiveMixture, count: int,
                          **options) -> dict[str, list[dict]]:
    """`count` fixed batches per objective of `mixture`, all cut from the same documents with the same seed: the
    validation set `DynamicUL2` measures each denoiser on (fixed, so losses are comparable across evaluations)."""
    if count < 1:
        raise UserError(f"need at least one validation batch per objective, got {count}")
    out = {}
    for objective in mixture.objectives:
        batches = ObjectiveBatches(ListDocuments(documents), ObjectiveMixture([objective]), **options)
        out[objective.name] = [next(batches) for _ in range(count)]
    return out
