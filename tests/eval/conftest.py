"""Session fixtures for eval tests: a small corpus, a tokenizer trained on it, a tiny task set, and tiny Llama and
OpenBA models trained for a few dozen steps (better than random, so that damaging them measurably hurts)."""

import copy

import pytest
import torch

from eval.gate import GateConfig, MetricRule
from eval.taskdata import TaskDataConfig, ensure_task_set
from pretrain.corpus import CorpusConfig, load_or_build_corpus
from tests.factory import tiny_model

CORPUS = CorpusConfig(max_documents=80, validation_size=0.2)
TASK_DATA = TaskDataConfig(
    corpus=CORPUS, ppl_documents=8, ppl_chars=600, mc_questions=8, mc_context_chars=200, mc_choice_chars=60,
    probe_lengths=(200, 400), probe_depths=(0.0, 0.5, 1.0), probe_samples=1,
)
LIMIT = 4  # documents per task: enough to see damage, small enough for seconds per evaluation


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test machine's cores are shared: one thread per test process avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="session")
def corpus(cache_dir):
    return load_or_build_corpus(CORPUS, cache_dir)


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory):
    from pretrain.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    path = train_tokenizer(corpus, TokenizerConfig(vocab_size=640, max_training_chars=100_000),
                           tmp_path_factory.mktemp("tok") / "tokenizer")
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def task_set(cache_dir):
    return ensure_task_set(TASK_DATA, cache_dir)


def _train(model, tokenizer, corpus, encoder_decoder: bool, steps: int = 80) -> None:
    """A few AdamW steps on train-split windows: causal LM, or (encoder-decoder) first half -> second half."""
    text = "\n".join(corpus["train"]["text"][:20])[:300_000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 97, (8,), generator=generator)
        batch = torch.stack([ids[s: s + 96] for s in starts])
        if encoder_decoder:
            loss = model(input_ids=batch[:, :48], labels=batch[:, 48:].contiguous()).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def trained_llama(tokenizer, corpus):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    _train(model, tokenizer, corpus, encoder_decoder=False)
    return model


@pytest.fixture(scope="session")
def trained_openba(tokenizer, corpus):
    model = tiny_model("openba", vocab_size=len(tokenizer), hidden_size=64, kv_channels=16, num_heads=4,
                       ffn_hidden_size=128, num_layers=1, num_decoder_layers=2, max_seq_length=512,
                       decoder_max_seq_length=512)
    _train(model, tokenizer, corpus, encoder_decoder=True)
    return model


@pytest.fixture(scope="session")
def llama_results(trained_llama, tokenizer, task_set):
    """The trained Llama evaluated once on the small offline suite (shared by tests that only read results)."""
    from eval.harness import evaluate

    return evaluate(trained_llama, tokenizer, ["corpus_ppl", "corpus_mc", "probe_needle", "probe_kv"],
                    task_set=task_set, limit=LIMIT)


@pytest.fixture
def llama(trained_llama):
    """A private copy: tests may damage it."""
    return copy.deepcopy(trained_llama)


@pytest.fixture
def openba(trained_openba):
    return copy.deepcopy(trained_openba)


@pytest.fixture(scope="session")
def llama_dir(trained_llama, tokenizer, tmp_path_factory):
    from core.checkpoint import save_checkpoint

    return save_checkpoint(trained_llama, tokenizer, tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="session")
def openba_dir(trained_openba, tokenizer, tmp_path_factory):
    from core.checkpoint import save_checkpoint

    return save_checkpoint(trained_openba, tokenizer, tmp_path_factory.mktemp("ckpt") / "openba")


def small_gate(cache_dir, **overrides) -> GateConfig:
    """The offline gate in miniature: perplexity may not rise 5%, continuation accuracy may not fall 50 points."""
    rules = [
        MetricRule("corpus_ppl", "byte_perplexity", max_rel_drop=0.05),
        MetricRule("corpus_mc", "acc_norm", max_drop=0.5),
        MetricRule("probe_needle", "exact_match", min=0.0),
    ]
    fields = dict(name="small", rules=rules, limit=LIMIT, task_data=TASK_DATA, cache_dir=str(cache_dir))
    return GateConfig(**{**fields, **overrides})


def damage(model) -> None:
    """Zero every weight of the first half of the blocks of every stack (the "deliberately damaged" model)."""
    from core.adapters import get_adapter

    adapter = get_adapter(model)
    with torch.no_grad():
        for stack in adapter.stacks:
            blocks = adapter.blocks(stack)
            for block in list(blocks)[: max(1, len(blocks) // 2)]:
                for parameter in block.parameters():
                    parameter.zero_()
