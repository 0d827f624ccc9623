#!/usr/bin/env bash
# The one command a GPU session runs for issue 19 point 5: the CUDA tests, then the speed figures, each step under
# its own time limit and all of them under BUDGET_S seconds (default 480), so one failure costs its step and no more.
#
#   here, once (needs the network):   bash benchmarks/gpu_wheels.sh
#   on the device:                    bash benchmarks/gpu_session.sh          (carry [".whl"], timeout_s 560)
#   check the commands on a CPU:      DRY_RUN=1 bash benchmarks/gpu_session.sh
#
# Everything lands in $OUT (a temporary folder if unset), 7 files: session.log (every step's whole output),
# summary.txt (rc and seconds per step), scoring_fp32.json, scoring_bf16.json, scoring_profile.txt,
# mfu_llama.json, mfu_openba.json. The console shows each step's last lines.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    OUT=${OUT:-\$OUT}
else
    OUT=${OUT:-$(mktemp -d /tmp/gpu_session.XXXXXX)}
    mkdir -p "$OUT"
    STEPS=$(mktemp -d /tmp/gpu_steps.XXXXXX)
fi
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
START=$SECONDS

# step NAME LIMIT TAIL COMMAND...: run COMMAND under min(LIMIT, what is left of the budget); show its last TAIL lines
step() {
    local name=$1 limit=$2 tail_lines=$3
    shift 3
    if [ "$DRY_RUN" = 1 ]; then
        echo "$*"
        return 0
    fi
    local left=$((BUDGET_S - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name rc=skipped (budget spent)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$STEPS/$name.txt" 2>&1
    local rc=$?
    cat "$STEPS/$name.txt" >>"$LOG"
    tail -n "$tail_lines" "$STEPS/$name.txt" | cut -c1-240
    echo "$name rc=$rc seconds=$((SECONDS - began))" | tee -a "$OUT/summary.txt" "$LOG"
}

if [ "$DRY_RUN" != 1 ]; then
    {
        echo "=== $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        nvidia-smi
    } >>"$LOG" 2>&1
    head -n 3 "$LOG"
    if ls .whl/*.whl >/dev/null 2>&1; then  # packages the image lacks (benchmarks/gpu_wheels.sh)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >>"$LOG" 2>&1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        if ! "$PYTHON" -c "import transformers, datasets" >>"$LOG" 2>&1; then
            echo "the carried transformers does not import here: the image's transformers, carried datasets" | tee -a "$LOG"
            rm -rf /tmp/site
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
                .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl >>"$LOG" 2>&1
        fi
    fi
    "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"flash_attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'}, "
      f"datasets {'yes' if importlib.util.find_spec('datasets') else 'NO'}, cuda {torch.cuda.is_available()}")
EOF
fi

step pytest_gpu 110 15 "$PYTHON" -m pytest -m gpu -q --continue-on-collection-errors
step scoring_fp32 90 8 "$PYTHON" benchmarks/scoring_overhead.py --device cuda --batches 4 --batch 16 --seq 1024 \
    --width 1024 --repeats 7 --json "$OUT/scoring_fp32.json" --profile "$OUT/scoring_profile.txt"
step mfu_llama 80 6 "$PYTHON" benchmarks/train_mfu.py --size 1b --models llama --steps 10 --warmup 3 \
    --json "$OUT/mfu_llama.json"
step mfu_openba 80 6 "$PYTHON" benchmarks/train_mfu.py --size 1b --models openba --steps 10 --warmup 3 \
    --json "$OUT/mfu_openba.json"
step scoring_bf16 50 8 "$PYTHON" benchmarks/scoring_overhead.py --device cuda --bf16 --batches 4 --batch 16 \
    --seq 1024 --width 1024 --repeats 7 --json "$OUT/scoring_bf16.json"
step pruned_speedup 50 6 "$PYTHON" benchmarks/pruned_speedup.py --device cuda --bf16 --batch 16 --seq 1024 --scale 4

if [ "$DRY_RUN" != 1 ]; then
    echo "=== done in $((SECONDS - START)) s; files in $OUT"
    cat "$OUT/summary.txt"
    rm -rf "$STEPS"
fi
