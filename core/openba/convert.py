"""Convert a checkpoint in the public OpenBA release layout into a project checkpoint.

The public HF port (github.com/OpenNLG/OpenBA, `convert_megatron_to_hf_ckp.py`) writes:
- config.json with Megatron's `ffn_hidden_size` (16384 for 15B; the public model code builds the SwiGLU width
  int(2/3 * w) rounded up to 256 = 11008), `model_type` "openba" ("openbt5" in copies made before the rename), an
  `auto_map` to the public remote code, `tokenizer_class` "OpenBATokenizer" and `initializer_factor`;
- fp16 weights as `torch.save` shards (`pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`, or one
  `pytorch_model.bin`) under the public names: `shared_embedding.weight`, `{encoder,decoder}.block.N.…` (fused
  per-head `self_attn.qkv`, cross `inter_attn.q` / per-head `inter_attn.kv`, `mlp.fc_in` = [gate; up], LayerNorms
  with biases), `{encoder,decoder}.final_layernorm`, `lm_head.weight` and `lm_head.bias`; no per-stack
  `embed_tokens` copies;
- a slow SentencePiece tokenizer (`spiece.model`, 100 extra ids above the pieces) with remote code.

The project's model mirrors those tensor names and fused layouts (see modeling), so the weights need no reshaping:
the conversion states the SwiGLU width in the config, moves the weights to safetensors (the release's pickles are
read here only, with `torch.load(weights_only=True)`), and builds a fast tokenizer (`release_tokenizer.py`).
Memory stays near one output shard: source shards are memory-mapped and output shards written one at a time.

    python -m core.openba.convert --src checkpoints/OpenBA-15B-release --out checkpoints/OpenBA-15B

The command is the stage kind `convert_openba` (input `--src`): `prepare_conversion` reads and checks the release
(config, shard index, every tensor's name, shape and dtype, the tokenizer) and writes nothing; the weights are
streamed into the stage directory by the `write` it returns.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

from core.cli import command
from core.errors import UserError
from core.kind import Input, StageKind, register_kind

RELEASE_INDEX = "pytorch_model.bin.index.json"
RELEASE_SINGLE = "pytorch_model.bin"
RELEASE_MODEL_TYPES = ("openba", "openbt5")
# Fields the public converter writes (its OpenBAConfig's arguments), besides transformers' own config keys
RELEASE_FIELDS = {
    "vocab_size", "hidden_size", "kv_channels", "ffn_hidden_size", "num_layers", "num_decoder_layers",
    "hidden_dropout", "attention_dropout", "num_heads", "is_encoder_decoder", "use_cache", "initializer_factor",
    "pad_token_id", "eos_token_id", "decoder_start_token_id", "add_qkv_bias", "add_ffn_bias", "add_lm_head_bias",
    "max_seq_length", "decoder_max_seq_length",
}
# Copied into the project config unchanged (ffn_hidden_size is converted, the rest are dropped and recorded)
COPIED_FIELDS = (
    "vocab_size", "hidden_size", "kv_channels", "num_layers", "num_decoder_layers", "num_heads", "hidden_dropout",
    "attention_dropout", "add_qkv_bias", "add_ffn_bias", "add_lm_head_bias", "max_seq_length",
    "decoder_max_seq_length", "pad_token_id", "eos_token_id", "decoder_start_token_id", "tie_word_embeddings",
    "use_cache",
)
# The public code hard-codes these; the project config states them
PUBLIC_CODE_CONSTANTS = {"rope_theta": 10000.0, "layernorm_epsilon": 1e-5}
# Present in some copies of the release (a model saved with save_pretrained): the shared embedding again
STACK_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32"}
CONVERT_HINT = "python -m core.openba.convert --src {path} --out CONVERTED_DIR"


def base_config_keys() -> set[str]:
    """Keys transformers writes for any config (so not an OpenBA field), across 4.x and 5.x."""
    from transformers import PreTrainedConfig

    legacy = {"_name_or_path", "transformers_version", "auto_map", "tokenizer_class", "torch_dtype", "dtype",
              "architectures", "model_type", "_commit_hash", "use_return_dict", "tie_word_embeddings"}
    return set(PreTrainedConfig().to_dict()) | legacy


def release_layout_problem(path: str | Path, config: dict[str, Any]) -> str | None:
    """Why `path` is a public OpenBA release rather than a project checkpoint, or None.

    A project OpenBA config always writes `rope_theta` (a field of the project's config class since its first
    version; the public code hard-codes the base); the release's `model_type` may also be the pre-rename "openbt5".
    """
    model_type = config.get("model_type")
    if model_type == "openbt5":
        return "its config.json says model_type 'openbt5' (the public OpenBA code before its rename)"
    if model_type == "openba" and "rope_theta" not in config:
        return ("its config.json is the public release's (ffn_hidden_size is Megatron's width, not the SwiGLU "
                "width the project's model builds)")
    return None


def raise_if_release(path: str | Path, config: dict[str, Any]) -> None:
    """One line that names the converter, for every command pointed at a raw release."""
    reason = release_layout_problem(path, config)
    if reason:
        raise UserError(f"{path} is a public OpenBA release, not a project checkpoint: {reason}; convert it first: "
                        + CONVERT_HINT.format(path=path))


def parse_dtype(text: str) -> str:
    """'bf16', 'bfloat16', 'fp32', ... -> the torch dtype name."""
    if text not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(sorted(set(DTYPES.values())))}, got {text!r}")
    return DTYPES[text]


@dataclasses.dataclass
class ConvertConfig:
    """How a release is converted."""

    dtype: str | None = dataclasses.field(default=None, metadata={"parse": parse_dtype,
                                                                  "metavar": "{float16,bfloat16,float32}"})
    """Cast every tensor to this dtype; default: keep the release's (fp16 for OpenBA-15B)."""
    max_shard_size: str = "5GB"
    """Bytes per safetensors output shard (5GB, 500MB or a number); one file when it all fits."""
    add_mode_tokens: bool = False
    """Add <R>/<S>/<X> (UL2 mode tokens) after the sentinels when the release's SentencePiece model lacks them; their
    embedding and LM-head rows are the mean of the trained rows (the vocabulary's padding rows are used where it has
    them, else it grows, padded to 128)."""
    extra_ids: int = 100
    """Sentinels above the SentencePiece pieces, used when the release has no tokenizer_config.json (whose
    `extra_ids` wins otherwise; the OpenBA release says 100)."""


