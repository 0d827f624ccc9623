"""recipes/configs/llama_v2.yaml end to end on a tiny stock Llama (a Llama-3-style byte-level BPE tokenizer, no pad
token, no UL2 tokens): the config's own stages, kinds and settings, with sizes, steps and data shrunk by one
`--set` each and the gates (hub tasks in the config) replaced by a small offline one."""

import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.stage import Manifest
from recipes.openba_v2 import load_recipe, main
from tests.pretrain.stock import stock_checkpoint, stock_corpus  # noqa: F401  (fixture)

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "llama_v2.yaml"
RECOVERY = ["input_length=64", "validation_batches=1", "train.steps=2", "train.micro_batch_size=2",
            "train.eval_every=2", "train.save_every=2", "train.warmup_steps=0"]


def long_mix(corpus: Path, out: Path) -> Path:
    """The ProLong-style mixture the long-context stage reads: documents tagged with the config's four sources."""
    sources = ["code", "books", "textbooks", "short"]
    splits = {}
    for split in ("train", "validation"):
        texts = list(datasets.load_from_disk(str(corpus))[split]["text"])
        splits[split] = datasets.Dataset.from_dict({"text": texts,
                                                    "source": [sources[i % 4] for i in range(len(texts))]})
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def settings(stage: str, *pairs: str) -> list[str]:
    return [f"--set=stages.{stage}.args.{pair}" for pair in pairs]


@pytest.mark.slow
def test_llama_v2_recipe_runs_end_to_end_on_a_tiny_stock_llama(stock_corpus, tmp_path):
    texts = list(datasets.load_from_disk(str(stock_corpus))["train"]["text"])
    model_dir = stock_checkpoint("llama", tmp_path / "Llama", texts, num_hidden_layers=4)
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({
        "limit": 4, "cache_dir": str(tmp_path / "cache"),
        "rules": [{"task": "corpus_ppl", "metric": "bits_per_byte", "max_rel_drop": 10.0}],
        "task_data": {"corpus": {"max_documents": 40, "validation_size": 0.2}, "ppl_documents": 4, "ppl_chars": 300,
                      "mc_questions": 4, "probe_lengths": [200], "probe_depths": [0.5], "probe_samples": 1}}))
    corpus, mix = str(stock_corpus), long_mix(stock_corpus, tmp_path / "long_mix")
    recover = [*RECOVERY, f"data.paths=[{corpus}]"]
    run_dir = tmp_path / "run"
    main(["--config", str(CONFIG), f"--set=model={model_dir}", f"--set=run_dir={run_dir}",
          f"--set=cache_dir={tmp_path / 'cache'}",
          *[f"--set=gates.{name}={gate}" for name in ("commonsense", "pruned", "long")],
          *settings("layers", "remove=1", f"calib={corpus}", "calibration.num_samples=4", "calibration.seq_len=32"),
          *settings("layers_recover", *recover),
          *settings("neurons", "hidden=48", "ffn_width=64", "heads=2", "round_to=16", f"calib={corpus}",
                    "calibration.num_samples=4", "calibration.seq_len=32"),
          *settings("neurons_recover", *recover),
          *settings("vocab", f"corpus={corpus}", "coverage=0.9", "pad_to=64"),
          *settings("long_context", *RECOVERY, f"data.paths=[{mix}]", "long_context.train_seq_len=128",
                    "long_context.eval_seq_len=64"),
          *settings("logo", "data.samples=4", "data.chunk_size=64", "data.document_chunks=10", "data.context_chunks=6",
                    "data.full_chunks=3", "data.half_chunks=2", "data.wrong_chunks=2",
                    "data.generation.max_new_tokens=6", "data.generation.min_new_tokens=1",
                    "logo.position.window=2048", "logo.position.chunk_size=64", "logo.position.max_chunks=8",
                    "logo.train.steps=2", "logo.train.grad_accum_steps=1", "logo.train.warmup_steps=1",
                    "logo.train.save_every=2")])

    recipe = load_recipe(CONFIG, [])
    manifests = {spec.name: Manifest.read(run_dir / spec.name) for spec in recipe.stages}
    assert all(m.metrics["gate"]["passed"] for m in manifests.values())
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "logo")
    assert final.config.num_hidden_layers == 3 and final.config.hidden_size == 48
    assert final.config.intermediate_size == 64 and final.config.num_attention_heads == 2
    assert final.config.rope_parameters["rope_theta"] == 500000.0
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "logo")
    assert len(tokenizer) < len(AutoTokenizer.from_pretrained(model_dir))  # vocabulary pruned, no UL2 tokens added
    assert final.get_input_embeddings().num_embeddings % 64 == 0
    assert sum(p.numel() for p in final.parameters()) < sum(p.numel() for p in original.parameters())
    assert manifests["layers_recover"].metrics["distilled_from"] == str(model_dir)
    trained_with = json.loads((run_dir / "layers_recover" / "train_info.json").read_text())
    assert trained_with["engine"] == "deepspeed" and trained_with["zero_stage"] == 3  # as the config says
    assert manifests["logo"].metrics["preference_data"]["rows"] > 0  # responses sampled from the model itself
    assert manifests["long_context"].metrics["added_tokens"] is None
    assert manifests["logo"].metrics["step"] == 2 and (run_dir / "logo" / "lora_adapter").is_dir()
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(final(input_ids=ids).logits).all()
