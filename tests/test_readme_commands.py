"""README's command table is checked against the commands: every command it shows exists, and every flag it shows
is one that command's --help offers (the flags are generated from the config dataclasses, so a renamed field that
would silently break the README fails here)."""

from __future__ import annotations

import contextlib
import importlib
import io
import re

import pytest

from tests.child_env import ROOT

README = (ROOT / "README.md").read_text()
SECTION = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
ROWS = [line for line in SECTION.splitlines() if line.startswith("| `python -m ")]
SHOWN = [(m.group(1), m.group(2)) for row in ROWS
         for m in re.finditer(r"`python -m ([\w.]+)([^`]*)`", row.split(" | ")[0])]
EXTERNAL = {"eval.lm_eval_cli"}  # lm-eval's own command line, with its own flags


def help_text(module: str) -> str:
    main = importlib.import_module(module).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_the_table_shows_every_stage_command():
    from recipes import kinds  # noqa: F401  (registers every kind)
    from core.kind import KINDS

    shown = {module for module, _ in SHOWN}
    missing = sorted({kind.module for kind in KINDS.values() if kind.module not in shown})
    assert not missing, f"README's command table lacks {missing}"


@pytest.mark.parametrize("module, arguments", SHOWN, ids=[m for m, _ in SHOWN])
def test_every_command_and_flag_the_readme_shows_exists(module, arguments):
    text = help_text(module) if module not in EXTERNAL else ""
    assert module in EXTERNAL or f"python -m {module}" in text
    for flag in re.findall(r"(--[a-z][a-z0-9-]*)", arguments):
        if module in EXTERNAL:
            continue
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{module} --help has no {flag}"
