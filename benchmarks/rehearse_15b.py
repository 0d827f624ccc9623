"""A rehearsal of the 15B recipe on a laptop: `recipes/configs/openba_v2_15b.yaml` run for real on a model with
OpenBA-15B's depth (12 encoder / 36 decoder blocks) and a tiny width, so a mistake in the config shows in minutes,
not hours into a GPU job.

The model is written in the public release layout (Megatron ffn width, fp16 `.bin` shards, spiece.model with 100
extra ids), converted with `python -m core.openba.convert`, planned with `--dry-run`, then the whole recipe runs
as the config's header says, under DeepSpeed's launcher, here with two processes (gloo on a CPU): every training
stage with ZeRO-3, bf16 and gradient checkpointing as configured, every prune with the config's own layer indices
and numbering (`drop_numbering: original`). Only what cannot fit a laptop is scaled with `--set`: the neuron
prune's widths, the vocabulary's keep size, sequence lengths, steps, data (a small stdlib corpus written here) and
the gates (the offline tasks with bounds random weights pass: the rehearsal checks that each gate runs, not what it
measures). At the end every stage's checkpoint is compared with the dry run's plan, and every training step must
have been taken (a finite gradient norm: DeepSpeed skips a step on overflow without failing). Exits non-zero on
the first failure.

    python benchmarks/rehearse_15b.py                       # in a temporary directory, removed afterwards
    python benchmarks/rehearse_15b.py --out runs/rehearsal --keep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "openba_v2_15b.yaml"
PROCESSES = 2

# OpenBA-15B's depth at a tiny width. Like the real model, the attention is wider than the residual stream
# (8 x 10 = 80 vs 64; 15B: 40 x 128 = 5120 vs 4096) and ffn_hidden_size is Megatron's width (192 -> 256 SwiGLU
# channels, as 16384 -> 11008). Vocabulary: 800 pieces + 100 extra ids, padded to a multiple of 128.
PIECES = 800
RELEASE_SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "kv_channels": 10,
    "ffn_hidden_size": 192,
    "num_layers": 12,
    "num_decoder_layers": 36,
    "num_heads": 8,
    "max_seq_length": 1024,
    "decoder_max_seq_length": 256,
}
# S4 in the same proportions: hidden 4096 -> 2560 is 64 -> 40, SwiGLU 11008 -> 6912 is 256 -> 160, heads 40 -> 20
# is 8 -> 4; round_to 128 (a GPU kernel multiple) becomes 8
NEURONS = {"hidden": 40, "ffn_width": 160, "heads": 4, "round_to": 8}
VOCAB_KEEP = 600  # of the 900 ids in use (15B: 110K of 250K), padded to 128 as configured
CORPUS_DOCUMENTS = 120
SEQUENCE = {"input_length": 64, "target_length": 32}  # 15B: 570 / 380
TRAIN = {"steps": 2, "micro_batch_size": 2, "save_every": 1, "eval_every": 2, "log_every": 1}
SAMPLED_TOKENS = 16  # 15B: up to 512 sampled tokens per response; the room beside them stays the config's
LOGO = {
    "data": {"samples": 6, "chunk_size": 64, "context_chunks": 4, "document_chunks": 6, "full_chunks": 3,
             "half_chunks": 2, "wrong_chunks": 2, "distractors": 2,
             "generation": {"min_new_tokens": 1, "max_new_tokens": SAMPLED_TOKENS}},
    "position": {"window": 1024, "chunk_size": 64, "max_chunks": 4},  # 15B: 65536 / 512 / 16
    "batches": {"batch_size": 2},
    "train": {"steps": 2, "grad_accum_steps": 1, "save_every": 1, "log_every": 1, "warmup_steps": 0},
}
# The 15B gates run MMLU, PIQA, ... (downloads). Here every gate runs the offline tasks on a small task set
GATE = {
    "limit": 4,
    "rules": [{"task": "corpus_ppl", "metric": "byte_perplexity", "max_rel_drop": 100.0}],
    "tasks": ["corpus_mc", "probe_needle"],
    "task_data": {"corpus": {"max_documents": CORPUS_DOCUMENTS, "validation_size": 0.2},
                  "ppl_documents": 4, "ppl_chars": 300, "mc_questions": 4, "mc_context_chars": 200,
                  "mc_choice_chars": 60, "probe_kinds": ["needle"], "probe_lengths": [200],
                  "probe_depths": [0.5], "probe_samples": 1},
}


def flatten(prefix: str, value) -> list[str]:
    """`--set` overrides for every leaf of a nested mapping (lists and scalars are leaves)."""
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in flatten(f"{prefix}.{key}", sub)]
    return [f"{prefix}={json.dumps(value)}"]


def recipe_overrides(out: Path, recipe) -> list[str]:
    """What the rehearsal scales, stage by stage; layer indices, numbering and training engines stay the config's."""
    from core.config import from_dict
    from recipes.kinds import recipe_kind

    corpus, gate = out / "data" / "corpus", out / "gate.yaml"
    overrides = [f"model={out / 'converted'}", f"run_dir={out / 'run'}", f"cache_dir={out / 'cache'}",
                 "min_free_disk_gb=0.1"]
    overrides += [f"gates.{name}={gate}" for name in recipe.gates]
    for spec in recipe.stages:
        prefix = f"stages.{spec.name}.args"
        if spec.kind == "layer_prune":
            continue  # dropped by index: nothing to scale
        if spec.kind == "neuron_prune":
            calibration = {"num_samples": 4, "seq_len": 64, "batch_size": 4}
            overrides += flatten(prefix, {**NEURONS, "calib": str(corpus), "calibration": calibration})
        elif spec.kind == "vocab_prune":
            overrides += flatten(prefix, {"keep": VOCAB_KEEP, "corpus": str(corpus), "max_documents": 40,
                                          "check_documents": 10})
        elif spec.kind == "train":
            overrides += flatten(prefix, {**SEQUENCE, "validation_batches": 1, "train": TRAIN})
            overrides.append(f"{prefix}.data.paths={json.dumps([str(corpus)])}")
        elif spec.kind == "align":
            stated = from_dict(recipe_kind("align").kind.config_cls, dict(spec.args))
            room = stated.logo.batches.max_response_tokens - stated.data.generation.max_new_tokens
            logo = {key: value for key, value in LOGO.items() if key != "data"}
            logo["batches"] = {**logo["batches"], "max_response_tokens": SAMPLED_TOKENS + room}
            overrides += flatten(prefix, {"data": LOGO["data"], "logo": logo})
        else:
            raise SystemExit(f"error: the rehearsal cannot scale stage kind '{spec.kind}' ({spec.name}) yet")
    return overrides


