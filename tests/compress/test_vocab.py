"""Vocabulary pruning: lossless on kept tokens for a SentencePiece unigram (OpenBA) and a byte-level BPE (Llama)
tokenizer, exact logits on kept tokens, tied and untied heads, identity when nothing is pruned, and bad input."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast

from compress.tokenizer_surgery import (read_tokenizer_files, required_tokens, sentencepiece_pieces,
                                       write_pruned_tokenizer)
from compress.vocab import (KIND, VocabConfig, count_tokens, load_token_counts, main, padded_size, prune_vocabulary,
                            select_tokens, slice_vocabulary)
from core.errors import UserError
from core.planning import Estimate, PlannedModel
from pretrain.corpus import CorpusConfig, load_or_build_corpus
from pretrain.tokenizer import TokenizerConfig, mode_token_ids, sentinel_ids, train_tokenizer
from tests.factory import VOCAB, model_inputs, tiny_model

SP_VOCAB = 1000
BPE_VOCAB = 800
BPE_IDS = BPE_VOCAB + 2  # with the added tokens


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


@pytest.fixture(scope="session")
def corpus(workdir):
    return load_or_build_corpus(CorpusConfig(max_documents=60), workdir / "corpus")


@pytest.fixture(scope="session")
def sp_tokenizer_dir(corpus, workdir):
    config = TokenizerConfig(vocab_size=SP_VOCAB, max_training_chars=300_000)
    return train_tokenizer(corpus, config, workdir / "sp-tokenizer")


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(corpus, workdir):
    """A Llama-3/Qwen2-style byte-level BPE that prepends <s> through its post-processor, with two added tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus["train"]["text"], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.add_special_tokens(["<|im_start|>"])  # added tokens after the model vocabulary, as in Qwen2
    tokenizer.add_tokens(["<|user|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(workdir / "bpe-tokenizer"))
    return workdir / "bpe-tokenizer"


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(str(out))
    for path in tokenizer_dir.iterdir():
        if path.name != "manifest.json":
            shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def openba_dir(sp_tokenizer_dir, workdir):
    model = tiny_model("openba", vocab_size=SP_VOCAB)
    with torch.no_grad():  # a trained head's bias is not zero; make it matter in the logits comparison
        model.lm_head.bias.normal_()
    return _save(model, sp_tokenizer_dir, workdir / "openba")


def _llama_dir(bpe_tokenizer_dir, workdir, tied: bool) -> Path:
    model = tiny_model("llama", vocab_size=BPE_IDS, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return _save(model, bpe_tokenizer_dir, workdir / f"llama-tied-{tied}")


@pytest.fixture(scope="session")
def llama_dirs(bpe_tokenizer_dir, workdir):
    return {tied: _llama_dir(bpe_tokenizer_dir, workdir, tied) for tied in (True, False)}


@pytest.fixture(scope="session")
def t5_tied_dir(sp_tokenizer_dir, workdir):
    """T5 ties its LM head to the embedding shared by encoder and decoder; like t5-base (32128 rows for 32100
    tokens) it has more rows than the tokenizer has ids."""
    model = tiny_model("t5", vocab_size=SP_VOCAB + 24, num_layers=2, num_decoder_layers=2, pad_token_id=0,
                       eos_token_id=1, tie_word_embeddings=True)
    return _save(model, sp_tokenizer_dir, workdir / "t5-tied")


@pytest.fixture(scope="session")
def pruned_openba(openba_dir, corpus, workdir):
    out = workdir / "openba-pruned"
    manifest = prune_vocabulary(openba_dir, out, VocabConfig(coverage=0.9), corpus=corpus)
    return out, manifest


@pytest.fixture(scope="session")
def pruned_llamas(llama_dirs, corpus, workdir):
    outs = {}
    for tied, path in llama_dirs.items():
        out = workdir / f"llama-tied-{tied}-pruned"
        outs[tied] = (out, prune_vocabulary(path, out, VocabConfig(coverage=0.9), corpus=corpus))
    return outs


def kept_ids(original_dir: Path, pruned_dir: Path) -> list[int]:
    """Old id of every new id, recovered from the token strings (independently of the pruner's own bookkeeping)."""
    old = {t: i for i, t in enumerate(read_tokenizer_files(original_dir).tokens())}
    return [old[t] for t in read_tokenizer_files(pruned_dir).tokens()]


def text_chunks(texts, size=400):
    return [text[i : i + size] for text in texts for i in range(0, len(text), size)]


def text_lines(texts):
    return [line for text in texts for line in text.splitlines(keepends=True) if line.strip()]


def check_in_domain(original_dir, pruned_dir, texts, lossless=True):
    """Texts whose original ids are all kept encode to exactly the remapped ids; the others, when the tokenizer can
    spell anything (`lossless`), decode as before. Returns (in-domain, others)."""
    old_tok, new_tok = AutoTokenizer.from_pretrained(str(original_dir)), AutoTokenizer.from_pretrained(str(pruned_dir))
    old_to_new = {old: new for new, old in enumerate(kept_ids(original_dir, pruned_dir))}
    in_domain = others = 0
    for text in texts:
        old = old_tok(text, add_special_tokens=False)["input_ids"]
        new = new_tok(text, add_special_tokens=False)["input_ids"]
        if all(i in old_to_new for i in old):
            assert new == [old_to_new[i] for i in old], text
            in_domain += 1
        else:
            others += 1
            assert new_tok.decode(new) == old_tok.decode(old) or not lossless  # still encodable, through smaller pieces
    return in_domain, others


# --- lossless on kept tokens ---------------------------------------------------------------------------------------
def test_sentencepiece_in_domain_text_encodes_to_remapped_ids(openba_dir, pruned_openba, corpus):
    out, _ = pruned_openba
    in_domain, others = check_in_domain(openba_dir, out, text_lines(list(corpus["train"]["text"])[:10]))
    assert in_domain > 100 and others > 10  # both kinds occur: the check is not vacuous


def test_sentencepiece_round_trips_validation_text_although_pieces_were_removed(openba_dir, pruned_openba, corpus):
    out, _ = pruned_openba
    old_tok, new_tok = AutoTokenizer.from_pretrained(str(openba_dir)), AutoTokenizer.from_pretrained(str(out))
    kept = set(kept_ids(openba_dir, out))
    validation = list(corpus["validation"]["text"])
    used_removed = 0
    for text in validation + ["naïve café 東京 🙂\t\n  x  "]:
        used_removed += not set(old_tok(text, add_special_tokens=False)["input_ids"]) <= kept
        ids = new_tok(text, add_special_tokens=False)["input_ids"]
        assert new_tok.decode(ids) == text
    assert used_removed >= len(validation)


def test_pruned_sentencepiece_model_encodes_like_the_pruned_fast_tokenizer(pruned_openba, corpus):
    out, _ = pruned_openba
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(str(out))
    assert sp.get_piece_size() == len(fast)
    assert [sp.id_to_piece(i) for i in range(len(fast))] == fast.convert_ids_to_tokens(list(range(len(fast))))
    chunks = text_chunks(list(corpus["train"]["text"])[:5]) + text_chunks(list(corpus["validation"]["text"]))
    same = sum(sp.encode(t) == fast(t, add_special_tokens=False)["input_ids"] for t in chunks)
    assert same == len(chunks)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)


def test_byte_level_bpe_in_domain_text_encodes_to_remapped_ids(llama_dirs, pruned_llamas, corpus):
    out, _ = pruned_llamas[False]
    in_domain, others = check_in_domain(llama_dirs[False], out, text_lines(list(corpus["train"]["text"])[:10]))
    assert in_domain > 50 and others > 10
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("naïve café 東京 🙂 zzqx")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<s>") == 0  # the post-processor's BOS id was remapped
    assert tokenizer.decode(ids[1:]) == "naïve café 東京 🙂 zzqx"
    n = len(tokenizer)  # added tokens stay after the model vocabulary, in their order
    assert tokenizer("<|im_start|><|user|>x", add_special_tokens=False)["input_ids"][:2] == [n - 2, n - 1]


def test_bpe_merges_only_reference_kept_tokens_and_every_kept_token_is_producible(bpe_tokenizer_dir, pruned_llamas):
    out, _ = pruned_llamas[False]
    files = read_tokenizer_files(out)
    vocab = files.model_vocab()
    merges = [tuple(m) for m in files.model["merges"]]
    original = read_tokenizer_files(bpe_tokenizer_dir)
    assert 0 < len(merges) < len(original.model["merges"])
    produced = {a + b for a, b in merges}
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet <= set(vocab)
    assert all(t in produced or t in alphabet for t in vocab if t not in ("<s>", "</s>", "<unk>"))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    for token in list(vocab)[300::40]:  # every kept token still comes out of its own text
        assert tokenizer.convert_ids_to_tokens(tokenizer(tokenizer.convert_tokens_to_string([token]),
                                                         add_special_tokens=False)["input_ids"]) == [token]


def test_sentencepiece_pruning_reports_how_much_text_keeps_its_segmentation(pruned_openba, corpus):
    check = pruned_openba[1].metrics["check"]
    # every held-out document (how many depends on the Python version whose library texts make the corpus)
    assert check["documents"] == len(corpus["validation"]) > 0 and check["decode_matches_original"] == 1.0
    assert 0.5 < check["same_tokens"] < 1.0 and check["token_growth"] > 1.0  # pieces were removed, text still fits


def _other_tokenizer(kind: str, texts: list[str]) -> PreTrainedTokenizerFast:
    """WordLevel, WordPiece, or a Metaspace Unigram WITHOUT byte fallback (so its alphabet must survive)."""
    if kind == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    else:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]"], unk_token="[UNK]",
                                          show_progress=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace() if kind == "unigram" else pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.Metaspace() if kind == "unigram" else decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


@pytest.mark.parametrize("kind", ["wordlevel", "wordpiece", "unigram"])
def test_tokenizer_surgery_on_other_tokenizer_models(kind, corpus, workdir):
    texts = list(corpus["train"]["text"])[:10]
    source, out = workdir / f"{kind}-tokenizer", workdir / f"{kind}-pruned"
    original = _other_tokenizer(kind, texts)
    original.save_pretrained(str(source))
    files = read_tokenizer_files(source)
    config = VocabConfig(coverage=0.8)
    counts = count_tokens(original, texts, config, files)
    selection = select_tokens(counts, files, required_tokens(files), coverage=0.8)
    assert len(selection.keep) < len(files)
    write_pruned_tokenizer(files, selection.keep, out)
    # WordLevel maps removed words to [UNK]; the others keep their alphabet, so nothing new becomes [UNK]
    in_domain, others = check_in_domain(source, out, text_lines(texts[:6]), lossless=kind != "wordlevel")
    assert in_domain >= 10 and others >= 5


def test_slow_bpe_files_and_added_token_maps_are_rewritten_with_the_fast_one(bpe_tokenizer_dir, pruned_llamas,
                                                                            sp_tokenizer_dir, workdir):
    source = workdir / "bpe-with-slow-files"
    shutil.copytree(bpe_tokenizer_dir, source)
    shutil.copy(sp_tokenizer_dir / "tokenizer.model", source)  # stands for Llama-2's SentencePiece BPE model
    model = read_tokenizer_files(source).model
    (source / "vocab.json").write_text(json.dumps(model["vocab"]))
    (source / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
    (source / "added_tokens.json").write_text(json.dumps({"<|im_start|>": BPE_VOCAB, "<|user|>": BPE_VOCAB + 1}))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(BPE_VOCAB): {"content": "<|im_start|>", "special": True},
                                      str(BPE_VOCAB + 1): {"content": "<|user|>", "special": False}}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    out = workdir / "bpe-slow-pruned"
    keep = kept_ids(bpe_tokenizer_dir, pruned_llamas[False][0])
    write_pruned_tokenizer(read_tokenizer_files(source), keep, out)
    pruned = read_tokenizer_files(out).model
    assert json.loads((out / "vocab.json").read_text()) == pruned["vocab"]
    merges = (out / "merges.txt").read_text().splitlines()[1:]
    assert merges == [f"{a} {b}" for a, b in pruned["merges"]]
    n = len(keep)
    assert json.loads((out / "added_tokens.json").read_text()) == {"<|im_start|>": n - 2, "<|user|>": n - 1}
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {k: v["content"] for k, v in decoder.items()} == {str(n - 2): "<|im_start|>", str(n - 1): "<|user|>"}
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|user|>"]) == [n - 2, n - 1]
    assert not (out / "tokenizer.model").exists()  # not a unigram model: left out rather than left stale


# --- the model -----------------------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :7]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["openba", "llama-untied", "llama-tied", "t5-tied"])
def test_logits_on_kept_tokens_equal_the_original(name, openba_dir, pruned_openba, llama_dirs, pruned_llamas,
                                                  t5_tied_dir, corpus, workdir):
    if name == "openba":
        original, (out, _) = openba_dir, pruned_openba
    elif name.startswith("llama"):
        tied = name == "llama-tied"
        original, (out, _) = llama_dirs[tied], pruned_llamas[tied]
    else:
        original, out = t5_tied_dir, workdir / "t5-pruned"
        prune_vocabulary(t5_tied_dir, out, VocabConfig(coverage=0.9), corpus=corpus)
    auto = AutoModelForSeq2SeqLM if name in ("openba", "t5-tied") else AutoModelForCausalLM
    before, after = auto.from_pretrained(str(original)).eval(), auto.from_pretrained(str(out)).eval()
    keep = torch.tensor(kept_ids(original, out))
    assert after.config.vocab_size % 128 == 0 and after.config.vocab_size >= len(keep) > 0
    assert len(keep) < before.config.vocab_size
    new_ids = torch.randint(0, len(keep), (2, 16), generator=torch.Generator().manual_seed(0))
    old_logits, new_logits = _logits(before, keep[new_ids]), _logits(after, new_ids)
    assert torch.equal(new_logits[..., : len(keep)], old_logits[..., keep])
    embed = after.get_input_embeddings().weight
    assert torch.equal(embed[: len(keep)], before.get_input_embeddings().weight[keep])
    assert not embed[len(keep):].any()  # padding rows hold zeros
    tied = name.endswith("-tied")
    assert (after.get_output_embeddings().weight is embed) == tied


def test_slice_vocabulary_keeps_kept_logits_for_every_family(family, tmp_path):
    model = tiny_model(family)
    keep = sorted(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:50].tolist())
    inputs = model_inputs(model)
    old_to_new = torch.full((VOCAB,), -1, dtype=torch.long)
    old_to_new[keep] = torch.arange(len(keep))
    inputs = {k: torch.tensor(keep)[v % len(keep)] for k, v in inputs.items()}  # kept ids only
    with torch.no_grad():
        before = model(**inputs).logits
        slice_vocabulary(model, keep, pad_to=64)
        after = model(**{k: old_to_new[v] for k, v in inputs.items()}).logits
    assert after.shape[-1] == model.config.vocab_size == 64
    assert torch.equal(after[..., : len(keep)], before[..., keep])
    model.save_pretrained(str(tmp_path))
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**{k: old_to_new[v] for k, v in inputs.items()}).logits, after)


