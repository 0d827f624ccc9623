"""A lossless SentencePiece tokenizer for code and prose, saved so that `AutoTokenizer.from_pretrained` loads it.

Unigram, not BPE: a unigram model is a list of pieces with scores, so vocabulary surgery (`compress/vocab.py`) can
drop pieces and re-encode with Viterbi, where BPE would need its merge chains repaired; it is also what T5/UL2 use.
Normalization is identity with no dummy prefix and no whitespace collapsing, and unknown characters fall back to
bytes, so decode(encode(text)) == text for any text: tabs, runs of spaces, newlines, emoji, CJK.

The directory holds `tokenizer.model` (the SentencePiece proto) and a `tokenizer.json` built here with `tokenizers`
that encodes exactly like it (transformers 5 cannot load a bare `tokenizer.model` as this kind of tokenizer).
`tokenizer_class` is `PreTrainedTokenizerFast` (transformers 5's `TokenizersBackend`): it loads tokenizer.json as
written and its post-processor adds nothing, so no BOS ever and EOS only when the caller appends `eos_token_id`.
The T5 class was rejected: in transformers 5 its own pipeline splits on whitespace, adds a dummy prefix, has no byte
fallback (all lossy on code) and appends </s> to every encode, which packing and the UL2 objective must control.

One known divergence from SentencePiece: transformers always matches the named specials "<pad>", "</s>", "<unk>"
when they occur literally in text, where SentencePiece spells them out. The stdlib corpus never contains them.

    python -m pretrain.tokenizer --corpus runs/corpus --out runs/tokenizer --vocab-size 8192

The command is the stage kind `tokenizer` (no input checkpoint): SentencePiece trains in memory (a vocabulary the
text cannot fill fails there, before anything is written), then the files are saved into --out under the stage
contract and checked on the corpus' validation split. `train_tokenizer` writes caches atomically on its own.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import datasets
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from tqdm.auto import tqdm

from core.cli import command
from core.config import config_hash, to_dict
from core.errors import UserError
from core.kind import Input, StageKind, register_kind
from core.stage import Manifest, library_versions
from core.table import format_table
from pretrain.corpus import atomic_directory, seeded_hash, split_lines

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
MODE_TOKENS = {"R": "<R>", "S": "<S>", "X": "<X>"}
SENTINEL = "<extra_id_{}>"
SENTINEL_PATTERN = re.compile(r"<extra_id_(\d+)>")
# Viterbi must never pick a control or byte piece from text: SentencePiece reaches bytes only through fallback.
UNREACHABLE_SCORE = -1e9
# Piece scores are rounded to multiples of 1/32 so that every Viterbi path score is exact in SentencePiece's float32
# (up to |sum| < 2**19, ~50k tokens) as in tokenizers' float64. Unrounded, permutations of the same pieces (8+4 vs
# 4+8 spaces) tie up to float32 rounding, which SentencePiece breaks by accident: ids then differed on a quarter of
# the validation documents. Rounded, both libraries see exact ties and break them the same way. Score change: at most 1/64.
SCORE_STEP = 1 / 32


@dataclass
class TokenizerConfig:
    """How the SentencePiece model is trained. Defaults suit the tiny preset (~5M parameters) on the stdlib corpus."""

    vocab_size: int = 8192
    """Total ids INCLUDING pad/eos/unk, sentinels, mode tokens and the 256 byte pieces (365 reserved ids).
    Small models spend a large share of parameters on embeddings, hence 8k rather than T5's 32k."""
    sentinels: int = 100
    """T5/UL2 span-corruption sentinels <extra_id_0>..<extra_id_{n-1}> (T5 uses 100)."""
    max_training_chars: int = 6_000_000
    """Characters sampled (by seeded hash) from the texts for training; caps training time (15-25 s on 2 cores)."""
    chunk_chars: int = 2048
    """Texts are cut at line ends into pieces of at most this many characters: SentencePiece trains on
    "sentences", and whole code files would exceed its sentence length limit and be dropped."""
    character_coverage: float = 0.9995
    """Share of characters that get their own piece; the rarest fall back to bytes. 1.0 would spend ids on every
    stray CJK character in the stdlib."""
    max_piece_length: int = 16
    """Longest piece in characters; 16 admits long indentation runs and identifiers."""
    split_digits: bool = True
    """Digits are single pieces, so numbers are spelled digit by digit (as in LLaMA/PaLM) instead of memorized."""
    num_threads: int = 0
    """Trainer threads; 0 means os.cpu_count()."""
    seed: int = 0
    """Seeds the sampling of training text and SentencePiece's random generator (training is then reproducible)."""

    @property
    def user_defined_symbols(self) -> list[str]:
        return [SENTINEL.format(i) for i in range(self.sentinels)] + list(MODE_TOKENS.values())

    def __post_init__(self):
        reserved = 3 + len(self.user_defined_symbols) + 256
        if self.vocab_size <= reserved + 100:
            raise UserError(f"vocab_size {self.vocab_size} leaves too few learned pieces; use over {reserved + 100}")


