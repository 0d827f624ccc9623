"""The stage contract: a stage turns an input checkpoint directory into an output one and leaves a manifest.

A stage writes into `<out>.partial` and renames it to `<out>` only when it has finished, so a killed run never
leaves a directory that looks complete. Under a launcher every process runs the stage; the first one alone sets up
and publishes the directory (see `_barrier`). A training stage keeps its periodic checkpoints inside the partial
directory; rerunning with the same config resumes from them, while a changed config starts the stage afresh. A
checkpoint a stage publishes carries a model card written from its manifest (`core.model_card`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from core.config import config_hash, to_dict
from core.errors import UserError
from core.launch import init_process_group, launch
from core.model_card import command_line, count_checkpoint_parameters, write_model_card

MANIFEST = "manifest.json"
PENDING = "pending.json"  # inside a partial directory: the config (hash, identity) the partial work belongs to
MANIFEST_FORMAT = 2
"""Format of manifest.json and pending.json. 1: before identities (a stage is keyed by its raw config hash, at its
own path); 2: `identity`, `parameters`, `command`. Readers branch on this number, in `_key_of` and `upgrade`."""
LIBRARIES = ("torch", "transformers", "datasets", "deepspeed", "lm_eval", "sentencepiece", "tokenizers", "peft")


@dataclasses.dataclass
class Manifest:
    """What a stage did: enough to reproduce it, skip it when nothing changed, and report it."""

    stage: str
    config_hash: str
    config: dict[str, Any]
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    status: str = "complete"
    identity: str = ""
    """Hash of the config with every path to a stage directory replaced by that stage's identity (`stage_identity`):
    equal across copies of a run directory; empty in format-1 manifests."""
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`before` (the input checkpoint) and `after` (the output), counted from the safetensors headers for every
    stage alike; None where a side is not a safetensors model (no input, data outputs)."""
    command: str = ""
    """The command line that ran the stage (the model card shows it)."""
    format: int = 1
    """MANIFEST_FORMAT of the code that wrote it (`read` infers it for manifests written before the number)."""

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "format" not in data:  # written before the number: identity tells
                data["format"] = 2 if data.get("identity") else 1
            return cls(**data)
        except FileNotFoundError:
            raise UserError(f"no {MANIFEST} in {directory}: the stage that writes it has not completed") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise UserError(f"{path} is not a valid manifest: {err}") from None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numerics, read from package metadata (no imports)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def partial_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".partial")


def describe_outputs(directory: Path) -> dict[str, int]:
    """Relative path -> size in bytes of every file a stage wrote (checkpoints of a training run excluded)."""
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, PENDING)
    }


def publish(partial: Path, output_dir: Path) -> None:
    """Swap a finished partial directory into place; an older output (this stage's own, see
    `check_output_location`) is removed only after the swap."""
    old = output_dir.with_name(f"{output_dir.name}.old-{os.getpid()}")  # a name no user folder has
    if old.exists():
        shutil.rmtree(old)
    if output_dir.exists():
        os.replace(output_dir, old)
    os.replace(partial, output_dir)
    if old.exists():
        shutil.rmtree(old)


def is_complete(output_dir: str | Path, config: Any, input_dir: str | Path | None = None) -> bool:
    """True when `output_dir` holds a complete manifest for exactly this config and this input.

    The input check makes a change upstream (a stage rerun with another config) invalidate everything after it. It
    compares the upstream manifest's identity, not its path, and so does the config comparison for paths in the
    config that name stage directories (`stage_identity`), so a run directory can be moved or copied. A config
    field added after the stage ran does not invalidate it when the field keeps its default (new fields default to
    the old behaviour), so a finished training stage is not retrained because its config class grew; that check,
    and manifests written before identities, also ask that every stage the config names finished before this one
    started (`_read_stages_older`).
    """
    return _complete_manifest(Path(output_dir), config, input_dir) is not None


def _complete_manifest(output_dir: Path, config: Any, input_dir: str | Path | None) -> Manifest | None:
    """The manifest that makes the stage complete (`is_complete`), or None."""
    if not (output_dir / MANIFEST).is_file():
        return None
    try:
        manifest = Manifest.read(output_dir)
    except UserError:
        return None
    if manifest.status != "complete":
        return None
    key, stored = _key_of(manifest)
    exact = stored == key(config)
    if not exact and not _same_with_new_defaults(manifest.config, config, key):
        return None
    if (not exact or manifest.format < 2) and not _read_stages_older(config, manifest):
        return None

    def identity(inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k != "dir"}

    return manifest if identity(manifest.inputs) == identity(_describe_input(input_dir)) else None


