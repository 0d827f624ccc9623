"""The tiny teacher in the same wall-clock budget with fixed-length and with fitted packed rows.

Both arms train the default teacher (pretrain/teacher.py: its config, corpus, tokenizer, UL2 mixture, model and
trainer) from the same initialisation on the same document stream; they differ only in the batch layout:
"fixed" packs rows to the configured input/target lengths (`ObjectiveBatches(fit_to_rows=False)`), "fitted" cuts
each packed batch to its longest row per side (the default). Each arm keeps the teacher's learning-rate schedule
over its configured steps and stops after the first step that ends past `--seconds` of training; the validation
loss is then measured on the same fixed validation batches for both (its time is in the arm's seconds). More real
tokens in the same time, and the lower loss they buy, is what the fitted layout is for.

    python -m benchmarks.teacher_packing --seconds 90
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from core.errors import main_guard
from core.table import format_table


class StopAfter:
    """A loss_fn that ends training after the first step that finishes past `seconds`: it lowers the trainer's
    `config.steps` to the step in progress, so the loop evaluates and stops there as at a planned end (the
    learning-rate schedule was built from the original steps and is unchanged)."""

    def __init__(self, loss_fn, train_config, seconds: float):
        self.loss_fn, self.train_config, self.seconds = loss_fn, train_config, seconds
        self.calls, self.started = 0, None

    def __call__(self, model, batch):
        if self.started is None:
            self.started = time.perf_counter()
        self.calls += 1
        step = (self.calls - 1) // self.train_config.grad_accum_steps + 1
        if time.perf_counter() - self.started >= self.seconds:
            self.train_config.steps = min(self.train_config.steps, step)
        return self.loss_fn(model, batch)


def train_arm(name: str, fit_to_rows: bool, seconds: float, config, corpus, tokenizer, val_batches) -> dict:
    import copy

    from core.openba import openba_config
    from core.openba.modeling_openba import OpenBAForConditionalGeneration
    from pretrain.data import TokenizedDocuments
    from pretrain.objectives import ObjectiveBatches, SpecialIds, token_mean_loss, ul2_mixture
    from pretrain.teacher import ValidationLoss
    from pretrain.trainer import Trainer

    ids = SpecialIds.from_tokenizer(tokenizer)
    documents = TokenizedDocuments(corpus["train"], tokenizer, seed=config.seed, name="train")
    data = ObjectiveBatches(documents, ul2_mixture(ids, config.objective_weights),
                            batch_size=config.train.micro_batch_size, input_length=config.input_length,
                            target_length=config.target_length, packed=True, pad_id=ids.pad,
                            max_spans=len(ids.sentinels), seed=config.seed, fit_to_rows=fit_to_rows)
    torch.manual_seed(config.seed)
    model = OpenBAForConditionalGeneration(openba_config(config.preset, **{**config.model,
                                                                           "vocab_size": len(tokenizer)}))
    train_config = copy.deepcopy(config.train)
    train_config.save_every, train_config.eval_every = 0, 0  # only the final evaluation; no checkpoint writes
    stopper = StopAfter(token_mean_loss, train_config, seconds)
    trainer = Trainer(model, train_config, data, loss_fn=stopper, eval_fn=ValidationLoss(val_batches))
    with tempfile.TemporaryDirectory() as work:
        result = trainer.train(Path(work))
    return {"arm": name, "steps": result["step"], "tokens": result["tokens"], "seconds": result["seconds"],
            "val_loss": result["eval/val_loss"], "share": data.stats["tokens"] / max(data.stats["slots"], 1)}


def run(seconds: float, threads: int | None) -> list[dict]:
    from pretrain.data import TokenizedDocuments
    from pretrain.objectives import ObjectiveBatches, SpecialIds, ul2_mixture
    from pretrain.teacher import DEFAULT_CACHE, TeacherConfig, _load_texts, ensure_tokenizer

    if threads:
        torch.set_num_threads(threads)
    config = TeacherConfig()
    corpus = _load_texts(config, DEFAULT_CACHE)
    tokenizer = ensure_tokenizer(config, corpus, DEFAULT_CACHE)
    ids = SpecialIds.from_tokenizer(tokenizer)
    validation = ObjectiveBatches(TokenizedDocuments(corpus["validation"], tokenizer, seed=config.seed + 1,
                                                     name="validation"),
                                  ul2_mixture(ids, config.objective_weights), batch_size=config.train.micro_batch_size,
                                  input_length=config.input_length, target_length=config.target_length, packed=True,
                                  pad_id=ids.pad, max_spans=len(ids.sentinels), seed=config.seed + 1)
    val_batches = [next(validation) for _ in range(config.validation_batches)]
    return [train_arm("fixed rows", False, seconds, config, corpus, tokenizer, val_batches),
            train_arm("fitted rows", True, seconds, config, corpus, tokenizer, val_batches)]


@main_guard
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall-clock budget per arm")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    fixed, fitted = run(args.seconds, args.threads)
    rows = [(arm["arm"], arm["steps"], arm["tokens"], round(arm["seconds"], 1), round(arm["tokens"] / arm["seconds"]),
             f"{arm['share']:.3f}", f"{arm['val_loss']:.4f}") for arm in (fixed, fitted)]
    speed = lambda arm: arm["tokens"] / arm["seconds"]  # noqa: E731
    rows.append(("fitted / fixed (loss: -)", f"{fitted['steps'] / fixed['steps']:.2f}",
                 f"{fitted['tokens'] / fixed['tokens']:.2f}", "", f"{speed(fitted) / speed(fixed):.2f}", "",
                 f"{fitted['val_loss'] - fixed['val_loss']:+.4f}"))
    print(format_table(rows, ["teacher", "steps", "real tokens", "seconds", "real tok/s", "non-padding share",
                              "val loss"]))


if __name__ == "__main__":
    main()
