#!/usr/bin/env bash
# The published-size sampler on a GPU, in one unattended run (benchmarks/bench_gpu.py does the work):
# images/s and peak GPU memory (torch.cuda.max_memory_allocated) of eval.py's sampler -- VD's image UNet
# and VAE from their real configs with random weights (nothing downloaded), LoRA, the published brain
# module for 15,724 voxels -- at 512x512 with 20 DDPM steps, for fp32 / bf16 / fp16, batch 1 and 8,
# without and with torch.compile, plus the original recipe (dual attention, fp32, batch 1) against the
# original's claim that reconstruction needs 8 GB of VRAM.
#
#   benchmarks/bench_gpu.sh                        # from anywhere; needs .venv (./setup.sh) and a CUDA GPU
#   OUT=/some/folder benchmarks/bench_gpu.sh       # also writes bench_gpu.{md,json,log} and nvidia-smi.txt there
#   benchmarks/bench_gpu.sh --tiny --device cpu    # the same script on tiny models: checks it on a CPU
#
# Live decoding (issue 15), unless BENCH_LIVE=0: after the sampler, benchmarks/bench_live.py --published: a
# synthetic run replayed at the scanner's pace through the live path (watcher, causal preprocessing, decoder,
# PNG), the published-size decoder in bf16 with 10 and 20 steps: end-to-end latency per trial (goal: < 1 TR).
#
# Training memory (issue 14), with BENCH_TRAIN=1: after the sampler, the published-size training step
# (benchmarks/bench_train.py --published) under torchrun on every visible GPU, DDP without and with the
# sharded optimizer (--shard-optimizer, ZeRO-1): per-GPU peak memory, AdamW state per GPU, samples/s.
# With one GPU the two rows differ by nothing (one shard); the AdamW state column says what 8 GPUs split.
#
#   BENCH_TRAIN=1 OUT=/some/folder benchmarks/bench_gpu.sh
#
# Time: the measurements stop starting new configurations after BENCH_GPU_BUDGET seconds (default 390)
# and the whole run is killed at BENCH_GPU_BUDGET + 90 s (8 minutes by default); rows are written after
# each configuration, so a killed run keeps what it measured. Extra arguments go to bench_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
BUDGET=${BENCH_GPU_BUDGET:-390}
LIMIT=$((BUDGET + 90))
if [ ! -x "$PY" ]; then
    echo "bench_gpu.sh: $PY not found: run ./setup.sh first (or set PYTHON)" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d -t inductor.XXXXXX)}

ARGS=(--budget "$BUDGET")
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    ARGS+=(--markdown "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json")
    LOG="$OUT/bench_gpu.log"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    fi
else
    LOG=/dev/null
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (modified)')" | tee -a "$LOG"
echo "command: benchmarks/bench_gpu.sh $*  (budget ${BUDGET} s, killed at ${LIMIT} s)" | tee -a "$LOG"

timeout -k 15 "$LIMIT" "$PY" benchmarks/bench_gpu.py "${ARGS[@]}" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "bench_gpu.sh: stopped at the ${LIMIT} s limit; the rows measured so far are above${OUT:+ and in $OUT/bench_gpu.md}" | tee -a "$LOG"
    if [ -n "${OUT:-}" ] && [ -f "$OUT/bench_gpu.md" ]; then
        cat "$OUT/bench_gpu.md"
    fi
fi
if [ "${BENCH_LIVE:-1}" = "1" ]; then
    # live decoding at the published size (issue 15): a synthetic run replayed at the scanner's pace, bf16, batch 1
    echo "command: $PY benchmarks/bench_live.py --published --device cuda latency" | tee -a "$LOG"
    timeout -k 15 240 "$PY" benchmarks/bench_live.py --published --device cuda --volumes 60 latency \
        ${OUT:+--json "$OUT/bench_live.json"} 2>&1 | tee -a "$LOG"
fi
if [ "${BENCH_TRAIN:-0}" = "1" ]; then
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    TORCHRUN="$(dirname "$PY")/torchrun"
    for shard in "" "--shard-optimizer"; do
        echo "command: $TORCHRUN --standalone --nproc_per_node $NGPU benchmarks/bench_train.py --published --device cuda --steps 3 $shard" | tee -a "$LOG"
        timeout -k 15 300 "$TORCHRUN" --standalone --nproc_per_node "$NGPU" benchmarks/bench_train.py --published \
            --device cuda --steps 3 --warmup 1 $shard ${OUT:+--json "$OUT/bench_train_ddp${shard:+_zero1}.json"} 2>&1 | tee -a "$LOG"
    done
fi
exit "$status"
