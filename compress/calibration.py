"""The one calibration loop: text in, fixed-length token batches out, then one streaming pass of the model over them.

Every scorer reads its statistics from forward hooks registered around `calibration_pass`, so statistics are
running sums over batches and no activation outlives its batch. The batches themselves are only token ids
(num_samples x seq_len integers), cheap to keep for the extra passes of iterative pruning.

Calibration data may come from a `datasets.Dataset` / `DatasetDict` (a `text` column, or an already tokenized
`input_ids` column), a directory saved by `save_to_disk` (e.g. `python -m pretrain.corpus`), text files (a
document each) and .jsonl / .json / .csv / .parquet files (a document per row, in `text_column`), alone, as a list
or in a directory. Documents are tokenized, joined with EOS and cut into windows of `seq_len` tokens.
For encoder-decoders each window is split: its first `encoder_fraction` goes to the encoder, the rest is the
decoder's target (OpenBA-V2 trains with 570 encoder / 380 decoder tokens, a 0.6 split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from core.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # rows with a `text_column`
COLUMN_HINT = "name it with --set calibration.text_column=NAME"


@dataclass
class CalibrationConfig:
    """How much calibration text the scoring pass sees. Defaults: small enough for a CPU, enough for stable ranks."""

    seq_len: int = 256
    """Tokens per sample (encoder + decoder part together for encoder-decoders). ShortGPT / Minitron use 1-4K on
    GPUs; longer samples see more long-range behaviour but cost memory in the Taylor (backward) scorer."""
    num_samples: int = 64
    """Samples in the calibration set. Wanda uses 128 x 2048 tokens; rankings of layers settle with far fewer."""
    batch_size: int = 8
    """Samples per forward pass; only affects speed and memory, not the scores (statistics are token sums)."""
    encoder_fraction: float = 0.6
    """Encoder-decoders: share of each sample fed to the encoder, the rest is the decoder target (570/950 in V2)."""
    max_tokens_per_document: int = 0
    """Cap on tokens taken from one document (0: 4 samples' worth), so a few huge files do not fill the whole set."""
    split: str = "calibration"
    """Split to read when the source is a DatasetDict (the stdlib corpus has train / calibration / validation)."""
    text_column: str = "text"
    """Column holding the text in a dataset source."""

    def __post_init__(self):
        if self.seq_len < 2:
            raise UserError(f"calibration seq_len must be at least 2, got {self.seq_len}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise UserError("calibration num_samples and batch_size must be positive")
        if not 0.0 < self.encoder_fraction < 1.0:
            raise UserError(f"calibration encoder_fraction must be between 0 and 1, got {self.encoder_fraction}")


@dataclass
class CalibrationSet:
    """Ready batches (dicts of tensors the model's forward accepts, with `labels`) and what they hold."""

    batches: list[dict[str, torch.Tensor]]
    num_tokens: int
    description: str
    encoder_decoder: bool = False
    token_masks: list[dict[str, torch.Tensor | None]] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --- reading the source ----------------------------------------------------------------------------------------
def _dataset_rows(dataset, config: CalibrationConfig) -> tuple[Iterable[Any], str, str]:
    """(rows, "text" | "ids", description) of a Dataset or DatasetDict."""
    import datasets

    name = "dataset"
    if isinstance(dataset, datasets.DatasetDict):
        split = config.split if config.split in dataset else ("train" if "train" in dataset else None)
        if split is None:
            raise UserError(f"the calibration dataset has no '{config.split}' or 'train' split (has {sorted(dataset)}); "
                            "choose one with --set calibration.split=NAME")
        dataset, name = dataset[split], f"dataset split '{split}'"
    if "input_ids" in dataset.column_names:
        return (row["input_ids"] for row in dataset.select_columns(["input_ids"])), "ids", name
    if config.text_column not in dataset.column_names:
        raise UserError(
            f"the calibration dataset has no '{config.text_column}' or 'input_ids' column (has "
            f"{dataset.column_names}); {COLUMN_HINT}")
    return (row[config.text_column] for row in dataset.select_columns([config.text_column])), "text", name


def _table_rows(file: Path) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a .jsonl / .json / .csv / .parquet file; a row that is not a record is yielded as it is
    for `_file_texts` to name."""
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as err:  # pyarrow's errors share no base class a user could act on
            raise UserError(f"calibration file {file} is not a readable parquet file: {err}") from None
        yield from enumerate(table.to_pylist(), 1)
        return
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"calibration file {file} is not UTF-8 text") from None
    if suffix == ".csv":
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may hold newlines
        for row in reader:
            yield reader.line_num, row
        return
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), 1)
        except json.JSONDecodeError as err:
            raise UserError(f"calibration file {file} is not valid JSON: {err}") from None
        return
    for number, line in enumerate(text.splitlines(), 1):  # JSON lines (what datasets' to_json writes as .json)
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"calibration file {file} line {number} is not JSON: {err.msg}") from None


def _file_texts(files: list[Path], text_column: str) -> Iterator[str]:
    for file in files:
        if file.suffix.lower() not in TABLE_SUFFIXES:
            try:
                yield file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"calibration file {file} is not UTF-8 text") from None
            continue
        for number, row in _table_rows(file):
            where = f"calibration file {file} {'row' if file.suffix.lower() == '.parquet' else 'line'} {number}"
            if not isinstance(row, dict):
                raise UserError(f"{where} is a {type(row).__name__}, not a record with a '{text_column}' field")
            if text_column not in row:
                raise UserError(f"{where} has no '{text_column}' field (has {sorted(row)[:6]}); {COLUMN_HINT}")
            value = row[text_column]
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: '{text_column}' is a {type(value).__name__}, not text")
            yield value or ""


def read_source(source, config: CalibrationConfig) -> tuple[Iterable[Any], str, str]:
    """Rows of text (or token id lists) from any supported source, plus their kind and a description."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _dataset_rows(source, config)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise UserError(f"calibration data not found: {path}")
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
            rows, kind, name = _dataset_rows(datasets.load_from_disk(str(path)), config)
            return rows, kind, f"{name} of {path}"
        if path.is_dir():
            suffixes = TEXT_SUFFIXES + TABLE_SUFFIXES
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if any(p.suffix.lower() in TEXT_SUFFIXES for p in files):
                # a folder of text documents is read as it always was: a metadata .json beside them is not data
                files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
            if not files:
                raise UserError(f"calibration directory {path} holds no text files or data files ({', '.join(suffixes)})")
            return _file_texts(files, config.text_column), "text", f"{len(files)} text files in {path}"
        return _file_texts([path], config.text_column), "text", f"file {path}"
    if isinstance(source, (list, tuple)) and all(isinstance(p, (str, Path)) for p in source):
        files = [Path(p) for p in source]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise UserError(f"calibration files not found: {', '.join(missing[:3])}")
        return _file_texts(files, config.text_column), "text", f"{len(files)} text files"
    raise UserError(f"unsupported calibration source {type(source).__name__}: give a dataset, a directory or files")


# --- checks ----------------------------------------------------------------------------------------------------
def model_vocab_size(model) -> int:
    """Rows of the input embedding: the ids the model can actually read (config.vocab_size may be stale)."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_tokenizer_matches(tokenizer, vocab_size: int) -> None:
    """A tokenizer with more ids than the model's embedding was made for another model (padding up is fine)."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_size} rows: "
            "the calibration data would be in another tokenizer; pass the tokenizer saved with the model"
        )


# --- batches ---------------------------------------------------------------------------------------------------
def token_windows(rows: Iterable[Any], kind: str, tokenizer, config: CalibrationConfig) -> list[list[int]]:
    """Documents joined with EOS and cut into `seq_len` windows; the unfinished tail is kept only if nothing else."""
    seq_len, wanted = config.seq_len, config.num_samples
    per_doc = config.max_tokens_per_document or 4 * seq_len
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    windows: list[list[int]] = []
    buffer: list[int] = []
    for row in rows:
        if kind == "ids":
            ids = [int(i) for i in row][:per_doc]
        else:
            if not row or not row.strip():
                continue
            if tokenizer is None:
                raise UserError("calibration text needs a tokenizer (none was given or found beside the model)")
            # a character is at least one token for a byte-fallback tokenizer: never tokenize more than we keep
            ids = tokenizer(row[: per_doc * 16], add_special_tokens=False)["input_ids"][:per_doc]
        if not ids:
            continue
        buffer.extend(ids)
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len and len(windows) < wanted:
            windows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(windows) >= wanted:
            break
    if not windows and len(buffer) >= 2:
        windows.append(buffer)
    return windows


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def make_batch(windows: list[list[int]], pad_id: int, encoder_decoder: bool, encoder_fraction: float) -> dict:
    """Model inputs with `labels` (-100 on padding) so every batch also gives a loss (Taylor, skip-loss)."""
    if not encoder_decoder:
        ids, mask = _pad(windows, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    cut = [max(1, min(len(w) - 1, round(len(w) * encoder_fraction))) for w in windows]
    enc, enc_mask = _pad([w[:c] for w, c in zip(windows, cut)], pad_id)
    dec, dec_mask = _pad([w[c:] for w, c in zip(windows, cut)], pad_id)
    return {"input_ids": enc, "attention_mask": enc_mask, "labels": dec.masked_fill(dec_mask == 0, -100),
            "decoder_attention_mask": dec_mask}


def batch_token_masks(batch: dict, encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """Per stack, which positions are real tokens (None when all are, so hooks can skip the masking)."""
    def simplify(mask):
        return None if bool(mask.all()) else mask.bool()

    if encoder_decoder:
        return {"encoder": simplify(batch["attention_mask"]), "decoder": simplify(batch["decoder_attention_mask"])}
    return {"decoder": simplify(batch["attention_mask"])}


def calibration_batches(source, tokenizer, seq_len: int = 256, num_samples: int = 64, batch_size: int = 8, *,
                        model=None, config: CalibrationConfig | None = None) -> CalibrationSet:
    """Token batches for the scoring pass, checked against `model` (its vocabulary, encoder-decoder or not).

    `config` overrides `seq_len`, `num_samples` and `batch_size` when given. Raises UserError on an empty source or
    one whose ids do not fit the model (another tokenizer), before any work is done.
    """
    if config is None:
        config = CalibrationConfig(seq_len=seq_len, num_samples=num_samples, batch_size=batch_size)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    vocab = model_vocab_size(model) if model is not None else None
    if vocab is not None:
        check_tokenizer_matches(tokenizer, vocab)
    rows, kind, description = read_source(source, config)
    windows = token_windows(rows, kind, tokenizer, config)
    if not windows:
        raise UserError(f"the calibration data ({description}) is empty: it gave no tokens")
    top = max(max(w) for w in windows)
    if vocab is not None and top >= vocab:
        raise UserError(
            f"calibration token id {top} does not exist in the model's vocabulary of {vocab}: "
            "the data was tokenized with another tokenizer"
        )
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else pad_id
    batches = [make_batch(windows[i : i + config.batch_size], pad_id, encoder_decoder, config.encoder_fraction)
               for i in range(0, len(windows), config.batch_size)]
    num_tokens = sum(len(w) for w in windows)
    description = f"{len(windows)} x {config.seq_len} tokens from {description}"
    masks = [batch_token_masks(b, encoder_decoder) for b in batches]
    return CalibrationSet(batches, num_tokens, description, encoder_decoder, masks)


def as_calibration_set(batches, model=None) -> CalibrationSet:
    """Accept a CalibrationSet or a plain list of batch dicts (tests, user code) and describe it uniformly."""
    if isinstance(batches, CalibrationSet):
        return batches
    batches = list(batches)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    fixed = []
    for batch in batches:
        batch = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in batch.items()}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if encoder_decoder and "decoder_attention_mask" not in batch:
            labels = batch.get("labels", batch.get("decoder_input_ids"))
            if labels is None:
                raise UserError("encoder-decoder calibration batches need labels or decoder_input_ids")
            batch["decoder_attention_mask"] = (labels != -100).long()
        if "labels" not in batch and not encoder_decoder:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        fixed.append(batch)
    if not fixed:
        raise UserError("the calibration data is empty: no batches")
    tokens = sum(int(b["attention_mask"].sum()) + int(b.get("decoder_attention_mask", torch.zeros(1)).sum())
                 for b in fixed)
    masks = [batch_token_masks(b, encoder_decoder) for b in fixed]
    return CalibrationSet(fixed, tokens, f"{len(fixed)} given batches", encoder_decoder, masks)


# --- the pass --------------------------------------------------------------------------------------------------
def calibration_pass(model, calib: CalibrationSet, on_batch: Callable[[int, dict], None] | None = None,
                     backward: bool = False, desc: str = "calibration", progress: bool = True) -> float:
    """Run `model` once over every batch (hooks collect statistics); returns the token-mean loss.

    `on_batch(i, masks)` runs before batch i so hooks know which positions are real tokens. With `backward`, the
    loss of every batch is backpropagated and gradients accumulate in `.grad` (the gradient of the summed loss).
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    context = torch.enable_grad if backward else torch.no_grad
    with context():
        for i, batch in enumerate(tqdm(calib.batches, desc=desc, disable=not progress, leave=False)):
            if on_batch is not None:
                on_batch(i, calib.token_masks[i] if calib.token_masks else {})
            inputs = {k: v.to(device) for k, v in batch.items()}
            output = model(**inputs, use_cache=False)
            loss = output.loss
            if loss is None:
                continue
            tokens = int((inputs["labels"] != -100).sum())
            if backward:
                (loss * tokens).backward()
            total += float(loss.detach()) * tokens
            count += tokens
    return total / max(count, 1)
