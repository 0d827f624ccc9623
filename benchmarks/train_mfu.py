"""Training throughput and model FLOPs utilisation (MFU) of the project's trainer, Llama-shaped and OpenBA-shaped.

Each model trains through `pretrain.trainer.Trainer` (its engine: AdamW, clipping, the schedule, autocast bf16 and
the attention kernel it picks), on fixed random batches. The first --warmup steps are dropped; the rest give step
time and tokens/s from the trainer's own metrics. Checkpoint writing is left out (not part of a step: a 1B model's
optimizer state is ~13 GB to disk).

    MFU         = 6 * N * tokens/s / peak   (issue 19's definition: N = every parameter, attention not counted)
    counted MFU = the weight matmuls' FLOPs of one forward and backward, counted by torch.utils.flop_counter,
                  / step time / peak   (attention not counted either; the embedding lookup is no matmul)

OpenBA's tokens are encoder + decoder tokens. 6*N*T then charges every parameter to every token although an
encoder token passes only the encoder (and the decoder's cross-attention keys and values) and a decoder token only
the decoder, so for an encoder-decoder the counted MFU is the one to compare with Llama's.

Sizes (--size 1b; --batch and --seq change the batch):
    llama   TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 query / 4 kv heads, SwiGLU 5632, vocab 32000
            (untied): 1.10B; 4 x 2048 tokens per step
    openba  OpenBA's proportions at 1B: hidden 2048, 4 encoder / 12 decoder layers (1:3 as 12:36), 16 heads of
            128, SwiGLU 5632, vocab 32000 (untied): 1.15B; 4 x (1152 encoder + 768 decoder) tokens (V2's 0.6 split)
    --size tiny: the same families at hidden 64 on the CPU, in seconds.

Peak: bf16 dense tensor-core TFLOPS by card name (H100 SXM and H200 989, H100 PCIe 756, A100 312; NVIDIA data
sheets) or --peak-tflops. Without either (a CPU) MFU is not printed.

    python benchmarks/train_mfu.py --size tiny
    python benchmarks/train_mfu.py --size 1b --steps 10 --json $OUT/train_mfu.json          # a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.table import format_table, human_count  # noqa: E402

PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


@dataclasses.dataclass
class Shape:
    """One benchmark model and its batch: `seq` tokens per row (OpenBA: `seq` encoder + `target` decoder)."""

    family: str
    config: dict
    batch: int
    seq: int
    target: int = 0


SIZES = {
    "1b": {
        "llama": Shape("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4),
                       batch=4, seq=2048),
        "openba": Shape("openba", dict(vocab_size=32000, hidden_size=2048, kv_channels=128, num_heads=16,
                                       ffn_hidden_size=5632, num_layers=4, num_decoder_layers=12, hidden_dropout=0.0,
                                       attention_dropout=0.0),
                        batch=4, seq=1152, target=768),
    },
    "tiny": {
        "llama": Shape("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2),
                       batch=2, seq=64),
        "openba": Shape("openba", dict(vocab_size=512, hidden_size=64, kv_channels=16, num_heads=4,
                                       ffn_hidden_size=176, num_layers=1, num_decoder_layers=2, hidden_dropout=0.0,
                                       attention_dropout=0.0),
                        batch=2, seq=48, target=32),
    },
}


def build_model(shape: Shape, device: torch.device):
    """Random weights, initialised on `device` (a 1B model initialised on the host takes a while)."""
    from transformers import AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

    from core.openba import openba_config

    torch.manual_seed(0)
    with torch.device(device):  # supported lengths cover the batch, or the trainer refuses it
        if shape.family == "llama":
            return LlamaForCausalLM(LlamaConfig(**shape.config, max_position_embeddings=max(shape.seq, 512)))
        return AutoModelForSeq2SeqLM.from_config(openba_config(
            "openba-tiny", **shape.config, max_seq_length=shape.seq, decoder_max_seq_length=shape.target))


def segment_attention_runs(device: torch.device) -> bool:
    """OpenBA takes flash-attn's varlen kernel when given segment ids, on CUDA, with flash-attn installed."""
    from core.openba.modeling_openba import load_flash_varlen

    return device.type == "cuda" and load_flash_varlen() is not None


def make_batches(shape: Shape, count: int, segments: bool) -> list[dict[str, torch.Tensor]]:
    """`count` distinct batches of random ids (the trainer cycles them); one document per row, no padding."""
    generator = torch.Generator().manual_seed(1)
    vocab = shape.config["vocab_size"]
    made = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (shape.batch, shape.seq), generator=generator)
        if shape.family == "llama":
            made.append({"input_ids": ids, "labels": ids.clone()})
            continue
        labels = torch.randint(3, vocab, (shape.batch, shape.target), generator=generator)
        decoder_ids = torch.cat([torch.zeros(shape.batch, 1, dtype=torch.long), labels[:, :-1]], dim=1)
        batch = {"input_ids": ids, "decoder_input_ids": decoder_ids, "labels": labels}
        if segments:  # one segment per row: the same attention, through flash-attn's varlen kernel
            batch["encoder_segment_ids"] = torch.ones_like(ids)
            batch["decoder_segment_ids"] = torch.ones_like(labels)
        made.append(batch)
    return made


