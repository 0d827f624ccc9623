"""The one config loader: dataclasses filled from YAML, then from `key.sub=value` command-line overrides.

Strict on purpose: an unknown key or a wrongly typed value is an error that names the key (and the nearest valid
spelling), because a silently ignored typo in a training config costs a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import UserError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `overrides` like `trainer.lr=3e-4`."""
    data = read_yaml(path) if path is not None else {}
    for override in overrides:
        merge(data, parse_override(override))
    return from_dict(cls, data)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML keeps the last one, so a
    repeated key silently drops the setting the user wrote first. Keys merged in with `<<: *anchor` may be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (first on line {seen[key].line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (an empty file is an empty mapping); every problem is one UserError line
    with the file's line and column."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "'\\t'" in problem:  # PyYAML's words for a tab in the indentation
            problem += "; YAML indents with spaces, not tabs"
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping (key: value lines) at the top level, "
                        f"not a {type(loaded).__name__}")
    return loaded


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML (so 3e-4, true, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict[str, Any] = {}
    root = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into `base` in place (mappings merge, anything else replaces)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Check every key and type in `data` against dataclass `cls` and build it."""
    if not isinstance(data, dict):
        raise UserError(f"config {prefix.rstrip('.') or 'root'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"config {prefix.rstrip('.') or cls.__name__} needs key '{prefix}{missing[0]}'")
    kwargs = {}
    for key, value in data.items():
        default = _default_of(fields[key])
        if value is None and not _admits_none(hints[key]) and \
                (isinstance(default, (list, tuple, dict)) or dataclasses.is_dataclass(default)):
            continue  # `args:` or `tasks:` left empty in YAML: a section or list with nothing in it keeps its default
        parse = fields[key].metadata.get("parse")
        if parse is not None and isinstance(value, str):
            try:  # the flag's own reading (e.g. "3.4B" parameters) holds in a YAML file too
                value = parse(value)
            except UserError as err:
                raise UserError(f"config key '{prefix}{key}': {err}") from None
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # a partial override keeps the parent's own defaults for this section, not the section class's defaults
            value = merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"config {prefix.rstrip('.') or cls.__name__}: {err}") from None


def _admits_none(hint: Any) -> bool:
    return hint is Any or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and type(None) in typing.get_args(hint))


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple, typing.Sequence) or hint in (list, tuple)


def _home(value: str) -> str:
    """`~/data` is the user's home in a config as on a shell command line (where the shell expands it, a YAML
    file or `--flag=~/x` would not): a directory literally named `~` is never what was meant."""
    return os.path.expanduser(value) if value.startswith("~" + os.sep) else value


def _default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []  # lists last: a scalar is read as a one-item list only where no option takes it as it is
        for option in sorted((a for a in args if a is not type(None)), key=_is_list):
            try:
                return _coerce(option, value, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"config key '{key}' cannot be null")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, prefix=f"{key}.")
    if _is_list(hint):
        if isinstance(value, (str, int, float, bool)):
            value = [value]  # `paths: data.jsonl` is the one-item list `paths: [data.jsonl]`
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        val_hint = args[1] if len(args) == 2 else Any
        return {k: _coerce(val_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, str):  # YAML 1.1 reads 1e9 and 10.0e9 (no exponent sign) as strings
            try:
                value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config key '{key}' must be a string, got {value!r}")
        return _home(str(value))
    if hint is Path:
        return Path(_home(str(value)))
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-ready dict of a dataclass config (Paths become strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_hash(config: Any) -> str:
    """Stable short hash of a config, used to decide whether a finished stage can be reused."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
