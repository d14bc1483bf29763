#!/usr/bin/env bash
# The GPU path, measured, in one call: Stable Diffusion 1.5's architecture (random weights, bf16,
# no hub access needed) through every estimator, plus a 5-step training round.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Environment: PYTHON (python3), SECONDS_MAX (hard limit of the benchmark, 540), BUDGET_S (no row
# starts after this, 450), GPU_CHECK_ARGS (extra arguments, e.g. "--tiny" for a CPU smoke run),
# PAPER=1 (also the paper's memory accounting: rows without per-step checkpointing, batch 1),
# MAIN=0 (skip the main rows), VIDEO=1 (also the AnimateDiff video rows, bench.gpu_video, after the image rows).
# Writes at most 8 files to OUT_DIR (the device tool's limit): env.txt, gpu_sd15.json,
# gpu_sd15.log, with PAPER=1 gpu_sd15_nockpt.json/.log, with VIDEO=1 gpu_video.json/.log. The JSON is rewritten after
# every row, so a run cut short still returns what it measured. Copy OUT_DIR/gpu_sd15.json to
# bench/results/ to publish it.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
. "$(dirname "$0")/gpu_env.sh"

if [ "${MAIN:-1}" = 1 ]; then
    # shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
    timeout "${SECONDS_MAX:-540}" $py -m bench.gpu_sd15 --json "$out/gpu_sd15.json" --budget-s "${BUDGET_S:-450}" \
        ${GPU_CHECK_ARGS:-} > "$out/gpu_sd15.log" 2>&1
    echo "gpu_sd15 exit $?"
    tail -40 "$out/gpu_sd15.log"
fi
if [ "${PAPER:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${PAPER_SECONDS_MAX:-200}" $py -m bench.gpu_sd15 --no-checkpoint --batches 1 --round-steps 0 \
        --budget-s "${PAPER_BUDGET_S:-150}" --json "$out/gpu_sd15_nockpt.json" ${GPU_CHECK_ARGS:-} \
        > "$out/gpu_sd15_nockpt.log" 2>&1
    echo "gpu_sd15 --no-checkpoint exit $?"
    tail -25 "$out/gpu_sd15_nockpt.log"
fi
if [ "${VIDEO:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${VIDEO_SECONDS_MAX:-300}" $py -m bench.gpu_video --json "$out/gpu_video.json" \
        --budget-s "${VIDEO_BUDGET_S:-200}" ${GPU_CHECK_ARGS:-} \
        > "$out/gpu_video.log" 2>&1
    echo "gpu_video exit $?"
    tail -20 "$out/gpu_video.log"
fi
ls -la "$out"
