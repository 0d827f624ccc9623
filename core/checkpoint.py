"""The one checkpoint reader and writer: safetensors only, clear errors, atomic writes.

Every stage and command loads models through `load_model` / `load_tokenizer` and saves through `save_checkpoint`,
so that bad paths, unknown architectures and corrupt files all fail the same way, before any work starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The raw config.json of a checkpoint directory, checked to describe a model transformers knows."""
    import core.openba  # noqa: F401  (registers the OpenBA family with the Auto classes)
    from transformers import CONFIG_MAPPING

    path = Path(path)
    if not path.exists():
        raise UserError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise UserError(f"model path is not a directory: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a model checkpoint: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from None
    from core.openba.convert import raise_if_release

    raise_if_release(path, config)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"unsupported architecture '{model_type}' in {config_file}")
    return config


def check_weights(path: str | Path) -> list[Path]:
    """Open every safetensors file's header so a truncated or corrupt file fails here, with its name."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: convert them to safetensors; pickled weights are not loaded)" if pickled else ""
        raise UserError(f"{path} has no *.safetensors weights{hint}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"corrupt safetensors file {file}: {str(err).splitlines()[0]}") from None
    return files


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu", **kwargs: Any):
    """Load a checkpoint directory with the Auto class that fits it (seq2seq or causal), from safetensors."""
    from huggingface_hub.errors import StrictDataclassClassValidationError  # config validation in transformers 5
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = read_model_config(path)
    check_weights(path)
    auto = AutoModelForSeq2SeqLM if config.get("is_encoder_decoder") else AutoModelForCausalLM
    try:
        # mismatched shapes are let through here only to be reported below by name, with both shapes
        model, info = auto.from_pretrained(str(path), dtype=dtype or "auto", use_safetensors=True,
                                           output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, StrictDataclassClassValidationError) as err:
        raise UserError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None
    check_loading_info(path, info)
    return model.to(device)


def check_loading_info(path: str | Path, info: dict[str, Any]) -> None:
    """Weights that disagree with config.json are an error, never randomly initialised or silently dropped."""
    problems = []
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config implies are missing from the weights "
                        f"({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the weights are not in the model the config describes "
                        f"({', '.join(unexpected[:3])})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    if mismatched:
        shown = ", ".join(f"{item[0]} {list(item[1])} vs config {list(item[2])}" if isinstance(item, (tuple, list))
                          and len(item) == 3 else str(item) for item in mismatched[:3])
        problems.append(f"{len(mismatched)} tensor(s) have another shape than the config implies ({shown})")
    if problems:
        raise UserError(f"the weights in {path} do not match its config.json: {'; '.join(problems)}")


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved beside a checkpoint (or in a tokenizer directory)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer path does not exist or is not a directory: {path}")
    if (path / "config.json").is_file():
        from core.openba.convert import raise_if_release

        try:
            raise_if_release(path, json.loads((path / "config.json").read_text()))
        except json.JSONDecodeError:
            pass  # the model loader reports a broken config; the tokenizer may still load
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"{path} holds no tokenizer (tokenizer.json / tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        if not (path / "tokenizer.json").is_file() and any(path.glob("*.model")) and not _has_protobuf():
            raise UserError(f"cannot load tokenizer from {path}: it has a SentencePiece model and no tokenizer.json, "
                            "and transformers needs the protobuf package to read one: pip install protobuf") from None
        raise UserError(f"cannot load tokenizer from {path}: {str(err).splitlines()[0]}") from None


def _has_protobuf() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no `google` package at all
        return False


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def ship_model_code(directory: str | Path, config) -> None:
    """Make the checkpoint in `directory` load where this project is not installed, for the one family whose code
    transformers lacks: OpenBA gets `auto_map` in config.json and its model code beside the weights
    (`trust_remote_code=True`). Other families need nothing. For writers that save a config and weights without
    the model's `save_pretrained` (which does this itself), such as the release converter."""
    if getattr(config, "model_type", None) != "openba":
        return
    from core.openba.modeling_openba import AUTO_MAP, copy_model_code

    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(str(directory))
    copy_model_code(directory)


def write_checkpoint(model, tokenizer, directory: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write model (safetensors) and tokenizer into an existing directory: a stage's work directory, which the stage
    contract publishes atomically. Anywhere else use `save_checkpoint`.

    What it writes loads anywhere: the transformers families as plain checkpoints, OpenBA with `auto_map` and its
    model code beside the weights (OpenBA's `save_pretrained` adds them, so direct saves are portable too)."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    return directory


def save_checkpoint(model, tokenizer, out_dir: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write model (safetensors) and tokenizer to `out_dir` through a temporary directory and one rename."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_checkpoint(model, tokenizer, tmp, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def count_parameters(model) -> int:
    """Unique parameters (tied tensors counted once)."""
    seen = {}
    for param in model.parameters():
        seen[id(param)] = param.numel()
    return sum(seen.values())
