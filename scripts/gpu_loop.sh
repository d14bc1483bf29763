#!/usr/bin/env bash
# The loop benchmark's arm matrix (bench/loop.py) on a lent GPU machine: many runs of the app's
# loop at once, each its own app on the built-in model, sharing one GPU.
#
#   scripts/gpu_loop.sh OUT_DIR [SECONDS]
#
# Environment: ARMS (the estimators with and without the regularisers, and the default), TASTES
# (bold composition), SEEDS (0 1 2), ROUNDS (4), JOBS (runs at once, 22), PYTHON (python3).
# Runs are queued seed by seed, so a cut-short call still has every arm on the first seeds. After
# SECONDS (500) the runs are stopped; each keeps what it measured up to its last finished round
# (bench.loop --partial summarises those rounds). Writes at most 8 files to OUT_DIR (the device
# tool's limit): env.txt, loop.log, loop_gpu.json, loop_gpu.png and the run cache as a tarball.
# Needs the app's requirements (requirements.txt) in PYTHON's environment. Each run is mostly
# Python on a CPU core (serving, drawing, judging), so JOBS is bounded by the cores, not the GPU.
set -u
out=${1:?usage: scripts/gpu_loop.sh OUT_DIR [SECONDS]}
budget=${2:-500}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$out"
. "$(dirname "$0")/gpu_env.sh"
$py -c "import gradio, gradio_client, sqlite_utils, diffusers; import app.server, bench.loop" || exit 3

arms=${ARMS:-default rlr rlr+reg tbp1 tbp1+reg tbp3 tbp3+reg full-bp full-bp+reg ddpo ddpo+reg}
# shellcheck disable=SC2206  # word lists
loop=(--arms $arms --tastes ${TASTES:-bold composition} --seeds ${SEEDS:-0 1 2} --rounds "${ROUNDS:-4}"
      --threads 1 --cache "$out/loopcache")
timeout "$budget" $py -m bench.loop "${loop[@]}" --jobs "${JOBS:-22}" --plot "" --json "$out/loop_gpu.json" \
    > "$out/loop.log" 2>&1
echo "bench.loop exit $?"
pkill -f "bench.loop --one"; sleep 2  # timeout stops the parent only: stop its workers too
$py -m bench.loop "${loop[@]}" --from-cache --partial --json "$out/loop_gpu.json" --plot "$out/loop_gpu.png" \
    2>&1 | tee -a "$out/loop.log" | tail -45
tar czf "$out/loopcache.tgz" -C "$out" loopcache && rm -r "$out/loopcache"
ls -la "$out"
