"""The `--out` policy: a stage never writes into its input, never over a file, never into a folder of someone
else's files, and fails before it writes anything; a stage's own output may be rerun in place."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.errors import UserError
from core.stage import Stage, check_output_location, run_stage
from tests.factory import calibration_file, save_with_tokenizer, tiny_model


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (and beside it), with a hash of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "llama"
    save_with_tokenizer(tiny_model("llama"), directory)
    calibration_file(directory.parent / "corpus.txt")
    return directory


def layer(model, out, *extra):
    from compress.layer import main

    main(["--model", str(model), "--drop", "decoder=1", "--out", str(out), "--no-progress", *extra])


def vocab(model, out):
    from compress.vocab import main

    corpus = model.parent / "corpus.txt"
    if not corpus.exists():
        calibration_file(corpus)
    main(["--model", str(model), "--corpus", str(corpus), "--keep", "40", "--out", str(out)])


def continual(model, out):
    from pretrain.continual import main

    main(["--model", str(model), "--out", str(out), "--set", "objective=causal", "--set", "train.steps=1"])


COMMANDS = {"compress.layer": layer, "compress.vocab": vocab, "pretrain.continual": continual}


def refused(command, model: Path, out: Path, root: Path, capsys) -> str:
    """Run `command`, expect exit 2 with one error line and no traceback, and nothing changed under `root`."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_info:
        command(model, out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert snapshot(root) == before
    return errors[0]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_existing_folder_of_the_users_files_is_refused_and_left_byte_for_byte(name, llama_dir, tmp_path, capsys):
    out = tmp_path / "my-folder"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    (out / "data").mkdir()
    (out / "data" / "results.csv").write_text("a,b\n1,2\n")
    message = refused(COMMANDS[name], llama_dir, out, tmp_path, capsys)
    assert "already holds files this stage did not write (data/results.csv, thesis.tex)" in message


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_output_inside_the_input_is_refused(name, llama_dir, tmp_path, capsys):
    message = refused(COMMANDS[name], llama_dir, llama_dir / "sub", llama_dir.parent, capsys)
    assert "is the input" in message and "lies inside it" in message


def test_an_output_that_is_the_input_is_refused(llama_dir, capsys):
    message = refused(layer, llama_dir, llama_dir, llama_dir.parent, capsys)
    assert "input" in message


def test_an_output_that_holds_the_input_is_refused(llama_dir, capsys):
    message = refused(layer, llama_dir, llama_dir.parent, llama_dir.parent, capsys)
    assert "holds the input" in message


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_existing_regular_file_is_refused_and_not_renamed(name, llama_dir, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    message = refused(COMMANDS[name], llama_dir, out, tmp_path, capsys)
    assert "exists and is not a directory" in message
    assert out.read_text() == "keep me" and not (tmp_path / "notes.txt.old").exists()


def test_an_unwritable_location_is_one_clear_error(llama_dir, capsys):
    message = refused(layer, llama_dir, Path("/proc/sys/openba-out"), llama_dir.parent, capsys)
    assert "cannot write the output /proc/sys/openba-out" in message


def test_a_stages_own_output_is_rerun_in_place_but_added_files_stop_it(llama_dir, tmp_path, capsys):
    out = tmp_path / "layered"
    layer(llama_dir, out)
    first = (out / "manifest.json").read_text()
    layer(llama_dir, out)  # finished with this config and input: kept as it is
    assert (out / "manifest.json").read_text() == first
    layer(llama_dir, out, "--force")  # --force reruns over the stage's own output
    assert (out / "manifest.json").read_text() != first
    (out / "my-notes.md").write_text("added by hand")
    message = refused(layer, llama_dir, out, tmp_path, capsys)
    assert "holds files stage 'layer-prune' did not write (my-notes.md)" in message


def test_another_stages_output_is_not_overwritten(llama_dir, tmp_path, capsys):
    out = tmp_path / "layered"
    layer(llama_dir, out)
    message = refused(vocab, llama_dir, out, tmp_path, capsys)
    assert "holds the output of stage 'layer-prune'" in message


def test_a_partial_folder_the_contract_did_not_make_is_never_removed(tmp_path):
    out = tmp_path / "out"
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not yours")
    stage = Stage("write", lambda _i, work, _c: (work / "x.txt").write_text("x") and {}, {"k": 1})
    with pytest.raises(UserError, match="not a partial output of this framework"):
        run_stage(stage, None, out)
    assert (foreign / "mine.txt").read_text() == "not yours" and not out.exists()


def test_the_policy_checks_write_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "out"
    check_output_location(target, "stage", [tmp_path / "model"])
    assert list(tmp_path.iterdir()) == []


def test_home_paths_a_shell_leaves_unexpanded_are_the_home_folder(llama_dir, tmp_path, monkeypatch):
    """`--model=~/x` and `--out=~/y` reach the command with the `~` (a shell expands it only at a word's start):
    they mean the home folder, never a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(llama_dir.parent))
    monkeypatch.chdir(tmp_path)
    from compress.layer import main

    main([f"--model=~/{llama_dir.name}", "--drop", "decoder=1", "--out=~/pruned by home", "--no-progress"])
    assert (llama_dir.parent / "pruned by home" / "manifest.json").is_file()
    assert not (tmp_path / "~").exists()


def test_an_output_that_is_a_symbolic_link_is_refused_naming_the_link(llama_dir, tmp_path, capsys):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "scratch")
    message = refused(layer, llama_dir, tmp_path / "link", tmp_path, capsys)
    assert "is a symbolic link (to " in message and "give the folder it points to" in message
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "scratch").iterdir())
