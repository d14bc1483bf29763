#!/usr/bin/env bash
# The GPU path, measured, in one call: Stable Diffusion 1.5's architecture (random weights, bf16,
# no hub access needed) through every estimator, plus a 5-step training round.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Environment: PYTHON (python3), SECONDS_MAX (hard limit of the benchmark, 540), BUDGET_S (no row
# starts after this, 450), GPU_CHECK_ARGS (extra arguments, e.g. "--tiny" for a CPU smoke run),
# PAPER=1 (also the paper's memory accounting: rows without per-step checkpointing, batch 1),
# MAIN=0 (skip the main rows), VIDEO=1 (also the AnimateDiff video rows, bench.gpu_video, after the image rows),
# SDXL=1 (also Stable Diffusion XL, bench.gpu_sdxl), FLOW=1 (also the flow models, bench.gpu_flow: each
# of FLOW_MODELS, default "sd35m flux-dev", i.e. SD3.5-Medium and FLUX.1-dev). SDXL_SECONDS_MAX /
# SDXL_BUDGET_S (300 / 220) and FLOW_SECONDS_MAX / FLOW_BUDGET_S (300 / 220, per flow model) bound those.
# Writes at most 8 files to OUT_DIR (the device tool's limit): env.txt, gpu_sd15.json,
# gpu_sd15.log, with PAPER=1 gpu_sd15_nockpt.json/.log, with VIDEO=1 gpu_video.json/.log, with SDXL=1
# gpu_sdxl.json/.log, with FLOW=1 gpu_flow_<model>.json for each model and one gpu_flow.log; a
# combination that would write more stops before running anything (exit 2: run it in two calls,
# e.g. MAIN=0 SDXL=1 FLOW=1). The JSON is rewritten after every row, so a run cut short still returns
# what it measured. Copy OUT_DIR/gpu_sd15.json to bench/results/ to publish it.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
flow_models=${FLOW_MODELS:-sd35m flux-dev}
files=1  # env.txt
[ "${MAIN:-1}" = 1 ] && files=$((files + 2))
[ "${PAPER:-0}" = 1 ] && files=$((files + 2))
[ "${VIDEO:-0}" = 1 ] && files=$((files + 2))
[ "${SDXL:-0}" = 1 ] && files=$((files + 2))
# shellcheck disable=SC2086  # one word per model
[ "${FLOW:-0}" = 1 ] && files=$((files + 1 + $(set -- $flow_models; echo $#)))
if [ "$files" -gt 8 ]; then
    echo "gpu_check: this combination writes $files files, more than the 8 the device tool returns; run it in two calls (e.g. MAIN=0 SDXL=1 FLOW=1)" >&2
    exit 2
fi
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
if [ "${SDXL:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${SDXL_SECONDS_MAX:-300}" $py -m bench.gpu_sdxl --json "$out/gpu_sdxl.json" \
        --budget-s "${SDXL_BUDGET_S:-220}" ${GPU_CHECK_ARGS:-} > "$out/gpu_sdxl.log" 2>&1
    echo "gpu_sdxl exit $?"
    tail -20 "$out/gpu_sdxl.log"
fi
if [ "${FLOW:-0}" = 1 ]; then
    : > "$out/gpu_flow.log"
    for model in $flow_models; do
        echo "=== bench.gpu_flow --model $model" >> "$out/gpu_flow.log"
        # shellcheck disable=SC2086
        timeout "${FLOW_SECONDS_MAX:-300}" $py -m bench.gpu_flow --model "$model" --json "$out/gpu_flow_$model.json" \
            --budget-s "${FLOW_BUDGET_S:-220}" ${GPU_CHECK_ARGS:-} >> "$out/gpu_flow.log" 2>&1
        echo "gpu_flow $model exit $?"
    done
    tail -40 "$out/gpu_flow.log"
fi
ls -la "$out"
