"""Objectives: exact denoiser outputs, LM labels, mixtures, D-UL2, losses and distillation against hand computations."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from pretrain.objectives import (
    DUL2_INITIAL_PROPORTIONS,
    DUL2_TARGET_LOSSES,
    IGNORE_INDEX,
    UL2_DENOISERS,
    CausalLM,
    DistillationConfig,
    DistillationLoss,
    DynamicUL2,
    MixDenoising,
    ObjectiveMixture,
    PrefixLM,
    SpanCorruption,
    SpecialIds,
    SuffixDenoising,
    check_student_to_teacher,
    distillation_kl,
    dynamic_ul2_update,
    gather_teacher_logits,
    mix_denoising_mixture,
    noise_counts,
    random_spans_noise_mask,
    spans_to_example,
    student_to_teacher_ids,
    to_features,
    token_mean_loss,
    ul2_denoisers,
    ul2_mixture,
)
from tests.factory import tiny_model

SENTINELS = tuple(range(1000, 1100))
IDS = SpecialIds(SENTINELS, {"R": 900, "S": 901, "X": 902}, eos=1, pad=0)


def runs(mask) -> list[tuple[int, int]]:
    """(start, length) of each True run."""
    out, start = [], None
    for i, value in enumerate(list(mask) + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            out.append((start, i - start))
            start = None
    return out


def reconstruct(example, ids=IDS) -> list[int]:
    """Undo span corruption: put each sentinel's target span back into the inputs (mode token dropped)."""
    spans, current = {}, None
    for token in example.targets[:-1]:
        if token in ids.sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in example.inputs[1:]:
        out += spans[token] if token in ids.sentinels else [token]
    return out


def test_spans_to_example_replaces_each_noise_span_by_the_next_sentinel():
    tokens = list(range(10, 20))
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    example = spans_to_example(tokens, mask, 900, IDS, "R-1", input_eos=False)
    assert example.inputs == [900, 10, 11, 1000, 14, 15, 16, 1001, 18, 19]
    assert example.targets == [1000, 12, 13, 1001, 17, 1]
    with_eos = spans_to_example(tokens, mask, None, IDS, "x", input_eos=True)
    assert with_eos.inputs == [10, 11, 1000, 14, 15, 16, 1001, 18, 19, 1]


def test_noise_mask_has_t5_counts_starts_clean_and_is_seed_reproducible():
    for length, density, mean in [(100, 0.15, 3), (100, 0.5, 8), (570, 0.15, 64), (37, 0.5, 3), (5, 0.15, 3)]:
        mask = random_spans_noise_mask(length, density, mean, np.random.default_rng(7))
        noise = min(max(round(length * density), 1), length - 1)
        spans = max(round(noise / mean), 1)
        assert mask.sum() == noise == noise_counts(length, density, mean)[0]
        assert len(runs(mask)) == spans == noise_counts(length, density, mean)[1]
        assert not mask[0] and mask[-1]  # T5: non-noise first, noise last
        again = random_spans_noise_mask(length, density, mean, np.random.default_rng(7))
        assert np.array_equal(mask, again)
    assert not np.array_equal(random_spans_noise_mask(100, 0.15, 3, np.random.default_rng(1)),
                              random_spans_noise_mask(100, 0.15, 3, np.random.default_rng(2)))


def test_r1_example_is_pinned_for_seed_zero():
    example = SpanCorruption("R-1", "R", 3, 0.15, IDS)(list(range(10, 30)), np.random.default_rng(0))
    # 20 tokens at 0.15 -> 3 noise tokens in 1 span; T5 puts noise last when there is one span
    assert example.inputs == [900] + list(range(10, 27)) + [1000]
    assert example.targets == [1000, 27, 28, 29, 1]


