"""Distillation after vocabulary pruning: a Llama and an OpenBA pruned by compress.vocab learn from their unpruned
teachers through `python -m pretrain.continual --teacher DIR`. The student -> teacher id map reads the teacher's
logits at the student's kept tokens; the KL the objective reports equals one computed here by hand, on the same
batch, from the two models and the two tokenizers' token strings."""

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F

import pretrain.continual
from compress.vocab import VocabConfig, prune_vocabulary
from core.checkpoint import load_model, load_tokenizer, save_checkpoint
from core.stage import Manifest
from pretrain.objectives import DistillationConfig, DistillationLoss, student_to_teacher_ids
from pretrain.objectives.distillation import output_vocab_size
from pretrain.tokenizer import TokenizerConfig, train_tokenizer
from tests.factory import tiny_model

TEMPERATURE = 2.0  # DistillationConfig's default, which --teacher turns on


@pytest.fixture(scope="module")
def teachers(stock_dirs, stock_corpus, tmp_path_factory):
    """{"llama": the stock Llama (byte-level BPE), "openba": a tiny OpenBA with the project's SentencePiece}."""
    root = tmp_path_factory.mktemp("distill-teachers")
    corpus = datasets.load_from_disk(str(stock_corpus))
    tokenizer = load_tokenizer(train_tokenizer(corpus, TokenizerConfig(vocab_size=600, max_training_chars=150_000),
                                               root / "sp"))
    openba = tiny_model("openba", vocab_size=len(tokenizer), hidden_size=32, kv_channels=8, num_heads=4,
                        ffn_hidden_size=64, num_layers=1, num_decoder_layers=2)
    with torch.no_grad():
        openba.lm_head.bias.normal_()
    return {"llama": stock_dirs("llama"), "openba": save_checkpoint(openba, tokenizer, root / "openba")}


@pytest.fixture(scope="module")
def pruned(teachers, stock_corpus, tmp_path_factory):
    """Each teacher's vocabulary pruned to the tokens covering 90% of the corpus' tokens, plus the ones that must
    stay, padded to a multiple of 64 (so the student has padding rows)."""
    root = tmp_path_factory.mktemp("distill-pruned")
    corpus = datasets.load_from_disk(str(stock_corpus))
    out = {}
    for name, teacher in teachers.items():
        manifest = prune_vocabulary(teacher, root / name, VocabConfig(coverage=0.9, pad_to=64), corpus=corpus)
        assert manifest.metrics["tokens_after"] < manifest.metrics["tokens_before"]
        out[name] = root / name
    return out


def token_map(student_dir, teacher_dir) -> dict[int, int]:
    """Student id -> teacher id of the same token string, written out independently of the library."""
    teacher = load_tokenizer(teacher_dir).get_vocab()
    return {i: teacher[t] for t, i in load_tokenizer(student_dir).get_vocab().items() if t in teacher}


