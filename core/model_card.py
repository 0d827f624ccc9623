"""Model cards: every checkpoint a stage publishes carries a README.md that explains it on a model hub.

The card is written by the stage contract (`core.stage`) from the stage's manifest, once, for every stage kind, so
no command can forget it and none describes itself differently: Hugging Face front matter (`base_model` = the
input checkpoint, `library_name`, tags, the input card's license and language), then what the stage removed or
trained, parameters before and after, the gate's results where the stage ran one, its metrics, and the command
and config that made it. A chain of stages keeps its lineage: each card names its input as `base_model` and lists
the input card's own lineage after it.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

MODEL_CARD = "README.md"
MARK = "<!-- model card written by core.model_card from manifest.json -->"
PROJECT_TAG = "openba-v2"
GATE_MARKDOWN = "gate.md"  # written beside the checkpoint by a recipe stage's gate

# What each stage kind did, as tags; standalone commands name their stages, recipe stages name their kind.
KIND_OF_STAGE = {"layer-prune": "layer_prune", "neuron-prune": "neuron_prune", "vocab": "vocab_prune",
                 "continual": "train", "logo": "align", "teacher": "teacher"}
KIND_TAGS = {
    "layer_prune": ["pruning", "layer-pruning"],
    "neuron_prune": ["pruning", "structured-pruning"],
    "vocab_prune": ["pruning", "vocabulary-pruning"],
    "train": ["continual-pretraining"],
    "align": ["alignment", "logo", "long-context"],
    "teacher": ["pretraining"],
}
INHERITED = ("license", "license_name", "license_link", "language")  # a derivative keeps its base model's terms


# --- reading checkpoints and cards -------------------------------------------------------------------------------
def weight_files(directory: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, else model.safetensors (scores and adapters in
    subdirectories are not the model)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except json.JSONDecodeError:
            return []
        return [directory / name for name in names]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def count_checkpoint_parameters(directory: str | Path | None) -> int | None:
    """Parameters stored in a checkpoint's safetensors files, read from their headers (no tensor is loaded); tied
    weights are saved once, so this is the unique count. None when the directory holds no safetensors model."""
    from safetensors import safe_open

    if directory is None:
        return None
    files = weight_files(directory)
    if not files or not all(f.is_file() for f in files):
        return None
    total = 0
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    count = 1
                    for size in handle.get_slice(name).get_shape():
                        count *= size
                    total += count
    except Exception:  # a corrupt or foreign file: the card says "unknown" rather than failing the stage
        return None
    return total


def read_front_matter(path: str | Path) -> dict[str, Any]:
    """The YAML between a card's opening `---` lines, or {} when it has none (or it does not parse)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def lineage_of(input_dir: str | Path | None) -> list[str]:
    """The input, then the models it came from, as its own card records them (our `lineage`, or a hub card's
    `base_model`, which may be a list)."""
    if input_dir is None:
        return []
    card = read_front_matter(Path(input_dir) / MODEL_CARD)
    earlier = card.get("lineage") or card.get("base_model") or []
    earlier = [earlier] if isinstance(earlier, str) else [str(e) for e in earlier]
    return [str(input_dir), *earlier]


def command_line() -> str:
    """The command that ran the stage: the `main(argv)` call in progress (`core.errors.invoked_command`), else the
    command that started this process, as typed (a launcher's workers name their own command and rank)."""
    from core.launch import launch

    import core.errors

    argv = core.errors.invoked_command or getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    command = shlex.join(argv)
    job = launch()
    if job.distributed:
        command += f"  # one of {job.world_size} processes started by a launcher"
    return command


# --- writing the card ----------------------------------------------------------------------------------------------
def _recipe_stage(manifest) -> bool:
    config = manifest.config if isinstance(manifest.config, dict) else {}
    return isinstance(config.get("kind"), str) and isinstance(config.get("args"), dict)


def stage_kind(manifest) -> tuple[str | None, dict[str, Any]]:
    """(kind, the kind's config) of a standalone command's stage or of a recipe stage (config: kind, args, gate)."""
    if _recipe_stage(manifest):
        return manifest.config["kind"], manifest.config["args"]
    return KIND_OF_STAGE.get(manifest.stage), manifest.config if isinstance(manifest.config, dict) else {}


