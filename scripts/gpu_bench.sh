#!/usr/bin/env bash
# The RLR benchmarks at GPU scale, in one call: a lent GPU machine has minutes, not hours.
#
#   scripts/gpu_bench.sh OUT_DIR [ALIGN_SECONDS] [ROUNDS]
#
# Environment: JOBS (runs at once, 12), METHODS (alignment methods), EST_SECONDS (150),
# EST_DRAWS (8), DEVICE (cuda), PYTHON (python3).
#
# 1. bench.estimators on the GPU with few draws: its peak-memory and time columns (the CUDA
#    allocator's peak, which CPU RSS cannot resolve); bias and variance need the CPU run's draws.
# 2. bench.alignment at a real budget: every (method, seed) run in its own process at once,
#    stopped after ALIGN_SECONDS; curves are cached at every evaluation point, so what a run
#    reached is kept, and the summary counts unfinished runs.
# Writes at most 8 files to OUT_DIR (the device tool's limit): logs, JSON, the plot, and the
# alignment cache as a tarball.
set -u
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [ALIGN_SECONDS] [ROUNDS]}
budget=${2:-420}
rounds=${3:-200}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
. "$(dirname "$0")/gpu_env.sh"

align=(--reward prefer-colour:red --lr 1e-2 --steps 10 --guidance 1 --batch 8 --rounds "$rounds"
       --eval-every 10 --eval-seeds 4 --seeds 3 --device "$device" --threads 1
       --methods ${METHODS:-rlr ddpo truncated-bp full-bp rlr-L1} --cache "$out/aligncache")

# alone first: its memory peaks and times then see an otherwise idle GPU
timeout "${EST_SECONDS:-150}" $py -m bench.estimators --device "$device" --threads 1 --n-ref "${EST_DRAWS:-8}" \
    --n-est "${EST_DRAWS:-8}" --batch 4 --json "$out/estimators_gpu.json" > "$out/estimators_gpu.log" 2>&1
echo "estimators exit $?"
tail -32 "$out/estimators_gpu.log"
timeout "$budget" $py -m bench.alignment "${align[@]}" --jobs "${JOBS:-12}" > "$out/alignment.log" 2>&1
echo "alignment exit $?"
pkill -f "bench.alignment" ; sleep 2  # timeout stops the parent only: stop its workers too
$py -m bench.alignment "${align[@]}" --from-cache --json "$out/alignment_gpu.json" \
    --plot "$out/alignment_gpu.png" 2>&1 | tee -a "$out/alignment.log" | tail -30
tar czf "$out/aligncache.tgz" -C "$out" aligncache && rm -r "$out/aligncache"
ls -la "$out"
