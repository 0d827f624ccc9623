"""One command-line builder for every stage kind: flags from the config dataclass, one way to merge, one `--out`.

`command(kind)` returns the `main(argv)` of `python -m <kind.module>`. Its flags are made from the kind's inputs
(`--model`, `--teacher`, ...) and from the top-level fields of its config dataclass, with the help text taken from
each field's docstring; nested sections (e.g. `calibration`) are set with `--set calibration.seq_len=128`. Values
are merged one way: the dataclass defaults, then `--config YAML`, then `--set key=value`, then the flags given on the
command line (a flag left out changes nothing). A field may carry `metadata={"parse": fn, "metavar": "..."}` for a
value that is more than YAML (a budget like `3.4B`, `decoder=6,encoder=2`). Every command also takes `--out`
(the stage contract's policy: core/stage.py), `--force`, `--no-progress` and `--score UNIT=SCORER` with
`--score-calib DATA` (importance scores of the output, core/kind.py).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
import types
import typing
from typing import Any

import yaml

from core.errors import UserError, main_guard
from core.kind import ScoreRequest, StageKind, execute

COMMON_FLAGS = ("out", "config", "set", "force", "no_progress", "score", "score_calib", "local_rank")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), for every class in the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_section(hint: Any) -> bool:
    """A nested dataclass (possibly optional): set with --set, not a flag of its own."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(dataclasses.is_dataclass(option) for option in options)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _help(doc: str, default: Any) -> str:
    first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", doc)[0].rstrip(".") if doc else ""
    shown = "" if default is None or default is dataclasses.MISSING or isinstance(default, (dict, list)) else \
        f" (default: {default})"
    return (first + shown).replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, skip: set[str]) -> list[str]:
    """One flag per top-level, non-section field of `config_cls`; returns the field names that got one."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    named = []
    for field in dataclasses.fields(config_cls):
        if not field.init or field.name in skip or _is_section(hints[field.name]):
            continue
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = _help(docs.get(field.name, ""), default)
        parse = field.metadata.get("parse")
        options = typing.get_args(hint)
        if hint is bool or (set(options) == {bool, type(None)}):
            parser.add_argument(_flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(_flag(field.name), dest=field.name, choices=list(options), default=None,
                                help=help_text)
        else:
            plain_str = hint is str or set(options) == {str, type(None)}
            convert = parse or (str if plain_str else _yaml_value)
            parser.add_argument(_flag(field.name), dest=field.name, type=convert, default=None, help=help_text,
                                metavar=field.metadata.get("metavar", field.name.upper()))
        named.append(field.name)
    return named


def build_parser(kind: StageKind) -> tuple[argparse.ArgumentParser, list[str]]:
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in kind.examples) if kind.examples else ""
    sections = [f.name for f in dataclasses.fields(kind.config_cls)
                if _is_section(typing.get_type_hints(kind.config_cls)[f.name])]
    if sections:
        epilog += (("\n\n" if epilog else "") + "nested settings (" + ", ".join(sections) + ") are set with --set, "
                   f"e.g. --set {sections[0]}.FIELD=VALUE; --config reads any field from YAML")
    parser = argparse.ArgumentParser(prog=f"python -m {kind.module}", description=kind.description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for spec in kind.inputs:
        parser.add_argument(_flag(spec.name), dest=spec.name, required=spec.required, help=spec.help)
    parser.add_argument("--out", required=True, help="output directory: new, empty, or this stage's own output "
                        "(written atomically; never the input, never a folder of other files)")
    if kind.flags is not None:
        kind.flags(parser)
    taken = {spec.name for spec in kind.inputs} | set(COMMON_FLAGS) | _custom_dests(parser)
    named = add_config_flags(parser, kind.config_cls, taken)
    parser.add_argument("--config", help=f"YAML file with {kind.config_cls.__name__} fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. calibration.num_samples=32 (after --config)")
    parser.add_argument("--force", action="store_true", help="rerun even if --out holds this stage's finished output")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if kind.writes_checkpoint:
        parser.add_argument("--score", action="append", default=[], metavar="UNIT=SCORER",
                            help="also score the output's layers / heads / channels (saved in OUT/importance)")
        parser.add_argument("--score-calib", help="calibration data for --score")
    # DeepSpeed's launcher passes each process its rank as a flag; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser, named


def _custom_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


def config_from_args(kind: StageKind, args: argparse.Namespace, named: list[str]) -> Any:
    """Defaults, then --config, then --set, then the flags given (a command-line target replaces the YAML's)."""
    from core.config import from_dict, load_config, merge, to_dict

    base = load_config(kind.config_cls, args.config, args.set)
    given = {name: getattr(args, name) for name in named if getattr(args, name) is not None}
    if kind.flag_values is not None:
        given.update({k: v for k, v in kind.flag_values(args).items() if v is not None})
    data = to_dict(base)
    for group in kind.exclusive:
        if any(name in given for name in group):
            for name in group:
                data[name] = None
    return from_dict(kind.config_cls, merge(data, given))


def score_request(args: argparse.Namespace) -> ScoreRequest | None:
    if not getattr(args, "score", None):
        return None
    scorers = {}
    for item in args.score:
        unit, sep, scorer = item.partition("=")
        if not sep or not scorer:
            raise UserError(f"--score {item!r} must look like UNIT=SCORER, e.g. layers=block_influence")
        scorers[unit.strip()] = scorer.strip()
    return ScoreRequest(scorers=scorers, calib=args.score_calib)


def command(kind: StageKind):
    """`main(argv=None)` of the kind's command: parse, validate, execute, print the summary."""

    def main(argv: list[str] | None = None) -> None:
        parser, named = build_parser(kind)
        args = parser.parse_args(argv)
        config = config_from_args(kind, args, named)
        inputs = {spec.name: getattr(args, spec.name) for spec in kind.inputs}
        manifest = execute(kind, config, inputs, args.out, force=args.force, progress=not args.no_progress,
                           score=score_request(args))
        if kind.summary is not None:
            print(kind.summary(manifest))
        print(f"wrote {args.out}")
        failure = kind.verdict(manifest) if kind.verdict is not None else None
        if failure:
            print(f"error: {failure}", file=sys.stderr)
            raise SystemExit(1)

    main.__module__ = kind.module  # the command a main(argv) call stands for (core.errors.invoked_command)
    return main_guard(main)


def tool(config_cls: type, run, module: str, description: str, examples: tuple[str, ...] = (),
         inputs: tuple = ()):
    """`main(argv=None)` of a command that writes no stage output (a planner, a report): the same generated flags,
    `--config` and `--set`, then `run(config, inputs)`, which prints what it found."""
    def main(argv: list[str] | None = None) -> None:
        epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples) if examples else ""
        parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description, epilog=epilog,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        for spec in inputs:
            parser.add_argument(_flag(spec.name), dest=spec.name, required=spec.required, help=spec.help)
        named = add_config_flags(parser, config_cls, {spec.name for spec in inputs} | {"config", "set"})
        parser.add_argument("--config", help=f"YAML file with {config_cls.__name__} fields")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        args = parser.parse_args(argv)
        from core.config import from_dict, load_config, merge, to_dict

        given = {name: getattr(args, name) for name in named if getattr(args, name) is not None}
        config = from_dict(config_cls, merge(to_dict(load_config(config_cls, args.config, args.set)), given))
        run(config, {spec.name: getattr(args, spec.name) for spec in inputs})

    main.__module__ = module
    return main_guard(main)
