#!/usr/bin/env bash
# Issue 18's compression target on PTB: the dense 2x200 model of the sweeps
# (uncompressed run of sweeps-ptb.toml: the small recipe, 6 epochs) compressed
# to 1/8 on both layers with K = 10 by `slimnp compress`, evaluated as is,
# then fine-tuned for 2 epochs at the dense run's last learning rate (0.25,
# constant) and evaluated again.  Appends one results line per step to
# experiments/results/compress-ptb.jsonl (slimnp.results: the step as its run
# name, its command, its --json output, perplexities and parameters lifted
# out of it, paths relative to experiments/).
#
# A script, not a plan: a plan's run trains from scratch (a learned run warms
# up its own dense model), while this compresses another plan's finished model
# and evaluates the compressed model before fine-tuning it -- steps the runner
# has no run for.
#
#   bash experiments/compress-ptb.sh [FREQUENT]      # FREQUENT words kept exact (default 0)
#   SLIMNP=.venv/bin/slimnp bash experiments/compress-ptb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SLIMNP=${SLIMNP:-slimnp}
PTB=${PTB:-../shared/data/ptb}
N=${1:-0}
DENSE=experiments/runs/sweeps-ptb/uncompressed.best.h5
RUNS=experiments/runs/compress-ptb
OUT=experiments/results/compress-ptb.jsonl
mkdir -p "$RUNS" "$(dirname "$OUT")"
SLIM=$RUNS/slim-k10-8-f$N.h5
TUNED=$RUNS/tuned-k10-8-f$N.h5
record() {  # record STEP COMMAND... : run it, append its results line (run = STEP)
  local step=$1; shift
  local json
  json=$("$@")
  $SLIMNP experiment record "$OUT" experiments/compress-ptb.sh "$step" "$*" "$json"
}
record dense-test $SLIMNP evaluate $DENSE $PTB/ptb.test.txt --json --quiet
record compress $SLIMNP compress $DENSE --out $SLIM --force --input-k 10 --input-ratio 0.125 \
  --output-k 10 --output-ratio 0.125 --frequent $N --valid $PTB/ptb.valid.txt --json --threads 1
record compressed-test $SLIMNP evaluate $SLIM $PTB/ptb.test.txt --json --quiet
record fine-tune $SLIMNP train --init-from $SLIM --data $PTB --epochs 2 --lr 0.25 \
  --lr-schedule constant --out $TUNED --force --json --quiet --threads 1
