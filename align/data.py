"""Preference data from long documents (LOGO, section 3.2): chunks, importance, one shared context, 1 + M responses.

For every sample: take a long document, split it into chunks of at most `chunk_size` tokens (at line ends), score
each chunk's importance for the question (`align.scoring`, against question + answer as the released code does),
call the chunks scoring at least `critical_threshold` critical, and build

    context C'   the top `full_chunks` chunks plus random other chunks, up to `context_chunks`, in document order:
                 the one context every response of the row is scored on
    preferred    from the question and the critical chunks (full = top-6 chunks in the released code)
    rejected 1   from a partial mix (half = top-3 chunks)
    rejected 2   from irrelevant chunks only (wrong = the 3 lowest-scoring chunks)

Responses come from a generator model (`responses: generator`: `generate()` with the released code's sampling,
temperature 0.7, top_p 0.95, 16-512 new tokens, each strategy's chunks as its context) or, for the embedded offline
default, from rules (`responses: rule`), because a tiny model's samples would be noise:

    preferred    the true answer (gold)
    rejected 1   the value of a distractor fact ("partial mix": a confusable fact of another name, which ranks among
                 the top chunks because it shares the question's wording); without distractors a corrupted value
    rejected 2   from the lowest-scoring chunks: a number found in them, or a copied line of one of them
                 (instruction-ignoring text); a random number when they hold neither
    near miss    (on request, `rule_rejected`) the true value with one or two digits changed: what a model that half
                 retrieves writes, a negative it can almost but not quite tell from the gold
    own mistake  (on request) the generator model's own wrong answer with C' at synthesised positions
                 (align/mistakes.py; needs `--generator`), a random number where it answers right

Questions and answers are synthesised: facts "The secret number of the <name> is <number>." (the wording of the
needle probe in eval/probes.py, with names and numbers drawn here, from train-split text only) are inserted at
random depths into documents of the offline corpus (pretrain/corpus.py, `train` split: eval probes read
`validation`), with `distractors` more facts of other names. Every row records its provenance: source document ids,
the chunk indices of C' in the document, the critical chunks, the chunk scores, the facts' chunks, what made each
response, and the generator. With `qa` set, the rows come from a user's long-document QA file instead (align/qa.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import datasets
from tqdm.auto import tqdm

from align.scoring import get_chunk_scorer
from core.errors import UserError
from pretrain.corpus import CorpusConfig

ADJECTIVES = ("ashen", "bold", "coral", "dapper", "ember", "frosty", "golden", "hazel", "ivory", "jade", "khaki",
              "lunar", "misty", "noble", "olive", "plush", "rosy", "sandy", "teal", "umber", "velvet", "windy")
NOUNS = ("alpaca", "bison", "cobra", "dingo", "egret", "ferret", "gibbon", "hyena", "impala", "jaguar", "kiwi",
         "llama", "magpie", "narwhal", "ocelot", "panda", "quokka", "rhino", "salmon", "toucan", "vulture", "yak")
RESPONSE_COLUMNS = ("responses", "response_kinds", "response_sources")
RULE_REJECTED = ("partial", "irrelevant", "near_miss", "own_mistake")
QA_RULE_REJECTED = ("partial", "irrelevant", "own_mistake")
"""The rule kinds that mean something for real QA rows (align/qa.py); near_miss changes digits of a number."""


@dataclasses.dataclass
class GenerationConfig:
    """Sampling for generated responses: the released LOGO code's settings (vLLM server, `gen_hf.py`)."""

    temperature: float = 0.7
    """0 decodes greedily (as in vLLM): the model's own systematic mistakes rather than sampling noise. A model that
    retrieves, sampled at 0.7, often writes the right answer with a token or two changed, and such a dis-preferred
    response teaches it not to copy the rest."""
    top_p: float = 0.95
    min_new_tokens: int = 16
    """The released code asks for 16-512 new tokens; lower it for short factual answers."""
    max_new_tokens: int = 512
    stop_at_newline: bool = True
    """Cut a response at its first newline (the released code stops on "\\n" and EOS)."""
    preferred: Literal["generated", "gold"] = "generated"
    """The paper generates the preferred response from the critical chunks; "gold" keeps the dataset's answer."""


