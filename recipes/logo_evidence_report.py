"""The LOGO evidence experiment's report stage: every model through one gate, graded answer scores on the probes,
the comparison table (a row per model and seed, means over seeds), LOGO minus SFT paired by seed, and report.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import to_dict
from core.stage import Manifest
from core.table import format_table

if TYPE_CHECKING:
    from recipes.logo_evidence import EvidenceConfig

MODELS = ("before LOGO", "LOGO", "SFT (same steps)")
REPORT_FORMAT = 8
"""Part of the report stage's config: raise it when the report's content changes, so that a finished run rebuilds
its report (and keeps its trainings)."""


def evaluate_and_report(config: EvidenceConfig, gate, prepared, teacher: Path, before: Path,
                        trained: dict[str, Path], stage_dirs: dict[str, Path], out: Path) -> Manifest:
    """The report stage: the model before LOGO, then every trained one against it as the gate's baseline; the
    teacher's own perplexity too when an instruction stage made the model before LOGO. Writes report.md and
    evidence.json (config, table, paired differences, every gate result)."""
    from core.checkpoint import load_model, load_tokenizer
    from core.stage import Stage, run_stage
    from eval.gate import prepare_gate, run_gate
    from eval.probe_scores import answer_scores, probe_rows

    def report(_input, work_dir: Path, _stage_config: dict) -> dict[str, Any]:
        tokenizer = load_tokenizer(teacher)
        probes = probe_rows(prepared.task_set, config.probe_kinds[:1])  # graded scores on the first kind
        model = load_model(before)
        baseline = run_gate(model, tokenizer, gate, prepared=prepared)
        results: dict[str, Any] = {MODELS[0]: {**baseline.to_dict(),
                                               "answer_scores": answer_scores(model, tokenizer, probes)}}
        for label, directory in trained.items():
            model = load_model(directory)
            against = prepare_gate(gate, baseline=baseline.results, task_set=prepared.task_set)
            result = run_gate(model, tokenizer, gate, baseline=baseline.results, prepared=against)
            results[label] = {**result.to_dict(), "answer_scores": answer_scores(model, tokenizer, probes)}
        teacher_ppl = None
        if before != teacher:  # how much text modelling the instruction stage left for the gate to guard
            ppl_only = dataclasses.replace(gate, tasks=[])
            scored = run_gate(load_model(teacher), tokenizer, ppl_only,
                              prepared=prepare_gate(ppl_only, task_set=prepared.task_set))
            teacher_ppl = scored.to_dict()["results"]["metrics"]["corpus_ppl"]["byte_perplexity"]
            results["teacher"] = {"byte_perplexity": teacher_ppl}
        tokens = probe_tokens(prepared.task_set, tokenizer, config.probe_kinds)
        headers, rows = evidence_table(results, config, tokens)
        paired = paired_differences(headers, rows, config) if len(config.train_seeds) > 1 else None
        markdown = render_report(config, headers, rows, tokens, config.real_length - 64, config.window, stage_dirs,
                                 teacher_ppl, paired)
        (work_dir / "report.md").write_text(markdown)
        evidence = {"config": to_dict(config), "table": {"headers": headers, "rows": rows}, "paired": paired,
                    "gates": results}
        (work_dir / "evidence.json").write_text(json.dumps(evidence, indent=2, default=str) + "\n")
        return {"table": {"headers": headers, "rows": rows}}

    stage_config = {"report_format": REPORT_FORMAT, **to_dict(config)}
    return run_stage(Stage("logo-evidence", report, stage_config), None, out)


def probe_tokens(task_set, tokenizer, kinds) -> dict[str, dict[int, float]]:
    """Mean probe prompt length in the teacher's tokens, per kind and character length."""
    from eval.probe_scores import probe_rows
    from eval.probes import token_lengths

    return {kind: token_lengths(probe_rows(task_set, [kind]), tokenizer) for kind in kinds}