@dataclasses.dataclass
class Release:
    """A validated release: its config, where each tensor lives, and the tokenizer files."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]  # tensor name -> file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    spiece: bytes
    special_tokens: dict[str, str]
    ffn_width: int
    extra_ids: int


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UserError(f"max_shard_size {text!r} must look like 5GB, 500MB or a number of bytes")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def _check_release_config(path: Path, config: dict[str, Any]) -> None:
    if config.get("model_type") not in RELEASE_MODEL_TYPES:
        raise UserError(f"{path}/config.json says model_type {config.get('model_type')!r}, not an OpenBA release")
    if "rope_theta" in config:
        raise UserError(f"{path} is already a project checkpoint (its config states rope_theta); nothing to convert")
    known = RELEASE_FIELDS | base_config_keys()
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}/config.json has a field the OpenBA release does not have: {key!r}{hint}")
    missing = [k for k in ("vocab_size", "hidden_size", "kv_channels", "ffn_hidden_size", "num_layers", "num_heads")
               if k not in config]
    if missing:
        raise UserError(f"{path}/config.json lacks {', '.join(missing)}")


def _weight_files(path: Path) -> dict[str, str] | None:
    """tensor name -> file from the index; None for a single-file release (read from the file itself)."""
    index = path / RELEASE_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise UserError(f"{path} lacks weight shard(s) {', '.join(missing)} named in {RELEASE_INDEX}")
        return weight_map
    if (path / RELEASE_SINGLE).is_file():
        return None
    raise UserError(f"{path} holds neither {RELEASE_INDEX} nor {RELEASE_SINGLE}: no release weights")


def _load_shard(file: Path) -> dict[str, Any]:
    """A release shard, memory-mapped; `weights_only` refuses anything but tensors (no code runs)."""
    import torch

    try:
        try:
            return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(str(file), map_location="cpu", weights_only=True)  # a pre-zipfile pickle
    except Exception as err:  # torch raises many types for truncated or non-tensor pickles
        raise UserError(f"cannot read release shard {file}: {str(err).splitlines()[0]}") from None


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a project model with `config`, built on the meta device (no memory)."""
    import torch

    from core.openba import OpenBAForConditionalGeneration

    with torch.device("meta"):
        model = OpenBAForConditionalGeneration(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def read_release(path: str | Path, extra_ids: int = 100) -> Release:
    """Validate a release completely (config, every shard against the index, tokenizer) without writing anything."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"release path does not exist or is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a model release")
    config = _read_json(path / "config.json")
    _check_release_config(path, config)
    if not (path / "spiece.model").is_file():
        raise UserError(f"{path} has no spiece.model (the release's SentencePiece tokenizer)")
    special = {}
    if (path / "special_tokens_map.json").is_file():
        raw = _read_json(path / "special_tokens_map.json")
        for name in ("pad_token", "eos_token", "unk_token"):
            value = raw.get(name)
            if value is not None:
                special[name] = value["content"] if isinstance(value, dict) else str(value)
    tokenizer_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    extra_ids = int(tokenizer_config.get("extra_ids", extra_ids))

    weight_map = _weight_files(path)
    files = sorted(set(weight_map.values())) if weight_map is not None else [RELEASE_SINGLE]
    shapes, dtypes, found = {}, {}, {}
    for name in files:
        shard = _load_shard(path / name)
        for key, tensor in shard.items():
            if not hasattr(tensor, "shape"):
                raise UserError(f"release shard {name} holds {key!r}, which is not a tensor")
            shapes[key], dtypes[key], found[key] = tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), name
        del shard
    if weight_map is not None:
        for key, name in weight_map.items():
            if found.get(key) != name:
                where = f"found in {found[key]}" if key in found else "found in no shard"
                raise UserError(f"{RELEASE_INDEX} puts {key} in {name}, but it is {where}")
        extra = sorted(set(found) - set(weight_map))
        if extra:
            raise UserError(f"shard {found[extra[0]]} holds {extra[0]}, which {RELEASE_INDEX} does not list")
    weight_map = found

    fc_in = shapes.get("encoder.block.0.mlp.fc_in.weight")
    if fc_in is None:
        raise UserError(f"{path} has no encoder.block.0.mlp.fc_in.weight: not OpenBA release weights")
    width = fc_in[0] // 2
    from core.openba import megatron_swiglu_width

    if width not in (megatron_swiglu_width(config["ffn_hidden_size"]), config["ffn_hidden_size"]):
        raise UserError(f"config ffn_hidden_size {config['ffn_hidden_size']} gives SwiGLU width "
                        f"{megatron_swiglu_width(config['ffn_hidden_size'])}, but fc_in holds {width} channels")
    return Release(path, config, weight_map, shapes, dtypes, (path / "spiece.model").read_bytes(), special, width,
                   extra_ids)


def project_config(release: Release, dtype: str, vocab_size: int):
    """The project's OpenBAConfig for the release: every field mapped, the SwiGLU width stated."""
    from core.openba import OpenBAConfig

    fields = {k: release.config[k] for k in COPIED_FIELDS if k in release.config}
    fields.update(ffn_hidden_size=release.ffn_width, vocab_size=vocab_size, **PUBLIC_CODE_CONSTANTS)
    config = OpenBAConfig(**fields)
    config.architectures = ["OpenBAForConditionalGeneration"]
    config.dtype = dtype
    return config


def check_tensors(release: Release, expected: dict[str, tuple[int, ...]], rows: int) -> None:
    """Every tensor the project model needs is there with its shape (vocabulary rows before any growth)."""
    shapes = {k: v for k, v in release.shapes.items() if k not in STACK_EMBEDDINGS}
    vocab_rows = {"shared_embedding.weight", "lm_head.weight", "lm_head.bias"}
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise UserError(f"the release lacks {len(missing)} tensor(s) the config implies: {', '.join(missing[:4])}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UserError(f"the release holds {len(unexpected)} tensor(s) its config does not describe: "
                        f"{', '.join(unexpected[:4])}")
    for name, shape in expected.items():
        want = (rows, *shape[1:]) if name in vocab_rows else shape
        if shapes[name] != want:
            raise UserError(f"{name} has shape {list(shapes[name])} but the config implies {list(want)}")
    for name in STACK_EMBEDDINGS:
        if name in release.shapes and release.shapes[name] != shapes["shared_embedding.weight"]:
            raise UserError(f"{name} has shape {list(release.shapes[name])}, not the shared embedding's")


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into output shards in the release's order, each under `max_bytes` where possible."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def _new_rows(tensor, start: int, rows: int, trained: int):
    """`tensor` with rows start.. set to the mean of its first `trained` rows, grown to `rows` rows if needed."""
    if tensor.shape[0] < rows:
        grown = tensor.new_zeros((rows, *tensor.shape[1:]))
        grown[: tensor.shape[0]] = tensor
        tensor = grown
    else:
        tensor = tensor.clone()
    tensor[start:] = tensor[:trained].float().mean(dim=0).to(tensor.dtype)
    return tensor


def write_weights(release: Release, out: Path, dtype: str, max_bytes: int, new_rows: tuple[int, int, int] | None,
                  progress: bool = True) -> dict[str, Any]:
    """Stream the release's tensors into safetensors shards (`model.safetensors` or an index and shards).

    `new_rows` = (first new id, rows after, trained rows) gives added tokens mean-initialised vocabulary rows.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    target = getattr(torch, dtype)
    names = [n for n in release.weight_map if n not in STACK_EMBEDDINGS]
    element = torch.empty((), dtype=target).element_size()
    rows = new_rows[1] if new_rows else None
    vocab_names = {"shared_embedding.weight", "lm_head.weight", "lm_head.bias"}

    def size(name):
        shape = release.shapes[name]
        count = 1
        for dim in ((rows, *shape[1:]) if rows and name in vocab_names else shape):
            count *= dim
        return count * element

    sizes = {name: size(name) for name in names}
    shards = plan_shards(sizes, max_bytes)
    file_names = (["model.safetensors"] if len(shards) == 1 else
                  [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    opened: dict[str, dict] = {}
    weight_map = {}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="convert weights", disable=not progress)
    for file_name, shard in zip(file_names, shards):
        tensors = {}
        for name in shard:
            source = release.weight_map[name]
            if source not in opened:
                opened.clear()  # keep one source shard mapped at a time
                opened[source] = _load_shard(release.path / source)
            tensor = opened[source][name].to(target)
            if new_rows and name in vocab_names:
                tensor = _new_rows(tensor, new_rows[0], new_rows[1], new_rows[2])
            tensors[name] = tensor.contiguous()
            weight_map[name] = file_name
            bar.update(sizes[name])
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"shards": len(shards), "bytes": sum(sizes.values()), "tensors": len(names)}


def prepare_conversion(src: str | Path, config: ConvertConfig) -> tuple[Release, Callable[..., dict[str, Any]]]:
    """Validate everything and return the release and a function that writes the converted checkpoint into a
    directory (`write(out, progress)`)."""
    from core.openba.release_tokenizer import release_tokenizer, save_release_tokenizer

    if config.dtype is not None:
        parse_dtype(config.dtype)
    max_bytes = parse_size(config.max_shard_size)
    release = read_release(src, config.extra_ids)
    source_dtype = release.dtypes["shared_embedding.weight"] if "shared_embedding.weight" in release.dtypes else None
    dtype = DTYPES[config.dtype] if config.dtype else source_dtype
    if dtype not in DTYPES.values():
        raise UserError(f"the release's weights are {source_dtype}; pass --dtype float16, bfloat16 or float32")
    tokenizer, layout = release_tokenizer(release.spiece, release.extra_ids, config.add_mode_tokens,
                                          release.special_tokens)
    rows = release.config["vocab_size"]
    if layout.pieces + layout.extra_ids > rows:
        raise UserError(f"the tokenizer has {layout.pieces + layout.extra_ids} tokens but the model only "
                        f"{rows} vocabulary rows")
    new_rows = None
    vocab_size = rows
    if layout.added_mode_tokens:
        first = layout.pieces + layout.extra_ids
        vocab_size = max(rows, -(-layout.size // 128) * 128)
        new_rows = (first, vocab_size, first)
    model_config = project_config(release, dtype, rows)
    check_tensors(release, expected_shapes(model_config), rows)
    model_config.vocab_size = vocab_size

    def write(out: Path, progress: bool = True) -> dict[str, Any]:
        from core.checkpoint import ship_model_code

        model_config.save_pretrained(str(out))
        ship_model_code(out, model_config)  # auto_map + model code: loads with stock transformers too
        weights = write_weights(release, out, dtype, max_bytes, new_rows, progress)
        save_release_tokenizer(tokenizer, release.spiece, out)
        return {
            "release": {"model_type": release.config["model_type"], "dtype": source_dtype,
                        "ffn_hidden_size": release.config["ffn_hidden_size"], "vocab_size": rows},
            "ffn_hidden_size": {"release (Megatron)": release.config["ffn_hidden_size"], "swiglu_width": release.ffn_width},
            "dtype": dtype,
            "vocab_size": vocab_size,
            "tokenizer": {"pieces": layout.pieces, "extra_ids": layout.extra_ids, "tokens": layout.size,
                          "mode_tokens_in_model": layout.mode_tokens_in_model,
                          "added_mode_tokens": layout.added_mode_tokens,
                          "added_rows": None if new_rows is None else
                          {"ids": [new_rows[0], layout.size - 1], "init": "mean of the trained rows",
                           "vocab_grew": vocab_size > rows}},
            "dropped_fields": sorted(k for k in release.config if k in ("initializer_factor", "auto_map",
                                                                       "tokenizer_class", "transformers_version")),
            "weights": weights,
        }

    return release, write


# ---------------------------------------------------------------------------------------------------- the kind


def summary(manifest) -> str:
    from core.table import format_table

    metrics = manifest.metrics
    rows = [
        ["FFN width", f"{metrics['ffn_hidden_size']['release (Megatron)']} (Megatron)",
         f"{metrics['ffn_hidden_size']['swiglu_width']} (SwiGLU)"],
        ["dtype", metrics["release"]["dtype"], metrics["dtype"]],
        ["vocabulary rows", metrics["release"]["vocab_size"], metrics["vocab_size"]],
        ["weights", "pytorch_model*.bin", f"{metrics['weights']['shards']} safetensors file(s)"],
        ["tokenizer", "spiece.model (remote code)", f"tokenizer.json, {metrics['tokenizer']['tokens']} tokens"],
    ]
    return format_table(rows, ["", "release", "converted"])


def prepare(config: ConvertConfig, inputs: dict[str, Path], progress: bool = True) -> Callable[[Path], dict[str, Any]]:
    """The kind's prepare: every check of `prepare_conversion`; returns `write(work_dir)`."""
    _, write = prepare_conversion(inputs["src"], config)
    return functools.partial(write, progress=progress)


KIND = register_kind(StageKind(
    name="convert_openba",
    stage="convert-openba-release",
    module="core.openba.convert",
    config_cls=ConvertConfig,
    prepare=prepare,
    run=lambda write, work_dir: write(work_dir),
    description="Convert a public OpenBA release (config with Megatron's ffn_hidden_size, pytorch_model*.bin "
                "shards, spiece.model) into a project checkpoint: stated SwiGLU width, safetensors, tokenizer.json; "
                "it then loads with plain from_pretrained and every command of this project.",
    examples=("python -m core.openba.convert --src checkpoints/OpenBA-15B-release --out checkpoints/OpenBA-15B",
              "python -m core.openba.convert --src release --out converted --dtype bfloat16 --add-mode-tokens"),
    inputs=(Input("src", "the release directory (as the public converter wrote it)"),),
    summary=summary,
))
main = command(KIND)


if __name__ == "__main__":
    main()