@pytest.mark.parametrize("spec", UL2_DENOISERS, ids=lambda s: s.name)
def test_each_ul2_denoiser_has_exact_mode_sentinels_lengths_and_density(spec):
    objective = ul2_denoisers(IDS)[[s.name for s in UL2_DENOISERS].index(spec.name)]
    tokens = list(range(2000, 2100))
    example = objective(tokens, np.random.default_rng(3))
    assert example.objective == spec.name
    assert example.inputs[0] == IDS.modes[spec.mode]
    assert (len(example.inputs), len(example.targets)) == objective.lengths(100)
    sentinels_in = [t for t in example.inputs if t in SENTINELS]
    sentinels_out = [t for t in example.targets if t in SENTINELS]
    assert sentinels_in == sentinels_out == list(SENTINELS[:len(sentinels_in)])  # count up from <extra_id_0>
    assert example.targets[-1] == IDS.eos
    noise = len(example.targets) - 1 - len(sentinels_out)
    assert noise == round(100 * spec.density)  # the noise density within rounding
    if spec.mean_span is None:  # S: one span, the suffix, and the input ends with <extra_id_0>
        assert example.inputs[-1] == SENTINELS[0]
        assert example.targets == [SENTINELS[0]] + tokens[-25:] + [IDS.eos]
    else:
        assert len(sentinels_out) == max(round(noise / spec.mean_span), 1)
    assert reconstruct(example) == tokens


def test_raw_length_is_the_longest_input_that_fits_openba_lengths():
    fits = lambda i, t: i <= 570 and t <= 380  # noqa: E731
    for objective in ul2_denoisers(IDS):
        n = objective.raw_length(fits)
        assert fits(*objective.lengths(n)) and not fits(*objective.lengths(n + 1))
        example = objective(list(range(3000, 3000 + n)), np.random.default_rng(0))
        assert len(example.inputs) <= 570 and len(example.targets) <= 380
    # X-1 (0.5 noise) is target-bound, R-1 input-bound
    x1, r1 = ul2_denoisers(IDS)[3], ul2_denoisers(IDS)[0]
    assert x1.lengths(x1.raw_length(fits))[1] in (379, 380) and r1.lengths(r1.raw_length(fits))[0] in (569, 570)


def test_raw_length_stays_within_the_tokenizer_sentinels():
    few = SpecialIds(SENTINELS[:3], IDS.modes)
    r1 = SpanCorruption("R-1", "R", 3, 0.15, few)
    n = r1.raw_length(lambda i, t: i <= 10_000 and t <= 10_000)
    assert r1.spans(n) <= 3 < r1.spans(n + 1)
    example = r1(list(range(n)), np.random.default_rng(0))
    assert sum(t in SENTINELS for t in example.inputs) <= 3


def test_mix_denoising_puts_20_to_30_percent_of_the_noise_in_the_suffix():
    objective = MixDenoising(IDS)
    tokens = list(range(5000, 5400))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        variant = objective.sample_variant(rng)
        example = objective.apply(tokens, variant, rng)
        assert (len(example.inputs), len(example.targets)) == objective.lengths(400, variant)
        assert reconstruct(example) == tokens
        last = [i for i, t in enumerate(example.targets) if t in SENTINELS][-1]
        suffix = example.targets[last + 1:-1]
        assert suffix == tokens[-len(suffix):] and example.inputs[-1] == example.targets[last]
        noise = sum(t not in SENTINELS for t in example.targets[:-1])
        assert noise == 200  # density 0.5
        assert 0.2 * noise - 1 <= len(suffix) <= 0.3 * noise + 1
        assert variant[1] in (3.0, 8.0, 64.0)


def test_mix_denoising_mixture_is_20_percent_mixed_80_percent_s():
    mixture = mix_denoising_mixture(IDS)
    assert mixture.names == ["mix", "S"] and mixture.weights == pytest.approx([0.2, 0.8])


