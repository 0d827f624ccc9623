"""Tokenizer surgery: keep a subset of token ids and rewrite every tokenizer file so that old id `keep[i]` becomes i.

The files rewritten are the ones `AutoTokenizer.from_pretrained` and SentencePiece read: `tokenizer.json` (model
vocabulary, BPE merges, added tokens, post-processor ids), the SentencePiece proto (`tokenizer.model`), the slow
BPE files (`vocab.json`, `merges.txt`), `added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder`.
Every other file of the directory is copied unchanged. `keep` is always sorted, so relative order is preserved:
control tokens keep their low ids and added tokens that sat after the model vocabulary still do.

What happens to text that used a removed token (the "segmentation contract"):
- Unigram (SentencePiece): Viterbi runs over the kept pieces only. Every path of the pruned lattice is a path of
  the original with the same score, so text whose original best path uses only kept pieces keeps that path; other
  text is re-segmented into the best path of kept pieces, and characters no kept piece covers fall back to byte
  pieces (`<0x..>`, always kept) -- or to `<unk>` when the model has no byte fallback, which is why single-character
  pieces are then required. The whitespace piece "▁" is always kept: its bytes would decode to "▁", not " ".
  The lowest-scoring normal piece is kept too: both SentencePiece and `tokenizers` derive the unknown-piece penalty
  from the minimum score, and it must not move. (Without byte fallback, `keep_alphabet=False` gives up the
  single-character pieces; characters they covered then become `<unk>`.)
- BPE: a kept token keeps every intermediate symbol of its own merge derivation (BPE of its characters) and the
  merges between them; a merge survives only when both inputs and its result survive. Text that would have merged
  into a removed token stops merging earlier and comes out as smaller pieces. The base alphabet is required: the
  256 byte-level characters for byte-level BPE, `<0x..>` pieces for byte-fallback BPE, every unmerged symbol
  otherwise (unless `keep_alphabet=False`). In-domain text keeps its ids exactly: every merge its encoding applied
  lies inside the derivation of a kept output token, so it survives with the same rank.
- WordLevel / WordPiece: removed words become `unk` (WordPiece: the longest kept pieces; single characters and
  their `##` continuations are required so words still split).

SentencePiece tokenizers whose extra ids live outside the proto (T5, Flan-T5, mT5, OpenBA): the proto holds the N
pieces and `<extra_id_N>` (and `<R>`/`<S>`/`<X>`) are added tokens at ids N and above -- only in tokenizer.json's
added tokens (OpenBA), or also at the end of its Unigram vocabulary (the hub's T5 layout). Both are accepted when the
proto's pieces are tokenizer.json's first ids in order. Those tokens are always kept; as `keep` is sorted, the kept
pieces again come first, so the pruned proto is a prefix of the pruned tokenizer.json and the extra ids stay above
it, in their old order (`<extra_id_0>` still the highest where it was).

The SentencePiece proto is edited at the protobuf wire level (the `protobuf` package is not a dependency here). Only a
unigram proto is rewritten; a SentencePiece BPE proto beside a BPE tokenizer.json (Llama-2) is left out of the output.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable

from core.errors import UserError

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SENTINEL = re.compile(r"<extra_id_\d+>")
MODE_TOKENS = ("<R>", "<S>", "<X>")
WHITESPACE_PIECE = "\u2581"  # SentencePiece's "▁"
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
SUPPORTED_MODELS = ("Unigram", "BPE", "WordLevel", "WordPiece")
# SentencePiece proto field numbers (sentencepiece_model.proto): ModelProto.pieces = 1, .trainer_spec = 2,
# .self_test_data = 4; SentencePiece.piece = 1, .score = 2, .type = 3; TrainerSpec.vocab_size = 4 and the
# unk/bos/eos/pad ids 40-43. Piece type NORMAL = 1 (the default when the field is absent).
PIECES, TRAINER_SPEC, SELF_TEST_DATA = 1, 2, 4
PIECE_TEXT, PIECE_SCORE, PIECE_TYPE = 1, 2, 3
NORMAL = 1
TRAINER_VOCAB_SIZE = 4
TRAINER_ID_FIELDS = (40, 41, 42, 43)


# --- protobuf wire format ------------------------------------------------------------------------------------------
def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """A message as (field number, wire type, value): ints for varints, bytes for everything else, in order."""
    fields, i = [], 0
    try:
        while i < len(buf):
            tag, i = _read_varint(buf, i)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                value, i = _read_varint(buf, i)
            elif wire == 2:
                length, i = _read_varint(buf, i)
                value, i = buf[i : i + length], i + length
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, i = buf[i : i + size], i + size
            else:
                raise ValueError(f"wire type {wire}")
            fields.append((number, wire, value))
    except (IndexError, ValueError) as err:
        raise UserError(f"not a valid SentencePiece model proto ({err})") from None
    if i != len(buf):
        raise UserError("not a valid SentencePiece model proto (truncated)")
    return fields


def encode_fields(fields: Iterable[tuple[int, int, Any]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(value)
        elif wire == 2:
            out += _varint(len(value)) + value
        else:
            out += value
    return bytes(out)


@dataclasses.dataclass
class Piece:
    text: str
    score: float
    type: int  # sentencepiece_model.proto's Type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def sentencepiece_pieces(proto: bytes) -> list[Piece]:
    pieces = []
    for number, _, value in parse_fields(proto):
        if number != PIECES:
            continue
        text, score, kind = "", 0.0, NORMAL
        for field, _, item in parse_fields(value):
            if field == PIECE_TEXT:
                text = item.decode("utf-8")
            elif field == PIECE_SCORE:
                (score,) = struct.unpack("<f", item)
            elif field == PIECE_TYPE:
                kind = item
        pieces.append(Piece(text, score, kind))
    return pieces


def prune_sentencepiece(proto: bytes, keep: list[int]) -> bytes:
    """The model proto with only pieces `keep` (sorted old ids), the trainer's vocab size and special ids updated.

    Kept ids at or above the proto's piece count are tokens that live outside it (T5's and OpenBA's `<extra_id_N>`,
    added on top of the pieces); SentencePiece never sees them. Their ids stay above every kept piece because `keep`
    is sorted, so the pruned proto is again the first ids of the pruned tokenizer. The self-test samples are
    dropped: SentencePiece re-encodes them on load and fails if a removed piece was used.
    """
    fields = parse_fields(proto)
    pieces = [value for number, _, value in fields if number == PIECES]
    inside = [old for old in keep if old < len(pieces)]
    old_to_new = {old: new for new, old in enumerate(inside)}
    out, written = [], False
    for number, wire, value in fields:
        if number == PIECES:
            if not written:  # all pieces go where the first one was, in kept order
                out += [(PIECES, 2, pieces[old]) for old in inside]
                written = True
        elif number == TRAINER_SPEC:
            out.append((number, wire, _prune_trainer_spec(value, len(inside), old_to_new)))
        elif number != SELF_TEST_DATA:
            out.append((number, wire, value))
    return encode_fields(out)


def _prune_trainer_spec(spec: bytes, vocab_size: int, old_to_new: dict[int, int]) -> bytes:
    out = []
    for number, wire, value in parse_fields(spec):
        if number == TRAINER_VOCAB_SIZE and wire == 0:
            value = vocab_size
        elif number in TRAINER_ID_FIELDS and wire == 0 and _signed(value) >= 0:
            value = old_to_new.get(value, -1)  # a removed special is disabled, as SentencePiece writes -1
        out.append((number, wire, value))
    return encode_fields(out)


# --- reading a tokenizer directory ---------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenizerFiles:
    """The parsed tokenizer files of one directory: what the surgery reads and rewrites."""

    directory: Path
    tokenizer_json: dict
    sentencepiece: bytes | None = None
    sentencepiece_name: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    special_tokens_map: dict = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)  # files the pruned tokenizer goes without

    @property
    def model(self) -> dict:
        return self.tokenizer_json["model"]

    @property
    def model_type(self) -> str:
        return self.model["type"]

    def model_vocab(self) -> dict[str, int]:
        """Token -> id of the model's own vocabulary (added tokens not included)."""
        vocab = self.model["vocab"]
        if self.model_type == "Unigram":
            return {piece: i for i, (piece, _) in enumerate(vocab)}
        return dict(vocab)

    def added_tokens(self) -> dict[str, int]:
        return {t["content"]: t["id"] for t in self.tokenizer_json.get("added_tokens", [])}

    def tokens(self) -> list[str | None]:
        """Id -> token string over the whole id range (None for a gap, which no tokenizer output can be)."""
        by_id = {i: t for t, i in {**self.model_vocab(), **self.added_tokens()}.items()}
        return [by_id.get(i) for i in range(max(by_id) + 1 if by_id else 0)]

    def __len__(self) -> int:
        return len(self.tokens())

    def byte_fallback(self) -> bool:
        return bool(self.model.get("byte_fallback", False))

    def byte_level(self) -> bool:
        return any(p.get("type") == "ByteLevel" for p in _walk(self.tokenizer_json.get("pre_tokenizer")))