def test_padding_rows_get_no_probability_with_a_head_bias_and_are_suppressed_without(pruned_openba, pruned_llamas):
    out, manifest = pruned_openba
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    n = manifest.metrics["tokens_after"]
    ids = torch.randint(0, n, (1, 10), generator=torch.Generator().manual_seed(1))
    probs = _logits(model, ids).softmax(-1)
    assert probs[..., n:].max().item() == 0.0 and torch.all(model.lm_head.bias[n:] == -1e4)
    assert manifest.metrics["padding_masked"]
    llama_out, llama_manifest = pruned_llamas[False]
    generation = json.loads((llama_out / "generation_config.json").read_text())
    padding = list(range(llama_manifest.metrics["tokens_after"], llama_manifest.metrics["rows_after"]))
    assert padding and set(padding) <= set(generation["suppress_tokens"])
    assert not llama_manifest.metrics["padding_masked"]


def test_config_token_ids_follow_their_tokens(pruned_openba, pruned_llamas):
    out, _ = pruned_openba
    config = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert config["pad_token_id"] == config["decoder_start_token_id"] == tokenizer.pad_token_id == 0
    assert config["eos_token_id"] == tokenizer.eos_token_id == 1
    llama_out, _ = pruned_llamas[True]
    config = json.loads((llama_out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(llama_out))
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_pruning_nothing_is_the_identity(openba_dir, corpus, workdir):
    out = workdir / "openba-identity"
    prune_vocabulary(openba_dir, out, VocabConfig(keep=SP_VOCAB, pad_to=1), corpus=corpus["validation"])
    before = AutoModelForSeq2SeqLM.from_pretrained(str(openba_dir))
    after = AutoModelForSeq2SeqLM.from_pretrained(str(out))
    state_before, state_after = before.state_dict(), after.state_dict()
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert json.loads((out / "tokenizer.json").read_text())["model"] == \
        json.loads((openba_dir / "tokenizer.json").read_text())["model"]
    assert (out / "tokenizer.model").read_bytes() == (openba_dir / "tokenizer.model").read_bytes()


def test_specials_sentinels_mode_tokens_and_bytes_are_always_kept(openba_dir, sp_tokenizer_dir, corpus, workdir):
    files = read_tokenizer_files(openba_dir)
    required = required_tokens(files)
    minimum = sum(len(ids) for ids in required.values())
    out = workdir / "openba-minimal"
    prune_vocabulary(openba_dir, out, VocabConfig(keep=minimum), corpus=corpus)
    original, pruned = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)), AutoTokenizer.from_pretrained(str(out))
    assert len(pruned) == minimum
    kept = set(pruned.get_vocab())
    for token in original.all_special_tokens + [f"<0x{b:02X}>" for b in range(256)]:
        assert token in kept
    assert len(sentinel_ids(pruned)) == 100 and set(mode_token_ids(pruned)) == {"R", "S", "X"}
    pieces = sentencepiece_pieces((out / "tokenizer.model").read_bytes())
    anchor = files.tokens()[required["min-score anchor"][0]]
    assert sorted(p.text for p in pieces if p.type == 1) == sorted(["\u2581", anchor])  # normal pieces: forced ones
    text = list(corpus["validation"]["text"])[0][:2000]
    assert pruned.decode(pruned(text, add_special_tokens=False)["input_ids"]) == text  # all bytes now