@dataclasses.dataclass
class QAColumns:
    """Which columns of a QA file hold the context, the question and the gold answer."""

    context: str = "context"
    question: str = "question"
    answer: str = "answer"
    """A list of answers (e.g. LongBench's `answers`) counts as its first one."""


@dataclasses.dataclass
class PreferenceDataConfig:
    """How to build a preference dataset. Chunk numbers are LOGO's; the sizes are the offline CPU default."""

    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    """The offline corpus the long documents come from (its `train` split)."""
    samples: int = 256
    """Rows to build (the paper: 12,000, about 0.3B tokens)."""
    chunk_size: int = 512
    """Tokens per chunk (LOGO: 512); training must use the same `position.chunk_size`."""
    document_chunks: int = 24
    """Chunks per long document before selection; more chunks make the irrelevant ones more varied."""
    context_chunks: int = 16
    """Chunks in the shared context C' (LOGO: 16 x 512 = 8K real tokens); at most `position.max_chunks`."""
    full_chunks: int = 6
    """Top chunks the preferred response is made from, all kept in C' (released code: full = top-6)."""
    half_chunks: int = 3
    """Top chunks of the partial mix (released code: half = top-3)."""
    wrong_chunks: int = 3
    """Lowest-scoring chunks the irrelevant response is made from (released code: wrong = last 3)."""
    critical_threshold: float = 3.0
    """A chunk is critical when its score reaches this; rows without a critical chunk are skipped. The released
    code keeps samples whose top chunks share >= 3 entities (min_ne_overlap); the paper states delta = 6 for its
    spaCy entity counts on 512-token chunks of real text."""
    scorer: str = "content_overlap"
    """Chunk importance scorer: a registered name (align/scoring.py) or package.module:function."""
    distractors: int = 3
    """Facts of other names inserted beside the asked one: they make the partial-mix answer confusable."""
    responses: Literal["rule", "generator"] = "rule"
    """"rule": offline responses from the facts (see module docstring); "generator": sample with a model."""
    rule_rejected: list[str] = dataclasses.field(default_factory=lambda: ["partial", "irrelevant"])
    """The dis-preferred rule responses of a row, in order (`responses: rule`): "partial" (rejected 1 above),
    "irrelevant" (rejected 2), "near_miss", "own_mistake" (the generator's wrong answer at synthesised positions).
    Their number is the M a preference loss trains with (`num_rejected`)."""
    mistake_window: int = 65536
    """Positions the `own_mistake` answers are asked at: the window LOGO will train for (`position.window`). Their
    length is capped by `generation.max_new_tokens`: set it to about the answers' length (the released code's 512
    is for long sampled answers)."""
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    question_template: str = "\nQuestion: What is the secret number of the {name}?\nAnswer:"
    """Appended after the context (the eval needle probe's wording, so aligned models answer it)."""
    answer_template: str = " {value}"
    fact_template: str = "The secret number of the {name} is {value}.\n"
    qa: str | None = None
    """Long-document QA to build the rows from instead of synthetic facts in corpus text: a JSONL file (one object a
    line) or a `datasets` folder (save_to_disk) with context, question and answer columns (align/qa.py). The corpus,
    `document_chunks`, `distractors` and the fact and question templates are then unused."""
    qa_split: str = "train"
    """The split read from a saved DatasetDict (a Dataset folder or a JSONL file is one split)."""
    qa_columns: QAColumns = dataclasses.field(default_factory=QAColumns)
    """Column names, e.g. `--set data.qa_columns.context=document --set data.qa_columns.answer=answers`."""
    qa_question_template: str = "\nQuestion: {question}\nAnswer:"
    """How a QA row's question follows its context (the answer follows as `answer_template`)."""
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "chunk_size", "document_chunks", "context_chunks", "full_chunks", "half_chunks",
                     "wrong_chunks"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.full_chunks > self.context_chunks:
            raise UserError(f"full_chunks ({self.full_chunks}) exceeds context_chunks ({self.context_chunks})")
        if self.mistake_window < 1:
            raise UserError(f"mistake_window must be positive, got {self.mistake_window}")
        unknown = [r for r in self.rule_rejected if r not in RULE_REJECTED]
        if unknown or not self.rule_rejected or len(set(self.rule_rejected)) != len(self.rule_rejected):
            raise UserError(f"rule_rejected must list distinct kinds out of {', '.join(RULE_REJECTED)}, "
                            f"got {list(self.rule_rejected)}")
        if self.qa:
            refused = [r for r in self.rule_rejected if r not in QA_RULE_REJECTED]
            if refused and self.responses == "rule":
                raise UserError(f"rule_rejected {', '.join(refused)} cannot be made for QA rows (near_miss changes "
                                f"digits of a synthetic number); QA rows take {', '.join(QA_RULE_REJECTED)}")
            return
        if self.context_chunks > self.document_chunks:
            raise UserError(f"context_chunks ({self.context_chunks}) exceeds document_chunks ({self.document_chunks})")
        if self.distractors < 0:
            raise UserError("distractors must be >= 0")
        if self.distractors + 1 > self.document_chunks:
            raise UserError("each fact needs its own chunk: distractors + 1 must not exceed document_chunks")

    @property
    def needs_generator(self) -> bool:
        """Whether building needs a generator model: sampled responses, or the model's own mistakes."""
        return self.responses == "generator" or self.own_mistakes

    @property
    def own_mistakes(self) -> bool:
        """Whether rows carry the generator's own mistakes (a `rule_rejected` kind)."""
        return self.responses == "rule" and "own_mistake" in self.rule_rejected


