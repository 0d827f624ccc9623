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
