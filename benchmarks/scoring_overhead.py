"""Time of the scoring pass over a plain forward pass on the same batches and model, measured side by side.

Scoring must stay cheap enough to run on real calibration sets: its hooks (block-influence cosines at every block,
|x| and x^2 column sums at every attention output and FFN down projection) should add at most 15% (issue 3).
Both passes go through the same calibration loop (`calibration_pass`, loss included); repetitions alternate
plain / scoring so machine noise hits both alike, and the medians are compared.

    python benchmarks/scoring_overhead.py [--repeats 7] [--batch 4] [--seq 256] [--batches 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.calibration import as_calibration_set, calibration_pass  # noqa: E402
from compress.scoring import score_model  # noqa: E402
from core.checkpoint import count_parameters  # noqa: E402
from core.table import format_table, human_count  # noqa: E402

VOCAB = 8192
SCORERS = {"layers": "block_influence", "heads": "activation", "channels": "wanda"}


def llama_model(width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=int(width * 2.75) // 64 * 64,
                         num_hidden_layers=6, num_attention_heads=width // 64, num_key_value_heads=width // 128,
                         max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def openba_model(width: int):
    from transformers import AutoModelForSeq2SeqLM

    from core.openba import openba_config

    config = openba_config("openba-tiny", vocab_size=VOCAB, hidden_size=width, kv_channels=64, num_heads=width // 64,
                           ffn_hidden_size=int(width * 2.75) // 64 * 64, num_layers=2, num_decoder_layers=6,
                           hidden_dropout=0.0, attention_dropout=0.0)
    return AutoModelForSeq2SeqLM.from_config(config)


def batches(model, count: int, batch: int, seq: int):
    generator = torch.Generator().manual_seed(0)
    made = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
        if model.config.is_encoder_decoder:
            cut = int(seq * 0.6)
            made.append({"input_ids": ids[:, :cut], "labels": ids[:, cut:]})
        else:
            made.append({"input_ids": ids})
    return as_calibration_set(made, model)


def measure(model, calib, repeats: int, device: str) -> tuple[float, float]:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        calibration_pass(model, calib, progress=False)

    def scoring():
        score_model(model, calib, SCORERS, progress=False)

    plain(), scoring()  # warm-up: allocator, kernels, lazy imports
    times = {"plain": [], "scoring": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("scoring", scoring)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["plain"]), statistics.median(times["scoring"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="example: python benchmarks/scoring_overhead.py --repeats 7 --seq 256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--width", type=int, default=512, help="hidden size of the benchmark models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, build in (("llama", llama_model), ("openba", openba_model)):
        torch.manual_seed(0)
        model = build(args.width).to(args.device).eval()
        calib = batches(model, args.batches, args.batch, args.seq)
        plain, scoring = measure(model, calib, args.repeats, args.device)
        rows.append([name, human_count(count_parameters(model)), calib.num_tokens, f"{plain * 1000:.1f}",
                     f"{scoring * 1000:.1f}", f"{scoring / plain:.3f}", "yes" if scoring / plain <= 1.15 else "NO"])
    print(f"device {args.device}, {args.batches} batches x {args.batch} x {args.seq} tokens, "
          f"median of {args.repeats} alternating repetitions; scorers {SCORERS}")
    print(format_table(rows, ["model", "params", "tokens", "plain ms", "scoring ms", "ratio", "<= 1.15"]))


if __name__ == "__main__":
    main()