# --- selection and counting ----------------------------------------------------------------------------------------
def test_coverage_keeps_the_fewest_most_frequent_tokens(openba_dir, corpus):
    files = read_tokenizer_files(openba_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(openba_dir))
    counts = count_tokens(tokenizer, corpus, VocabConfig(coverage=0.8), files)
    required = required_tokens(files)
    selection = select_tokens(counts, files, required, coverage=0.8)
    forced = {i for ids in required.values() for i in ids}
    chosen = [i for i in selection.keep if i not in forced]
    c = counts.counts
    assert c[selection.keep].sum() >= 0.8 * counts.total
    assert c[selection.keep].sum() - c[chosen].min() < 0.8 * counts.total  # one fewer would not reach it
    dropped = sorted(set(range(len(c))) - set(selection.keep))
    assert c[dropped].max() <= c[chosen].min()
    assert selection.coverage == pytest.approx(float(c[selection.keep].sum()) / counts.total)


def test_counts_are_saved_and_reused_without_recounting(pruned_openba, openba_dir, workdir):
    out, manifest = pruned_openba
    counts = load_token_counts(out / "scores", read_tokenizer_files(openba_dir))
    assert counts.total == manifest.metrics["corpus_tokens"] and len(counts.counts) == SP_VOCAB
    again = workdir / "openba-from-counts"
    second = prune_vocabulary(openba_dir, again, VocabConfig(coverage=0.9, counts=str(out / "scores")))
    assert (again / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert second.metrics["corpus_coverage"] == manifest.metrics["corpus_coverage"]
    with pytest.raises(UserError, match="another tokenizer"):
        load_token_counts(out / "scores", read_tokenizer_files(out))


def test_counting_reads_text_files_and_saved_datasets(openba_dir, corpus, workdir):
    tokenizer = AutoTokenizer.from_pretrained(str(openba_dir))
    texts = list(corpus["validation"]["text"])
    folder = workdir / "text-files"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text)
    corpus["validation"].save_to_disk(str(workdir / "validation-dataset"))
    expected = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    config = VocabConfig(coverage=1.0)
    from_files = count_tokens(tokenizer, str(folder), config)
    from_dataset = count_tokens(tokenizer, str(workdir / "validation-dataset"), config)
    assert from_dataset.total == expected and from_dataset.documents == len(texts)
    assert abs(from_files.total - expected) <= 0.01 * expected  # files are read in chunks of whole lines


