"""Offline lm-eval tasks, generated deterministically from the held-out split of the offline corpus.

A task set is a directory that lm-eval reads with `--include_path DIR`:

    DIR/taskset.json              config, format, sha256 of every data file, the tasks and their metrics
    DIR/<task>.yaml               rendered from the templates in eval/tasks/ (absolute path of the data file)
    DIR/data/<task>.jsonl         the rows

Tasks (names fixed by the config, so a gate can be checked before anything is generated):

| task | lm-eval output type | metrics |
| --- | --- | --- |
| `corpus_ppl` | loglikelihood_rolling | word_perplexity, byte_perplexity, bits_per_byte |
| `corpus_mc` | multiple_choice | acc, acc_norm |
| `probe_<kind>_<chars>` | generate_until | exact_match |
| `probe_<kind>` (group of the lengths) | | exact_match |
| `probe_<kind>_choices_<chars>` (the same rows) | multiple_choice | gold_loglik, gold_rank |
| `probe_<kind>_choices` (group of the lengths) | | gold_loglik, gold_rank |

The answer-choice tasks rank each probe row's answer among its candidates (eval/probes.py) by the total
log-likelihood of " value" after the prompt: `gold_rank` (1 = best) and `gold_loglik` (the answer's log-likelihood
in nats per character), both graded where exact match is still 0. Their metric code, eval/tasks/probe_choices.py,
is copied beside the YAMLs (lm-eval's `!function` reads it from there).

Only the corpus' validation split is read, never train (nor calibration, which pruning scores on). The same config
gives byte-identical files on every machine with the same Python (the corpus is the stdlib's source); the sha256 of
each file is recorded at generation and checked whenever the set is loaded, and goes into each task's
`metadata.data_sha256`, so results (and baselines) say exactly which data they were measured on.

    python -m eval.taskdata --out runs/eval_tasks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from core.config import load_config, to_dict
from core.errors import UserError, main_guard
from core.stage import Stage, run_stage
from eval.probes import PROBE_KINDS, probe_rows
from pretrain.corpus import CorpusConfig, load_or_build_corpus, seeded_hash, split_lines

TASKSET_FORMAT = 3  # bump when rows are made differently, so old task sets are not mistaken for new ones (2: kv
# rows no longer depend on the process hash seed; 3: probe rows carry answer candidates)
TASKSET_FILE = "taskset.json"
TEMPLATES = Path(__file__).parent / "tasks"
CHOICE_METRICS_FILE = "probe_choices.py"  # the answer-choice tasks' process_results, copied beside the YAMLs
PPL_TASK, MC_TASK = "corpus_ppl", "corpus_mc"
ROLLING_METRICS = {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}


@dataclass
class TaskDataConfig:
    """What goes into the offline task set. Defaults: ~400K characters of perplexity text, 200 multiple-choice
    questions, and 5 lengths x 5 depths x 2 samples = 50 probe rows per kind; tests shrink all of it."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus whose validation split the tasks are cut from (the default is the whole stdlib corpus)."""
    ppl_documents: int = 100
    """Held-out texts for perplexity. 100 x 4000 characters keeps the standard error of bits per byte ~1%."""
    ppl_chars: int = 4000
    """Characters per perplexity text, cut at line ends. Longer texts measure longer-range modelling but take
    several rolling windows on models with short contexts (OpenBA-V2 trains with 570 encoder tokens)."""
    mc_questions: int = 200
    """Multiple-choice continuation questions (accuracy standard error ~3.5 points at 200)."""
    mc_context_chars: int = 600
    """Characters of document shown before the choices."""
    mc_choice_chars: int = 120
    """Characters per choice (the real next span, or a span of another held-out document)."""
    mc_choices: int = 4
    """Choices per question; chance accuracy is 1 / mc_choices."""
    probe_kinds: tuple[str, ...] = ("needle", "kv")
    """Long-context probes to build: "needle" (a sentence in corpus text), "needles" (the same among 3 distractor
    facts) and/or "kv" (JSON key-value retrieval)."""
    probe_lengths: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000)
    """Context lengths in CHARACTERS (about 3-4 characters per token for the project tokenizer on code): the
    same rows then fit every tokenizer, so stages before and after vocabulary pruning are compared on equal data.
    Raise them for long-context models (LOGO evaluates 8K-88K tokens)."""
    probe_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Where the fact sits, as a fraction of the context (0 = first line, 1 = just before the question)."""
    probe_samples: int = 2
    """Rows per (kind, length, depth) cell."""
    probe_candidates: int = 8
    """Values each probe row's answer is ranked among in the answer-choice tasks, the answer included (chance: mean
    rank (n + 1) / 2). Each is one more log-likelihood request over the whole prompt, so evaluation time grows
    with it."""
    seed: int = 0
    """Seeds every choice (documents, cut points, distractors, facts); change it for a fresh draw."""

    def __post_init__(self):
        self.probe_kinds = tuple(self.probe_kinds)
        self.probe_lengths = tuple(int(n) for n in self.probe_lengths)
        self.probe_depths = tuple(float(d) for d in self.probe_depths)
        unknown = sorted(set(self.probe_kinds) - set(PROBE_KINDS))
        if unknown:
            raise UserError(f"unknown probe kinds {unknown}; known: {list(PROBE_KINDS)}")
        if any(not 0.0 <= d <= 1.0 for d in self.probe_depths):
            raise UserError(f"probe_depths must lie in [0, 1], got {list(self.probe_depths)}")
        if any(n < 64 for n in self.probe_lengths):
            raise UserError(f"probe_lengths are characters and must be at least 64, got {list(self.probe_lengths)}")
        if len(set(self.probe_lengths)) != len(self.probe_lengths):
            raise UserError(f"probe_lengths repeat a length: {list(self.probe_lengths)}")
        if self.mc_choices < 2:
            raise UserError(f"mc_choices must be at least 2, got {self.mc_choices}")
        if self.probe_candidates < 2:
            raise UserError(f"probe_candidates must be at least 2 (the answer and one other), got "
                            f"{self.probe_candidates}")
        for name in ("ppl_documents", "ppl_chars", "mc_questions", "mc_context_chars", "mc_choice_chars",
                     "probe_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")


def probe_task(kind: str, length: int) -> str:
    return f"probe_{kind}_{length}"


def probe_group(kind: str) -> str:
    return f"probe_{kind}"


def choice_task(kind: str, length: int) -> str:
    return f"probe_{kind}_choices_{length}"


def choice_group(kind: str) -> str:
    return f"probe_{kind}_choices"


CHOICE_METRICS = {"gold_loglik": True, "gold_rank": False}


def task_metrics(config: TaskDataConfig) -> dict[str, dict[str, bool]]:
    """Every task and group the config defines -> {metric: higher_is_better}; known before any data is built."""
    metrics = {PPL_TASK: dict(ROLLING_METRICS), MC_TASK: {"acc": True, "acc_norm": True}}
    for kind in config.probe_kinds:
        metrics[probe_group(kind)] = {"exact_match": True}
        metrics[choice_group(kind)] = dict(CHOICE_METRICS)
        for length in config.probe_lengths:
            metrics[probe_task(kind, length)] = {"exact_match": True}
            metrics[choice_task(kind, length)] = dict(CHOICE_METRICS)
    return metrics


@dataclass
class TaskSet:
    """A generated, hash-checked task directory: pass `directory` to lm-eval as its include path."""

    directory: Path
    fingerprint: str
    files: dict[str, str]
    """data file (relative to directory) -> sha256."""
    tasks: dict[str, dict[str, Any]]
    """task or group name -> {"file", "sha256", "rows", "metrics": {metric: higher_is_better}, "members"}."""
    config: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def members(self, name: str) -> list[str]:
        """The leaf tasks a name stands for (a group's lengths, or the task itself)."""
        return list(self.tasks[name].get("members") or [name])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows with a fixed key order and escaping, so the bytes (and hash) depend only on the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=True, sort_keys=True) + "\n")
    return sha256_file(path)


