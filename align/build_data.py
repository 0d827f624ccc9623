"""Build a LOGO preference dataset from long documents of the offline corpus (or a saved corpus directory), or from
a user's long-document QA (`--qa FILE`: JSONL or a `datasets` folder with context, question and answer columns).

    python -m align.build_data --tokenizer runs/teacher --out runs/logo-data --set data.samples=256
    python -m align.build_data --tokenizer runs/teacher --qa my_qa.jsonl --out runs/qa-data \
        --set data.qa_columns.context=document --set data.chunk_size=512

The output is a `datasets` directory (save_to_disk) with one row per sample (context chunks, question, 1 + M
responses, provenance columns; see align/data.py), `provenance.json` (the config and generation settings) and a
manifest. Chunks are measured in the given tokenizer's tokens, so build with the tokenizer of the model to align.
With `--generator DIR` and `--set responses=generator` the responses are sampled from that model instead of made by
rules; with `--set 'data.rule_rejected=["own_mistake","irrelevant"]'` one dis-preferred answer is that model's own
mistake at synthesised positions (align/mistakes.py). QA rows (align/qa.py) keep the gold answer as the preferred
response; their rule negatives are another row's answer (`irrelevant`), a top chunk's sentence without the answer
(`partial`) and the generator's own mistake; provenance.json names the QA file, its sha256 and size, the columns and
the split.

The command is the stage kind `logo_data`: `prepare` loads and checks the tokenizer, the generator and the corpus,
`write_rows` builds the rows and saves them into a directory. A recipe's align stage builds its rows with the same
two functions (into its own stage directory) before it trains with the `logo` kind (align/logo.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path
from typing import Any

from core.cli import command
from core.config import to_dict
from core.errors import UserError
from core.kind import Input, StageKind, execute, register_kind
from core.table import format_table
from align.data import PreferenceDataConfig, build_preference_rows, check_build, save_rows


@dataclasses.dataclass
class BuildDataConfig:
    """The build's inputs and settings (hashed into the manifest, so a changed input rebuilds)."""

    tokenizer: str = ""
    """Tokenizer directory: chunk sizes are counted in its tokens (use the aligned model's)."""
    generator: str | None = None
    """Checkpoint that samples responses (data.responses "generator") or makes the own mistakes (rule_rejected)."""
    corpus_dir: str | None = None
    """A corpus saved by python -m pretrain.corpus; None builds (and caches) the embedded offline corpus."""
    cache_dir: str = "runs/cache"
    """Where the embedded corpus is cached."""
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)


def load_texts(config: BuildDataConfig) -> tuple[list[str], list[str]]:
    """The train split's texts and document ids (eval probes use the validation split)."""
    import datasets

    from pretrain.corpus import load_or_build_corpus

    if config.corpus_dir:
        path = Path(config.corpus_dir)
        if not path.exists():
            raise UserError(f"corpus directory not found: {path}")
        corpus = datasets.load_from_disk(str(path))
    else:
        corpus = load_or_build_corpus(config.data.corpus, config.cache_dir)
    if "train" not in corpus:
        raise UserError("the corpus has no train split")
    split = corpus["train"]
    return list(split["text"]), list(split["doc_id"])


def describe(rows: list[dict], reasons: dict[str, int], tokenizer) -> dict[str, Any]:
    """Counts for the manifest and the summary table."""
    kinds = collections.Counter(kind for row in rows for kind in row["response_kinds"][1:])
    context_tokens = [sum(len(ids) for ids in tokenizer(row["chunks"], add_special_tokens=False)["input_ids"])
                      for row in rows]
    return {
        "rows": len(rows),
        "skipped": {k: v for k, v in reasons.items() if k != "ok"},
        "mean_context_tokens": sum(context_tokens) / len(rows),
        "max_context_tokens": max(context_tokens),
        "mean_critical_chunks": sum(len(row["critical_chunks"]) for row in rows) / len(rows),
        "dispreferred_kinds": dict(kinds),
    }


@dataclasses.dataclass
class PreparedData:
    """What the rows are built from, loaded and checked before anything is written."""

    config: BuildDataConfig
    tokenizer: Any
    generator: Any
    texts: list[str]
    doc_ids: list[str]
    qa_rows: list[dict] | None = None
    """The QA file's rows (`data.qa`), read and checked; None builds from the corpus."""
    qa_provenance: dict[str, Any] | None = None


