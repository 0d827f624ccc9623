"""The same checkpoint gives the same numbers in process and through the lm_eval command line."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.checkpoint import load_model, load_tokenizer
from eval.harness import evaluate, load_results
from tests.child_env import child_env
from tests.eval.conftest import LIMIT

REPO = Path(__file__).resolve().parents[2]
TASKS = ["corpus_ppl", "corpus_mc", "probe_needle", "probe_needle_choices"]  # the last: metric code beside the YAML


def _cli(command: list[str], out: Path) -> None:
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _args(checkpoint: Path, task_set, out: Path) -> list[str]:
    return ["--model", "hf", "--model_args", f"pretrained={checkpoint}", "--include_path", str(task_set.directory),
            "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--batch_size", "4", "--device", "cpu",
            "--output_path", str(out)]


def _assert_same(cli, in_process) -> None:
    assert set(cli.metrics) == set(in_process.metrics)
    for task, metrics in in_process.metrics.items():
        for metric, value in metrics.items():
            assert math.isclose(cli.metrics[task][metric], value, rel_tol=1e-6, abs_tol=1e-9), (task, metric)
    assert cli.fingerprints == in_process.fingerprints


def test_openba_in_process_equals_lm_eval_cli_wrapper(openba_dir, task_set, tmp_path):
    _cli([sys.executable, "-m", "eval.lm_eval_cli", *_args(openba_dir, task_set, tmp_path / "cli")], tmp_path)
    cli = load_results(tmp_path / "cli")
    in_process = evaluate(load_model(openba_dir), load_tokenizer(openba_dir), TASKS, task_set=task_set, limit=LIMIT)
    assert in_process.info["backend"] == "seq2seq"
    _assert_same(cli, in_process)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="the lm_eval executable is not on PATH")
def test_llama_in_process_equals_plain_lm_eval(llama_dir, task_set, tmp_path):
    _cli([shutil.which("lm_eval"), *_args(llama_dir, task_set, tmp_path / "cli")], tmp_path)
    cli = load_results(tmp_path / "cli")
    in_process = evaluate(load_model(llama_dir), load_tokenizer(llama_dir), TASKS, task_set=task_set, limit=LIMIT)
    _assert_same(cli, in_process)
