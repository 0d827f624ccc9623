"""A T5 checkpoint as T5Tokenizer saves it has spiece.model and no tokenizer.json: the pruners and compress.score
must load it as the checkpoint's tokenizer, not report that there is none."""

import pytest

import core.checkpoint
from compress.layer import load_inputs
from tests.factory import tiny_model


@pytest.mark.parametrize("name", ["spiece.model", "tokenizer.model", "tokenizer.json"])
def test_the_tokenizer_beside_the_model_is_found_by_any_of_its_file_names(name, tmp_path, monkeypatch):
    tiny_model("t5").save_pretrained(str(tmp_path))
    (tmp_path / name).write_bytes(b"stand-in")
    loaded = []
    monkeypatch.setattr(core.checkpoint, "load_tokenizer", lambda path: loaded.append(str(path)) or "TOKENIZER")
    model, tokenizer = load_inputs(str(tmp_path), None)
    assert tokenizer == "TOKENIZER" and loaded == [str(tmp_path)]
    assert model.config.model_type == "t5"


def test_a_checkpoint_without_tokenizer_files_has_no_tokenizer(tmp_path):
    tiny_model("t5").save_pretrained(str(tmp_path))
    assert load_inputs(str(tmp_path), None)[1] is None