def write_model_card(directory: str | Path, manifest, input_dir: str | Path | None) -> Path | None:
    """Write `directory/README.md` for the checkpoint a stage wrote there, from its manifest; None when the stage's
    output is not a model (data, reports). A card copied from the input (or an earlier card of ours) is replaced;
    text of the stage's own is kept under the card."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    try:
        model_config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        model_config = {}
    path = directory / MODEL_CARD
    own_text = ""
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        copied = input_dir is not None and (Path(input_dir) / MODEL_CARD).is_file() \
            and (Path(input_dir) / MODEL_CARD).read_text(encoding="utf-8", errors="replace") == text
        if MARK not in text and not copied:
            own_text = text
    path.write_text(card_text(manifest, input_dir, model_config, directory, own_text), encoding="utf-8")
    return path


def front_matter(manifest, input_dir, model_config: dict[str, Any]) -> dict[str, Any]:
    kind, _ = stage_kind(manifest)
    tags = [PROJECT_TAG, *KIND_TAGS.get(kind, [])]
    if model_config.get("model_type"):
        tags.append(str(model_config["model_type"]))
    data: dict[str, Any] = {}
    lineage = lineage_of(input_dir)
    if lineage:
        data["base_model"] = lineage[0]
    data["library_name"] = "transformers"
    data["pipeline_tag"] = "text2text-generation" if model_config.get("is_encoder_decoder") else "text-generation"
    data["tags"] = list(dict.fromkeys(tags))
    inherited = read_front_matter(Path(input_dir) / MODEL_CARD) if input_dir is not None else {}
    data.update({key: inherited[key] for key in INHERITED if key in inherited})
    if len(lineage) > 1:
        data["lineage"] = lineage
    return data


def card_text(manifest, input_dir, model_config: dict[str, Any], directory: Path, own_text: str = "") -> str:
    import yaml

    kind, config = stage_kind(manifest)
    meta = front_matter(manifest, input_dir, model_config)
    parameters = manifest.parameters or {}
    before, after = parameters.get("before"), parameters.get("after")
    source = f"`{input_dir}`" if input_dir is not None else "scratch (no input checkpoint)"
    name = directory.name.removesuffix(".partial")  # the card is written before the stage publishes its directory
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", MARK, "",
             f"# {name}", "",
             f"Made by stage `{manifest.stage}`" + (f" (kind `{kind}`)" if _recipe_stage(manifest) else "")
             + f" of the OpenBA-V2 framework from {source}, finished {manifest.timings.get('finished', '?')}.", ""]
    if meta.get("lineage"):
        lines += ["Lineage (newest first): this model", *(f"- from `{name}`" for name in meta["lineage"]), ""]

    lines += ["## What the stage did", "", *[f"- {line}" for line in describe(kind, config, manifest.metrics)], ""]
    before_cell = _count(before) if input_dir is not None else "none (no input checkpoint)"
    lines += ["## Parameters", "", "| | parameters |", "| --- | --- |", f"| before | {before_cell} |",
              f"| after | {_count(after)} |"]
    if before and after:
        lines.append(f"| kept | {after / before:.1%} |")
    lines.append("")

    gate = directory / GATE_MARKDOWN
    if gate.is_file():
        lines += ["## Gate", "", gate.read_text(encoding="utf-8").rstrip(), ""]
    elif isinstance(manifest.metrics.get("gate"), dict):
        result = manifest.metrics["gate"]
        lines += ["## Gate", "", f"`{result.get('name')}`: {'passed' if result.get('passed') else 'failed'}", ""]

    rows = list(flat_metrics(manifest.metrics))
    if rows:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |",
                  *(f"| {name} | {_cell(value)} |" for name, value in rows), ""]

    remote = "auto_map" in model_config
    auto = "AutoModelForSeq2SeqLM" if model_config.get("is_encoder_decoder") else "AutoModelForCausalLM"
    load_args = ", trust_remote_code=True" if remote else ""
    lines += ["## Use", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
              f'path = "{name}"  # this directory, or the hub id it is published under',
              f"model = {auto}.from_pretrained(path{load_args})",
              f"tokenizer = AutoTokenizer.from_pretrained(path{load_args})", "```", ""]
    if remote:
        lines += ["The model's code ships beside its weights (`auto_map` in config.json), so stock `transformers` "
                  "loads it with `trust_remote_code=True`.", ""]

    lines += ["## How it was made", "", "```bash", manifest.command or "(command not recorded)", "```", "",
              f"Config (hash `{manifest.config_hash}`):", "", "```yaml",
              yaml.safe_dump(manifest.config, sort_keys=False, allow_unicode=True, default_flow_style=None).rstrip(),
              "```", ""]
    versions = ", ".join(f"{name} {version}" for name, version in manifest.versions.items())
    if versions:
        lines += [f"Libraries: {versions}.", ""]
    if own_text.strip():
        lines += ["## Notes written by the stage", "", own_text.strip(), ""]
    return "\n".join(lines)


# --- what each kind did --------------------------------------------------------------------------------------------
def describe(kind: str | None, config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """One line per fact of what the stage removed or trained, from its config and metrics."""
    describers = {"layer_prune": _layer_prune, "neuron_prune": _neuron_prune, "vocab_prune": _vocab_prune,
                  "train": _train, "align": _align, "teacher": _teacher}
    try:
        lines = describers[kind](config, metrics) if kind in describers else []
    except (KeyError, TypeError, ValueError, AttributeError):  # a metric of an older format: say less, not fail
        lines = []
    return [line for line in lines if line] or [f"stage kind `{kind or 'unknown'}`; see the metrics and config below"]


def _layer_prune(config, metrics):
    removed = metrics.get("removed") or {}
    before, after = metrics.get("before", {}).get("blocks", {}), metrics.get("after", {}).get("blocks", {})
    lines = [f"removed {stack} blocks {indices} ({before.get(stack, '?')} -> {after.get(stack, '?')} blocks)"
             for stack, indices in removed.items() if indices]
    lines.append(f"blocks chosen by scorer `{metrics['scorer']}`" if metrics.get("scorer")
                 else "blocks chosen by explicit indices")
    return lines or ["removed no blocks"]


def _neuron_prune(config, metrics):
    def span(values):
        return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"

    lines = []
    for stack, before in metrics.get("widths_before", {}).items():
        after = metrics["widths_after"][stack]
        lines.append(f"{stack}: FFN width {span(before['ffn'])} -> {span(after['ffn'])}, "
                     f"heads {span(before['heads'])} -> {span(after['heads'])}")
    if metrics.get("hidden_before") != metrics.get("hidden_after"):
        lines.append(f"hidden size {metrics['hidden_before']} -> {metrics['hidden_after']}")
    lines.append(f"units chosen by scorer `{metrics.get('scorer')}`"
                 + (f", hidden dimensions by `{metrics['hidden_scorer']}`" if metrics.get("hidden_scorer") else ""))
    return lines


def _vocab_prune(config, metrics):
    padding = f", {metrics['padding_rows']} of them padding" if metrics.get("padding_rows") else ""
    return [f"vocabulary {metrics['tokens_before']} -> {metrics['tokens_after']} tokens "
            f"({metrics['rows_before']} -> {metrics['rows_after']} embedding rows{padding})",
            f"kept tokens cover {metrics['corpus_coverage']:.2%} of the counting corpus ({metrics.get('corpus')})"
            if metrics.get("corpus_coverage") is not None else ""]


def _train(config, metrics):
    objective = config.get("objective")
    steps, tokens = metrics.get("steps"), metrics.get("train_tokens_seen")
    lines = [f"continual pretraining, objective `{objective}`: {steps} steps, {_count(tokens)} tokens"]
    if metrics.get("distilled_from"):
        lines.append(f"distilled from `{metrics['distilled_from']}`")
    if metrics.get("val_loss") is not None:
        lines.append(f"validation loss {metrics['val_loss']:.4f}")
    return lines


def _align(config, metrics):
    logo = config.get("logo", config)
    loss = logo.get("loss") if isinstance(logo, dict) else None
    loss = loss.get("loss") if isinstance(loss, dict) else loss  # LossConfig: its `loss` field names the method
    return [f"preference alignment (LOGO){f', loss `{loss}`' if loss else ''} on {metrics.get('rows', '?')} "
            f"preference rows, {metrics.get('step', metrics.get('steps', '?'))} steps",
            f"trainable parameters {_count(metrics.get('trainable_parameters'))}"
            if metrics.get("trainable_parameters") else ""]


def _teacher(config, metrics):
    return [f"trained from scratch: {metrics.get('steps', metrics.get('step', '?'))} steps"]


# --- formatting ----------------------------------------------------------------------------------------------------
def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar metrics, nested dicts flattened with dots; lists and large structures are left to manifest.json."""
    rows = []
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and len(value) <= 16:
            rows += flat_metrics(value, prefix=f"{key}.")
        elif value is None or isinstance(value, (bool, int, float, str)):
            if not (isinstance(value, str) and len(value) > 120):
                rows.append((key, value))
    return rows


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "unknown"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")
