"""An offline text corpus built from the Python standard library, identical on every machine with the same Python.

Code documents are whole stdlib packages (long, repository-like documents); prose documents are the docstrings of
each module, read with `ast` so that nothing is imported. Splits are chosen per *group* (a top-level package or
module) by a seeded hash, so a module's code and its docstrings always land in the same split: validation text
never leaks into training through the other source, and the split does not depend on file-system order.

    python -m pretrain.corpus --out runs/corpus

The command is the stage kind `corpus` (no input checkpoint): it builds the corpus in memory, then saves it into
--out under the stage contract. Caches of it (`load_or_build_corpus`) are written by `atomic_directory` instead:
they are named by the corpus' fingerprint, and processes filling the same entry at once each write their own
temporary copy.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import datasets
from tqdm.auto import tqdm

from core.cli import command
from core.config import config_hash, to_dict
from core.errors import UserError
from core.kind import StageKind, register_kind
from core.stage import Manifest, library_versions, publish
from core.table import format_table

SOURCES = ("code", "prose")
SPLITS = ("train", "calibration", "validation")
# Bump when the way documents are made changes, so cached corpora built the old way are not reused.
CORPUS_FORMAT = 1
# Test suites are mostly fixtures and asserts, and some hold deliberately broken or non-UTF-8 files.
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "lib-dynload"})
# `_sysconfigdata_*` records the build machine's paths, so it would make the corpus differ between machines.
SKIPPED_PREFIXES = ("_sysconfigdata",)
# pydoc's topics are reference prose stored as one Python dict; as "code" it would be a 700 kB string literal.
PROSE_ONLY_GROUPS = frozenset({"pydoc_data"})


@dataclass
class CorpusConfig:
    """What goes into the corpus and how it is split. The defaults give ~14 MB of text in a few seconds."""

    sources: tuple[str, ...] = SOURCES
    """Which document kinds to build: "code" (package sources) and/or "prose" (docstrings and pydoc topics)."""
    extra_packages: tuple[str, ...] = ()
    """Installed packages (import names) whose source is added as more groups. Off by default: it makes the
    corpus depend on what is installed, so it is no longer identical across machines."""
    extra_dirs: tuple[str, ...] = ()
    """Directories of Python source, each added as one group named after the directory."""
    max_documents: int | None = None
    """Keep at most this many documents, picked by seeded hash (not file order). None keeps all; tests use ~60."""
    min_chars: int = 200
    """Drop documents shorter than this: a module with one short docstring teaches little and skews lengths."""
    min_docstring_chars: int = 40
    """Drop docstrings shorter than this ("Return self.") before joining a module's prose."""
    max_chars_per_document: int | None = 64_000
    """Cut longer documents at line boundaries into parts (rows sharing a doc_id and split). Whole packages reach
    ~1 MB; parts keep row sizes sane for tokenizing and packing. None keeps documents whole."""
    validation_size: float | int = 0.05
    """Groups held out for validation: below 1 a fraction of the groups, from 1 up a number of groups."""
    calibration_size: float | int = 0.05
    """Groups held out for pruning calibration statistics, disjoint from validation and train."""
    seed: int = 0
    """Seeds the hash that orders documents and picks splits; change it for a different split."""

    def __post_init__(self):
        self.sources = tuple(self.sources)
        self.extra_packages = tuple(self.extra_packages)
        self.extra_dirs = tuple(str(d) for d in self.extra_dirs)
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown or not self.sources:
            raise UserError(f"corpus sources must be a non-empty subset of {list(SOURCES)}, got {list(self.sources)}")
        for name in ("validation_size", "calibration_size"):
            size = getattr(self, name)
            if size < 0 or (size >= 1 and size != int(size)):
                raise UserError(f"{name} must be a fraction in [0, 1) or a whole number of groups, got {size}")
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(f"max_documents must be at least 1 (or None for all), got {self.max_documents}")

    def fingerprint(self) -> str:
        """Hash of everything that decides the corpus' content: this config, the corpus format and Python version."""
        return config_hash({"config": to_dict(self), "format": CORPUS_FORMAT, "python": list(sys.version_info[:3])})


@dataclass(frozen=True)
class Group:
    """A top-level package or module: the unit of splitting. `files` are (path relative to `root`, path) pairs."""

    name: str
    root: Path
    files: tuple[Path, ...] = field(default=())