def _walk(node: Any) -> Iterable[dict]:
    """Every dict nested in a tokenizer.json component (Sequence pre-tokenizers, processors...)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def converted_tokenizer_json(directory: Path) -> dict:
    """tokenizer.json of a checkpoint that ships only its SentencePiece model (a T5Tokenizer or LlamaTokenizer save):
    transformers' own translation of the slow tokenizer, the file the hub carries beside such models."""
    from core.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(directory)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{directory}: its SentencePiece tokenizer did not convert to a fast one; save a "
                        "tokenizer.json beside it")
    return json.loads(backend.to_str())


def read_tokenizer_files(directory: str | Path) -> TokenizerFiles:
    """Parse the tokenizer files of `directory`; UserError when there is no tokenizer.json or its model is unknown."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON: {err}") from None
    elif any((directory / n).is_file() for n in SENTENCEPIECE_FILES):
        tokenizer_json = converted_tokenizer_json(directory)
    else:
        raise UserError(f"{directory} has no tokenizer.json; vocabulary pruning rewrites the fast tokenizer")
    model_type = tokenizer_json.get("model", {}).get("type")
    if model_type not in SUPPORTED_MODELS:
        raise UserError(f"{path}: tokenizer model {model_type!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_MODELS)})")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    map_path = directory / "special_tokens_map.json"
    special_tokens_map = json.loads(map_path.read_text(encoding="utf-8")) if map_path.is_file() else {}
    files = TokenizerFiles(directory, tokenizer_json, config=config, special_tokens_map=special_tokens_map)
    for name in SENTENCEPIECE_FILES:
        if not (directory / name).is_file():
            continue
        if model_type != "Unigram":
            # a SentencePiece BPE model (Llama-2) merges by piece score, not by tokenizer.json's merge list, so the
            # BPE closure does not carry over; transformers reads tokenizer.json, so the pruned copy goes without it
            files.dropped.append(name)
            continue
        files.sentencepiece, files.sentencepiece_name = (directory / name).read_bytes(), name
        _check_sentencepiece_matches(files)
        break
    return files


def _check_sentencepiece_matches(files: TokenizerFiles) -> None:
    """The proto's pieces must be tokenizer.json's first ids, in the same order. Vocabulary entries after them are
    accepted only as added tokens at the same ids: the hub layout of T5/Flan-T5, whose tokenizer.json lists the 100
    extra ids in its Unigram vocabulary although spiece.model does not hold them."""
    pieces = sentencepiece_pieces(files.sentencepiece)
    vocab = [piece for piece, _ in files.model["vocab"]] if files.model_type == "Unigram" else []
    if files.model_type != "Unigram" or len(vocab) < len(pieces) or \
            any(vocab[i] != p.text for i, p in enumerate(pieces)):
        raise UserError(
            f"{files.directory}: {files.sentencepiece_name} and tokenizer.json do not hold the same pieces in the same "
            f"order ({len(pieces)} vs {len(vocab)} pieces); remove the stale one"
        )
    added = files.added_tokens()
    beyond = [t for i, t in enumerate(vocab[len(pieces):], len(pieces)) if added.get(t) != i]
    if beyond:
        raise UserError(
            f"{files.directory}: tokenizer.json's vocabulary has {len(vocab) - len(pieces)} entries after the "
            f"{len(pieces)} pieces of {files.sentencepiece_name}, and {len(beyond)} of them are not added tokens "
            f"(e.g. {beyond[0]!r}); remove the stale {files.sentencepiece_name} or rebuild tokenizer.json from it"
        )


# --- which tokens must survive ------------------------------------------------------------------------------------
def required_tokens(files: TokenizerFiles, extra_tokens: Iterable[str] = (), keep_alphabet: bool = True
                    ) -> dict[str, list[int]]:
    """Ids that every pruned vocabulary keeps, grouped by why (a token is listed under its first reason).

    "special" covers every added token (special or not: user-defined symbols are matched before the model runs)
    and the tokens the tokenizer config names. `keep_alphabet=False` drops the single-character alphabet of a
    tokenizer WITHOUT byte fallback (which then maps characters it lost to unk); bytes are always kept.
    """
    tokens = files.tokens()
    index = {t: i for i, t in enumerate(tokens) if t is not None}
    reasons: dict[str, set[int]] = {}

    def add(reason: str, ids: Iterable[int]) -> None:
        reasons.setdefault(reason, set()).update(i for i in ids if i is not None)

    specials = set(files.added_tokens().values())
    for named in (files.config, files.special_tokens_map):  # special_tokens_map.json is copied: what it names stays
        for key in ("pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"):
            token = _token_text(named.get(key))
            if token in index:
                specials.add(index[token])
        for key in ("additional_special_tokens", "extra_special_tokens"):
            specials.update(index[t] for t in map(_token_text, _as_list(named.get(key))) if t in index)
    unk = files.model.get("unk_token")
    if files.model_type == "Unigram" and files.model.get("unk_id") is not None:
        specials.add(files.model["unk_id"])
    elif unk in index:
        specials.add(index[unk])
    add("special", specials)
    processor = files.tokenizer_json.get("post_processor")
    add("post-processor", (i for node in _walk(processor) for i in _processor_ids(node)))
    add("sentinel", (i for t, i in index.items() if SENTINEL.fullmatch(t)))
    add("mode", (index[t] for t in MODE_TOKENS if t in index))
    add("byte", (i for t, i in index.items() if BYTE_PIECE.fullmatch(t)))
    if files.sentencepiece is not None:
        pieces = sentencepiece_pieces(files.sentencepiece)
        add("non-normal piece", (i for i, p in enumerate(pieces) if p.type != NORMAL))
        normal = [i for i, p in enumerate(pieces) if p.type == NORMAL]
        if normal:  # SentencePiece's unknown penalty is the minimum NORMAL score minus 10
            add("min-score anchor", [min(normal, key=lambda i: (pieces[i].score, -i))])
    if WHITESPACE_PIECE in index and not files.byte_level():
        # spaces are written as "▁" before the model runs; without its piece they would fall back to the bytes of
        # "▁", which the decoder turns back into "▁", not " "
        add("whitespace", [index[WHITESPACE_PIECE]])
    add("alphabet", _alphabet(files, index, keep_alphabet))
    if files.model_type == "Unigram" and files.model["vocab"]:
        scores = [s for _, s in files.model["vocab"]]  # tokenizers' unknown penalty: minimum over all scores
        add("min-score anchor", [min(range(len(scores)), key=lambda i: (scores[i], -i))])
    missing = [t for t in extra_tokens if t not in index]
    if missing:
        raise UserError(f"tokens to keep are not in the tokenizer: {missing[:5]}")
    add("requested", (index[t] for t in extra_tokens))
    return _first_reason(reasons)


def _first_reason(reasons: dict[str, set[int]]) -> dict[str, list[int]]:
    seen: set[int] = set()
    out = {}
    for reason, ids in reasons.items():
        fresh = sorted(ids - seen)
        if fresh:
            out[reason] = fresh
        seen |= ids
    return out


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _as_list(value: Any) -> list:
    if isinstance(value, dict):  # transformers 5 may store extra special tokens as {name: token}
        return list(value.values())
    return list(value or [])


def _processor_ids(node: dict) -> list[int]:
    ids = list(node.get("ids", [])) if isinstance(node.get("ids"), list) else []
    for key in ("sep", "cls"):  # Bert/RobertaProcessing: [token, id]
        if isinstance(node.get(key), list) and len(node[key]) == 2:
            ids.append(node[key][1])
    return ids


def _alphabet(files: TokenizerFiles, index: dict[str, int], keep_alphabet: bool) -> list[int]:
    """Pieces without which some text could no longer be segmented at all (see the module docstring)."""
    kind = files.model_type
    if kind == "BPE" and files.byte_level():  # the 256 byte symbols: without them text cannot be encoded at all
        from tokenizers import pre_tokenizers

        return [index[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in index]
    if not keep_alphabet:
        return []
    if kind == "BPE":
        if files.byte_fallback():
            return []  # the <0x..> pieces are required already
        produced = {_merge_result(a, b, files.model) for a, b in _merges(files.model)}
        return [i for t, i in files.model_vocab().items() if t not in produced]
    if kind == "Unigram":
        if files.byte_fallback():
            return []
        return [i for t, i in files.model_vocab().items() if len(t) == 1]
    if kind == "WordPiece":
        prefix = files.model.get("continuing_subword_prefix", "##")
        return [i for t, i in files.model_vocab().items()
                if len(t) == 1 or (t.startswith(prefix) and len(t) == len(prefix) + 1)]
    return []


# --- BPE merges ----------------------------------------------------------------------------------------------------
def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _merge_result(a: str, b: str, model: dict) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    if prefix and b.startswith(prefix):
        b = b[len(prefix):]
    suffix = model.get("end_of_word_suffix") or ""
    if suffix and a.endswith(suffix):
        a = a[: -len(suffix)]
    return a + b


class MergeClosure:
    """For BPE: the ids a token needs to be producible -- every symbol of its own merge derivation."""

    def __init__(self, files: TokenizerFiles):
        self.model = files.model
        self.vocab = files.model_vocab()
        self.ranks = {pair: rank for rank, pair in enumerate(_merges(self.model))}
        self.producers: dict[str, list[tuple[str, str]]] = {}
        for a, b in self.ranks:
            self.producers.setdefault(_merge_result(a, b, self.model), []).append((a, b))
        self.cache: dict[str, set[str]] = {}

    def needed(self, token_id: int, tokens: list[str | None]) -> set[int]:
        token = tokens[token_id]
        if token is None or token not in self.vocab or self.vocab[token] != token_id:
            return {token_id}  # an added token: matched before the model runs, needs nothing
        return {self.vocab[t] for t in self._symbols(token)} | {token_id}

    def _symbols(self, token: str) -> set[str]:
        if token not in self.cache:
            derived = self._derivation(token)
            if derived is None:  # no clean derivation: keep every way of building it (conservative)
                derived = {token}
                for a, b in self.producers.get(token, []):
                    derived |= self._symbols(a) | self._symbols(b)
            self.cache[token] = derived
        return self.cache[token]

    def _initial(self, token: str) -> list[str]:
        prefix = self.model.get("continuing_subword_prefix") or ""
        suffix = self.model.get("end_of_word_suffix") or ""
        body, first_prefix, last_suffix = token, "", ""
        if prefix and token.startswith(prefix) and len(token) > len(prefix):
            body, first_prefix = token[len(prefix):], prefix
        if suffix and body.endswith(suffix) and len(body) > len(suffix):
            body, last_suffix = body[: -len(suffix)], suffix
        chars = list(body)
        symbols = [(prefix if i > 0 else first_prefix) + c for i, c in enumerate(chars)]
        symbols[-1] += last_suffix
        return symbols

    def _derivation(self, token: str) -> set[str] | None:
        """Run BPE on the token's own characters (lowest rank first, leftmost on ties), collecting every symbol."""
        if not token:
            return None
        symbols = self._initial(token)
        seen = set(symbols)
        while len(symbols) > 1:
            best = min(((self.ranks.get((symbols[i], symbols[i + 1])), i) for i in range(len(symbols) - 1)
                        if (symbols[i], symbols[i + 1]) in self.ranks), default=None)
            if best is None:
                break
            i = best[1]
            symbols[i : i + 2] = [_merge_result(symbols[i], symbols[i + 1], self.model)]
            seen.add(symbols[i])
        if symbols != [token] or any(s not in self.vocab for s in seen):
            return None
        return seen