def training_pieces(texts: Iterable[str], config: TokenizerConfig) -> list[str]:
    """Pieces of at most `chunk_chars`, sampled by seeded hash up to `max_training_chars`, in hash order."""
    pieces = [p for text in tqdm(texts, desc="tokenizer text", unit="doc", disable=None)
              for p in split_lines(text, config.chunk_chars) if p.strip()]
    pieces.sort(key=lambda p: seeded_hash(config.seed, p))
    chosen, total = [], 0
    for piece in pieces:
        if total >= config.max_training_chars:
            break
        chosen.append(piece)
        total += len(piece)
    if not chosen:
        raise UserError("no training text for the tokenizer: the corpus or text list is empty")
    return chosen


def train_sentencepiece(pieces: list[str], config: TokenizerConfig) -> bytes:
    """Train the unigram model on `pieces`; return the serialized model proto, scores rounded to SCORE_STEP."""
    model = io.BytesIO()
    spm.set_random_generator_seed(config.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(pieces), model_writer=model, model_type="unigram", vocab_size=config.vocab_size,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD, eos_piece=EOS, unk_piece=UNK,
            user_defined_symbols=config.user_defined_symbols, byte_fallback=True,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=config.split_digits,
            character_coverage=config.character_coverage, max_sentencepiece_length=config.max_piece_length,
            # The sample is already drawn (by seeded hash) in `training_pieces`, so the trainer takes all of it.
            max_sentence_length=4 * config.chunk_chars + 16, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=config.num_threads or os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as err:
        raise UserError(f"SentencePiece training failed ({err}); lower --vocab-size or give it more text") from None
    return round_piece_scores(model.getvalue())


def _varint(buf: bytes | bytearray, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _skip(buf: bytes | bytearray, i: int, wire_type: int) -> int:
    """Index after the value of a protobuf field of this wire type starting at `i`."""
    if wire_type == 0:
        return _varint(buf, i)[1]
    if wire_type == 2:
        length, i = _varint(buf, i)
        return i + length
    return i + {1: 8, 5: 4}[wire_type]


def round_piece_scores(proto: bytes, step: float = SCORE_STEP) -> bytes:
    """The model proto with every piece score rounded to a multiple of `step` (see SCORE_STEP for why).

    Edits the protobuf wire format in place (ModelProto.pieces = field 1, SentencePiece.score = field 2, a fixed
    32-bit float), so that it needs no protobuf package; rewriting a float never changes any length.
    """
    out, i = bytearray(proto), 0
    while i < len(out):
        tag, i = _varint(out, i)
        if tag != (1 << 3 | 2):
            i = _skip(out, i, tag & 7)
            continue
        length, j = _varint(out, i)
        i = end = j + length
        while j < end:
            field, j = _varint(out, j)
            if field == (2 << 3 | 5):
                (score,) = struct.unpack_from("<f", out, j)
                struct.pack_into("<f", out, j, round(score / step) * step)
            j = _skip(out, j, field & 7)
    return bytes(out)


def fast_tokenizer_from_sentencepiece(proto: bytes) -> Tokenizer:
    """A `tokenizers` Unigram pipeline that encodes exactly like SentencePiece for this identity-normalized model.

    SentencePiece runs Viterbi over the whole text with " " written as "▁", so no pre-tokenizer is needed. Control
    and byte pieces keep their ids but can never be matched from text; user-defined symbols become special added
    tokens so that they are matched first and kept whole, as SentencePiece does.
    """
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab, user_defined = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        reserved = sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)
        vocab.append((piece, UNREACHABLE_SCORE if reserved else sp.get_score(i)))
        if not reserved and (SENTINEL_PATTERN.fullmatch(piece) or piece in MODE_TOKENS.values()):
            user_defined.append(piece)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [PAD, EOS, UNK] + user_defined
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def save_hf_files(proto: bytes, out_dir: Path) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = fast_tokenizer_from_sentencepiece(proto)
    extra = [t for t in tokenizer.get_vocab() if SENTINEL_PATTERN.fullmatch(t) or t in MODE_TOKENS.values()]
    extra.sort(key=tokenizer.token_to_id)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,  # cleanup deletes spaces before punctuation: lossy on code
    )
    fast.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.model").write_bytes(proto)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the stable name of transformers 5's TokenizersBackend
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK, "additional_special_tokens": extra}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _texts(texts_or_dataset) -> Iterable[str]:
    """Texts from a DatasetDict (its "train" split), a Dataset (its "text" column) or an iterable of strings."""
    if isinstance(texts_or_dataset, datasets.DatasetDict):
        if "train" not in texts_or_dataset:
            raise UserError(f"the corpus has no 'train' split (it has {sorted(texts_or_dataset)})")
        texts_or_dataset = texts_or_dataset["train"]
    if isinstance(texts_or_dataset, datasets.Dataset):
        return (row["text"] for row in texts_or_dataset.select_columns(["text"]))
    if isinstance(texts_or_dataset, str):
        raise UserError("train_tokenizer needs many texts, got a single string; pass a list or a dataset")
    return texts_or_dataset


