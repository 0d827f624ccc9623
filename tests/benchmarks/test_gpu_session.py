"""benchmarks/gpu_session.sh, the one command a GPU session runs: its shell parses, every Python command in it
parses its arguments here, and a step that overruns the budget costs the later steps, not the whole run."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.scripts import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "gpu_session.sh"
STEPS = ["pytest_gpu", "scoring_fp32", "mfu_llama", "mfu_openba", "scoring_bf16", "pruned_speedup"]


def dry_run_commands() -> list[list[str]]:
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "DRY_RUN": "1", "OUT": "/out"},
                          capture_output=True, text=True, timeout=30, check=True)
    return [shlex.split(line) for line in done.stdout.splitlines()]


def test_the_script_parses_and_lists_one_command_per_step():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    commands = dry_run_commands()
    assert len(commands) == len(STEPS)
    assert commands[0][1:] == ["-m", "pytest", "-m", "gpu", "-q", "--continue-on-collection-errors"]
    outputs = [arg for command in commands for arg in command if arg.startswith("/out/")]
    assert len(outputs) == len(set(outputs)) == 5  # with session.log and summary.txt: 7 files, the device returns 8


def test_every_benchmark_command_parses_its_arguments_here(monkeypatch, capsys):
    scripts = {}
    for command in dry_run_commands()[1:]:
        script, argv = Path(command[1]), command[2:]
        assert script.parent.name == "benchmarks" and (BENCHMARKS / script.name).is_file()
        scripts.setdefault(script.stem, []).append(argv)
    for argv in scripts.pop("scoring_overhead"):
        args = load_benchmark("scoring_overhead").parse_args(argv)
        assert args.device == "cuda" and args.width == 1024 and args.json.parent == Path("/out")
    for argv in scripts.pop("train_mfu"):
        args = load_benchmark("train_mfu").parse_args(argv)
        assert args.size == "1b" and args.models in ("llama", "openba") and args.steps == 10
    (argv,) = scripts.pop("pruned_speedup")
    pruned = load_benchmark("pruned_speedup")  # its main() parses sys.argv; timing is stubbed out
    seen = []
    monkeypatch.setattr(pruned, "measure", lambda name, build, args: seen.append(args) or [name] + [0] * 8)
    monkeypatch.setattr(pruned.torch.cuda, "get_device_name", lambda device=None: "stub")
    monkeypatch.setattr(sys, "argv", ["pruned_speedup.py", *argv])
    pruned.main()
    assert len(seen) == 2 and seen[0].device == "cuda" and seen[0].bf16 and seen[0].scale == 4
    assert not scripts


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_steps_run_in_order_and_those_past_the_budget_are_skipped(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in *train_mfu*) sleep 3;; esac\necho "ran: $*"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PYTHON": str(fake), "OUT": str(out),
                                                      "BUDGET_S": "25"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = dict(line.split(" ", 1) for line in (out / "summary.txt").read_text().splitlines())
    assert list(summary) == STEPS
    assert all(summary[name].startswith("rc=0 ") for name in STEPS[:4])  # 6 s spent: under 20 s left
    assert summary["scoring_bf16"] == summary["pruned_speedup"] == "rc=skipped (budget spent)"
    log = (out / "session.log").read_text()
    assert "ran: -m pytest -m gpu -q --continue-on-collection-errors" in log and "ran: benchmarks/train_mfu.py --size 1b --models openba" in log
