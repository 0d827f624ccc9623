"""What every objective shares: the `Example` it makes, the special ids it writes, and the `Objective` protocol.

An objective maps `n` raw tokens to an `Example(inputs, targets)`. Its lengths are deterministic functions of `n`
(given the example's random "variant", e.g. the mix-denoiser's span mean), so a batch builder asks `raw_length(fits)`
how many tokens fit its length budget before cutting them from a document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100


@dataclass
class Example:
    """One training example before batching: the visible `inputs` and the predicted `targets` (token ids)."""

    inputs: list[int]
    targets: list[int]
    objective: str


@dataclass(frozen=True)
class SpecialIds:
    """The ids an objective writes: sentinels <extra_id_0..>, UL2 mode tokens {"R","S","X"}, eos and pad."""

    sentinels: tuple[int, ...]
    modes: Mapping[str, int]
    eos: int = 1
    pad: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        from pretrain.tokenizer import mode_token_ids, sentinel_ids

        return cls(tuple(sentinel_ids(tokenizer)), mode_token_ids(tokenizer), tokenizer.eos_token_id,
                   tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


LengthFits = Callable[[int, int], bool]


class Objective:
    """Base: `sample_variant` draws the per-example choices that change lengths, `lengths(n, variant)` gives the
    exact (input, target) lengths for `n` raw tokens, `apply` builds the example. `min_tokens` is the fewest raw
    tokens the objective can use."""

    min_tokens = 2  # every subclass is a dataclass with a `name` field

    def sample_variant(self, rng: np.random.Generator) -> Any:
        return None

    def lengths(self, n: int, variant: Any = None) -> tuple[int, int]:
        raise NotImplementedError

    def spans(self, n: int, variant: Any = None) -> int:
        """Sentinels the example uses (0 when none); `raw_length` keeps it within `sentinel_count()`."""
        return 0

    def sentinel_count(self) -> int | None:
        """How many sentinels the objective may use (None: no limit)."""
        return None

    def apply(self, tokens: Sequence[int], variant: Any, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> Example:
        return self.apply(tokens, self.sample_variant(rng), rng)

    def raw_length(self, fits: LengthFits, variant: Any = None, limit: int = 1 << 20,
                   max_spans: int | None = None) -> int:
        """The most raw tokens (<= limit) whose example fits and needs at most `max_spans` (and the tokenizer's)
        sentinels; 0 if not even `min_tokens` do. Lengths and span counts never shrink as n grows."""
        limits = [m for m in (max_spans, self.sentinel_count()) if m is not None]
        max_spans = min(limits) if limits else None

        def ok(n: int) -> bool:
            return fits(*self.lengths(n, variant)) and (max_spans is None or self.spans(n, variant) <= max_spans)

        low, high = self.min_tokens - 1, limit
        if not ok(self.min_tokens):
            return 0
        while low < high:
            mid = (low + high + 1) // 2
            if ok(mid):
                low = mid
            else:
                high = mid - 1
        return low
