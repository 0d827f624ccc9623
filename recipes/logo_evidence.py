"""The LOGO evidence experiment: the model before LOGO, after LOGO, and after SFT on the same rows with the same
steps, on long-context retrieval probes beyond the real training length, with short-context perplexity checked
against the long-context gate's bound.

    python -m recipes.logo_evidence --out runs/logo-evidence        # the cached tiny teacher (trained if missing)
    python -m recipes.logo_evidence --config recipes/configs/logo_evidence.yaml --out runs/logo-evidence
    python -m recipes.logo_evidence --teacher runs/teacher --out runs/ev --set steps=40
    python -m recipes.logo_evidence --teacher runs/llama --out runs/ev-qa --set qa=my_qa.jsonl --set instruct.steps=0

Each stage writes its own directory under --out through the stage contract (core.stage: atomic, with a manifest),
so a rerun skips finished stages and resumes a killed training, also in a copied run directory: `--stop-after
instruct` runs the instruction stage alone (e.g. on a GPU machine), and a rerun without it resumes from there.

    instruct_data/  instruct_mix/  instruct/   the teacher's instruction stage (`instruct.steps` > 0): SFT on the
                question format (with plain text rows mixed in by `instruct.lm_samples`) at plain positions within
                the real training length, so that "before LOGO" is a model that answers and retrieves there; LOGO is
                then measured on carrying that beyond it
    data/       preference rows from the corpus' train split, chunked in the teacher's tokens (align.build_data);
                dis-preferred answers by rule, sampled from the model before LOGO (`responses: generator`), or that
                model's own mistakes at synthesised positions (`own_mistake` in `rule_rejected`); with `qa` set,
                from the user's long-document QA file instead (align/qa.py), the same negatives made for real QA
    text_data/  plain text rows for a text regulariser of both trainings alike (`text_rows` > 0)
    logo/  sft/                  LOGO (positions synthesised over `window_factor` x the real length), and SFT on
                the same rows, steps, positions and optimiser (loss `sft`: the preferred response's NLL only)
    logo-seed<N>/  sft-seed<N>/  the same two trainings with each further seed of `train_seeds`
    report/     the three models through one gate (probes from the validation split, corpus perplexity with the
                bound `max_ppl_rel_increase` against the model before LOGO): report.md and evidence.json

Probe lengths are in characters (eval/probes.py); the report also gives them in the teacher's tokens, beside the
real training context (`context_chunks` x `chunk_size` tokens), so "beyond the real training length" can be read off.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
from pathlib import Path
from typing import Any, Callable

from align.build_data import BuildDataConfig, build
from align.data import PreferenceDataConfig, QAColumns, load_rows, save_rows
from align.logo import LogoConfig, run_logo
from align.text_rows import continuation_rows
from core.config import from_dict, load_config, merge, parse_override, to_dict
from core.errors import UserError, main_guard
from core.stage import Manifest, Stage, run_stage
from pretrain.corpus import CorpusConfig
from recipes.logo_evidence_report import MODELS, evaluate_and_report

STAGES = ("instruct_data", "instruct_mix", "instruct", "data", "text_data", "logo", "sft", "report")
"""What --stop-after names, in the order the stages run (`logo` and `sft`: the trainings of every seed)."""
INSTRUCTION_STAGES = STAGES[:3]


@dataclasses.dataclass
class InstructConfig:
    """The teacher's short instruction stage, run before the comparison when `steps` > 0.

    A pretrained tiny teacher neither answers questions nor copies from far back, so LOGO from it would be measured
    on teaching the question format. This stage fine-tunes it on the needle question format (rows built like the
    preference data from other facts, seed + 1) with loss `sft` and plain positions 0..k-1 at the real training
    length: no synthesised window, so whatever it retrieves beyond that length is what LOGO has to improve on.
    Copying six random digits from a few hundred tokens back takes the tiny model thousands of steps, which is why
    recipes/configs/logo_evidence.yaml runs this stage on a GPU.
    """

    steps: int = 0
    """0 skips the stage: the teacher itself is "before LOGO"."""
    samples: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    distractors: int = 0
    """Facts of other names in each instruction row; 0 teaches the format and the copy first."""
    lm_samples: int = 0
    """Plain text rows mixed in (align/text_rows.py: a few tokens of corpus text as the context, its next
    `lm_tokens` tokens as the response). Question rows alone teach the decoder to write six digits and stop, its
    byte perplexity collapses, and the perplexity check of LOGO then guards nothing. Perplexity is scored with a
    near-empty encoder input, as these rows train."""
    lm_tokens: int = 120
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Settings of `align.logo` for this stage in its `key=value` form, applied last, e.g. ["train.save_every=1000"]."""