# --- bad input: a UserError before anything is written -------------------------------------------------------------
def _nothing_written(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_keeping_fewer_tokens_than_required_is_an_error(openba_dir, corpus, workdir):
    out = workdir / "too-few"
    with pytest.raises(UserError, match="must stay"):
        prune_vocabulary(openba_dir, out, VocabConfig(keep=50), corpus=corpus)
    assert _nothing_written(out)


def test_an_empty_corpus_is_an_error(openba_dir, workdir):
    out = workdir / "empty"
    with pytest.raises(UserError, match="empty"):
        prune_vocabulary(openba_dir, out, VocabConfig(keep=500), corpus=datasets.Dataset.from_dict({"text": []}))
    with pytest.raises(UserError, match="empty"):
        prune_vocabulary(openba_dir, out, VocabConfig(keep=500), corpus=["", ""])
    assert _nothing_written(out)


def test_a_corpus_from_another_tokenizer_is_an_error(openba_dir, bpe_tokenizer_dir, corpus, workdir):
    out = workdir / "foreign"
    too_big = datasets.Dataset.from_dict({"input_ids": [[5, 7, SP_VOCAB + 10]]})
    with pytest.raises(UserError, match="another tokenizer"):
        prune_vocabulary(openba_dir, out, VocabConfig(keep=500), corpus=too_big)
    bpe = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))  # its ids are all < SP_VOCAB, but mean other text
    texts = list(corpus["validation"]["text"])
    bpe_ids = datasets.Dataset.from_dict({"input_ids": bpe(texts, add_special_tokens=False)["input_ids"]})
    with pytest.raises(UserError, match="another tokenizer"):
        prune_vocabulary(openba_dir, out, VocabConfig(keep=500), corpus=bpe_ids)
    sp = AutoTokenizer.from_pretrained(str(openba_dir))  # the same tokenizer's ids are accepted
    own = datasets.Dataset.from_dict({"input_ids": sp(texts, add_special_tokens=False)["input_ids"]})
    assert count_tokens(sp, own, VocabConfig(keep=500)).total == sum(len(r) for r in own["input_ids"])
    with pytest.raises(UserError, match="byte fallback"):
        prune_vocabulary(openba_dir, out, VocabConfig(keep=500), corpus=["東京都の天気は晴れです。" * 20])
    assert _nothing_written(out)


