"""The SentencePiece tokenizer: loads through AutoTokenizer, is lossless, matches SentencePiece id for id."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from core.errors import UserError
from pretrain import tokenizer as tokenizer_module
from pretrain.corpus import CorpusConfig, build_corpus
from pretrain.tokenizer import (
    MODE_TOKENS, TokenizerConfig, load_tokenizer, mode_token_ids, sentinel_ids, train_tokenizer,
)

CONFIG = TokenizerConfig(vocab_size=1024, max_training_chars=600_000)
TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn  x   \n\n\n",
    "    indented\r\n        more    spaces\t\ttabs \n",
    "  leading and trailing spaces  ",
    "emoji 😀🚀 and CJK 日本語の文章 and café, naïve, Ωμέγα",
    "literal byte names <0x41> <0x0A> and markup <b>x</b>",
    "\x00\x01\x7f control characters \u200b zero width",
    "",
    " ",
    "\n",
    "<extra_id_0>x<extra_id_99><R><S><X>",
]


@pytest.fixture(scope="session")
def corpus():
    return build_corpus(CorpusConfig(max_documents=60, max_chars_per_document=20_000, validation_size=0.1))


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory):
    return train_tokenizer(corpus, CONFIG, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def sp(tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


def roundtrip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_directory_holds_the_files_autotokenizer_needs(tokenizer_dir, tok):
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert len(tok) == CONFIG.vocab_size


def test_encode_decode_is_lossless_on_every_validation_document(corpus, tok):
    texts = corpus["validation"]["text"]
    assert texts
    assert [t for t in texts if roundtrip(tok, t) != t] == []


@pytest.mark.parametrize("text", TRICKY)
def test_encode_decode_is_lossless_on_whitespace_bytes_and_unicode(tok, text):
    assert roundtrip(tok, text) == text


def test_fast_ids_equal_sentencepiece_ids(corpus, tok, sp):
    texts = list(corpus["validation"]["text"]) + list(corpus["calibration"]["text"]) + TRICKY
    fast = tok(texts, add_special_tokens=False)["input_ids"]
    differ = [t[:60] for t, ids in zip(texts, fast) if ids != sp.encode(t)]
    assert differ == []


def test_special_ids_and_no_bos_or_automatic_eos(tok, sp):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    ids = tok("hello world")["input_ids"]
    assert ids == tok("hello world", add_special_tokens=False)["input_ids"]
    assert 1 not in ids


def test_sentinels_and_mode_tokens_are_one_id_each_and_agree_with_sentencepiece(tok, sp):
    sentinels = sentinel_ids(tok)
    assert len(sentinels) == 100 and len(set(sentinels)) == 100
    modes = mode_token_ids(tok)
    assert set(modes) == {"R", "S", "X"}
    for token, token_id in [(f"<extra_id_{i}>", s) for i, s in enumerate(sentinels)] + \
                           [(MODE_TOKENS[m], i) for m, i in modes.items()]:
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
        assert sp.encode(token) == [token_id] and sp.piece_to_id(token) == token_id
    assert sentinels[0] not in tok("plain text <extra_id_0 >", add_special_tokens=False)["input_ids"]


def test_sentinels_are_skipped_as_special_when_decoding(tok):
    ids = tok("a<extra_id_0>b<R>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_scores_are_rounded_so_both_libraries_break_ties_alike(sp):
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    assert all(score * 32 == round(score * 32) for score in scores)


def test_missing_or_empty_tokenizer_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_too_small_vocab_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size"):
        TokenizerConfig(vocab_size=300)


def test_vocab_larger_than_the_text_allows_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="lower --vocab-size"):
        train_tokenizer(["tiny text, few pieces"] * 20, TokenizerConfig(vocab_size=4096), tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_cli_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        tokenizer_module.main(["--help"])
    assert "examples:\n  python -m pretrain.corpus --out" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved_corpus(tmp_path_factory):
    from pretrain.corpus import save_corpus

    config = CorpusConfig(max_documents=12)
    return save_corpus(build_corpus(config), config, tmp_path_factory.mktemp("corpus") / "corpus")


def test_the_command_trains_saves_and_checks_on_validation(saved_corpus, tmp_path, capsys):
    from core.stage import Manifest

    out = tmp_path / "tok"
    tokenizer_module.main(["--corpus", str(saved_corpus), "--out", str(out), "--vocab-size", "600",
                           "--max-training-chars", "100000", "--no-progress"])
    manifest = Manifest.read(out)
    assert manifest.stage == "tokenizer" and manifest.config["corpus"] == str(saved_corpus)
    assert manifest.metrics["vocab_size"] == len(load_tokenizer(out)) == 600
    check = manifest.metrics["validation"]
    assert check["lossless"] == check["same_ids"] == check["texts"] > 0
    assert "ids equal SentencePiece" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["vocabulary too large", "not a corpus", "inside the corpus", "too small"])
def test_bad_input_is_one_error_and_nothing_is_written(case, saved_corpus, tmp_path, capsys):
    import shutil

    from tests.core.test_out_policy import refused

    corpus = Path(shutil.copytree(saved_corpus, tmp_path / "corpus"))
    out, extra = tmp_path / "tok", ["--vocab-size", "600"]
    if case == "vocabulary too large":
        extra, expected = ["--vocab-size", "100000"], "lower --vocab-size"
    elif case == "not a corpus":
        corpus, expected = corpus / "train", "is not a saved corpus"
    elif case == "inside the corpus":
        out, expected = corpus / "tok", "lies inside it"
    else:
        extra, expected = ["--vocab-size", "300"], "leaves too few learned pieces"

    def tokenizer(_model, output):
        tokenizer_module.main(["--corpus", str(corpus), "--out", str(output), "--max-training-chars", "100000",
                               "--no-progress", *extra])

    assert expected in refused(tokenizer, None, out, tmp_path, capsys)
