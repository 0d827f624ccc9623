"""Stages publish atomically, skip when done, resume training work, and a killed stage leaves no output."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.stage import MANIFEST, Manifest, Stage, partial_dir, run_stage, run_stages


@dataclasses.dataclass
class Cfg:
    value: int = 1


def write_value(input_dir, work_dir, cfg):
    (work_dir / "value.txt").write_text(str(cfg.value))
    return {"value": cfg.value}


def test_manifest_is_complete_and_output_published(tmp_path):
    manifest = run_stage(Stage("a", write_value, Cfg(3)), None, tmp_path / "a")
    assert (tmp_path / "a" / "value.txt").read_text() == "3"
    assert not partial_dir(tmp_path / "a").exists()
    stored = Manifest.read(tmp_path / "a")
    assert stored == manifest
    assert stored.metrics == {"value": 3}
    assert stored.outputs == {"value.txt": 1}
    assert {"python", "torch", "transformers"} <= set(stored.versions)
    assert stored.timings["seconds"] >= 0


def test_completed_stage_is_skipped_and_config_change_reruns(tmp_path):
    calls = []

    def counted(i, w, c):
        calls.append(c.value)
        return write_value(i, w, c)

    run_stage(Stage("a", counted, Cfg(1)), None, tmp_path / "a")
    run_stage(Stage("a", counted, Cfg(1)), None, tmp_path / "a")
    assert calls == [1]
    run_stage(Stage("a", counted, Cfg(2)), None, tmp_path / "a")
    assert calls == [1, 2]
    assert (tmp_path / "a" / "value.txt").read_text() == "2"


@dataclasses.dataclass
class GrownCfg:
    """Cfg after a release added a field whose default keeps the old behaviour."""

    value: int = 1
    extra: float = 0.0


def test_field_added_later_at_its_default_keeps_a_finished_stage(tmp_path):
    calls = []

    def counted(i, w, c):
        calls.append(c)
        return write_value(i, w, c)

    run_stage(Stage("a", counted, Cfg(4)), None, tmp_path / "a")
    run_stage(Stage("a", counted, GrownCfg(4)), None, tmp_path / "a")
    assert len(calls) == 1  # same work: the new field sits at its default
    run_stage(Stage("a", counted, GrownCfg(4, extra=0.5)), None, tmp_path / "a")
    assert len(calls) == 2 and calls[1].extra == 0.5  # the new field set: rerun
    run_stage(Stage("a", counted, Cfg(4)), None, tmp_path / "a")
    assert len(calls) == 3  # the stored config has a field Cfg lacks: not the same work


def test_upstream_change_invalidates_downstream(tmp_path):
    calls = []

    def second(i, w, c):
        calls.append((i / "value.txt").read_text())
        (w / "seen.txt").write_text(calls[-1])

    run_stages([Stage("a", write_value, Cfg(1)), Stage("b", second, Cfg())], tmp_path)
    run_stages([Stage("a", write_value, Cfg(1)), Stage("b", second, Cfg())], tmp_path)
    run_stages([Stage("a", write_value, Cfg(5)), Stage("b", second, Cfg())], tmp_path)
    assert calls == ["1", "5"]


def test_failed_stage_leaves_previous_output_and_no_new_one(tmp_path):
    def boom(i, w, c):
        (w / "half.bin").write_text("x")
        raise RuntimeError("gate failed")

    stages = [Stage("a", write_value, Cfg()), Stage("b", boom, Cfg())]
    with pytest.raises(RuntimeError):
        run_stages(stages, tmp_path)
    assert (tmp_path / "a" / MANIFEST).is_file()
    assert not (tmp_path / "b").exists()


def training_killed_once(seen: list[int]):
    """A 4-step training that checkpoints every step and is killed after two steps on its first run; `seen` gets
    the step each run started from."""
    def train(_input, work_dir, _cfg):
        ckpt = work_dir / "step.txt"
        start = int(ckpt.read_text()) if ckpt.exists() else 0
        seen.append(start)
        for step in range(start, 4):
            ckpt.write_text(str(step + 1))
            if step == 1 and len(seen) == 1:
                raise KeyboardInterrupt  # killed after two steps
        return {"steps": 4}

    return train


def test_resumable_stage_continues_from_its_partial_work(tmp_path):
    seen = []
    stage = Stage("train", training_killed_once(seen), Cfg(), resumable=True)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, None, tmp_path / "train")
    assert not (tmp_path / "train").exists()
    manifest = run_stage(stage, None, tmp_path / "train")
    assert seen == [0, 2]
    assert manifest.timings["resumed"] is True


def test_selection_errors_before_running(tmp_path):
    stages = [Stage("a", write_value, Cfg()), Stage("b", write_value, Cfg())]
    with pytest.raises(UserError, match="no stage named 'c'"):
        run_stages(stages, tmp_path, only="c")
    with pytest.raises(UserError, match="stage 'a' has not completed"):
        run_stages(stages, tmp_path, start="b")
    run_stages(stages, tmp_path, only="a")
    assert [m.stage for m in run_stages(stages, tmp_path, start="b")] == ["b"]


SLOW_STAGE = textwrap.dedent(
    """
    import dataclasses, sys, time
    from pathlib import Path
    from core.stage import Stage, run_stage

    @dataclasses.dataclass
    class Cfg:
        value: int = 1

    def slow(i, w, c):
        for n in range(1000):
            (w / f"shard{n}.bin").write_bytes(b"0" * 1000)
            if n == 3:
                (w / "started").write_text("yes")
            time.sleep(0.01)

    run_stage(Stage("slow", slow, Cfg()), None, Path(sys.argv[1]))
    """
)


def test_killed_process_leaves_no_output_and_reruns_cleanly(tmp_path):
    out = tmp_path / "slow"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STAGE)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    deadline = time.time() + 60
    while not (partial_dir(out) / "started").exists():
        assert time.time() < deadline and proc.poll() is None, "stage did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert partial_dir(out).exists()
    run_stage(Stage("quick", write_value, Cfg(7)), None, out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "value.txt"]
    assert json.loads((out / MANIFEST).read_text())["stage"] == "quick"
    assert not partial_dir(out).exists()


def test_a_stage_can_read_an_earlier_stage_than_the_previous_one(tmp_path):
    seen = []

    def record(i, w, c):
        seen.append(i.name if i else None)
        (w / "value.txt").write_text(str(c.value))

    stages = [Stage("a", record, Cfg(1)), Stage("b", record, Cfg(2)), Stage("base", record, Cfg(3), input="a")]
    run_stages(stages, tmp_path)
    assert seen == [None, "a", "a"]
    with pytest.raises(UserError, match="reads stage 'z'"):
        run_stages([Stage("a", record, Cfg(1)), Stage("b", record, Cfg(2), input="z")], tmp_path)


def test_two_processes_running_the_same_stage_build_it_once(tmp_path):
    """Two independent runs that need the same output (e.g. an evaluation cache) at once: one builds, the other
    waits for it and reuses the result; no lock file stays behind."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from core.stage import Stage, run_stage

        def build(_input, work_dir, _config):
            with open({str(tmp_path / "calls.txt")!r}, "a") as calls:
                calls.write("built\\n")
            time.sleep(1.5)
            (work_dir / "value.txt").write_text("7")
            return {{"value": 7}}

        manifest = run_stage(Stage("cache", build, {{"value": 7}}), None, Path({str(tmp_path / "cache")!r}))
        print(manifest.timings["started"])
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert (tmp_path / "calls.txt").read_text() == "built\n"
    assert outputs[0][0] == outputs[1][0]  # the same manifest
    assert (tmp_path / "cache" / "value.txt").read_text() == "7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "calls.txt"]


