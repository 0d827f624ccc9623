"""Training objectives: each turns a token sequence into model inputs and targets.

An objective maps `n` raw tokens to an `Example(inputs, targets)`; how those become model tensors depends only on the
architecture (`to_features`): encoder-decoder models read `inputs` in the encoder and predict `targets` with the
decoder; decoder-only models read `inputs + targets` and are trained on `targets` only.

UL2 denoisers (arXiv 2205.05131; OpenBA settings from REFERENCE.md) are all span corruption with T5's
`random_spans_noise_mask`; S-denoising is the special case of one noise span covering the suffix, so its input ends
with `<extra_id_0>` exactly as OpenBA's prompt `<S> {input} <extra_id_0>`:

    R/X:  inputs  <R> a b <extra_id_0> e f <extra_id_1> i        targets  <extra_id_0> c d <extra_id_1> g h </s>
    S:    inputs  <S> a b c d e f <extra_id_0>                   targets  <extra_id_0> g h i </s>

Lengths are deterministic functions of `n` (given the example's random "variant", e.g. the mix-denoiser's span
mean), so a batch builder asks `raw_length(fits)` how many tokens fit its length budget before cutting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError

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


# ---------------------------------------------------------------------------------------------------------------------
# T5 span masks


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


# ---------------------------------------------------------------------------------------------------------------------
# objectives

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
        """Sentinels the example uses (0 when none); `raw_length` keeps it within the tokenizer's sentinels."""
        return 0

    def apply(self, tokens: Sequence[int], variant: Any, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> Example:
        return self.apply(tokens, self.sample_variant(rng), rng)

    def raw_length(self, fits: LengthFits, variant: Any = None, limit: int = 1 << 20,
                   max_spans: int | None = None) -> int:
        """The most raw tokens (<= limit) whose example fits; 0 if not even `min_tokens` do. Lengths grow with n."""

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
        """(prefix length, prefix noise, prefix spans, suffix length)."""
        share, mean = variant
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

    def apply(self, tokens, variant, rng):
        prefix, noise, _, _ = self._parts(len(tokens), variant)
        mask = np.ones(len(tokens), dtype=bool)
        # T5 masks end in noise; reversed, the prefix ends clean, so the suffix stays a span (and sentinel) of its own
        mask[:prefix] = random_spans_noise_mask(prefix, noise / prefix, variant[1], rng)[::-1]
        return spans_to_example(tokens, mask, self.ids.modes[self.mode], self.ids, self.name, self.input_eos)


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


# ---------------------------------------------------------------------------------------------------------------------
# UL2 settings


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


# ---------------------------------------------------------------------------------------------------------------------
# mixture and D-UL2


def check_weights(weights: Sequence[float], count: int, what: str = "objective weights") -> list[float]:
    """Normalised weights; UserError unless there is one finite, non-negative weight per objective summing > 0."""
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UserError(f"{what}: {len(weights)} weights for {count} objectives")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"{what} must be non-negative and sum to a positive number, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


class ObjectiveMixture:
    """Objectives sampled with weights (normalised); `set_weights` is how a schedule such as D-UL2 reweights them."""

    def __init__(self, objectives: Sequence[Objective], weights: Sequence[float] | None = None):
        if not objectives:
            raise UserError("an objective mixture needs at least one objective")
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise UserError(f"objective names must be unique, got {names}")
        self.objectives = list(objectives)
        self.weights = check_weights([1.0] * len(objectives) if weights is None else weights, len(objectives))

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def set_weights(self, weights: Sequence[float]) -> None:
        self.weights = check_weights(weights, len(self.objectives))

    def sample(self, rng: np.random.Generator) -> Objective:
        return self.objectives[int(rng.choice(len(self.objectives), p=np.asarray(self.weights)))]

    def state_dict(self) -> dict:
        return {"weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.set_weights(state["weights"])


def ul2_mixture(ids: SpecialIds, weights: Sequence[float] = DUL2_INITIAL_PROPORTIONS,
                input_eos: bool = False) -> ObjectiveMixture:
    """The seven OpenBA UL2 denoisers with D-UL2's initial proportions."""
    return ObjectiveMixture(ul2_denoisers(ids, input_eos=input_eos), weights)


def mix_denoising_mixture(ids: SpecialIds, mixed_share: float = 0.2, density: float = 0.5,
                          s_density: float = 0.25) -> ObjectiveMixture:
    """O-UL2 (OpenBA-V2 stage S5): ~20% mix-denoising samples, ~80% pure S-denoising."""
    return ObjectiveMixture([MixDenoising(ids, density=density), SuffixDenoising("S", s_density, ids)],
                            [mixed_share, 1.0 - mixed_share])


@dataclass
class DynamicUL2Config:
    """D-UL2 (OpenBA-V2, stages S1-S4): after each evaluation, reweight denoisers towards those above target loss."""

    target_losses: list[float] = field(default_factory=lambda: list(DUL2_TARGET_LOSSES))
    """Per-denoiser target validation loss in UL2_DENOISERS order (OpenBA-V2 code defaults)."""
    initial_proportions: list[float] = field(default_factory=lambda: list(DUL2_INITIAL_PROPORTIONS))
    """Starting sampling proportions (OpenBA-V2 code defaults: mostly S, then X-1)."""
    eta: float = 1.0
    """Step size on the loss gap (paper: 1). Larger moves proportions faster and noisier."""
    smoothing: float = 1e-4
    """c in p = (1 - c) * alpha + c / K (paper: 1e-4): keeps every denoiser sampled."""


def dynamic_ul2_update(proportions: Sequence[float], losses: Sequence[float], target_losses: Sequence[float],
                       eta: float = 1.0, smoothing: float = 1e-4) -> list[float]:
    """alpha = softmax(log p + eta * (loss - target)); return (1 - c) * alpha + c / K."""
    if not (len(proportions) == len(losses) == len(target_losses)):
        raise UserError(f"D-UL2 needs one proportion, loss and target per denoiser, got "
                        f"{len(proportions)}, {len(losses)}, {len(target_losses)}")
    p = torch.tensor(check_weights(proportions, len(proportions), "D-UL2 proportions"), dtype=torch.float64)
    gap = torch.tensor(losses, dtype=torch.float64) - torch.tensor(target_losses, dtype=torch.float64)
    alpha = torch.softmax(p.clamp_min(1e-300).log() + eta * gap, dim=0)
    return ((1 - smoothing) * alpha + smoothing / len(p)).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# features, batches and losses


def to_features(example: Example, encoder_decoder: bool) -> dict[str, list[int]]:
    """Encoder-decoder: input_ids = inputs, labels = targets. Decoder-only: input_ids = inputs + targets with labels
    IGNORE_INDEX on the inputs (transformers shifts labels inside the model, so labels align with input_ids)."""
    if encoder_decoder:
        return {"input_ids": list(example.inputs), "labels": list(example.targets)}
    return {"input_ids": example.inputs + example.targets,
            "labels": [IGNORE_INDEX] * len(example.inputs) + list(example.targets)}


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "decoder_input_ids", "decoder_attention_mask",
              "decoder_position_ids", "encoder_segment_ids", "decoder_segment_ids")


def model_inputs(model, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a batch that go into the model (not labels, "objective" or counters); decoder inputs for
    encoder-decoders are the labels shifted right, as the model itself would make them."""
    inputs = {k: batch[k] for k in MODEL_KEYS if isinstance(batch.get(k), torch.Tensor)}
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def shifted_labels(model, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: as is for encoder-decoders, shifted left by one for decoder-only models."""
    if getattr(model.config, "is_encoder_decoder", False):
        return labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_mean_loss(model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-averaged cross-entropy over all target tokens of the batch (packed or not), in float32.

    A `loss_fn(model, batch) -> (loss, metrics)` for the trainer; metrics carry the token count so that gradient
    accumulation can weight micro-batches by tokens.
    """
    logits = model(**model_inputs(model, batch)).logits
    labels = shifted_labels(model, batch["labels"].to(logits.device))
    tokens = (labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / tokens.clamp_min(1)
    return loss, {"loss": float(loss.detach()), "target_tokens": int(tokens)}


@torch.no_grad()
def per_objective_validation_loss(model, batches_by_objective: Mapping[str, Sequence[Mapping[str, Any]]],
                                  loss_fn=token_mean_loss) -> dict[str, float]:
    """Token-weighted validation loss per objective (what D-UL2 reweights by); restores the model's train mode."""
    was_training = model.training
    model.eval()
    losses = {}
    try:
        for name, batches in batches_by_objective.items():
            total, tokens = 0.0, 0
            for batch in batches:
                loss, metrics = loss_fn(model, batch)
                n = metrics.get("target_tokens", 1)
                total += float(loss) * n
                tokens += n
            losses[name] = total / max(tokens, 1)
    finally:
        model.train(was_training)
    return losses


class DynamicUL2:
    """An `eval_fn(model, step)` for the trainer: measure per-denoiser validation loss on fixed batches, then apply
    the D-UL2 update to `mixture` (whose weights live in the data iterator's state, so resume keeps them)."""

    def __init__(self, mixture: ObjectiveMixture, validation_batches: Mapping[str, Sequence[Mapping[str, Any]]],
                 config: DynamicUL2Config | None = None, loss_fn=token_mean_loss):
        self.mixture = mixture
        self.config = config or DynamicUL2Config()
        if len(self.config.target_losses) != len(mixture.objectives):
            raise UserError(f"D-UL2 has {len(self.config.target_losses)} target losses for "
                            f"{len(mixture.objectives)} denoisers")
        missing = [n for n in mixture.names if n not in validation_batches]
        if missing:
            raise UserError(f"D-UL2 needs validation batches for every denoiser; missing {missing}")
        self.validation_batches = validation_batches
        self.loss_fn = loss_fn

    def __call__(self, model, step: int) -> dict[str, float]:
        losses = per_objective_validation_loss(model, self.validation_batches, self.loss_fn)
        ordered = [losses[n] for n in self.mixture.names]
        new = dynamic_ul2_update(self.mixture.weights, ordered, self.config.target_losses, self.config.eta,
                                 self.config.smoothing)
        self.mixture.set_weights(new)
        metrics = {f"val_loss/{n}": losses[n] for n in self.mixture.names}
        metrics.update({f"weight/{n}": w for n, w in zip(self.mixture.names, self.mixture.weights)})
        metrics["val_loss"] = float(np.mean(ordered))
        return metrics


# ---------------------------------------------------------------------------------------------------------------------
# batches


class ObjectiveBatches:
    """Batches of objective examples cut from tokenized documents; the trainer's data protocol.

    Each batch uses one objective sampled from `mixture` (so the batch's loss is that objective's loss and is
    logged under `batch["objective"]`); over many batches the objectives follow the mixture's weights. Examples
    are cut from the current document to fit the length budget (`Objective.raw_length`), so a document longer than
    one example gives several and a short one gives a short example.

    `packed=False`: one example per row, padded to the fixed lengths. `packed=True`: rows filled with several
    examples (see pretrain/packing.py); a row is closed when the objective cannot fit even its smallest example.
    Encoder-decoder lengths: `input_length` (encoder) and `target_length` (decoder); decoder-only models use
    `input_length` for inputs and targets together.

    `state_dict()` holds the document position, the offset in the current document, the RNG and the mixture
    weights; `load_state_dict` continues with exactly the batches an uninterrupted run would have produced.
    """

    def __init__(self, documents, mixture: ObjectiveMixture, *, batch_size: int, input_length: int,
                 target_length: int | None = None, encoder_decoder: bool = True, packed: bool = False,
                 pad_id: int = 0, decoder_start_id: int = 0, max_spans: int | None = None, seed: int = 0):
        if isinstance(documents, (list, tuple)):
            documents = ListDocuments(documents)
        if batch_size < 1 or input_length < 1:
            raise UserError(f"batch_size and input_length must be positive, got {batch_size}, {input_length}")
        if encoder_decoder and (target_length is None or target_length < 1):
            raise UserError("encoder-decoder batches need a positive target_length")
        self.documents, self.mixture = documents, mixture
        self.batch_size, self.input_length, self.target_length = batch_size, input_length, target_length
        self.encoder_decoder, self.packed = encoder_decoder, packed
        self.pad_id, self.decoder_start_id, self.max_spans = pad_id, decoder_start_id, max_spans
        self.rng = np.random.default_rng(seed)
        for objective in mixture.objectives:
            if objective.raw_length(self._fits(input_length, target_length), max_spans=max_spans) == 0:
                raise UserError(f"objective {objective.name} cannot fit an example into input_length "
                                f"{input_length}" + (f" / target_length {target_length}" if encoder_decoder else ""))
        self._document: np.ndarray | None = None
        self._offset = 0
        self._document_state = documents.state_dict()
        self.stats = {"tokens": 0, "slots": 0, "target_tokens": 0, "target_slots": 0, "batches": 0}

    def _fits(self, input_room: int, target_room: int | None):
        if self.encoder_decoder:
            return lambda i, t: i <= input_room and t <= target_room
        return lambda i, t: i + t <= input_room

    def _next_example(self, objective: Objective, input_room: int, target_room: int | None) -> Example | None:
        """An example cut from the current document that fits the room left; None if the objective cannot fit."""
        variant = objective.sample_variant(self.rng)
        fits = self._fits(input_room, target_room)
        if objective.raw_length(fits, variant, max_spans=self.max_spans) == 0:
            return None
        if self._document is None or len(self._document) - self._offset < objective.min_tokens:
            self._document_state = self.documents.state_dict()
            self._document = next(self.documents)
            self._offset = 0
            while len(self._document) < objective.min_tokens:
                self._document_state = self.documents.state_dict()
                self._document = next(self.documents)
        left = len(self._document) - self._offset
        n = objective.raw_length(fits, variant, limit=left, max_spans=self.max_spans)
        tokens = self._document[self._offset:self._offset + n]
        self._offset += n
        return objective.apply(tokens.tolist(), variant, self.rng)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from pretrain.packing import PackedRow, collate_packed, collate_padded, padding_stats

        objective = self.mixture.sample(self.rng)
        if not self.packed:
            features = [to_features(self._next_example(objective, self.input_length, self.target_length),
                                    self.encoder_decoder) for _ in range(self.batch_size)]
            batch = collate_padded(features, self.encoder_decoder, self.input_length, self.target_length, self.pad_id)
        else:
            rows = []
            for _ in range(self.batch_size):
                row = PackedRow()
                while True:
                    input_room = self.input_length - len(row.inputs)
                    target_room = None if not self.encoder_decoder else self.target_length - len(row.targets)
                    example = self._next_example(objective, input_room, target_room)
                    if example is None:
                        break
                    features = to_features(example, self.encoder_decoder)
                    if self.encoder_decoder:
                        row.add_encoder_decoder(features["input_ids"], features["labels"], self.decoder_start_id)
                    else:
                        row.add_decoder_only(features["input_ids"], features["labels"])
                rows.append(row)
            batch = collate_packed(rows, self.encoder_decoder, self.input_length, self.target_length, self.pad_id)
        for key, value in padding_stats(batch, self.pad_id).items():
            self.stats[key] += value
        self.stats["batches"] += 1
        batch["objective"] = objective.name
        return batch

    def state_dict(self) -> dict:
        return {"documents": self._document_state, "offset": self._offset, "in_document": self._document is not None,
                "rng": self.rng.bit_generator.state, "mixture": self.mixture.state_dict(), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state["documents"])
        self._document_state = state["documents"]
        self._document, self._offset = None, state["offset"]
        if state["in_document"]:
            self._document = next(self.documents)
        self.rng.bit_generator.state = state["rng"]
        self.mixture.load_state_dict(state["mixture"])
        self.stats = dict(state["stats"])


class ListDocuments:
    """In-memory token lists as a repeating document source with a position (tests, small data)."""

    def __init__(self, documents: Sequence[Sequence[int]], repeat: bool = True):
        if not documents:
            raise UserError("no documents: the dataset is empty")
        self.documents = [np.asarray(d, dtype=np.int64) for d in documents]
        self.repeat, self.index = repeat, 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.index >= len(self.documents) and not self.repeat:
            raise StopIteration
        document = self.documents[self.index % len(self.documents)]
        self.index += 1
        return document

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def objective_batches(documents, mixture: ObjectiveMixture, **options) -> ObjectiveBatches:
    """Turn tokenized documents (a list of token lists, or a resumable source from pretrain/data.py) into the
    trainer's batch iterator; `options` as `ObjectiveBatches`."""
    return ObjectiveBatches(documents, mixture, **options)