# --- command line --------------------------------------------------------------------------------------------------
def test_cli_prunes_a_checkpoint_and_prints_a_summary(openba_dir, corpus, workdir, capsys):
    corpus_dir = workdir / "corpus-saved"
    corpus.save_to_disk(str(corpus_dir))
    out = workdir / "cli-out"
    main(["--model", str(openba_dir), "--corpus", str(corpus_dir), "--keep", "600", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "tokenizer ids" in printed and "corpus coverage" in printed and "same segmentation" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "vocab" and manifest["metrics"]["tokens_after"] == 600
    assert manifest["metrics"]["rows_after"] == 640
    assert len(AutoTokenizer.from_pretrained(str(out))) == 600
    plan = PlannedModel(AutoConfig.from_pretrained(str(openba_dir)))  # the dry run plans the same rows
    assert KIND.shape_after(VocabConfig(keep=600), plan.shape, plan) == replace(plan.shape, vocab=640)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(openba_dir), "--corpus", str(corpus_dir), "--keep", "10", "--out", str(workdir / "x")])
    assert exit_info.value.code == 2 and "error: keep=10" in capsys.readouterr().err


def test_the_plan_bounds_a_coverage_prune_and_says_the_corpus_decides(llama_dirs, pruned_llamas):
    for tied, (_, manifest) in pruned_llamas.items():
        plan = PlannedModel(AutoConfig.from_pretrained(str(llama_dirs[tied])))
        result = KIND.shape_after(VocabConfig(coverage=0.9), plan.shape, plan)
        assert isinstance(result, Estimate) and "coverage 0.9" in result.note and "corpus" in result.note
        assert manifest.metrics["rows_after"] <= result.shape.vocab == padded_size(plan.shape.vocab, 128)