@dataclasses.dataclass
class EvidenceConfig:
    """The comparison's settings; the defaults are a CPU-sized version of LOGO's recipe on the tiny teacher."""

    teacher: str | None = None
    """Checkpoint to align (any supported family: a converted OpenBA, a Llama-family model); None uses the cached
    default tiny teacher (python -m pretrain.teacher trains it)."""
    qa: str | None = None
    """Long-document QA the preference rows are built from instead of synthetic facts in corpus text (JSONL or a
    datasets folder with context, question and answer columns; align/qa.py). The instruction stage and the probes
    keep the synthetic needle format; `distractors` and `document_chunks` are then unused."""
    qa_split: str = "train"
    """The split of a saved DatasetDict `qa` reads."""
    qa_columns: QAColumns = dataclasses.field(default_factory=QAColumns)
    """Its column names, e.g. `--set qa_columns.context=document`."""
    cache_dir: str = "runs/cache"
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    """Preference data come from its train split (unless `qa` names a QA file), the probes and perplexity texts from
    its validation split."""
    samples: int = 192
    """Preference rows (LOGO: 12,000)."""
    chunk_size: int = 64
    """Tokens per chunk (LOGO: 512)."""
    context_chunks: int = 8
    """Chunks of real context per row (LOGO: 16): the real training length is context_chunks x chunk_size."""
    document_chunks: int = 12
    window_factor: int = 4
    """Synthesised window / real length (LOGO: 8, i.e. 8K -> 64K)."""
    steps: int = 60
    lr: float = 5e-4
    """Full fine-tuning of a tiny model (LOGO's 5e-7 is for LoRA on 8B models over 1200 steps)."""
    batch_size: int = 4
    lora: bool = False
    beta: float = 2.5
    """LOGO's Mistral-7B setting (beta 2.5, gamma 0.25): small models' mean log-likelihoods differ little."""
    gamma: float = 0.25
    probe_kinds: tuple[str, ...] = ("needle",)
    probe_lengths: tuple[int, ...] = (2000, 4000, 6000)
    """Characters (~3.5 per token on code): about 1.1x, 2.2x and 3.3x the default 512-token real context."""
    probe_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    probe_samples: int = 4
    ppl_documents: int = 40
    max_ppl_rel_increase: float = 0.02
    """Largest allowed rise of byte perplexity after LOGO (eval/gates/long_context.yaml's corpus_ppl rule)."""
    logo_overrides: list[str] = dataclasses.field(default_factory=list)
    """Settings of `align.logo` for both trainings in its `key=value` form, applied last, e.g.
    ["train.grad_accum_steps=2"]."""
    responses: str = "rule"
    """Dis-preferred answers of the preference rows: "rule" (made from the facts, `rule_rejected`) or "generator"
    (sampled from the model before LOGO on the partial and irrelevant chunks, LOGO's recipe; the preferred answer
    stays the gold one). A model that half retrieves samples the right number with a few digits changed, and
    pushing such answers down also pushes down the digits they share with the gold: it learns not to copy."""
    rule_rejected: list[str] = dataclasses.field(default_factory=lambda: ["partial", "irrelevant"])
    """The dis-preferred rule answers, M of them (align.data.PreferenceDataConfig.rule_rejected): "partial" (a
    distractor fact's value), "irrelevant" (from the lowest-scoring chunks), "near_miss" (the gold with one or two
    digits changed), "own_mistake" (the model before LOGO's wrong answer with the row's context at positions
    synthesised over the window, align/mistakes.py). The instruction stage's rows keep the default (it trains the
    gold only)."""
    distractors: int = 3
    """Facts of other names beside the asked one in each preference row. Rows the model before LOGO cannot answer
    even at plain positions train a task it cannot do; on single-fact rows (0) what is left to learn is the long
    positions."""
    sft_weight: float = 0.1
    """LOGO's lambda: weight of the preferred response's NLL beside the preference term (the paper: 0.1)."""
    response_temperature: float = 0.7
    """Sampling temperature of generated responses (LOGO's released code: 0.7); 0 decodes greedily."""
    answer_tokens: int = 12
    """Most new tokens of a generated answer or an own mistake: the needle's six digits need few; raise it for a QA
    file's longer answers (the released LOGO code: up to 512, cut at the first line break)."""
    instruct: InstructConfig = dataclasses.field(default_factory=InstructConfig)
    text_rows: int = 0
    """Plain text rows for a text regulariser in both trainings alike (align.logo.TextRegulariser; not LOGO's):
    `text_weight` x their NLL beside the loss, `text_batch_size` rows a step. 0: off (LOGO as published). For a model
    before LOGO that models text the preference rows never show, so that its short-context perplexity is guarded by
    training on text rather than by a small learning rate."""
    text_weight: float = 1.0
    text_batch_size: int = 8
    text_tokens: int = 120
    """Tokens of text per row, after a 4-token prompt (as the instruction stage's text rows)."""
    train_seeds: tuple[int, ...] = (0,)
    """Seeds of the LOGO and SFT trainings (row order, synthesised positions, text rows; added to `seed`), each
    training both on the same data: the report gives a row per seed, their means and LOGO minus SFT paired by seed.
    On a tiny model the paired difference at one length moves a lot between seeds: compare over many."""
    seed: int = 0

    def __post_init__(self):
        if self.window_factor < 1 or self.steps < 1 or self.samples < 1 or self.answer_tokens < 1:
            raise UserError("window_factor, steps, samples and answer_tokens must be at least 1")
        if self.responses not in ("rule", "generator"):
            raise UserError(f"responses must be \"rule\" or \"generator\", got {self.responses!r}")
        if self.instruct.steps < 0 or self.instruct.samples < 1 or self.instruct.batch_size < 1:
            raise UserError("instruct.steps must be >= 0, instruct.samples and instruct.batch_size >= 1")
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise UserError(f"train_seeds must be distinct and at least one, got {list(self.train_seeds)}")
        if self.distractors < 0:
            raise UserError(f"distractors must be >= 0, got {self.distractors}")
        if self.sft_weight < 0:
            raise UserError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.text_rows < 0 or (self.text_rows and (self.text_weight <= 0 or self.text_batch_size < 1)):
            raise UserError("text_rows must be >= 0; with text rows, text_weight > 0 and text_batch_size >= 1")

    @property
    def real_length(self) -> int:
        """The real training length: context_chunks x chunk_size plus room for the question and the answer."""
        return self.context_chunks * self.chunk_size + 64

    @property
    def window(self) -> int:
        """The synthesised window LOGO and SFT train for."""
        return self.window_factor * self.real_length

    @property
    def generated_data(self) -> bool:
        """Whether the preference rows need the model before LOGO (sampled answers or its own mistakes)."""
        return self.responses == "generator" or "own_mistake" in self.rule_rejected

    @property
    def num_rejected(self) -> int:
        """M of every preference row: the rule kinds asked for, or the generator's two (half and wrong chunks)."""
        return len(self.rule_rejected) if self.responses == "rule" else 2


