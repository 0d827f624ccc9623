"""Position synthesis: a short real context carries position ids spread over a long window (LOGO, section 3.3).

The real context is at most N chunks of `chunk_size` tokens (paper: 16 x 512 = 8K) standing for a window of K
positions (paper: 64K for 8K models). Positions are contiguous inside a chunk and skip between chunks: token i of
chunk j (1-based) gets position i + b with b ~ U(1, j * (K - k) / N), k the real length. Two strategies are mixed
9:1 (`sparse_fraction` 0.1):

    continuous  one bias per chunk: a chunk keeps its internal spacing, the gap sits between chunks
    sparse      one bias per token: gaps inside chunks too

Independent draws could put a later chunk before an earlier one, and the paper keeps chunks in order, so the drawn
biases are made non-decreasing: sorted inside a chunk (sparse) and then a running maximum along the sequence. Since
the token index grows by one and the bias never falls, positions are strictly increasing. The question and the
answers sit at the end of the window: they all get the largest bias K - k, so the longest response ends on K - 1.

What cannot fit is an error, never a silently wrong position: a context longer than N chunks, or a real length
above the window. Encoder-decoders place the context and the question in the encoder (the synthesised positions);
their responses are decoded from position 0 as in pretraining, so only their length is checked against the window.

RoPE base scaling (`rope_theta`) is this framework's option, applied through `pretrain.long_context`; LOGO itself
changes no base (it credits Llama-3's base 500000 for scaling).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from core.errors import UserError

STRATEGIES = ("continuous", "sparse")


@dataclasses.dataclass
class PositionConfig:
    """Position synthesis settings (LOGO defaults for an 8K model aligned at 64K)."""

    synthesize: bool = True
    """Spread the real context over `window` positions; off: plain positions 0..k-1 (an ordinary short step)."""
    window: int = 65536
    """K: the context window the short sequence stands for (LOGO-64K for 8K models; a long model keeps its native
    window, e.g. 80K). The model's supported length is raised to it (`pretrain.long_context.train_seq_len`)."""
    chunk_size: int = 512
    """Tokens per chunk: positions are contiguous inside a chunk (LOGO: 512)."""
    max_chunks: int = 16
    """N: the real context holds at most this many chunks (LOGO: 16 x 512 = 8K real tokens); a longer context is an
    error, because dropping its tail would drop the facts the question asks about."""
    sparse_fraction: float = 0.1
    """Share of samples with one bias per token (sparse-chunk) instead of one per chunk (continuous): LOGO 9:1."""
    rope_theta: float | None = None
    """New RoPE base applied before training (our option, not LOGO's default); None keeps the model's."""

    def __post_init__(self):
        if self.chunk_size < 1 or self.max_chunks < 1:
            raise UserError("chunk_size and max_chunks must be at least 1")
        if not 0.0 <= self.sparse_fraction <= 1.0:
            raise UserError(f"sparse_fraction must be in [0, 1], got {self.sparse_fraction}")
        if self.window < 1:
            raise UserError(f"window must be positive, got {self.window}")

    @property
    def real_context(self) -> int:
        """Most context tokens a training sequence holds (N x chunk size)."""
        return self.chunk_size * self.max_chunks


def chunk_lengths_of(context: int | Sequence[int], config: PositionConfig) -> list[int]:
    """Chunk lengths of a context: given as a list, or a token count split into `chunk_size` pieces."""
    if isinstance(context, int):
        full, rest = divmod(context, config.chunk_size)
        return [config.chunk_size] * full + ([rest] if rest else [])
    return [int(length) for length in context if int(length) > 0]


def check_fits(config: PositionConfig, context: int | Sequence[int], tail_length: int) -> None:
    """UserError unless the context chunks and `tail_length` question/answer tokens fit the real context and window."""
    chunks = chunk_lengths_of(context, config)
    context_length = sum(chunks)
    if len(chunks) > config.max_chunks or context_length > config.real_context:
        raise UserError(f"context of {context_length} tokens in {len(chunks)} chunks exceeds the real context of "
                        f"{config.max_chunks} chunks x {config.chunk_size} tokens = {config.real_context}; raise "
                        "position.max_chunks or build the data with fewer chunks")
    if max(chunks, default=0) > config.chunk_size:
        raise UserError(f"a context chunk has {max(chunks)} tokens, more than position.chunk_size="
                        f"{config.chunk_size}; build the data with the same chunk size")
    if context_length + tail_length > config.window:
        raise UserError(f"context ({context_length}) plus question and response ({tail_length}) = "
                        f"{context_length + tail_length} tokens exceeds the synthesised window of {config.window}; "
                        "raise position.window or shorten the responses")


def choose_strategy(config: PositionConfig, generator: torch.Generator) -> str:
    """continuous or sparse, in LOGO's 9:1 mix by default."""
    return "sparse" if torch.rand((), generator=generator).item() < config.sparse_fraction else "continuous"


def _uniform_biases(upper: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integer draws from U(1, upper) (0 where upper < 1: no room to skip)."""
    high = upper.floor().long()
    draws = 1 + (torch.rand(upper.shape, generator=generator, dtype=torch.float64) * high.clamp(min=1)).floor().long()
    return torch.where(high >= 1, draws.clamp(max=high.clamp(min=1)), torch.zeros_like(high))


def context_biases(chunks: Sequence[int], real_length: int, config: PositionConfig, strategy: str,
                   generator: torch.Generator) -> torch.Tensor:
    """Non-decreasing bias per context token, each within its chunk's bound j * (K - k) / N."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    chunks = [int(length) for length in chunks if int(length) > 0]
    if not chunks:
        return torch.zeros(0, dtype=torch.long)
    room = config.window - real_length
    chunk_of_token = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(chunks))
    bound = torch.arange(1, len(chunks) + 1, dtype=torch.float64) * room / len(chunks)
    if strategy == "continuous":
        per_chunk = torch.cummax(_uniform_biases(bound, generator), dim=0).values
        return per_chunk[chunk_of_token]
    per_token = _uniform_biases(bound[chunk_of_token], generator)
    # chunks are contiguous runs, so sorting by (chunk, bias) sorts inside each chunk only
    order = torch.argsort(chunk_of_token * (room + 1) + per_token, stable=True)
    return torch.cummax(per_token[order], dim=0).values


def synthesize_positions(context: int | Sequence[int], tail_length: int, config: PositionConfig,
                         generator: torch.Generator, strategy: str | None = None) -> tuple[torch.Tensor, str]:
    """Position ids of a context followed by `tail_length` question/answer tokens.

    `context` is the list of chunk lengths (chunks as the data built them) or a token count (cut into `chunk_size`
    pieces). Returns (positions [context + tail], strategy). Context positions follow `context_biases`; the tail is
    contiguous and ends on `window - 1`. Without synthesis the positions are 0..k-1.
    """
    chunks = chunk_lengths_of(context, config)
    real_length = sum(chunks) + tail_length
    check_fits(config, chunks, tail_length)
    if not config.synthesize:
        return torch.arange(real_length), "plain"
    strategy = strategy or choose_strategy(config, generator)
    biases = torch.cat([
        context_biases(chunks, real_length, config, strategy, generator),
        torch.full((tail_length,), config.window - real_length, dtype=torch.long),
    ])
    return torch.arange(real_length) + biases, strategy


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator seeded from (seed, row, epoch...): a row's positions are the same after a resume."""
    value = seed
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