# --- rewriting the files -------------------------------------------------------------------------------------------
def prune_tokenizer_json(tokenizer_json: dict, keep: list[int]) -> dict:
    """A copy of tokenizer.json in which old id `keep[i]` is id i; removed tokens and merges are gone."""
    old_to_new = {old: new for new, old in enumerate(keep)}
    out = json.loads(json.dumps(tokenizer_json))
    model = out["model"]
    kind = model["type"]
    if kind == "Unigram":
        vocab = model["vocab"]
        model["vocab"] = [vocab[old] for old in keep if old < len(vocab)]
        if model.get("unk_id") is not None:
            model["unk_id"] = old_to_new[model["unk_id"]]
    else:
        by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
        model["vocab"] = {t: old_to_new[i] for t, i in by_id if i in old_to_new}
        if kind == "BPE":
            kept = model["vocab"]
            merges = model.get("merges", [])
            model["merges"] = [m for m, (a, b) in zip(merges, _merges(model))
                               if a in kept and b in kept and _merge_result(a, b, model) in kept]
    removed = [t["content"] for t in out.get("added_tokens", []) if t["id"] not in old_to_new]
    if removed:
        raise UserError(f"added tokens must be kept, but the keep list drops {removed[:5]}")
    for token in out.get("added_tokens", []):
        token["id"] = old_to_new[token["id"]]
    for node in _walk(out.get("post_processor")):
        if isinstance(node.get("ids"), list):
            node["ids"] = [old_to_new[i] for i in node["ids"]]
        for key in ("sep", "cls"):
            if isinstance(node.get(key), list) and len(node[key]) == 2:
                node[key] = [node[key][0], old_to_new[node[key][1]]]
    return out