@dataclass(frozen=True)
class Candidate:
    """A document before it is read, so that `max_documents` can pick documents without reading every file."""

    doc_id: str
    source: str
    group: Group
    load: Callable[[], str]


def seeded_hash(seed: int, key: str) -> int:
    """A stable 64-bit hash (Python's `hash` is salted per process, so it cannot order data reproducibly)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def _python_files(path: Path) -> list[Path]:
    """The .py files of a module or package, sorted, without test suites or machine-specific files."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [
        f for f in files  # parts below the group only: an extra package may itself live in site-packages
        if f.suffix == ".py" and not SKIPPED_DIRS & set(f.relative_to(path.parent).parts)
        and not f.name.startswith(SKIPPED_PREFIXES)
    ]


def stdlib_groups() -> list[Group]:
    """One group per top-level stdlib package directory or single-file module, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    groups = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name in SKIPPED_DIRS or entry.name.startswith(SKIPPED_PREFIXES) or entry.name.startswith("."):
            continue
        if entry.is_dir() or entry.suffix == ".py":
            files = _python_files(entry)
            if files:
                groups.append(Group(entry.stem if entry.is_file() else entry.name, root, tuple(files)))
    return groups


def extra_groups(config: CorpusConfig) -> list[Group]:
    """Groups for `extra_packages` (found with `importlib.util.find_spec`, which does not import) and `extra_dirs`."""
    groups = []
    for name in config.extra_packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise UserError(f"extra package {name!r} is not installed (or has no source); check the import name")
        locations = list(spec.submodule_search_locations or [])
        path = Path(locations[0]) if locations else Path(spec.origin)
        groups.append(Group(name, path.parent, tuple(_python_files(path))))
    for directory in config.extra_dirs:
        path = Path(directory).resolve()
        if not path.is_dir():
            raise UserError(f"extra directory {directory!r} does not exist")
        groups.append(Group(path.name, path.parent, tuple(_python_files(path))))
    return groups


def _read_utf8(path: Path) -> str | None:
    """The file's exact text (bytes decoded, so line endings survive), or None when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def code_text(group: Group) -> str:
    """A package as one long document: each file under a `# file: path` header, files in sorted order."""
    parts = []
    for path in group.files:
        text = _read_utf8(path)
        if text is not None:
            parts.append(f"# file: {path.relative_to(group.root).as_posix()}\n{text}")
    return "\n".join(parts)


def docstrings(source: str, min_chars: int) -> list[str]:
    """Docstrings of a module, its classes and functions, in source order, parsed with `ast` (nothing imported)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [(getattr(n, "lineno", 0), ast.get_docstring(n)) for n in ast.walk(tree) if isinstance(n, nodes)]
    return [doc for _, doc in sorted(found, key=lambda item: item[0]) if doc and len(doc) >= min_chars]


def pydoc_topics(source: str) -> list[str]:
    """The reference topics of `pydoc_data.topics` (a literal dict of prose), in key order."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            return [topics[key].strip() for key in sorted(topics)]
    return []


def prose_text(path: Path, min_docstring_chars: int) -> str:
    """A module's docstrings joined by blank lines (pydoc's topics for `pydoc_data/topics.py`)."""
    source = _read_utf8(path)
    if source is None:
        return ""
    pieces = pydoc_topics(source) if path.parts[-2:] == ("pydoc_data", "topics.py") else []
    return "\n\n".join(pieces or docstrings(source, min_docstring_chars))