def counted_flops(model, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """Weight-matmul FLOPs of one forward and backward over `batch`, counted by torch on its first row and scaled
    by the rows (linear in rows; one row keeps the count's memory small). Only matrix products (mm, addmm, bmm)
    count: attention kernels are counted on some devices and not others, and 6 * N * T leaves attention out too."""
    from torch.utils.flop_counter import FlopCounterMode

    matmuls = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}
    rows = next(iter(batch.values())).shape[0]
    one = {k: v[:1].to(device) for k, v in batch.items() if not k.endswith("segment_ids")}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with FlopCounterMode(display=False) as counter, autocast:
        model(**one, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts().get("Global", {})
    return float(sum(flops for op, flops in counts.items() if op in matmuls)) * rows


@contextlib.contextmanager
def checkpoints_not_written():
    """The trainer saves at its last step; the benchmark times steps, not a 13 GB write."""
    import pretrain.trainer.loop as loop

    saved = loop.save_training_checkpoint
    loop.save_training_checkpoint = lambda *args, **kwargs: None
    try:
        yield
    finally:
        loop.save_training_checkpoint = saved


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((peak for card, peak in PEAK_BF16_TFLOPS if card in name), None)


def measure(shape: Shape, steps: int, warmup: int, device: torch.device, peak: float | None) -> dict:
    """Train `warmup + steps` steps through the project's Trainer and read its per-step metrics."""
    from pretrain.trainer import Trainer, TrainConfig, read_metrics, TRAIN_INFO

    model = build_model(shape, device)
    params = sum(p.numel() for p in model.parameters())
    segments = shape.family == "openba" and segment_attention_runs(device)
    data = make_batches(shape, 4, segments)
    flops_per_step = counted_flops(model, data[0], device)
    config = TrainConfig(steps=warmup + steps, lr=1e-4, min_lr=1e-4, schedule="constant", save_every=0,
                         log_every=1, micro_batch_size=shape.batch, seed=0)
    with tempfile.TemporaryDirectory() as work, checkpoints_not_written():
        trainer = Trainer(model, config, data)
        trainer.train(work)
        records = [r for r in read_metrics(Path(work)) if "tokens_per_s" in r]
        info = json.loads((Path(work) / TRAIN_INFO).read_text())
    tokens_per_step = records[0]["tokens"]  # the trainer's own count: encoder + decoder tokens for OpenBA
    timed = records[warmup:]
    seconds = [tokens_per_step / r["tokens_per_s"] for r in timed]
    step_time = sum(seconds) / len(seconds)
    tokens_per_s = tokens_per_step / step_time
    kernel = info["attn_implementation"]
    if segments:
        kernel = "flash-attn varlen (OpenBA segment ids)"
    elif kernel == "sdpa":
        kernel = "sdpa (torch picks flash / mem-efficient / math)"
    result = {
        "model": shape.family, "params": params, "batch": shape.batch, "seq": shape.seq,
        "decoder_seq": shape.target or None, "tokens_per_step": tokens_per_step,
        "expected_tokens_per_step": shape.batch * (shape.seq + shape.target), "steps_timed": len(timed),
        "step_time_s": step_time, "step_time_median_s": statistics.median(seconds), "tokens_per_s": tokens_per_s,
        "counted_flops_per_step": flops_per_step, "kernel": kernel,
        "dtype": "bfloat16 autocast" if info["bf16"] else "float32", "engine": info["engine"],
        "device": device_name(device), "peak_tflops": peak, "final_loss": timed[-1]["step_loss"],
    }
    if peak:
        result["mfu"] = 6 * params * tokens_per_s / (peak * 1e12)
        result["counted_mfu"] = flops_per_step / step_time / (peak * 1e12)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--models", default="llama,openba", help="comma-separated: llama, openba")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped first (kernel choice, allocator)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: the size's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row; OpenBA splits them 0.6 / 0.4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: by card name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models.split(",") if name not in SIZES[args.size]]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from llama, openba")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if args.size != "tiny" and not args.device.startswith("cuda"):
        raise SystemExit(f"--size {args.size} trains a 1B model: that needs a GPU (--size tiny runs on a CPU)")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    peak = peak_tflops(device_name(device), args.peak_tflops)
    results = []
    for name in args.models.split(","):
        shape = dataclasses.replace(SIZES[args.size][name])
        if args.batch:
            shape.batch = args.batch
        if args.seq and shape.family == "openba":
            shape.seq, shape.target = round(args.seq * 0.6), args.seq - round(args.seq * 0.6)
        elif args.seq:
            shape.seq = args.seq
        results.append(measure(shape, args.steps, args.warmup, device, peak))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [[r["model"], human_count(r["params"]), r["tokens_per_step"], f"{r['step_time_s'] * 1000:.1f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.3f}" if "mfu" in r else "n/a",
             f"{r['counted_mfu']:.3f}" if "counted_mfu" in r else "n/a", r["kernel"], r["dtype"]] for r in results]
    print(f"{results[0]['device']}, peak {f'{peak:g} TFLOPS' if peak else 'unknown (MFU not computed)'}; "
          f"{args.steps} timed steps after {args.warmup}; OpenBA tokens = encoder + decoder tokens")
    print(format_table(rows, ["model", "params", "tokens/step", "step ms", "tokens/s", "MFU 6NT", "counted MFU",
                              "attention kernel", "compute"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "rows": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
