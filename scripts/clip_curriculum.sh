#!/usr/bin/env bash
# The clip model's pretraining, stage by stage, as it was run for the shipped weights
# (models/shapesworld-clips/MODEL_CARD.md has what each stage did). Each stage starts from the
# previous stage's checkpoint with a fresh optimiser and EMA; a finished stage is skipped and an
# interrupted one resumes, so rerunning the script continues where it stopped.
#
#   bash scripts/clip_curriculum.sh [WORK_DIR] [EXPORT_DIR]
#
# Stage 0 teaches the temporal layers to keep the frames one scene and the text encoder the clip
# grammar's words. Stage D adds the trajectory head: the denoiser is trained with each clip's
# true velocity (so it draws the scene at rest in the shape's frame of reference) and the head
# learns to read the velocity from the caption. Stages that tried to learn motion in the temporal
# layers themselves are in docs/video.md; none of them moved shapes the right way.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/clip-curriculum}
EXPORT=${2:-models/shapesworld-clips}
PY=${PYTHON:-.venv/bin/python}
TRAIN="$PY -m rlr_core.shapesworld.pretrain_clips --batch 6 --lr 5e-4"

stage() {  # name, previous stage (or -), steps, extra arguments...
  local name=$1 prev=$2 steps=$3; shift 3
  local init=()
  [ "$prev" != "-" ] && init=(--init-checkpoint "$WORK/$prev/checkpoint")
  $TRAIN --out "$WORK/$name" --steps "$steps" --resume "${init[@]}" "$@"
}
stage 0 - 400 --every 200 --no-trajectory-head
stage D 0 400 --every 100 --warmup 25 --caption-batch 256 --export "$EXPORT" --fit-head 4000
echo "done: $EXPORT (check it with: python -m bench.video_fidelity --model $EXPORT)"
