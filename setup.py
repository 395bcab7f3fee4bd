"""Build script: the Python package plus, when nvcc is found, the CUDA library.

The CUDA library (``posenc_fast._C``) is built by CMake + ninja + pybind11. It does
not link libtorch and needs no torch at build time, so one build serves every torch
version. Environment:

* ``POSENC_FAST_BUILD_CUDA``: ``1`` requires the CUDA build (error without nvcc),
  ``0`` skips it (pure-Python package: Triton + reference), unset builds it when
  nvcc is found.
* ``POSENC_FAST_CUDA_ARCHS``: CMake arch list, e.g. ``80;90`` (default), or ``all``
  for the release list that tools/cuda_toolkit.py derives from the toolkit.
* ``CUDA_HOME`` / ``CUDA_PATH``: where to look for nvcc (then ``PATH``, then
  ``/usr/local/cuda``).

A CUDA build gets the local version ``+cu<major>`` of the toolkit (``0.1.0+cu13``): the
library runs with every torch, so the CUDA major is the one thing a wheel must match.
A pure-Python build keeps the plain version and is tagged ``py3-none-any``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import cuda_toolkit  # noqa: E402  (tools/cuda_toolkit.py: nvcc discovery, version, arch lists)

VERSION = "0.1.0"
DEFAULT_ARCHS = "80;90"


def _log(msg):
    print(f"[posenc_fast build] {msg}", file=sys.stderr, flush=True)


def cuda_build_wanted():
    """Decide whether to build the CUDA extension; returns the nvcc path or None."""
    flag = os.environ.get("POSENC_FAST_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"POSENC_FAST_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        _log("POSENC_FAST_BUILD_CUDA=0: building the pure-Python package (triton + reference "
             "backends, wheel tag py3-none-any)")
        return None
    nvcc = cuda_toolkit.find_nvcc()
    if nvcc is None:
        if flag == "1":
            raise SystemExit(
                "POSENC_FAST_BUILD_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin, "
                "$CUDA_PATH/bin, PATH and /usr/local/cuda/bin)"
            )
        _log("nvcc not found: building the pure-Python package (triton + reference backends, "
             "wheel tag py3-none-any)")
        return None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name, nvcc):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        archs = os.environ.get("POSENC_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
        cfg = ["-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
               f"-DPOSENC_FAST_CUDA_ARCHS={archs}",
               f"-DPOSENC_FAST_OUTPUT_DIR={ext_path.parent}",
               f"-DPOSENC_FAST_OUTPUT_NAME={ext_path.name}",
               f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        _log(f"CUDA archs: {archs}" + (" (release list, derived by CMake from nvcc)" if archs == "all" else ""))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = []
version = VERSION
# A source distribution is toolkit-neutral: plain version; the wheel built from it decides.
nvcc = None if "sdist" in sys.argv[1:] else cuda_build_wanted()
if nvcc:
    cuda_version = cuda_toolkit.version(nvcc)
    version = f"{VERSION}+cu{cuda_version.split('.')[0]}"
    ext_modules.append(CMakeExtension("posenc_fast._C", nvcc))
    _log(f"building the CUDA extension with {nvcc} (CUDA {cuda_version}): posenc-fast {version}")
    build_base = f"build/cuda-{cuda_version}"
else:
    build_base = "build/py"

setup(
    version=version,
    # triton_kernels/ lives at the top of the repo but ships *inside* the package:
    # another published package owns the top-level name `triton_kernels`.
    packages=find_packages(include=["posenc_fast", "posenc_fast.*"]) + ["posenc_fast.triton_kernels"],
    package_dir={"posenc_fast.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    # One build folder per variant: setuptools reuses build/lib between runs, so a
    # shared one would slip a CUDA build's _C into a later pure-Python wheel (and
    # mix two toolkits in one CMake cache).
    options={"build": {"build_base": build_base}},
    zip_safe=False,
)
