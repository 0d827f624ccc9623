"""Preference rows in TRL's layout train through `python -m align.logo`: the prompt becomes chunks and a question
that covers it, chosen is the preferred response and the rejected answers (one, or a list) the dis-preferred ones,
in the batches the trainer reads; conversational rows go through the chat template; what cannot be mapped is one
error line naming the row."""

import json

import datasets
import pytest

from align.logo import LogoConfig, main, prepare
from align.trl_rows import as_logo_rows, split_prompt, trl_to_logo
from align.data import load_rows, token_counter
from core.checkpoint import load_tokenizer
from core.config import load_config
from core.errors import UserError
from core.stage import Manifest

POSITIONS = ["--set", "position.window=2048", "--set", "position.chunk_size=128", "--set", "position.max_chunks=8"]
TRAIN = ["--set", "train.steps=2", "--set", "train.warmup_steps=0", "--set", "train.grad_accum_steps=1",
         "--set", "batches.batch_size=2", "--set", "train.lr=1e-3"]


def trl_records(list_rejected: bool) -> list[dict]:
    context = "".join(f"Line {i} of the manual is about nothing in particular.\n" for i in range(8))
    records = []
    for i in range(4):
        rejected = [f" red{i}", f" green{i}"] if list_rejected else f" red{i}"
        records.append({"prompt": context + f"Code word {i} is blue{i}.\nWhat is code word {i}?\nAnswer:",
                        "chosen": f" blue{i}", "rejected": rejected})
    return records


def decoded_responses(prepared) -> dict[str, list[str]]:
    """Every row's responses as the batches carry them (EOS-terminated token ids, decoded)."""
    tokenizer = prepared.tokenizer
    found = {}
    for batch in prepared.batches:
        for b, row_id in enumerate(batch["row_ids"]):
            texts = []
            for ids, mask in zip(batch["response_ids"][b], batch["response_mask"][b]):
                kept = ids[mask.bool()].tolist()
                assert kept[-1] == tokenizer.eos_token_id
                texts.append(tokenizer.decode(kept[:-1]))
            found[row_id] = texts
    return found


@pytest.mark.parametrize("form", ["jsonl, one rejected", "datasets folder, a list of rejected"])
def test_trl_rows_train_logo_steps_and_the_batches_hold_chosen_then_rejected(form, workspace, tmp_path):
    list_rejected = form.startswith("datasets")
    records = trl_records(list_rejected)
    if list_rejected:
        data = tmp_path / "prefs"
        datasets.Dataset.from_list(records).save_to_disk(str(data))
        num_rejected = 2
    else:
        data = tmp_path / "prefs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        num_rejected = 1
    settings = [f"data={data}", f"loss.num_rejected={num_rejected}",
                *[s for s in POSITIONS + TRAIN if s != "--set"]]
    prepared = prepare(workspace / "llama", load_config(LogoConfig, None, settings))
    responses = decoded_responses(prepared)
    assert sorted(responses) == [f"trl-{i}" for i in range(4)]
    for i in range(4):
        expected = [f" blue{i}", f" red{i}", f" green{i}"][: 1 + num_rejected]
        assert responses[f"trl-{i}"] == expected
    out = tmp_path / "logo"
    main(["--model", str(workspace / "llama"), "--data", str(data), "--out", str(out), "--no-progress",
          "--set", f"loss.num_rejected={num_rejected}", *POSITIONS, *TRAIN])
    manifest = Manifest.read(out)
    assert manifest.metrics["rows"] == 4 and manifest.metrics["step"] == 2
    assert manifest.config["loss"]["num_rejected"] == num_rejected


def test_the_prompt_is_chunks_then_a_question_next_to_the_responses(workspace):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    count = token_counter(tokenizer)
    records = trl_records(True)
    rows = trl_to_logo(datasets.Dataset.from_list(records), tokenizer, chunk_size=128)
    for row, record in zip(rows, records):
        assert "".join(row["chunks"]) + row["question"] == record["prompt"]
        assert len(row["chunks"]) >= 2 and max(count([*row["chunks"], row["question"]])) <= 128
        assert row["question"].endswith("Answer:")
        assert row["responses"] == [record["chosen"], *record["rejected"]]
        assert row["response_kinds"] == ["chosen", "rejected", "rejected"]
    chunks, question = split_prompt("Short prompt: what is it?", 128, count)  # one chunk: cut in two halves
    assert len(chunks) == 1 and question and "".join(chunks) + question == "Short prompt: what is it?"
    logo_rows = load_rows(workspace / "data")
    assert as_logo_rows(logo_rows, tokenizer, 128) is logo_rows  # LOGO's own rows pass unchanged


def test_rows_with_fewer_rejected_answers_than_m_are_refused_by_name_and_more_are_cut_to_m(workspace, tmp_path):
    records = trl_records(True)
    records[2]["rejected"] = " red2"  # one answer as text among lists: JSONL rows may mix both forms
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = [f"data={data}", *[s for s in POSITIONS if s != "--set"]]
    with pytest.raises(UserError, match="row trl-2 has 1 dis-preferred response"):
        prepare(workspace / "llama", load_config(LogoConfig, None, [*base, "loss.num_rejected=2"]))
    prepared = prepare(workspace / "llama", load_config(LogoConfig, None, [*base, "loss.num_rejected=1"]))
    assert all(len(texts) == 2 for texts in decoded_responses(prepared).values())


def test_conversational_rows_go_through_the_chat_template(workspace):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    prompt = [{"role": "user", "content": "Line one.\n" * 20 + "What is the word?"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "blue"}],
              "rejected": [[{"role": "assistant", "content": "red"}], [{"role": "assistant", "content": "green"}]]}
    with pytest.raises(UserError, match="row trl-0: conversational TRL rows need a tokenizer with a chat template"):
        trl_to_logo([record], tokenizer, 128)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    row = trl_to_logo([record], tokenizer, 128)[0]
    rendered = "<user>" + "Line one.\n" * 20 + "What is the word?</s><assistant>"
    assert "".join(row["chunks"]) + row["question"] == rendered
    assert row["responses"] == ["blue</s>", "red</s>", "green</s>"]


@pytest.mark.parametrize("case", ["implicit prompt", "mixed forms", "fewer rejected than LOGO's M"])
def test_rows_that_cannot_be_mapped_are_one_error_line_and_nothing_is_written(case, workspace, tmp_path, capsys):
    records = trl_records(False)
    if case == "implicit prompt":
        records = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in records]
        expected = "no prompt column (TRL's implicit prompt)"
    elif case == "mixed forms":
        records = [{**r, "chosen": [{"role": "assistant", "content": r["chosen"]}]} for r in records]
        expected = "mix text and message lists"
    else:  # LOGO's default M is 2
        expected = "row trl-0 has 1 dis-preferred response(s), 2 needed (num_rejected)"
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "logo"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(workspace / "llama"), "--data", str(data), "--out", str(out), *POSITIONS])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # after the datasets loader's progress line
    last = err.strip().split("\n")[-1]
    assert last.startswith("error: ") and expected in last and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "logo.partial").exists()