def _validation_texts(config: TaskDataConfig, cache_dir: Path) -> tuple[list[str], list[str]]:
    corpus = load_or_build_corpus(config.corpus, cache_dir)
    validation = corpus["validation"]
    texts = [t for t in validation["text"] if t.strip()]
    doc_ids = [d for d, t in zip(validation["doc_id"], validation["text"]) if t.strip()]
    if not texts:
        raise UserError("the corpus has no validation text; raise corpus.validation_size or corpus.max_documents")
    return texts, doc_ids


def perplexity_rows(texts: list[str], doc_ids: list[str], config: TaskDataConfig) -> list[dict]:
    """Texts of at most `ppl_chars` cut at line ends, shuffled by seeded hash so that a --limit spans documents."""
    pieces = []
    for text, doc_id in zip(texts, doc_ids):
        for index, piece in enumerate(split_lines(text, config.ppl_chars)):
            if piece.strip():
                pieces.append((seeded_hash(config.seed, f"ppl:{doc_id}:{index}:{piece[:64]}"), doc_id, piece))
    pieces.sort()
    return [{"text": piece, "doc_id": doc_id} for _, doc_id, piece in pieces[: config.ppl_documents]]


def _span(text: str, start: int, chars: int) -> str:
    """`chars` characters from `start`, stretched to the end of the word so no choice ends mid-identifier."""
    end = start + chars
    while end < len(text) and end < start + chars + 40 and not text[end].isspace():
        end += 1
    return text[start:end]


