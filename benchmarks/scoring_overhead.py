"""Time of the scoring pass over a plain forward pass on the same batches and model, measured side by side.

Scoring must stay cheap enough to run on real calibration sets: its hooks (block-influence cosines at every block,
|x| and x^2 column sums at every attention output and FFN down projection) should add at most 15% (issue 3).
Both passes go through the same calibration loop (`calibration_pass`, loss included); repetitions alternate
plain / scoring so machine noise hits both alike, and the medians are compared.

"before" is the scoring pass as it was when CUDA measured Llama at 1.21x (issue 19): `cosine_similarity` on
float32 copies, |x| and x^2 as a full-size tensor then a sum, padding dropped with a boolean mask (a device sync
per hook), and Wanda's weights copied whole to the host. It runs in the same alternation, and its scores are
checked against today's, so one run shows what the rewrite changed on this device.

    python benchmarks/scoring_overhead.py [--repeats 7] [--batch 4] [--seq 256] [--batches 4] [--device cpu]
    python benchmarks/scoring_overhead.py --device cuda --batches 4 --batch 16 --seq 1024 --width 1024 --profile prof.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compress.scoring  # noqa: E402
from compress.calibration import as_calibration_set, calibration_pass  # noqa: E402
from compress.scoring import StatisticsCollector, score_model  # noqa: E402
from core.checkpoint import count_parameters  # noqa: E402
from core.table import format_table, human_count  # noqa: E402

VOCAB = 8192
SCORERS = {"layers": "block_influence", "heads": "activation", "channels": "wanda"}
BEFORE_SCORERS = {**SCORERS, "channels": f"{__name__}:wanda_host_weights"}  # a scorer path: nothing registered


class BeforeCollector(StatisticsCollector):
    """The hooks as they were before issue 19 (compress/scoring.py at 0878424), kept to time them beside today's."""

    def on_batch(self, index, masks):
        device = next(self.adapter.model.parameters()).device
        self.masks = {stack: (m.to(device) if m is not None else None) for stack, m in masks.items()}

    def _tokens(self, x, stack):
        mask = self.masks.get(stack)
        if mask is not None and mask.shape == x.shape[:-1]:
            return x[mask]
        return x.reshape(-1, x.shape[-1])

    def _block_hook(self, key, stack, angular):
        from core.adapters import block_hidden_in, block_hidden_out

        sums = self.block_sums.setdefault(key, {})

        def hook(module, args, kwargs, output):
            h_in = self._tokens(block_hidden_in(args, kwargs).detach(), stack).float()
            h_out = self._tokens(block_hidden_out(output).detach(), stack).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).clamp(-1.0, 1.0)
            compress.scoring._accumulate(sums, "cos", cos.sum(dtype=torch.float64))
            if angular:
                compress.scoring._accumulate(sums, "arccos", torch.arccos(cos).sum(dtype=torch.float64))
            sums["tokens"] = sums.get("tokens", 0) + cos.numel()

        return hook

    def _column_hook(self, key, stack, needs):
        sums = self.column_sums.setdefault(key, {})

        def hook(module, args):
            x = self._tokens(args[0].detach(), stack)
            if "act_abs" in needs:
                compress.scoring._accumulate(sums, "abs", x.abs().sum(0, dtype=torch.float32))
            if "act_norm" in needs:
                xf = x.float()
                compress.scoring._accumulate(sums, "sq", (xf * xf).sum(0))
            sums["tokens"] = sums.get("tokens", 0) + x.shape[0]

        return hook


def wanda_host_weights(ctx):
    """Wanda as it was before issue 19: the whole output weight copied to the host, then reduced there."""
    return ctx.per_unit(ctx.output_weight().abs().sum(0) * ctx.stats["act_norm"])


wanda_host_weights.needs = ("act_norm",)
wanda_host_weights.units = ("channels",)


@contextlib.contextmanager
def collector_class(cls):
    saved = compress.scoring.StatisticsCollector
    compress.scoring.StatisticsCollector = cls
    try:
        yield
    finally:
        compress.scoring.StatisticsCollector = saved