# ---------------------------------------------------------------------------------------------------- stage configs


def preference_data(config: EvidenceConfig) -> PreferenceDataConfig:
    """The rows LOGO and SFT train on, chunked as their positions expect, with the negatives `config` asks for."""
    data = PreferenceDataConfig(
        corpus=config.corpus, samples=config.samples, chunk_size=config.chunk_size,
        context_chunks=config.context_chunks, document_chunks=config.document_chunks,
        full_chunks=min(6, config.context_chunks), half_chunks=min(3, config.context_chunks),
        distractors=config.distractors, rule_rejected=list(config.rule_rejected), qa=config.qa,
        qa_split=config.qa_split, qa_columns=config.qa_columns, seed=config.seed)
    if "own_mistake" in config.rule_rejected:  # asked at the window the trainings synthesise; answers are short
        data = dataclasses.replace(data, mistake_window=config.window,
                                   generation=dataclasses.replace(data.generation, max_new_tokens=config.answer_tokens))
    if config.responses == "generator":  # short factual answers: the released code's 16-512 new tokens run past them
        generation = dataclasses.replace(data.generation, preferred="gold", min_new_tokens=1,
                                         max_new_tokens=config.answer_tokens, temperature=config.response_temperature)
        data = dataclasses.replace(data, responses="generator", generation=generation)
    return data