def _line_starts(text: str, lo: int, hi: int) -> list[int]:
    starts = [i + 1 for i in range(max(lo - 1, 0), min(hi, len(text))) if text[i] == "\n"]
    return [s for s in starts if lo <= s < hi]


def continuation_rows(texts: list[str], doc_ids: list[str], config: TaskDataConfig) -> list[dict]:
    """Context = a document up to a line end; choices = its real next span and spans of other documents."""
    need = config.mc_context_chars + config.mc_choice_chars
    usable = [i for i, t in enumerate(texts) if len(t) > need and _line_starts(t, config.mc_context_chars,
                                                                                len(t) - config.mc_choice_chars)]
    if not usable or len({doc_ids[i] for i in range(len(texts))}) < 2:
        raise UserError(
            f"the corpus' validation split is too small for {config.mc_choices}-way continuation questions of "
            f"{need} characters from two or more documents; raise corpus.validation_size or lower mc_context_chars"
        )
    weights = [len(texts[i]) for i in usable]  # long documents hold more distinct questions
    rows = []
    for question in range(config.mc_questions):
        rng = random.Random(f"{config.seed}:mc:{question}")
        for _ in range(100):
            source = rng.choices(usable, weights)[0]
            text = texts[source]
            cut = rng.choice(_line_starts(text, config.mc_context_chars, len(text) - config.mc_choice_chars))
            starts = _line_starts(text, cut - config.mc_context_chars, cut) or [cut - config.mc_context_chars]
            context_start = starts[0]
            context, answer = text[context_start:cut], _span(text, cut, config.mc_choice_chars)
            distractors = _distractors(texts, doc_ids, doc_ids[source], answer, config, rng)
            if context.strip() and answer.strip() and distractors is not None:
                break
        else:
            raise UserError("could not draw distinct continuation choices; the validation split is too repetitive")
        label = rng.randrange(config.mc_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        rows.append({"context": context, "choices": choices, "label": label, "doc_id": doc_ids[source]})
    return rows


def _distractors(texts, doc_ids, doc_id, answer, config, rng) -> list[str] | None:
    others = [i for i in range(len(texts)) if doc_ids[i] != doc_id and len(texts[i]) > config.mc_choice_chars]
    if not others:
        return None
    picked: list[str] = []
    for _ in range(20 * config.mc_choices):
        text = texts[rng.choice(others)]
        starts = _line_starts(text, 1, len(text) - config.mc_choice_chars) or [0]
        span = _span(text, rng.choice(starts), config.mc_choice_chars)
        if span.strip() and span != answer and span not in picked:
            picked.append(span)
            if len(picked) == config.mc_choices - 1:
                return picked
    return None


class _Function(str):
    """A template's `!function module.name` (lm-eval's tag for code beside the YAML), kept through load and dump."""


class _TemplateLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TemplateLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def render_yaml(template: str, directory: Path, name: str, data_file: str | None, sha256: str | None,
                members: list[str] | None = None) -> str:
    """A task (or group) YAML from a shipped template: name, absolute data path and data hash filled in."""
    config = yaml.load((TEMPLATES / template).read_text(), Loader=_TemplateLoader)
    if members is not None:
        config = {"group": name, "task": members, **config}
    else:
        config = {"task": name, **config}
        config["dataset_kwargs"]["data_files"]["test"] = str((directory / data_file).resolve())
        config["metadata"]["data_sha256"] = sha256
    return yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=False)


