"""Packed against padded training batches: real (non-padding) tokens per second and the share of real tokens.

Both arms train the same small model (a fresh copy each) on the same documents: "padded" puts one example per row
and pads it to the fixed length; "packed" fills rows with several examples under document masks. Each repetition
times `--steps` full training steps (forward, backward, AdamW step) of each arm, alternating which goes first;
the table shows medians over repetitions and their ratios. Steps draw their batches from one whole pass over the
documents, over which the non-padding share is measured too, per side (encoder, decoder) and all together. The
"packed / limit" row compares packed tokens/s with the padded arm's tokens/s divided by its share: what padded
training would reach if every slot held a real token at the same cost per slot.

    python -m benchmarks.packing_throughput --reps 5 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from tqdm.auto import tqdm

from core.errors import main_guard
from core.table import format_table
from pretrain.objectives import CausalLM, ObjectiveMixture, SpecialIds, objective_batches, token_mean_loss, ul2_mixture
from pretrain.objectives import ListDocuments
from pretrain.packing import non_padding_share, padding_stats

SPECIAL = 3  # ids below this are pad / eos / unk


class ChunkTokenizer:
    """Every 4 bytes one id (past pad/eos/unk), about the token count of a real subword tokenizer on this corpus, so
    that document lengths in tokens are realistic; the comparison depends on lengths, not on the vocabulary."""

    eos_token_id = 1
    vocab_size = 256 + SPECIAL

    def __call__(self, text, add_special_tokens=False):
        data = text.encode()
        return {"input_ids": [SPECIAL + int.from_bytes(data[i:i + 4], 'little') % 256 for i in range(0, len(data), 4)]}


def corpus_documents(count: int, tokenizer) -> list[list[int]]:
    from pretrain.corpus import CorpusConfig, build_corpus
    from pretrain.data import TokenizedDocuments

    corpus = build_corpus(CorpusConfig(max_documents=count))["train"]
    return [d.tolist() for d in TokenizedDocuments(corpus, tokenizer, append_eos=True, repeat=False)]


def llama(vocab: int, width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def openba(vocab: int):
    from transformers import AutoModelForSeq2SeqLM

    from core.openba import openba_config

    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(openba_config("openba-tiny", vocab_size=vocab))


def one_pass(make_batches, packed: bool) -> tuple[list[dict], dict[str, float]]:
    """Every batch of one pass over the documents, and the shares of real tokens over the whole pass: all sides
    together, the encoder (or decoder-only) rows, and the decoder rows of an encoder-decoder."""
    batches = make_batches(packed)
    pool = list(iter(lambda: next(batches, None), None))
    stats = batches.stats
    shares = {"all": non_padding_share(stats), "encoder": stats["tokens"] / max(stats["slots"], 1)}
    if stats.get("target_slots"):
        shares["decoder"] = stats["target_tokens"] / stats["target_slots"]
    return pool, shares


def time_steps(model, optimizer, pool, steps: int, rng: random.Random) -> tuple[float, int]:
    """Seconds for `steps` training steps on batches drawn from `pool`, and the real tokens they held."""
    real = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.choice(pool)
        stats = padding_stats(batch, 0)
        real += stats["tokens"] + stats.get("target_tokens", 0)
        loss, _ = token_mean_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, real


def compare(name: str, model, make_batches, reps: int, steps: int) -> list[list]:
    """Median real tokens/s of each arm over interleaved repetitions, the pass's non-padding share, and ratios.

    Steps draw batches at random from a whole pass over the documents, so the timed batches carry the corpus' mix
    of long and short documents rather than whichever documents come first."""
    arms, shares, rngs = {}, {}, {}
    for arm in ("padded", "packed"):
        pool, shares[arm] = one_pass(make_batches, arm == "packed")
        arm_model = copy.deepcopy(model).train()
        arms[arm] = (arm_model, torch.optim.AdamW(arm_model.parameters(), lr=1e-4), pool)
        rngs[arm] = random.Random(0)
        time_steps(*arms[arm], 1, rngs[arm])  # warm-up: first-call allocations and kernel choices
    rates = {arm: [] for arm in arms}
    for rep in tqdm(range(reps), desc=f"{name} repetitions", unit="rep", disable=None):
        for arm in (("padded", "packed") if rep % 2 == 0 else ("packed", "padded")):
            seconds, real = time_steps(*arms[arm], steps, rngs[arm])
            rates[arm].append(real / seconds)
    side = lambda arm, key: shares[arm].get(key, "-")  # noqa: E731
    rows = [[name, arm, len(arms[arm][2]), statistics.median(rates[arm]), side(arm, "encoder"), side(arm, "decoder"),
             side(arm, "all")] for arm in arms]
    ratio = statistics.median(rates["packed"]) / statistics.median(rates["padded"])
    rows.append([name, "packed / padded", len(arms["packed"][2]) / len(arms["padded"][2]), ratio, "", "",
                 shares["packed"]["all"] / shares["padded"]["all"]])
    # the limit: padded tokens/s if every padded slot held a real token at the same cost per slot
    limit = statistics.median(rates["padded"]) / shares["padded"]["all"]
    rows.append([name, "packed / limit", "", statistics.median(rates["packed"]) / limit, "", "", ""])
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.packing_throughput",
        description="Tokens/s and non-padding share of packed vs padded training batches on the same model and data.",
        epilog="example: python -m benchmarks.packing_throughput --reps 5 --steps 4 --seq-len 512",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per arm (median reported)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per repetition and arm")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024, help="decoder-only row length")
    parser.add_argument("--tokenizer", help="a tokenizer saved by pretrain.tokenizer (default: 4-byte chunks)")
    parser.add_argument("--documents", type=int, default=80, help="stdlib corpus documents to draw from")
    parser.add_argument("--models", default="llama,openba", help="comma list: llama (causal LM), openba (UL2 570/380)")
    return parser.parse_args(argv)


@main_guard
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.tokenizer:
        from pretrain.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        ids = SpecialIds.from_tokenizer(tokenizer)
        vocab = len(tokenizer)
    else:
        tokenizer = ChunkTokenizer()
        base = ChunkTokenizer.vocab_size
        ids = SpecialIds(tuple(range(base, base + 100)), {"R": base + 100, "S": base + 101, "X": base + 102})
        vocab = base + 103
    documents = corpus_documents(args.documents, tokenizer)
    rows = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "llama" in models:
        def causal(packed):
            return objective_batches(ListDocuments(documents, repeat=False), ObjectiveMixture([CausalLM()]), batch_size=args.batch_size,
                                     input_length=args.seq_len, encoder_decoder=False, packed=packed)

        rows += compare("llama causal", llama(vocab, 128), causal, args.reps, args.steps)
    if "openba" in models:
        def ul2(packed):
            return objective_batches(ListDocuments(documents, repeat=False), ul2_mixture(ids), batch_size=args.batch_size, input_length=570,
                                     target_length=380, encoder_decoder=True, packed=packed)

        rows += compare("openba UL2", openba(vocab), ul2, args.reps, args.steps)
    print(format_table(rows, ["model", "batches", "batches per pass", "real tokens/s", "encoder share",
                              "decoder share", "non-padding share"]))
    print(f"tokens/s: median of {args.reps} interleaved repetitions of {args.steps} training steps on batches drawn "
          f"from one pass; shares: real tokens / slots over the whole pass, per side (decoder-only rows count as "
          f"encoder) and all sides together; limit = padded tokens/s / padded share; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