def instruction_data(config: EvidenceConfig) -> PreferenceDataConfig:
    """The instruction stage's rows: the preference rows' shape with rule negatives of the default kinds (its loss
    reads the gold answer only), `instruct.samples` rows with `instruct.distractors` facts, drawn with seed + 1;
    synthetic also when the preference rows come from a QA file (the probes ask in the needle format)."""
    rule_only = dataclasses.replace(config, responses="rule", rule_rejected=PreferenceDataConfig().rule_rejected,
                                    qa=None)
    return dataclasses.replace(preference_data(rule_only), samples=config.instruct.samples,
                               distractors=config.instruct.distractors, seed=config.seed + 1)


def build_config(config: EvidenceConfig, data: PreferenceDataConfig, tokenizer: Path,
                 generator: Path | None = None) -> BuildDataConfig:
    """align.build_data's config: rows in the tokens of `tokenizer`, the generator's answers where `data` asks."""
    return BuildDataConfig(tokenizer=str(tokenizer), generator=None if generator is None else str(generator),
                           cache_dir=config.cache_dir, data=data)


def with_settings(logo: LogoConfig, settings: list[str], field: str) -> LogoConfig:
    """`logo` with the user's `key=value` settings of align.logo applied (as its --set); errors name `field`."""
    if not settings:
        return logo
    tree = to_dict(logo)
    try:
        for setting in settings:
            merge(tree, parse_override(setting))
        return from_dict(LogoConfig, tree)
    except UserError as err:
        raise UserError(f"{field}: {err}") from None