def write_yamls(directory: Path, tasks: dict[str, dict[str, Any]], final_dir: Path | None = None) -> None:
    """(Re)write every task YAML so its data path points into `final_dir` (where the set lives when it is read), and
    the answer-choice tasks' metric code beside them, both from the shipped templates."""
    final_dir = final_dir or directory
    texts = {f"{name}.yaml": render_yaml(info["template"], final_dir, name, info.get("file"), info.get("sha256"),
                                         info.get("members")) for name, info in tasks.items()}
    texts[CHOICE_METRICS_FILE] = (TEMPLATES / CHOICE_METRICS_FILE).read_text()
    for file, text in texts.items():
        path = directory / file
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def generate_task_set(config: TaskDataConfig, directory: str | Path, cache_dir: str | Path,
                      final_dir: str | Path | None = None) -> dict[str, Any]:
    """Write every data file, YAML and taskset.json of `config` into `directory`; returns taskset.json's content.

    `final_dir` is where the directory will be published (the YAMLs hold absolute data paths)."""
    directory = Path(directory)
    texts, doc_ids = _validation_texts(config, Path(cache_dir))
    tasks: dict[str, dict[str, Any]] = {}
    metrics = task_metrics(config)
    jobs = [(PPL_TASK, "corpus_ppl.yaml", lambda: perplexity_rows(texts, doc_ids, config)),
            (MC_TASK, "corpus_mc.yaml", lambda: continuation_rows(texts, doc_ids, config))]
    for kind in config.probe_kinds:
        for length in config.probe_lengths:
            make = lambda kind=kind, length=length: probe_rows(  # noqa: E731
                kind, texts, length, config.probe_depths, config.probe_samples, config.seed, config.probe_candidates)
            jobs.append((probe_task(kind, length), "probe.yaml", make))
    for name, template, make in tqdm(jobs, desc="eval task data", unit="task", disable=None):
        rows = make()
        file = f"data/{name}.jsonl"
        tasks[name] = {"template": template, "file": file, "sha256": _write_jsonl(directory / file, rows),
                       "rows": len(rows), "metrics": metrics[name]}
    for kind in config.probe_kinds:
        for length in config.probe_lengths:  # the answer-choice task reads its probe task's rows
            rows = tasks[probe_task(kind, length)]
            tasks[choice_task(kind, length)] = {**rows, "template": "probe_choices.yaml",
                                                "metrics": metrics[choice_task(kind, length)]}
        for group, member, template in ((probe_group(kind), probe_task, "probe_group.yaml"),
                                        (choice_group(kind), choice_task, "probe_choices_group.yaml")):
            members = [member(kind, length) for length in config.probe_lengths]
            tasks[group] = {"template": template, "members": members, "rows": sum(tasks[m]["rows"] for m in members),
                            "metrics": metrics[group]}
    write_yamls(directory, tasks, Path(final_dir) if final_dir else directory)
    files = {info["file"]: info["sha256"] for info in tasks.values() if "file" in info}
    content = {
        "format": TASKSET_FORMAT,
        "fingerprint": fingerprint(files),
        "length_unit": "chars",
        "config": to_dict(config),
        "files": files,
        "tasks": tasks,
    }
    (directory / TASKSET_FILE).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return content


def fingerprint(files: dict[str, str]) -> str:
    """One hash for the whole set: equal fingerprints mean byte-identical data files."""
    return hashlib.sha256(json.dumps([TASKSET_FORMAT, sorted(files.items())]).encode()).hexdigest()[:16]


