"""Vocabulary pruning (OpenBA-V2's last stage, 250K -> ~110K tokens): keep the tokens a corpus uses, slice the
embedding and LM head (and its bias), and rewrite the tokenizer so that kept tokens get ids 0..K-1 in their old order.

Steps, each a public function: `count_tokens` streams a corpus through the original tokenizer; `select_tokens` keeps
every required token (specials, sentinels, mode tokens, byte pieces, the alphabet: `tokenizer_surgery.required_tokens`)
plus the most frequent others, up to `keep` ids or until `coverage` of the corpus tokens is covered (BPE tokens bring
the symbols of their merge derivation); `slice_vocabulary` cuts the model; `tokenizer_surgery.write_pruned_tokenizer`
rewrites the tokenizer. No training follows (as in the paper).

Padding rows. The model's vocabulary is padded to a multiple of `pad_to` (128 as in OpenBA-V2) with rows that no
tokenizer output can reach (ids K..P-1): their input embedding is zero and their LM-head weight is zero. When the head
has a bias (OpenBA) the padding bias is `padding_logit_bias` (-1e4), so their probability underflows to exactly 0 in
fp32/bf16/fp16 and the softmax over the kept tokens is unchanged. A bias-free head (Llama, Qwen2, Mistral, GPT-NeoX,
T5) cannot be masked in the weights: the padding logits are exactly 0 and take some probability mass, so their ids
are added to `generation_config.suppress_tokens` (generation never emits them) and the summary says so; use
`pad_to=1` for such models when exact log-likelihoods matter more than aligned shapes.

    python -m compress.vocab --model runs/s5 --corpus runs/corpus --keep 110000 --out runs/vocab
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from core.cli import command
from core.errors import UserError
from core.kind import Input, StageKind, execute, register_kind
from core.stage import Manifest, Stage, check_output_location, run_stage
from core.table import format_table, human_count
from compress.tokenizer_surgery import MergeClosure, TokenizerFiles, read_tokenizer_files, required_tokens, \
    write_pruned_tokenizer

SCORES_DIR = "scores"  # inside the output checkpoint: not *.safetensors at top level, which loaders take for weights
COUNTS_NAME = "tokens"  # the ImportanceScores name for token counts (compress/scoring.py): higher = keep
TEXT_FILE_SUFFIXES = (".txt", ".md", ".py", ".rst")
DATA_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class VocabConfig:
    """How the vocabulary is pruned. Exactly one of `keep` and `coverage` is set."""

    keep: int | None = None
    """Tokenizer ids kept, required tokens included (OpenBA-V2: ~110,000 of 250,100). Set it to size the embedding
    exactly; prefer `coverage` when the corpus decides how many tokens matter."""
    coverage: float | None = None
    """Keep the fewest tokens whose corpus counts reach this share of all counted tokens (e.g. 0.999). 1.0 keeps
    every token the corpus uses."""
    pad_to: int = 128
    """Pad the model's vocabulary rows to a multiple of this (OpenBA-V2: 128, for tensor-core friendly GEMMs and
    tensor-parallel splits); 1 pads nothing; padding rows are zero: where the LM head has a bias (OpenBA) they get
    the bias padding_logit_bias (-1e4): probability 0; where it has none (T5, Llama, Qwen2, Mistral, GPT-NeoX) they
    get logit 0, so they take probability mass in the softmax unless suppressed (generation suppresses them, scoring
    does not): exact log-likelihoods need --pad-to 1. The module docstring says more."""
    padding_logit_bias: float = -1e4
    """LM-head bias of padding rows when the head has a bias: exp(-1e4) is 0 in every float type, so they get no
    probability; finite so that no NaN can appear (-inf * 0). Bias-free heads cannot be masked this way."""
    corpus: str | None = None
    """The counting corpus (saved dataset / DatasetDict dir, text files, jsonl/parquet); recorded in the manifest.
    None when a dataset is passed in memory or counts are reused."""
    counts: str | None = None
    """Reuse token counts saved by an earlier run (its `<out>/scores` directory) instead of counting."""
    tokenizer: str | None = None
    """Tokenizer directory, if not the model directory."""
    split: str = "train"
    """Split of a DatasetDict corpus that is counted."""
    text_column: str = "text"
    """Column holding raw text. A corpus without it but with `input_ids` is counted as pre-tokenized ids."""
    max_documents: int | None = None
    """Count at most this many documents (rows; for text files, chunks); None counts all."""
    batch_size: int = 64
    """Documents tokenized per call (the fast tokenizer parallelises inside a batch)."""
    check_split: str = "validation"
    """Split of a DatasetDict used to measure how much text keeps its segmentation; when the corpus has no such
    split, the first counted documents are used."""
    check_documents: int = 100
    """Documents in that check (each is encoded twice)."""
    keep_tokens: list[str] = field(default_factory=list)
    """Token strings always kept besides the automatic ones (e.g. a chat template's markers)."""
    keep_alphabet: bool = True
    """For tokenizers WITHOUT byte fallback (mT5's SentencePiece, WordPiece, character-level BPE): keep every
    single-character piece, so text the original could spell never degrades to <unk>. False frees those ids for
    frequent tokens when the corpus defines the domain (rare scripts then become <unk>). Byte pieces and the
    byte-level BPE alphabet are kept regardless."""
    max_fallback_fraction: float = 0.5
    """Stop with an error when more than this share of counted tokens are <unk> or byte pieces: the corpus is in a
    script or tokenizer this vocabulary does not cover, and its counts would select nothing useful."""

    def __post_init__(self):
        if self.keep is not None and self.coverage is not None:
            raise UserError("give only one of keep (a token count) and coverage (a share of corpus tokens)")
        if self.keep is not None and self.keep < 1:
            raise UserError(f"keep must be a positive number of tokens, got {self.keep}")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise UserError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.pad_to < 1:
            raise UserError(f"pad_to must be at least 1, got {self.pad_to}")
        if self.batch_size < 1 or self.check_documents < 0:
            raise UserError("batch_size must be positive and check_documents not negative")


# --- corpus --------------------------------------------------------------------------------------------------------
@dataclass
class CorpusSource:
    """Batches of documents: texts (list[str]) or, for a pre-tokenized corpus, id lists."""

    batches: Iterable[list]
    kind: str  # "text" or "ids"
    total: int | None  # documents, when known (progress bar)
    description: str
    check_texts: list[str] | None = None  # a held-out split for the segmentation check


def open_corpus(corpus: Any, config: VocabConfig, description: str = "") -> CorpusSource:
    """A streaming view of `corpus`: a path, a (Iterable)Dataset, a DatasetDict or a list of strings."""
    import datasets

    if isinstance(corpus, (str, Path)):
        return _open_path(Path(corpus), config)
    if isinstance(corpus, datasets.DatasetDict):
        if config.split not in corpus:
            raise UserError(f"the corpus has no split '{config.split}' (it has {sorted(corpus)}); set split=")
        source = _open_dataset(corpus[config.split], config, f"{description or 'corpus'} split '{config.split}'")
        check = corpus[config.check_split] if config.check_split in corpus else None
        if check is not None and config.check_split != config.split and config.text_column in check.column_names:
            source.check_texts = list(check.select(range(min(len(check), config.check_documents)))[config.text_column])
        return source
    if isinstance(corpus, (datasets.Dataset, datasets.IterableDataset)):
        return _open_dataset(corpus, config, "dataset")
    if isinstance(corpus, (list, tuple)) and all(isinstance(t, str) for t in corpus):
        texts = list(corpus)[: config.max_documents]
        batches = [texts[i : i + config.batch_size] for i in range(0, len(texts), config.batch_size)]
        return CorpusSource(batches, "text", len(texts), f"{len(texts)} texts")
    raise UserError(f"cannot read a corpus from a {type(corpus).__name__}: give a path, a dataset or a list of texts")


def _open_path(path: Path, config: VocabConfig) -> CorpusSource:
    import datasets

    if not path.exists():
        raise UserError(f"corpus path does not exist: {path}")
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return open_corpus(datasets.load_from_disk(str(path)), config, str(path))
    if path.is_dir() and (path / "state.json").is_file():
        return _open_dataset(datasets.load_from_disk(str(path)), config, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    data = [p for p in files if p.suffix in DATA_FILE_FORMATS]
    texts = [p for p in files if p.suffix in TEXT_FILE_SUFFIXES]
    if data:
        formats = {DATA_FILE_FORMATS[p.suffix] for p in data}
        if len(formats) > 1:
            raise UserError(f"{path} mixes data formats {sorted(formats)}; point --corpus at one kind of file")
        stream = datasets.load_dataset(formats.pop(), data_files=[str(p) for p in data], split="train", streaming=True)
        return _open_dataset(stream, config, str(path))
    if texts:
        return CorpusSource(_text_file_batches(texts, config), "text", None, f"{len(texts)} text files")
    raise UserError(f"{path} holds no corpus: expected a saved dataset, {'/'.join(TEXT_FILE_SUFFIXES)} text files "
                    f"or {'/'.join(DATA_FILE_FORMATS)} data files")


def _text_file_batches(paths: list[Path], config: VocabConfig, chunk_chars: int = 100_000) -> Iterator[list[str]]:
    """Each file streamed in chunks of whole lines (about `chunk_chars`), so a huge file never sits in memory.
    Segmentation at a chunk edge can differ from the whole file's, which moves counts negligibly."""

    def chunks() -> Iterator[str]:
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines, size = [], 0
                for line in handle:
                    lines.append(line)
                    size += len(line)
                    if size >= chunk_chars:
                        yield "".join(lines)
                        lines, size = [], 0
                if lines:
                    yield "".join(lines)

    limited = itertools.islice(chunks(), config.max_documents)
    while batch := list(itertools.islice(limited, config.batch_size)):
        yield batch


def _open_dataset(dataset, config: VocabConfig, description: str) -> CorpusSource:
    columns = dataset.column_names or []
    if config.text_column in columns:
        kind, column = "text", config.text_column
    elif "input_ids" in columns:
        kind, column = "ids", "input_ids"
    else:
        raise UserError(f"the corpus ({description}) has no '{config.text_column}' or 'input_ids' column "
                        f"(columns: {columns}); set text_column=")
    try:
        total = len(dataset)
    except TypeError:  # an IterableDataset
        total = None
    if total is not None and config.max_documents is not None:
        total = min(total, config.max_documents)

    def batches() -> Iterator[list]:
        seen = 0
        for batch in dataset.select_columns([column]).iter(batch_size=config.batch_size):
            rows = batch[column]
            if config.max_documents is not None:
                rows = rows[: config.max_documents - seen]
            seen += len(rows)
            if rows:
                yield rows
            if config.max_documents is not None and seen >= config.max_documents:
                return

    return CorpusSource(batches(), kind, total, description)


# --- counting ------------------------------------------------------------------------------------------------------
@dataclass
class TokenCounts:
    """How often each tokenizer id occurs in the corpus (`counts[i]`), with what was counted."""

    counts: torch.Tensor  # [vocab]: int64 when counted here, float64 when reloaded from scores
    documents: int
    description: str = ""
    tokenizer_sha256: str = ""

    @property
    def total(self) -> int:
        return int(round(float(self.counts.sum())))


def tokenizer_fingerprint(files: TokenizerFiles) -> str:
    """Hash of the token strings in id order: counts are reusable exactly when this matches."""
    return hashlib.sha256(json.dumps(files.tokens()).encode()).hexdigest()


def count_tokens(tokenizer, corpus: Any, config: VocabConfig, files: TokenizerFiles | None = None,
                 progress: bool = True) -> TokenCounts:
    """Stream the corpus through `tokenizer` (no special tokens added) and count ids, with a progress bar.

    Raises UserError for an empty corpus, ids beyond this tokenizer, or a corpus this tokenizer cannot have made.
    """
    source = corpus if isinstance(corpus, CorpusSource) else open_corpus(corpus, config)
    vocab = len(tokenizer)
    counts = torch.zeros(vocab, dtype=torch.long)
    documents = 0
    samples: list[list[int]] = []
    check: list[str] = []
    with tqdm(total=source.total, desc="count tokens", unit="doc", disable=None if progress else True) as bar:
        for batch in source.batches:
            if source.kind == "text":
                ids = tokenizer(list(batch), add_special_tokens=False)["input_ids"]
                if source.check_texts is None and len(check) < config.check_documents:
                    check += list(batch[: config.check_documents - len(check)])
            else:
                ids = [list(map(int, row)) for row in batch]
                samples += ids[: max(0, 16 - len(samples))]
                if source.check_texts is None and len(check) < config.check_documents:
                    wanted = ids[: config.check_documents - len(check)]
                    check += tokenizer.batch_decode(wanted, skip_special_tokens=True)
            flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64))
            if len(flat) and (flat.min() < 0 or flat.max() >= vocab):
                raise UserError(f"the corpus holds token id {int(flat.max())} but this tokenizer has {vocab} ids: "
                                "it was tokenized with another tokenizer")
            counts += torch.bincount(flat, minlength=vocab)
            documents += len(batch)
            bar.update(len(batch))
    if documents == 0 or counts.sum() == 0:
        raise UserError(f"the corpus ({source.description}) is empty: no tokens to count")
    if samples:
        _check_same_tokenizer(tokenizer, samples)
    else:
        _check_fallback_share(tokenizer, counts, config)
    if source.check_texts is None:
        source.check_texts = check
    fingerprint = tokenizer_fingerprint(files) if files is not None else ""
    return TokenCounts(counts, documents, source.description, fingerprint)


