"""Reports: Markdown with gate tables, a metric-per-stage plot and length x depth heatmaps of the probes."""

import copy

import pytest

from core.errors import UserError
from eval.gate import GateResult, MetricRule, check_rules
from eval.report import main, probe_matrix, write_report


def _stages(llama_results):
    rules = [MetricRule("corpus_ppl", "byte_perplexity", max_rel_drop=0.05),
             MetricRule("probe_needle", "exact_match", min=0.0)]
    first = GateResult("offline", True, check_rules(rules, llama_results), llama_results)
    worse = copy.deepcopy(llama_results)
    worse.metrics["corpus_ppl"]["byte_perplexity"] *= 1.5
    rows = check_rules(rules, worse, llama_results)
    return [("s0", first), ("s1-pruned", GateResult("offline", all(r.ok for r in rows), rows, worse, "s0"))]


def test_report_has_gate_tables_metric_plot_and_heatmaps(llama_results, tmp_path):
    path = write_report(_stages(llama_results), tmp_path / "report", title="Run 1")
    text = path.read_text()
    assert text.startswith("# Run 1")
    assert "| corpus_ppl/byte_perplexity |" in text and "FAILED" in text
    assert "![metrics by stage](metrics_by_stage.png)" in text
    for name in ("metrics_by_stage.png", "probes_s0.png", "probes_s1-pruned.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_heatmap_matrix_holds_the_probe_cells(llama_results):
    lengths, depths, matrix = probe_matrix(llama_results.probe_cells, "kv")
    assert lengths == [200, 400] and depths == [0.0, 0.5, 1.0]
    cells = {(c["depth"], c["length"]): c["exact_match"] for c in llama_results.probe_cells if c["kind"] == "kv"}
    assert matrix == [[cells[(d, n)] for n in lengths] for d in depths]


def test_report_cli_reads_gate_results_and_writes_a_manifest(llama_results, tmp_path, capsys):
    import json

    from core.stage import Manifest

    for name, stage in _stages(llama_results):
        (tmp_path / f"{name}.json").write_text(json.dumps(stage.to_dict(), default=str))
    main(["--stage", f"s0={tmp_path / 's0.json'}", "--stage", f"s1={tmp_path / 's1-pruned.json'}",
          "--out", str(tmp_path / "out")])
    assert "FAILED" in (tmp_path / "out" / "report.md").read_text()
    assert Manifest.read(tmp_path / "out").outputs["report.md"] > 0
    assert "s1" in capsys.readouterr().out


def test_report_needs_distinct_stage_names(llama_results, tmp_path):
    with pytest.raises(UserError, match="repeat"):
        write_report([("a", llama_results), ("a", llama_results)], tmp_path)
