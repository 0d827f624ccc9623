"""Forward-pass speed-up of neuron-pruned models against their parameter ratio, measured side by side in one run.

Structured pruning only pays if smaller dense matrices run proportionally faster. For an OpenBA-shaped and a
Llama-shaped model (a bit larger than the test models, so matrix products dominate on a CPU), 50% of FFN channels
and 50% of kv groups are pruned; original and pruned forward passes alternate, and the median of each is compared.
Target (issue 3): speed-up >= 0.8 x parameter ratio.

    python benchmarks/pruned_speedup.py [--repeats 7] [--batch 4] [--seq 256] [--threads 1]
    python benchmarks/pruned_speedup.py --device cuda --bf16 --batch 16 --seq 1024 --scale 4   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.adapters import get_adapter  # noqa: E402
from compress.neuron import prune_neurons  # noqa: E402
from compress.scorers import seeded_generator  # noqa: E402
from core.checkpoint import count_parameters  # noqa: E402
from core.table import format_table, human_count  # noqa: E402

VOCAB = 8192


def openba_model(scale: int):
    from transformers import AutoModelForSeq2SeqLM

    from core.openba import openba_config

    config = openba_config("openba-tiny", vocab_size=VOCAB, hidden_size=512 * scale, kv_channels=32 * scale,
                           num_heads=20, ffn_hidden_size=1376 * scale, num_layers=2, num_decoder_layers=6)
    return AutoModelForSeq2SeqLM.from_config(config)


def llama_model(scale: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512 * scale, intermediate_size=1408 * scale,
                         num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def random_scores(model) -> dict[str, torch.Tensor]:
    """OpenBA-V2's baseline (random masks): the choice does not change the speed, only the widths do."""
    adapter = get_adapter(model)
    scores = {}
    for stack, i, block in adapter.all_blocks():
        name = f"channels.{stack}.{i}"
        scores[name] = torch.rand(adapter.mlp(block).width, generator=seeded_generator(0, name))
        for view in adapter.attentions(block):
            name = f"heads.{stack}.{view.kind}.{i}"
            scores[name] = torch.rand(view.num_heads, generator=seeded_generator(0, name))
    return scores


def inputs_for(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq // 2), generator=generator)
    return {k: v.to(model.device) for k, v in inputs.items()}


def timed(model, inputs) -> float:
    """Wall time of one forward pass; on CUDA, the kernels' time too (queued work is waited for)."""
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=False)
    synchronize()
    return time.perf_counter() - start


def measure(name: str, build, args) -> list:
    torch.manual_seed(0)
    original = build(args.scale).eval()
    pruned = build(args.scale).eval()
    pruned.load_state_dict(original.state_dict())
    prune_neurons(pruned, random_scores(pruned), ffn_ratio=0.5, head_ratio=0.5)
    original, pruned = original.to(args.device, args.dtype), pruned.to(args.device, args.dtype)
    inputs = inputs_for(original, args.batch, args.seq)
    for model in (original, pruned):  # warm-up: allocator and kernel choice
        timed(model, inputs)
    times = {"original": [], "pruned": []}
    for _ in range(args.repeats):  # alternate so that drifting machine load hits both alike
        times["original"].append(timed(original, inputs))
        times["pruned"].append(timed(pruned, inputs))
    before, after = count_parameters(original), count_parameters(pruned)
    t_before, t_after = statistics.median(times["original"]), statistics.median(times["pruned"])
    param_ratio, speedup = before / after, t_before / t_after
    return [name, human_count(before), human_count(after), param_ratio, f"{t_before * 1e3:.1f}",
            f"{t_after * 1e3:.1f}", speedup, speedup / param_ratio, "yes" if speedup >= 0.8 * param_ratio else "NO"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    # one thread by default: on a shared CPU, multi-threaded kernels wait on busy cores and the timings swing
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--scale", type=int, default=1, help="widths x scale (hidden, head size, FFN); a GPU needs "
                        "wide matrices before their products, not kernel launches, set the time")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (fp32 otherwise)")
    args = parser.parse_args()
    args.dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = 512 * args.scale
    rows = [measure(f"openba (2/6 layers, h{hidden}, 20 heads)", openba_model, args),
            measure(f"llama (6 layers, h{hidden}, 16q/8kv heads)", llama_model, args)]
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"50% FFN channels + 50% kv groups pruned; batch {args.batch} x {args.seq} tokens, median of "
          f"{args.repeats} alternating runs, {where}, {args.dtype}")
    print(format_table(rows, ["model", "params", "pruned", "param ratio", "ms before", "ms after", "speed-up",
                              "speed-up / param ratio", ">= 0.8"]))


if __name__ == "__main__":
    main()