@dataclass
class TrainedTokenizer:
    """A SentencePiece model trained in memory, with what its manifest records."""

    proto: bytes
    training_chars: int
    training_pieces: int
    seconds: float

    @property
    def vocab_size(self) -> int:
        return spm.SentencePieceProcessor(model_proto=self.proto).get_piece_size()


def fit_tokenizer(texts_or_dataset, config: TokenizerConfig) -> TrainedTokenizer:
    """Train on a corpus (DatasetDict: its train split), a Dataset or an iterable of texts; nothing is written."""
    start = time.perf_counter()
    pieces = training_pieces(_texts(texts_or_dataset), config)
    proto = train_sentencepiece(pieces, config)
    return TrainedTokenizer(proto, sum(map(len, pieces)), len(pieces), time.perf_counter() - start)


def train_tokenizer(texts_or_dataset, config: TokenizerConfig | None = None,
                    out_dir: str | os.PathLike = "tokenizer") -> Path:
    """Train (`fit_tokenizer`) and save to `out_dir`, written atomically with a manifest.json (config, vocab size,
    training chars, time): the writer of caches, which processes may fill at the same time."""
    config = config or TokenizerConfig()
    trained = fit_tokenizer(texts_or_dataset, config)
    with atomic_directory(out_dir) as tmp:
        save_hf_files(trained.proto, tmp)
        Manifest(
            stage="tokenizer", config_hash=config_hash(config), config=to_dict(config),
            outputs={"vocab_size": trained.vocab_size},
            metrics={"training_chars": trained.training_chars, "training_pieces": trained.training_pieces},
            timings={"training_seconds": round(trained.seconds, 2)}, versions=library_versions(),
        ).write(tmp)
    return Path(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved by `train_tokenizer` through `AutoTokenizer`; a one-line error if it is not one."""
    import core.checkpoint  # imports torch: only when a tokenizer is actually loaded

    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise UserError(f"{path} has no tokenizer.json; train one with python -m pretrain.tokenizer --out {path}")
    return core.checkpoint.load_tokenizer(path)


HOW_TO_ADD = ("pretrain.continual adds them with --set add_sentinels=true; pretrain.tokenizer trains a tokenizer "
              "that has them")


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... in index order (T5 fills spans with sentinel 0 first)."""
    indexed = sorted((int(m.group(1)), t) for t in tokenizer.get_vocab() if (m := SENTINEL_PATTERN.fullmatch(t)))
    if not indexed:
        raise UserError(f"the tokenizer has no <extra_id_N> sentinels ({HOW_TO_ADD})")
    return tokenizer.convert_tokens_to_ids([t for _, t in indexed])


def mode_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the UL2 mode tokens, keyed by denoiser: {"R": id of <R>, "S": id of <S>, "X": id of <X>}."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in MODE_TOKENS.values() if t not in vocab]
    if missing:
        raise UserError(f"the tokenizer lacks the UL2 mode tokens {missing} ({HOW_TO_ADD})")
    return {mode: vocab[token] for mode, token in MODE_TOKENS.items()}


def missing_ul2_tokens(tokenizer, sentinels: int = 100) -> list[str]:
    """The UL2 tokens a stock tokenizer lacks: `sentinels` sentinels when it has none (a tokenizer with its own,
    such as T5's 100, keeps them), and whichever of <R>/<S>/<X> it does not hold."""
    vocab = tokenizer.get_vocab()
    has_sentinels = any(SENTINEL_PATTERN.fullmatch(token) for token in vocab)
    wanted = ([] if has_sentinels else [SENTINEL.format(i) for i in range(sentinels)]) + list(MODE_TOKENS.values())
    return [token for token in wanted if token not in vocab]


def add_ul2_tokens(tokenizer, sentinels: int = 100) -> list[str]:
    """Add the missing UL2 tokens to `tokenizer` (in place) as special tokens: matched whole before the model's own
    pre-tokenizer runs, never split, skipped when decoding with skip_special_tokens. Returns the tokens added; their
    ids follow the tokenizer's last id, in the order of `missing_ul2_tokens`."""
    missing = missing_ul2_tokens(tokenizer, sentinels)
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def check_tokenizer(path: str | os.PathLike, texts: Iterable[str]) -> dict:
    """Encode texts with the fast tokenizer and with SentencePiece: how many round-trip exactly, how many get
    identical ids, and characters per token (higher is better compression)."""
    tokenizer = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(Path(path) / "tokenizer.model"))
    counts = {"texts": 0, "lossless": 0, "same_ids": 0, "chars": 0, "tokens": 0}
    for text in tqdm(texts, desc="check tokenizer", unit="doc", disable=None):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        counts["texts"] += 1
        counts["lossless"] += decoded == text
        counts["same_ids"] += ids == sp.encode(text)
        counts["chars"] += len(text)
        counts["tokens"] += len(ids)
    counts["chars_per_token"] = counts["chars"] / max(counts["tokens"], 1)
    return counts