def build_inputs(out: Path) -> None:
    """The release (public layout) with its tokenizer trained on the corpus the stages read, and the gate file."""
    import yaml

    from pretrain.corpus import CorpusConfig, build_corpus, save_corpus
    from tests.core.openba_release import train_spiece, write_release

    config = CorpusConfig(max_documents=CORPUS_DOCUMENTS, validation_size=0.2, calibration_size=0.1)
    corpus = build_corpus(config)
    save_corpus(corpus, config, out / "data" / "corpus")
    spiece = train_spiece(list(corpus["train"]["text"]), pieces=PIECES)
    write_release(out / "release", spiece, shape=RELEASE_SHAPE, shards=3)
    (out / "gate.yaml").write_text(yaml.safe_dump(GATE, sort_keys=False))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment(out: Path) -> dict[str, str]:
    """This environment without a surrounding launcher's variables, the repository importable, caches under `out`."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OPENBA_CACHE"] = str(out / "cache")
    env.setdefault("OMP_NUM_THREADS", "1")  # two processes on a laptop's cores, not two times all of them
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class Steps:
    """Runs the rehearsal's commands one by one, output into a log, and times them."""

    def __init__(self, log: Path, env: dict[str, str]):
        self.log, self.env, self.seconds = log, env, {}

    def run(self, name: str, command: list[str]) -> str:
        started = time.perf_counter()
        with open(self.log, "a") as handle:
            handle.write(f"\n$ {' '.join(command)}\n")
        done = subprocess.run(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        with open(self.log, "a") as handle:
            handle.write(done.stdout)
        self.record(name, started)
        if done.returncode != 0:
            print(done.stdout[-6000:], file=sys.stderr)
            raise SystemExit(f"error: the rehearsal failed at '{name}' (exit {done.returncode}; log: {self.log})")
        return done.stdout

    def record(self, name: str, started: float) -> None:
        self.seconds[name] = time.perf_counter() - started
        print(f"{name:<30} {self.seconds[name]:7.1f} s", flush=True)


def rehearse(out: Path) -> dict:
    """Build, convert, plan, run; returns every stage's planned and actual shape and the seconds of each step."""
    from recipes.openba_v2 import load_recipe

    out.mkdir(parents=True)
    steps = Steps(out / "rehearsal.log", child_environment(out))
    started = time.perf_counter()
    build_inputs(out)
    steps.record("release and corpus", started)
    steps.run("convert", [sys.executable, "-m", "core.openba.convert", "--src", str(out / "release"),
                          "--out", str(out / "converted")])

    overrides = recipe_overrides(out, load_recipe(CONFIG, []))
    recipe_args = ["--config", str(CONFIG), *(item for override in overrides for item in ("--set", override))]
    plan_text = steps.run("dry run", [sys.executable, "-m", "recipes.openba_v2", *recipe_args, "--dry-run"])
    print(plan_text, flush=True)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(PROCESSES),
                "--master_port", str(free_port()), "--module", "recipes.openba_v2"]
    steps.run(f"recipe ({PROCESSES} processes)", [*launcher, *recipe_args])

    stages = inspect_stages(load_recipe(CONFIG, overrides))
    summary = {"seconds": steps.seconds, "stages": stages, "overrides": overrides}
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def inspect_stages(recipe) -> list[dict]:
    """Each stage's checkpoint beside the dry run's plan for it; for training stages, the steps they took."""
    from transformers import AutoConfig

    import core.openba  # noqa: F401  (registers OpenBA)
    from core.adapters import adapter_class
    from core.stage import Manifest
    from recipes.plan import plan

    planned = {row["stage"]: row["shape"] for row in plan(recipe)}
    stages = []
    for spec in recipe.stages:
        directory = Path(recipe.run_dir) / spec.name
        config = AutoConfig.from_pretrained(str(directory))
        actual = adapter_class(config.model_type).config_shape(config)
        stage = {"stage": spec.name, "kind": spec.kind, "planned": shape_fields(planned[spec.name]),
                 "actual": shape_fields(actual), "seconds": Manifest.read(directory).timings.get("seconds")}
        train_dir = directory / "train" if (directory / "train" / "metrics.jsonl").is_file() else directory
        if (train_dir / "train_info.json").is_file():
            info = json.loads((train_dir / "train_info.json").read_text())
            norms = [json.loads(line).get("grad_norm") for line in (train_dir / "metrics.jsonl").open()]
            norms = [norm for norm in norms if norm is not None]
            stage["training"] = {"steps": len(norms), "skipped": sum(not math.isfinite(n) for n in norms),
                                 **{key: info.get(key) for key in ("engine", "zero_stage", "world_size", "bf16")}}
        stages.append(stage)
    return stages


