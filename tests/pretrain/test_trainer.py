"""The trainer on one CPU process: schedules, token-averaged loss, logging, and bad input caught before writing."""

import json
import math

import pytest
import torch

from core.config import load_config
from core.errors import UserError
from pretrain.schedules import build_scheduler, learning_rate
from pretrain.trainer import Trainer, TrainConfig, read_metrics, target_tokens
from tests.factory import tiny_model

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_openba(seed: int = 0, **overrides):
    """A two-layer OpenBA (hidden 32) that trains in milliseconds per step; 64 encoder and 32 decoder positions, so
    the length checks have a limit to find."""
    shape = dict(vocab_size=VOCAB, hidden_size=32, kv_channels=8, num_heads=2, ffn_hidden_size=64, num_layers=1,
                 num_decoder_layers=1, max_seq_length=64, decoder_max_seq_length=32)
    return tiny_model("openba", seed, **{**shape, **overrides})


def tiny_llama(seed: int = 0, **overrides):
    """A two-layer Llama (hidden 32) with 64 positions."""
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    return tiny_model("llama", seed, **{**shape, **overrides})


def seq2seq_batches(count: int, rows: int = 4, source: int = 12, target: int = 6, seed: int = 0, objective=None):
    """Random encoder-decoder batches; label lengths vary per row so batches have different token counts."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        labels = torch.randint(3, VOCAB, (rows, target), generator=generator)
        keep = torch.randint(1, target + 1, (rows,), generator=generator)
        labels[torch.arange(target)[None, :] >= keep[:, None]] = -100
        batch = {"input_ids": torch.randint(3, VOCAB, (rows, source), generator=generator), "labels": labels}
        if objective is not None:
            batch["objective"] = objective[index % len(objective)]
        batches.append(batch)
    return batches


def quick_config(**overrides) -> TrainConfig:
    settings = dict(steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=1, save_every=0, log_every=1, micro_batch_size=4)
    return TrainConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------------ schedules


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_lr():
    rates = [learning_rate(s, steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, schedule="cosine") for s in range(10)]
    assert rates[:2] == [0.5, 1.0]
    assert rates[2] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1)
    assert rates[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 7)))
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))


def test_wsd_schedule_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    rates = [learning_rate(s, steps=10, lr=1.0, min_lr=0.0, warmup_steps=1, schedule="wsd", decay_fraction=0.3)
             for s in range(10)]
    assert rates == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])


def test_scheduler_gives_each_step_the_schedule_rate():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = build_scheduler(optimizer, steps=8, lr=2e-3, min_lr=2e-4, warmup_steps=2, schedule="cosine")
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [learning_rate(s, steps=8, lr=2e-3, min_lr=2e-4, warmup_steps=2) for s in range(8)]
    assert seen == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ training


def test_training_lowers_the_loss_on_a_repeated_batch(tmp_path):
    data = seq2seq_batches(1)
    trainer = Trainer(tiny_openba(), quick_config(steps=30, lr=1e-2, min_lr=1e-3), data)
    trainer.train(tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]


def test_step_loss_is_token_averaged_across_micro_batches(tmp_path):
    """Two micro-batches with 3 and 20 target tokens: the logged loss is sum(token losses) / 23, not a mean of
    the two batch means; the weights are the gradient weights too (checked against one merged batch)."""
    generator = torch.Generator().manual_seed(3)
    small = {"input_ids": torch.randint(3, VOCAB, (1, 8), generator=generator),
             "labels": torch.tensor([[5, 6, 7, -100, -100]])}
    large = {"input_ids": torch.randint(3, VOCAB, (4, 8), generator=generator),
             "labels": torch.randint(3, VOCAB, (4, 5), generator=generator)}
    model = tiny_openba()
    with torch.no_grad():
        reference = model(**small).loss * 3 / 23 + model(**large).loss * 20 / 23
        mean_of_means = (model(**small).loss + model(**large).loss) / 2
    Trainer(model, quick_config(steps=1, grad_accum_steps=2, warmup_steps=0), [small, large]).train(tmp_path / "a")
    logged = read_metrics(tmp_path / "a")[0]["loss"]
    assert logged == pytest.approx(float(reference), rel=1e-6)
    assert abs(logged - float(mean_of_means)) > 1e-3

    # the same step on one merged batch (padding rows with -100 labels) gives the same weights
    merged = {"input_ids": torch.cat([small["input_ids"], large["input_ids"]]),
              "labels": torch.cat([small["labels"], large["labels"]])}
    accumulated, single = tiny_openba(), tiny_openba()
    config = quick_config(steps=3, warmup_steps=0)
    Trainer(accumulated, dataclass_replace(config, grad_accum_steps=2), [small, large]).train(tmp_path / "b")
    Trainer(single, config, [merged]).train(tmp_path / "c")
    # compare outputs, not weights: key biases get zero gradient up to rounding, which Adam blows up to lr-sized
    # (but output-neutral) moves in either direction
    probe = seq2seq_batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(accumulated.eval()(**probe).logits, single.eval()(**probe).logits,
                                   rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        untrained = tiny_openba()(**probe).logits
    assert (untrained - single(**probe).logits).abs().max() > 1e-2  # training moved the model


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_target_tokens_shift_labels_for_causal_models_only():
    labels = torch.tensor([[-100, 4, 5, 6], [-100, -100, 7, -100]])
    assert target_tokens({"labels": labels}, encoder_decoder=True) == 4
    assert target_tokens({"labels": labels}, encoder_decoder=False) == 4
    assert target_tokens({"labels": torch.tensor([[4, 5, -100]])}, encoder_decoder=False) == 1
    assert target_tokens({"input_ids": torch.zeros(3, 2)}, encoder_decoder=False) == 3


def test_causal_model_trains_with_token_weights_and_logs_per_objective_loss(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for name in ("causal", "prefix"):
        ids = torch.randint(3, VOCAB, (2, 10), generator=generator)
        labels = ids.clone()
        if name == "prefix":
            labels[:, :6] = -100
        batches.append({"input_ids": ids, "labels": labels, "objective": name})
    model = tiny_llama()
    with torch.no_grad():
        expected = {b["objective"]: float(model(**{k: b[k] for k in ("input_ids", "labels")}).loss) for b in batches}
    Trainer(model, quick_config(steps=2, grad_accum_steps=2, log_every=2, warmup_steps=0), batches).train(tmp_path)
    record = read_metrics(tmp_path)[0]
    assert record["step"] == 2
    # step 1 saw both objectives before any update: its per-objective means are the untrained model's losses
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"loss/causal", "loss/prefix", "lr", "grad_norm", "tokens_per_s", "tokens"}
    assert first["loss/causal"] != pytest.approx(first["loss/prefix"])
    assert expected["causal"] > 0 and expected["prefix"] > 0


def test_metrics_record_lr_of_the_step_grad_norm_and_throughput(tmp_path):
    config = quick_config(steps=4, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    Trainer(tiny_openba(), config, seq2seq_batches(4, objective=["R", "S"])).train(tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records] == pytest.approx(
        [learning_rate(s, steps=4, lr=1e-3, min_lr=1e-4, warmup_steps=2) for s in range(4)])
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert {"loss/R", "loss/S"} <= set(records[0]) | set(records[1])
    assert records[-1]["tokens"] == sum(4 * 12 + int((b["labels"] != -100).sum())
                                        for b in seq2seq_batches(4))
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["attn_implementation"] == "sdpa" and info["engine"] == "torch"


def test_metrics_also_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class SummaryWriter:  # stands in for tensorboard's, which this machine lacks
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    Trainer(tiny_openba(), quick_config(steps=2, warmup_steps=0), seq2seq_batches(2, objective=["R"])).train(tmp_path)
    assert ("loss", 1) in scalars and ("loss/R", 2) in scalars and ("lr", 2) in scalars
    assert scalars[-1] == ("closed", None)


def test_grad_clip_scales_the_gradient_and_the_logged_norm_is_before_clipping(tmp_path):
    """Adam's first update is lr * g / (|g| + eps): about lr unclipped, but tiny once the global norm is clipped far
    below eps (1e-8), which shows the clip happened before the optimizer step."""
    def max_move(grad_clip, name):
        model = tiny_openba()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = quick_config(steps=1, warmup_steps=0, lr=1e-2, min_lr=1e-2, grad_clip=grad_clip, weight_decay=0.0,
                              schedule="constant")
        result = Trainer(model, config, seq2seq_batches(1)).train(tmp_path / name)
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())
        return moved, result["grad_norm"]

    free, norm = max_move(0.0, "free")
    clipped, clipped_norm = max_move(1e-10, "clipped")
    assert free == pytest.approx(1e-2, rel=0.05)
    assert clipped < 0.05 * free
    assert clipped_norm == pytest.approx(norm) and norm > 1e-3


def test_eval_fn_runs_every_eval_every_steps_in_eval_mode_and_at_the_end(tmp_path):
    calls = []

    def eval_fn(model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        return {"val": float(step)}

    result = Trainer(tiny_openba(), quick_config(steps=5, eval_every=2), seq2seq_batches(2), eval_fn=eval_fn) \
        .train(tmp_path)
    assert calls == [(2, False, False), (4, False, False), (5, False, False)]
    assert result["eval/val"] == 5.0
    assert [r["eval/val"] for r in read_metrics(tmp_path) if "eval/val" in r] == [2.0, 4.0, 5.0]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    config = quick_config(steps=3)
    plain = Trainer(tiny_openba(), config, seq2seq_batches(3)).train(tmp_path / "a")
    checkpointed = Trainer(tiny_openba(), dataclass_replace(config, gradient_checkpointing=True),
                           seq2seq_batches(3)).train(tmp_path / "b")
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_bf16_autocast_on_the_plain_engine_stays_close_to_fp32(tmp_path):
    config = quick_config(steps=3)
    full = Trainer(tiny_openba(), config, seq2seq_batches(3)).train(tmp_path / "fp32")
    half = Trainer(tiny_openba(), dataclass_replace(config, bf16=True), seq2seq_batches(3)).train(tmp_path / "bf16")
    assert half["loss"] == pytest.approx(full["loss"], rel=1e-2) and half["loss"] != full["loss"]
    assert json.loads((tmp_path / "bf16" / "train_info.json").read_text())["bf16"] is True


def test_save_model_writes_a_checkpoint_that_reloads_with_equal_logits(tmp_path):
    from core.checkpoint import load_model

    model = tiny_openba()
    trainer = Trainer(model, quick_config(steps=2), seq2seq_batches(2))
    trainer.train(tmp_path / "run")
    trainer.save_model(tmp_path / "model")
    batch = seq2seq_batches(1, seed=9)[0]
    reloaded = load_model(tmp_path / "model").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_bf16_is_automatic_close_to_the_cpu_run_and_the_saved_model_is_the_trained_one(tmp_path, monkeypatch):
    from core.checkpoint import load_model

    model = tiny_openba()
    trainer = Trainer(model, quick_config(steps=3), seq2seq_batches(3))
    on_gpu = trainer.train(tmp_path / "gpu")
    info = json.loads((tmp_path / "gpu" / "train_info.json").read_text())
    assert info["device"].startswith("cuda") and info["bf16"] is True
    trainer.save_model(tmp_path / "model")
    batch = seq2seq_batches(1, seed=9)[0]
    reloaded, trained = load_model(tmp_path / "model").eval(), model.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = Trainer(tiny_openba(), quick_config(steps=3), seq2seq_batches(3)).train(tmp_path / "cpu")
    assert json.loads((tmp_path / "cpu" / "train_info.json").read_text())["bf16"] is False
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=2e-2)


def test_train_config_loads_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 100\nschedule: wsd\nbetas: [0.9, 0.99]\ndeepspeed: 3\n")
    config = load_config(TrainConfig, path, ["lr=3e-4", "bf16=false"])
    assert (config.steps, config.schedule, config.betas, config.deepspeed, config.lr, config.bf16) == (
        100, "wsd", (0.9, 0.99), 3, 3e-4, False)
    with pytest.raises(UserError, match="grad_clip"):
        load_config(TrainConfig, None, ["grad_clp=1"])


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"schedule": "linear"}, "schedule must be one of"),
    ({"min_lr": 1.0, "lr": 0.1}, "min_lr <= lr"),
    ({"warmup_steps": 10, "steps": 10}, "warmup_steps"),
    ({"deepspeed": 4}, "ZeRO stage"),
    ({"deepspeed": "missing.json"}, "not found"),
    ({"offload_optimizer": True}, "offload_optimizer needs DeepSpeed"),
    ({"bf16": "yes"}, "bf16"),
])
def test_bad_train_config_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**overrides)


def test_deepspeed_config_comes_from_the_train_config_or_a_shipped_file(tmp_path):
    from pathlib import Path

    from pretrain.trainer.deepspeed_config import deepspeed_config
    from pretrain.trainer.process import Runtime

    runtime = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    built = deepspeed_config(TrainConfig(deepspeed=2, offload_optimizer=True, micro_batch_size=4,
                                         grad_accum_steps=3, grad_clip=0.5), runtime)
    assert built["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert (built["train_batch_size"], built["gradient_accumulation_steps"], built["gradient_clipping"]) == (24, 3, 0.5)
    assert built["bf16"] == {"enabled": False}  # "auto" on a CPU

    shipped = Path(__file__).resolve().parents[2] / "pretrain" / "deepspeed_configs" / "zero3_offload.json"
    from_file = deepspeed_config(TrainConfig(deepspeed=str(shipped), micro_batch_size=2), runtime)
    assert from_file["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert from_file["bf16"] == {"enabled": True} and from_file["train_batch_size"] == 4

    with_optimizer = tmp_path / "ds.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(UserError, match="sets 'optimizer'"):
        deepspeed_config(TrainConfig(deepspeed=str(with_optimizer)), runtime)


def test_unwrap_finds_the_model_inside_either_engine(tmp_path):
    from pretrain.trainer import unwrap

    for stage in (None, 2):
        model = tiny_openba()
        trainer = Trainer(model, quick_config(steps=1, deepspeed=stage), seq2seq_batches(1))
        trainer.train(tmp_path / str(stage))
        wrapped = trainer.engine.module  # what the loss is called on: DeepSpeed's engine under ZeRO
        assert (type(wrapped).__name__ == "DeepSpeedEngine") == (stage is not None)
        assert unwrap(wrapped) is model and unwrap(model) is model


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_dataset_fails_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="empty"):
        Trainer(tiny_openba(), quick_config(), [])
    with pytest.raises(UserError, match="empty"):
        Trainer(tiny_openba(), quick_config(), iter([])).train(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_one_shot_iterator_that_runs_out_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="ran out after 2 batches"):
        Trainer(tiny_openba(), quick_config(steps=3), iter(seq2seq_batches(2))).train(tmp_path)


def test_sequence_longer_than_the_model_supports_fails_before_anything_is_written(tmp_path):
    too_long = seq2seq_batches(1, source=65)
    with pytest.raises(UserError, match=r"encoder sequence length 65 exceeds .*\(64, config max_seq_length\)"):
        Trainer(tiny_openba(), quick_config(), too_long).train(tmp_path / "a")
    with pytest.raises(UserError, match=r"decoder sequence length 33 .*decoder_max_seq_length"):
        Trainer(tiny_openba(), quick_config(), seq2seq_batches(1, target=33)).train(tmp_path / "b")
    long_causal = [{"input_ids": torch.ones(1, 65, dtype=torch.long), "labels": torch.ones(1, 65, dtype=torch.long)}]
    with pytest.raises(UserError, match="max_position_embeddings"):
        Trainer(tiny_llama(), quick_config(), long_causal).train(tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_teacher_with_another_vocabulary_is_rejected_before_training(tmp_path):
    class Distil:
        def __init__(self, teacher, student_to_teacher=None):
            self.teacher, self.student_to_teacher = teacher, student_to_teacher

        def __call__(self, model, batch):
            return model(**batch).loss, {}

    teacher = tiny_openba(vocab_size=VOCAB * 2)
    with pytest.raises(UserError, match=r"teacher's vocabulary \(128 tokens\) differs from the student's \(64\)"):
        Trainer(tiny_openba(), quick_config(), seq2seq_batches(1), loss_fn=Distil(teacher)).train(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    mapped = Distil(teacher, student_to_teacher=torch.arange(VOCAB))
    Trainer(tiny_openba(), quick_config(steps=1), seq2seq_batches(1), loss_fn=mapped).train(tmp_path / "b")

    from pretrain.objectives import DistillationLoss  # the project's distillation objective, through its check()

    with pytest.raises(UserError, match="vocab"):
        Trainer(tiny_openba(), quick_config(), seq2seq_batches(1), loss_fn=DistillationLoss(teacher)) \
            .train(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_objective_weights_that_do_not_sum_to_a_positive_number_surface_before_training(tmp_path):
    from pretrain.objectives import check_weights

    class MixtureData:
        """Data whose `check` validates its mixture weights (how a data pipeline reports bad config)."""

        def __init__(self, weights):
            self.weights = weights

        def check(self):
            check_weights(self.weights, 2)

        def __iter__(self):
            return iter(seq2seq_batches(2))

    with pytest.raises(UserError, match="sum to a positive number"):
        Trainer(tiny_openba(), quick_config(), MixtureData([0.0, 0.0])).train(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_labels_that_are_all_ignored_are_a_user_error(tmp_path):
    batch = seq2seq_batches(1)[0]
    batch["labels"][:] = -100
    with pytest.raises(UserError, match="no target tokens"):
        Trainer(tiny_openba(), quick_config(), [batch]).train(tmp_path)


def test_default_loss_keeps_packed_documents_apart():
    """With a KV cache transformers would let packed documents attend to each other: default_loss turns it off."""
    from pretrain.objectives import token_mean_loss
    from pretrain.trainer import default_loss

    model = tiny_llama(use_cache=True)
    ids = torch.randint(3, 64, (1, 12))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.tensor([list(range(5)) + list(range(7))])}
    batch["labels"][0, 5] = -100  # no prediction across the document boundary
    with torch.no_grad():
        packed, _ = default_loss(model, batch)
        reference, _ = token_mean_loss(model, batch)
        leaky = model(**batch).loss  # the model's own call with its cache on
    torch.testing.assert_close(packed, reference)
    assert not torch.allclose(packed, leaky)


def test_processes_sharing_a_cpu_split_its_cores_unless_threads_are_set():
    from pretrain.trainer.process import cpu_threads_per_process

    assert cpu_threads_per_process(16, 2, threads_set=False) == 8
    assert cpu_threads_per_process(2, 4, threads_set=False) == 1
    assert cpu_threads_per_process(16, 2, threads_set=True) is None  # OMP_NUM_THREADS is the user's choice
    assert cpu_threads_per_process(16, 1, threads_set=False) is None  # one process keeps torch's default


def test_fp16_weights_train_as_float32_master_weights(tmp_path):
    """An fp16 checkpoint (the OpenBA release's dtype) must train: without a loss scale fp16 AdamW overflows."""
    from pretrain.trainer import Trainer, TrainConfig

    model = tiny_llama().half()
    before = {k: v.float().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (4, 16))
    data = [{"input_ids": ids, "labels": ids}] * 8
    trainer = Trainer(model, TrainConfig(steps=3, lr=1e-2, bf16=False, save_every=0, eval_every=0), data)
    trainer.train(tmp_path)
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["master_weights_upcast_from"] == "float16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_master_weights_go_back_to_each_parameters_own_dtype(tmp_path):
    """bf16 matrices beside float32 norms train as float32 and come back as they were, parameter by parameter."""
    from pretrain.trainer import Trainer, TrainConfig

    model = tiny_llama().to(torch.bfloat16)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data = parameter.data.float()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16, torch.float32}
    ids = torch.randint(0, 64, (4, 16))
    trainer = Trainer(model, TrainConfig(steps=2, lr=1e-2, bf16=False, save_every=0, eval_every=0),
                      [{"input_ids": ids, "labels": ids}] * 4)
    trainer.train(tmp_path)
    assert trainer.master_weights_upcast == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    trainer.restore_checkpoint_dtype()
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
