"""UL2 denoisers (arXiv 2205.05131; OpenBA settings from REFERENCE.md) and OpenBA-V2's mix-denoising.

All are span corruption with T5's `random_spans_noise_mask`; S-denoising is the special case of one noise span
covering the suffix, so its input ends with `<extra_id_0>` exactly as OpenBA's prompt `<S> {input} <extra_id_0>`:

    R/X:  inputs  <R> a b <extra_id_0> e f <extra_id_1> i        targets  <extra_id_0> c d <extra_id_1> g h </s>
    S:    inputs  <S> a b c d e f <extra_id_0>                   targets  <extra_id_0> g h i </s>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pretrain.objectives.base import Example, Objective, SpecialIds


def noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) exactly as T5's `random_spans_noise_mask` computes them.

    One guard T5 lacks: spans never outnumber the noise or the non-noise tokens (T5's segmentation breaks there).
    """
    length = max(length, 2)
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, min(spans, noise, length - noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split `num_items` into `num_segments` non-empty runs at uniformly random places (T5's algorithm)."""
    first_in_segment = (np.arange(num_items - 1) < num_segments - 1).astype(np.int64)
    rng.shuffle(first_in_segment)
    segment_id = np.cumsum(np.concatenate([[0], first_in_segment]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of `length` with ~`noise_density` noise in spans of mean `mean_span`; starts with non-noise.

    Port of T5's `random_spans_noise_mask` (t5/data/preprocessors.py) with numpy instead of stateless TF ops.
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    noise, spans = noise_counts(length, noise_density, mean_span)
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(length - noise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    indicator[starts] = 1
    return np.cumsum(indicator) % 2 == 1


def spans_to_example(tokens: Sequence[int], mask: np.ndarray, mode_id: int | None, ids: SpecialIds, objective: str,
                     input_eos: bool) -> Example:
    """Replace each noise span by the next sentinel in the inputs; targets are sentinel + span pairs, then eos."""
    inputs = [] if mode_id is None else [mode_id]
    targets: list[int] = []
    sentinel = -1
    previous = False
    for token, noisy in zip(tokens, mask):
        if noisy:
            if not previous:
                sentinel += 1
                if sentinel >= len(ids.sentinels):
                    raise ValueError(f"{objective}: more spans than the {len(ids.sentinels)} sentinels")
                inputs.append(ids.sentinels[sentinel])
                targets.append(ids.sentinels[sentinel])
            targets.append(int(token))
        else:
            inputs.append(int(token))
        previous = bool(noisy)
    if input_eos:
        inputs.append(ids.eos)
    targets.append(ids.eos)
    return Example(inputs, targets, objective)


@dataclass
class SpanCorruption(Objective):
    """UL2 R-/X-denoiser: T5 span corruption with a mode token prepended to the inputs."""

    name: str
    mode: str
    mean_span: float
    density: float
    ids: SpecialIds
    input_eos: bool = False

    def lengths(self, n: int, variant: Any = None) -> tuple[int, int]:
        noise, spans = noise_counts(n, self.density, self.mean_span)
        return 1 + n - noise + spans + self.input_eos, noise + spans + 1

    def spans(self, n: int, variant: Any = None) -> int:
        return noise_counts(n, self.density, self.mean_span)[1]

    def sentinel_count(self) -> int:
        return len(self.ids.sentinels)

    def apply(self, tokens, variant, rng):
        mask = random_spans_noise_mask(len(tokens), self.density, self.mean_span, rng)
        return spans_to_example(tokens, mask, self.ids.modes[self.mode], self.ids, self.name, self.input_eos)


@dataclass
class SuffixDenoising(Objective):
    """UL2 S-denoiser (prefix LM as span corruption): the last round(density * n) tokens are one noise span."""

    name: str
    density: float
    ids: SpecialIds
    mode: str | None = "S"
    input_eos: bool = False

    def suffix(self, n: int) -> int:
        return min(max(int(round(n * self.density)), 1), n - 1)

    def lengths(self, n: int, variant: Any = None) -> tuple[int, int]:
        suffix = self.suffix(n)
        return (self.mode is not None) + n - suffix + 1 + self.input_eos, suffix + 2

    def spans(self, n: int, variant: Any = None) -> int:
        return 1

    def apply(self, tokens, variant, rng):
        mask = np.zeros(len(tokens), dtype=bool)
        mask[len(tokens) - self.suffix(len(tokens)):] = True
        mode = None if self.mode is None else self.ids.modes[self.mode]
        return spans_to_example(tokens, mask, mode, self.ids, self.name, self.input_eos)


@dataclass
class MixDenoising(Objective):
    """OpenBA-V2's mix-denoising (O-UL2): one example holds S and R/X noise at one mask rate.

    `density` of the tokens are noise; a share u ~ U(suffix_share) of that noise is the suffix (the S part), the rest
    is spread over the prefix in spans whose mean is drawn from `span_means` with `span_weights`.
    """

    ids: SpecialIds
    name: str = "mix"
    density: float = 0.5
    """OpenBA-V2 code default mask rate per sentence."""
    suffix_share: tuple[float, float] = (0.2, 0.3)
    """Range of the S (suffix) part's share of the noise (OpenBA-V2: 20-30%)."""
    span_means: tuple[float, ...] = (3.0, 8.0, 64.0)
    span_weights: tuple[float, ...] = (0.3, 0.4, 0.3)
    mode: str = "S"
    """Mode token of mixed samples; which one OpenBA-V2 used is unverified (the suffix makes it S-like)."""
    input_eos: bool = False
    min_tokens: int = 4

    def sample_variant(self, rng):
        weights = np.asarray(self.span_weights, dtype=float)
        mean = float(rng.choice(self.span_means, p=weights / weights.sum()))
        return float(rng.uniform(*self.suffix_share)), mean

    def _parts(self, n: int, variant) -> tuple[int, int, int, int]:
        """(prefix length, prefix noise, prefix spans, suffix length); no variant: the most spans (smallest mean)."""
        share, mean = variant if variant is not None else (self.suffix_share[0], min(self.span_means))
        noise = min(max(int(round(n * self.density)), 2), n - 2)
        suffix = min(max(int(round(noise * share)), 1), noise - 1)
        prefix = n - suffix
        prefix_noise, prefix_spans = noise_counts(prefix, (noise - suffix) / prefix, mean)
        return prefix, prefix_noise, prefix_spans, suffix

    def lengths(self, n, variant=None):
        prefix, noise, spans, suffix = self._parts(n, variant)
        return 1 + prefix - noise + spans + 1 + self.input_eos, noise + spans + 1 + suffix + 1

    def spans(self, n, variant=None):
        return self._parts(n, variant)[2] + 1

    def sentinel_count(self) -> int:
        return len(self.ids.sentinels)

    def apply(self, tokens, variant, rng):
        prefix, noise, _, _ = self._parts(len(tokens), variant)
        mask = np.ones(len(tokens), dtype=bool)
        # T5 masks end in noise; reversed, the prefix ends clean, so the suffix stays a span (and sentinel) of its own
        mask[:prefix] = random_spans_noise_mask(prefix, noise / prefix, variant[1], rng)[::-1]
        return spans_to_example(tokens, mask, self.ids.modes[self.mode], self.ids, self.name, self.input_eos)


@dataclass
class DenoiserSpec:
    """One UL2 denoiser: mode prefix, mean span length (None: the S suffix) and noise density."""

    name: str
    mode: str
    mean_span: float | None
    density: float


# arXiv 2405.05957 / OpenBA code, REFERENCE.md table order (D-UL2's targets and proportions follow this order)
UL2_DENOISERS = (
    DenoiserSpec("R-1", "R", 3, 0.15),
    DenoiserSpec("R-2", "R", 8, 0.15),
    DenoiserSpec("S", "S", None, 0.25),
    DenoiserSpec("X-1", "X", 3, 0.5),
    DenoiserSpec("X-2", "X", 8, 0.5),
    DenoiserSpec("X-3", "X", 64, 0.15),
    DenoiserSpec("X-4", "X", 64, 0.5),
)
DUL2_TARGET_LOSSES = (1.154, 1.594, 2.106, 1.298, 1.723, 2.151, 2.151)
DUL2_INITIAL_PROPORTIONS = (0.02, 0.02, 0.8, 0.1, 0.02, 0.02, 0.02)


def build_denoiser(spec: DenoiserSpec, ids: SpecialIds, input_eos: bool = False) -> Objective:
    if spec.mean_span is None:
        return SuffixDenoising(spec.name, spec.density, ids, mode=spec.mode, input_eos=input_eos)
    return SpanCorruption(spec.name, spec.mode, spec.mean_span, spec.density, ids, input_eos=input_eos)


def ul2_denoisers(ids: SpecialIds, specs: Sequence[DenoiserSpec] = UL2_DENOISERS, input_eos: bool = False):
    return [build_denoiser(spec, ids, input_eos) for spec in specs]