def module_name(path: Path, root: Path) -> str:
    """`json/decoder.py` -> `json.decoder`; a package's `__init__.py` is named after the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def candidates(config: CorpusConfig, groups: list[Group]) -> list[Candidate]:
    """Every document the config asks for, unread; doc_ids look like "code:json" and "prose:json.decoder"."""
    found = []
    for group in groups:
        if "code" in config.sources and group.name not in PROSE_ONLY_GROUPS:
            found.append(Candidate(f"code:{group.name}", "code", group, lambda g=group: code_text(g)))
        if "prose" in config.sources:
            for path in group.files:
                load = lambda p=path: prose_text(p, config.min_docstring_chars)  # noqa: E731
                found.append(Candidate(f"prose:{module_name(path, group.root)}", "prose", group, load))
    ids = [c.doc_id for c in found]
    if len(set(ids)) != len(ids):
        duplicate = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise UserError(f"two documents are both named {duplicate!r}; an extra package or dir shadows another group")
    return found


def split_lines(text: str, max_chars: int | None) -> list[str]:
    """Cut text into parts of at most `max_chars`, at line ends where possible; joining the parts gives the text."""
    if max_chars is None or len(text) <= max_chars:
        return [text]
    parts, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        parts.append(text[start:end])
        start = end
    return parts


def assign_splits(group_names: list[str], config: CorpusConfig) -> dict[str, str]:
    """Group name -> split. Groups are ranked by seeded hash; the first go to validation, the next to calibration."""
    ranked = sorted(set(group_names), key=lambda name: (seeded_hash(config.seed, "split:" + name), name))

    def count(size: float | int) -> int:
        return int(size) if size >= 1 else max(1, round(size * len(ranked))) if size > 0 else 0

    n_val, n_cal = count(config.validation_size), count(config.calibration_size)
    if n_val + n_cal >= len(ranked):
        raise UserError(
            f"validation ({n_val}) and calibration ({n_cal}) groups leave none of {len(ranked)} for training; "
            "lower validation_size/calibration_size or raise max_documents"
        )
    return {name: "validation" if i < n_val else "calibration" if i < n_val + n_cal else "train"
            for i, name in enumerate(ranked)}


def build_corpus(config: CorpusConfig | None = None) -> datasets.DatasetDict:
    """Build the corpus: splits "train", "calibration", "validation"; columns text, source, doc_id, part, length.

    Rows are ordered by seeded hash of doc_id (a reproducible shuffle), then by part.
    """
    config = config or CorpusConfig()
    pool = candidates(config, stdlib_groups() + extra_groups(config))
    pool.sort(key=lambda c: (seeded_hash(config.seed, "doc:" + c.doc_id), c.doc_id))
    wanted = config.max_documents or len(pool)
    documents = []
    for candidate in tqdm(pool, desc="corpus candidates read", unit="doc", disable=None):
        text = candidate.load()
        if len(text) >= config.min_chars:
            documents.append((candidate, text))
            if len(documents) == wanted:
                break
    if not documents:
        raise UserError("the corpus came out empty; lower min_chars or add sources")
    split_of = assign_splits([c.group.name for c, _ in documents], config)
    rows = {split: {"text": [], "source": [], "doc_id": [], "part": [], "length": []} for split in SPLITS}
    for candidate, text in documents:
        columns = rows[split_of[candidate.group.name]]
        for part, piece in enumerate(split_lines(text, config.max_chars_per_document)):
            columns["text"].append(piece)
            columns["source"].append(candidate.source)
            columns["doc_id"].append(candidate.doc_id)
            columns["part"].append(part)
            columns["length"].append(len(piece))
    features = datasets.Features({
        "text": datasets.Value("string"), "source": datasets.Value("string"), "doc_id": datasets.Value("string"),
        "part": datasets.Value("int32"), "length": datasets.Value("int64"),
    })
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows[s], features=features) for s in SPLITS})


def corpus_fingerprint(dsd: datasets.DatasetDict) -> str:
    """SHA-256 over every split's rows in order: equal fingerprints mean identical corpora."""
    digest = hashlib.sha256()
    for split in sorted(dsd):
        for row in dsd[split].select_columns(["doc_id", "part", "source", "text"]):
            digest.update(json.dumps([split, row["doc_id"], row["part"], row["source"], row["text"]]).encode())
    return digest.hexdigest()


def corpus_summary(dsd: datasets.DatasetDict) -> dict:
    """Per split and source ("all" for both): rows, documents, chars and mean/median/max document length."""
    summary = {}
    for split in dsd:
        lengths: dict[str, dict[str, int]] = {}
        parts: dict[str, int] = {}
        for source, doc_id, length in zip(dsd[split]["source"], dsd[split]["doc_id"], dsd[split]["length"]):
            for key in (source, "all"):
                lengths.setdefault(key, {})
                lengths[key][doc_id] = lengths[key].get(doc_id, 0) + length
                parts[key] = parts.get(key, 0) + 1
        summary[split] = {
            key: {
                "rows": parts[key],
                "documents": len(docs),
                "chars": sum(docs.values()),
                "mean_chars": sum(docs.values()) / len(docs),
                "median_chars": statistics.median(docs.values()),
                "max_chars": max(docs.values()),
            }
            for key, docs in sorted(lengths.items())
        }
    return summary