def instruct_training(config: EvidenceConfig, data_dir: Path) -> LogoConfig:
    """SFT with plain positions at the real length, through the trainer and batches the LOGO stages use."""
    instruct, steps, seed = config.instruct, config.instruct.steps, config.seed + 1
    logo = LogoConfig()
    logo = dataclasses.replace(
        logo, data=str(data_dir), loss=dataclasses.replace(logo.loss, loss="sft"),
        position=dataclasses.replace(logo.position, synthesize=False, window=config.real_length,
                                     chunk_size=config.chunk_size, max_chunks=config.context_chunks),
        train=dataclasses.replace(logo.train, steps=steps, lr=instruct.lr, min_lr=instruct.lr / 10,
                                  warmup_steps=max(1, steps // 20), grad_accum_steps=1,
                                  save_every=max(1, steps // 4), log_every=50, seed=seed),
        batches=dataclasses.replace(logo.batches, batch_size=instruct.batch_size, seed=seed,
                                    max_response_tokens=128))
    return with_settings(logo, instruct.overrides, "instruct.overrides")


def comparison_training(config: EvidenceConfig, data_dir: Path, loss: str, seed: int,
                        text_dir: Path | None) -> LogoConfig:
    """One of the compared trainings: `loss` ("logo" or "sft") on the preference rows at positions synthesised over
    the window, everything else the same for both losses; `seed` (added to config.seed) orders rows and positions."""
    logo = LogoConfig()
    text = logo.text
    if config.text_rows:
        text = dataclasses.replace(text, data=str(text_dir), weight=config.text_weight,
                                   batch_size=config.text_batch_size)
    logo = dataclasses.replace(
        logo, data=str(data_dir), text=text,
        loss=dataclasses.replace(logo.loss, loss=loss, beta=config.beta, gamma=config.gamma,
                                 sft_weight=config.sft_weight, num_rejected=config.num_rejected),
        position=dataclasses.replace(logo.position, window=config.window, chunk_size=config.chunk_size,
                                     max_chunks=config.context_chunks),
        train=dataclasses.replace(logo.train, steps=config.steps, lr=config.lr, min_lr=config.lr / 10,
                                  warmup_steps=max(1, config.steps // 10), grad_accum_steps=1,
                                  save_every=max(1, config.steps // 3), log_every=5, seed=config.seed + seed),
        batches=dataclasses.replace(logo.batches, batch_size=config.batch_size, seed=config.seed + seed,
                                    max_response_tokens=128),
        lora=dataclasses.replace(logo.lora, enabled=config.lora))
    return with_settings(logo, config.logo_overrides, "logo_overrides")


def trainings(config: EvidenceConfig) -> list[tuple[str, str, int, str]]:
    """(report label, loss, seed, directory name) of every training: LOGO for each seed, then SFT for each seed.
    Seed 0 trains in `logo/` and `sft/`, the directories of a one-seed run, so adding seeds keeps it."""
    several = len(config.train_seeds) > 1
    return [(f"{label}, seed {seed}" if several else label, loss, seed, loss + (f"-seed{seed}" if seed else ""))
            for loss, label in (("logo", MODELS[1]), ("sft", MODELS[2])) for seed in config.train_seeds]


def gate_config(config: EvidenceConfig):
    """The one gate every model goes through: the probes at every length and depth, and corpus byte perplexity
    allowed to rise at most `max_ppl_rel_increase` over the model before LOGO; evaluated up to the window."""
    from eval.gate import GateConfig, MetricRule
    from eval.taskdata import TaskDataConfig, probe_group

    task_data = TaskDataConfig(corpus=config.corpus, ppl_documents=config.ppl_documents, mc_questions=1,
                               probe_kinds=config.probe_kinds, probe_lengths=config.probe_lengths,
                               probe_depths=config.probe_depths, probe_samples=config.probe_samples, seed=config.seed)
    return GateConfig(
        name="logo-evidence",
        rules=[MetricRule(task="corpus_ppl", metric="byte_perplexity", max_rel_drop=config.max_ppl_rel_increase)],
        tasks=[probe_group(kind) for kind in config.probe_kinds], limit=None, max_length=config.window,
        task_data=task_data, cache_dir=config.cache_dir)


# ---------------------------------------------------------------------------------------------------- data stages


def corpus_texts(config: EvidenceConfig) -> list[str]:
    from pretrain.corpus import load_or_build_corpus

    return list(load_or_build_corpus(config.corpus, config.cache_dir)["train"]["text"])


def mix_instruction_rows(config: EvidenceConfig, tokenizer, question_dir: Path, out: Path) -> Manifest:
    """The instruction rows (the columns training reads) and `instruct.lm_samples` text rows, shuffled together."""
    columns = ("id", "chunks", "question", "answer", "responses", "response_kinds", "response_sources")

    def mix(input_dir: Path, work_dir: Path, _config: dict) -> dict[str, Any]:
        questions = [{c: row[c] for c in columns} for row in load_rows(input_dir)]
        text = continuation_rows(corpus_texts(config), tokenizer, config.instruct.lm_samples,
                                 config.instruct.lm_tokens, seed=f"{config.seed}:instruct-text")
        rows = questions + text
        random.Random(f"{config.seed}:instruct-mix").shuffle(rows)
        save_rows(rows, work_dir, {"question_rows": str(input_dir), "text_rows": len(text),
                                   "lm_tokens": config.instruct.lm_tokens})
        return {"rows": len(rows), "question_rows": len(questions), "text_rows": len(text)}

    stage_config = {"lm_samples": config.instruct.lm_samples, "lm_tokens": config.instruct.lm_tokens,
                    "corpus": to_dict(config.corpus), "seed": config.seed}
    return run_stage(Stage("instruct-mix", mix, stage_config), question_dir, out)


def regulariser_rows(config: EvidenceConfig, tokenizer, out: Path) -> Manifest:
    """The text regulariser's `text_rows` rows, cut at other places than the instruction stage's text rows."""
    def cut(_input, work_dir: Path, _config: dict) -> dict[str, Any]:
        rows = continuation_rows(corpus_texts(config), tokenizer, config.text_rows, config.text_tokens,
                                 seed=f"{config.seed}:regulariser-text")
        save_rows(rows, work_dir, {"text_rows": len(rows), "tokens": config.text_tokens, "split": "train"})
        return {"rows": len(rows)}

    stage_config = {"text_rows": config.text_rows, "text_tokens": config.text_tokens,
                    "corpus": to_dict(config.corpus), "seed": config.seed}
    return run_stage(Stage("regulariser-text", cut, stage_config), None, out)


# ---------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Step:
    """One stage of the experiment: its directory under the run directory, what --stop-after calls it, and the call
    that runs it under the stage contract (a finished stage is skipped there)."""

    name: str
    stop_name: str
    run: Callable[[], Manifest]


def teacher_path(config: EvidenceConfig) -> Path:
    if config.teacher:
        path = Path(config.teacher)
        if not path.is_dir():
            raise UserError(f"teacher checkpoint not found: {path}")
        return path
    from pretrain.teacher import ensure_teacher

    return ensure_teacher()


def plan(config: EvidenceConfig, run_dir: Path, teacher: Path, tokenizer) -> tuple[list[Step], Path, dict[str, Path]]:
    """Every stage with its config built (so a bad setting fails before anything runs), the model before LOGO, and
    the trained models by report label. Each stage reads the directories of the stages before it."""
    steps: list[Step] = []
    before = teacher
    if config.instruct.steps:
        rows = run_dir / "instruct_data"
        steps.append(Step("instruct_data", "instruct_data",
                          functools.partial(build, build_config(config, instruction_data(config), teacher), rows)))
        if config.instruct.lm_samples:
            mixed = run_dir / "instruct_mix"
            steps.append(Step("instruct_mix", "instruct_mix",
                              functools.partial(mix_instruction_rows, config, tokenizer, rows, mixed)))
            rows = mixed
        before = run_dir / "instruct"
        steps.append(Step("instruct", "instruct",
                          functools.partial(run_logo, teacher, before, instruct_training(config, rows))))
    data = run_dir / "data"
    generator = before if config.generated_data else None
    steps.append(Step("data", "data", functools.partial(
        build, build_config(config, preference_data(config), teacher, generator), data)))
    text = None
    if config.text_rows:
        text = run_dir / "text_data"
        steps.append(Step("text_data", "text_data", functools.partial(regulariser_rows, config, tokenizer, text)))
    trained = {}
    for label, loss, seed, name in trainings(config):
        training = comparison_training(config, data, loss, seed, text)
        steps.append(Step(name, loss, functools.partial(run_logo, before, run_dir / name, training)))
        trained[label] = run_dir / name
    return steps, before, trained


def check_run_dir(run_dir: Path, teacher: Path, steps: list[Step]) -> None:
    """The run directory is never the teacher or inside it, and no stage directory is the teacher or holds it."""
    source = teacher.resolve()
    if run_dir.resolve() == source or source in run_dir.resolve().parents:
        raise UserError(f"--out {run_dir} is the teacher {teacher} or lies inside it: the teacher is never written "
                        "to; choose another --out")
    for step in steps:
        stage_dir = (run_dir / step.name).resolve()
        if stage_dir == source or stage_dir in source.parents:
            raise UserError(f"the teacher {teacher} lies in the stage directory {run_dir / step.name}, which this "
                            "run writes; choose another --out")


def run_evidence(config: EvidenceConfig, out_dir: str | Path, stop_after: str | None = None) -> dict[str, Any]:
    """Instruct the teacher (optional), build the data, train LOGO and SFT, evaluate the three models and write
    report.md; returns the report's path and metrics. `stop_after` (one of STAGES) stops once that stage (for
    `logo` and `sft`: the trainings of every seed) is complete, and returns its metrics."""
    from core.checkpoint import load_tokenizer
    from eval.gate import prepare_gate

    if stop_after is not None and stop_after not in STAGES:
        raise UserError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    run_dir = Path(out_dir)
    teacher = teacher_path(config)
    tokenizer = load_tokenizer(teacher)
    steps, before, trained = plan(config, run_dir, teacher, tokenizer)
    gate = gate_config(config)
    names = [step.stop_name for step in steps] + ["report"]
    if stop_after is not None and stop_after not in names:
        raise UserError(f"--stop-after {stop_after} names no stage of this config (its stages: "
                        f"{', '.join(dict.fromkeys(names))}); instruct_* need instruct.steps > 0, instruct_mix also "
                        "instruct.lm_samples > 0, text_data text_rows > 0")
    check_run_dir(run_dir, teacher, steps)
    if config.qa:  # a bad QA file fails before any stage runs, not after the instruction stage (data reads it again)
        from align.qa import read_qa

        read_qa(preference_data(config))
    last = max(i for i, name in enumerate(names) if name == stop_after) if stop_after else len(names) - 1
    # the evaluation's task data first, so a bad probe setting fails before the comparison trains; a run that
    # stops within the instruction stage (e.g. on a GPU machine without the evaluation packages) never evaluates
    prepared = prepare_gate(gate) if stop_after not in INSTRUCTION_STAGES else None
    manifest = None
    for step in steps[:last + 1]:
        manifest = step.run()
    if last < len(steps):
        return {"stopped_after": stop_after, **manifest.metrics}
    stage_dirs = {step.name: run_dir / step.name for step in steps
                  if step.stop_name in ("instruct", "data", "logo", "sft")}  # the report's stage table
    report = evaluate_and_report(config, gate, prepared, teacher, before, trained, stage_dirs, run_dir / "report")
    return {"report": str(run_dir / "report" / "report.md"), **report.metrics}


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.logo_evidence",
        description="Compare the teacher before LOGO, after LOGO and after SFT (same steps) on long-context probes "
                    "beyond the real training length, with short-context perplexity; writes report/report.md.",
        epilog="example: python -m recipes.logo_evidence --config recipes/configs/logo_evidence.yaml "
               "--out runs/logo-evidence\n         python -m recipes.logo_evidence --out runs/ev --set steps=40 "
               "--set samples=128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="run directory (one directory per stage, report/)")
    parser.add_argument("--teacher", default=None, help="checkpoint (default: the cached tiny teacher)")
    parser.add_argument("--config", default=None, help="YAML with EvidenceConfig fields (e.g. "
                        "recipes/configs/logo_evidence.yaml; without it: a few CPU minutes, no instruction stage)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--stop-after", choices=STAGES, default=None,
                        help="stop once this stage is complete (e.g. `instruct` on a GPU machine; rerun without it, "
                             "also on a copy of the run directory, to resume)")
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(EvidenceConfig, args.config, args.set)
    if args.teacher:
        config = dataclasses.replace(config, teacher=args.teacher)
    result = run_evidence(config, args.out, stop_after=args.stop_after)
    if "report" not in result:
        print(f"stopped after {args.stop_after}: {args.out}")
        return
    print(Path(result["report"]).read_text())
    print(f"report: {result['report']}")


if __name__ == "__main__":
    main()