def test_causal_and_prefix_lm_labels_for_decoder_only_and_encoder_decoder():
    tokens = [5, 6, 7, 8, 9, 10]
    causal = to_features(CausalLM()(tokens, np.random.default_rng(0)), encoder_decoder=False)
    assert causal == {"input_ids": tokens, "labels": tokens}
    prefix = PrefixLM(suffix_fraction=0.5, eos=1)(tokens, np.random.default_rng(0))
    assert (prefix.inputs, prefix.targets) == ([5, 6, 7], [8, 9, 10, 1])
    decoder_only = to_features(prefix, encoder_decoder=False)
    assert decoder_only == {"input_ids": [5, 6, 7, 8, 9, 10, 1], "labels": [-100, -100, -100, 8, 9, 10, 1]}
    assert to_features(prefix, encoder_decoder=True) == {"input_ids": [5, 6, 7], "labels": [8, 9, 10, 1]}
    random_split = PrefixLM(random_split=True, eos=None)
    for seed in range(10):
        example = random_split(tokens, np.random.default_rng(seed))
        assert example.inputs + example.targets == tokens and example.inputs and example.targets


def test_suffix_denoising_without_mode_token():
    example = SuffixDenoising("S", 0.5, IDS, mode=None)([1, 2, 3, 4], np.random.default_rng(0))
    assert (example.inputs, example.targets) == ([1, 2, 1000], [1000, 3, 4, 1])


def test_mixture_normalises_weights_and_samples_in_proportion():
    mixture = ul2_mixture(IDS)
    assert mixture.weights == pytest.approx(list(DUL2_INITIAL_PROPORTIONS))
    mixture = ObjectiveMixture(ul2_denoisers(IDS)[:3], [1, 2, 1])
    assert mixture.weights == [0.25, 0.5, 0.25]
    rng = np.random.default_rng(0)
    counts = {name: 0 for name in mixture.names}
    for _ in range(20_000):
        counts[mixture.sample(rng).name] += 1
    assert [counts[n] / 20_000 for n in mixture.names] == pytest.approx([0.25, 0.5, 0.25], abs=0.015)


@pytest.mark.parametrize("weights", [[0, 0, 0], [1, -1, 1], [1, 1], [float("nan"), 1, 1]])
def test_mixture_weights_must_sum_to_a_positive_number(weights):
    with pytest.raises(UserError, match="weights"):
        ObjectiveMixture(ul2_denoisers(IDS)[:3], weights)


def test_dynamic_ul2_update_matches_a_hand_computation():
    # two denoisers, p = (0.5, 0.5), losses 1 above / at target: alpha = (e, 1) / (e + 1)
    new = dynamic_ul2_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0], eta=1.0, smoothing=1e-4)
    alpha = [math.e / (math.e + 1), 1 / (math.e + 1)]
    assert new == pytest.approx([(1 - 1e-4) * a + 1e-4 / 2 for a in alpha], abs=1e-12)
    # the paper's seven denoisers with their defaults
    losses = [1.5, 1.5, 2.0, 1.5, 2.0, 2.0, 2.5]
    logits = [math.log(p) + (l - t) for p, l, t in zip(DUL2_INITIAL_PROPORTIONS, losses, DUL2_TARGET_LOSSES)]
    total = sum(math.exp(x) for x in logits)
    expected = [(1 - 1e-4) * math.exp(x) / total + 1e-4 / 7 for x in logits]
    assert dynamic_ul2_update(DUL2_INITIAL_PROPORTIONS, losses, DUL2_TARGET_LOSSES) == pytest.approx(expected, abs=1e-12)
    assert sum(expected) == pytest.approx(1.0)


