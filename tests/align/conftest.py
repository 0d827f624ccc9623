"""Tiny models and preference batches for the align tests (models from tests/compress/conftest.py)."""

import torch

from tests.compress.conftest import VOCAB, build_tiny  # noqa: F401  (re-exported for the align tests)


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
