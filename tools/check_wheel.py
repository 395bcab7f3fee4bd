"""Checks that a posenc_fast wheel is what its name claims.

    python tools/check_wheel.py WHEEL --cuda-major 13 --archs "80-real;90"   # a CUDA wheel
    python tools/check_wheel.py WHEEL --cuda-major 13 --archs 90 --load-with python3.10 --load-with python3.13
    python tools/check_wheel.py WHEEL --pure                                 # the pure one

CUDA wheel: version ``<v>+cu<major>``; tags ``cp310-abi3-manylinux_2_NN_<arch>`` (one
wheel for every CPython >= 3.10), the platform tag being the one ``auditwheel show``
finds true for the binary; ``abi3audit`` finds no use of the C API outside the 3.10
stable ABI; one extension ``posenc_fast/_C.abi3.so``; the Triton kernels inside the package;
the extension's NEEDED entries only glibc/libstdc++/libgcc (no libtorch, libc10,
libcudart, libcuda, libpython: it must load with any torch, and without a driver);
no absolute RPATH/RUNPATH; machine code and PTX for exactly the ``--archs`` list
(CMake syntax) in every fatbin of the extension; no pin on torch. With ``--load-with
PYTHON`` (repeatable) each interpreter loads the extension and calls into it (no torch
needed: the library does not use it).
Pure wheel: ``py3-none-any``, plain version, no compiled file.
Needs binutils (readelf, objcopy) and, for a CUDA wheel, auditwheel and abi3audit on
PATH (pip install auditwheel abi3audit).
Exits 1 with every failed check listed.
"""

from __future__ import annotations

import argparse
import email
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Set, Tuple

# Libraries every manylinux system provides; anything else must not be NEEDED.
SYSTEM_LIBS = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0",
    "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
}
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_SASS = 1, 2
# One CUDA wheel serves every CPython from 3.10 on (Py_LIMITED_API in CMakeLists.txt).
ABI3_TAGS = ("cp310", "abi3")
EXTENSION = "posenc_fast/_C.abi3.so"
# What posenc_fast/ops calls on the library (posenc_fast._cuda.lib()).
FUNCTIONS = ("pyramid_pos_level_add_fwd", "pyramid_pos_level_add_bwd", "rope_apply", "rope_workspace_floats",
             "qkv_proj_fwd", "qkv_proj_bwd", "qkv_proj_bwd_rows_per_chunk", "pos_embed_add_fwd",
             "pos_embed_add_grid_fwd", "pos_embed_add_bwd", "driver_version")

# Run by each --load-with interpreter: load the extension by path (importing the
# posenc_fast package would need torch) and call into its binding.
LOAD_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("posenc_fast._C", sys.argv[1])
lib = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lib)
missing = [f for f in sys.argv[2].split(",") if not callable(getattr(lib, f, None))]
assert not missing, f"functions missing: {missing}"
assert lib.cuda_version.split(".")[0].isdigit() and lib.cuda_archs, (lib.cuda_version, lib.cuda_archs)
driver = lib.driver_version()
assert isinstance(driver, int), driver
assert lib.rope_workspace_floats(0, 2, 2, 10, 64, 2, False) == 0
assert lib.rope_workspace_floats(2, 2, 2, 10, 64, 2, per_head=True) > 0
assert lib.qkv_proj_bwd_rows_per_chunk() > 0
args = [0, 7, [1, 1, 1], 0, 0, [0, 0], 0, 0, [1, 1], 0, 0, 0, 1, 1, 1, 0, 1.0, 0.0, 0, 0]
for bad, error, text in ((args, ValueError, "dtype code"), (args[:3] + ["0"] + args[4:], TypeError, "'pos'")):
    try:
        lib.pyramid_pos_level_add_fwd(*bad)
    except error as exc:
        assert text in str(exc), exc
    else:
        raise AssertionError(f"no {error.__name__} for bad arguments")
