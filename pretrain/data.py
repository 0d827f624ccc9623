"""Documents for training: local files or a saved corpus through `datasets`, tokenized, mixed by source.

Everything here yields *tokenized documents* (numpy int32 arrays) and has `state_dict()` / `load_state_dict()`, so a
batch iterator built on top (`objectives.ObjectiveBatches`) resumes exactly where it stopped:

- `TokenizedDocuments`: one dataset (map-style or streaming), in a seeded order per epoch, repeating or not.
- `SourceMixture`: several of them mixed by *token* share (ProLong: 30% code repositories, 30% books, 3%
  textbooks, 37% short data): the next document comes from the source furthest behind its share, which is
  deterministic and holds the shares exactly over any window, unlike sampling documents by weight.

    documents = load_documents(DataConfig(paths=["runs/corpus"], source_weights={"code": 0.6, "prose": 0.4}), tok)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np

from core.errors import UserError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
                 ".csv": "csv"}


@dataclass
class DataConfig:
    """Where the training text comes from and how it is mixed."""

    paths: list[str] = field(default_factory=list)
    """Local files (.jsonl/.json, .txt, .parquet, .csv; one kind per config) or one directory saved by
    `datasets.save_to_disk` (e.g. `python -m pretrain.corpus --out DIR`). Empty: the embedded stdlib corpus."""
    split: str = "train"
    """Split of a saved DatasetDict (the corpus has train / calibration / validation)."""
    text_column: str = "text"
    """Column holding the text (`text` files give one row per line in this column)."""
    source_column: str = "source"
    """Column naming each row's source, used by `source_weights` (the corpus: "code" or "prose")."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Token share per source, e.g. ProLong's {"code": 0.3, "books": 0.3, "textbooks": 0.03, "short": 0.37}.
    Empty: one stream in dataset order, sources in their natural proportion."""
    streaming: bool = False
    """Read files lazily (`datasets` streaming) for corpora larger than memory. Order is file order (no shuffle
    buffer: its contents cannot be saved, so resume would not be exact)."""
    shuffle: bool = True
    """Map-style datasets only: a seeded permutation of documents per epoch."""
    append_eos: bool = False
    """Append eos to every document: right for causal LM on packed documents (the model learns where a document
    ends); UL2 denoisers add their own eos to targets, as T5 does."""
    min_tokens: int = 1
    """Documents with fewer tokens are skipped."""
    seed: int = 0


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file())


def load_text_dataset(paths: list[str] | str, split: str = "train", streaming: bool = False):
    """A `datasets` Dataset (or IterableDataset when streaming) from local files or a saved dataset directory.

    UserError before anything runs: missing paths, unknown file kinds, mixed kinds, a missing split."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("no data paths given")
    resolved = [Path(p) for p in paths]
    missing = [str(p) for p in resolved if not p.exists()]
    if missing:
        raise UserError(f"data path not found: {', '.join(missing)}")
    if len(resolved) == 1 and _is_saved_dataset(resolved[0]):
        loaded = datasets.load_from_disk(str(resolved[0]))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{resolved[0]} has no split {split!r}; it has {sorted(loaded)} (the config names "
                                "the splits it reads: data.split, validation_split)")
            loaded = loaded[split]
        if len(loaded) == 0:
            raise UserError(f"{resolved[0]} ({split}) is empty")
        return loaded.to_iterable_dataset() if streaming else loaded
    files = []
    for path in resolved:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    kinds = {FILE_BUILDERS.get("".join(p.suffixes[-1:]).lower()) for p in files}
    if None in kinds or not files:
        bad = [str(p) for p in files if p.suffix.lower() not in FILE_BUILDERS] or paths
        raise UserError(f"unsupported data files {bad[:3]}: use {sorted(FILE_BUILDERS)} or a saved dataset dir")
    if len(kinds) > 1:
        raise UserError(f"data files mix kinds {sorted(kinds)}; give one kind per config")
    files = [p for p in files if p.stat().st_size > 0]  # datasets' json reader fails on an empty file
    if not files:
        raise UserError(f"the data files in {', '.join(paths)} are empty")
    try:  # a bad row surfaces here (streaming: when it is read) as datasets' wrapper of the reader's error
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train",
                                     streaming=streaming)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"cannot read the data files {', '.join(map(str, paths))}: {reason}") from None


