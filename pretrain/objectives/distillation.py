"""Knowledge distillation from a teacher as a recovery objective for pruned models (Hinton et al., 2015).

loss = kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * cross-entropy on the labels, where _T are
softmaxes at temperature T and KL is averaged over the target tokens (positions whose label is not ignored). The T^2
keeps the soft term's gradient scale independent of T.

A pruned vocabulary gives the student other ids than the teacher. One map joins them, `student_to_teacher`: a
LongTensor with one entry per student id (the student's logit rows) holding the teacher id of that token, -1 where
the teacher has none (padding rows, tokens added after the teacher). The teacher's logits are gathered at those ids,
so its distribution is renormalised over the tokens the student kept, and ids without a teacher id are left out of
both distributions: the KL compares the two models on the tokens they share. Without a map, vocabularies of
different sizes are an error before training starts.
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


def student_to_teacher_ids(student_tokenizer, teacher_tokenizer, student_rows: int,
                           teacher_rows: int) -> torch.Tensor | None:
    """The teacher id of each student id, matched by token string (a LongTensor of `student_rows`, -1 where the
    teacher lacks the token or the row holds no token); None when both index the same tokens in the same rows."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher and student_rows == teacher_rows:
        return None
    index = torch.full((student_rows,), -1, dtype=torch.long)
    for token, student_id in student.items():
        teacher_id = teacher.get(token)
        if teacher_id is not None and student_id < student_rows and teacher_id < teacher_rows:
            index[student_id] = teacher_id
    if not (index >= 0).any():
        raise UserError("the teacher's tokenizer shares no token with the student's: distil from a teacher of the "
                        "same tokenizer family (the unpruned model)")
    return index


def check_student_to_teacher(student_to_teacher: torch.Tensor | None, teacher_vocab: int,
                             student_vocab: int) -> torch.Tensor | None:
    """The map as a LongTensor, checked against both models' logit widths; UserError when it cannot index them."""
    if student_to_teacher is None:
        if teacher_vocab != student_vocab:
            raise UserError(f"the teacher's vocabulary ({teacher_vocab} ids) differs from the student's "
                            f"({student_vocab}); pass student_to_teacher (the teacher id of each student id)")
        return None
    index = torch.as_tensor(student_to_teacher, dtype=torch.long)
    if index.shape != (student_vocab,):
        raise UserError(f"student_to_teacher has shape {tuple(index.shape)}; it needs one entry per student id "
                        f"({student_vocab})")
    outside = (index < -1) | (index >= teacher_vocab)
    if outside.any():
        student_id = int(outside.nonzero()[0])
        raise UserError(f"student_to_teacher maps student id {student_id} to {int(index[student_id])}, outside the "
                        f"teacher's {teacher_vocab} ids")
    if not (index >= 0).any():
        raise UserError("student_to_teacher maps no student id to a teacher id")
    return index


def gather_teacher_logits(logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Teacher logits in the student's id space; ids without a teacher id get -inf (probability 0)."""
    if index is None:
        return logits
    index = index.to(logits.device)
    gathered = logits.index_select(-1, index.clamp_min(0))
    return gathered.masked_fill(index < 0, float("-inf"))


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float, shared: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(teacher/T) || softmax(student/T)), in float32.

    `shared` (bool per student id) restricts both softmaxes to those ids: the ids the teacher has."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if shared is not None:
        shared = shared.to(student_logits.device)
        student_logits = student_logits.masked_fill(~shared, float("-inf"))
        teacher_logits = teacher_logits.masked_fill(~shared, float("-inf"))
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    p = teacher.exp()
    # 0 * log 0 = 0 where the teacher gives an id no probability (left out, or -inf in its own logits)
    per_token = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p)).sum(-1)
    mask = mask.to(per_token.device)
    return temperature**2 * (per_token * mask).sum() / mask.sum().clamp_min(1)


class DistillationLoss:
    """A `loss_fn(model, batch) -> (loss, metrics)` for the trainer, distilling `teacher` into the model.

    Checks the vocabularies at construction when `student` is given (so a mismatch fails before training), else on
    the first call. The teacher runs in eval mode without gradients on the same batch, read in its own ids through
    `student_to_teacher` when the student's vocabulary was pruned (see the module docstring).
    """

    def __init__(self, teacher, config: DistillationConfig | None = None, student=None,
                 student_to_teacher: torch.Tensor | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config or DistillationConfig()
        self.student_to_teacher = student_to_teacher
        self._checked = False
        if student is not None:
            self.check(student)

    def check(self, student) -> None:
        self.student_to_teacher = check_student_to_teacher(self.student_to_teacher, output_vocab_size(self.teacher),
                                                           output_vocab_size(student))
        if getattr(self.teacher.config, "is_encoder_decoder", False) != getattr(student.config, "is_encoder_decoder",
                                                                              False):
            raise UserError("teacher and student must both be encoder-decoder or both decoder-only")
        self._checked = True

    def teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The student's model inputs in the teacher's ids. A token the teacher lacks (a UL2 sentinel added to a
        stock tokenizer) reaches it as its pad id: the teacher cannot read what it never learnt."""
        if self.student_to_teacher is None:
            return inputs
        pad = getattr(self.teacher.config, "pad_token_id", None) or 0
        to_teacher = self.student_to_teacher.where(self.student_to_teacher >= 0, torch.tensor(pad))
        mapped = dict(inputs)
        for key in ("input_ids", "decoder_input_ids"):
            if key in mapped:
                mapped[key] = to_teacher.to(mapped[key].device)[mapped[key]]
        return mapped

    def __call__(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if not self._checked:
            self.check(model)
        inputs = model_inputs(model, batch)  # decoder inputs shifted in the student's ids, then mapped
        logits = model(**inputs).logits
        if next(self.teacher.parameters()).device != logits.device:  # the trainer places only the student
            self.teacher.to(logits.device)
        with torch.no_grad():
            teacher_logits = self.teacher(**self.teacher_inputs(inputs)).logits.to(logits.device)
        teacher_logits = gather_teacher_logits(teacher_logits, self.student_to_teacher)
        shared = None if self.student_to_teacher is None else self.student_to_teacher >= 0
        labels = shifted_labels(model, batch["labels"].to(logits.device))
        mask = labels != IGNORE_INDEX
        tokens = mask.sum().clamp_min(1)
        hard = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / tokens
        soft = distillation_kl(logits, teacher_logits, mask, self.config.temperature, shared)
        loss = self.config.kd_weight * soft + (1 - self.config.kd_weight) * hard
        metrics = {"loss": float(loss.detach()), "kd_loss": float(soft.detach()), "ce_loss": float(hard.detach()),
                   "target_tokens": int(mask.sum())}
        return loss, metrics
