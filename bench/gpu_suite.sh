#!/usr/bin/env bash
# The whole GPU check: install offline, environment report + demo, the GPU test
# suite, the benchmarks. Logs and JSON land in the folder given.
#   usage: bench/gpu_suite.sh OUT_DIR [all|tests|bench] [pytest -k expression for the benchmarks]
# On the lent GPU machine (10 minutes a command): bash bench/gpu_suite.sh "$OUT" tests,
# then bash bench/gpu_suite.sh "$OUT" bench "pyramid or rope", ... if `all` does not fit.
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUT_DIR [all|tests|bench] [bench -k filter]}
stage=${2:-all}
bench_filter=${3:-}
case "$stage" in all|tests|bench) ;; *) echo "stage must be all, tests or bench, got $stage" >&2; exit 2;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The copy of the tree on the GPU machine may have no .git: records carry this instead.
export POSENC_FAST_COMMIT=${POSENC_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
status=0

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
    > "$out/env.txt" 2>&1
if ! pip install --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1; then
    tail -40 "$out/install.log"; echo "install failed"; exit 1
fi
python -m posenc_fast 2>&1 | tee "$out/demo.txt" || status=1

if [ "$stage" != bench ]; then
    # GPU suite: every test, GPU-marked ones included (they skip only without a GPU).
    # Not here: the wheel tests need PyPI (fresh venvs), which the GPU machine cannot
    # reach; the CPU-side compile check of the Triton kernels is redundant where the
    # GPU tests compile and run them.
    timeout 420 pytest tests -m "not wheels" --ignore=tests/test_triton_compile.py -q -rs --durations=15 \
        -p no:cacheprovider > "$out/tests.log" 2>&1 || status=1
    tail -25 "$out/tests.log"
fi

if [ "$stage" != tests ]; then
    mkdir -p "$out/results"
    POSENC_FAST_BENCH_RESULTS="$out/results" timeout 480 pytest bench --benchmark-only -q -p no:cacheprovider \
        ${bench_filter:+-k "$bench_filter"} --benchmark-columns=median,iqr,rounds > "$out/bench.log" 2>&1 || status=1
    tail -30 "$out/bench.log"
fi
exit $status
