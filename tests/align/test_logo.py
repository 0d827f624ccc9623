"""The LOGO stage on the shared Trainer: it widens the preferred/dis-preferred margin and saves a checkpoint that
loads with from_pretrained (LoRA merged, adapter beside it); every loss runs through the same objective (DPO starts
at log 2 against its reference, a copy or the adapters switched off); bad input fails before anything is written;
a killed run resumes to the same weights."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import core.openba  # noqa: F401  (registers OpenBA with the Auto classes)
from align.batches import BatchConfig, PreferenceBatches
from align.data import load_rows
from align.logo import LogoConfig, main, prepare, run_logo
from align.objective import PreferenceObjective
from align.packing import response_logps
from core.checkpoint import load_model, load_tokenizer
from core.config import load_config
from core.errors import UserError
from tests.align.conftest import POSITION_SETTINGS

TRAIN = ["train.warmup_steps=0", "train.grad_accum_steps=1", "train.log_every=1", "batches.batch_size=4",
         "loss.beta=2.5", "loss.gamma=0.25"]


def logo_config(workspace, *settings) -> LogoConfig:
    return load_config(LogoConfig, None, [f"data={workspace / 'data'}", *POSITION_SETTINGS, *TRAIN, *settings])


def margin(model, workspace, encoder_decoder=False) -> float:
    """Mean over rows of mean log p(preferred) - mean log p(dis-preferred), plain positions."""
    from align.positions import PositionConfig

    rows = load_rows(workspace / "data")
    data = PreferenceBatches(rows, load_tokenizer(workspace / "tokenizer"),
                             PositionConfig(window=4096, chunk_size=128, max_chunks=8),
                             BatchConfig(batch_size=8, shuffle=False), 3, encoder_decoder)
    with torch.no_grad():
        mean = response_logps(model.eval(), next(iter(data))).mean_logp
    return float((mean[:, 0] - mean[:, 1:].mean(1)).mean())


def test_logo_stage_widens_the_margin_and_saves_a_loadable_checkpoint(workspace, tmp_path):
    before = margin(load_model(workspace / "llama"), workspace)
    out = tmp_path / "logo"
    manifest = run_logo(workspace / "llama", out, logo_config(workspace, "train.steps=4", "train.lr=3e-3"))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.max_position_embeddings == 4096  # extended to the synthesised window
    assert margin(model, workspace) > before + 0.1
    assert manifest.stage == "logo" and manifest.metrics["step"] == 4
    assert json.loads((out / "manifest.json").read_text())["config"]["loss"]["loss"] == "logo"
    assert not (out / "train" / "checkpoints").exists() and (out / "train" / "metrics.jsonl").is_file()
    assert run_logo(workspace / "llama", out, logo_config(workspace, "train.steps=4", "train.lr=3e-3")).timings == \
        manifest.timings  # complete and unchanged: skipped


@pytest.mark.parametrize("engine", ["torch", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_openba_lora_run_saves_the_merged_weights_and_the_adapter(workspace, tmp_path, engine):
    from peft import PeftModel

    out = tmp_path / "logo-lora"
    zero = ["train.deepspeed=3"] if engine == "deepspeed" else []  # ZeRO-3: the merge runs on gathered weights
    manifest = run_logo(workspace / "openba", out, logo_config(workspace, "train.steps=1", "train.lr=1e-2",
                                                               "batches.batch_size=2", "lora.enabled=true",
                                                               "lora.r=4", *zero))
    assert manifest.metrics["trainable_parameters"] < manifest.parameters["after"] / 5
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    base = load_model(workspace / "openba").eval()
    rebuilt = PeftModel.from_pretrained(load_model(workspace / "openba"), str(out / "lora_adapter"))
    rebuilt = rebuilt.merge_and_unload().eval()
    ids = torch.randint(3, 200, (1, 20))
    decoder = torch.randint(3, 200, (1, 5))
    with torch.no_grad():
        expected = rebuilt(input_ids=ids, decoder_input_ids=decoder).logits
        got = merged(input_ids=ids, decoder_input_ids=decoder).logits
        untrained = base(input_ids=ids, decoder_input_ids=decoder).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, untrained, atol=1e-4)  # the adapter learned something and was merged


@pytest.mark.parametrize("loss", ["logo", "simpo", "dpo", "orpo", "sft"])
def test_every_loss_runs_through_the_same_objective(workspace, loss):
    prepared = prepare(workspace / "llama", logo_config(workspace, f"loss.loss={loss}"))
    batch = next(iter(prepared.batches))
    value, metrics = prepared.objective(prepared.model, batch)
    value.backward()
    assert math.isfinite(value.item()) and metrics["loss"] == pytest.approx(value.item())
    if loss == "dpo":  # policy == reference before training: -log sigmoid(0)
        assert value.item() == pytest.approx(math.log(2), abs=1e-5)
    grads = [p.grad for p in prepared.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_dpo_with_lora_scores_the_reference_with_adapters_off(workspace):
    prepared = prepare(workspace / "openba", logo_config(workspace, "loss.loss=dpo", "lora.enabled=true"))
    assert prepared.objective.reference is None  # no second copy of the weights
    with torch.no_grad():
        for param in (p for n, p in prepared.model.named_parameters() if "lora_B" in n):
            param.add_(0.05)  # make the policy differ from the base
    batch = next(iter(prepared.batches))
    value, _ = prepared.objective(prepared.model, batch)
    with torch.no_grad(), prepared.model.disable_adapter():
        reference = response_logps(prepared.model, prepared.objective._used(batch))
    assert value.item() != pytest.approx(math.log(2), abs=1e-4)
    assert torch.allclose(prepared.objective.reference_logps(prepared.model, prepared.objective._used(batch)).sum_logp,
                          reference.sum_logp)


def test_bad_input_fails_before_anything_is_written(workspace, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["--model", str(workspace / "llama"), "--out", str(out)]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    for extra, message in [
        (["--data", str(tmp_path / "missing")], "preference data not found"),
        (["--data", str(tmp_path / "empty.jsonl")], "holds no preference rows: the JSONL is empty"),
        (["--data", str(tmp_path / "bad.jsonl")], "cannot be read as JSON lines of one shape: JSON parse error"),
        (["--data", str(workspace / "data"), "--set", "position.window=600", *[f"--set={s}" for s in
                                                                                 POSITION_SETTINGS[1:]]],
         "exceeds the synthesised window"),
        (["--data", str(workspace / "data"), *[f"--set={s}" for s in POSITION_SETTINGS],
          "--set", "train.attn_implementation=flash_attention_2"], "flash_attention_2"),
        (["--data", str(workspace / "data"), "--loss", "dpo", "--set", "loss.num_rejected=3"], "dis-preferred"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "never.partial").exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["inside the model", "users folder", "missing data", "truncated weights",
                                  "more layers than weights", "missing reference"])
def test_bad_input_is_one_error_and_leaves_every_file_as_it_was(case, workspace, tmp_path, capsys):
    import shutil

    from tests.core.test_out_policy import refused

    model = shutil.copytree(workspace / "llama", tmp_path / "llama")
    data, out, extra = workspace / "data", tmp_path / "out", []
    if case == "inside the model":
        out, expected = model / "aligned", "lies inside it"
    elif case == "users folder":
        out.mkdir()
        (out / "draft.md").write_text("mine")
        expected = "already holds files this stage did not write (draft.md)"
    elif case == "missing data":
        data, expected = tmp_path / "no-data", "preference data not found"
    elif case == "truncated weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:2000])
        expected = "corrupt safetensors file"
    elif case == "more layers than weights":
        config = json.loads((model / "config.json").read_text())
        config["num_hidden_layers"] += 1
        (model / "config.json").write_text(json.dumps(config))
        expected = "missing from the weights"
    else:
        extra, expected = ["--loss", "dpo", "--reference", str(tmp_path / "no-reference")], "does not exist"

    def logo(model_dir, output):
        main(["--model", str(model_dir), "--data", str(data), "--out", str(output), "--no-progress",
              *[f"--set={s}" for s in POSITION_SETTINGS], *extra])

    assert expected in refused(logo, model, out, tmp_path, capsys)


def test_method_flags_stand_before_every_set_so_an_explicit_set_wins():
    from align.logo import KIND
    from core.cli import build_parser, config_from_args

    parser, named = build_parser(KIND)
    args = parser.parse_args(["--model", "m", "--out", "o", "--data", "d", "--set", "loss.beta=3",
                              "--preset", "llama2-7b", "--loss", "simpo", "--lora"])
    config = config_from_args(KIND, args, named)
    assert (config.loss.beta, config.loss.gamma, config.loss.loss) == (3.0, 0.6, "simpo")
    assert config.lora.enabled and config.data == "d"


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(workspace, tmp_path):
    settings = ["train.steps=4", "train.save_every=2", "train.lr=1e-3"]
    straight = tmp_path / "straight"
    run_logo(workspace / "llama", straight, logo_config(workspace, *settings))

    class Killed(Exception):
        pass

    calls = {"n": 0}
    original = PreferenceObjective.__call__

    def dies_at_step_three(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return original(self, model, batch)

    resumed = tmp_path / "resumed"
    PreferenceObjective.__call__ = dies_at_step_three
    try:
        with pytest.raises(Killed):
            run_logo(workspace / "llama", resumed, logo_config(workspace, *settings))
    finally:
        PreferenceObjective.__call__ = original
    assert (tmp_path / "resumed.partial" / "train" / "checkpoints").is_dir()
    manifest = run_logo(workspace / "llama", resumed, logo_config(workspace, *settings))
    assert manifest.timings["resumed"]
    a, b = load_model(straight), load_model(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


def test_unknown_config_keys_are_named():
    with pytest.raises(UserError, match="did you mean 'loss.beta'"):
        load_config(LogoConfig, None, ["loss.betta=3"])


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_rope_base_scaling_combines_with_the_synthesised_window(workspace, family):
    prepared = prepare(workspace / family, logo_config(workspace, "position.rope_theta=500000"))
    config = prepared.model.config
    theta = config.rope_theta if family == "openba" else config.rope_parameters["rope_theta"]
    assert theta == 500000
    supported = config.max_seq_length if family == "openba" else config.max_position_embeddings
    assert supported == 4096  # the window
    assert prepared.extended["before"] != prepared.extended["after"]