def load_task_set(directory: str | Path, verify: bool = True) -> TaskSet:
    """Open a generated task set; with `verify`, re-hash every data file and refuse one that changed."""
    directory = Path(directory)
    index = directory / TASKSET_FILE
    if not index.is_file():
        raise UserError(f"{directory} is not an eval task set (no {TASKSET_FILE}); "
                        "make one with python -m eval.taskdata")
    try:
        content = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{index} is not valid JSON: {err}") from None
    if content.get("format") != TASKSET_FORMAT:
        raise UserError(f"{directory} was generated in task-set format {content.get('format')}, this code reads "
                        f"{TASKSET_FORMAT}; regenerate it with python -m eval.taskdata")
    if verify:
        for file, expected in content["files"].items():
            path = directory / file
            if not path.is_file():
                raise UserError(f"task data file {path} is missing; regenerate the task set")
            actual = sha256_file(path)
            if actual != expected:
                raise UserError(f"task data file {path} changed since it was generated (sha256 {actual[:12]}, "
                                f"recorded {expected[:12]}); regenerate the task set rather than editing it")
        if fingerprint(content["files"]) != content["fingerprint"]:
            raise UserError(f"{index} was edited: its fingerprint does not match its file hashes; regenerate it")
    write_yamls(directory, content["tasks"])  # the set may have moved since the YAMLs were written
    return TaskSet(directory.resolve(), content["fingerprint"], content["files"], content["tasks"], content["config"])


def ensure_task_set(config: TaskDataConfig, cache_dir: str | Path) -> TaskSet:
    """The task set of `config` under `cache_dir`, generated once (atomically, with a manifest) and then reused."""
    cache_dir = Path(cache_dir)
    out = cache_dir / f"eval-tasks-{_config_key(config)}"
    stage = Stage("eval-tasks", lambda _, work, cfg: _stage_fn(work, cfg, cache_dir, out), config)
    run_stage(stage, None, out)
    return load_task_set(out)


def _config_key(config: TaskDataConfig) -> str:
    blob = json.dumps([TASKSET_FORMAT, to_dict(config), sys.version_info[:3]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage_fn(work_dir: Path, config: TaskDataConfig, cache_dir: Path, final_dir: Path) -> dict[str, Any]:
    content = generate_task_set(config, work_dir, cache_dir, final_dir=final_dir)
    return {"fingerprint": content["fingerprint"], "rows": {n: t["rows"] for n, t in content["tasks"].items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.taskdata",
        description="Generate the offline lm-eval task set (held-out perplexity, multiple-choice continuation, "
                    "long-context probes) from the corpus' validation split; pass the directory to lm-eval as "
                    "--include_path.",
        epilog="example: python -m eval.taskdata --out runs/eval_tasks probe_lengths=[1000,4000] mc_questions=50\n"
               "         lm_eval --model hf --model_args pretrained=runs/llama --include_path runs/eval_tasks "
               "--tasks corpus_ppl,corpus_mc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="task-set directory to write (atomically, with a manifest)")
    parser.add_argument("--config", help="YAML file of TaskDataConfig fields (default: the built-in defaults)")
    parser.add_argument("--cache-dir", default="runs/cache", help="where the corpus is cached (default: runs/cache)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. corpus.seed=1")
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    from core.table import format_table

    args = parse_args(argv)
    config = load_config(TaskDataConfig, args.config, args.overrides)
    out = Path(args.out)
    cache_dir = Path(args.cache_dir)
    stage = Stage("eval-tasks", lambda _, work, cfg: _stage_fn(work, cfg, cache_dir, out.resolve()), config)
    run_stage(stage, None, out, force=True)
    task_set = load_task_set(out)
    rows = [(name, info["rows"], ", ".join(info["metrics"]), (info.get("sha256") or "group")[:12])
            for name, info in task_set.tasks.items()]
    print(format_table(rows, ["task", "rows", "metrics", "sha256"]))
    print(f"fingerprint {task_set.fingerprint} -> {out} (lm-eval: --include_path {out})")


if __name__ == "__main__":
    main()
