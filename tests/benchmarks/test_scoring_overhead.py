"""benchmarks/scoring_overhead.py on a tiny CPU run: the kept "before" hooks and today's give the same scores, and
the printed ratios are the medians' ratios."""

import json

import pytest

from compress.scorers import available_scorers
from tests.benchmarks.scripts import load_benchmark


def test_before_and_after_scoring_agree_and_ratios_are_the_timed_medians(tmp_path, capsys):
    overhead = load_benchmark("scoring_overhead")
    scorers_before = available_scorers()
    out, profile = tmp_path / "overhead.json", tmp_path / "profile.txt"
    rows = overhead.main(["--width", "64", "--layers", "2", "--seq", "24", "--batch", "2", "--batches", "2",
                          "--repeats", "1", "--device", "cpu", "--json", str(out), "--profile", str(profile)])
    printed = capsys.readouterr().out
    assert [r["model"] for r in rows] == ["llama", "openba"]
    assert json.loads(out.read_text())["rows"] == rows
    for row in rows:
        assert row["score_difference"] < 1e-5  # the rewrite changed the cost, not the scores
        assert row["ratio"] == pytest.approx(row["scoring_ms"] / row["plain_ms"], rel=1e-12)
        assert row["before_ratio"] == pytest.approx(row["before_ms"] / row["plain_ms"], rel=1e-12)
        assert f"{row['ratio']:.3f}" in printed and f"{row['before_ratio']:.3f}" in printed
    text = profile.read_text()
    assert text.count("--- scoring pass") == 2 and "aten::" in text
    assert available_scorers() == scorers_before  # the "before" Wanda is a scorer path, not a registration


def test_padded_batches_give_the_same_scores_before_and_after():
    """The before hooks drop padding with a boolean mask, today's with host-computed rows: same tokens counted."""
    import torch

    from compress.calibration import as_calibration_set
    from compress.scoring import score_model
    from tests.factory import VOCAB, tiny_model

    overhead = load_benchmark("scoring_overhead")
    for family in ("llama", "openba"):
        model = tiny_model(family)
        ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        batch["labels"] = ids[:, :6].clone() if family == "openba" else ids.masked_fill(mask == 0, -100)
        calib = as_calibration_set([batch], model)
        with overhead.collector_class(overhead.BeforeCollector):
            before = score_model(model, calib, overhead.BEFORE_SCORERS, progress=False)
        after = score_model(model, calib, overhead.SCORERS, progress=False)
        assert overhead.largest_score_difference(before, after) < 1e-5
