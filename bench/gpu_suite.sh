#!/usr/bin/env bash
# The GPU check in one lease: one command, at most BUDGET seconds (default 480),
# steps in order of value, each writing its results as it goes, the run stopping
# cleanly when the budget runs out. Everything lands in at most 8 files in OUT:
#   env.txt       GPU, driver, versions, commit
#   log.txt       install log and each step's start, end, status and duration
#   results.jsonl benchmark records (device, versions, commit in each)
#   tests.log     GPU test suite: failing tests with tracebacks and max errors
#   ncu.csv       Nsight Compute: DRAM throughput and achieved occupancy per kernel
#   sanitizer.log compute-sanitizer memcheck + racecheck on small shapes
#   e2e.log       (stage e2e) end-to-end benchmark output
#
#   usage: bench/gpu_suite.sh OUT [main|e2e] [--budget SECONDS] [--dry-run]
# On the lent GPU machine: bash bench/gpu_suite.sh "$OUT" main --budget 470; if time
# is left, bash bench/gpu_suite.sh "$OUT" e2e --budget ... . --dry-run (CI, no GPU)
# runs the same plumbing with each step cut to a plumbing check.
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUT [main|e2e] [--budget SECONDS] [--dry-run]}
shift
stage=main
budget=480
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        main|e2e) stage=$1 ;;
        --budget) budget=${2:?--budget needs seconds}; shift ;;
        --dry-run) dry=1 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The copy of the tree on the GPU machine may have no .git: records carry this instead.
export POSENC_FAST_COMMIT=${POSENC_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export POSENC_FAST_BENCH_RESULTS_FILE="$out/results.jsonl"
log="$out/log.txt"
start=$SECONDS
status=0

remaining() { echo $(( budget - (SECONDS - start) )); }

# step NAME MIN_SECONDS CMD...: runs CMD under the time left (output appended to the
# log unless CMD redirects it), records status and duration; skipped when less than
# MIN_SECONDS remain, so the run ends cleanly inside its budget.
step() {
    local name=$1 need=$2
    shift 2
    local left
    left=$(remaining)
    if [ "$left" -lt "$need" ]; then
        echo "SKIP $name: ${left}s left, needs ${need}s" | tee -a "$log"
        return 0
    fi
    echo "START $name (${left}s left)" >> "$log"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$left" "$@" >> "$log" 2>&1
    rc=$?
    echo "END $name rc=$rc $((SECONDS - t0))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

{
    echo "commit $POSENC_FAST_COMMIT stage $stage budget ${budget}s dry_run $dry"
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    python -c "import triton; print('triton', triton.__version__)" 2>&1
    nproc
} > "$out/env.txt" 2>&1

if [ "$dry" = 1 ]; then
    bench_args=(--collect-only -q)
    test_args=(--collect-only -q)
    host_args=(--quick)
    profile_args=(--dry-run)
else
    bench_args=(--benchmark-only -q --benchmark-columns=median,iqr,rounds)
    test_args=(-q -rfE --tb=short -p no:randomly)
    host_args=(--mode real)
    profile_args=()
    # sm_90 only: the build takes a fraction of the default list's time.
    step install 60 env POSENC_FAST_CUDA_ARCHS=90 POSENC_FAST_BUILD_CUDA=1 \
        pip install --no-build-isolation --no-deps -e .
fi

if [ "$stage" = main ]; then
    # 1. Headline benchmarks: each op fwd + bwd at the SPEC workloads, eager and
    #    torch.compile in the same run, with the copy bandwidth and GEMM rate.
    step bench-headline 90 env POSENC_FAST_BENCH_HEADLINE=$((1 - dry)) \
        pytest bench -p no:cacheprovider "${bench_args[@]}" --ignore=bench/test_bench_e2e.py
    # 2. Host time per call at sampling sizes, real launches.
    step host-overhead 20 python bench/host_overhead.py "${host_args[@]}" --json "$out/results.jsonl"
    # 3. The GPU test suite (wheel tests need PyPI; the CPU-side compile check is moot here).
    step tests 120 sh -c "pytest tests -m 'not wheels' --ignore=tests/test_triton_compile.py \
        -p no:cacheprovider ${test_args[*]} > '$out/tests.log' 2>&1"
    # 4. Nsight Compute: DRAM throughput and achieved occupancy of each kernel.
    if command -v ncu > /dev/null && [ "$dry" = 0 ]; then
        step ncu 60 sh -c "ncu --csv --target-processes all --nvtx --nvtx-include profile/ --metrics \
dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum \
python bench/profile_kernels.py > '$out/ncu.csv' 2>> '$log'"
    else
        step ncu 5 sh -c "python bench/profile_kernels.py ${profile_args[*]} > '$out/ncu.csv'"
    fi
    # 5. compute-sanitizer memcheck and racecheck on small shapes.
    if command -v compute-sanitizer > /dev/null && [ "$dry" = 0 ]; then
        step sanitizer 60 sh -c "{ compute-sanitizer --tool memcheck --target-processes all \
python bench/profile_kernels.py --small && compute-sanitizer --tool racecheck --target-processes all \
python bench/profile_kernels.py --small; } > '$out/sanitizer.log' 2>&1"
    else
        step sanitizer 5 sh -c "python bench/profile_kernels.py --small ${profile_args[*]} > '$out/sanitizer.log' 2>&1"
    fi
else
    step bench-e2e 60 sh -c "pytest bench/test_bench_e2e.py -p no:cacheprovider ${bench_args[*]} > '$out/e2e.log' 2>&1"
fi

echo "done in $((SECONDS - start))s, status $status" | tee -a "$log"
exit $status
