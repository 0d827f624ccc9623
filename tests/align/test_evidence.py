"""The evidence run end to end on a tiny random OpenBA (smoke settings): data, LOGO and SFT with the same steps,
three gated evaluations, and a Markdown report whose table rows are the three models."""

import json

from align.evidence import MODELS, EvidenceConfig, main, run_evidence
from core.stage import Manifest
from pretrain.corpus import CorpusConfig


def smoke_config(workspace, tmp_path) -> EvidenceConfig:
    return EvidenceConfig(teacher=str(workspace / "openba"), cache_dir=str(tmp_path / "cache"),
                          corpus=CorpusConfig(max_documents=40, validation_size=4), samples=4, chunk_size=128,
                          context_chunks=4, document_chunks=6, window_factor=2, steps=1, batch_size=2,
                          probe_lengths=(300, 900), probe_depths=(0.5,), probe_samples=1, ppl_documents=2)


def test_evidence_compares_before_logo_and_sft_in_a_markdown_table(workspace, tmp_path):
    config = smoke_config(workspace, tmp_path)
    result = run_evidence(config, tmp_path / "evidence")
    report = (tmp_path / "evidence" / "report" / "report.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in report
    assert "needle @900 chars" in report and "byte perplexity" in report
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


def test_evidence_refuses_a_missing_teacher(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "ev"), "--teacher", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "teacher checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
