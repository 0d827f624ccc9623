"""Build a LOGO preference dataset from long documents of the offline corpus (or a saved corpus directory).

    python -m align.build_data --tokenizer runs/teacher --out runs/logo-data --set samples=256 --set chunk_size=64

The output is a `datasets` directory (save_to_disk) with one row per sample (context chunks, question, 1 + M
responses, provenance columns; see align/data.py), `provenance.json` (the config and generation settings) and a
manifest. Chunks are measured in the given tokenizer's tokens, so build with the tokenizer of the model to align.
With `--generator DIR` and `--set responses=generator` the responses are sampled from that model instead of made by
rules; with `--set 'data.rule_rejected=["own_mistake","irrelevant"]'` one dis-preferred answer is that model's own
mistake at synthesised positions (align/mistakes.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path
from typing import Any

from core.config import load_config, to_dict
from core.errors import UserError, main_guard
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


def build(config: BuildDataConfig, out_dir: str | Path, force: bool = False):
    """Check inputs, build the rows, save them under `run_stage` (atomic, with a manifest). Returns the manifest."""
    from core.checkpoint import load_model, load_tokenizer
    from core.stage import Stage, run_stage

    if not config.tokenizer:
        raise UserError("no tokenizer given (--tokenizer DIR): chunks are measured in its tokens")
    tokenizer = load_tokenizer(config.tokenizer)
    check_build(config.data, tokenizer)
    generator = None
    if config.data.needs_generator:
        if not config.generator:
            raise UserError("responses: generator and rule_rejected: own_mistake need --generator DIR")
        generator = load_model(config.generator).eval()
    texts, doc_ids = load_texts(config)

    def stage_fn(_input, work_dir: Path, cfg: BuildDataConfig) -> dict[str, Any]:
        rows, reasons = build_preference_rows(cfg.data, texts, doc_ids, tokenizer, generator)
        provenance = {"config": to_dict(cfg), "generator": cfg.generator if generator is not None else "rule",
                      "generation": to_dict(cfg.data.generation) if generator is not None else None,
                      "corpus_split": "train"}
        save_rows(rows, work_dir, provenance)
        return describe(rows, reasons, tokenizer)

    return run_stage(Stage("logo-data", stage_fn, config), None, out_dir, force=force)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m align.build_data",
        description="Build LOGO preference data (chunks, importance, shared context, 1 + M responses).",
        epilog=("example: python -m align.build_data --tokenizer runs/teacher --out runs/logo-data "
                "--set data.samples=128 --set data.chunk_size=64 --set data.context_chunks=8 "
                "--set data.document_chunks=12"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer (or checkpoint) directory")
    parser.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    parser.add_argument("--generator", default=None, help="checkpoint to sample responses with "
                        "(with --set data.responses=generator)")
    parser.add_argument("--corpus", default=None, help="saved corpus directory (default: the embedded corpus)")
    parser.add_argument("--config", default=None, help="YAML file with BuildDataConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is complete")
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = [f"tokenizer={args.tokenizer}"]
    if args.generator:
        overrides.append(f"generator={args.generator}")
    if args.corpus:
        overrides.append(f"corpus_dir={args.corpus}")
    config = load_config(BuildDataConfig, args.config, overrides + list(args.set))
    manifest = build(config, args.out, force=args.force)
    metrics = manifest.metrics
    table = [("rows", metrics["rows"]), ("mean / max context tokens",
              f"{metrics['mean_context_tokens']:.0f} / {metrics['max_context_tokens']}"),
             ("critical chunks per row", round(metrics["mean_critical_chunks"], 2))]
    table += [(f"dis-preferred: {kind}", n) for kind, n in sorted(metrics["dispreferred_kinds"].items())]
    table += [(f"skipped: {reason}", n) for reason, n in sorted(metrics["skipped"].items())]
    print(format_table(table, ["", "value"]))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
