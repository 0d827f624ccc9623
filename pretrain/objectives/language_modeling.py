"""Causal and prefix language modelling as objectives (decoder-only models; prefix LM also for encoder-decoders)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.objectives.base import Example, Objective


@dataclass
class CausalLM(Objective):
    """Next-token prediction on every token (decoder-only). `eos` is appended when the tokens end a document."""

    name: str = "causal"
    min_tokens: int = 1

    def lengths(self, n, variant=None):
        return 0, n

    def apply(self, tokens, variant, rng):
        return Example([], [int(t) for t in tokens], self.name)


@dataclass
class PrefixLM(Objective):
    """Prefix LM without mode token or sentinel: loss only on the suffix. The split is a fixed fraction, or uniform
    in [1, n-1] when `random_split` (then the builder budgets for the worst case)."""

    name: str = "prefix"
    suffix_fraction: float = 0.5
    random_split: bool = False
    eos: int | None = 1

    def sample_variant(self, rng):
        return float(rng.uniform(0.0, 1.0)) if self.random_split else self.suffix_fraction

    def suffix(self, n: int, fraction: float) -> int:
        return min(max(int(round(n * fraction)), 1), n - 1)

    def lengths(self, n, variant=None):
        fraction = self.suffix_fraction if variant is None else variant
        suffix = self.suffix(n, fraction)
        return n - suffix, suffix + (self.eos is not None)

    def apply(self, tokens, variant, rng):
        split = len(tokens) - self.suffix(len(tokens), variant)
        targets = [int(t) for t in tokens[split:]] + ([self.eos] if self.eos is not None else [])
        return Example([int(t) for t in tokens[:split]], targets, self.name)