@dataclasses.dataclass
class ReadsCfg:
    data: str = ""
    scale: int = 1
    loss: str = ""


def test_a_copied_run_directory_keeps_stages_whose_configs_name_its_other_stages(tmp_path):
    """A stage's config names another stage's directory (training data): a copy of the run at another path keeps
    the stage, while rebuilding that other stage at the same path reruns it."""
    import shutil

    calls = []

    def train(_input, work_dir, cfg):
        calls.append(cfg.data)
        (work_dir / "trained.txt").write_text(Path(cfg.data, "value.txt").read_text())
        return {}

    def run(root, value=1):
        run_stage(Stage("data", write_value, Cfg(value)), None, root / "data")
        return run_stage(Stage("train", train, ReadsCfg(data=str(root / "data"))), None, root / "train")

    first = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert run(tmp_path / "b").timings == first.timings and len(calls) == 1  # same work at another path
    run(tmp_path / "b", value=2)  # the data stage rebuilt with another config: the training reads new data
    assert len(calls) == 2 and (tmp_path / "b" / "train" / "trained.txt").read_text() == "2"


@dataclasses.dataclass
class GrownReadsCfg(ReadsCfg):
    """ReadsCfg after a release added a field whose default keeps the old behaviour."""

    extra: float = 0.0