def shape_fields(shape) -> dict:
    return {"layers": "/".join(str(d) for d in shape.depths.values()), "hidden": shape.hidden, "ffn": shape.ffn,
            "heads": shape.heads, "vocab": shape.vocab}


def problems(stages: list[dict]) -> list[str]:
    found = []
    for stage in stages:
        if stage["planned"] != stage["actual"]:
            found.append(f"{stage['stage']}: the checkpoint is {stage['actual']}, the dry run planned "
                         f"{stage['planned']}")
        training = stage.get("training")
        if training and (training["skipped"] or not training["steps"]):
            found.append(f"{stage['stage']}: {training['skipped']} of {training['steps']} training steps had no "
                         f"finite gradient norm (skipped)")
    return found


def stage_table(stages: list[dict]) -> str:
    from core.table import format_table

    rows = []
    for stage in stages:
        training = stage.get("training")
        trained = ""
        if training:
            engine = f"ZeRO-{training['zero_stage']}" if training["engine"] == "deepspeed" else training["engine"]
            trained = (f"{training['steps'] - training['skipped']}/{training['steps']} steps, {engine} "
                       f"x{training['world_size']}{', bf16' if training['bf16'] else ''}")
        rows.append([stage["stage"], stage["kind"], *stage["actual"].values(),
                     "yes" if stage["planned"] == stage["actual"] else "NO", trained, stage["seconds"]])
    return format_table(rows, ["stage", "kind", "layers", "hidden", "ffn", "heads", "vocab", "as planned",
                               "trained", "seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="work here (default: a temporary directory); must not exist yet")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards (default: remove it)")
    args = parser.parse_args()

    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="rehearse_15b-")) / "rehearsal"
    if args.out and out.exists():
        raise SystemExit(f"error: --out {out} exists; name a new directory")
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    try:
        result = rehearse(out)
    finally:
        if not args.keep:
            shutil.rmtree(out if args.out else out.parent, ignore_errors=True)
    total = time.perf_counter() - started
    print("\n" + stage_table(result["stages"]) + "\n")
    print(f"rehearsal of {CONFIG.relative_to(ROOT)}: {total:.0f} s on {os.cpu_count()} CPUs"
          + (f"; kept in {out}" if args.keep else ""))
    found = problems(result["stages"])
    if found:
        raise SystemExit("error: " + "\nerror: ".join(found))


if __name__ == "__main__":
    main()
