"""The optional text regulariser of the LOGO stage: weight x the NLL of plain-text rows, added to the preference loss
exactly; training with it models those texts better than training without it; its batches cycle and resume exactly
beside the preference batches; half a configuration or unreadable text rows fail before anything is written."""

import pytest
import torch

from align.batches import BatchConfig, PreferenceBatches, WithTextBatches
from align.data import load_rows, save_rows
from align.logo import LogoConfig, prepare, run_logo
from align.losses import preferred_nll
from align.packing import response_logps
from align.positions import PositionConfig
from core.checkpoint import load_model, load_tokenizer
from core.config import load_config
from core.errors import UserError
from tests.align.conftest import POSITION_SETTINGS
from tests.align.test_logo import TRAIN


@pytest.fixture(scope="module")
def text_data(workspace, tmp_path_factory):
    """Six text rows (a few characters as the prompt, the next 60 as the text to model) from the corpus."""
    import datasets

    texts = [t for t in datasets.load_from_disk(str(workspace / "corpus"))["train"]["text"] if len(t) > 400][:6]
    rows = [{"id": f"text-{i}", "chunks": [t[100:108]], "question": "", "answer": t[108:168],
             "responses": [t[108:168]], "response_kinds": ["text"], "response_sources": ["corpus text"]}
            for i, t in enumerate(texts)]
    out = tmp_path_factory.mktemp("text") / "rows"
    save_rows(rows, out, {"source": "test"})
    return out


def config_with_text(workspace, text_data, weight: float, *settings) -> LogoConfig:
    text = [f"text.data={text_data}", f"text.weight={weight}", "text.batch_size=3"] if weight else []
    return load_config(LogoConfig, None, [f"data={workspace / 'data'}", *POSITION_SETTINGS, *TRAIN, *text, *settings])


def text_nll(model, workspace, text_data) -> float:
    batches = PreferenceBatches(load_rows(text_data), load_tokenizer(workspace / "tokenizer"),
                                PositionConfig(synthesize=False, window=4096, chunk_size=128, max_chunks=8),
                                BatchConfig(batch_size=6, shuffle=False), 1, model.config.is_encoder_decoder)
    with torch.no_grad():
        return float(preferred_nll(response_logps(model.eval(), next(iter(batches)), min_responses=1)))


def test_the_objective_adds_weight_times_the_text_nll(workspace, text_data):
    prepared = prepare(workspace / "llama", config_with_text(workspace, text_data, 0.5))
    batch = next(iter(WithTextBatches(prepared.batches, prepared.text)))
    assert batch["text"]["response_ids"].shape[:2] == (3, 1)
    with torch.no_grad():
        value, metrics = prepared.objective(prepared.model, batch)
        prepared.objective.text_weight = 0.0
        alone, _ = prepared.objective(prepared.model, batch)
        nll = preferred_nll(response_logps(prepared.model, batch["text"], min_responses=1))
    assert value.item() == pytest.approx(alone.item() + 0.5 * nll.item(), rel=1e-5)
    assert metrics["text_nll"] == pytest.approx(nll.item(), rel=1e-5) and metrics["loss"] == pytest.approx(value.item())


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_training_with_the_regulariser_models_the_texts_better(workspace, text_data, tmp_path, family):
    settings = ["train.steps=4", "train.lr=3e-3"]
    plain = run_logo(workspace / family, tmp_path / "plain", config_with_text(workspace, text_data, 0, *settings))
    mixed = run_logo(workspace / family, tmp_path / "mixed", config_with_text(workspace, text_data, 1.0, *settings))
    assert mixed.metrics["text_rows"] == 6 and plain.metrics["text_rows"] == 0
    before = text_nll(load_model(workspace / family), workspace, text_data)
    without = text_nll(load_model(tmp_path / "plain"), workspace, text_data)
    with_text = text_nll(load_model(tmp_path / "mixed"), workspace, text_data)
    assert with_text < before - 0.1 and with_text < without - 0.1


def test_text_batches_cycle_and_resume_exactly(workspace, text_data):
    def fresh():
        prepared = prepare(workspace / "llama", config_with_text(workspace, text_data, 1.0, "batches.batch_size=2"))
        return WithTextBatches(prepared.batches, prepared.text)

    def ids(batches):
        return [(b["row_ids"], b["text"]["row_ids"]) for b in batches]

    data = fresh()
    assert len(data) == 4  # the preference epoch sets the length; the 2 text batches cycle inside it
    iterator = iter(data)
    first = ids(next(iterator) for _ in range(3))
    state = data.state_dict()
    rest, second_epoch = ids(iterator), ids(iter(data))
    assert len(rest) == 1 and len(second_epoch) == 4
    assert sorted(first[0][1] + first[1][1]) == sorted(f"text-{i}" for i in range(6))  # one text epoch, then anew
    assert [len(set(text)) for _, text in first] == [3, 3, 3]
    resumed = fresh()
    resumed.load_state_dict(state)
    assert ids(iter(resumed)) == rest and ids(iter(resumed)) == second_epoch


def test_half_a_regulariser_or_bad_text_rows_fail_before_writing(workspace, text_data, tmp_path):
    with pytest.raises(UserError, match="both text.data and a positive text.weight"):
        load_config(LogoConfig, None, [f"text.data={text_data}"])
    with pytest.raises(UserError, match="both text.data and a positive text.weight"):
        load_config(LogoConfig, None, ["text.weight=1"])
    out = tmp_path / "never"
    with pytest.raises(UserError, match="preference data not found"):
        run_logo(workspace / "llama", out, config_with_text(workspace, tmp_path / "missing", 1.0))
    empty = tmp_path / "empty-text"
    save_rows([{**load_rows(text_data)[0], "responses": [" "]}], empty, {"source": "test"})
    with pytest.raises(UserError, match="text regulariser data: row text-0 has an empty response"):
        run_logo(workspace / "llama", out, config_with_text(workspace, empty, 1.0))
    assert not out.exists() and not (tmp_path / "never.partial").exists()