def prepare(config: BuildDataConfig, inputs: dict | None = None, progress: bool = True) -> PreparedData:
    """Load and check the tokenizer (chunk sizes fit it), the generator when responses or mistakes need one, and
    the corpus' train split or the QA file (every row: columns, JSON, text values). Writes nothing but the embedded
    corpus' cache when that is not built yet."""
    from core.checkpoint import load_model, load_tokenizer

    if not config.tokenizer:
        raise UserError("no tokenizer given (--tokenizer DIR): chunks are measured in its tokens")
    tokenizer = load_tokenizer(config.tokenizer)
    check_build(config.data, tokenizer)
    generator = None
    if config.data.needs_generator:
        if not config.generator:
            raise UserError("responses: generator and rule_rejected: own_mistake need --generator DIR")
        generator = load_model(config.generator).eval()
    if config.data.qa:  # the corpus is not read: a recipe's align stage still names its own
        from align.qa import read_qa

        qa_rows, qa_provenance = read_qa(config.data)
        return PreparedData(config, tokenizer, generator, [], [], qa_rows, qa_provenance)
    texts, doc_ids = load_texts(config)
    return PreparedData(config, tokenizer, generator, texts, doc_ids)


def write_rows(prepared: PreparedData, directory: Path) -> dict[str, Any]:
    """Build the rows and save them (save_to_disk + provenance.json) into `directory`; returns their description."""
    config = prepared.config
    if prepared.qa_rows is not None:
        from align.qa import build_qa_rows

        rows, reasons = build_qa_rows(config.data, prepared.qa_rows, prepared.tokenizer, prepared.generator)
        source = {"source": "qa", "qa": prepared.qa_provenance}
    else:
        rows, reasons = build_preference_rows(config.data, prepared.texts, prepared.doc_ids, prepared.tokenizer,
                                              prepared.generator)
        source = {"source": "corpus", "corpus_split": "train"}
    sampled = prepared.generator is not None
    provenance = {"config": to_dict(config), "generator": config.generator if sampled else "rule",
                  "generation": to_dict(config.data.generation) if sampled else None,
                  **source, "tokenizer": config.tokenizer}
    save_rows(rows, directory, provenance)
    return {**describe(rows, reasons, prepared.tokenizer), **source}


def summary(manifest) -> str:
    metrics = manifest.metrics
    source = f"QA file {metrics['qa']['path']}" if metrics.get("source") == "qa" else "corpus (train split)"
    table = [("source", source), ("rows", metrics["rows"]), ("mean / max context tokens",
              f"{metrics['mean_context_tokens']:.0f} / {metrics['max_context_tokens']}"),
             ("critical chunks per row", round(metrics["mean_critical_chunks"], 2))]
    table += [(f"dis-preferred: {kind}", n) for kind, n in sorted(metrics["dispreferred_kinds"].items())]
    table += [(f"skipped: {reason}", n) for reason, n in sorted(metrics["skipped"].items())]
    return format_table(table, ["", "value"])


def _hidden_corpus_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus-dir", dest="corpus_dir", help=argparse.SUPPRESS)  # the field's name, as --corpus


def _input_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The paths given as inputs are config fields too: hashed, so a build from other inputs is not skipped."""
    fields = {"tokenizer": args.tokenizer, "generator": args.generator, "corpus_dir": args.corpus or args.corpus_dir}
    return {**fields, "data": {"qa": args.qa}} if args.qa else fields


KIND = register_kind(StageKind(
    name="logo_data",
    writes_checkpoint=False,
    stage="logo-data",
    module="align.build_data",
    config_cls=BuildDataConfig,
    prepare=prepare,
    run=write_rows,
    description="Build LOGO preference data (chunks, importance, shared context, 1 + M responses)\n"
                "from the corpus, or from a long-document QA file (--qa).",
    examples=("python -m align.build_data --tokenizer runs/teacher --out runs/logo-data --set data.samples=128 "
              "--set data.chunk_size=64 --set data.context_chunks=8 --set data.document_chunks=12",
              "python -m align.build_data --tokenizer runs/teacher --qa qa.jsonl --out runs/qa-data "
              "--set data.qa_columns.context=document --set data.chunk_size=512 --set data.samples=12000",),
    inputs=(Input("tokenizer", "tokenizer (or checkpoint) directory: chunks are counted in its tokens",
                  required=False, is_checkpoint=False),
            Input("generator", "checkpoint to sample responses with (with --set data.responses=generator)",
                  required=False, is_checkpoint=False),
            Input("corpus", "saved corpus directory (default: the embedded corpus)", required=False,
                  is_checkpoint=False),
            Input("qa", "long-document QA instead of the corpus: JSONL or a datasets folder with context, question "
                  "and answer columns (data.qa; names: data.qa_columns.*, split: data.qa_split)", required=False,
                  is_checkpoint=False)),
    summary=summary,
    flags=_hidden_corpus_dir,
    flag_values=_input_fields,
))
main = command(KIND)


def build(config: BuildDataConfig, out_dir: str | Path, force: bool = False, progress: bool = True):
    """The command as a function: build into `out_dir` under the stage contract. Returns the manifest."""
    inputs = {"tokenizer": config.tokenizer or None, "generator": config.generator, "corpus": config.corpus_dir,
              "qa": config.data.qa}
    return execute(KIND, config, inputs, out_dir, force=force, progress=progress)


if __name__ == "__main__":
    main()