def test_a_grown_config_class_still_sees_an_upstream_stage_rebuilt_at_the_same_path(tmp_path):
    """A training stage that ran before its config class grew a field is kept while its data is the same (also in a
    copy of the run), and rerun once the data stage is rebuilt with another config at the same path."""
    import shutil

    calls = []

    def train(_input, work_dir, cfg):
        calls.append(cfg)
        (work_dir / "trained.txt").write_text(Path(cfg.data, "value.txt").read_text())
        return {}

    def run(root, cfg_class, value=1):
        run_stage(Stage("data", write_value, Cfg(value)), None, root / "data")
        return run_stage(Stage("train", train, cfg_class(data=str(root / "data"))), None, root / "train")

    run(tmp_path / "a", ReadsCfg)
    run(tmp_path / "a", GrownReadsCfg)
    assert len(calls) == 1  # the new field at its default: same work
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run(tmp_path / "b", GrownReadsCfg)
    assert len(calls) == 1  # and in a copy
    run(tmp_path / "a", GrownReadsCfg, value=2)
    assert len(calls) == 2 and (tmp_path / "a" / "train" / "trained.txt").read_text() == "2"


def test_content_named_caches_and_bare_words_do_not_make_a_grown_config_rerun(tmp_path, monkeypatch):
    """A config naming a corpus cache (a manifest without timings, written after the stage may have started) keeps
    the stage when its class grows; a bare word that matches a stage directory in the working directory is a
    setting, not that stage."""
    calls = []

    def train(_input, work_dir, cfg):
        calls.append(cfg)
        return {}

    corpus = tmp_path / "cache" / "corpus-abc"
    corpus.mkdir(parents=True)
    Manifest(stage="corpus", config_hash="abc", config={}).write(corpus)
    monkeypatch.chdir(tmp_path)
    run_stage(Stage("own", write_value, Cfg(1)), None, tmp_path / "own")  # a stage named like a setting
    run_stage(Stage("train", train, ReadsCfg(data=str(corpus), loss="own")), None, tmp_path / "train")
    Manifest(stage="corpus", config_hash="abc", config={}).write(corpus)  # rewritten later: no timings
    run_stage(Stage("own", write_value, Cfg(2)), None, tmp_path / "own")  # the stage "own" rebuilt later
    run_stage(Stage("train", train, GrownReadsCfg(data=str(corpus), loss="own")), None, tmp_path / "train")
    assert len(calls) == 1