print(f"loaded by Python {sys.version.split()[0]}: CUDA {lib.cuda_version}, archs {lib.cuda_archs}, driver {driver}")
"""


def parse_name(wheel: Path) -> Tuple[str, str, str, str, List[str]]:
    """(distribution, version, python tag, abi tag, platform tags) of a wheel file name."""
    parts = wheel.name[:-len(".whl")].split("-")
    if len(parts) != 5:
        raise ValueError(f"{wheel.name}: not a wheel name of the form name-version-py-abi-plat.whl")
    return parts[0], parts[1], parts[2], parts[3], parts[4].split(".")


def glibc_of(plat: str) -> Tuple[int, int]:
    """(major, minor) glibc version that a manylinux platform tag promises, e.g. (2, 34)."""
    match = re.match(r"manylinux_(\d+)_(\d+)_", plat)
    if match:
        return int(match.group(1)), int(match.group(2))
    legacy = plat.split("_")[0]
    if legacy in LEGACY_MANYLINUX:
        return LEGACY_MANYLINUX[legacy]
    raise ValueError(f"{plat} is not a manylinux platform tag")


def expected_archs(cmake_archs: str) -> Tuple[Set[int], Set[int]]:
    """(machine-code archs, PTX archs) that a CMake CUDA_ARCHITECTURES list produces:
    ``NN`` gives both, ``NN-real`` machine code, ``NN-virtual`` PTX."""
    sass, ptx = set(), set()
    for item in filter(None, cmake_archs.split(";")):
        match = re.fullmatch(r"(\d+)(-real|-virtual)?", item.strip())
        if match is None:
            raise ValueError(f"cannot check arch {item!r}: expected NN, NN-real or NN-virtual")
        arch, kind = int(match.group(1)), match.group(2)
        if kind != "-virtual":
            sass.add(arch)
        if kind != "-real":
            ptx.add(arch)
    return sass, ptx


def fatbin_archs(blob: bytes) -> List[Tuple[Set[int], Set[int]]]:
    """(machine-code archs, PTX archs) of each fatbin in a .nv_fatbin section: a run of
    fatbins, each a 16-byte header (magic, version, header size, payload size) and
    entries whose headers hold the kind at byte 0 and the sm number at byte 28."""
    found, off = [], 0
    while off + 16 <= len(blob):
        magic, _, header_size, size = struct.unpack_from("<IHHQ", blob, off)
        if magic != FATBIN_MAGIC:
            off += 8  # fatbins are 8-byte aligned; skip the padding between them
            continue
        sass, ptx = set(), set()
        entry, end = off + header_size, off + header_size + size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch = struct.unpack_from("<I", blob, entry + 28)[0]
            {FATBIN_SASS: sass, FATBIN_PTX: ptx}.get(kind, set()).add(arch)
            entry += entry_header + payload
        found.append((sass, ptx))
        off = end
    return found


def elf_dynamic(so: Path) -> Dict[str, List[str]]:
    """NEEDED / RPATH / RUNPATH entries of a shared object (readelf -d)."""
    out = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    entries: Dict[str, List[str]] = {"NEEDED": [], "RPATH": [], "RUNPATH": []}
    for tag, value in re.findall(r"\((NEEDED|RPATH|RUNPATH)\)\s+[^\[]*\[([^\]]*)\]", out):
        entries[tag].append(value)
    return entries


def nv_fatbin(so: Path, workdir: Path) -> bytes:
    out = workdir / (so.name + ".nv_fatbin")
    subprocess.run(["objcopy", "--dump-section", f".nv_fatbin={out}", str(so), str(workdir / "stripped.so")],
                   check=True, capture_output=True)
    return out.read_bytes() if out.is_file() else b""  # no such section: no device code


def auditwheel_tag(wheel: Path) -> str:
    out = subprocess.run(["auditwheel", "show", str(wheel)], check=True, capture_output=True, text=True).stdout
    match = re.search(r'consistent\s+with\s+the\s+following\s+platform\s+tag:\s+"([^"]+)"', out)
    if match is None:
        raise RuntimeError(f"cannot read the platform tag from `auditwheel show {wheel}`:\n{out}")
    return match.group(1)


def check_pure(wheel: Path, names: List[str], errors: List[str]) -> None:
    _, version, py, abi, plats = parse_name(wheel)
    if (py, abi, plats) != ("py3", "none", ["any"]):
        errors.append(f"tags are {py}-{abi}-{'.'.join(plats)}, expected py3-none-any")
    if "+" in version:
        errors.append(f"version {version} has a local part; the pure wheel has the plain version")
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".dll"))]
    if compiled:
        errors.append(f"pure wheel holds compiled files: {compiled}")


def abi3audit_errors(wheel: Path) -> List[str]:
    """abi3audit's verdict: the extension uses only the stable ABI of its abi3 tag."""
    if shutil.which("abi3audit") is None:
        return ["abi3audit not found on PATH (pip install abi3audit)"]
    proc = subprocess.run(["abi3audit", "--strict", "--summary", str(wheel)], capture_output=True, text=True)
    if proc.returncode != 0:
        return [f"abi3audit finds stable-ABI violations:\n{proc.stdout}{proc.stderr}"]
    return []


def load_extension(so: Path, python: str) -> Tuple[bool, str]:
    """(ok, output) of loading the extension file ``so`` with ``python`` and calling into
    it (LOAD_SCRIPT)."""
    proc = subprocess.run([python, "-c", LOAD_SCRIPT, str(so), ",".join(FUNCTIONS)], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr[-3000:]).strip()