# ---------------------------------------------------------------------------------------------------- chunks


def token_counter(tokenizer) -> Callable[[Sequence[str]], list[int]]:
    """Token counts of many texts at once (no special tokens)."""
    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def _split_long_line(line: str, tokens: int, budget: int) -> list[str]:
    parts = tokens // budget + 2
    size = max(1, len(line) // parts)
    return [line[i:i + size] for i in range(0, len(line), size)]


def chunk_text(text: str, budget: int, count: Callable[[Sequence[str]], list[int]], limit: int | None = None) -> list[str]:
    """Cut text at line ends into chunks of at most `budget` tokens (by line counts); stop after `limit` chunks."""
    lines = text.splitlines(keepends=True)
    chunks: list[str] = []
    current, used = [], 0
    pending = list(zip(lines, count(lines)))
    while pending:
        line, tokens = pending.pop(0)
        if tokens > budget:
            pieces = _split_long_line(line, tokens, budget)
            pending[:0] = list(zip(pieces, count(pieces)))
            continue
        if used + tokens > budget and current:
            chunks.append("".join(current))
            current, used = [], 0
            if limit is not None and len(chunks) >= limit:
                return chunks
        current.append(line)
        used += tokens
    if current:
        chunks.append("".join(current))
    return chunks[:limit] if limit is not None else chunks


def fit_chunk(chunk: str, budget: int, count: Callable[[Sequence[str]], list[int]]) -> str:
    """Drop trailing lines until the chunk, tokenized as a whole, fits `budget` (filler text only is lost)."""
    while count([chunk])[0] > budget:
        lines = chunk.splitlines(keepends=True)
        if len(lines) <= 1:
            return chunk[: max(1, len(chunk) * budget // (count([chunk])[0] + 1))]
        chunk = "".join(lines[:-1])
    return chunk


def insert_line(chunk: str, line: str, rng: random.Random) -> str:
    """Insert `line` at a random line boundary of `chunk`."""
    lines = chunk.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    at = rng.randint(0, len(lines))
    return "".join(lines[:at] + [line] + lines[at:])


# ---------------------------------------------------------------------------------------------------- facts


@dataclasses.dataclass
class Fact:
    name: str
    value: str
    chunk: int  # index in the document's chunks


def draw_names(count: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        if name not in names:
            names.append(name)
    return names


def draw_value(rng: random.Random, avoid: set[str] = frozenset()) -> str:
    while True:
        value = str(rng.randrange(100_000, 1_000_000))
        if value not in avoid:
            return value


def corrupt_value(value: str, rng: random.Random) -> str:
    """A near miss: the value with one or two digits changed."""
    digits = list(value)
    for index in rng.sample(range(len(digits)), k=min(2, len(digits))):
        digits[index] = rng.choice([d for d in "0123456789" if d != digits[index]])
    if digits[0] == "0":
        digits[0] = "1"
    return "".join(digits)


# ---------------------------------------------------------------------------------------------------- documents


def long_documents(texts: Sequence[str], doc_ids: Sequence[str], chars: int, rng: random.Random) -> tuple[str, list[str]]:
    """About `chars` characters starting at a random line of a random text, continuing into the next texts."""
    start = rng.randrange(len(texts))
    lines = texts[start].splitlines(keepends=True)
    pieces, used = ["".join(lines[rng.randrange(len(lines)):])] if lines else [], [doc_ids[start]]
    index = start
    while sum(map(len, pieces)) < chars and len(used) <= len(texts):
        index = (index + 1) % len(texts)
        pieces.append(texts[index] if texts[index].endswith("\n") else texts[index] + "\n")
        used.append(doc_ids[index])
    return "".join(pieces), used


# ---------------------------------------------------------------------------------------------------- responses


def numbers_in(text: str) -> list[str]:
    return re.findall(r"\b\d{2,}\b", text)


def rule_responses(config: PreferenceDataConfig, facts: list[Fact], chunks: list[str], ranking: list[int],
                   rng: random.Random, near_miss_rng: random.Random) -> tuple[list[str | None], list[str], list[str]]:
    """The preferred (gold) and the `rule_rejected` responses from the facts; with their kinds and sources. The near
    miss draws from its own generator, so asking for it leaves every other draw of the row as it was; an own mistake
    is left as None here (it needs the row's final context: `build_row` asks the generator)."""
    target, others = facts[0], facts[1:]
    answer = config.answer_template.format(value=target.value)
    half = set(ranking[: config.half_chunks])
    confusable = [f for f in others if f.chunk in half] or others
    if confusable:
        fact = rng.choice(confusable)
        partial, partial_source = fact.value, f"distractor fact in chunk {fact.chunk}"
    else:
        partial, partial_source = corrupt_value(target.value, rng), "corrupted true value"
    wrong = ranking[-config.wrong_chunks:]
    fact_values = {f.value for f in facts}
    found = [(n, c) for c in wrong for n in numbers_in(chunks[c]) if n not in fact_values]
    copied = [(line.strip(), c) for c in wrong for line in chunks[c].splitlines() if len(line.strip()) >= 8]
    choice = rng.random()
    if found and (choice < 0.5 or not copied):
        number, chunk = rng.choice(found)
        irrelevant, irrelevant_kind, irrelevant_source = number, "irrelevant_number", f"number from chunk {chunk}"
    elif copied:
        line, chunk = rng.choice(copied)
        irrelevant, irrelevant_kind, irrelevant_source = line[:80], "ignores_question", f"line copied from chunk {chunk}"
    else:
        irrelevant = draw_value(rng, fact_values)
        irrelevant_kind, irrelevant_source = "hallucinated", "random number"
    rejected = {
        "partial": (config.answer_template.format(value=partial), "partial", partial_source),
        "irrelevant": (irrelevant if irrelevant_kind == "ignores_question"
                       else config.answer_template.format(value=irrelevant), irrelevant_kind, irrelevant_source),
    }
    if "near_miss" in config.rule_rejected:
        rejected["near_miss"] = (config.answer_template.format(value=corrupt_value(target.value, near_miss_rng)),
                                 "near_miss", "true value with one or two digits changed")
    rejected["own_mistake"] = (None, "own_mistake", "")
    chosen = [rejected[kind] for kind in config.rule_rejected]
    responses = [answer, *(response for response, _, _ in chosen)]
    kinds = ["gold", *(kind for _, kind, _ in chosen)]
    sources = ["true value of the asked fact", *(source for _, _, source in chosen)]
    return responses, kinds, sources


def model_name(model) -> str:
    """What a row's `generator` column names: the checkpoint path the model was loaded from, else its class."""
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def generate_response(model, tokenizer, prompt: str, settings: GenerationConfig, seed: int) -> str:
    """One sampled response with the configured settings (decoder-only: the prompt is cut off the output)."""
    import torch

    from core.generation import generate_kwargs

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
            if settings.temperature > 0 else {"do_sample": False}
        output = model.generate(**inputs, **sampling, **generate_kwargs(model), min_new_tokens=settings.min_new_tokens,
                                max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = output[0] if model.config.is_encoder_decoder else output[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if settings.stop_at_newline:
        text = text.split("\n", 1)[0]
    return text


def generated_responses(config: PreferenceDataConfig, question: str, chunks: list[str], ranking: list[int],
                        answer: str, generator, tokenizer, seed: int) -> tuple[list[str], list[str], list[str]]:
    """The released code's three strategies: full (top chunks), half (fewer top chunks), wrong (lowest chunks)."""
    def prompt(indices: Sequence[int]) -> str:
        return "".join(chunks[i] for i in sorted(indices)) + question

    strategies = [("full", ranking[: config.full_chunks]), ("half", ranking[: config.half_chunks]),
                  ("wrong", ranking[-config.wrong_chunks:])]
    responses, kinds, sources = [], [], []
    for offset, (kind, indices) in enumerate(strategies):
        if kind == "full" and config.generation.preferred == "gold":
            responses.append(answer)
            kinds.append("gold")
            sources.append("dataset answer")
            continue
        responses.append(generate_response(generator, tokenizer, prompt(indices), config.generation, seed + offset))
        kinds.append(kind)
        sources.append(f"generated from chunks {sorted(indices)}")
    return responses, kinds, sources


# ---------------------------------------------------------------------------------------------------- rows


def text_budget(config: PreferenceDataConfig, count: Callable[[Sequence[str]], list[int]]) -> int:
    """Tokens of corpus text per chunk: the chunk size less room for one inserted fact (and line merges)."""
    longest = max(count([config.fact_template.format(name=f"{a} {n}", value="123456")
                         for a in ADJECTIVES for n in NOUNS]))
    budget = config.chunk_size - longest - 8
    if budget < 8:
        raise UserError(f"chunk_size {config.chunk_size} leaves no room for text beside a fact ({longest} tokens); "
                        "raise chunk_size")
    return budget


def check_build(config: PreferenceDataConfig, tokenizer) -> None:
    """The checks that need the tokenizer, run before any output is written (a QA file's own checks run when it is
    read: align.qa.read_qa)."""
    if config.qa:
        from align.qa import check_qa_build

        check_qa_build(config, tokenizer)
    else:
        text_budget(config, token_counter(tokenizer))
    get_chunk_scorer(config.scorer)


def build_row(config: PreferenceDataConfig, texts: Sequence[str], doc_ids: Sequence[str], index: int,
              count: Callable[[Sequence[str]], list[int]], scorer, generator=None, tokenizer=None) -> tuple[dict | None, str]:
    """One preference row (or None and the reason it was skipped)."""
    rng = random.Random(f"{config.seed}:logo-row:{index}")
    budget = text_budget(config, count)
    text, used_docs = long_documents(texts, doc_ids, config.document_chunks * budget * 4, rng)
    chunks = chunk_text(text, budget, count, limit=config.document_chunks)
    if len(chunks) < config.document_chunks:
        return None, "document too short"
    names = draw_names(1 + config.distractors, rng)
    values: set[str] = set()
    fact_chunks = rng.sample(range(len(chunks)), k=len(names))
    facts = []
    for name, chunk in zip(names, fact_chunks):
        value = draw_value(rng, values | set(numbers_in(text)))
        values.add(value)
        facts.append(Fact(name, value, chunk))
        chunks[chunk] = insert_line(chunks[chunk], config.fact_template.format(name=name, value=value), rng)
    chunks = [fit_chunk(chunk, config.chunk_size, count) for chunk in chunks]
    if any(config.fact_template.format(name=f.name, value=f.value) not in chunks[f.chunk] for f in facts):
        return None, "a fact did not fit its chunk"

    target = facts[0]
    question = config.question_template.format(name=target.name)
    answer = config.answer_template.format(value=target.value)
    scores = [float(scorer(chunk, question + answer)) for chunk in chunks]
    ranking = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    critical = [i for i in ranking if scores[i] >= config.critical_threshold]
    if not critical:
        return None, "no critical chunk"

    if config.responses == "rule":
        responses, kinds, sources = rule_responses(config, facts, chunks, ranking, rng,
                                                   random.Random(f"{config.seed}:near-miss:{index}"))
        generator_name = "rule"
    else:
        responses, kinds, sources = generated_responses(config, question, chunks, ranking, answer, generator,
                                                        tokenizer, seed=rng.randrange(2**31))
        generator_name = model_name(generator)
    if any(r is not None and r.strip() == responses[0].strip() for r in responses[1:]):
        return None, "a dis-preferred response equals the preferred one"
    if any(r is not None and not r.strip() for r in responses):
        return None, "an empty response"

    top = set(ranking[: config.full_chunks])
    others = [i for i in range(len(chunks)) if i not in top]
    keep = sorted(top | set(rng.sample(others, k=config.context_chunks - len(top))))
    if config.own_mistakes:
        from align.mistakes import own_mistake
        from align.positions import PositionConfig

        slot = 1 + config.rule_rejected.index("own_mistake")
        stand_in = draw_value(random.Random(f"{config.seed}:own-mistake:{index}"), {target.value})
        positions = PositionConfig(window=config.mistake_window, chunk_size=config.chunk_size,
                                   max_chunks=config.context_chunks)
        responses[slot], kinds[slot], sources[slot] = own_mistake(
            generator, tokenizer, [chunks[i] for i in keep], question, target.value, positions,
            config.generation.max_new_tokens, seed=config.seed, index=index,
            fallback=config.answer_template.format(value=stand_in))
        generator_name = f"rule + {model_name(generator)}"
    row = {
        "id": f"logo-{config.seed}-{index}",
        "chunks": [chunks[i] for i in keep],
        "question": question,
        "answer": answer,
        "responses": responses,
        "response_kinds": kinds,
        "response_sources": sources,
        "source_doc_ids": used_docs,
        "chunk_indices": keep,
        "chunk_scores": [scores[i] for i in keep],
        "critical_chunks": [keep.index(i) for i in critical if i in keep],
        "fact_chunks": [keep.index(f.chunk) if f.chunk in keep else -1 for f in facts],
        "generator": generator_name,
    }
    return row, "ok"


def check_generator(config: PreferenceDataConfig, generator) -> None:
    if config.needs_generator and generator is None:
        raise UserError("responses: generator and rule_rejected: own_mistake need a generator model (--generator DIR)")


def collect_rows(build_one: Callable[[int], tuple[dict | None, str]], samples: int, attempts: int,
                 description: str) -> tuple[list[dict], dict[str, int]]:
    """Rows from `build_one(index)` for index 0, 1, ... until `samples` are built or `attempts` were made; returns
    them and how many attempts ended for each reason ("ok" or why a row was skipped)."""
    rows, reasons = [], {}
    progress = tqdm(total=min(samples, attempts), desc=description, unit="row", disable=None)
    for index in range(attempts):
        if len(rows) == samples:
            break
        row, reason = build_one(index)
        reasons[reason] = reasons.get(reason, 0) + 1
        if row is not None:
            rows.append(row)
            progress.update()
    progress.close()
    return rows, reasons


def build_preference_rows(config: PreferenceDataConfig, texts: Sequence[str], doc_ids: Sequence[str], tokenizer,
                          generator=None) -> tuple[list[dict], dict[str, int]]:
    """`config.samples` rows (tries up to 4x as many samples); returns rows and skip counts by reason."""
    if not texts:
        raise UserError("no documents to build preference data from (the corpus split is empty)")
    check_generator(config, generator)
    scorer = get_chunk_scorer(config.scorer)
    count = token_counter(tokenizer)
    rows, reasons = collect_rows(
        lambda index: build_row(config, texts, doc_ids, index, count, scorer, generator, tokenizer),
        config.samples, 4 * config.samples, "preference rows")
    if not rows:
        raise UserError(f"no preference row could be built ({', '.join(f'{k}: {v}' for k, v in reasons.items())}); "
                        "lower critical_threshold or use longer documents")
    return rows, reasons


# ---------------------------------------------------------------------------------------------------- saving


def check_rows(rows: datasets.Dataset | Sequence[dict], num_rejected: int = 1) -> None:
    """UserError for rows a preference loss cannot use: no dis-preferred response, empty texts, missing columns."""
    columns = rows.column_names if isinstance(rows, datasets.Dataset) else (list(rows[0]) if len(rows) else [])
    missing = [c for c in ("chunks", "question", "responses") if c not in columns]
    if missing:
        raise UserError(f"preference data lacks column(s) {', '.join(missing)}; build it with python -m "
                        "align.build_data, or give TRL's prompt, chosen and rejected columns")
    if len(rows) == 0:
        raise UserError("the preference data is empty")
    for row in rows:
        responses = row["responses"]
        if len(responses) < 1 + num_rejected:
            raise UserError(f"row {row.get('id', '?')} has {len(responses) - 1} dis-preferred response(s), "
                            f"{num_rejected} needed (num_rejected); preference rows need 1 + M responses")
        if any(not str(r).strip() for r in responses) or not row["chunks"]:
            raise UserError(f"row {row.get('id', '?')} has an empty response or no context chunks")


def save_rows(rows: list[dict], out_dir: str | Path, provenance: dict[str, Any]) -> datasets.Dataset:
    """save_to_disk plus provenance.json (the config and generation settings every row was built with)."""
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(out_dir))
    Path(out_dir, "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return dataset


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by save_to_disk (a Dataset or a DatasetDict)."""
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_split(path: Path, split: str) -> datasets.Dataset:
    """A save_to_disk folder as one Dataset: itself, or `split` of a DatasetDict (an error names the splits)."""
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path} has no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def load_rows(path: str | Path) -> datasets.Dataset:
    """A preference dataset saved by `build_data` (save_to_disk; a DatasetDict's train split), or a JSONL file /
    directory of JSONL files: LOGO rows, or TRL rows that align/trl_rows.py maps onto them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"preference data not found: {path}")
    if is_saved_dataset(path):
        return load_split(path, "train")
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
    if not files:
        raise UserError(f"{path} holds neither a saved dataset nor *.jsonl files")
    files = [f for f in files if f.stat().st_size > 0]  # datasets' json reader fails on an empty file, wordlessly
    if not files:
        raise UserError(f"{path} holds no preference rows: the JSONL is empty")
    try:
        return datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception as err:  # datasets wraps pyarrow's parse errors; the first line names the problem
        cause = err.__cause__ or err
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"{path} cannot be read as JSON lines of one shape: {reason}") from None