def format_summary(summary: dict) -> str:
    """The summary as an aligned text table, one line per split and source."""
    rows = [(split, source, s["rows"], s["documents"], s["chars"], round(s["mean_chars"]), round(s["median_chars"]),
             s["max_chars"]) for split, by_source in summary.items() for source, s in by_source.items()]
    return format_table(rows, ["split", "source", "rows", "documents", "chars", "mean", "median", "max"])


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final` to write into; on success it replaces `final` in one rename
    (`core.stage.publish`), on error it is removed. A killed run leaves the old directory or the new, never half.

    The name is unique per call, so two processes filling the same cache entry do not write into each other.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_corpus(dsd: datasets.DatasetDict, directory: str | os.PathLike) -> None:
    """`save_to_disk` into an existing directory, without datasets' progress bars (saving takes a blink; its bars
    would bury the summary table)."""
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dsd.save_to_disk(str(directory))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def save_corpus(dsd: datasets.DatasetDict, config: CorpusConfig, out_dir: str | os.PathLike,
                seconds: float | None = None) -> Path:
    """Save a cache entry atomically with `save_to_disk`, plus a manifest (config, summary, corpus fingerprint,
    versions)."""
    with atomic_directory(out_dir) as tmp:
        write_corpus(dsd, tmp)
        Manifest(
            stage="corpus", config_hash=config.fingerprint(), config=to_dict(config),
            outputs={"corpus_fingerprint": corpus_fingerprint(dsd)}, metrics=corpus_summary(dsd),
            timings={"build_seconds": round(seconds, 2)} if seconds is not None else {}, versions=library_versions(),
        ).write(tmp)
    return Path(out_dir)


def load_or_build_corpus(config: CorpusConfig, cache_dir: str | os.PathLike) -> datasets.DatasetDict:
    """Load the corpus cached for this config and Python version, or build and cache it (atomically)."""
    path = Path(cache_dir) / f"corpus-{config.fingerprint()}"
    if not (path / "dataset_dict.json").exists():
        save_corpus(build_corpus(config), config, path)
    return datasets.load_from_disk(str(path))


# ---------------------------------------------------------------------------------------------------- the kind


@dataclass
class BuiltCorpus:
    corpus: datasets.DatasetDict
    seconds: float


def prepare(config: CorpusConfig, inputs: dict, progress: bool = True) -> BuiltCorpus:
    """Build the corpus in memory: every bad setting (unknown package, missing directory, splits that leave no
    training text) fails here, before the stage directory exists."""
    start = time.perf_counter()
    corpus = build_corpus(config)
    return BuiltCorpus(corpus, time.perf_counter() - start)


def save(built: BuiltCorpus, work_dir: Path) -> dict:
    write_corpus(built.corpus, work_dir)
    return {"fingerprint": corpus_fingerprint(built.corpus), "build_seconds": round(built.seconds, 2),
            "splits": corpus_summary(built.corpus)}


def summary(manifest: Manifest) -> str:
    metrics = manifest.metrics
    return (format_summary(metrics["splits"]) + f"\nfingerprint {metrics['fingerprint'][:16]}  built in "
            f"{metrics['build_seconds']:.1f}s")


def _list_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=None,
                        help="document kinds to build (default: code prose)")
    parser.add_argument("--extra-package", dest="extra_packages", action="append", default=None, metavar="NAME",
                        help="also add an installed package's source (repeatable; makes the corpus machine-dependent)")


def _list_values(args: argparse.Namespace) -> dict:
    return {"sources": args.sources, "extra_packages": args.extra_packages}


KIND = register_kind(StageKind(
    name="corpus",
    writes_checkpoint=False,
    stage="corpus",
    module="pretrain.corpus",
    config_cls=CorpusConfig,
    prepare=prepare,
    run=save,
    description="Build the offline stdlib corpus (code + docstrings), save it with save_to_disk, print a summary.",
    examples=("python -m pretrain.corpus --out runs/corpus",
              "python -m pretrain.corpus --out runs/corpus-small --max-documents 500 --seed 1"),
    inputs=(),
    summary=summary,
    flags=_list_flags,
    flag_values=_list_values,
))
main = command(KIND)


if __name__ == "__main__":
    main()
