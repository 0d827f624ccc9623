"""Preference batches, data settings and the shared workspace of the align tests (models and tokenizers come from
tests/factory.py)."""

import torch

from tests.factory import VOCAB, byte_tokenizer, save_byte_checkpoint


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


# ---------------------------------------------------------------------------------------------------- workspace

import pytest  # noqa: E402

DATA_SETTINGS = ["data.samples=8", "data.chunk_size=128", "data.document_chunks=10", "data.context_chunks=6",
                 "data.full_chunks=3", "data.half_chunks=2", "data.wrong_chunks=2"]
POSITION_SETTINGS = ["position.window=4096", "position.chunk_size=128", "position.max_chunks=8"]


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
        save_byte_checkpoint(family, root / family, tokenizer)
    config = load_config(BuildDataConfig, None, [f"tokenizer={root / 'tokenizer'}", f"corpus_dir={root / 'corpus'}",
                                                 *DATA_SETTINGS])
    build(config, root / "data")
    return root
