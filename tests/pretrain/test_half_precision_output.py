"""A half-precision checkpoint trains as float32 master weights (tests/pretrain/test_trainer.py) but comes out in its
own dtype: a bf16 input saved as float32 would double its size and change what users load."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from core.checkpoint import load_model
from core.stage import Manifest
from tests.pretrain.test_stock_checkpoints import short_run


def half_copy(source, directory, dtype):
    shutil.copytree(source, directory)
    model = load_model(source).to(dtype)
    model.save_pretrained(str(directory), max_shard_size="200KB")  # sharded, as hub checkpoints are
    for stale in ("model.safetensors",):
        (directory / stale).unlink(missing_ok=True)
    return directory


def saved_dtypes(directory) -> set[str]:
    files = sorted(directory.glob("*.safetensors"))
    dtypes = set()
    for path in files:
        with safe_open(str(path), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return dtypes


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_continual_keeps_a_half_precision_checkpoints_dtype(dtype, name, stock_dirs, stock_corpus, tmp_path):
    from pretrain.continual import main

    source = half_copy(stock_dirs("qwen2"), tmp_path / "half", dtype)
    out = tmp_path / "out"
    main(["--model", str(source), "--out", str(out), *short_run(stock_corpus, "objective=causal")])
    assert json.loads((out / "train_info.json").read_text())["master_weights_upcast_from"] == str(dtype)[6:]
    assert saved_dtypes(out) == {name}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype)[6:]
    before, after = load_model(source), load_model(out)
    assert after.dtype == dtype
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_logo_keeps_a_bf16_checkpoints_dtype(stock_dirs, tmp_path):
    from align.logo import main

    source = half_copy(stock_dirs("llama"), tmp_path / "half", torch.bfloat16)
    rows = [{"prompt": "def f(x):\n    return x + 1\n" * 6 + "What is f(2)?", "chosen": " 3", "rejected": [" 4"]}] * 4
    data = tmp_path / "trl.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "logo"
    main(["--model", str(source), "--data", str(data), "--out", str(out), "--set=loss.num_rejected=1",
          "--set=position.chunk_size=16", "--set=train.steps=2", "--set=train.warmup_steps=0", "--set=train.lr=1e-2"])
    assert Manifest.read(out).metrics["step"] == 2
    assert saved_dtypes(out) == {"BF16"}
    assert load_model(out).dtype == torch.bfloat16
