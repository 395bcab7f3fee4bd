"""Build script: the Python package plus, when nvcc is found, the CUDA library.

The CUDA library (``posenc_fast._C``) is built by CMake + ninja; its binding is written
against CPython's limited API (Python 3.10 stable ABI), so one build serves every
CPython >= 3.10 (wheel tag ``cp310-abi3``), and it neither links libtorch nor needs
torch at build time, so it serves every torch version too. Python 3.9 gets the
pure-Python package (Triton + reference backends). Environment:

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

import json
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
# The binding's stable-ABI floor (Py_LIMITED_API in CMakeLists.txt): METH_FASTCALL,
# which keeps the per-call cost low, is in the stable ABI from 3.10 on.
ABI3_FLOOR = (3, 10)


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
    if sys.version_info[:2] < ABI3_FLOOR:
        floor = ".".join(map(str, ABI3_FLOOR))
        if flag == "1":
            raise SystemExit(f"POSENC_FAST_BUILD_CUDA=1 but the CUDA extension needs Python >= {floor} "
                             f"(its binding uses the {floor} stable ABI); this is Python {sys.version.split()[0]}")
        _log(f"Python {sys.version.split()[0]} < {floor}: building the pure-Python package (triton + "
             f"reference backends); the CUDA extension needs Python >= {floor}")
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
        # py_limited_api: setuptools names the module _C.abi3.so (see bdist_wheel below).
        super().__init__(name, sources=[], py_limited_api=True)
        self.nvcc = nvcc


def cmake_dir_for(build_dir: Path, identity: dict) -> Path:
    """``build_dir``, emptied first when another build environment left it.

    A CMake build folder records the tools of the environment that configured it
    (cmake, ninja, compilers, Python). pip's build isolation puts cmake and ninja in a
    temporary environment that it deletes afterwards, so a folder kept in the checkout
    (build/...) would point the next build at tools that no longer exist. The folder is
    reused only by the same environment (incremental rebuilds, e.g. repeated
    ``pip install --no-build-isolation -e .``); any other starts from scratch."""
    stamp = build_dir / "posenc_fast-build-env.json"
    if build_dir.exists():
        try:
            previous = json.loads(stamp.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != identity:
            _log(f"{build_dir} was configured by another build environment: starting it afresh")
            shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True)
    stamp.write_text(json.dumps(identity, indent=1))
    return build_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A _C of another ABI left next to this one (e.g. an older per-version
        # _C.cpython-311-*.so) would win the import: CPython tries the version-specific
        # suffix before .abi3.so. It would also ride along into the wheel.
        for stale in ext_path.parent.glob("_C.*"):
            if stale.name != ext_path.name and stale.suffix in (".so", ".pyd"):
                _log(f"removing {stale} (another build's extension; it would shadow {ext_path.name})")
                stale.unlink()
        cmake = shutil.which("cmake")
        ninja = shutil.which("ninja")
        if cmake is None:
            raise SystemExit("cmake not found on PATH (pip installs it as a build requirement; without build "
                             "isolation: pip install cmake ninja)")
        build_dir = cmake_dir_for(Path(self.build_temp).resolve() / "cmake", {
            "cmake": cmake, "ninja": ninja, "nvcc": ext.nvcc, "python": sys.executable,
            "cxx": os.environ.get("CXX"), "cudahostcxx": os.environ.get("CUDAHOSTCXX")})

        archs = os.environ.get("POSENC_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
        cfg = ["-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
               f"-DPOSENC_FAST_CUDA_ARCHS={archs}",
               f"-DPOSENC_FAST_OUTPUT_DIR={ext_path.parent}",
               f"-DPOSENC_FAST_OUTPUT_NAME={ext_path.name}",
               f"-DPython_EXECUTABLE={sys.executable}"]
        if ninja:
            cfg.append("-GNinja")
        _log(f"CUDA archs: {archs}" + (" (release list, derived by CMake from nvcc)" if archs == "all" else ""))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = []
options = {}
version = VERSION
# A source distribution is toolkit-neutral: plain version; the wheel built from it decides.
nvcc = None if "sdist" in sys.argv[1:] else cuda_build_wanted()
if nvcc:
    cuda_version = cuda_toolkit.version(nvcc)
    version = f"{VERSION}+cu{cuda_version.split('.')[0]}"
    ext_modules.append(CMakeExtension("posenc_fast._C", nvcc))
    _log(f"building the CUDA extension with {nvcc} (CUDA {cuda_version}): posenc-fast {version}")
    build_base = f"build/cuda-{cuda_version}"
    # One wheel for every CPython >= 3.10: cp310-abi3.
    options["bdist_wheel"] = {"py_limited_api": "cp{}{}".format(*ABI3_FLOOR)}
else:
    build_base = "build/py"
# One build folder per variant: setuptools reuses build/lib between runs, so a
# shared one would slip a CUDA build's _C into a later pure-Python wheel (and
# mix two toolkits in one CMake cache).
options["build"] = {"build_base": build_base}

setup(
    version=version,
    # triton_kernels/ lives at the top of the repo but ships *inside* the package:
    # another published package owns the top-level name `triton_kernels`.
    packages=find_packages(include=["posenc_fast", "posenc_fast.*"]) + ["posenc_fast.triton_kernels"],
    package_dir={"posenc_fast.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    options=options,
    zip_safe=False,
)
