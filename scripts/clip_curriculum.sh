#!/usr/bin/env bash
# The clip model's pretraining, stage by stage, as it was run for the shipped weights
# (models/shapesworld-clips/MODEL_CARD.md has what each stage did). Each stage starts from the
# previous stage's checkpoint with a fresh optimiser and EMA; a finished stage is skipped and an
# interrupted one resumes, so rerunning the script continues where it stopped.
#
#   bash scripts/clip_curriculum.sh [WORK_DIR] [EXPORT_DIR]
#
# Why a curriculum (measured, docs/video.md): with the image layers frozen, 400 steps of the plain
# recipe and 150 more on one scene taught the temporal layers to keep the frames one scene but
# gave no motion at all; with the image layers training too, motion along the right axis
# appeared within 120 steps on one scene. As for the image model's position words, the
# direction's sign (left or right, up or down) comes last.
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
ONE_SCENE="--fix kind=circle colour=red size=large background=black speed=fast --always-name direction"
stage 0 - 400 --every 200
stage A 0 150 --warmup 20 --ema-decay 0.99 --every 75 $ONE_SCENE --high-noise-frac 0.8 --high-noise-min 800
stage B A 180 --warmup 20 --ema-decay 0.99 --every 60 --train-unet $ONE_SCENE --high-noise-frac 0.8 --high-noise-min 800
stage C B "${C_STEPS:-1000}" --warmup 20 --ema-decay 0.99 --every 100 --train-unet --always-name direction speed \
  --high-noise-frac 0.6 --high-noise-min 800 --export "$EXPORT"
echo "done: $EXPORT (check it with: python -m bench.video_fidelity --model $EXPORT)"