def llama_model(width: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=int(width * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(width // 64, 1),
                         num_key_value_heads=max(width // 128, 1), max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def openba_model(width: int, layers: int):
    from transformers import AutoModelForSeq2SeqLM

    from core.openba import openba_config

    config = openba_config("openba-tiny", vocab_size=VOCAB, hidden_size=width, kv_channels=64,
                           num_heads=max(width // 64, 1), ffn_hidden_size=int(width * 2.75) // 64 * 64,
                           num_layers=max(layers // 3, 1), num_decoder_layers=layers, hidden_dropout=0.0,
                           attention_dropout=0.0)
    return AutoModelForSeq2SeqLM.from_config(config)


MODELS = {"llama": llama_model, "openba": openba_model}


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


def passes(model, calib) -> dict:
    """The three passes timed: plain forward, the scoring pass before issue 19, and today's."""
    def before():
        with collector_class(BeforeCollector):
            return score_model(model, calib, BEFORE_SCORERS, progress=False)

    return {"plain": lambda: calibration_pass(model, calib, progress=False), "before": before,
            "scoring": lambda: score_model(model, calib, SCORERS, progress=False)}


def largest_score_difference(before, after) -> float:
    """Largest |before - after| / max|before| over every score tensor (names differ only in the scorer)."""
    worst = 0.0
    for name, value in after.tensors.items():
        old = before.tensors[name]
        worst = max(worst, float((old - value).abs().max() / old.abs().max().clamp_min(1e-30)))
    return worst


def measure(model, calib, repeats: int, device: str) -> dict[str, float]:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    timed = passes(model, calib)
    for fn in timed.values():  # warm-up: allocator, kernels, lazy imports
        fn()
    times = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def profile(model, calib, device: str, rows: int = 15) -> str:
    """Top operators of one plain and one scoring pass (device time on CUDA, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = []
    for name, fn in passes(model, calib).items():
        with torch_profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        out.append(f"--- {name} pass: top {rows} operators by {key}")
        out.append(prof.key_averages().table(sort_by=key, row_limit=rows))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--width", type=int, default=512, help="hidden size of the benchmark models")
    parser.add_argument("--layers", type=int, default=6, help="decoder blocks (OpenBA: a third as many encoder blocks)")
    parser.add_argument("--models", default="llama,openba", help="comma-separated: llama, openba")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and activations (float32 otherwise)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", type=Path, default=None, help="also write each pass's top operators here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    results, rows, profiles = [], [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name](args.width, args.layers).to(args.device, dtype).eval()
        calib = batches(model, args.batches, args.batch, args.seq)
        seconds = measure(model, calib, args.repeats, args.device)
        fns = passes(model, calib)
        difference = largest_score_difference(fns["before"](), fns["scoring"]())
        result = {"model": name, "params": count_parameters(model), "tokens": calib.num_tokens,
                  **{f"{k}_ms": v * 1000 for k, v in seconds.items()},
                  "before_ratio": seconds["before"] / seconds["plain"],
                  "ratio": seconds["scoring"] / seconds["plain"], "score_difference": difference}
        results.append(result)
        rows.append([name, human_count(result["params"]), result["tokens"], f"{result['plain_ms']:.1f}",
                     f"{result['before_ms']:.1f}", f"{result['scoring_ms']:.1f}", f"{result['before_ratio']:.3f}",
                     f"{result['ratio']:.3f}", "yes" if result["ratio"] <= 1.15 else "NO", f"{difference:.1e}"])
        if args.profile:
            profiles.append(f"=== {name}, {args.device}, {str(dtype).removeprefix('torch.')}\n"
                            f"{profile(model, calib, args.device)}")
        del model, calib
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{where}, {str(dtype).removeprefix('torch.')}, width {args.width}, {args.layers} decoder blocks; "
          f"{args.batches} batches x {args.batch} x {args.seq} tokens, median of {args.repeats} alternating "
          f"repetitions; scorers {SCORERS}")
    print(format_table(rows, ["model", "params", "tokens", "plain ms", "before ms", "scoring ms", "before ratio",
                              "ratio", "<= 1.15", "max score diff"]))
    if args.profile:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text("\n".join(profiles) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": where, "dtype": str(dtype), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