def _key_of(manifest: Manifest) -> tuple[Callable[[Any], str], str]:
    """How a manifest keys its stage: format 2 by identity (movable run directories), format 1 by raw config hash."""
    if manifest.format >= 2:
        return stage_identity, manifest.identity
    return config_hash, manifest.config_hash


def upgrade(manifest: Manifest, config: Any) -> Manifest:
    """A format-1 manifest that matched at its own path, in today's format: its identity is this config's (the same
    work, so copies of its run directory keep the stage too)."""
    if manifest.format >= MANIFEST_FORMAT:
        return manifest
    return dataclasses.replace(manifest, identity=stage_identity(config), format=MANIFEST_FORMAT)


def _names_a_path(value: str) -> bool:
    """Only strings written as paths name stages: a bare word ("logo", a loss name) is a setting, even where the
    working directory happens to hold a stage of that name."""
    return os.sep in value or (os.altsep is not None and os.altsep in value)


def _config_strings(config: Any) -> list[str]:
    """Every string value in the config (nested dicts and lists), each once, in order."""
    found: dict[str, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            found.setdefault(value)

    walk(to_dict(config) if dataclasses.is_dataclass(config) else config)
    return list(found)


def _stages_named(config: Any) -> dict[str, dict[str, Any]]:
    """Each string in the config that names a stage directory (one with a manifest this code wrote), described."""
    named: dict[str, dict[str, Any]] = {}
    for value in _config_strings(config):
        if _names_a_path(value) and (Path(value) / MANIFEST).is_file():
            try:
                named[value] = _describe_input(value)
            except UserError:  # not a manifest this code wrote: the path itself is the identity
                pass
    return named


FINGERPRINT_WHOLE_FILE = 256 * 2**20
"""Files up to this size are hashed whole for a stage's identity; larger ones by size, head and tail."""


@functools.lru_cache(maxsize=256)
def _content_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (of its size and first and last 8 MiB when it is larger than
    FINGERPRINT_WHOLE_FILE); cached per size and modification time, so a run hashes each file once."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FINGERPRINT_WHOLE_FILE:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(8 * 2**20))
            handle.seek(size - 8 * 2**20)
            digest.update(handle.read())
    return digest.hexdigest()


def _names_a_file(value: str) -> bool:
    """A string written as a file name (a path or a name with a suffix) that is a regular file: a user's data
    (calibration text, a QA or preference JSONL), whose contents are part of the work."""
    if not (_names_a_path(value) or Path(value).suffix) or len(value) > 4096:
        return False
    try:
        return Path(value).is_file()
    except OSError:
        return False


def _saved_dataset_fingerprints(value: str) -> list[str] | None:
    """The `datasets` fingerprints of a folder written by save_to_disk (a Dataset, or each split of a DatasetDict),
    or None for any other folder: they follow the rows' contents (not the folder's path or modification times), so
    a dataset saved again at the same path with other rows is new work, and a copied one is not."""
    path = Path(value)
    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            states = [path / split / "state.json" for split in splits]
        elif (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            states = [path / "state.json"]
        else:
            return None
        return [str(json.loads(state.read_text()).get("_fingerprint")) for state in states]
    except (OSError, ValueError, AttributeError):
        return None


def stage_identity(config: Any) -> str:
    """The config's hash with each string that names a stage directory (one with a manifest) replaced by that
    stage's config hash and finish time, and each string that names a file or a saved dataset joined by its
    contents' hash or fingerprints: the same work wherever the run directory lies, and new work when a stage it
    reads was rerun at the same path or data it reads were changed in place."""
    named = _stages_named(config)

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [resolve(v) for v in value]
        if isinstance(value, str) and value in named:
            return {"stage": named[value].get("manifest_config_hash"),
                    "finished": named[value].get("manifest_finished")}
        if isinstance(value, str) and _names_a_file(value):
            status = os.stat(value)
            return {"file": value, "sha256": _content_fingerprint(str(Path(value).resolve()), status.st_size,
                                                                  status.st_mtime_ns)}
        if isinstance(value, str) and _names_a_path(value) and len(value) <= 4096:
            fingerprints = _saved_dataset_fingerprints(value)
            if fingerprints is not None:
                return {"dataset": value, "fingerprints": fingerprints}
        return value

    return config_hash(resolve(to_dict(config) if dataclasses.is_dataclass(config) else config))


def _same_with_new_defaults(stored: dict[str, Any], config: Any, key: Callable[[Any], str]) -> bool:
    """True when the stored config, read into today's config class (new fields at their defaults), is `config`."""
    if not dataclasses.is_dataclass(config) or not isinstance(stored, dict):
        return False
    from core.config import from_dict

    try:
        return key(from_dict(type(config), stored)) == key(config)
    except UserError:  # a field was removed or changed type: not the same work
        return False


def _read_stages_older(config: Any, manifest: Manifest) -> bool:
    """True when every stage directory the config names finished before this stage started. The new-defaults check
    and manifests from before identities compare the stored config's paths as they resolve today, so on their own
    they would keep a stage whose data were rebuilt at the same path since. Directories named by their content
    (corpus and tokenizer caches: manifests without timings) cannot change under their name and are not asked."""
    started = manifest.timings.get("started")
    if started is None:
        return False
    start = dt.datetime.fromisoformat(started)
    aware = start if start.tzinfo is not None else start.replace(tzinfo=dt.timezone.utc)
    finished = [described.get("manifest_finished") for described in _stages_named(config).values()]
    # a data file the config names (its contents are in the identity, which these paths cannot compare) must not
    # have changed since the stage started either
    modified = [dt.datetime.fromtimestamp(os.stat(path).st_mtime, tz=dt.timezone.utc) for path in _files_named(config)]
    return (all(dt.datetime.fromisoformat(f) <= start for f in finished if f is not None)
            and all(m <= aware for m in modified))


def _inside_a_stage(value: str) -> bool:
    """A path in a stage's output (its folder or one above holds a manifest): that stage's finish time speaks for
    it, and a copied run directory gives its files new modification times."""
    if not _names_a_path(value) or len(value) > 4096:
        return False
    path = Path(value).absolute()
    return any((folder / MANIFEST).is_file() for folder in [path, *path.parents][:6])


def _files_named(config: Any) -> list[str]:
    """Each string in the config that names a regular file (`_names_a_file`), and the state files of each saved
    dataset a string names."""
    found: list[str] = []
    for value in _config_strings(config):
        if _inside_a_stage(value):
            continue
        if _names_a_file(value):
            found.append(value)
        elif _names_a_path(value) and _saved_dataset_fingerprints(value) is not None:
            found.extend(str(p) for p in Path(value).rglob("state.json"))  # rewritten by every save_to_disk
    return found


def _describe_input(input_dir: str | Path | None) -> dict[str, Any]:
    if input_dir is None:
        return {}
    described: dict[str, Any] = {"dir": str(input_dir)}
    if (Path(input_dir) / MANIFEST).is_file():
        upstream = Manifest.read(input_dir)
        described["manifest_config_hash"] = upstream.config_hash
        described["manifest_finished"] = upstream.timings.get("finished")
    return described


StageFn = Callable[[Path | None, Path, Any], dict[str, Any] | None]


@dataclasses.dataclass
class Stage:
    """A named step: `run(input_dir, work_dir, config)` writes its output into `work_dir` and returns metrics.

    `resumable` stages (training) may find their own earlier checkpoints in `work_dir` and continue from them.
    """

    name: str
    run: StageFn
    config: Any
    resumable: bool = False
    input: str | None = None
    """Name of the earlier stage whose output this one reads (a baseline branching off); None: the previous one."""
    prepare: Callable[[Path | None], StageFn] | None = None
    """Loads and validates everything and writes nothing; returns the function that writes the output (used
    instead of `run`). `run_stage` calls it after the --out policy and before the lock or partial directory exist,
    so a bad input fails with nothing written (the stage protocol, core/kind.py)."""


def check_output_location(output_dir: str | Path, stage_name: str, inputs: list[str | Path | None] = ()) -> None:
    """The `--out` policy, checked before anything is written: the output is never an input or inside one (nor a
    folder holding one), never an existing file, and an existing folder is used only when it is empty or holds this
    stage's own output (its manifest names the stage and lists every file in it): the stage never deletes a file it
    did not write. The location must be writable. (The partial directory is checked under the lock: `_own_partial`.)"""
    output = Path(output_dir).absolute()
    resolved = output.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if resolved == source or source in resolved.parents:
            raise UserError(f"the output {output_dir} is the input {item} or lies inside it: the input is never "
                            "written to; choose another --out")
        if resolved in source.parents:
            raise UserError(f"the output {output_dir} holds the input {item}: publishing would replace it; choose "
                            "another --out")
    if output.is_symlink():  # publishing renames a finished folder onto this name, which would replace the link
        raise UserError(f"the output {output_dir} is a symbolic link (to {os.readlink(output)}); give the folder it "
                        "points to, or another --out")
    if output.exists() and not output.is_dir():
        raise UserError(f"the output {output_dir} exists and is not a directory; choose another --out")
    if output.is_dir():
        _check_own_output(output, stage_name)
    existing = output.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output {output_dir}: {existing} is not a writable directory")


def _check_own_output(output: Path, stage_name: str) -> None:
    """An existing output folder is empty, or this stage's published output with nothing added by hand."""
    present = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    if not present:
        return
    if not (output / MANIFEST).is_file():
        raise UserError(f"the output {output} already holds files this stage did not write "
                        f"({', '.join(present[:3])}{', ...' if len(present) > 3 else ''}); choose an empty or new "
                        "directory")
    try:
        manifest = Manifest.read(output)
    except UserError:
        raise UserError(f"the output {output} holds an unreadable {MANIFEST}; choose an empty or new directory") from None
    if manifest.stage != stage_name:
        raise UserError(f"the output {output} holds the output of stage '{manifest.stage}', not '{stage_name}'; "
                        "choose another directory")
    written = set(manifest.outputs) | {MANIFEST}
    foreign = [name for name in present if name not in written]
    if foreign:
        raise UserError(f"the output {output} holds files stage '{stage_name}' did not write "
                        f"({', '.join(foreign[:3])}); move them or choose another directory")


def run_stage(stage: Stage, input_dir: Path | None, output_dir: str | Path, force: bool = False) -> Manifest:
    """Run one stage under the contract: skip if done, resume or restart its partial work, publish atomically.
    `force` reruns a finished stage (its own output only: see `check_output_location`)."""
    output_dir = Path(output_dir)
    if not force and (done := completed(output_dir, stage.config, input_dir)):
        return done
    if input_dir is not None and not Path(input_dir).exists():
        raise UserError(f"stage '{stage.name}' needs {input_dir}, which does not exist")
    check_output_location(output_dir, stage.name, [input_dir])
    if stage.prepare is not None:
        stage = dataclasses.replace(stage, run=stage.prepare(Path(input_dir) if input_dir is not None else None),
                                    prepare=None)
    with _exclusive(output_dir):
        if not force and (done := completed(output_dir, stage.config, input_dir)):  # the process we waited for did it
            return done
        _own_partial(output_dir)
        return _run_unlocked(stage, input_dir, output_dir)


def _own_partial(output_dir: Path) -> None:
    """A `<out>.partial` folder is removed or resumed only when this contract made it (it holds PENDING)."""
    partial = partial_dir(output_dir)
    if partial.exists() and not (partial / PENDING).is_file():
        raise UserError(f"{partial} exists but is not a partial output of this framework (no {PENDING}); move it")


def completed(output_dir: str | Path, config: Any, input_dir: str | Path | None = None) -> Manifest | None:
    """The manifest of a stage that is complete for this config and input (`is_complete`), else None; one of an
    older format is upgraded in place (`upgrade`)."""
    manifest = _complete_manifest(Path(output_dir), config, input_dir)
    if manifest is None:
        return None
    if manifest.format < MANIFEST_FORMAT and launch().rank == 0:
        manifest = upgrade(manifest, config)
        manifest.write(output_dir)
    return manifest


def _pending_matches(pending: Path, digest: str, identity: str) -> bool:
    """Partial work of the same config: its identity (so a copied run directory resumes), or in a format-1 partial
    directory its raw config hash."""
    if not pending.is_file():
        return False
    stored = json.loads(pending.read_text())
    if stored.get("format", 2 if "identity" in stored else 1) >= 2:
        return stored.get("identity") == identity
    return stored.get("config_hash") == digest


def _run_unlocked(stage: Stage, input_dir: Path | None, output_dir: Path) -> Manifest:
    digest, identity = config_hash(stage.config), stage_identity(stage.config)
    partial = partial_dir(output_dir)
    pending = partial / PENDING
    resumes = stage.resumable and _pending_matches(pending, digest, identity)
    main = launch().rank == 0
    _barrier()  # every process has read the partial state before the first one changes it
    if main:
        if partial.exists() and not resumes:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        pending.write_text(json.dumps({"stage": stage.name, "config_hash": digest, "identity": identity,
                                       "format": MANIFEST_FORMAT}))
    _barrier()

    started = time.time()
    parameters_before = count_checkpoint_parameters(input_dir) if main else None
    metrics = stage.run(Path(input_dir) if input_dir is not None else None, partial, stage.config) or {}
    finished = time.time()
    _barrier()  # every process has finished writing into the partial directory
    if not main:
        _barrier()  # until the first process has published it
        return Manifest.read(output_dir)

    manifest = Manifest(
        stage=stage.name,
        config_hash=digest,
        config=to_dict(stage.config) if dataclasses.is_dataclass(stage.config) else dict(stage.config),
        inputs=_describe_input(input_dir),
        metrics=metrics,
        timings={
            "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "finished": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "seconds": round(finished - started, 3),
            "resumed": resumes,
        },
        versions=library_versions(),
        identity=identity,
        format=MANIFEST_FORMAT,
        parameters={"before": parameters_before, "after": count_checkpoint_parameters(partial)},
        command=command_line(),
    )
    pending.unlink()
    write_model_card(partial, manifest, input_dir)
    manifest.outputs = describe_outputs(partial)
    manifest.write(partial)
    publish(partial, output_dir)
    _barrier()
    return manifest


@contextlib.contextmanager
def _exclusive(output_dir: Path):
    """One process at a time per output directory (e.g. two runs building the same evaluation cache): the second
    waits, then finds the stage complete. An flock on `<out>.lock`, removed after use; processes of one launched
    job share their stage instead (see `_barrier`), and systems without fcntl run unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        fcntl = None
    if fcntl is None or launch().distributed:
        yield
        return
    lock = output_dir.with_name(output_dir.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        open(lock, "a").close()
    except OSError as err:
        raise UserError(f"cannot write the output {output_dir}: {err.strerror} ({err.filename})") from None
    told = False
    while True:
        handle = open(lock, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                print(f"waiting for another process running stage output {output_dir} (lock {lock})",
                      file=sys.stderr, flush=True)
                told = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:  # the holder before us may have removed the file we locked: then lock the new one
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def _barrier() -> None:
    """Under a launcher (torchrun, deepspeed, accelerate: WORLD_SIZE > 1) every process runs the stage, and only the
    first one sets up, writes the manifest and publishes; the others meet it here. The process group the trainer
    uses is joined now if it is not yet (`core.launch.init_process_group`). One process: nothing to wait for."""
    if not launch().distributed:
        return
    import torch

    init_process_group()
    torch.distributed.barrier()


def run_stages(
    stages: list[Stage],
    run_dir: str | Path,
    input_dir: str | Path | None = None,
    start: str | None = None,
    stop: str | None = None,
    only: str | None = None,
    on_done: Callable[[Stage, Manifest], None] | None = None,
) -> list[Manifest]:
    """Run stages in order, each reading the previous one's output directory `run_dir/<stage name>`.

    `start`/`stop`/`only` select stages by name; a selected stage whose predecessor has not completed is an error
    before anything runs. Completed stages with unchanged configs are skipped, so a rerun resumes where it stopped.
    """
    run_dir = Path(run_dir)
    names = [s.name for s in stages]
    for name in (start, stop, only):
        if name is not None and name not in names:
            raise UserError(f"no stage named '{name}' (stages: {', '.join(names)})")
    first = names.index(only or start) if (only or start) else 0
    last = names.index(only or stop) if (only or stop) else len(stages) - 1
    if first > last:
        raise UserError(f"stage '{start}' comes after stage '{stop}'")
    for index, stage in enumerate(stages):
        if stage.input is not None and stage.input not in names[:index]:
            raise UserError(f"stage '{stage.name}' reads stage '{stage.input}', which does not come before it")
    previous = Path(input_dir) if input_dir is not None else None
    if first > 0:
        wanted = stages[first].input or names[first - 1]
        if not (run_dir / wanted / MANIFEST).is_file():
            raise UserError(f"cannot start at '{names[first]}': stage '{wanted}' has not completed in {run_dir}")
        previous = run_dir / names[first - 1]
    manifests = []
    for stage in stages[first : last + 1]:
        out = run_dir / stage.name
        manifest = run_stage(stage, run_dir / stage.input if stage.input else previous, out)
        manifests.append(manifest)
        if on_done is not None:
            on_done(stage, manifest)
        previous = out
    return manifests