def _check_same_tokenizer(tokenizer, samples: list[list[int]]) -> None:
    """Ids made by this tokenizer survive decode -> encode nearly unchanged; another tokenizer's ids do not."""
    overlaps = []
    for ids in samples:
        again = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
        common = sum((Counter(ids) & Counter(again)).values())
        overlaps.append(common / max(len(ids), len(again), 1))
    if sum(overlaps) / len(overlaps) < 0.5:
        raise UserError(f"the corpus' input_ids do not re-encode to themselves with this tokenizer (overlap "
                        f"{sum(overlaps) / len(overlaps):.0%}): it was tokenized with another tokenizer")


def _check_fallback_share(tokenizer, counts: torch.Tensor, config: VocabConfig) -> None:
    vocab = tokenizer.get_vocab()
    fallback = [i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")]
    if tokenizer.unk_token_id is not None:
        fallback.append(tokenizer.unk_token_id)
    share = float(counts[fallback].sum()) / max(int(counts.sum()), 1) if fallback else 0.0
    if share > config.max_fallback_fraction:
        raise UserError(f"{share:.0%} of the corpus' tokens are <unk> or byte fallback: the corpus is not in this "
                        f"tokenizer's languages (raise max_fallback_fraction to count it anyway)")


def save_token_counts(counts: TokenCounts, directory: str | Path) -> Path:
    """Save as importance scores (`compress.scoring.ImportanceScores`, name `tokens`, higher = keep), reusable with
    `counts=`. The scores format stores float32: counts above 2**24 lose their last bits there (24-bit mantissa), which
    can reorder near-ties on reuse; the exact total and document count are kept in the meta."""
    from compress.scoring import ImportanceScores

    meta = {"scorers": {COUNTS_NAME: "frequency"}, "total_tokens": counts.total, "documents": counts.documents,
            "corpus": counts.description, "tokenizer_sha256": counts.tokenizer_sha256}
    return ImportanceScores({COUNTS_NAME: counts.counts}, meta).save(directory)


def load_token_counts(path: str | Path, files: TokenizerFiles | None = None) -> TokenCounts:
    """Token scores saved by `save_token_counts` or `compress.score` (a scores directory), checked against the
    tokenizer they will select from."""
    from compress.scoring import ImportanceScores

    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise UserError(f"no token counts at {path}")
    scores = ImportanceScores.load(directory)
    counts = scores[COUNTS_NAME].double()
    loaded = TokenCounts(counts, int(scores.meta.get("documents", 0)), scores.meta.get("corpus", str(directory)),
                         scores.meta.get("tokenizer_sha256", ""))
    if files is not None:
        digest = loaded.tokenizer_sha256
        if len(counts) != len(files) or (digest and digest != tokenizer_fingerprint(files)):
            raise UserError(f"the counts in {directory} were made with another tokenizer "
                            f"({len(counts)} ids vs {len(files)})")
    if not torch.isfinite(counts).all() or (counts < 0).any() or loaded.total == 0:
        raise UserError(f"the token counts in {directory} must be finite, non-negative and not all zero")
    return loaded


# --- selection -----------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """The kept ids (sorted: new id = position), why the forced ones are there, and the corpus coverage."""

    keep: list[int]
    required: dict[str, list[int]]
    coverage: float
    added_for_merges: int = 0


def select_tokens(counts: TokenCounts, files: TokenizerFiles, required: dict[str, list[int]],
                  keep: int | None = None, coverage: float | None = None) -> Selection:
    """Required ids first, then others by count (ties: lower id, i.e. higher SentencePiece score / earlier BPE merge).

    With `keep`, stop at that many ids; with `coverage`, stop once the kept ids cover that share of counted tokens
    (tokens never seen are never added). A BPE token is added only together with its merge derivation, and is
    skipped when that would not fit in `keep`.
    """
    tokens = files.tokens()
    n = len(tokens)
    if len(counts.counts) != n:
        raise UserError(f"token counts cover {len(counts.counts)} ids but the tokenizer has {n}")
    closure = MergeClosure(files) if files.model_type == "BPE" else None

    def needs(i: int) -> set[int]:
        return closure.needed(i, tokens) if closure is not None else {i}

    kept: set[int] = set()
    for ids in required.values():
        for i in ids:
            kept |= needs(i)
    forced = len(kept)
    if keep is not None and keep < forced:
        reasons = ", ".join(f"{reason} {len(ids)}" for reason, ids in required.items())
        raise UserError(f"keep={keep} is fewer than the {forced} tokens that must stay ({reasons}): "
                        f"keep at least {forced}")
    count_list = counts.counts.tolist()
    total = sum(count_list)
    covered = sum(count_list[i] for i in kept)
    target = None if coverage is None else coverage * total
    merges_added = 0
    for i in sorted(range(n), key=lambda i: (-count_list[i], i)):
        if keep is not None and len(kept) >= keep:
            break
        if target is not None and (covered >= target or count_list[i] == 0):
            break
        if i in kept or tokens[i] is None:
            continue
        add = needs(i) - kept
        if keep is not None and len(kept) + len(add) > keep:
            continue
        kept |= add
        covered += sum(count_list[j] for j in add)
        merges_added += len(add) - 1
    return Selection(sorted(kept), required, covered / total if total else 1.0, merges_added)


# --- model surgery -------------------------------------------------------------------------------------------------
def padded_size(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def slice_vocabulary(model: nn.Module, keep: list[int], pad_to: int = 128, padding_logit_bias: float = -1e4) -> dict:
    """Keep embedding rows (and LM-head rows and bias) `keep` in that order, then pad to a multiple of `pad_to`.

    Works through the adapter's view of the embeddings and head and the HF setters, so a head tied to the embedding
    stays tied and an embedding shared by encoder and decoder stays shared. Returns what the padding rows are.
    """
    from core.adapters import get_adapter

    adapter = get_adapter(model)
    embed, head, tied = adapter.input_embeddings(), adapter.output_head(), adapter.tied()
    old_rows = embed.num_embeddings
    index = torch.as_tensor(keep, dtype=torch.long)
    if len(index) == 0 or int(index.max()) >= old_rows or int(index.min()) < 0:
        raise UserError(f"keep ids must lie in [0, {old_rows}) and not be empty")
    size = padded_size(len(index), pad_to)
    old_to_new = {int(old): new for new, old in enumerate(keep)}

    old_weight = embed.weight
    embed.weight = nn.Parameter(_take_rows(old_weight.data, index, size, 0.0), requires_grad=old_weight.requires_grad)
    embed.num_embeddings = size
    _rebind(model, old_weight, embed.weight, size)
    if getattr(embed, "padding_idx", None) is not None:
        embed.padding_idx = old_to_new.get(int(embed.padding_idx))
    model.set_input_embeddings(embed)
    masked = False
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            old_weight = head.weight
            head.weight = nn.Parameter(_take_rows(head.weight.data, index, size, 0.0),
                                       requires_grad=head.weight.requires_grad)
            _rebind(model, old_weight, head.weight, size)
        if head.bias is not None:
            head.bias = nn.Parameter(_take_rows(head.bias.data, index, size, padding_logit_bias),
                                     requires_grad=head.bias.requires_grad)
            masked = True
        head.out_features = size
        model.set_output_embeddings(head)
    _set_vocab_size(model, old_rows, size)
    padding = list(range(len(index), size))
    return {"rows": size, "padding_rows": len(padding), "padding_masked": masked or not padding,
            "padding_ids": padding, "tied": tied}


def _rebind(model: nn.Module, old: nn.Parameter, new: nn.Parameter, size: int) -> None:
    """Point every other module that shared the old tensor (an encoder's and a decoder's copy of one embedding)
    at the new one, so no stale full-size copy survives even if a family's setter misses one."""
    for module in model.modules():
        if module._parameters.get("weight") is old:
            module.weight = new
            for attr in ("num_embeddings", "out_features"):
                if hasattr(module, attr):
                    setattr(module, attr, size)


def _take_rows(weight: torch.Tensor, index: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    out = weight.new_full((size, *weight.shape[1:]), fill)
    out[: len(index)] = weight.index_select(0, index.to(weight.device))
    return out


def _set_vocab_size(model: nn.Module, old: int, new: int) -> None:
    model.config.vocab_size = new
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and getattr(text, "vocab_size", None) is not None:
        text.vocab_size = new
    for module in model.modules():  # e.g. LlamaForCausalLM.vocab_size, read by its loss
        if isinstance(getattr(module, "vocab_size", None), int) and module.vocab_size == old:
            module.vocab_size = new


def token_id_fields(config) -> dict[str, list[int]]:
    """Every `*_token_id` of a model or generation config (pad, eos, bos, decoder_start, forced_...), as lists."""
    if config is None:
        return {}
    fields = {}
    for name, value in config.to_dict().items():
        if name.endswith("_token_id") and value is not None:
            fields[name] = list(value) if isinstance(value, (list, tuple)) else [value]
    return fields


def remap_token_ids(config, old_to_new: dict[int, int]) -> None:
    """Rewrite the config's `*_token_id` fields (and a generation config's suppress lists) to the new ids."""
    if config is None:
        return
    for name, ids in token_id_fields(config).items():
        new = [old_to_new[i] for i in ids]
        value = getattr(config, name)
        setattr(config, name, new if isinstance(value, (list, tuple)) else new[0])
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        value = getattr(config, name, None)
        if value:
            setattr(config, name, [old_to_new[i] for i in value if i in old_to_new])


def config_required_ids(model, n_tokens: int) -> list[int]:
    """Ids the model and generation configs name; they must survive (and exist in the tokenizer)."""
    ids = []
    for where, config in (("config", model.config), ("generation_config", getattr(model, "generation_config", None))):
        for name, values in token_id_fields(config).items():
            for i in values:
                if not 0 <= i < n_tokens:
                    raise UserError(f"{where}.{name}={i} is not an id of the tokenizer ({n_tokens} ids): the "
                                    "checkpoint's tokenizer does not match its config")
                ids.append(i)
    return sorted(set(ids))


# --- checking the result -------------------------------------------------------------------------------------------
def compare_segmentation(old_tokenizer, new_tokenizer, keep: list[int], texts: Iterable[str]) -> dict:
    """How much text keeps its segmentation after pruning.

    `same_tokens`: share of the original tokens that the pruned tokenizer reproduces (same character span, remapped
    id); `same_segmentation`: share of documents encoded to exactly the remapped original ids; the same among
    in-domain documents (original ids all kept: must be 1.0); decodes equal to the original's; token growth.
    """
    old_to_new = {old: new for new, old in enumerate(keep)}
    stats = Counter()
    for text in tqdm(list(texts), desc="check segmentation", unit="doc", disable=None):
        old = old_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        new = new_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        old_ids, new_ids = old["input_ids"], new["input_ids"]
        in_domain = all(i in old_to_new for i in old_ids)
        same = in_domain and new_ids == [old_to_new[i] for i in old_ids]
        old_spans = Counter((tuple(span), old_to_new[i])
                            for span, i in zip(old["offset_mapping"], old_ids) if i in old_to_new)
        new_spans = Counter((tuple(span), i) for span, i in zip(new["offset_mapping"], new_ids))
        stats["documents"] += 1
        stats["in_domain"] += in_domain
        stats["same"] += same
        stats["in_domain_same"] += same and in_domain
        stats["same_tokens"] += sum((old_spans & new_spans).values())
        stats["decode_same"] += _decode(new_tokenizer, new_ids) == _decode(old_tokenizer, old_ids)
        stats["old_tokens"] += len(old_ids)
        stats["new_tokens"] += len(new_ids)
    docs = stats["documents"]
    if not docs:
        return {"documents": 0}
    return {
        "documents": docs,
        "same_tokens": stats["same_tokens"] / max(stats["old_tokens"], 1),
        "same_segmentation": stats["same"] / docs,
        "in_domain_documents": stats["in_domain"],
        "in_domain_same_segmentation": stats["in_domain_same"] / stats["in_domain"] if stats["in_domain"] else None,
        "decode_matches_original": stats["decode_same"] / docs,
        "token_growth": stats["new_tokens"] / max(stats["old_tokens"], 1),
    }


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --- the stage -----------------------------------------------------------------------------------------------------
@dataclass
class PreparedPrune:
    """Everything decided before anything is written (so bad input fails first)."""

    model: nn.Module
    tokenizer: Any
    files: TokenizerFiles
    counts: TokenCounts
    selection: Selection
    check_texts: list[str]
    parameters_before: int
    rows_before: int
    config: VocabConfig


def prepare(model_dir: str | Path, config: VocabConfig, corpus: Any = None, progress: bool = True) -> PreparedPrune:
    """Load, count and select: every check that can fail on user input runs here, and nothing is written."""
    from core.checkpoint import count_parameters, load_model, load_tokenizer

    if config.keep is None and config.coverage is None:
        raise UserError("say how much to keep: keep (a token count, e.g. 110000) or coverage (e.g. 0.999)")
    model = load_model(model_dir).eval()
    tokenizer_dir = Path(config.tokenizer or model_dir)
    files = read_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) != len(files):
        raise UserError(f"{tokenizer_dir}: AutoTokenizer reports {len(tokenizer)} ids but tokenizer.json holds "
                        f"{len(files)}")
    rows = model.get_input_embeddings().num_embeddings
    if len(files) > rows:
        raise UserError(f"the tokenizer has {len(files)} ids but the model only {rows} embedding rows: wrong tokenizer")
    required = required_tokens(files, config.keep_tokens, config.keep_alphabet)
    extra = set(config_required_ids(model, len(files))) - {i for ids in required.values() for i in ids}
    if extra:
        required["config ids"] = sorted(extra)
    check_texts: list[str] = []
    if config.counts is not None:
        counts = load_token_counts(config.counts, files)
        if corpus is not None or config.corpus is not None:
            source = open_corpus(corpus if corpus is not None else config.corpus, config)
            check_texts = list(source.check_texts or [])
    else:
        if corpus is None and config.corpus is None:
            raise UserError("no corpus to count: give --corpus DATA (or --counts from an earlier run)")
        source = open_corpus(corpus if corpus is not None else config.corpus, config)
        counts = count_tokens(tokenizer, source, config, files, progress)
        check_texts = list(source.check_texts or [])
    selection = select_tokens(counts, files, required, keep=config.keep, coverage=config.coverage)
    return PreparedPrune(model, tokenizer, files, counts, selection, check_texts[: config.check_documents],
                         count_parameters(model), rows, config)


def write_pruned(prepared: PreparedPrune, work_dir: Path, config: VocabConfig) -> dict:
    """Slice the model, rewrite the tokenizer, save both and the counts into `work_dir`; return the metrics."""
    from transformers import AutoTokenizer

    model, keep = prepared.model, prepared.selection.keep
    old_to_new = {old: new for new, old in enumerate(keep)}
    padding = slice_vocabulary(model, keep, config.pad_to, config.padding_logit_bias)
    remap_token_ids(model.config, old_to_new)
    generation = getattr(model, "generation_config", None)
    remap_token_ids(generation, old_to_new)
    if generation is not None and not padding["padding_masked"]:
        generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | set(padding["padding_ids"]))
    model.save_pretrained(str(work_dir), safe_serialization=True)
    write_pruned_tokenizer(prepared.files, keep, work_dir)
    save_token_counts(prepared.counts, work_dir / SCORES_DIR)
    new_tokenizer = AutoTokenizer.from_pretrained(str(work_dir))
    check = compare_segmentation(prepared.tokenizer, new_tokenizer, keep, prepared.check_texts)
    return {
        "tokens_before": len(prepared.files), "tokens_after": len(keep),
        "rows_before": prepared.rows_before, "rows_after": padding["rows"],
        "padding_rows": padding["padding_rows"], "padding_masked": padding["padding_masked"], "tied": padding["tied"],
        "padding_logit_bias": config.padding_logit_bias,
        "corpus": prepared.counts.description,
        "corpus_documents": prepared.counts.documents, "corpus_tokens": prepared.counts.total,
        "corpus_coverage": prepared.selection.coverage,
        "required": {reason: len(ids) for reason, ids in prepared.selection.required.items()},
        "added_for_merges": prepared.selection.added_for_merges,
        "tokenizer_files_dropped": prepared.files.dropped,
        "check": check,
    }


def prune_vocabulary(model_dir: str | Path, out_dir: str | Path, config: VocabConfig, corpus: Any = None,
                     force: bool = False, progress: bool = True) -> Manifest:
    """The whole stage from Python: the `--out` policy, prepare (all checks), then `out_dir` written atomically with
    a manifest. A finished `out_dir` for the same config and input is kept unless `force`; with a corpus passed in
    memory the stage always reruns (its contents are not part of the config hash, so it could have changed)."""
    if corpus is None:
        return execute(KIND, config, {"model": model_dir}, out_dir, force=force, progress=progress)
    check_output_location(out_dir, KIND.stage, [model_dir])
    prepared = prepare(model_dir, config, corpus, progress)
    stage = Stage(KIND.stage, lambda _input, work, _config: write_pruned(prepared, work, config), config)
    return run_stage(stage, Path(model_dir), out_dir, force=True)


def summary_table(metrics: dict, parameters: dict) -> str:
    """Before/after numbers as a table, then what the padding rows hold and why tokens were forced; `parameters` is
    the manifest's (the stage contract counts them)."""
    check = metrics.get("check", {})
    rows = [
        ("tokenizer ids", metrics["tokens_before"], metrics["tokens_after"]),
        ("model vocab rows", metrics["rows_before"], metrics["rows_after"]),
        ("parameters", human_count(parameters["before"]), human_count(parameters["after"])),
        ("parameter ratio", 1.0, parameters["after"] / parameters["before"]),
        ("corpus coverage", 1.0, metrics["corpus_coverage"]),
    ]
    if check.get("documents"):
        rows += [
            ("same segmentation (tokens)", 1.0, check["same_tokens"]),
            ("same segmentation (docs)", 1.0, check["same_segmentation"]),
            ("decode = original", 1.0, check["decode_matches_original"]),
            ("tokens per text", 1.0, check["token_growth"]),
        ]
    if not metrics["padding_rows"]:
        padding = "none"
    elif metrics["padding_masked"]:
        bias = metrics["padding_logit_bias"]
        padding = f"{metrics['padding_rows']}, zero rows with head bias {bias:g}: probability 0"
    else:
        padding = f"{metrics['padding_rows']}, zero rows, logit 0 (bias-free head): suppressed in generation only"
    lines = [
        format_table(rows, ["", "before", "after"]),
        f"padding rows: {padding}",
        "forced tokens: " + ", ".join(f"{k} {v}" for k, v in metrics["required"].items())
        + (f"; {metrics['added_for_merges']} added for BPE merge derivations" if metrics["added_for_merges"] else ""),
        f"corpus: {metrics['corpus_documents']} documents, {metrics['corpus_tokens']:,} tokens",
    ]
    if metrics.get("tokenizer_files_dropped"):
        dropped = ", ".join(metrics["tokenizer_files_dropped"])
        lines.append(f"not carried over (tokenizer.json is the tokenizer): {dropped}")
    if check.get("documents"):
        lines.append(f"segmentation checked on {check['documents']} documents "
                     f"({check['in_domain_documents']} in-domain)")
    return "\n".join(lines)


# --- planning (the dry run: shapes only, no weights) ---------------------------------------------------------------
def shape_after(config: VocabConfig, shape, model):
    """The vocabulary rows this prune leaves (`StageKind.shape_after`): `keep` ids padded to `pad_to`, exact while
    the tokenizer has at least `keep` ids. `coverage` is decided by the corpus' counts, which the plan does not
    have: it shows the most the prune can keep (every row, padded), as an estimate that says so."""
    from core.planning import Estimate

    if config.keep is None and config.coverage is None:
        raise UserError("say how much to keep: keep (a token count, e.g. 110000) or coverage (e.g. 0.999)")
    if config.coverage is not None:
        rows = padded_size(shape.vocab, config.pad_to)
        return Estimate(replace(shape, vocab=rows),
                        f"coverage {config.coverage:g}: at most {rows:,} rows; the corpus' token counts decide how "
                        "many ids it takes")
    if config.keep >= shape.vocab:
        rows = padded_size(shape.vocab, config.pad_to)
        return Estimate(replace(shape, vocab=rows), f"keep {config.keep:,} is not below the model's {shape.vocab:,} "
                                                    "rows: every tokenizer id stays")
    return replace(shape, vocab=padded_size(config.keep, config.pad_to))


# --- command line --------------------------------------------------------------------------------------------------
def _keep_token_flag(parser) -> None:
    parser.add_argument("--keep-token", dest="keep_tokens", action="append", default=None, metavar="TOKEN",
                        help="always keep TOKEN (repeat for more)")


def _keep_token_value(args) -> dict:
    return {"keep_tokens": args.keep_tokens}


def summary(manifest) -> str:
    return summary_table(manifest.metrics, manifest.parameters)


KIND = register_kind(StageKind(
    name="vocab_prune",
    stage="vocab",
    module="compress.vocab",
    config_cls=VocabConfig,
    prepare=lambda config, inputs, progress: prepare(inputs["model"], config, progress=progress),
    run=lambda prepared, work_dir: write_pruned(prepared, work_dir, prepared.config),
    description="Prune a checkpoint's vocabulary to the tokens a corpus uses: slices the embedding and LM head, "
                "rewrites the tokenizer (tokenizer.json, SentencePiece model), pads rows to a multiple.",
    examples=(
        "python -m compress.vocab --model runs/s5 --corpus runs/corpus --keep 110000 --out runs/vocab",
        "python -m compress.vocab --model runs/s5 --corpus data/jsonl --coverage 0.999 --out runs/v",
        "python -m compress.vocab --model runs/s5 --counts runs/vocab/scores --keep 90000 --out runs/v90k",
    ),
    inputs=(Input("model", "checkpoint directory (with its tokenizer files)"),),
    summary=summary,
    shape_after=shape_after,
    flags=_keep_token_flag,
    flag_values=_keep_token_value,
    exclusive=(("keep", "coverage"),),
))
main = command(KIND)


if __name__ == "__main__":
    main()