class TokenizedDocuments:
    """Token arrays of one dataset's documents, in a seeded order per epoch; `repeat` cycles epochs forever.

    A dataset with an `input_ids` column is used as already tokenized. Map-style datasets keep their token
    arrays in memory after the first epoch (int32, ~4 bytes per token).
    """

    def __init__(self, dataset, tokenizer=None, *, text_column: str = "text", append_eos: bool = False,
                 min_tokens: int = 1, shuffle: bool = True, repeat: bool = True, seed: int = 0, name: str = "data"):
        self.dataset, self.tokenizer, self.name = dataset, tokenizer, name
        self.text_column, self.append_eos, self.min_tokens = text_column, append_eos, min_tokens
        self.shuffle, self.repeat, self.seed = shuffle, repeat, seed
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        columns = dataset.column_names or []
        self.pretokenized = "input_ids" in columns
        if not self.pretokenized:
            if tokenizer is None:
                raise UserError(f"{name}: a tokenizer is needed for text data")
            if columns and text_column not in columns:
                raise UserError(f"{name}: no column {text_column!r}; columns are {columns} (name the text column "
                                "with data.text_column)")
        if not self.streaming and len(dataset) == 0:
            raise UserError(f"{name}: the dataset is empty")
        self.epoch, self.index = 0, 0
        self._cache: dict[int, np.ndarray] = {}
        self._order, self._order_epoch = np.arange(0), -1
        self._stream: Iterator | None = None
        self._check_not_empty()

    def _check_not_empty(self) -> None:
        if self.streaming:
            if next(iter(self.dataset), None) is None:
                raise UserError(f"{self.name}: the dataset is empty")

    def tokenize(self, row: dict) -> np.ndarray:
        if self.pretokenized:
            ids = list(row["input_ids"])
        else:
            ids = self.tokenizer(row[self.text_column], add_special_tokens=False)["input_ids"]
        if self.append_eos:
            ids = ids + [self.tokenizer.eos_token_id if self.tokenizer is not None else 1]
        return np.asarray(ids, dtype=np.int32)

    def _permutation(self) -> np.ndarray:
        n = len(self.dataset)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        for _ in range(1 << 30):
            tokens = self._next_map() if not self.streaming else self._next_stream()
            if len(tokens) >= self.min_tokens:
                return tokens
        raise StopIteration  # pragma: no cover

    def _next_map(self) -> np.ndarray:
        if self.index >= len(self.dataset):
            if not self.repeat:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._permutation(), self.epoch
        row = int(self._order[self.index])
        self.index += 1
        if row not in self._cache:
            self._cache[row] = self.tokenize(self.dataset[row])
        return self._cache[row]

    def _next_stream(self) -> np.ndarray:
        if self._stream is None:
            self._stream = iter(self.dataset)
        try:
            row = next(self._stream)
        except StopIteration:
            if not self.repeat:
                raise
            self.epoch += 1
            self.dataset.set_epoch(self.epoch)
            self._stream = iter(self.dataset)
            row = next(self._stream)
        self.index += 1
        return self.tokenize(row)

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "index": self.index}
        if self.streaming:
            state["stream"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        if self.streaming:
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict(state["stream"])
            self._stream = None


class SourceMixture:
    """Documents from several sources at fixed *token* shares: each next document comes from the source with the
    largest deficit `share * total - taken`, so the shares hold exactly up to one document."""

    def __init__(self, sources: dict[str, TokenizedDocuments], weights: dict[str, float]):
        unknown = sorted(set(weights) - set(sources))
        if unknown:
            raise UserError(f"source weights name unknown sources {unknown}; sources are {sorted(sources)}")
        values = [float(w) for w in weights.values()]
        if any(w < 0 for w in values) or sum(values) <= 0:
            raise UserError(f"source weights must be non-negative and sum to a positive number, got {weights}")
        total = sum(values)
        self.sources = {name: sources[name] for name, w in weights.items() if w > 0}
        self.shares = {name: float(weights[name]) / total for name in self.sources}
        self.taken = {name: 0 for name in self.sources}

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        total = sum(self.taken.values())
        name = max(self.sources, key=lambda n: (self.shares[n] * total - self.taken[n], self.shares[n]))
        tokens = next(self.sources[name])
        self.taken[name] += len(tokens)
        return tokens

    def token_shares(self) -> dict[str, float]:
        total = max(sum(self.taken.values()), 1)
        return {name: taken / total for name, taken in self.taken.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"taken": dict(self.taken), "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = dict(state["taken"])
        for name, source_state in state["sources"].items():
            self.sources[name].load_state_dict(source_state)


def load_documents(config: DataConfig, tokenizer, repeat: bool = True, dataset=None):
    """Tokenized documents per `config` (or of `dataset` when given): one stream, or a `SourceMixture`."""
    if dataset is None:
        if config.paths:
            dataset = load_text_dataset(config.paths, config.split, config.streaming)
        else:
            from pretrain.corpus import build_corpus

            dataset = build_corpus()[config.split]
            dataset = dataset.to_iterable_dataset() if config.streaming else dataset
    options = dict(text_column=config.text_column, append_eos=config.append_eos, min_tokens=config.min_tokens,
                   shuffle=config.shuffle, repeat=repeat, seed=config.seed)
    if not config.source_weights:
        return TokenizedDocuments(dataset, tokenizer, name=config.split, **options)
    columns = dataset.column_names or []
    if config.source_column not in columns:
        raise UserError(f"source_weights need a {config.source_column!r} column; columns are {columns}")
    sources = {}
    for name in config.source_weights:
        subset = dataset.filter(lambda row, n=name: row[config.source_column] == n)
        sources[name] = TokenizedDocuments(subset, tokenizer, name=f"{config.split}/{name}", **options)
    return SourceMixture(sources, config.source_weights)
