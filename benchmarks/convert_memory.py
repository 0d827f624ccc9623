"""Peak memory of converting a public OpenBA release, against the size of the release and of one shard.

The converter memory-maps one source shard at a time and writes one output shard at a time, so its peak resident
memory above the interpreter's (the same imports, no work) should be near one source shard plus one output shard,
not the whole model. Both figures come from child processes run side by side (`ru_maxrss`).

    python benchmarks/convert_memory.py [--hidden 1024] [--shards 4] [--max-shard-size 50MB]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_peak_mib(code: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh Python process running `code`, read by the child itself at exit from
    VmHWM (its own address space's high-water mark; ru_maxrss would carry this process's over fork and exec)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code + "\nprint('PEAK', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK"))
    return peak / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4, help="source .bin shards")
    parser.add_argument("--max-shard-size", default="50MB", help="output safetensors shard bound")
    args = parser.parse_args()

    from tests.core.openba_release import train_spiece, write_release
    from tests.core.test_convert_release import corpus_texts

    shape = {"vocab_size": 1024, "hidden_size": args.hidden, "kv_channels": 64, "ffn_hidden_size": 4 * args.hidden,
             "num_layers": 4, "num_decoder_layers": 12, "num_heads": args.hidden // 64, "max_seq_length": 128,
             "decoder_max_seq_length": 64}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "release", Path(tmp) / "converted"
        write_release(src, train_spiece(corpus_texts()), shape=shape, shards=args.shards)
        total = sum(p.stat().st_size for p in src.glob("*.bin")) / 2**20
        largest = max(p.stat().st_size for p in src.glob("*.bin")) / 2**20
        base, _ = child_peak_mib("import core.openba.convert, torch, transformers, tokenizers, safetensors, tqdm")
        peak, seconds = child_peak_mib(
            "from core.openba.convert import main; "
            f"main(['--src', {str(src)!r}, '--out', {str(out)!r}, '--max-shard-size', {args.max_shard_size!r}, "
            "'--no-progress'])"
        )
        outputs = len(list(out.glob("*.safetensors")))
    extra = peak - base
    print(f"release {total:.0f} MiB in {args.shards} shards (largest {largest:.0f} MiB) -> {outputs} safetensors "
          f"shards of <= {args.max_shard_size}; {seconds:.1f} s")
    print(f"{'peak RSS, imports only':<28}{base:>8.0f} MiB")
    print(f"{'peak RSS, conversion':<28}{peak:>8.0f} MiB")
    print(f"{'difference':<28}{extra:>8.0f} MiB")
    print(f"{'/ release size':<28}{extra / total:>8.2f}x")
    print(f"{'/ largest source shard':<28}{extra / largest:>8.2f}x")


if __name__ == "__main__":
    main()
