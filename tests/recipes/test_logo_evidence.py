"""The LOGO evidence recipe end to end on a tiny random OpenBA (smoke settings): data, LOGO and SFT with the same
steps, three gated evaluations, a Markdown report whose rows are the three models; and its stage configs, built
field by field from the experiment's settings."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from core.errors import UserError
from core.stage import Manifest
from pretrain.corpus import CorpusConfig
from recipes.logo_evidence import EvidenceConfig, InstructConfig, main, run_evidence
from recipes.logo_evidence_report import MODELS
from tests.factory import byte_tokenizer, save_byte_checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random OpenBA over a byte vocabulary: the model the experiment aligns."""
    root = tmp_path_factory.mktemp("evidence")
    save_byte_checkpoint("openba", root / "openba", byte_tokenizer(root / "tokenizer"))
    return root / "openba"


def smoke_config(teacher, tmp_path) -> EvidenceConfig:
    return EvidenceConfig(teacher=str(teacher), cache_dir=str(tmp_path / "cache"),
                          corpus=CorpusConfig(max_documents=40, validation_size=4), samples=4, chunk_size=128,
                          context_chunks=4, document_chunks=6, window_factor=2, steps=1, batch_size=2,
                          probe_lengths=(300, 900), probe_depths=(0.5,), probe_samples=1, ppl_documents=2)


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_evidence_compares_before_logo_and_sft_in_a_markdown_table(teacher, tmp_path):
    config = dataclasses.replace(smoke_config(teacher, tmp_path), probe_kinds=("needle", "needles"))
    result = run_evidence(config, tmp_path / "evidence")
    report = (tmp_path / "evidence" / "report" / "report.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in report
    assert "needle @900 chars" in report and "needles @900 chars" in report and "byte perplexity" in report
    tokens = {kind: float(re.search(rf"\| {kind} @900 chars \(~(\d+) tok\)", report).group(1))
              for kind in ("needle", "needles")}
    assert tokens["needles"] > tokens["needle"]  # each kind's own length: the distractor facts add text
    logo = Manifest.read(tmp_path / "evidence" / "logo")
    sft = Manifest.read(tmp_path / "evidence" / "sft")
    assert logo.config["loss"]["loss"] == "logo" and sft.config["loss"]["loss"] == "sft"
    assert logo.config["train"] == sft.config["train"] and logo.config["position"] == sft.config["position"]
    assert logo.metrics["step"] == sft.metrics["step"] == 1
    evidence = json.loads((tmp_path / "evidence" / "report" / "evidence.json").read_text())
    assert [row[0] for row in evidence["table"]["rows"]] == list(MODELS)
    before_ppl = evidence["gates"][MODELS[0]]["results"]["metrics"]["corpus_ppl"]["byte_perplexity"]
    assert evidence["table"]["rows"][0][-3] == round(before_ppl, 4)
    assert result["table"]["headers"][0] == "model"
    assert "| data |" in report and "| logo |" in report and "| sft |" in report  # the stage table


@pytest.mark.slow
def test_several_training_seeds_give_a_row_each_and_their_means(teacher, tmp_path):
    config = dataclasses.replace(smoke_config(teacher, tmp_path), train_seeds=(0, 2))
    result = run_evidence(config, tmp_path / "evidence")
    labels = [row[0] for row in result["table"]["rows"]]
    assert labels == ["before LOGO", "LOGO, seed 0", "LOGO, seed 2", "SFT (same steps), seed 0",
                      "SFT (same steps), seed 2", "LOGO, mean of 2 seeds", "SFT (same steps), mean of 2 seeds"]
    rows = {row[0]: row for row in result["table"]["rows"]}
    for label in ("LOGO", "SFT (same steps)"):
        seeds, mean = [rows[f"{label}, seed {s}"] for s in (0, 2)], rows[f"{label}, mean of 2 seeds"]
        for column in range(1, len(mean) - 3):
            assert mean[column] == pytest.approx((seeds[0][column] + seeds[1][column]) / 2, abs=1e-3)
        assert mean[-1].endswith("/2 pass")
    for loss in ("logo", "sft"):  # seed 0 keeps the one-seed directory; the others get their own, seeded apart
        zero, two = Manifest.read(tmp_path / "evidence" / loss), Manifest.read(tmp_path / "evidence" / f"{loss}-seed2")
        assert (zero.config["train"]["seed"], zero.config["batches"]["seed"]) == (0, 0)
        assert (two.config["train"]["seed"], two.config["batches"]["seed"]) == (2, 2)
        assert {**zero.config["train"], "seed": 2} == two.config["train"]
    report = (tmp_path / "evidence" / "report" / "report.md").read_text()
    assert "Each is trained with seeds [0, 2]" in report and "| LOGO - SFT |" in report and "| seed 2 |" in report


def test_paired_differences_are_logo_minus_sft_per_seed_with_their_spread():
    from recipes.logo_evidence_report import paired_differences

    config = EvidenceConfig(probe_kinds=("needle",), probe_lengths=(1000, 2000), train_seeds=(0, 1, 2))
    headers = ["model", "needle @1000 chars (~290 tok)", "needle @2000 chars (~550 tok)", "needle mean", "byte ppl"]
    logo = [[0.5, 0.2], [0.7, 0.4], [0.6, 0.1]]
    sft = [[0.4, 0.3], [0.6, 0.3], [0.7, 0.3]]
    rows = [[f"{MODELS[1]}, seed {s}", *logo[s], 0, 6.0] for s in range(3)]
    rows += [[f"{MODELS[2]}, seed {s}", *sft[s], 0, 6.0] for s in range(3)]
    paired_headers, paired = paired_differences(headers, rows, config)
    assert paired_headers == ["LOGO - SFT", headers[1], headers[2]]
    assert paired[0] == ["seed 0", 0.1, -0.1] and paired[2] == ["seed 2", -0.1, -0.2]
    # column 1: differences 0.1, 0.1, -0.1 -> mean 0.0333, sd 0.1155, s.e. 0.0667
    assert paired[3][1] == "+0.033 +- 0.067" and paired[4][1:] == ["2/3 seeds", "1/3 seeds"]


def test_trainings_are_built_field_by_field_and_differ_only_in_the_loss(tmp_path):
    from recipes.logo_evidence import comparison_training, instruct_training

    config = EvidenceConfig(steps=30, lr=4e-4, batch_size=3, chunk_size=32, context_chunks=5, window_factor=3,
                            beta=10.0, gamma=3.0, sft_weight=1.0, rule_rejected=["near_miss"], seed=7, lora=True,
                            text_rows=10, text_weight=0.5, text_batch_size=2,
                            logo_overrides=["train.grad_accum_steps=2", "position.sparse_fraction=0.2"])
    logo = comparison_training(config, tmp_path / "data", "logo", 2, tmp_path / "text")
    assert logo.data == str(tmp_path / "data") and logo.lora.enabled
    assert (logo.loss.loss, logo.loss.beta, logo.loss.gamma, logo.loss.sft_weight, logo.loss.num_rejected) == \
        ("logo", 10.0, 3.0, 1.0, 1)
    assert (logo.position.window, logo.position.chunk_size, logo.position.max_chunks, logo.position.synthesize) == \
        (3 * (5 * 32 + 64), 32, 5, True)
    assert (logo.train.steps, logo.train.lr, logo.train.min_lr, logo.train.warmup_steps, logo.train.save_every) == \
        (30, 4e-4, pytest.approx(4e-5), 3, 10)
    assert (logo.train.seed, logo.batches.seed, logo.batches.batch_size) == (9, 9, 3)
    assert (logo.text.data, logo.text.weight, logo.text.batch_size) == (str(tmp_path / "text"), 0.5, 2)
    # the user's settings come last
    assert (logo.train.grad_accum_steps, logo.position.sparse_fraction) == (2, 0.2)
    sft = comparison_training(config, tmp_path / "data", "sft", 2, tmp_path / "text")
    assert dataclasses.replace(sft, loss=logo.loss) == logo
    instruct = instruct_training(dataclasses.replace(config, instruct=InstructConfig(steps=40, lr=1e-3)),
                                 tmp_path / "rows")
    assert (instruct.loss.loss, instruct.position.synthesize, instruct.position.window) == ("sft", False, 5 * 32 + 64)
    assert (instruct.train.steps, instruct.train.warmup_steps, instruct.train.seed) == (40, 2, 8)
    with pytest.raises(UserError, match=r"logo_overrides: unknown config key 'train.stpes'"):
        comparison_training(dataclasses.replace(config, logo_overrides=["train.stpes=3"]), tmp_path, "logo", 0, None)


def test_the_reported_config_plans_its_stages_from_the_instructed_model(teacher, tmp_path):
    """recipes/configs/logo_evidence.yaml: every stage's config is built before anything runs, and nothing runs."""
    from core.checkpoint import load_tokenizer
    from core.config import load_config
    from recipes.logo_evidence import plan

    config = load_config(EvidenceConfig, Path(__file__).parents[2] / "recipes/configs/logo_evidence.yaml",
                         [f"teacher={teacher}"])
    steps, before, trained = plan(config, tmp_path / "ev", teacher, load_tokenizer(teacher))
    seeds = [f"-seed{s}" for s in range(1, 10)]
    assert [step.name for step in steps] == ["instruct_data", "instruct", "data", "text_data", "logo",
                                             *(f"logo{s}" for s in seeds), "sft", *(f"sft{s}" for s in seeds)]
    assert before == tmp_path / "ev" / "instruct" and len(trained) == 20
    instruct = steps[1].run.args[2]  # run_logo(teacher, out, config): the instruction stage's LogoConfig
    assert (instruct.train.steps, instruct.train.log_every) == (6000, 200)  # the config's instruct.overrides
    assert instruct.data == str(tmp_path / "ev" / "instruct_data")
    data = steps[2].run.args[0]  # build(BuildDataConfig, out)
    assert data.generator == str(before) and data.data.rule_rejected == ["own_mistake", "irrelevant"]
    assert data.data.mistake_window == config.window == 4 * (8 * 64 + 64)
    assert not (tmp_path / "ev").exists()


def test_rule_negatives_and_lambda_reach_the_data_and_the_logo_loss(teacher, tmp_path):
    from align.data import load_rows
    from recipes.logo_evidence import instruction_data

    config = dataclasses.replace(smoke_config(teacher, tmp_path), rule_rejected=["near_miss"], sft_weight=1.0)
    run_evidence(config, tmp_path / "evidence", stop_after="logo")
    rows = load_rows(tmp_path / "evidence" / "data")
    assert [row["response_kinds"] for row in rows] == [["gold", "near_miss"]] * len(rows)
    loss = Manifest.read(tmp_path / "evidence" / "logo").config["loss"]
    assert (loss["num_rejected"], loss["sft_weight"]) == (1, 1.0)
    assert not (tmp_path / "evidence" / "sft").exists() and not (tmp_path / "evidence" / "report").exists()
    # the instruction stage trains gold answers only: its rows keep the default negatives (and its identity)
    assert instruction_data(config).rule_rejected == ["partial", "irrelevant"]
    with pytest.raises(UserError, match="sft_weight"):
        EvidenceConfig(sft_weight=-1)


def test_own_mistakes_come_from_the_model_before_logo_at_the_training_window(teacher, tmp_path):
    from align.data import load_rows

    config = dataclasses.replace(smoke_config(teacher, tmp_path), rule_rejected=["own_mistake", "irrelevant"],
                                 distractors=0)
    assert config.generated_data and config.window == 2 * (4 * 128 + 64)
    stopped = run_evidence(config, tmp_path / "evidence", stop_after="data")
    assert stopped["stopped_after"] == "data" and stopped["rows"] == 4
    rows = load_rows(tmp_path / "evidence" / "data")
    assert all(len(row["fact_chunks"]) == 1 for row in rows)  # no distractor facts
    assert all(row["response_kinds"][1] in ("own_mistake", "hallucinated") for row in rows)
    data = Manifest.read(tmp_path / "evidence" / "data").config
    assert data["generator"] == str(teacher)  # no instruction stage: the teacher is the model before LOGO
    assert (data["data"]["mistake_window"], data["data"]["distractors"]) == (config.window, 0)
    with pytest.raises(UserError, match="distractors"):
        EvidenceConfig(distractors=-1)


def test_bad_runs_are_one_line_errors_that_write_nothing(teacher, tmp_path, capsys):
    before = tree(teacher.parent)
    cases = [
        (["--out", str(tmp_path / "ev"), "--teacher", str(tmp_path / "nowhere")], "teacher checkpoint not found"),
        (["--out", str(teacher / "ev"), "--teacher", str(teacher)], "lies inside it"),
        (["--out", str(tmp_path / "ev"), "--teacher", str(teacher), "--stop-after", "instruct"],
         "--stop-after instruct names no stage of this config"),
        (["--out", str(tmp_path / "ev"), "--teacher", str(teacher), "--set", "logo_overrides=[train.nope=1]"],
         "logo_overrides: unknown config key 'train.nope'"),
        (["--out", str(tmp_path / "ev"), "--teacher", str(teacher), "--set", f"qa={tmp_path / 'no-qa.jsonl'}"],
         "QA data not found"),
        (["--out", str(tmp_path / "ev"), "--teacher", str(teacher), "--set", f"qa={tmp_path / 'no-qa.jsonl'}",
          "--set", "rule_rejected=[near_miss]"], "cannot be made for QA rows"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--set", f"cache_dir={tmp_path / 'cache'}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "ev").exists()
        assert tree(teacher.parent) == before


def test_instruct_stage_runs_alone_and_a_copied_run_resumes_after_it(teacher, tmp_path, monkeypatch):
    """The GPU workflow: `--stop-after instruct` in one checkout, the run directory copied into another (under
    another name), where the rest resumes without retraining the instructed model."""
    config = dataclasses.replace(smoke_config(teacher, tmp_path), responses="generator",
                                 instruct=InstructConfig(steps=2, samples=3, batch_size=2, lm_samples=2, lm_tokens=8),
                                 text_rows=3, text_tokens=8, text_batch_size=2, text_weight=0.5)
    (tmp_path / "gpu").mkdir()
    monkeypatch.chdir(tmp_path / "gpu")
    stopped = run_evidence(config, "runs/ev", stop_after="instruct")
    assert stopped["stopped_after"] == "instruct" and stopped["step"] == 2
    instruct = Manifest.read("runs/ev/instruct")
    assert instruct.config["loss"]["loss"] == "sft" and instruct.config["position"]["synthesize"] is False
    assert Manifest.read("runs/ev/instruct_data").metrics["rows"] == 3
    mix = Manifest.read("runs/ev/instruct_mix").metrics  # question rows and plain text rows, trained together
    assert mix["question_rows"] == 3 and mix["text_rows"] == 2 and mix["rows"] == 5
    assert instruct.config["data"] == "runs/ev/instruct_mix"
    from align.data import load_rows

    text = [row for row in load_rows("runs/ev/instruct_mix") if row["response_kinds"] == ["text"]]
    assert len(text) == 2 and all(row["question"] == "" and row["responses"] == [row["answer"]] for row in text)
    assert not Path("runs/ev/data").exists() and not Path("runs/ev/report").exists()

    shutil.copytree(tmp_path / "gpu" / "runs" / "ev", tmp_path / "here" / "runs" / "copied")
    monkeypatch.chdir(tmp_path / "here")
    run_evidence(config, "runs/copied")
    assert Manifest.read("runs/copied/instruct").timings == instruct.timings  # kept, not retrained
    logo = Manifest.read("runs/copied/logo")
    assert logo.inputs["dir"] == "runs/copied/instruct"  # LOGO starts from the instructed model
    data = Manifest.read("runs/copied/data")
    assert data.config["generator"] == "runs/copied/instruct" and data.config["data"]["responses"] == "generator"
    # the same text regulariser in both trainings, on rows drawn apart from the instruction stage's text rows
    sft = Manifest.read("runs/copied/sft")
    regulariser_settings = {"data": "runs/copied/text_data", "weight": 0.5, "batch_size": 2}
    assert logo.config["text"] == sft.config["text"] == regulariser_settings
    assert logo.metrics["text_rows"] == sft.metrics["text_rows"] == 3
    regulariser = load_rows("runs/copied/text_data")
    assert {row["answer"] for row in regulariser}.isdisjoint(row["answer"] for row in text)
    report = Path("runs/copied/report/report.md").read_text()
    assert "after its instruction stage (2 steps" in report and "value acc @900" in report
    assert "The teacher itself, before its instruction stage, scores" in report
    assert "Against the teacher: LOGO " in report and ", SFT (same steps) " in report
    assert "Both trainings add the same text regulariser (not LOGO's): 0.5 x the NLL of 2 plain-text rows" in report


def test_a_llama_teacher_compares_logo_and_sft_on_rows_from_a_qa_file(tmp_path):
    """Any checkpoint is the model to align (here a tiny random Llama, no instruction stage), and `qa` builds the
    preference rows both trainings share from the user's QA file, with the gold answer preferred."""
    save_byte_checkpoint("llama", tmp_path / "llama", byte_tokenizer(tmp_path / "tokenizer"))
    words = ("harbor", "lantern", "meadow", "quarry", "saddle", "thicket", "orchard", "furnace")
    qa = tmp_path / "qa.jsonl"
    lines = []
    for index, (country, capital) in enumerate([("Freedonia", "Zubrowka"), ("Latveria", "Doomstadt"),
                                                 ("Genovia", "Pyrus"), ("Elbonia", "Mudville")]):
        filler = "".join(" ".join(words[(index + i + j) % 8] for j in range(6)) + ".\n" for i in range(12))
        lines.append(json.dumps({"document": filler + f"The capital of {country} is {capital}.\n" + filler,
                                 "question": f"What is the capital of {country}?", "answer": capital}))
    qa.write_text("\n".join(lines) + "\n")
    config = dataclasses.replace(smoke_config(tmp_path / "llama", tmp_path), qa=str(qa),
                                 qa_columns=dataclasses.replace(EvidenceConfig().qa_columns, context="document"))
    result = run_evidence(config, tmp_path / "evidence")
    from align.data import load_rows

    rows = load_rows(tmp_path / "evidence" / "data")
    assert [row["responses"][0] for row in rows] == [" Zubrowka", " Doomstadt", " Pyrus", " Mudville"]
    assert all(row["response_kinds"] == ["gold", "on_topic_sentence", "other_answer"] for row in rows)
    assert json.loads((tmp_path / "evidence" / "data" / "provenance.json").read_text())["qa"]["path"] == str(qa)
    logo, sft = (Manifest.read(tmp_path / "evidence" / name) for name in ("logo", "sft"))
    assert logo.inputs["dir"] == sft.inputs["dir"] == str(tmp_path / "llama")  # no instruction stage
    assert logo.metrics["rows"] == sft.metrics["rows"] == 4 and logo.metrics["step"] == sft.metrics["step"] == 1
    assert [row[0] for row in result["table"]["rows"]] == list(MODELS)
    assert f"from the QA file `{qa}`" in (tmp_path / "evidence" / "report" / "report.md").read_text()


def test_the_gpu_scale_qa_config_plans_logo_s_recipe_from_the_checkpoint(tmp_path):
    """recipes/configs/logo_evidence_qa_gpu.yaml with a Llama checkpoint and a QA file: every stage's config is
    LOGO's setting, built before anything runs, and nothing runs."""
    from core.checkpoint import load_tokenizer
    from core.config import load_config
    from recipes.logo_evidence import plan

    save_byte_checkpoint("llama", tmp_path / "llama", byte_tokenizer(tmp_path / "tokenizer"))
    config = load_config(EvidenceConfig, Path(__file__).parents[2] / "recipes/configs/logo_evidence_qa_gpu.yaml",
                         [f"teacher={tmp_path / 'llama'}", f"qa={tmp_path / 'qa.jsonl'}"])
    steps, before, trained = plan(config, tmp_path / "ev", tmp_path / "llama", load_tokenizer(tmp_path / "llama"))
    assert [step.name for step in steps][:2] == ["data", "logo"] and len(trained) == 20
    assert before == tmp_path / "llama"  # no instruction stage
    data = steps[0].run.args[0]  # build(BuildDataConfig, out)
    assert data.generator == str(before) and data.data.qa == str(tmp_path / "qa.jsonl")
    assert (data.data.samples, data.data.chunk_size, data.data.context_chunks, data.data.responses) == \
        (12000, 512, 16, "generator")
    assert (data.data.generation.preferred, data.data.generation.max_new_tokens) == ("gold", 512)
    logo = steps[1].run.args[2]  # run_logo(model, out, LogoConfig)
    assert (logo.position.window, logo.position.chunk_size, logo.position.max_chunks) == (8 * (16 * 512 + 64), 512, 16)
    assert (logo.loss.beta, logo.loss.gamma, logo.loss.sft_weight, logo.loss.num_rejected) == (10.0, 3.0, 0.1, 2)
    assert (logo.train.steps, logo.train.lr, logo.train.min_lr, logo.train.warmup_steps) == (1200, 5e-7, 0.0, 120)
    assert (logo.train.grad_accum_steps * logo.batches.batch_size, logo.train.gradient_checkpointing) == (64, True)
    assert logo.lora.enabled and (logo.lora.r, logo.lora.alpha) == (32, 16)
    assert not (tmp_path / "ev").exists()
