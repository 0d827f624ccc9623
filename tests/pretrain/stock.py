"""Tiny stock-style checkpoints: a random model of a transformers family saved beside a tokenizer of the kind that
family ships on the hub, trained here on corpus text (no downloads).

- Llama-3 / Qwen2 / GPT-NeoX: byte-level BPE in tokenizer.json, their own special tokens (Llama-3 adds
  <|begin_of_text|> through its post-processor; none of them has a pad token except Qwen2, whose pad is its eos).
- Mistral (and Llama-2): SentencePiece-style BPE with byte fallback (<0x00>..<0xFF> pieces), <unk>/<s>/</s> at 0-2.
- T5: a SentencePiece unigram (spiece.model) with pad 0, eos 1, unk 2 and the 100 <extra_id_N> sentinels added above
  the pieces in reverse order (<extra_id_0> is the last id), the embedding padded beyond the tokenizer as t5 ships.

None of them has the UL2 mode tokens <R>/<S>/<X>; only T5 has sentinels.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.factory import tiny_model

FAMILIES = ("llama", "qwen2", "mistral", "gpt_neox", "t5")
BPE_VOCAB = 400
T5_PIECES = 400
T5_SENTINELS = 100


def _byte_level_bpe(texts: list[str], specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def llama3_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = _byte_level_bpe(texts, ["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", clean_up_tokenization_spaces=False)


def qwen2_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = _byte_level_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def gpt_neox_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = _byte_level_bpe(texts, ["<|endoftext|>", "<|padding|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def mistral_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # trained on words (whole documents as one word take seconds); encoding as the hub files do, unsplit
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB + 256, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces],
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def t5_tokenizer(texts: list[str], directory: Path) -> PreTrainedTokenizerFast:
    """spiece.model (pieces 0..P-1) + tokenizer.json whose sentinels sit above the pieces, <extra_id_0> last."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, model_type="unigram",
                                   vocab_size=T5_PIECES, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, max_sentence_length=1 << 16, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(sp.id_to_piece(i), 0.0 if sp.is_control(i) else sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "), normalizers.Replace("\t", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace(replacement="▁",
                                                                                prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    sentinels = [f"<extra_id_{n}>" for n in reversed(range(T5_SENTINELS))]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<pad>", "</s>", "<unk>"]])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sentinels])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=sentinels[::-1],
                                   clean_up_tokenization_spaces=False)


def stock_checkpoint(family: str, directory: Path, texts: list[str], seed: int = 0, **model_overrides) -> Path:
    """Save a tiny random `family` model and its family's kind of tokenizer into `directory`."""
    directory = Path(directory)
    if family == "llama":
        tokenizer = llama3_tokenizer(texts)
    elif family == "qwen2":
        tokenizer = qwen2_tokenizer(texts)
    elif family == "gpt_neox":
        tokenizer = gpt_neox_tokenizer(texts)
    elif family == "mistral":
        tokenizer = mistral_tokenizer(texts)
    elif family == "t5":
        tokenizer = t5_tokenizer(texts, directory)
    else:
        raise ValueError(family)
    size = len(tokenizer)
    if family == "t5":  # t5 ships 32128 rows for 32100 ids
        shape = dict(vocab_size=size + 28, num_layers=2, num_decoder_layers=2, pad_token_id=0, eos_token_id=1)
    else:  # two blocks of 4 heads, 1024 positions, the tokenizer's special ids
        shape = dict(vocab_size=size, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
        if family != "gpt_neox":  # the others group their heads for keys and values
            shape["num_key_value_heads"] = 2
        if family == "qwen2":  # Qwen2 pads its embedding beyond the tokenizer (151936 rows for 151665 ids)
            shape["vocab_size"] = size + 16
        if family == "mistral":
            shape["sliding_window"] = 256
    model = tiny_model(family, seed, **{**shape, **model_overrides})
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------------------------------------------- fixtures

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stock_corpus(tmp_path_factory) -> Path:
    """A saved corpus of 40 stdlib documents (train / calibration / validation splits)."""
    from pretrain.corpus import CorpusConfig, load_or_build_corpus

    root = tmp_path_factory.mktemp("stock-corpus")
    config = CorpusConfig(max_documents=40, validation_size=0.2)
    load_or_build_corpus(config, root)
    return root / f"corpus-{config.fingerprint()}"


@pytest.fixture(scope="session")
def stock_dirs(stock_corpus, tmp_path_factory):
    """`stock_dirs(family)`: that family's tiny stock-style checkpoint directory, built once per session."""
    import datasets

    root = tmp_path_factory.mktemp("stock")
    texts = list(datasets.load_from_disk(str(stock_corpus))["train"]["text"])
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = stock_checkpoint(family, root / family, texts)
        return built[family]

    return get
