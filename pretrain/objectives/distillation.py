"""Knowledge distillation from a teacher as a recovery objective for pruned models (Hinton et al., 2015).

loss = kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * cross-entropy on the labels, where _T are
softmaxes at temperature T and KL is averaged over the target tokens (positions whose label is not ignored). The T^2
keeps the soft term's gradient scale independent of T.

A pruned vocabulary gives the student other ids than the teacher: pass the pruner's map old id -> new id and the
teacher's logits are gathered at the mapped ids (student ids without a teacher id get probability 0 under the
teacher). Without a map, different vocabularies are an error before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from core.errors import UserError
from pretrain.objectives.base import IGNORE_INDEX
from pretrain.objectives.losses import model_inputs, shifted_labels


@dataclass
class DistillationConfig:
    """How the teacher's soft labels and the hard labels are mixed."""

    temperature: float = 2.0
    """Softmax temperature for both models (Hinton et al. use 1-20; 2 is common for LMs). Higher shows the student
    more of the teacher's ranking of unlikely tokens."""
    kd_weight: float = 0.5
    """Weight of the KL term; 1 - kd_weight goes to the hard-label cross-entropy. 1.0 is pure distillation."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise UserError(f"distillation temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise UserError(f"kd_weight must lie in [0, 1], got {self.kd_weight}")


def output_vocab_size(model) -> int:
    """Width of the model's logits (the LM head's rows; a padded vocabulary counts its padding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def teacher_index(teacher_vocab: int, student_vocab: int, vocab_map: Mapping[int, int] | None) -> torch.Tensor | None:
    """For each student id, the teacher id whose logit it takes (-1: none); None when the vocabularies agree.

    UserError if they differ and no map is given, or if the map points outside either vocabulary."""
    if vocab_map is None:
        if teacher_vocab != student_vocab:
            raise UserError(f"the teacher's vocabulary ({teacher_vocab} ids) differs from the student's "
                            f"({student_vocab}); pass the vocabulary pruner's old->new id map")
        return None
    index = torch.full((student_vocab,), -1, dtype=torch.long)
    for old, new in vocab_map.items():
        old, new = int(old), int(new)
        if not (0 <= old < teacher_vocab and 0 <= new < student_vocab):
            raise UserError(f"vocab map entry {old}->{new} lies outside the teacher ({teacher_vocab}) or student "
                            f"({student_vocab}) vocabulary")
        index[new] = old
    return index


def gather_teacher_logits(logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Teacher logits in the student's id space; ids without a teacher id get -inf (probability 0)."""
    if index is None:
        return logits
    index = index.to(logits.device)
    gathered = logits.index_select(-1, index.clamp_min(0))
    return gathered.masked_fill(index < 0, float("-inf"))


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(teacher/T) || softmax(student/T)), in float32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = teacher.exp()
    # 0 * log 0 = 0 where the teacher gives an id no probability (-inf logit after a vocabulary map)
    per_token = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p)).sum(-1)
    mask = mask.to(per_token.device)
    return temperature**2 * (per_token * mask).sum() / mask.sum().clamp_min(1)


class DistillationLoss:
    """A `loss_fn(model, batch) -> (loss, metrics)` for the trainer, distilling `teacher` into the model.

    Checks the vocabularies at construction when `student` is given (so a mismatch fails before training), else on
    the first call. The teacher runs in eval mode without gradients on the same batch (same tokenizer ids).
    """

    def __init__(self, teacher, config: DistillationConfig | None = None, student=None,
                 vocab_map: Mapping[int, int] | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config or DistillationConfig()
        self.vocab_map = vocab_map
        self.index: torch.Tensor | None = None
        self._checked = False
        if student is not None:
            self.check(student)

    def check(self, student) -> None:
        self.index = teacher_index(output_vocab_size(self.teacher), output_vocab_size(student), self.vocab_map)
        if getattr(self.teacher.config, "is_encoder_decoder", False) != getattr(student.config, "is_encoder_decoder",
                                                                              False):
            raise UserError("teacher and student must both be encoder-decoder or both decoder-only")
        self._checked = True

    def __call__(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if not self._checked:
            self.check(model)
        logits = model(**model_inputs(model, batch)).logits
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs(self.teacher, batch)).logits.to(logits.device)
        teacher_logits = gather_teacher_logits(teacher_logits, self.index)
        labels = shifted_labels(model, batch["labels"].to(logits.device))
        mask = labels != IGNORE_INDEX
        tokens = mask.sum().clamp_min(1)
        hard = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / tokens
        soft = distillation_kl(logits, teacher_logits, mask, self.config.temperature)
        loss = self.config.kd_weight * soft + (1 - self.config.kd_weight) * hard
        metrics = {"loss": float(loss.detach()), "kd_loss": float(soft.detach()), "ce_loss": float(hard.detach()),
                   "target_tokens": int(mask.sum())}
        return loss, metrics