def test_a_manifest_from_before_identities_gains_one_so_its_copies_resume(tmp_path):
    import shutil

    calls = []

    def train(_input, work_dir, cfg):
        calls.append(cfg.data)
        (work_dir / "trained.txt").write_text("x")
        return {}

    def run(root):
        run_stage(Stage("data", write_value, Cfg()), None, root / "data")
        return run_stage(Stage("train", train, ReadsCfg(data=str(root / "data"))), None, root / "train")

    run(tmp_path / "a")
    for name in ("data", "train"):  # as written before manifests carried an identity
        old = dataclasses.replace(Manifest.read(tmp_path / "a" / name), identity="", format=1)
        old.write(tmp_path / "a" / name)
    shutil.copytree(tmp_path / "a", tmp_path / "copy-of-old")
    run(tmp_path / "copy-of-old")
    assert len(calls) == 2  # an old manifest at another path: its stage reruns, as before
    assert Manifest.read(tmp_path / "a" / "train").identity == ""
    run(tmp_path / "a")  # skipped at its own path, and upgraded
    assert len(calls) == 2 and Manifest.read(tmp_path / "a" / "train").identity
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run(tmp_path / "b")
    assert len(calls) == 2  # the upgraded run directory resumes wherever it is copied


def test_partial_training_copied_under_another_name_resumes(tmp_path):
    import shutil

    seen = []
    train = training_killed_once(seen)

    def run(root):
        run_stage(Stage("data", write_value, Cfg()), None, root / "data")
        return run_stage(Stage("train", train, ReadsCfg(data=str(root / "data")), resumable=True), None,
                         root / "train")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert run(tmp_path / "b").timings["resumed"] is True and seen == [0, 2]
    # a partial directory written before pending files named an identity still resumes by its raw hash, at its path
    with pytest.raises(KeyboardInterrupt):
        seen.clear()
        run(tmp_path / "c")
    pending = partial_dir(tmp_path / "c" / "train") / "pending.json"
    pending.write_text(json.dumps({k: v for k, v in json.loads(pending.read_text()).items()
                                   if k not in ("identity", "format")}))
    assert run(tmp_path / "c").timings["resumed"] is True and seen == [0, 2]


def test_a_data_file_edited_in_place_reruns_the_stage_and_a_touched_one_does_not(tmp_path):
    """A user's data file (calibration text, QA or preference JSONL) named in a config is part of the work by its
    contents: editing it at the same path reruns the stage; a new modification time alone does not."""
    import os

    calls = []

    def read(_input, work_dir, cfg):
        calls.append(Path(cfg.data).read_text())
        (work_dir / "copy.txt").write_text(calls[-1])
        return {}

    data = tmp_path / "qa.jsonl"
    data.write_text('{"q": 1}\n')
    stage = Stage("read", read, ReadsCfg(data=str(data)))
    run_stage(stage, None, tmp_path / "out")
    run_stage(stage, None, tmp_path / "out")
    assert calls == ['{"q": 1}\n']
    os.utime(data, ns=(1, 1))  # touched, same bytes
    run_stage(stage, None, tmp_path / "out")
    assert len(calls) == 1
    data.write_text('{"q": 2}\n')  # edited in place
    run_stage(stage, None, tmp_path / "out")
    assert calls[-1] == '{"q": 2}\n' and (tmp_path / "out" / "copy.txt").read_text() == '{"q": 2}\n'


def test_a_saved_dataset_saved_again_with_other_rows_reruns_the_stage(tmp_path):
    """A `datasets` folder named in a config counts by its fingerprints: other rows saved at the same path rerun the
    stage, the same rows saved again do not."""
    import datasets

    calls = []

    def read(_input, work_dir, cfg):
        calls.append(list(datasets.load_from_disk(cfg.data)["train"]["q"]))
        (work_dir / "n.txt").write_text(str(len(calls[-1])))
        return {}

    folder = tmp_path / "qa"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": [1, 2]})}).save_to_disk(str(folder))
    stage = Stage("read", read, ReadsCfg(data=str(folder)))
    run_stage(stage, None, tmp_path / "out")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": [1, 2]})}).save_to_disk(str(folder))
    run_stage(stage, None, tmp_path / "out")
    assert calls == [[1, 2]]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": [3]})}).save_to_disk(str(folder))
    run_stage(stage, None, tmp_path / "out")
    assert calls == [[1, 2], [3]]