def write_pruned_tokenizer(files: TokenizerFiles, keep: list[int], out_dir: str | Path) -> list[str]:
    """Write the pruned tokenizer files into `out_dir` (copying the rest); return the names of the files written."""
    keep = sorted(set(int(i) for i in keep))
    tokens = files.tokens()
    unknown = [i for i in keep if not 0 <= i < len(tokens) or tokens[i] is None]
    if unknown:
        raise UserError(f"keep list names id {unknown[0]}, which is no token of the tokenizer ({len(tokens)} ids)")
    old_to_new = {old: new for new, old in enumerate(keep)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned = prune_tokenizer_json(files.tokenizer_json, keep)
    written = {"tokenizer.json": json.dumps(pruned, ensure_ascii=False, indent=2) + "\n"}
    blobs: dict[str, bytes] = {}
    if files.sentencepiece is not None:
        blobs[files.sentencepiece_name] = prune_sentencepiece(files.sentencepiece, keep)
    config = json.loads(json.dumps(files.config))
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in config["added_tokens_decoder"].items()
                                          if int(k) in old_to_new}
    if files.config:
        written["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    source = files.directory
    if (source / "added_tokens.json").is_file():
        added = json.loads((source / "added_tokens.json").read_text(encoding="utf-8"))
        written["added_tokens.json"] = json.dumps({t: old_to_new[i] for t, i in added.items() if i in old_to_new},
                                                  ensure_ascii=False, indent=2) + "\n"
    if (source / "vocab.json").is_file() and pruned["model"]["type"] in ("BPE", "WordLevel"):
        written["vocab.json"] = json.dumps(pruned["model"]["vocab"], ensure_ascii=False) + "\n"
    if (source / "merges.txt").is_file() and pruned["model"]["type"] == "BPE":
        lines = [" ".join(m) if not isinstance(m, str) else m for m in pruned["model"]["merges"]]
        written["merges.txt"] = "#version: 0.2\n" + "".join(line + "\n" for line in lines)
    if (source / "vocab.txt").is_file() and pruned["model"]["type"] == "WordPiece":
        vocab = sorted(pruned["model"]["vocab"].items(), key=lambda x: x[1])
        written["vocab.txt"] = "".join(t + "\n" for t, _ in vocab)
    for name in sorted(_tokenizer_side_files(source) - set(written) - set(blobs)):
        shutil.copy2(source / name, out_dir / name)
    for name, text in written.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    for name, blob in blobs.items():
        (out_dir / name).write_bytes(blob)
    return sorted(set(written) | set(blobs))


TOKENIZER_SIDE_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _tokenizer_side_files(source: Path) -> set[str]:
    """Tokenizer files that hold no ids and are copied as they are."""
    return {name for name in TOKENIZER_SIDE_FILES if (source / name).is_file()}