def test_dynamic_ul2_eval_fn_reweights_the_mixture_from_per_denoiser_losses():
    mixture = ObjectiveMixture(ul2_denoisers(IDS)[:2], [0.5, 0.5])
    fixed = {"R-1": 3.0, "R-2": 1.0}

    def loss_fn(model, batch):
        return torch.tensor(fixed[batch["name"]]), {"target_tokens": 4}

    batches = {"R-1": [{"name": "R-1"}] * 2, "R-2": [{"name": "R-2"}]}
    from pretrain.objectives import DynamicUL2Config

    schedule = DynamicUL2(mixture, batches, DynamicUL2Config(target_losses=[1.0, 1.0], initial_proportions=[.5, .5]),
                          loss_fn=loss_fn)
    metrics = schedule(torch.nn.Linear(1, 1), step=10)
    expected = dynamic_ul2_update([0.5, 0.5], [3.0, 1.0], [1.0, 1.0])
    assert mixture.weights == pytest.approx(expected) and mixture.weights[0] > 0.85
    assert metrics["val_loss/R-1"] == 3.0 and metrics["weight/R-2"] == pytest.approx(expected[1])
    with pytest.raises(UserError, match="missing"):
        DynamicUL2(mixture, {"R-1": []}, DynamicUL2Config(target_losses=[1.0, 1.0]))


def tiny_llama(vocab: int = 64, seed: int = 0):
    return tiny_model("llama", seed, vocab_size=vocab)


def test_token_mean_loss_averages_over_target_tokens_like_the_model():
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "objective": "causal"}
    with torch.no_grad():
        loss, metrics = token_mean_loss(model, batch)
        logits = model(input_ids=ids).logits
    manual = [F.cross_entropy(logits[r, t - 1], ids[r, t], reduction="sum")
              for r in range(2) for t in range(1, 10) if labels[r, t] != IGNORE_INDEX]
    assert metrics["target_tokens"] == len(manual) == 6 + 6
    assert loss.item() == pytest.approx(float(sum(manual) / len(manual)), rel=1e-5)
    assert loss.item() == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-5)


def test_distillation_kl_matches_a_hand_computation():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.0, 1.0], [5.0, 5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    temperature = 2.0

    def softmax(row):
        exps = [math.exp(x / temperature) for x in row]
        return [e / sum(exps) for e in exps]

    p, q = softmax([2.0, 0.0, 1.0]), softmax([1.0, 2.0, 0.5])
    expected = temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert distillation_kl(student, teacher, mask, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_kl(teacher, teacher, mask, temperature).item() == pytest.approx(0.0, abs=1e-7)


@torch.no_grad()
def test_distillation_loss_mixes_soft_and_hard_terms_by_weight():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    config = DistillationConfig(temperature=3.0, kd_weight=0.25)
    loss, metrics = DistillationLoss(teacher, config, student=student)(student, batch)
    logits, teacher_logits = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, -1] = False  # causal: the last position predicts nothing
    soft = distillation_kl(logits, teacher_logits, mask, 3.0)
    hard = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert loss.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard.item(), rel=1e-5)
    assert metrics["kd_loss"] == pytest.approx(soft.item(), rel=1e-5)
    same, _ = DistillationLoss(copy.deepcopy(student), config, student=student)(student, batch)
    assert same.item() == pytest.approx(0.75 * hard.item(), rel=1e-5)  # identical teacher: KL = 0


