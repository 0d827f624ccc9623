"""The scorer ablation on a tiny random OpenBA (two scorers per group, two seeds, two recovery steps): pruned models
of a group have equal parameter counts, random draws differ between seeds, results.json holds exactly what the
stage manifests and evaluation files hold, report.md has the table, and a rerun skips every stage."""

import json
from pathlib import Path

import pytest
import yaml

from core.errors import UserError
from core.stage import MANIFEST, Manifest
from recipes.scorer_ablation import CONFIGS, AblationConfig, main
from core.config import load_config
from tests.factory import BYTE_VOCAB, byte_tokenizer, tiny_model

CORPUS = {"max_documents": 40, "validation_size": 4}


def small_config(model: Path, cache: Path) -> dict:
    return {
        "model": str(model), "cache_dir": str(cache), "corpus": CORPUS,
        "layer_scorers": ["random", "block_influence"], "iterative": [], "neuron_scorers": ["random", "activation"],
        "seeds": [0, 1], "layers": {"remove": {"decoder": 2}}, "neurons": {"hidden": 32, "ffn_width": 64, "heads": 2},
        "calibration": {"num_samples": 4, "seq_len": 64},
        "recover": {"objective": "prefix", "input_length": 64, "target_length": 32, "validation_batches": 1,
                    "distill": {"temperature": 2.0, "kd_weight": 0.5},
                    "train": {"steps": 2, "micro_batch_size": 2, "eval_every": 2, "save_every": 2}},
        "eval": {"tasks": ["corpus_ppl"], "limit": 4, "cache_dir": str(cache),
                 "task_data": {"corpus": CORPUS, "ppl_documents": 4, "ppl_chars": 300, "mc_questions": 2,
                               "mc_context_chars": 100, "mc_choice_chars": 40, "probe_kinds": ["needle"],
                               "probe_lengths": [200], "probe_depths": [0.5], "probe_samples": 1}},
    }


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """One run on a byte-vocabulary OpenBA with 1 encoder and 6 decoder blocks (prefix LM recovery: the byte
    tokenizer has no UL2 sentinels)."""
    from core.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ablation")
    model = tiny_model("openba", vocab_size=BYTE_VOCAB, hidden_size=64, kv_channels=16, num_heads=4,
                       ffn_hidden_size=128, num_layers=1, num_decoder_layers=6, max_seq_length=1024,
                       decoder_max_seq_length=1024)
    save_checkpoint(model, byte_tokenizer(), root / "model")
    config = root / "ablation.yaml"
    config.write_text(yaml.safe_dump(small_config(root / "model", root / "cache")))
    out = root / "run"
    main(["--config", str(config), "--out", str(out)])
    return config, out, json.loads((out / "results.json").read_text())


def test_every_scorer_of_a_group_prunes_to_the_same_parameter_count(ablation):
    _, out, results = ablation
    for group in ("layers", "neurons"):
        rows = [row for row in results["rows"] if row["group"] == group]
        assert [row["scorer"] for row in rows] == (["random", "block_influence"] if group == "layers"
                                                   else ["random", "activation"])
        counts = {Manifest.read(out / run["prune"]).parameters["after"] for row in rows for run in row["runs"]}
        assert len(counts) == 1 and {row["parameters"] for row in rows} == counts
        assert counts.pop() < results["reference"]["parameters"]


def test_random_draws_differ_between_seeds_and_fixed_scorers_prune_once(ablation):
    _, out, results = ablation
    rows = {(row["group"], row["scorer"]): row for row in results["rows"]}
    random_neurons = rows[("neurons", "random")]["runs"]
    assert [run["prune"] for run in random_neurons] == ["neurons/random/prune-seed0", "neurons/random/prune-seed1"]
    assert random_neurons[0]["kept_hidden"] != random_neurons[1]["kept_hidden"]
    assert len(random_neurons[0]["kept_hidden"]) == 32
    for run in rows[("layers", "random")]["runs"]:  # what was removed is what the prune's manifest says
        assert run["removed"] == Manifest.read(out / run["prune"]).metrics["removed"]
        assert Manifest.read(out / run["prune"]).config["seed"] == run["seed"]
    fixed = rows[("layers", "block_influence")]["runs"]
    assert {run["prune"] for run in fixed} == {"layers/block_influence/prune"}
    assert rows[("layers", "block_influence")]["pruned"]["n"] == 1
    # every recovery of a pruned model has its own data-order seed
    seeds = [Manifest.read(out / run["recover"]).config for run in fixed]
    assert [(c["seed"], c["data"]["seed"], c["train"]["seed"]) for c in seeds] == [(0, 0, 0), (1, 1, 1)]
    assert seeds[0]["train"]["steps"] == 2 and seeds[0]["distill"] is not None


def test_results_hold_the_numbers_of_the_evaluation_files(ablation):
    _, out, results = ablation

    def stored(name: str) -> float:
        record = json.loads((out / f"{name}-eval" / "results.json").read_text())
        return record["results"]["metrics"]["corpus_ppl"]["bits_per_byte"]

    assert results["reference"]["bits_per_byte"] == stored("model")
    for row in results["rows"]:
        recovered = [stored(run["recover"]) for run in row["runs"]]
        assert [run["recovered"] for run in row["runs"]] == recovered == row["recovered"]["values"]
        assert row["recovered"]["mean"] == pytest.approx(sum(recovered) / 2)
        spread = abs(recovered[0] - recovered[1]) / 2  # the standard error of two values
        assert row["recovered"]["se"] == pytest.approx(spread)
        assert sorted(row["pruned"]["values"]) == sorted({stored(run["prune"]) for run in row["runs"]})


def test_report_has_the_table_and_the_plot(ablation):
    _, out, results = ablation
    report = (out / "report.md").read_text()
    assert "| group | scorer | parameters | kept | bits per byte pruned | bits per byte recovered | seeds |" in report
    for row in results["rows"]:
        mean, se = row["recovered"]["mean"], row["recovered"]["se"]
        assert f"{mean:.3f} ± {se:.3f}" in report
        assert f"| {row['group']} | {row['label']} | {row['parameters']:,} |" in report
    assert "prefix + distillation from the unpruned model, 2 steps x 2 rows" in report
    assert (out / "ablation.png").stat().st_size > 10_000


def test_a_rerun_skips_every_finished_stage(ablation, capsys):
    config, out, results = ablation
    manifests = {p: p.read_bytes() for p in out.rglob(MANIFEST)}
    main(["--config", str(config), "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == len(manifests)
    assert {p: p.read_bytes() for p in out.rglob(MANIFEST)} == manifests
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["rows"] == results["rows"]
    # the run's own wall time and load stay recorded: a rerun that ran nothing does not overwrite them
    assert (rerun["seconds"], rerun["load_average"]) == (results["seconds"], results["load_average"])


def test_bad_settings_are_user_errors_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="iterative pruning changes nothing"):
        AblationConfig(iterative=["random"])
    with pytest.raises(UserError, match="seeds must be distinct"):
        AblationConfig(seeds=[0, 0])
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**small_config(tmp_path / "model", tmp_path / "cache"),
                                      "neuron_scorers": ["activations"]}))
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_the_shipped_config_is_the_default():
    assert load_config(AblationConfig, CONFIGS / "scorer_ablation.yaml") == AblationConfig()
