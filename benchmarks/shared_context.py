"""Shared context against 1 + k separate sequences: the time of a LOGO training step with k = 2 dis-preferred
responses, for a decoder-only model (one packed sequence with a shared-prefix mask) and an encoder-decoder (the
encoder run once, its output repeated), side by side in one process with alternating steps.

    python benchmarks/shared_context.py                   # Llama-style and OpenBA, context 1024, responses 32
    python benchmarks/shared_context.py --context 2048 --k 3

Target: shared / separate <= 0.6x step time for k = 2. Both paths give the same log-likelihoods
(tests/align/test_packing.py); here only their cost differs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from align.losses import LossConfig  # noqa: E402
from align.objective import PreferenceObjective  # noqa: E402
from core.table import format_table  # noqa: E402
from logo_memory import build_model, make_batch  # noqa: E402


def step_seconds(model, optimizer, objective, batch) -> float:
    start = time.perf_counter()
    loss, _ = objective(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(family: str, args) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = build_model(family, args.hidden, args.layers).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss = LossConfig(num_rejected=args.k)
    objectives = {"shared": PreferenceObjective(loss, shared_context=True),
                  "separate": PreferenceObjective(loss, shared_context=False)}
    batch = make_batch(args.context // 64, 64, 1 + args.k, args.response, None, seed=0)
    batch = {key: value.to(device) for key, value in batch.items()}
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for step in range(args.steps + 1):
        for name, objective in objectives.items():
            seconds = step_seconds(model, optimizer, objective, batch)
            if step:
                times[name].append(seconds)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["llama", "openba"], choices=["llama", "openba"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024, help="context tokens (a multiple of 64)")
    parser.add_argument("--response", type=int, default=32, help="tokens per response")
    parser.add_argument("--k", type=int, default=2, help="dis-preferred responses per row")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared machine, "
                        "multi-threaded step times swing by several x with other processes' load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for family in args.families:
        result = measure(family, args)
        rows.append((family, result["separate"], result["shared"], result["shared"] / result["separate"]))
    print(f"context {args.context} tokens, 1 + {args.k} responses of {args.response} tokens, hidden {args.hidden}, "
          f"{args.layers} layers, fastest of {args.steps} steps (forward, backward, AdamW), "
          f"{torch.get_num_threads()} thread(s)")
    print(format_table(rows, ["family", "separate s", "shared s", "shared / separate"]))
    met = all(ratio <= 0.6 for *_, ratio in rows)
    print(f"target shared / separate <= 0.6x for k = 2: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