def evidence_table(results: dict[str, Any], config: EvidenceConfig,
                   tokens: dict[str, dict[int, float]]) -> tuple[list, list]:
    """Rows: model; columns: probe exact match per length (and mean), value accuracy and answer NLL per length,
    byte perplexity, its change, and the perplexity gate."""
    from eval.taskdata import probe_task

    headers = ["model"]
    for kind in config.probe_kinds:
        headers += [f"{kind} @{n} chars (~{tokens[kind].get(n, 0):.0f} tok)" for n in config.probe_lengths]
        headers.append(f"{kind} mean")
    headers += [f"value acc @{n}" for n in config.probe_lengths]
    headers += [f"answer NLL @{n}" for n in config.probe_lengths]
    headers += ["byte perplexity", "vs before", "perplexity gate"]
    rows = []
    before_ppl = results[MODELS[0]]["results"]["metrics"]["corpus_ppl"]["byte_perplexity"]
    for name in (key for key in results if key != "teacher"):
        gate = results[name]
        metrics = gate["results"]["metrics"]
        row: list[Any] = [name]
        for kind in config.probe_kinds:
            scores = [metrics[probe_task(kind, n)]["exact_match"] for n in config.probe_lengths]
            row += [round(s, 3) for s in scores] + [round(sum(scores) / len(scores), 3)]
        answers = {int(k): v for k, v in gate.get("answer_scores", {}).items()}
        for key in ("value_accuracy", "nll"):
            row += [round(answers[n][key], 3) if n in answers else None for n in config.probe_lengths]
        ppl = metrics["corpus_ppl"]["byte_perplexity"]
        row += [round(ppl, 4), f"{(ppl / before_ppl - 1) * 100:+.2f}%",
                "baseline" if name == MODELS[0] else ("pass" if gate["passed"] else "FAIL")]
        rows.append(row)
    if len(config.train_seeds) > 1:
        rows += [mean_row(f"{label}, mean of {len(config.train_seeds)} seeds",
                          [row for row in rows if row[0].startswith(f"{label}, seed ")], before_ppl)
                 for label in MODELS[1:]]
    return headers, rows


def paired_differences(headers: list[str], rows: list[list[Any]], config: EvidenceConfig) -> tuple[list, list]:
    """LOGO minus SFT in exact match, seed by seed (both trainings of a seed read the same rows in the same order
    at the same positions, so the seed's data noise cancels), then the mean difference, its standard error over
    seeds and in how many seeds LOGO is ahead."""
    columns = [i for i, h in enumerate(headers) if any(h.startswith(f"{kind} @") for kind in config.probe_kinds)]
    by_label = {row[0]: row for row in rows}
    diffs = [[by_label[f"{MODELS[1]}, seed {s}"][i] - by_label[f"{MODELS[2]}, seed {s}"][i] for i in columns]
             for s in config.train_seeds]
    out = [[f"seed {s}", *(round(d, 3) for d in row)] for s, row in zip(config.train_seeds, diffs)]
    n = len(diffs)
    means = [sum(column) / n for column in zip(*diffs)]
    errors = [(sum((d - m) ** 2 for d in column) / (n - 1) / n) ** 0.5 for column, m in zip(zip(*diffs), means)]
    out.append(["mean +- s.e.", *(f"{m:+.3f} +- {e:.3f}" for m, e in zip(means, errors))])
    out.append(["LOGO ahead in", *(f"{sum(d > 0 for d in column)}/{n} seeds" for column in zip(*diffs))])
    return ["LOGO - SFT", *(headers[i] for i in columns)], out


def mean_row(label: str, rows: list[list[Any]], before_ppl: float) -> list[Any]:
    """The column means of seed rows (ppl change recomputed from the mean; the gate as passes out of seeds)."""
    columns = [[row[i] for row in rows] for i in range(1, len(rows[0]) - 2)]
    means = [None if None in column else round(sum(column) / len(column), 4 if i == len(columns) - 1 else 3)
             for i, column in enumerate(columns)]
    passes = sum(row[-1] == "pass" for row in rows)
    return [label, *means, f"{(means[-1] / before_ppl - 1) * 100:+.2f}%", f"{passes}/{len(rows)} pass"]