def load_errors(wheel: Path, python: str) -> List[str]:
    """load_extension of the wheel's extension."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        if EXTENSION not in zf.namelist():
            return [f"{EXTENSION} missing: nothing to load with {python}"]
        ok, out = load_extension(Path(zf.extract(EXTENSION, tmp)), python)
    if not ok:
        return [f"{python} cannot load or call {EXTENSION}:\n{out}"]
    print(f"{wheel.name}: {out}")
    return []


def check_cuda(wheel: Path, names: List[str], cuda_major: int, archs: str, errors: List[str]) -> None:
    _, version, py, abi, plats = parse_name(wheel)
    if not version.endswith(f"+cu{cuda_major}"):
        errors.append(f"version {version} does not end with +cu{cuda_major}")
    if (py, abi) != ABI3_TAGS:
        errors.append(f"python/abi tags {py}-{abi}: expected {'-'.join(ABI3_TAGS)} (one wheel for every CPython "
                      f">= 3.10)")
    else:
        errors.extend(abi3audit_errors(wheel))
    try:
        true_tag = auditwheel_tag(wheel)
        claimed = [glibc_of(p) for p in plats]
        if true_tag not in plats or min(claimed) < glibc_of(true_tag):
            errors.append(f"platform tags {plats} but auditwheel finds the binary needs {true_tag}")
    except ValueError as exc:
        errors.append(str(exc))
    except subprocess.CalledProcessError as exc:
        errors.append(f"auditwheel show failed: {exc.stdout}{exc.stderr}")
    exts = [n for n in names if n.endswith(".so")]
    if exts != [EXTENSION]:
        errors.append(f"shared objects {exts}: expected exactly {EXTENSION}")
    if any(".libs/" in n for n in names):
        errors.append("auditwheel grafted libraries into the wheel (a *.libs/ folder): the extension "
                      "must need system libraries only")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        for name in exts:
            so = Path(zf.extract(name, tmp))
            dyn = elf_dynamic(so)
            extra = sorted(set(dyn["NEEDED"]) - SYSTEM_LIBS)
            if extra:
                errors.append(f"{name} needs {extra} (only {sorted(SYSTEM_LIBS)} are allowed: no "
                              f"libtorch, libc10, libcudart, libcuda or libpython)")
            absolute = [p for p in dyn["RPATH"] + dyn["RUNPATH"] if any(d.startswith("/") for d in p.split(":"))]
            if absolute:
                errors.append(f"{name} has absolute RPATH/RUNPATH {absolute}")
            want_sass, want_ptx = expected_archs(archs)
            fatbins = fatbin_archs(nv_fatbin(so, Path(tmp)))
            if not fatbins:
                errors.append(f"{name} holds no fatbin (no device code)")
            for sass, ptx in fatbins:
                if (sass, ptx) != (want_sass, want_ptx):
                    errors.append(f"{name}: a fatbin has machine code for {sorted(sass)} and PTX for "
                                  f"{sorted(ptx)}, expected {sorted(want_sass)} and {sorted(want_ptx)}")
                    break


def check(wheel: Path, pure: bool, cuda_major: int = 0, archs: str = "", load_with=()) -> List[str]:
    """Every failed check of ``wheel`` (empty when it passes); ``load_with``: interpreters
    that must load the CUDA wheel's extension."""
    errors: List[str] = []
    dist, *_ = parse_name(wheel)
    if dist != "posenc_fast":
        errors.append(f"distribution {dist}, expected posenc_fast")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        meta = email.message_from_bytes(zf.read(meta_name)) if meta_name else None
    if "posenc_fast/triton_kernels/__init__.py" not in names:
        errors.append("posenc_fast/triton_kernels/ is missing")
    if any(n.startswith("triton_kernels/") for n in names):
        errors.append("top-level triton_kernels/ shipped (another published package owns that name)")
    if meta is None:
        errors.append("no METADATA")
    else:
        pins = [r for r in meta.get_all("Requires-Dist") or [] if re.match(r"torch\b", r) and re.search(r"==|<", r)]
        if pins:
            errors.append(f"torch is pinned ({pins}): the wheel must serve every torch version")
    if pure:
        check_pure(wheel, names, errors)
    else:
        check_cuda(wheel, names, cuda_major, archs, errors)
        for python in load_with:
            errors.extend(load_errors(wheel, python))
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--pure", action="store_true", help="the pure-Python wheel")
    kind.add_argument("--cuda-major", type=int, help="CUDA major the wheel was built for")
    parser.add_argument("--archs", help="arch list the CUDA wheel was built with (CMake syntax)")
    parser.add_argument("--load-with", action="append", default=[], metavar="PYTHON",
                        help="an interpreter that must load the CUDA wheel's extension (repeatable)")
    args = parser.parse_args(argv)
    if args.cuda_major is not None and not args.archs:
        parser.error("--archs is required with --cuda-major")
    if args.pure and args.load_with:
        parser.error("--load-with needs a CUDA wheel")
    errors = check(args.wheel, args.pure, args.cuda_major or 0, args.archs or "", args.load_with)
    for err in errors:
        print(f"{args.wheel.name}: FAIL: {err}", file=sys.stderr)
    if not errors:
        print(f"{args.wheel.name}: ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
