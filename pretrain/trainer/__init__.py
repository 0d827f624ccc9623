"""The trainer shared by continual pretraining and LOGO: plain torch or DeepSpeed ZeRO 1-3, alone or under a launcher.

    loop.py              `Trainer`: the training loop and its contracts with data, loss and evaluation
    config.py            `TrainConfig`: optimizer, schedule, batch, engine and checkpoint settings
    process.py           where this process sits (rank, device) and the collectives the loop uses
    engines.py           plain torch and DeepSpeed behind one interface; `unwrap` for the model inside an engine
    deepspeed_config.py  the DeepSpeed JSON a TrainConfig stands for
    kernels.py           bfloat16 and the attention kernel on this device
    batches.py           batch helpers and `DataStream`, the data position a checkpoint saves
    checkpointing.py     checkpoints that resume bit-exactly (engine state, RNG states, data position)
    metrics_log.py       metrics.jsonl (and TensorBoard)
"""

from pretrain.trainer.batches import default_loss, target_tokens, tensors_of
from pretrain.trainer.checkpointing import CHECKPOINTS, checkpoint_dirs, latest_checkpoint
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.engines import unwrap
from pretrain.trainer.loop import TRAIN_INFO, Trainer
from pretrain.trainer.metrics_log import METRICS, read_metrics

__all__ = ["CHECKPOINTS", "METRICS", "TRAIN_INFO", "TrainConfig", "Trainer", "checkpoint_dirs", "default_loss",
           "latest_checkpoint", "read_metrics", "target_tokens", "tensors_of", "unwrap"]