def render_report(config: EvidenceConfig, headers, rows, tokens, real_context: int, window: int,
                  stages: dict[str, Path], teacher_ppl: float | None = None, paired: tuple | None = None) -> str:
    manifests = {name: Manifest.read(path) for name, path in stages.items()}
    data = manifests["data"].metrics if "data" in manifests else {}
    measured = (f" (measured: mean {data['mean_context_tokens']:.0f}, max {data['max_context_tokens']} tokens)"
                if "max_context_tokens" in data else "")
    instruct = config.instruct
    before = (f"the teacher after its instruction stage ({instruct.steps} steps of SFT, batch {instruct.batch_size}, "
              f"lr {instruct.lr}, {instruct.samples} rows with {instruct.distractors} distractor facts, plain "
              "positions at the real length)" if instruct.steps else "the teacher itself")
    lines = [
        "# LOGO evidence",
        "",
        f"Teacher: `{config.teacher or 'cached default tiny teacher'}`; \"before LOGO\" is {before}. Real training "
        f"context: at most {real_context} tokens ({config.context_chunks} chunks x {config.chunk_size}){measured}; "
        f"synthesised window: {window} positions (x{config.window_factor}). LOGO and SFT: {config.steps} steps, "
        f"batch {config.batch_size}, lr {config.lr}, the same {config.samples} preference rows ("
        + (f"from the QA file `{config.qa}`" if config.qa else
           f"{config.distractors} distractor facts beside the asked one")
        + f"; dis-preferred answers: {config.responses}"
        + (f", {' + '.join(config.rule_rejected)}" if config.responses == "rule" else "")
        + f") and positions; LOGO beta {config.beta}, gamma {config.gamma}, lambda {config.sft_weight}, "
        f"M {config.num_rejected}."
        + (f" Each is trained with seeds {list(config.train_seeds)} (row order, positions): a row per seed, then "
           "their means." if len(config.train_seeds) > 1 else "")
        + (f" Both trainings add the same text regulariser (not LOGO's): {config.text_weight} x the NLL of "
           f"{config.text_batch_size} plain-text rows a step ({config.text_rows} rows of {config.text_tokens} "
           "tokens from the corpus' train split)." if config.text_rows else ""),
        "",
        "Probe lengths are characters of context; `~tok` is their mean length in the teacher's tokens. Probes and "
        "perplexity texts come from the corpus' validation split; the training rows from its train split. "
        "Probe columns: exact match of the generated answer (eval/probes.py: `needle` one fact in corpus text, "
        "`needles` the same among 3 facts of other names, `kv` JSON key-value pairs). Value acc: share of the "
        "answer's value tokens that are the model's top choice under teacher forcing (chance ~0.1 for digits). "
        "Answer NLL: mean per-token negative log-likelihood of the true answer (lower is better). Both are graded "
        f"retrieval signals on the `{config.probe_kinds[0]}` probe prompts, read where exact match is still 0.",
        "",
        format_table(rows, headers, markdown=True),
        "",
        *([] if paired is None else [
            "Exact match of LOGO minus SFT, seed by seed (the two trainings of a seed read the same rows in the same "
            "order at the same positions), their mean with its standard error over seeds, and how many seeds LOGO "
            "leads in:", "", format_table(paired[1], paired[0], markdown=True), ""]),
        f"Perplexity gate: byte perplexity may rise at most {config.max_ppl_rel_increase:.0%} over the model before "
        "LOGO (eval/gates/long_context.yaml)."
        + ("" if teacher_ppl is None else teacher_comparison(rows, teacher_ppl)),
        "",
        "| stage | final loss | seconds | ran on |",
        "|---|---|---|---|",
    ]
    for name, manifest in manifests.items():
        lines.append(stage_row(name, manifest, stages[name]))
    return "\n".join(lines + [""])


def teacher_comparison(rows: list[list[Any]], teacher_ppl: float) -> str:
    """Each model's byte perplexity against the teacher's, and whether the instruction stage left text modelling
    for the gate to guard (its model more than twice the teacher's perplexity: it stopped modelling text)."""
    ppl = [float(row[-3]) for row in rows]
    lost = ppl[0] > 2 * teacher_ppl
    return (f" The teacher itself, before its instruction stage, scores {teacher_ppl:.2f}: "
            + ("the instruction stage trained answers only and the model stopped modelling text, so this gate "
               "measures the drift of a model with no text modelling left to lose (instruct.lm_samples mixes text "
               "rows into that stage; text_rows trains text beside LOGO and SFT)." if lost
               else "the instruction stage did not cost text modelling, so the gate guards modelling the model has.")
            + " Against the teacher: " + ", ".join(f"{row[0]} {value:.2f} ({(value / teacher_ppl - 1) * 100:+.1f}%)"
                                                 for row, value in zip(rows[1:], ppl[1:])) + ".")


def stage_row(name: str, manifest: Manifest, directory: Path) -> str:
    """A stage's final loss, seconds and where it ran (device, bf16, torch; seconds after a resume say so)."""
    loss = manifest.metrics.get("loss")
    seconds = manifest.metrics.get("seconds", manifest.timings.get("seconds"))
    info_file = directory / "train" / "train_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    bf16 = ", bf16" if info.get("bf16") else ""
    where = f"{info.get('device', 'cpu')}{bf16}, torch {manifest.versions.get('torch', '?')}"
    if info.get("resumed_from_step"):
        where += f" (seconds since the resume at step {info['resumed_from_step']})"
    return f"| {name} | {loss if loss is None else round(loss, 4)} | {seconds} | {where} |"
