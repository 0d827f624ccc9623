"""Hub checkpoints that ship only a SentencePiece model (Llama-2's tokenizer.model, T5's spiece.model) and no
tokenizer.json: transformers 5 converts them with the protobuf package, so without it the error names that package
(transformers itself blames a missing `tiktoken`)."""

import importlib.util
import io
import json

import pytest
import sentencepiece as spm

from core.checkpoint import load_tokenizer
from core.errors import UserError

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 40


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:
        return False


def sentencepiece_only(directory, name="tokenizer.model", tokenizer_class="LlamaTokenizer"):
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=proto, model_type="bpe", vocab_size=320,
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    directory.mkdir()
    (directory / name).write_bytes(proto.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, "bos_token": "<s>",
                                                                 "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


@pytest.mark.skipif(_has_protobuf(), reason="protobuf is installed: the SentencePiece model loads")
def test_without_protobuf_a_sentencepiece_only_tokenizer_is_one_line_naming_protobuf(tmp_path):
    with pytest.raises(UserError, match="pip install protobuf") as err:
        load_tokenizer(sentencepiece_only(tmp_path / "llama"))
    assert "\n" not in str(err.value) and "tiktoken" not in str(err.value)


@pytest.mark.skipif(not _has_protobuf(), reason="transformers needs protobuf to read a SentencePiece model")
def test_with_protobuf_a_sentencepiece_only_tokenizer_loads_and_round_trips(tmp_path):
    tokenizer = load_tokenizer(sentencepiece_only(tmp_path / "llama"))
    ids = tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "def add(a, b):"
