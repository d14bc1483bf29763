#!/usr/bin/env bash
# The position curriculum that taught the built-in model its position words (phase 6 of its
# model card): narrow to broad, high noise first. Each stage starts from the previous stage's
# EMA weights; a finished stage is skipped on a rerun. About 20 minutes on 2 CPU cores.
#
#   bash scripts/position_curriculum.sh [START_MODEL] [WORK_DIR]
#
# Why (measured, model card): where the shape goes is decided at t >= ~900, where the image no
# longer shows it, and the left/right signal's sign depends on the shape's colour against the
# background, so over all captions its gradient nearly cancels: 7,750 steps of the plain recipe
# and 300 steps of high-noise-only training on every scene left the position words ignored.
# Pinning colour and background first makes the signal consistent; it then generalises.
set -euo pipefail
cd "$(dirname "$0")/.."
START=${1:-models/shapesworld-tiny}
WORK=${2:-runs/curriculum}
PY=${PYTHON:-.venv/bin/python}
TRAIN="$PY -m rlr_core.shapesworld.pretrain --lr 5e-4 --batch 16 --warmup 20"

stage() {  # name, init, steps, seed, extra arguments...
  local name=$1 init=$2 steps=$3 seed=$4; shift 4
  [ -f "$WORK/$name/model_index.json" ] && return
  $TRAIN --out "$WORK/run$name" --init "$init" --steps "$steps" --every 50 --seed "$seed" --export "$WORK/$name" "$@"
}
NAMED="--position-drop-prob 0 --ema-decay 0.99"
stage A "$START"   80 11 $NAMED --fix colour=red kind=circle size=large background=black --high-noise-frac 1 --high-noise-min 990
stage B "$WORK/A" 200 12 $NAMED --fix background=black --high-noise-frac 1 --high-noise-min 950
stage C "$WORK/B" 200 13 $NAMED --high-noise-frac 1 --high-noise-min 900
stage D "$WORK/C" 300 14 --high-noise-frac 0.3 --high-noise-min 900
echo "done: $WORK/D (check it with: python -m bench.fidelity --model $WORK/D)"
