#!/usr/bin/env bash
# The one prepared run for a machine with an NVIDIA GPU (issue 7), from the
# repository root of a checkout (no install needed: PYTHONPATH=.):
#
#   bash bench/gpu_check.sh            # about 4-6 minutes on an H200, at most ~8
#
# 1. the GPU tests: every kernel vs the NumPy reference (the cuda rows of
#    tests/backends.py's parametrisation, in every test file), whole
#    training steps CPU vs GPU, model files across devices (pytest -m gpu);
# 2. bench/gpu_check.py: training tok/s of configs B, C, D vs PyTorch+cuDNN,
#    a One-Billion-Word-sized slim model, the paper's Table 7 output layer.
#
# Output streams as it happens (nothing is held back by a pipe to `tail`), so
# a run cut short still shows how far it got.  Each part runs under
# `timeout`; the full logs and the benchmark JSON go to $OUT when set (the
# device tool returns that folder), else to bench/gpu_out/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 SLIMNP_REQUIRE_GPU=1
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
TESTS_LIMIT="${TESTS_LIMIT:-180}"   # seconds for the GPU tests
BENCH_BUDGET="${BENCH_BUDGET:-240}" # seconds for the benchmark sections
T0=$SECONDS

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu --format=csv,noheader 2>&1 | head -4
python - <<'PY'
import platform
print("python", platform.python_version())
for m in ("numpy", "cupy", "torch", "numba", "h5py", "click"):
    try:
        mod = __import__(m)
        print(f"{m} {mod.__version__}")
    except Exception as exc:
        print(f"{m}: {type(exc).__name__}: {exc}")
PY

echo "== GPU tests (limit ${TESTS_LIMIT}s)"
timeout -k 10 "$TESTS_LIMIT" python -m pytest -q -m gpu tests -p no:cacheprovider \
    --tb=short -rfE --durations=5 2>&1 | tee "$OUT/gpu_tests.log" | cut -c1-400
echo "pytest exit: ${PIPESTATUS[0]}  ($((SECONDS - T0)) s so far)"

echo "== benchmarks (budget ${BENCH_BUDGET}s)"
timeout -k 10 $((BENCH_BUDGET + 40)) python bench/gpu_check.py --budget "$BENCH_BUDGET" \
    --json-out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_bench.log" | cut -c1-400
echo "bench exit: ${PIPESTATUS[0]}  ($((SECONDS - T0)) s in all)"
