"""Vocabulary pruning on T5-style SentencePiece checkpoints whose sentinels live outside the SentencePiece proto.

Two layouts, both built here with `sentencepiece` and `tokenizers` the way the real ones are laid out:
- hub T5 / Flan-T5: `spiece.model` holds N pieces; tokenizer.json's Unigram vocabulary holds those N pieces and then
  `<extra_id_99>` .. `<extra_id_0>` (ids N..N+99), which are also its added tokens; `tokenizer_class: T5Tokenizer`
  with `extra_ids: 100`; an untied T5 v1.1 model with N + 100 rows.
- OpenBA (mT5 pieces + extra ids): `spiece.model` and tokenizer.json's vocabulary hold the N pieces (with byte
  fallback); the sentinels are added tokens only, at N..N+99 with `<extra_id_0>` highest, then `<R>`/`<S>`/`<X>`;
  an OpenBA model (LM head with a bias) with N + 103 rows.
"""

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from compress.tokenizer_surgery import parse_fields, read_tokenizer_files, sentencepiece_pieces
from compress.vocab import main
from pretrain.corpus import CorpusConfig, load_or_build_corpus
from pretrain.objectives.base import SpecialIds
from pretrain.objectives.denoising import spans_to_example
from pretrain.tokenizer import mode_token_ids, round_piece_scores, sentinel_ids
from tests.factory import tiny_model

PIECES = 800
SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
MODES = ["<R>", "<S>", "<X>"]
KEEP = {"t5": 600, "openba": 650}
LAYOUTS = ("t5", "openba")
NORMALIZER_SPEC, PRECOMPILED_CHARSMAP = 3, 2  # sentencepiece_model.proto: ModelProto / NormalizerSpec fields


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("t5-layouts")


@pytest.fixture(scope="module")
def corpus(workdir):
    return load_or_build_corpus(CorpusConfig(max_documents=60), workdir / "corpus")


def train_proto(corpus, byte_fallback: bool) -> bytes:
    """A T5-like unigram model: <pad>=0, </s>=1, <unk>=2, no <s>, NFKC normalisation, dummy prefix."""
    import io

    lines = [line for text in corpus["train"]["text"][:40] for line in text.splitlines() if line.strip()]
    proto = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[:20000]), model_writer=proto, model_type="unigram", vocab_size=PIECES,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=byte_fallback, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2,
    )
    return round_piece_scores(proto.getvalue())  # exact ties, broken alike by SentencePiece and tokenizers


def precompiled_charsmap(proto: bytes) -> bytes:
    spec = next(value for number, _, value in parse_fields(proto) if number == NORMALIZER_SPEC)
    return next(value for number, _, value in parse_fields(spec) if number == PRECOMPILED_CHARSMAP)


