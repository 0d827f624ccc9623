"""The fast tokenizer of a public OpenBA release, built from its SentencePiece model.

The release ships a slow, remote-code tokenizer (`OpenBATokenizer`, T5's design): `spiece.model` (mT5 pieces, with
nmt_nfkc normalisation), 100 sentinels `<extra_id_N>` above the pieces with `<extra_id_0>` the highest id
(id = pieces + 99 - N), and `</s>` appended to every encoding. As every transformers slow tokenizer of its time
(4.31), it splits the text on special tokens, strips the whitespace around them, and encodes each chunk with
SentencePiece on its own. The UL2 mode tokens `<R>`/`<S>`/`<X>` are ordinary SentencePiece user-defined pieces when
the release holds them.

`release_tokenizer` rebuilds that behaviour as a `tokenizers` pipeline (tokenizer.json), so `AutoTokenizer` loads it
without remote code and encodes as the release does: transformers' own SentencePiece translation
(`SpmConverter.build_tokenizer_from_spm_proto`, legacy mode: every chunk between special tokens gets the dummy
prefix) over the release's pieces, the sentinels at the release's ids, special tokens that absorb the whitespace
around them, and the `</s>` post-processor. The protobuf package is not a dependency: the proto is read at the wire
level (`read_spm_proto`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

SENTINEL = "<extra_id_{}>"
SENTINEL_PATTERN = re.compile(r"<extra_id_(\d+)>")
MODE_TOKENS = ("<R>", "<S>", "<X>")
# sentencepiece_model.proto: piece types and field numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class TrainerSpec:
    model_type: int = 1  # UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    unk_piece: str = "<unk>"


@dataclass
class NormalizerSpec:
    name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass
class SpmProto:
    """The fields of a SentencePiece ModelProto that tokenization depends on (attribute names as protobuf's)."""

    pieces: list[Piece] = field(default_factory=list)
    trainer_spec: TrainerSpec = field(default_factory=TrainerSpec)
    normalizer_spec: NormalizerSpec = field(default_factory=NormalizerSpec)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def read_spm_proto(data: bytes) -> SpmProto:
    """Parse the parts of a SentencePiece model that tokenization needs; a one-line error if it is not one."""
    proto = SpmProto()
    try:
        for number, _, value in _fields(data):
            if number == 1:
                piece = Piece("")
                for sub, _, sub_value in _fields(value):
                    if sub == 1:
                        piece.piece = sub_value.decode("utf-8")
                    elif sub == 2:
                        piece.score = struct.unpack("<f", sub_value)[0]
                    elif sub == 3:
                        piece.type = sub_value
                proto.pieces.append(piece)
            elif number == 2:
                for sub, _, sub_value in _fields(value):
                    if sub == 3:
                        proto.trainer_spec.model_type = sub_value
                    elif sub == 35:
                        proto.trainer_spec.byte_fallback = bool(sub_value)
                    elif sub == 40:
                        proto.trainer_spec.unk_id = sub_value
                    elif sub == 45:
                        proto.trainer_spec.unk_piece = sub_value.decode("utf-8")
            elif number == 3:
                spec = proto.normalizer_spec
                for sub, _, sub_value in _fields(value):
                    if sub == 1:
                        spec.name = sub_value.decode("utf-8")
                    elif sub == 2:
                        spec.precompiled_charsmap = bytes(sub_value)
                    elif sub == 3:
                        spec.add_dummy_prefix = bool(sub_value)
                    elif sub == 4:
                        spec.remove_extra_whitespaces = bool(sub_value)
                    elif sub == 5:
                        spec.escape_whitespaces = bool(sub_value)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as err:
        raise UserError(f"not a SentencePiece model: {err}") from None
    if not proto.pieces:
        raise UserError("not a SentencePiece model: it holds no pieces")
    return proto


@dataclass
class ReleaseVocabulary:
    """Where the release's tokens sit: pieces 0..N-1, sentinels N..N+extra-1, then tokens added on request."""

    pieces: int
    extra_ids: int
    mode_tokens_in_model: dict[str, int]
    added_mode_tokens: dict[str, int]

    @property
    def size(self) -> int:
        return self.pieces + self.extra_ids + len(self.added_mode_tokens)


def release_tokenizer(spiece: bytes, extra_ids: int = 100, add_mode_tokens: bool = False,
                      special: dict[str, str] | None = None):
    """(PreTrainedTokenizerFast, ReleaseVocabulary) for the release's SentencePiece model.

    `add_mode_tokens` adds `<R>`/`<S>`/`<X>` after the sentinels when the model does not hold them as pieces.
    `special` names the pad/eos/unk tokens (the release's special_tokens_map.json); T5's by default.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_spm_proto(spiece)
    if proto.trainer_spec.model_type != 1:
        raise UserError("the release's spiece.model is not a unigram model; OpenBA's (mT5's) is")
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", **(special or {})}
    piece_ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    for name in ("pad_token", "eos_token", "unk_token"):
        if special[name] not in piece_ids:
            raise UserError(f"the release's spiece.model has no {name} {special[name]!r}")
    if any(SENTINEL_PATTERN.fullmatch(p.piece) for p in proto.pieces):
        raise UserError("the release's spiece.model already holds <extra_id_N> pieces; expected them above it")
    in_model = {t: piece_ids[t] for t in MODE_TOKENS if t in piece_ids}
    sentinels = [SENTINEL.format(n) for n in range(extra_ids - 1, -1, -1)]  # <extra_id_0> gets the highest id
    added = {}
    if add_mode_tokens and not in_model:
        added = {t: len(proto.pieces) + extra_ids + k for k, t in enumerate(MODE_TOKENS)}
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(t, 0.0) for t in sentinels + list(added)]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tokenizer is None:
        raise UserError("could not translate the release's spiece.model into a tokenizers pipeline")
    # The release's slow tokenizer splits on special tokens and strips the whitespace around them
    names = [special["pad_token"], special["eos_token"], special["unk_token"]] + sentinels + list(added)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=True, rstrip=True)
                                  for t in names])
    eos = special["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, piece_ids[eos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **special, extra_special_tokens=sentinels + list(added),
    )
    layout = ReleaseVocabulary(len(proto.pieces), extra_ids, in_model, added)
    for token, token_id in [(SENTINEL.format(0), layout.pieces + extra_ids - 1), *added.items()]:
        if fast.convert_tokens_to_ids(token) != token_id:
            raise AssertionError(f"{token} landed at {fast.convert_tokens_to_ids(token)}, not {token_id}")
    return fast, layout


def save_release_tokenizer(fast, spiece: bytes, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json (no remote code) + special_tokens_map.json + spiece.model."""
    fast.save_pretrained(str(directory))
    (directory / "spiece.model").write_bytes(spiece)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