@torch.no_grad()
def hand_kl(student, teacher, batch: dict, mapping: dict[int, int]) -> torch.Tensor:
    """T^2 * mean over target positions of KL(teacher || student), both softmaxes over the student ids that have a
    teacher id: the teacher's logits read at the mapped ids (renormalised over them), the student's at its own."""
    student_ids = torch.tensor(sorted(mapping))
    teacher_ids = torch.tensor([mapping[i] for i in sorted(mapping)])
    lookup = torch.zeros(output_vocab_size(student), dtype=torch.long)
    lookup[student_ids] = teacher_ids
    labels = batch["labels"]
    if student.config.is_encoder_decoder:
        decoder = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1).clamp_min(0)
        student_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=decoder).logits
        teacher_out = teacher(input_ids=lookup[batch["input_ids"]], attention_mask=batch["attention_mask"],
                              decoder_input_ids=lookup[decoder]).logits
        target = labels != -100
    else:
        student_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_out = teacher(input_ids=lookup[batch["input_ids"]], attention_mask=batch["attention_mask"]).logits
        target = torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)
    p_log = F.log_softmax(teacher_out[..., teacher_ids] / TEMPERATURE, dim=-1)
    q_log = F.log_softmax(student_out[..., student_ids] / TEMPERATURE, dim=-1)
    per_position = (p_log.exp() * (p_log - q_log)).sum(-1)
    return TEMPERATURE**2 * per_position[target].mean()


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_the_map_reads_the_teachers_logits_at_the_kept_tokens(family, teachers, pruned):
    """An unchanged pruned student computes the teacher's logits at its kept tokens, so through the map the KL is 0;
    the id map read backwards (or no map) cannot give that."""
    teacher_dir, student_dir = teachers[family], pruned[family]
    teacher, student = load_model(teacher_dir).eval(), load_model(student_dir).eval()
    tokenizer = load_tokenizer(student_dir)
    index = student_to_teacher_ids(tokenizer, load_tokenizer(teacher_dir), output_vocab_size(student),
                                   output_vocab_size(teacher))
    mapping = token_map(student_dir, teacher_dir)
    assert index.shape == (output_vocab_size(student),) and output_vocab_size(student) % 64 == 0
    assert {i: int(t) for i, t in enumerate(index) if t >= 0} == mapping
    assert (index[len(tokenizer):] == -1).all() and len(mapping) == len(tokenizer)  # padding rows: no teacher id
    ids = torch.tensor([tokenizer("def main(argv):\n    return sorted(argv)\n", add_special_tokens=False)["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = DistillationLoss(teacher, DistillationConfig(kd_weight=1.0), student=student, student_to_teacher=index)
    kd = loss(student, batch)[1]["kd_loss"]
    assert kd < 1e-6 and hand_kl(student, teacher, batch, mapping) < 1e-6
    inverse = torch.full_like(index, -1)  # what the old map's direction (teacher -> student) amounts to
    for s, t in mapping.items():
        if t < len(inverse):
            inverse[t] = s
    backwards = DistillationLoss(teacher, DistillationConfig(kd_weight=1.0), student=student,
                                 student_to_teacher=inverse)
    assert backwards(student, batch)[1]["kd_loss"] > 1e-3  # random tiny models: near-uniform logits, small KLs


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_continual_with_teacher_reports_the_hand_computed_kl_on_a_pruned_student(family, teachers, pruned,
                                                                                 stock_corpus, tmp_path,
                                                                                 monkeypatch):
    teacher_dir = teachers[family]
    student_dir = tmp_path / "student"  # the pruned student, moved off the teacher so the KL is not 0
    student = load_model(pruned[family])
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_checkpoint(student, load_tokenizer(pruned[family]), student_dir)

    seen = []

    class Recording(DistillationLoss):
        """The objective itself; keeps the first batch, the student as the objective saw it and what it reported."""

        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            if not seen:
                seen.append((copy.deepcopy(model).eval(), {k: v for k, v in batch.items()}, metrics))
            return loss, metrics

    monkeypatch.setattr(pretrain.continual, "DistillationLoss", Recording)
    out = tmp_path / "distilled"
    settings = [f"data.paths=[{stock_corpus}]", "objective=prefix" if family == "llama" else "objective=ul2",
                "input_length=48", "target_length=24", "packed=false", "validation_batches=1", "train.steps=2",
                "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.eval_every=2", "train.save_every=2",
                "train.warmup_steps=0", "train.lr=1e-3", "dynamic_ul2=false"]
    pretrain.continual.main(["--model", str(student_dir), "--out", str(out), "--teacher", str(teacher_dir),
                             *[f"--set={s}" for s in settings]])

    manifest = Manifest.read(out)
    assert manifest.metrics["distilled_from"] == str(teacher_dir) and manifest.config["distill"]["kd_weight"] == 0.5
    model, batch, metrics = seen[0]
    mapping = token_map(student_dir, teacher_dir)
    teacher = load_model(teacher_dir).eval()
    expected = hand_kl(model, teacher, batch, mapping)
    assert metrics["kd_loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["kd_loss"] > 1e-3  # a real difference between the models, not two zeros
    assert metrics["loss"] == pytest.approx(0.5 * metrics["kd_loss"] + 0.5 * metrics["ce_loss"], rel=1e-5)
    # a few ids by hand: the student's kept tokens read the teacher's logits at the token's teacher id
    sample = sorted(mapping)[:: max(len(mapping) // 5, 1)][:5]
    with torch.no_grad():
        probe = torch.tensor([[mapping[i] for i in sample]])
        kwargs = {"decoder_input_ids": probe[:, :1]} if teacher.config.is_encoder_decoder else {}
        teacher_row = teacher(input_ids=probe, **kwargs).logits[0, 0]
    index = student_to_teacher_ids(load_tokenizer(student_dir), load_tokenizer(teacher_dir),
                                   output_vocab_size(model), output_vocab_size(teacher))
    from pretrain.objectives import gather_teacher_logits

    gathered = gather_teacher_logits(teacher_row[None], index)[0]
    assert torch.equal(gathered[sample], teacher_row[[mapping[i] for i in sample]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distillation_of_a_pruned_student_on_cuda_reports_the_cpu_kl(teachers, pruned):
    """The trainer moves only the student; the objective brings the teacher and the id map to the student's device."""
    teacher_dir, student_dir = teachers["llama"], pruned["llama"]
    tokenizer = load_tokenizer(student_dir)
    ids = torch.tensor([tokenizer("def main(argv):\n    return sorted(argv)\n", add_special_tokens=False)["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    reported = {}
    for device in ("cpu", "cuda"):
        teacher, student = load_model(teacher_dir).eval(), load_model(student_dir).eval().to(device)
        noise = 0.05 * torch.randn(student.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            student.lm_head.weight.add_(noise.to(device))
        index = student_to_teacher_ids(tokenizer, load_tokenizer(teacher_dir), output_vocab_size(student),
                                       output_vocab_size(teacher))
        loss = DistillationLoss(teacher, DistillationConfig(kd_weight=1.0), student=student, student_to_teacher=index)
        with torch.no_grad():
            reported[device] = loss(student, {k: v.to(device) for k, v in batch.items()})[1]["kd_loss"]
        assert next(loss.teacher.parameters()).device.type == device
    assert reported["cuda"] == pytest.approx(reported["cpu"], rel=1e-2, abs=1e-5)
