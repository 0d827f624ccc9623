"""Training objectives: each turns a token sequence into model inputs and targets (see base.py for the protocol).

How examples become model tensors depends only on the architecture (`to_features`): encoder-decoder models read
`inputs` in the encoder and predict `targets` with the decoder; decoder-only models read `inputs + targets` and are
trained on `targets` only. One file per family: denoising (UL2 R/S/X, mix-denoising), language_modeling (causal,
prefix), mixture (weights, D-UL2), losses (token-mean CE, per-objective validation loss), distillation, batches
(the trainer's data iterator).
"""

from pretrain.objectives.base import IGNORE_INDEX, Example, LengthFits, Objective, SpecialIds
from pretrain.objectives.batches import (
    ListDocuments,
    ObjectiveBatches,
    batches_per_objective,
    objective_batches,
    to_features,
)
from pretrain.objectives.denoising import (
    DUL2_INITIAL_PROPORTIONS,
    DUL2_TARGET_LOSSES,
    UL2_DENOISERS,
    DenoiserSpec,
    MixDenoising,
    SpanCorruption,
    SuffixDenoising,
    build_denoiser,
    noise_counts,
    random_spans_noise_mask,
    spans_to_example,
    ul2_denoisers,
)
from pretrain.objectives.distillation import (
    DistillationConfig,
    DistillationLoss,
    check_student_to_teacher,
    distillation_kl,
    gather_teacher_logits,
    student_to_teacher_ids,
)
from pretrain.objectives.language_modeling import CausalLM, PrefixLM
from pretrain.objectives.losses import model_inputs, per_objective_validation_loss, shifted_labels, token_mean_loss
from pretrain.objectives.mixture import (
    DynamicUL2,
    DynamicUL2Config,
    ObjectiveMixture,
    check_weights,
    dynamic_ul2_update,
    mix_denoising_mixture,
    ul2_mixture,
)
