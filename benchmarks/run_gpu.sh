#!/usr/bin/env bash
# The GPU batch every session with a GPU owes: the CUDA tests, the Triton launch cost,
# the CUDA pytest-benchmark groups and `fastbp bench --device cuda`, into one results
# folder whose README names the GPU, the date and the commit.
#
#     benchmarks/run_gpu.sh [OUTPUT_DIR]      (default: benchmarks/results/<date>-<gpu>)
#
# Settings (environment):
#   FASTBP_COMMIT     the commit to name when the tree has no .git (a copied checkout)
#   GPU_BENCH_ROUNDS  interleaved rounds per workload (default 7)
#   GPU_WORKLOADS     space-separated workload names (default: the four below)
#   GPU_TEST_TIMEOUT, GPU_PYTEST_BENCH_TIMEOUT, GPU_BENCH_TIMEOUT  seconds each part may
#                     take (default 240, 150 and 90 per workload), so a hung or crashed
#                     part still leaves the others' results
#
# Each workload is benchmarked in its own process, so one that fails its check against
# torch-eager is reported and the others still run. The exit status is non-zero when a
# test or a benchmark failed. Without a CUDA GPU it exits with status 2 at once.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "benchmarks/run_gpu.sh needs a CUDA GPU visible to torch; this machine has none" >&2
    exit 2
fi
if ! "$python" -c 'import fastbp.kernels' 2>/dev/null; then
    "$python" -m pip install --no-deps --no-build-isolation -q -e . || exit 1
fi

gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name())')
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
out=${1:-benchmarks/results/$(date -u +%F)-$slug}
commit=${FASTBP_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
rounds=${GPU_BENCH_ROUNDS:-7}
workloads=${GPU_WORKLOADS:-docs-64x1000x100x10 mnist-784x256x128x10-b128 mnist-784x256x128x10-b4096 mnist-sigmoid-b128}
mkdir -p "$out"
log="$out/run.log"
: >"$log"
status=0

echo "== $gpu, commit $commit, $(date -u +%FT%TZ)" | tee -a "$log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"

echo "== CUDA tests" | tee -a "$log"
workers=()  # pytest-xdist, where installed, compiles the kernels of several tests at once
"$python" -c 'import xdist' 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-8}")
timeout "${GPU_TEST_TIMEOUT:-240}" "$python" -m pytest -q -p no:cacheprovider "${workers[@]}" \
    tests/test_triton.py tests/test_gpu_step.py tests/test_ecosystem.py tests/test_accuracy.py \
    tests/test_train.py -k "cuda or triton" 2>&1 | tee "$out/pytest.log" || status=1

echo "== Triton launch cost" | tee -a "$log"
timeout 120 "$python" -m benchmarks.triton_launch --json "$out/triton_launch.json" 2>&1 \
    | tee -a "$log" || status=1

echo "== pytest-benchmark, CUDA groups" | tee -a "$log"
timeout "${GPU_PYTEST_BENCH_TIMEOUT:-150}" "$python" -m pytest -q -p no:cacheprovider \
    benchmarks/test_steps.py --benchmark-only -k "cuda and (docs or b128)" \
    --benchmark-json "$out/pytest-benchmark.json" 2>&1 | tail -n 40 | tee -a "$log" || status=1

parts=()
for workload in $workloads; do
    echo "== fastbp bench --device cuda --workloads $workload" | tee -a "$log"
    part=$(mktemp -d)
    if timeout "${GPU_BENCH_TIMEOUT:-90}" "$python" -m fastbp.cli bench --full --device cuda --workloads "$workload" \
        --rounds "$rounds" --output-dir "$part" 2>&1 | tee -a "$log"; then
        parts+=("$part")
    else
        status=1
    fi
done

"$python" -m benchmarks.gpu_report --output-dir "$out" --commit "$commit" \
    --rounds "$rounds" "${parts[@]}" || status=1
exit $status
