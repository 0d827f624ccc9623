"""An OpenBA checkpoint this project writes loads where the project is not installed: its config.json names the
model code in `auto_map`, that code (the project's own two files, byte for byte) sits beside the weights, and stock
transformers and the stock `lm_eval` command load and run it with `trust_remote_code=True`, giving the project
model's logits. With the project imported, the registered classes load it and no remote code runs.

The "machine without the project" is a child process whose import system refuses the project's packages (however
they are installed: editable finder, PYTHONPATH or site-packages) and which runs from a temporary directory.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

import core.openba.configuration_openba as configuration_module
import core.openba.modeling_openba as modeling_module
from core.checkpoint import ship_model_code, write_checkpoint
from core.openba import OpenBAConfig, OpenBAForConditionalGeneration, OpenBAModel
from tests.child_env import ROOT, child_env
from tests.factory import byte_tokenizer, tiny_config, tiny_model

AUTO_MAP = {
    "AutoConfig": "configuration_openba.OpenBAConfig",
    "AutoModel": "modeling_openba.OpenBAModel",
    "AutoModelForSeq2SeqLM": "modeling_openba.OpenBAForConditionalGeneration",
}
CODE_FILES = {"configuration_openba.py": configuration_module, "modeling_openba.py": modeling_module}
PROJECT_PACKAGES = ("align", "benchmarks", "compress", "core", "eval", "pretrain", "recipes", "tests")
TEXTS = ["def add(a, b):\n    return a + b", "The quick brown fox"]


def pruned_openba(vocab_size: int) -> OpenBAForConditionalGeneration:
    """A tiny OpenBA with the uneven per-layer shapes a pruner leaves, so the shipped code must read them too."""
    return tiny_model("openba", vocab_size=vocab_size, hidden_size=64, kv_channels=16, num_heads=4, ffn_hidden_size=128,
                      num_layers=2, num_decoder_layers=3, encoder_ffn_sizes=[128, 48], decoder_ffn_sizes=[96, 128, 32],
                      decoder_head_counts=[4, 2, 3], initializer_range=0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, model, tokenizer): a stage's output, written by the one checkpoint writer."""
    tokenizer = byte_tokenizer()
    model = pruned_openba(len(tokenizer))
    directory = tmp_path_factory.mktemp("portable") / "openba"
    directory.mkdir()
    write_checkpoint(model, tokenizer, directory)
    return directory, model, tokenizer


def assert_portable(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for name, module in CODE_FILES.items():
        assert (directory / name).read_bytes() == Path(module.__file__).read_bytes(), f"{name} is not the project's"


# ------------------------------------------------------------------------------------------ what is written


def test_checkpoint_writer_ships_auto_map_and_the_projects_own_model_code(checkpoint):
    directory, _, _ = checkpoint
    assert_portable(directory)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()


def test_a_direct_save_pretrained_is_portable_and_replaces_a_foreign_auto_map(tmp_path):
    model = pruned_openba(64)
    model.config.auto_map = {"AutoConfig": "configuration_openbt5.OpenBT5Config"}  # as a public release names it
    model.save_pretrained(tmp_path)
    assert_portable(tmp_path)


def test_a_config_written_without_the_model_is_made_portable_and_other_families_get_nothing(tmp_path):
    openba = tiny_config("openba")
    openba.save_pretrained(tmp_path / "openba")
    ship_model_code(tmp_path / "openba", openba)
    assert_portable(tmp_path / "openba")
    reloaded = AutoConfig.from_pretrained(tmp_path / "openba")
    assert {**reloaded.to_dict(), "_name_or_path": ""} == {**openba.to_dict(), "_name_or_path": ""}
    llama = tiny_config("llama")
    llama.save_pretrained(tmp_path / "llama")
    ship_model_code(tmp_path / "llama", llama)
    assert sorted(p.name for p in (tmp_path / "llama").iterdir()) == ["config.json"]
    assert "auto_map" not in json.loads((tmp_path / "llama" / "config.json").read_text())


def test_shipped_code_imports_only_torch_transformers_and_the_standard_library():
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    for name, module in CODE_FILES.items():
        outside = set(get_imports(module.__file__)) - {"torch", "transformers"} - set(sys.stdlib_module_names)
        assert not outside, f"{name} needs {outside} on a machine without this project"
    assert get_relative_imports(modeling_module.__file__) == ["configuration_openba"]
    assert get_relative_imports(configuration_module.__file__) == []


# ---------------------------------------------------------------------------------- with the project imported


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_with_the_project_imported_the_registered_classes_load_it_and_nothing_asks(checkpoint, monkeypatch,
                                                                                  trust_remote_code):
    def no_prompt(*args):
        raise AssertionError("transformers asked whether to run remote code")

    monkeypatch.setattr("builtins.input", no_prompt)
    directory, model, _ = checkpoint
    trust = {} if trust_remote_code is None else {"trust_remote_code": True}
    assert type(AutoConfig.from_pretrained(directory, **trust)) is OpenBAConfig
    assert type(AutoModel.from_pretrained(directory, **trust)) is OpenBAModel
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory, **trust).eval()
    assert type(loaded) is OpenBAForConditionalGeneration
    AutoTokenizer.from_pretrained(directory, **trust)
    inputs = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(loaded(input_ids=inputs, labels=inputs).logits, model(input_ids=inputs, labels=inputs).logits)