def test_distillation_rejects_a_teacher_with_another_vocabulary_unless_mapped():
    student, teacher = tiny_llama(vocab=48), tiny_llama(vocab=64)
    with pytest.raises(UserError, match="vocabulary"):
        DistillationLoss(teacher, student=student)
    with pytest.raises(UserError, match="student id 3 to 70, outside"):
        DistillationLoss(teacher, student=student, student_to_teacher=torch.tensor([0, 1, 2, 70] + [-1] * 44))
    with pytest.raises(UserError, match="one entry per student id"):
        DistillationLoss(teacher, student=student, student_to_teacher=torch.arange(47))
    student_to_teacher = torch.arange(16, 64)  # the student kept the teacher's last 48 ids, renumbered
    loss_fn = DistillationLoss(teacher, DistillationConfig(temperature=1.0, kd_weight=1.0), student=student,
                               student_to_teacher=student_to_teacher)
    ids = torch.randint(0, 48, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, metrics = loss_fn(student, {"input_ids": ids, "labels": ids})
        # the teacher reads the same text in its own ids; its distribution renormalised over the kept ids
        teacher_logp = teacher(input_ids=ids + 16).logits[0, :5, 16:].log_softmax(-1)
        student_logp = student(input_ids=ids).logits[0, :5].log_softmax(-1)
    expected = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and metrics["kd_loss"] > 0


def test_student_to_teacher_gathers_teacher_logits_at_the_student_ids():
    class Vocab:
        def __init__(self, tokens):
            self.tokens = tokens

        def get_vocab(self):
            return {t: i for i, t in enumerate(self.tokens)}

    teacher, student = Vocab(["a", "b", "c", "d", "e"]), Vocab(["a", "e", "c"])
    index = student_to_teacher_ids(student, teacher, student_rows=4, teacher_rows=5)  # row 3: padding
    assert index.tolist() == [0, 4, 2, -1]
    assert student_to_teacher_ids(teacher, teacher, 5, 5) is None
    assert student_to_teacher_ids(teacher, teacher, 6, 5).tolist() == [0, 1, 2, 3, 4, -1]
    logits = torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0]])
    gathered = gather_teacher_logits(logits, index)
    assert gathered[0, :3].tolist() == [10.0, 14.0, 12.0] and gathered[0, 3] == float("-inf")
    # the padding row is left out of both distributions: its student logit changes nothing
    shared, mask = index >= 0, torch.ones(1, 1, dtype=torch.bool)
    kl = [distillation_kl(torch.tensor([[[1.0, 2.0, 0.5, padding]]]), gathered[None], mask, 1.0, shared)
          for padding in (0.0, 30.0)]
    assert torch.isfinite(kl[0]) and kl[0].item() == pytest.approx(kl[1].item(), rel=1e-6)
    assert check_student_to_teacher(None, 4, 4) is None


def test_distillation_config_rejects_bad_values():
    with pytest.raises(UserError):
        DistillationConfig(temperature=0)
    with pytest.raises(UserError):
        DistillationConfig(kd_weight=1.5)


def test_dynamic_ul2_on_a_tiny_openba_measures_each_denoiser_on_fixed_batches():
    from pretrain.objectives import batches_per_objective

    model = tiny_model("openba", vocab_size=1104)
    documents = [list(range(3 + i, 90 + i)) for i in range(6)]
    mixture = ul2_mixture(SpecialIds(SENTINELS, {"R": 1100, "S": 1101, "X": 1102}))
    batches = batches_per_objective(documents, mixture, 1, batch_size=2, input_length=40, target_length=24,
                                    packed=True)
    assert list(batches) == mixture.names and all(b[0]["objective"] == n for n, b in batches.items())
    before = list(mixture.weights)
    metrics = DynamicUL2(mixture, batches)(model, step=1)
    with torch.no_grad():
        losses = [token_mean_loss(model.eval(), batches[n][0])[0].item() for n in mixture.names]
    assert [metrics[f"val_loss/{n}"] for n in mixture.names] == pytest.approx(losses, rel=1e-5)
    assert mixture.weights == pytest.approx(dynamic_ul2_update(before, losses, DUL2_TARGET_LOSSES), rel=1e-5)


def test_o_ul2_batches_mix_denoising_and_s_for_both_architectures():
    from pretrain.objectives import objective_batches

    documents = [list(range(3, 200)), list(range(5, 60))]
    for encoder_decoder in (True, False):
        batches = objective_batches(documents, mix_denoising_mixture(IDS), batch_size=2, input_length=64,
                                    target_length=48 if encoder_decoder else None, encoder_decoder=encoder_decoder,
                                    packed=True)
        names = {next(batches)["objective"] for _ in range(12)}
        assert names == {"mix", "S"}


def test_decoder_only_denoising_concatenates_inputs_and_targets_with_loss_on_targets():
    example = SpanCorruption("X-1", "X", 3, 0.5, IDS)(list(range(10, 30)), np.random.default_rng(0))
    features = to_features(example, encoder_decoder=False)
    assert features["input_ids"] == example.inputs + example.targets
    assert features["labels"] == [IGNORE_INDEX] * len(example.inputs) + example.targets