@pytest.mark.parametrize("flags, message", [
    (["--keep", "600", "--coverage", "0.9"], "give only one of keep"),
    ([], "say how much to keep"),
    (["--keep", "600", "--no-corpus"], "no corpus to count"),
    (["--keep", "600", "--counts", "nowhere"], "no token counts at nowhere"),
])
def test_cli_refuses_bad_requests_before_writing(openba_dir, corpus, workdir, tmp_path, capsys, flags, message):
    from tests.core.test_out_policy import refused

    corpus_dir = workdir / "corpus-saved"
    if not corpus_dir.exists():
        corpus.save_to_disk(str(corpus_dir))
    source = [] if "--no-corpus" in flags or "--counts" in flags else ["--corpus", str(corpus_dir)]
    flags = [flag for flag in flags if flag != "--no-corpus"]
    error = refused(lambda model, out: main(["--model", str(model), *source, *flags, "--out", str(out)]),
                    openba_dir, tmp_path / "out", tmp_path, capsys)
    assert message in error


def test_cli_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:\n  python -m compress.vocab --model" in capsys.readouterr().out


def test_cli_help_says_what_padding_costs_a_head_without_bias(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps lines, also at hyphens
    assert "they get logit 0, so they take probability mass in the softmax unless suppressed" in text
    assert "exact log-likelihoods need --pad-to 1" in text and "(-1e4): probability 0" in text


@pytest.mark.slow
def test_pruned_decoder_only_checkpoint_runs_in_lm_eval(pruned_llamas, workdir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out, _ = pruned_llamas[False]
    data = workdir / "lm-eval-data.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(4)))
    tasks = workdir / "lm-eval-tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "vocab_ppl.yaml").write_text(
        "task: vocab_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    results = simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["vocab_ppl"],
                              device="cpu", batch_size=2, task_manager=TaskManager(include_path=str(tasks)))
    bits = results["results"]["vocab_ppl"]["bits_per_byte,none"]
    assert bits == bits and 0 < bits < 100  # finite: padding rows and the tokenizer load in the harness