# ------------------------------------------------------------------------------------ without the project

CHILD_PREAMBLE = """\
import importlib.abc, os, sys

PROJECT_ROOT = {root!r} + os.sep
PROJECT_PACKAGES = {packages!r}


class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PROJECT_PACKAGES:
            raise ModuleNotFoundError(f"{{name}}: this process stands for a machine without the project")
        return None


sys.meta_path.insert(0, NoProject())
sys.path[:] = [p for p in sys.path if p and not (os.path.abspath(p) + os.sep).startswith(PROJECT_ROOT)]


def assert_nothing_of_the_project_ran():
    files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
    assert not [f for f in files if f.startswith(PROJECT_ROOT)], "a project module was imported"
"""


def run_without_project(body: str, workdir: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter that cannot import this project, from `workdir`, offline, with stdin closed
    (so a remote-code prompt cannot wait)."""
    preamble = CHILD_PREAMBLE.format(root=str(ROOT), packages=PROJECT_PACKAGES)
    script = workdir / "child.py"
    script.write_text(preamble + "\n" + textwrap.dedent(body))
    pythonpath = [p for p in child_env()["PYTHONPATH"].split(":") if p and not Path(p).resolve() == ROOT]
    env = child_env(PYTHONPATH=":".join(pythonpath) or None, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    HF_MODULES_CACHE=str(workdir / "hf_modules"), HF_DATASETS_CACHE=str(workdir / "datasets"))
    result = subprocess.run([sys.executable, str(script), *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_child_cannot_import_the_project(tmp_path):
    run_without_project("""
        for name in PROJECT_PACKAGES:
            try:
                __import__(name)
            except ModuleNotFoundError:
                continue
            raise AssertionError(f"{name} imported")
    """, tmp_path)


def test_stock_transformers_loads_generates_and_gives_the_project_models_logits(checkpoint, tmp_path):
    directory, _, tokenizer = checkpoint
    run_without_project("""
        import json, sys
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

        directory, out, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(directory, trust_remote_code=True)
        # without trust_remote_code, transformers offers to run the config's code (here: stdin closed, it declines
        # at once) and then reads tokenizer_config.json alone
        tokenizer = AutoTokenizer.from_pretrained(directory)
        trusted = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        assert trusted(texts, return_tensors="pt", padding=True)["input_ids"].tolist() == batch["input_ids"].tolist()
        decoder_input_ids = tokenizer(["x = 1", "jumps"], return_tensors="pt", padding=True)["input_ids"]
        with torch.no_grad():
            logits = model(**batch, decoder_input_ids=decoder_input_ids).logits
            generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
        save_file({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                   "decoder_input_ids": decoder_input_ids, "logits": logits, "generated": generated}, out)
        classes = {"config": type(config).__module__, "model": type(model).__module__,
                   "model_class": type(model).__name__, "base_class": type(base).__name__,
                   "decoder_ffn_sizes": model.config.decoder_ffn_sizes}
        assert_nothing_of_the_project_ran()
        with open(out + ".json", "w") as handle:
            json.dump(classes, handle)
    """, tmp_path, str(directory), str(tmp_path / "child.safetensors"), json.dumps(TEXTS))
    child = load_file(str(tmp_path / "child.safetensors"))
    classes = json.loads((tmp_path / "child.safetensors.json").read_text())
    assert classes["config"].startswith("transformers_modules.")  # loaded from the code beside the weights
    assert classes["model"].startswith("transformers_modules.")
    assert classes["model_class"] == "OpenBAForConditionalGeneration" and classes["base_class"] == "OpenBAModel"
    assert classes["decoder_ffn_sizes"] == [96, 128, 32]

    model = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()  # the project's class (see the test above)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert torch.equal(child["input_ids"], batch["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=child["input_ids"], attention_mask=child["attention_mask"],
                       decoder_input_ids=child["decoder_input_ids"]).logits
        generated = model.generate(input_ids=child["input_ids"], attention_mask=child["attention_mask"],
                                   max_new_tokens=6, do_sample=False)
    assert logits.std() > 0.05, "logits this flat would make the comparison trivial"
    torch.testing.assert_close(child["logits"], logits, rtol=0, atol=1e-5)
    assert child["generated"].shape[1] > 1
    assert child["generated"].tolist() == generated.tolist()


def test_stock_lm_eval_evaluates_it_with_the_project_models_loglikelihoods(checkpoint, tmp_path):
    directory, model, tokenizer = checkpoint
    rows = [{"context": f"Question {i}: the value of x is", "choices": [" one", " two", " three"], "label": i % 3}
            for i in range(3)]
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "portable.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {"task": "portable_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
    (tmp_path / "tasks" / "portable_mc.yaml").write_text(json.dumps(task))  # YAML is a superset of JSON
    run_without_project("""
        import runpy, sys

        sys.argv = ["lm_eval", *sys.argv[1:]]
        try:
            runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
        finally:
            assert_nothing_of_the_project_ran()
    """, tmp_path, "--model", "hf", "--model_args", f"pretrained={directory},trust_remote_code=True,backend=seq2seq",
        "--include_path", str(tmp_path / "tasks"), "--tasks", "portable_mc", "--device", "cpu", "--batch_size", "2",
        "--output_path", str(tmp_path / "results"), "--log_samples", timeout=300)
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]["portable_mc"]
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob("samples_portable_mc_*.jsonl")).open()]

    def loglikelihood(context: str, continuation: str) -> float:
        """What lm-eval's seq2seq backend scores: the continuation's log-probability given the context."""
        inputs = torch.tensor([tokenizer.encode(context)])
        labels = torch.tensor([tokenizer.encode(continuation)])
        with torch.no_grad():
            logits = model(input_ids=inputs, labels=labels).logits
        return logits.log_softmax(-1).gather(-1, labels[..., None]).sum().item()

    correct = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = sample["doc"]
        expected = [loglikelihood(doc["context"], choice) for choice in doc["choices"]]
        scored = [float(response[0]) for response in sample["filtered_resps"]]
        assert scored == pytest.approx(expected, abs=1e-4)
        correct.append(max(range(len(expected)), key=expected.__getitem__) == doc["label"])
    assert len(correct) == len(rows)
    assert results["acc,none"] == pytest.approx(sum(correct) / len(correct))
