"""Preference batches, data settings and the shared workspace (corpus, byte tokenizer, checkpoints, preference
rows) of the align tests; models and tokenizers come from tests/factory.py."""

import torch

from tests.factory import VOCAB


def preference_batch(rows: int = 2, responses: int = 3, prompt: int = 10, length: int = 4, seed: int = 0,
                     gap: bool = False) -> dict:
    """A right-padded preference batch with uneven prompt and response lengths (row 1's prompt is shorter)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, prompt), generator=generator)
    mask = torch.ones(rows, prompt, dtype=torch.long)
    mask[-1, prompt - 3:] = 0
    positions = torch.arange(prompt).expand(rows, prompt).clone()
    if gap:  # synthesised positions: a jump in the middle of the context
        positions[:, prompt // 2:] += 40
    response_ids = torch.randint(3, VOCAB, (rows, responses, length), generator=generator)
    response_mask = torch.ones(rows, responses, length, dtype=torch.long)
    response_mask[0, 1, length // 2:] = 0
    response_mask[-1, -1, 1:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "position_ids": positions, "response_ids": response_ids,
            "response_mask": response_mask}


def byte_tokenizer(directory):
    """A byte-level tokenizer (ids 0-2 pad/eos/unk, then the 256 bytes) saved to `directory`: no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{char: 3 + i for i, char in enumerate(sorted(alphabet))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


BYTE_VOCAB = 3 + 256


# ---------------------------------------------------------------------------------------------------- workspace

import pytest  # noqa: E402

DATA_SETTINGS = ["data.samples=8", "data.chunk_size=128", "data.document_chunks=10", "data.context_chunks=6",
                 "data.full_chunks=3", "data.half_chunks=2", "data.wrong_chunks=2"]
POSITION_SETTINGS = ["position.window=4096", "position.chunk_size=128", "position.max_chunks=8"]


def tiny_checkpoint(family: str, directory, tokenizer) -> None:
    """A tiny random Llama or OpenBA over the byte vocabulary, saved with the tokenizer."""
    from transformers import AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

    from core.checkpoint import save_checkpoint
    from core.openba import openba_config

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                                             bos_token_id=None))
    else:
        model = AutoModelForSeq2SeqLM.from_config(openba_config(
            "openba-tiny", vocab_size=BYTE_VOCAB, hidden_size=64, kv_channels=16, num_heads=4, ffn_hidden_size=128,
            num_layers=1, num_decoder_layers=2, max_seq_length=1024, decoder_max_seq_length=1024))
    save_checkpoint(model, tokenizer, directory)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A small saved corpus, a byte tokenizer, tiny Llama and OpenBA checkpoints and 8 preference rows."""
    from align.build_data import BuildDataConfig, build
    from core.config import load_config
    from pretrain.corpus import CorpusConfig, build_corpus, save_corpus

    root = tmp_path_factory.mktemp("align")
    corpus = CorpusConfig(max_documents=30)
    save_corpus(build_corpus(corpus), corpus, root / "corpus")
    tokenizer = byte_tokenizer(root / "tokenizer")
    for family in ("llama", "openba"):
        tiny_checkpoint(family, root / family, tokenizer)
    config = load_config(BuildDataConfig, None, [f"tokenizer={root / 'tokenizer'}", f"corpus_dir={root / 'corpus'}",
                                                 *DATA_SETTINGS])
    build(config, root / "data")
    return root
