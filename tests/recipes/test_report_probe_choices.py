"""The run report shows the answer's log-likelihood and rank among candidates before alignment, after LOGO and after
SFT: a table in the alignment section and a length x depth heatmap per model, side by side."""

from __future__ import annotations

import json

from core.stage import Manifest
from eval.gate import GateResult
from eval.harness import EvalResult
from recipes.report import write_report
from recipes.spec import RecipeConfig, StageSpec

LENGTHS, DEPTHS = (500, 1000), (0.0, 1.0)


def _gate(directory, loglik: float, rank: float) -> None:
    """A stage directory with a manifest and the gate.json / gate.md a gate writes: exact match 0 everywhere, the
    answer-choice scores `loglik` and `rank` in every cell (and so in every task and group)."""
    metrics = {"probe_needle": {"exact_match": 0.0}, "probe_needle_choices": {"gold_loglik": loglik, "gold_rank": rank},
               "corpus_ppl": {"bits_per_byte": 2.0}}
    for length in LENGTHS:
        metrics[f"probe_needle_{length}"] = {"exact_match": 0.0}
        metrics[f"probe_needle_choices_{length}"] = {"gold_loglik": loglik, "gold_rank": rank}
    cells = [{"kind": "needle", "length": n, "depth": d, "n": 2, "exact_match": 0.0, "gold_loglik": loglik,
              "gold_rank": rank, "candidates": 8} for n in LENGTHS for d in DEPTHS]
    result = GateResult("aligned", True, [], EvalResult(metrics, {}, {}, cells))
    directory.mkdir(parents=True)
    (directory / "gate.json").write_text(json.dumps(result.to_dict()))
    (directory / "gate.md").write_text(result.to_markdown())
    Manifest(stage=directory.name, config_hash="x", config={"kind": "align"}, timings={"seconds": 1.0},
             metrics={"gate": {"passed": True}}).write(directory)


def test_report_shows_answer_loglik_and_rank_of_before_logo_and_sft_side_by_side(tmp_path):
    recipe = RecipeConfig(name="mini", stages=[
        StageSpec(name="continual", kind="train"), StageSpec(name="logo", kind="align"),
        StageSpec(name="sft", kind="align", input="continual")])
    for name, loglik, rank in (("continual", -2.25, 4.5), ("logo", -1.5, 2.0), ("sft", -1.75, 3.0)):
        _gate(tmp_path / name, loglik, rank)
    text = write_report(recipe, tmp_path).read_text()
    table = text[text.index("The answer among its candidates"):].split("\n\n")[1].splitlines()
    assert table[0].split("|")[1:-1] == [" model ", " needle log-lik @500 ", " needle log-lik @1000 ",
                                         " needle log-lik (all) ", " needle rank @500 ", " needle rank @1000 ",
                                         " needle rank (all) "]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert rows["before (continual)"] == ["-2.25"] * 3 + ["4.5"] * 3
    assert rows["logo (logo loss)"] == ["-1.5"] * 3 + ["2"] * 3
    assert rows["sft (logo loss)"][3:] == ["3"] * 3
    assert "![answer log-likelihood and rank](eval/probe_choices.png)" in text
    png = tmp_path / "eval" / "probe_choices.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "answer among candidates" in (tmp_path / "eval" / "report.md").read_text()


def test_report_without_answer_choice_scores_has_no_such_section(tmp_path):
    recipe = RecipeConfig(name="mini", stages=[StageSpec(name="continual", kind="train")])
    _gate(tmp_path / "continual", -2.0, 4.0)
    data = json.loads((tmp_path / "continual" / "gate.json").read_text())
    data["results"]["probe_cells"] = [{k: v for k, v in c.items() if k not in ("gold_loglik", "gold_rank")}
                                      for c in data["results"]["probe_cells"]]
    (tmp_path / "continual" / "gate.json").write_text(json.dumps(data))
    text = write_report(recipe, tmp_path).read_text()
    assert "probe_choices.png" not in text and not (tmp_path / "eval" / "probe_choices.png").exists()
    assert "eval/probes_continual.png" in text  # the exact-match heatmap is still drawn
