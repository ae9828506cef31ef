#!/usr/bin/env bash
# Table 3 (PTB, 2x650) on a lent GPU: the one prepared run for the device
# tool, sized to its limits (10 minutes a call, 15 of device time a session,
# files back: 8 at most).  On one CPU core a row takes 5-7 hours; on one
# H200 the 2x650 model trained at 31-54K tok/s (../shared/gpu-results), so a
# row's 23M tokens take 7-12 minutes and three rows side by side need about
# two calls.
#
# Here, once, from the repository root (the data beside the checkout does
# not travel; this copy does, 5 MB):
#
#   mkdir -p .gpu-data && cp -r ../shared/data/ptb .gpu-data/ && echo /.gpu-data/ >> .git/info/exclude
#
# then the device tool: run(command="bash experiments/table3-gpu.sh",
# carry=[".gpu-data"], timeout_s=600).  If the rows did not finish, call it
# again at once: a warm machine keeps experiments/runs/ (ignored files) and
# the runner resumes each row from the checkpoint it wrote when stopped.
# Back here, append the new lines of $OUT/table3-ptb.jsonl to
# experiments/results/table3-ptb.jsonl, check them (`slimnp experiment
# check experiments/results/table3-ptb.jsonl`) and run
# `python experiments/report.py`.
#
# Environment: LIMIT (seconds of training before the runner is stopped,
# default 500), JOBS (rows at once, default 3), RUNS (default the issue's
# order: ne-d0 se-m1k-d0 se-m10k-d0), DEVICE (default gpu; cpu for a dry
# run of this script), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-experiments/gpu_out}"
LIMIT="${LIMIT:-500}"
JOBS="${JOBS:-3}"
RUNS="${RUNS:-ne-d0 se-m1k-d0 se-m10k-d0}"
DEVICE="${DEVICE:-gpu}"
PY="${PYTHON:-python3}"
PLAN=experiments/table3-ptb.toml
RESULTS=experiments/results/table3-ptb.jsonl
mkdir -p "$OUT"

# the plan reads ../../shared/data/ptb from experiments/, i.e. ../shared
# beside the checkout: put the carried copy there, so the results lines name
# the same data as the CPU runs'
if [ ! -e ../shared/data/ptb/ptb.train.txt ]; then
  [ -e .gpu-data/ptb/ptb.train.txt ] || { echo "no PTB: carry .gpu-data (see the header)"; exit 2; }
  mkdir -p ../shared/data && cp -r .gpu-data/ptb ../shared/data/ || exit 2
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
"$PY" -c "import numpy, numba, h5py, click; print('numpy', numpy.__version__, 'numba', numba.__version__)"
[ "$DEVICE" = gpu ] && "$PY" -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'GPU')"

echo "== $PLAN: $RUNS on $DEVICE, $JOBS at once, stopped after ${LIMIT}s"
only=()
for r in $RUNS; do only+=(--only "$r"); done
# SIGTERM: the runner stops every row after its current step and writes
# its checkpoint (-k: a hard kill 60 s later if that hangs)
timeout -s TERM -k 60 "$LIMIT" "$PY" -m slimnp experiment run "$PLAN" --device "$DEVICE" \
  --jobs "$JOBS" --threads 2 "${only[@]}" 2>&1 | tee "$OUT/table3-run.log"

echo "== status"
"$PY" -m slimnp experiment status "$PLAN" 2>&1 | tee "$OUT/table3-status.txt"
[ -e "$RESULTS" ] && cp "$RESULTS" "$OUT/"
# every row's log and metrics in one file (the tool returns 8 files at most)
tar czf "$OUT/table3-logs.tgz" experiments/runs/table3-ptb/*.log experiments/runs/table3-ptb/*.metrics.jsonl \
  2>/dev/null
ls -la "$OUT"