def save_t5_style_tokenizer(proto: bytes, out: Path, layout: str) -> None:
    """spiece.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json as the layout holds them."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    byte_fallback = layout == "openba"
    extra = SENTINELS[::-1]  # <extra_id_99> first: <extra_id_0> gets the highest id
    if layout == "t5":
        vocab += [(token, 0.0) for token in extra]
    else:
        extra = extra + MODES
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=byte_fallback))
    tokenizer.normalizer = normalizers.Precompiled(precompiled_charsmap(proto))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    if byte_fallback:  # bytes are joined before "▁" becomes " " (as transformers' SentencePiece converters do)
        tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<pad>", "</s>", "<unk>"]])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "spiece.model").write_bytes(proto)
    additional = SENTINELS if layout == "t5" else SENTINELS + MODES
    decoder = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True}
               for t in ["<pad>", "</s>", "<unk>"] + extra}
    config = {"tokenizer_class": "T5Tokenizer" if layout == "t5" else "PreTrainedTokenizerFast",
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512,
              "additional_special_tokens": additional, "added_tokens_decoder": decoder}
    if layout == "t5":
        config.update(extra_ids=100, sp_model_kwargs={}, legacy=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": additional}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def build_model(layout: str, rows: int):
    if layout == "t5":  # Flan-T5 (T5 v1.1): gated-GELU, untied LM head
        return tiny_model("t5", vocab_size=rows, num_layers=2, num_decoder_layers=2, tie_word_embeddings=False,
                          pad_token_id=0, eos_token_id=1)
    model = tiny_model("openba", vocab_size=rows, hidden_size=64, kv_channels=16, ffn_hidden_size=128)
    with torch.no_grad():  # a trained head's bias is not zero; make it matter
        model.lm_head.bias.normal_()
    return model


@pytest.fixture(scope="module")
def checkpoints(corpus, workdir):
    """{layout: original checkpoint directory}."""
    dirs = {}
    for layout in LAYOUTS:
        out = workdir / layout
        save_t5_style_tokenizer(train_proto(corpus, byte_fallback=layout == "openba"), out, layout)
        build_model(layout, PIECES + 100 + (len(MODES) if layout == "openba" else 0)).save_pretrained(str(out))
        dirs[layout] = out
    return dirs


@pytest.fixture(scope="module")
def pruned(checkpoints, corpus, workdir):
    """{layout: pruned checkpoint directory}, each made by the command line (which exits 0: no SystemExit)."""
    corpus_dir = workdir / "corpus-saved"
    corpus.save_to_disk(str(corpus_dir))
    outs = {}
    for layout, source in checkpoints.items():
        outs[layout] = workdir / f"{layout}-pruned"
        main(["--model", str(source), "--corpus", str(corpus_dir), "--keep", str(KEEP[layout]),
              "--out", str(outs[layout])])
    return outs


def kept_ids(original_dir: Path, pruned_dir: Path) -> list[int]:
    """Old id of every new id, recovered from the token strings (not from the pruner's bookkeeping)."""
    old = {t: i for i, t in enumerate(read_tokenizer_files(original_dir).tokens())}
    return [old[t] for t in read_tokenizer_files(pruned_dir).tokens()]


def corpus_lines(corpus, split="train", documents=10):
    return [line for text in corpus[split]["text"][:documents] for line in text.splitlines() if line.strip()]


def head_bias(model):
    head = model.get_output_embeddings()
    return head.bias if getattr(head, "bias", None) is not None else None


# --- the model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kept_rows_of_embedding_and_head_sit_at_their_new_ids(layout, checkpoints, pruned):
    before = AutoModelForSeq2SeqLM.from_pretrained(str(checkpoints[layout]))
    after = AutoModelForSeq2SeqLM.from_pretrained(str(pruned[layout]))
    keep = kept_ids(checkpoints[layout], pruned[layout])
    manifest = json.loads((pruned[layout] / "manifest.json").read_text())["metrics"]
    assert len(keep) == KEEP[layout] == manifest["tokens_after"] and manifest["tokens_before"] > len(keep)
    rows = after.get_input_embeddings().num_embeddings
    assert rows == manifest["rows_after"] == -(-len(keep) // 128) * 128 == after.config.vocab_size  # padded
    assert torch.equal(after.get_input_embeddings().weight[: len(keep)], before.get_input_embeddings().weight[keep])
    assert torch.equal(after.get_output_embeddings().weight[: len(keep)], before.get_output_embeddings().weight[keep])
    assert not torch.any(after.get_input_embeddings().weight[len(keep):])
    if layout == "openba":  # the head's bias follows its rows; padding rows get a probability of exactly 0
        assert torch.equal(head_bias(after)[: len(keep)], head_bias(before)[keep])
        assert torch.all(head_bias(after)[len(keep):] == -1e4) and manifest["padding_masked"]
    else:  # no bias to mask them with: generation never emits them
        assert head_bias(after) is None and not manifest["padding_masked"]
        assert set(range(len(keep), rows)) <= set(after.generation_config.suppress_tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reloaded_pruned_model_gives_the_original_logits_at_kept_ids(layout, checkpoints, pruned, corpus):
    before = AutoModelForSeq2SeqLM.from_pretrained(str(checkpoints[layout])).eval()
    after = AutoModelForSeq2SeqLM.from_pretrained(str(pruned[layout])).eval()
    old_tok, new_tok = (AutoTokenizer.from_pretrained(str(d)) for d in (checkpoints[layout], pruned[layout]))
    keep = kept_ids(checkpoints[layout], pruned[layout])
    old_to_new = {old: new for new, old in enumerate(keep)}
    lines = [line for line in corpus_lines(corpus) if 8 <= len(line) <= 200]
    compared = 0
    for line in lines:
        old_ids = old_tok(line)["input_ids"]  # with the </s> the post-processor appends
        if not all(i in old_to_new for i in old_ids):
            continue
        new_ids = new_tok(line)["input_ids"]
        assert new_ids == [old_to_new[i] for i in old_ids]
        with torch.no_grad():
            old_logits = before(input_ids=torch.tensor([old_ids]), decoder_input_ids=torch.tensor([[0] + old_ids[:-1]]))
            new_logits = after(input_ids=torch.tensor([new_ids]), decoder_input_ids=torch.tensor([[0] + new_ids[:-1]]))
        torch.testing.assert_close(new_logits.logits[..., : len(keep)], old_logits.logits[..., keep],
                                   rtol=0, atol=1e-5)
        padding = new_logits.logits.softmax(-1)[..., len(keep):]
        if layout == "openba":  # -1e4 bias: the padding rows take no probability, the softmax over kept ids holds
            assert padding.max().item() == 0.0
        else:  # logit 0 without a bias: they take some, which --help says (exact log-likelihoods need --pad-to 1)
            assert padding.min().item() > 0.0
        compared += 1
        if compared == 8:
            break
    assert compared == 8


# --- the tokenizer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sentinels_keep_usable_ids_and_their_embedding_rows(layout, checkpoints, pruned):
    old_tok, new_tok = (AutoTokenizer.from_pretrained(str(d)) for d in (checkpoints[layout], pruned[layout]))
    before = AutoModelForSeq2SeqLM.from_pretrained(str(checkpoints[layout]))
    after = AutoModelForSeq2SeqLM.from_pretrained(str(pruned[layout]))
    old_embed, new_embed = before.get_input_embeddings().weight, after.get_input_embeddings().weight
    specials = SENTINELS + (MODES if layout == "openba" else [])
    new_ids = new_tok.convert_tokens_to_ids(specials)
    assert all(0 <= i < len(new_tok) <= new_embed.shape[0] for i in new_ids) and len(set(new_ids)) == len(specials)
    for token, new_id in zip(specials, new_ids):
        assert torch.equal(new_embed[new_id], old_embed[old_tok.convert_tokens_to_ids(token)]), token
    sentinel = sentinel_ids(new_tok)  # the lookup the UL2 objectives use
    assert sentinel == new_ids[:100] and sentinel[0] == max(sentinel)  # <extra_id_0> is still the highest
    assert sorted(sentinel) == list(range(min(sentinel), min(sentinel) + 100))
    if layout == "openba":
        assert mode_token_ids(new_tok) == dict(zip("RSX", new_ids[100:]))
        ids = SpecialIds.from_tokenizer(new_tok)
        mode = ids.modes["R"]
    else:
        ids, mode = SpecialIds(tuple(sentinel), {}, new_tok.eos_token_id, new_tok.pad_token_id), None
    tokens = new_tok("def f(x):\n    return x + 1", add_special_tokens=False)["input_ids"]
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[2:4] = mask[6:7] = True
    example = spans_to_example(tokens, mask.numpy(), mode, ids, "R", input_eos=False)
    assert "<extra_id_0>" in new_tok.decode(example.inputs) and "<extra_id_1>" in new_tok.decode(example.targets)
    assert new_tok("a <extra_id_0> b <extra_id_99>", add_special_tokens=False)["input_ids"][1::2] == \
        [sentinel[0], sentinel[99]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_files_agree_on_every_special_id(layout, pruned):
    out = pruned[layout]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert type(tokenizer).__name__ == ("T5Tokenizer" if layout == "t5" else "TokenizersBackend")
    tokenizer_json = json.loads((out / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    config = json.loads((out / "tokenizer_config.json").read_text())
    decoder = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    specials = ["<pad>", "</s>", "<unk>"] + SENTINELS + (MODES if layout == "openba" else [])
    expected = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    assert {t: added[t] for t in specials} == {t: decoder[t] for t in specials} == expected
    assert (expected["<pad>"], expected["</s>"], expected["<unk>"]) == (0, 1, 2)
    assert set(special_map["additional_special_tokens"]) == set(specials[3:])
    pieces = sentencepiece_pieces((out / "spiece.model").read_bytes())
    vocab = tokenizer_json["model"]["vocab"]
    assert [p.text for p in pieces] == [piece for piece, _ in vocab[: len(pieces)]]  # the proto: the first ids
    assert len(pieces) == min(expected[t] for t in SENTINELS) == KEEP[layout] - len(specials) + 3
    if layout == "t5":  # the extra ids stay in the Unigram vocabulary as well, as on the hub
        assert [piece for piece, _ in vocab[len(pieces):]] == SENTINELS[::-1]
    else:
        assert len(vocab) == len(pieces)
    assert read_tokenizer_files(out).tokens() == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_domain_text_encodes_to_the_mapped_ids_and_decodes_back(layout, checkpoints, pruned, corpus):
    old_tok, new_tok = (AutoTokenizer.from_pretrained(str(d)) for d in (checkpoints[layout], pruned[layout]))
    old_to_new = {old: new for new, old in enumerate(kept_ids(checkpoints[layout], pruned[layout]))}
    in_domain = others = 0
    for line in corpus_lines(corpus):
        old = old_tok(line, add_special_tokens=False)["input_ids"]
        new = new_tok(line, add_special_tokens=False)["input_ids"]
        if all(i in old_to_new for i in old):
            assert new == [old_to_new[i] for i in old], line
            in_domain += 1
        else:  # re-segmented into kept pieces: T5 keeps its alphabet, OpenBA its bytes, so nothing is lost
            others += 1
        assert new_tok.decode(new) == old_tok.decode(old), line
    assert in_domain > 100 and others > 10
    text = "naïve café 東京 🙂"
    if layout == "openba":  # bytes spell what no piece covers
        assert new_tok.decode(new_tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pruned_spiece_model_encodes_like_the_pruned_tokenizer_json(layout, checkpoints, pruned, corpus):
    lines = corpus_lines(corpus, "validation", documents=None) + corpus_lines(corpus)[:300]
    for directory in (checkpoints[layout], pruned[layout]):
        sp = spm.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
        fast = AutoTokenizer.from_pretrained(str(directory))
        assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == \
            fast.convert_ids_to_tokens(list(range(sp.get_piece_size())))
        assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
        same = sum(sp.encode(line) == fast(line, add_special_tokens=False)["input_ids"] for line in lines)
        assert same == len(lines), directory.name


# --- bad input ----------------------------------------------------------------------------------------------------
def test_a_tokenizer_json_that_extends_the_proto_with_plain_pieces_is_refused(checkpoints, workdir):
    from core.errors import UserError

    stale = workdir / "stale"
    shutil.copytree(checkpoints["openba"], stale)
    tokenizer_json = json.loads((stale / "tokenizer.json").read_text())
    tokenizer_json["model"]["vocab"].append(["\u2581zzqx", -20.0])  # a piece spiece.model does not hold
    (stale / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(UserError, match="not added tokens"):
        read_tokenizer_files(stale)
    tokenizer_json["model"]["vocab"] = tokenizer_json["model"]["vocab"][:-1][::-1]
    (stale / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(UserError, match="same pieces in the same order"):
        read_tokenizer_files(stale)


def test_tokens_named_only_in_special_tokens_map_are_kept(checkpoints, workdir):
    from compress.tokenizer_surgery import required_tokens

    source = workdir / "mask-in-map"
    shutil.copytree(checkpoints["t5"], source)
    files = read_tokenizer_files(source)
    piece = files.tokens()[500]
    assert files.tokens().index(piece) not in {i for ids in required_tokens(files).values() for i in ids}
    special = json.loads((source / "special_tokens_map.json").read_text())
    (source / "special_tokens_map.json").write_text(json.dumps({**special, "mask_token": piece}))
    assert 500 in required_tokens(read_tokenizer_files(source))["special"]


def test_a_t5_with_only_spiece_model_prunes_as_its_hub_layout_does(checkpoints, pruned, corpus, workdir):
    """T5Tokenizer.save_pretrained writes spiece.model without tokenizer.json: the pruner converts it with
    transformers (as the hub's tokenizer.json was made) and prunes it exactly as the hub layout of the same proto."""
    source = workdir / "t5-spiece-only"
    shutil.copytree(checkpoints["t5"], source)
    (source / "tokenizer.json").unlink()
    out = workdir / "t5-spiece-only-pruned"
    main(["--model", str(source), "--corpus", str(workdir / "corpus-saved"), "--keep", str(KEEP["t5"]),
          "--out", str(out)])
    assert read_tokenizer_files(out).tokens() == read_tokenizer_files(pruned["t5"]).tokens()
    assert (out / "tokenizer.json").is_file() and (out / "spiece.model").is_file()
    ours, hub = AutoModelForSeq2SeqLM.from_pretrained(str(out)), AutoModelForSeq2SeqLM.from_pretrained(str(pruned["t5"]))
    assert torch.equal(ours.get_input_embeddings().weight, hub.get_input_embeddings().weight)
    assert torch.equal(ours.get_output_embeddings().weight, hub.get_output_embeddings().weight)
    text = "\n".join(corpus_lines(corpus, "validation", 2))[:400]
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(pruned["t5"]))(text)["input_ids"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    assert sp.encode(text) == AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)["input_ids"]