# ---------------------------------------------------------------------------------------------------- the kind


@dataclass
class TokenizerBuildConfig(TokenizerConfig):
    """The command's settings: the tokenizer's, plus the corpus it trains on (a subclass, so that TokenizerConfig,
    which names the teacher's cached tokenizers, keeps its hash)."""

    corpus: str | None = None
    """A corpus saved by python -m pretrain.corpus (its train split trains, its validation split checks); None
    builds the default corpus in memory."""


@dataclass
class PreparedTokenizer:
    config: TokenizerBuildConfig
    trained: TrainedTokenizer
    validation: list[str] | None


def prepare(config: TokenizerBuildConfig, inputs: dict, progress: bool = True) -> PreparedTokenizer:
    """Read the corpus and train SentencePiece in memory; every error (not a saved corpus, no train split, a
    vocabulary the text cannot fill) comes before the stage directory exists."""
    from pretrain.corpus import build_corpus

    if config.corpus is not None:
        if not (Path(config.corpus) / "dataset_dict.json").is_file():
            raise UserError(f"{config.corpus!r} is not a saved corpus; make one with python -m pretrain.corpus --out "
                            "DIR")
        corpus = datasets.load_from_disk(config.corpus)
    else:
        corpus = build_corpus()
    tokenizer_config = TokenizerConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TokenizerConfig)})
    trained = fit_tokenizer(corpus, tokenizer_config)
    validation = list(corpus["validation"]["text"]) if "validation" in corpus else None
    return PreparedTokenizer(config, trained, validation)


def save(prepared: PreparedTokenizer, work_dir: Path) -> dict:
    """Write the tokenizer files and check them against SentencePiece on the validation texts."""
    trained = prepared.trained
    save_hf_files(trained.proto, work_dir)
    metrics = {"vocab_size": trained.vocab_size, "training_chars": trained.training_chars,
               "training_pieces": trained.training_pieces, "training_seconds": round(trained.seconds, 2)}
    if prepared.validation is not None:
        metrics["validation"] = check_tokenizer(work_dir, prepared.validation)
    return metrics


def summary(manifest: Manifest) -> str:
    metrics = manifest.metrics
    rows = [("vocab size", metrics["vocab_size"]), ("training chars", metrics["training_chars"]),
            ("training seconds", metrics["training_seconds"])]
    if "validation" in metrics:
        check = metrics["validation"]
        rows += [("validation texts", check["texts"]), ("lossless", check["lossless"]),
                 ("ids equal SentencePiece", check["same_ids"]), ("chars per token", check["chars_per_token"])]
    return format_table(rows, ["tokenizer", "value"])


KIND = register_kind(StageKind(
    name="tokenizer",
    writes_checkpoint=False,
    stage="tokenizer",
    module="pretrain.tokenizer",
    config_cls=TokenizerBuildConfig,
    prepare=prepare,
    run=save,
    description="Train the lossless unigram SentencePiece tokenizer on a corpus' train split and save it for "
                "AutoTokenizer; then check it on the validation split.",
    examples=("python -m pretrain.corpus --out runs/corpus && "
              "python -m pretrain.tokenizer --corpus runs/corpus --out runs/tokenizer --vocab-size 8192",),
    inputs=(Input("corpus", "a corpus saved by `python -m pretrain.corpus` (default: build the default corpus in "
                  "memory)", required=False, is_checkpoint=False),),
    summary=summary,
    flag_values=lambda args: {"corpus": args.corpus},
))
main = command(KIND)


if __name__ == "__main__":
    main()
