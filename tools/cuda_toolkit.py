"""Facts about a CUDA toolkit that the build and the wheel tools need: where its nvcc
is, its version, and the release list of GPU architectures, derived from what that
nvcc reports (``nvcc --list-gpu-arch``) so that no toolkit's list is hard-coded.

setup.py imports it; tools/build_wheels.sh runs it:

    python tools/cuda_toolkit.py [--nvcc PATH] nvcc|version|major|archs|release-archs
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

# Floor of the release list: the kernels do bf16 arithmetic, native from Ampere on.
MIN_ARCH = 80
# Integrated (Jetson) GPUs: JetPack brings its own CUDA stack and wheels, so release
# wheels leave them out. 87 Orin; 101 Thor up to CUDA 12.9, renamed 110 in CUDA 13.
EMBEDDED_ARCHS = frozenset({53, 62, 72, 87, 101, 110})


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then /usr/local/cuda/bin; or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _run(nvcc: str, *args: str) -> str:
    return subprocess.run([nvcc, *args], check=True, capture_output=True, text=True).stdout


def version(nvcc: str) -> str:
    """Full toolkit version, e.g. ``13.0.88`` (from ``nvcc --version``)."""
    out = _run(nvcc, "--version")
    match = re.search(r"\bV(\d+\.\d+\.\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return match.group(1)


def major(nvcc: str) -> int:
    return int(version(nvcc).split(".")[0])


def gpu_archs(nvcc: str) -> List[int]:
    """Every virtual architecture the toolkit compiles for (``compute_NN``), ascending;
    arch-specific variants (``compute_90a``) are left out."""
    out = _run(nvcc, "--list-gpu-arch")
    archs = sorted({int(n) for n in re.findall(r"^compute_(\d+)$", out, re.MULTILINE)})
    if not archs:
        raise RuntimeError(f"`{nvcc} --list-gpu-arch` listed no architecture:\n{out}")
    return archs


def release_archs(nvcc: str) -> List[str]:
    """The release arch list in CMake syntax: machine code (``NN-real``) for every
    discrete-GPU arch from sm_80 up that the toolkit supports, and for the newest one
    machine code plus PTX (plain ``NN``) that the driver can JIT for future GPUs."""
    archs = [a for a in gpu_archs(nvcc) if a >= MIN_ARCH and a not in EMBEDDED_ARCHS]
    if not archs:
        raise RuntimeError(f"{nvcc} supports no GPU architecture from sm_{MIN_ARCH} up")
    return [f"{a}-real" for a in archs[:-1]] + [str(archs[-1])]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvcc", help="nvcc to ask (default: found as setup.py finds it)")
    parser.add_argument("what", choices=("nvcc", "version", "major", "archs", "release-archs"))
    args = parser.parse_args(argv)
    nvcc = args.nvcc or find_nvcc()
    if nvcc is None:
        print("nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH and /usr/local/cuda/bin)",
              file=sys.stderr)
        return 1
    if args.what == "nvcc":
        print(nvcc)
    elif args.what == "version":
        print(version(nvcc))
    elif args.what == "major":
        print(major(nvcc))
    elif args.what == "archs":
        print(";".join(str(a) for a in gpu_archs(nvcc)))
    else:
        print(";".join(release_archs(nvcc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
