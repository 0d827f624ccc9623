"""LOGO's memory claim: a step at a synthesised length of 16x the real length costs what a real step costs.

Three training steps (forward, backward, AdamW) of the LOGO loss on the same model, side by side:

    synthesised   the real context (16 chunks) with positions spread over a window 16x the real length
    real          the same tokens with plain positions 0..k-1
    real x16      a real context 16x longer (plain positions): what the synthesised window stands for

Each configuration runs in its own process, so the peak resident memory (CPU) or peak allocated memory (CUDA) is
its own. Printed: the fastest step's time and peak memory, and the ratios against the real step (target for synthesised:
<= 1.1x in both).

    python benchmarks/logo_memory.py                      # tiny Llama-style model on CPU
    python benchmarks/logo_memory.py --family openba --chunk 64 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.losses import LossConfig  # noqa: E402
from align.objective import PreferenceObjective  # noqa: E402
from align.positions import PositionConfig, sample_generator, synthesize_positions  # noqa: E402
from core.table import format_table  # noqa: E402

VOCAB = 8192


def build_model(family: str, hidden: int, layers: int):
    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 4 // 3 * 2,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                             max_position_embeddings=1 << 20, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    from transformers import AutoModelForSeq2SeqLM

    from core.openba import openba_config

    config = openba_config("openba-tiny", vocab_size=VOCAB, hidden_size=hidden, num_layers=max(1, layers // 3),
                           num_decoder_layers=layers, max_seq_length=1 << 20, decoder_max_seq_length=1 << 20)
    return AutoModelForSeq2SeqLM.from_config(config)


def make_batch(chunks: int, chunk: int, responses: int, response: int, window: int | None, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    context = chunks * chunk
    question = 16
    prompt = torch.randint(3, VOCAB, (1, context + question), generator=generator)
    tail = question + response
    if window is None:
        positions = torch.arange(context + question)[None]
    else:
        position = PositionConfig(window=window, chunk_size=chunk, max_chunks=chunks)
        positions, _ = synthesize_positions([chunk] * chunks, tail, position, sample_generator(seed), "continuous")
        positions = positions[None, : context + question]
    return {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "position_ids": positions,
            "response_ids": torch.randint(3, VOCAB, (1, responses, response), generator=generator),
            "response_mask": torch.ones(1, responses, response, dtype=torch.long)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(args, mode: str, device: torch.device) -> dict:
    chunks = args.chunks * (args.factor if mode == "real_x16" else 1)
    real = args.chunks * args.chunk + 16 + args.response
    window = real * args.factor if mode == "synthesised" else None
    batch = make_batch(chunks, args.chunk, args.responses, args.response, window, seed=0)
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, objective, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = objective(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(args) -> dict:
    """Configurations `args.mode` (comma-separated) in this process. Times: steps of the configurations alternate,
    so a change in machine load hits all alike. Peak memory is only meaningful with one configuration."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.set_num_threads(max(1, args.threads))
    model = build_model(args.family, args.hidden, args.layers).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    objective = PreferenceObjective(LossConfig(num_rejected=args.responses - 1))
    modes = args.mode.split(",")
    batches = {mode: setup(args, mode, device) for mode in modes}
    before = current_memory_mb(device)  # weights, inputs, the interpreter: what every configuration holds
    times = {mode: [] for mode in modes}
    for step in range(args.steps + 1):
        for mode in modes:
            seconds = train_step(model, optimizer, objective, batches[mode], device)
            if step:  # the first step allocates optimizer states and warms kernels
                times[mode].append(seconds)
    peak = peak_memory_mb(device)
    # the fastest step: on a shared machine the others carry other processes' load
    return {mode: {"seconds": min(times[mode]), "peak_mb": peak, "step_mb": peak - before,
                   "tokens": int(batches[mode]["input_ids"].numel() + batches[mode]["response_ids"].numel()),
                   "max_position": int(batches[mode]["position_ids"].max()), "device": str(device)}
            for mode in modes}


def run_worker(mode: str) -> dict:
    output = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                            capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["llama", "openba"], default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=16, help="N real chunks (LOGO: 16)")
    parser.add_argument("--chunk", type=int, default=32, help="tokens per chunk (LOGO: 512; small for CPU)")
    parser.add_argument("--factor", type=int, default=16, help="synthesised window / real length")
    parser.add_argument("--responses", type=int, default=3, help="1 + M responses")
    parser.add_argument("--response", type=int, default=32, help="tokens per response")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared machine, "
                        "multi-threaded step times swing by several x with other processes' load)")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with CUDA")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    timed = run_worker("real,synthesised")  # times from alternating steps in one process
    results = {}
    for mode in ("real", "synthesised", "real_x16"):
        alone = run_worker(mode)[mode]  # memory from a process of its own
        results[mode] = {**alone, "seconds": timed[mode]["seconds"] if mode in timed else alone["seconds"]}
    real = results["real"]
    print(f"{args.family}: hidden {args.hidden}, {args.layers} layers, real context {args.chunks} x {args.chunk} "
          f"tokens, {args.responses} responses of {args.response}, window x{args.factor}, on {real['device']}")
    rows = [(mode, r["tokens"], r["max_position"], r["seconds"], round(r["peak_mb"]), round(r["step_mb"]),
             r["seconds"] / real["seconds"], r["step_mb"] / real["step_mb"]) for mode, r in results.items()]
    print(format_table(rows, ["step", "tokens", "max position", "seconds", "peak MB", "step MB", "time x",
                              "step memory x"]))
    synth = results["synthesised"]
    ok = synth["seconds"] / real["seconds"] <= 1.1 and synth["step_mb"] / real["step_mb"] <= 1.1
    print("step MB = peak minus the memory held before the first step (weights, inputs, interpreter)")
    print(f"synthesised / real: target <= 1.1x in time and step memory: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
