"""The embedded default run as a benchmark: `python -m recipes.openba_v2` end to end, timed per stage.

Issue 7's budget: the whole pipeline, teacher training included, in at most 20 minutes on a fresh 2-core CPU
machine. Pass `--cold` to train the teacher into an empty cache (what a fresh machine does); without it, a cached
teacher is reused and the table shows the teacher's own recorded training time beside the run's time.

    python benchmarks/recipe_default.py --cold
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_SECONDS = 20 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", action="store_true", help="empty teacher/corpus cache (a fresh machine)")
    parser.add_argument("--run-dir", help="keep the run here (default: a temporary directory)")
    args = parser.parse_args()

    from core.stage import Manifest
    from recipes.openba_v2 import load_recipe
    from recipes.report import stage_table

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run_dir or Path(scratch) / "run")
        command = [sys.executable, "-m", "recipes.openba_v2", "--set", f"run_dir={run_dir}"]
        if args.cold:
            command += ["--set", f"cache_dir={Path(scratch) / 'cache'}"]
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        recipe = load_recipe(None, [f"run_dir={run_dir}"])
        print(stage_table(recipe, run_dir, markdown=False))
        if done.returncode != 0:
            print(done.stderr[-2000:])
        teacher = Manifest.read(run_dir / "teacher").metrics if (run_dir / "teacher" / "manifest.json").is_file() else {}
        cold = seconds if args.cold else seconds + float(teacher.get("train_seconds") or 0)
        print(f"\nrun: {seconds:.0f} s ({'cold cache' if args.cold else 'teacher cached'}); "
              f"estimated cold run {cold:.0f} s = {cold / BUDGET_SECONDS:.2f} x the 20-minute budget; "
              f"exit status {done.returncode}")


if __name__ == "__main__":
    main()
