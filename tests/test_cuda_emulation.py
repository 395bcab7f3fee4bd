"""The CUDA kernels (csrc/*.cu) run on the CPU under host emulation, against the reference.

CI has no GPU, so the CUDA backend would otherwise be compiled but never executed
there. Here each op family's .cu file is rewritten into host C++
(tests/cuda_emulation/prep.py) and compiled with g++ together with the family's
real binding (csrc/bindings/<family>.cpp, limited API) and the emulation header
(tests/cuda_emulation/emu.h): a module with exactly the API of ``posenc_fast._C``.
The tests point ``posenc_fast._cuda.lib`` at it and call the ops' custom ops with
backend "cuda" on CPU tensors, forward and backward through the registered autograd,
so the op layer (strides, workspaces, dtype codes, output allocation) is exercised
together with the kernels.

What this verifies: the kernels' index arithmetic, tiling and launch configuration
(grid/block limits, shared-memory size), every template variant a configuration
selects (the tests assert which ran: vector vs scalar paths, pairs per lane), the
math in fp32 with the CUDA toolkit's own fp16/bf16 conversions, output coverage
(outputs are NaN-poisoned), run-to-run determinism of the reductions, and:
* barriers: the threads of a block run concurrently and meet at real barriers;
  static __shared__ arrays record their last writer and readers per barrier
  interval, so a missing __syncthreads (read-after-write or write-after-read
  between threads), a read of an element no thread wrote, or two writers are
  reported deterministically, whatever order the host threads ran in;
* full-warp shuffles (a shuffle with a partial mask or exited lanes is an error);
* misaligned vector accesses: every reinterpret_cast checks the alignment of its
  target type, where the GPU would fault;
* out-of-bounds indexing of fixed-size arrays, shared memory included
  (-fsanitize=bounds,alignment; a sanitizer report fails the test).
Emulator errors surface as the RuntimeError of posenc::check_last_launch.

What it cannot verify: timing and performance; the GPU memory model beyond
barrier semantics (races between blocks, global-memory races, fences, atomics:
blocks run one at a time); dynamic (extern) shared memory gets the NaN fill but no
race checks; warp-divergence subtleties (independent thread scheduling, shuffles
with partial masks, which are reported rather than modelled); device math that
differs from glibc's (sincosf/expf ulp differences are inside the tolerances);
register/occupancy limits and __launch_bounds__.

The build is cached in a temporary directory keyed by a hash of every input.
Without g++, the CUDA headers or Python's headers the tests skip, except under POSENC_FAST_REQUIRE_CUDA_EXT=1 (CI),
where that is a failure. POSENC_FAST_EMU_CSRC points the build at another csrc/
tree (to check that a planted bug is caught).
"""

import hashlib
import math
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import posenc_fast as pf
from posenc_fast import _backends, _cuda, _fastpath
from posenc_fast.ops import pos_embed as PE
from posenc_fast.ops import pyramid as P
from posenc_fast.ops import qkv_proj as Q
from posenc_fast.ops import rope as R
from posenc_fast.reference import pos_embed as pe_ref
from posenc_fast.reference import pyramid as pyr_ref
from posenc_fast.reference import qkv_proj as qkv_ref
from posenc_fast.reference import rope as rope_ref

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emulation"
CSRC = Path(os.environ.get("POSENC_FAST_EMU_CSRC", ROOT / "csrc")).resolve()
FAMILIES = {  # family -> (csrc/<name>.cu, csrc/bindings/<name>.cpp with posenc_bind::<name>_methods)
    "pyramid": ("pyramid_pos_level_add", "pyramid_pos_level_add"),
    "rope": ("rope", "rope"),
    "qkv_proj": ("qkv_proj", "qkv_proj"),
    "pos_embed": ("pos_embed_add", "pos_embed_add"),
}
# Py_LIMITED_API as in the real build (CMakeLists.txt): the binding must compile against it.
CXXFLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-fsanitize=alignment,bounds", "-w",
            "-DPy_LIMITED_API=0x030A0000"]
# Read here, not in the build threads: sysconfig's lazy initialisation is not thread-safe.
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
PYTHON_INCLUDE = sysconfig.get_paths()["include"]
_CTYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
FWD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------------ build

def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return Path(base) / "include"
    return None


def _missing_toolchain():
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        return f"no C++ compiler ({cxx}) on PATH"
    if _cuda_include() is None:
        return "no CUDA headers (cuda_fp16.h) under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda"
    if not (Path(PYTHON_INCLUDE) / "Python.h").is_file():
        return f"no Python headers (Python.h) in {PYTHON_INCLUDE}"
    return None


def _compile_jobs(family, src_cpp, build):
    binding = FAMILIES[family][1]
    includes = [CSRC, CSRC / "include", CSRC / "bindings", _cuda_include(), Path(PYTHON_INCLUDE)]
    flags = CXXFLAGS + ["-include", str(EMU / "emu.h")] + [f"-I{p}" for p in includes]
    module_defs = [f"-DPOSENC_EMU_MODULE=posenc_emu_{family}", f"-DPOSENC_EMU_METHODS={binding}_methods"]
    return [
        [*flags, "-c", str(src_cpp), "-o", str(build / "kernels.o")],
        [*flags, "-c", str(CSRC / "bindings" / f"{binding}.cpp"), "-o", str(build / "binding.o")],
        [*flags, *module_defs, "-c", str(EMU / "module.cpp"), "-o", str(build / "module.o")],
    ]


def _load_prep():
    spec = importlib.util.spec_from_file_location("posenc_emu_prep", EMU / "prep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PREP = _load_prep()


def _cache_key(family, read):
    """Hash of the build's inputs; ``read``: the files prep.py read for the family's .cu
    (the .cu, the headers it inlined and the public headers it checked)."""
    _, binding = FAMILIES[family]
    h = hashlib.sha256()
    inputs = [EMU / "emu.h", EMU / "prep.py", EMU / "module.cpp", *read,
              CSRC / "bindings" / f"{binding}.cpp", *sorted((CSRC / "bindings").glob("*.h")),
              *sorted((CSRC / "include" / "posenc_fast").glob("*.h"))]  # the binding's headers
    for p in inputs:
        h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update("\0".join([cxx, version, sys.version, str(_cuda_include()), *CXXFLAGS]).encode())
    return h.hexdigest()[:20]


# One compiler process per core at a time (the families build in parallel threads).
_COMPILE_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def _compile(cmd):
    with _COMPILE_SLOTS:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _build(family):
    """Path of the emulated extension of ``family``, built unless cached."""
    cxx = os.environ.get("CXX", "g++")
    kernels, read = _PREP.expand(CSRC / f"{FAMILIES[family][0]}.cu")
    cache = Path(tempfile.gettempdir()) / "posenc_fast_cuda_emulation" / f"{family}-{_cache_key(family, read)}"
    target = cache / f"posenc_emu_{family}{EXT_SUFFIX}"
    if target.is_file():
        return target
    cache.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f"{family}-", dir=cache.parent))
    src_cpp = build / "kernels.cpp"
    src_cpp.write_text(kernels)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(_compile, [[cxx, *job] for job in _compile_jobs(family, src_cpp, build)]))
    failed = [r.stdout for r in results if r.returncode]
    if failed:
        raise RuntimeError(f"emulated {family} build failed:\n" + "\n".join(failed)[-6000:])
    out = build / target.name
    objects = [str(o) for o in sorted(build.glob("*.o"))]
    link = subprocess.run([cxx, "-shared", "-pthread", "-fsanitize=alignment,bounds", *objects, "-o", str(out)],
                          capture_output=True, text=True)
    if link.returncode:
        raise RuntimeError(f"emulated {family} link failed:\n{link.stderr[-6000:]}")
    try:
        build.rename(cache)  # atomic: a concurrent session may have won, then use its build
    except OSError:
        shutil.rmtree(build, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def sanitizer_dir(tmp_path_factory):
    """Sanitizer reports go to a file here (report.<pid>, kept open and appended to by
    the runtime), which every test checks for growth."""
    return tmp_path_factory.mktemp("sanitizer")


@pytest.fixture(scope="session")
def emu_builds():
    """Builds the families in parallel threads (their compiles share one slot
    per core); family -> module path, or the exception."""
    why = _missing_toolchain()
    if why:
        if os.environ.get("POSENC_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"the CUDA emulation build must run here: {why}")
        pytest.skip(f"CUDA emulation not possible: {why}")
    results = {}

    def run(family):
        try:
            results[family] = _build(family)
        except Exception as exc:  # reported by the family's fixture
            results[family] = exc

    threads = [threading.Thread(target=run, args=(f,)) for f in FAMILIES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


_MODULES = {}


class _EmulatedLib:
    """The emulated module in place of ``posenc_fast._C``: CPU tensors have device
    index None, which the bindings (ints) get as device 0."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if name == "launch_planned" or name.endswith("_plan"):
            return fn  # plans are made with an int device index

        def call(*args):
            if len(args) >= 2 and args[-2] is None:
                args = args[:-2] + (0, args[-1])
            return fn(*args)

        return call


def _sanitizer_output(directory):
    return "".join(p.read_text(errors="replace") for p in sorted(directory.iterdir()))


def _use(family, emu_builds, sanitizer_dir, monkeypatch):
    result = emu_builds[family]
    if isinstance(result, Exception):
        pytest.fail(str(result))
    if family not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"posenc_emu_{family}", result)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.emu_set_report_path(str(sanitizer_dir / "report"))
        _cuda.connect(module)
        _MODULES[family] = module
    module = _MODULES[family]
    module.emu_take_kernels()
    module.emu_set_num_sms(132)
    monkeypatch.setattr(_cuda, "lib", lambda: _EmulatedLib(module))
    monkeypatch.setattr(_cuda, "stream", lambda device: 0)
    _fastpath.clear_plans()  # launch plans belong to the library that made them
    before = len(_sanitizer_output(sanitizer_dir))
    yield module
    _fastpath.clear_plans()
    reports = _sanitizer_output(sanitizer_dir)[before:]
    assert not reports, f"sanitizer reports from the emulated kernels:\n{reports[-4000:]}"


@pytest.fixture
def emu_pyramid(emu_builds, sanitizer_dir, monkeypatch):
    yield from _use("pyramid", emu_builds, sanitizer_dir, monkeypatch)


@pytest.fixture
def emu_rope(emu_builds, sanitizer_dir, monkeypatch):
    yield from _use("rope", emu_builds, sanitizer_dir, monkeypatch)


@pytest.fixture
def emu_qkv(emu_builds, sanitizer_dir, monkeypatch):
    yield from _use("qkv_proj", emu_builds, sanitizer_dir, monkeypatch)


@pytest.fixture
def emu_pos_embed(emu_builds, sanitizer_dir, monkeypatch):
    yield from _use("pos_embed", emu_builds, sanitizer_dir, monkeypatch)


def _close(got, exp, tol, what):
    """|got - exp| <= tol * max(1, max|exp|), in float64, no NaN (poisoned outputs)."""
    got, exp = got.double(), exp.double()
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    has_nan = bool(torch.isnan(got).any())
    assert not has_nan, f"{what}: NaN (an element was not written?)"
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    err = (got - exp).abs().max().item() if exp.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} * {scale:.3g}"


def _ran(module, *fragments):
    """Asserts that kernels whose names contain each fragment ran since the last call."""
    names = module.emu_take_kernels()
    for frag in fragments:
        assert any(frag in n for n in names), f"no kernel matching {frag!r} ran; ran: {names}"


# ---------------------------------------------------------------- pyramid

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
SMALL = [1, 2, 3]                   # L = 14, square levels
RECT = [(1, 1), (2, 3), (3, 5)]     # L = 22, rectangular levels


def _pyr_x(B, n, C, dtype, layout):
    if layout == "contig":
        return torch.randn(B, n, C, dtype=dtype)
    if layout == "transposed":
        return torch.randn(n, B, C, dtype=dtype).transpose(0, 1)
    if layout == "chstride":  # channel stride 2
        return torch.randn(B, n, 2 * C, dtype=dtype)[..., ::2]
    if layout == "misaligned":  # unit stride, rows not 16-byte aligned
        return torch.randn(B, n, C + 1, dtype=dtype)[..., 1:]
    if layout == "offset":  # vector-friendly strides, data pointer 1 element past 16-byte alignment
        return torch.randn(B * n * C + 1, dtype=dtype)[1:].view(B, n, C)
    assert layout == "wide"  # aligned rows, row stride != C
    return torch.randn(B, n, C + 16, dtype=dtype)[..., :C]


def _vec16(t):
    """Elements per 16-byte access the CUDA launchers use for ``t``: 1 where its
    channel stride, row strides, size or alignment do not allow them."""
    v = 16 // t.element_size()
    ok = t.stride(-1) == 1 and t.shape[-1] % v == 0 and all(st % v == 0 for st in t.stride()[:-1])
    return v if ok and t.data_ptr() % 16 == 0 else 1


# id: scales, B, C, (x, pos, lvl dtypes), window, x layout, pos table, (pos_weight, sincos_weight),
#     SMs, gradient layout, expected forward variant
PYRAMID_CASES = {
    "fp32-oddC": (SMALL, 3, 37, (f32, f32, f32), "full", "contig", "rows", (1.0, 0.0), 132, "contig", "VEC = 1"),
    "fp32-vec-window": (RECT, 2, 40, (f32, f32, f32), "mid", "wide", "cols", (0.7, 0.3), 1, "transposed",
                        "VEC = 4"),
    "fp16-vec-B5": (SMALL, 5, 64, (f16, f16, f16), "full", "contig", "rows", (1.0, 1.0), 1, "contig", "VEC = 8"),
    "fp16-misaligned": (RECT, 2, 64, (f16, f16, f16), "level", "misaligned", "rows", (1.0, 0.0), 132, "transposed",
                        "VEC = 1"),
    "bf16-vec-nopos": (RECT, 1, 24, (bf16, bf16, bf16), "level", "contig", None, (1.0, 1.0), 132, "contig",
                       "VEC = 8"),
    "bf16-chstride": (SMALL, 3, 38, (bf16, bf16, bf16), "mid", "chstride", "cols", (0.7, 0.3), 132, "transposed",
                      "VEC = 1"),
    "mixed-bf16x-fp32tables-vec": (RECT, 3, 64, (bf16, f32, f32), "full", "transposed", "rows", (0.7, 0.3), 1,
                                   "contig", "VEC = 8"),
    "mixed-fp16x-bf16pos": (SMALL, 2, 38, (f16, bf16, f32), "full", "contig", "rows", (1.0, 1.0), 132, "transposed",
                            "VEC = 1"),
    "bf16-offset": (SMALL, 2, 64, (bf16, bf16, bf16), "full", "offset", "rows", (1.0, 0.5), 132, "contig",
                    "VEC = 1"),
    "sincos-only-C2": (RECT, 3, 2, (f32, f32, f32), "full", "contig", None, (1.0, 1.0), 132, "contig", "VEC = 1"),
    # C not a multiple of 8: scalar 16-bit rows, 16-byte loads of the fp32 partials (C % 4 == 0)
    "bf16-C44": (SMALL, 9, 44, (bf16, bf16, bf16), "full", "contig", "rows", (1.0, 0.0), 1, "contig", "VEC = 1"),
    # the gradient's layout alone forces the scalar row sums: misaligned rows, channel stride 2, an offset pointer
    "fp16-grad-misaligned": (RECT, 2, 64, (f16, f16, f16), "full", "contig", "rows", (1.0, 0.0), 132, "misaligned",
                             "VEC = 8"),
    "bf16-grad-chstride": (SMALL, 3, 32, (bf16, bf16, bf16), "mid", "contig", "cols", (1.0, 0.0), 1, "chstride",
                           "VEC = 8"),
    "fp32-grad-offset-oddC": (RECT, 2, 30, (f32, f32, f32), "level", "contig", "rows", (0.5, 0.0), 132, "offset",
                              "VEC = 1"),
}


@pytest.mark.parametrize("case", list(PYRAMID_CASES))
def test_pyramid(emu_pyramid, case):
    scales, B, C, (xdt, pdt, ldt), window, layout, pos_kind, (pw, sw), sms, glayout, variant = PYRAMID_CASES[case]
    torch.manual_seed(len(case))
    emu_pyramid.emu_set_num_sms(sms)  # 1 SM: the batch is split over grid.z
    sc = pyr_ref.normalize_scales(scales)
    L = pyr_ref.pyramid_length(sc)
    start, n = {"full": (0, L), "mid": (3, L - 5), "level": (L - sc[-1][0] * sc[-1][1], sc[-1][0] * sc[-1][1])}[window]
    x = _pyr_x(B, n, C, xdt, layout).requires_grad_()
    pos = None
    if pos_kind == "rows":
        pos = torch.randn(L, C, dtype=pdt).requires_grad_()
    elif pos_kind == "cols":  # column-major table
        pos = torch.randn(C, L, dtype=pdt).t().requires_grad_()
    lvl = torch.randn(len(sc), C, dtype=ldt).requires_grad_()

    out = P._fwd_op(x, pos, lvl, P._flat(sc), start, pw, sw, "cuda")
    _ran(emu_pyramid, variant)
    exp = pyr_ref.pyramid_pos_level_add(x, pos, lvl, sc, start=start, pos_weight=pw, sincos_weight=sw)
    assert out.dtype == exp.dtype
    _close(out, exp, FWD_TOL[out.dtype], "out")

    g = _pyr_x(B, n, C, out.dtype, glayout)
    leaves = [t for t in (x, pos, lvl) if t is not None]
    got = torch.autograd.grad(out, leaves, g)
    names = emu_pyramid.emu_take_kernels()
    # 16-byte gradient loads whenever its layout allows; 16-byte loads of the fp32
    # chunk partials whenever C % 4 == 0
    assert any("pyramid_add_bwd_rows_kernel" in n and f"VEC = {_vec16(g)}" in n for n in names), names
    level_vec = 4 if C % 4 == 0 else 1
    assert any("pyramid_add_bwd_levels_kernel" in n and f"VEC = {level_vec}" in n for n in names), names
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rp, rl = ref_leaves[0], (ref_leaves[1] if pos is not None else None), ref_leaves[-1]
    o = pyr_ref.pyramid_pos_level_add(rx, rp, rl, sc, start=start, pos_weight=pw, sincos_weight=sw)
    exp_grads = torch.autograd.grad(o, ref_leaves, g.double())
    for name, leaf, a, e in zip(("dx", "dpos", "dlvl") if pos is not None else ("dx", "dlvl"), leaves, got,
                                exp_grads):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        # dlvl sums up to B * n values, rounded once to its dtype
        _close(a, e, FWD_TOL[leaf.dtype] * (4 if name == "dlvl" else 1), name)

    # The reductions have a fixed order: bitwise identical from run to run.
    again = torch.autograd.grad(P._fwd_op(x, pos, lvl, P._flat(sc), start, pw, sw, "cuda"), leaves, g)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- rope

def _rope_qk(B, H, L, D, dtype, layout):
    if layout == "BHLD":
        return torch.randn(B, H, L, D, dtype=dtype)
    if layout == "BLHD":  # attention's usual storage, viewed as (B, H, L, D)
        return torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2)
    assert layout == "Dstride"  # no unit stride along D: scalar path
    return torch.randn(B, H, L, 2 * D, dtype=dtype)[..., ::2]


# id: dtype, interleaved, B, Hq, Hk (0: k None), L, D, axes, per-head freqs, per-batch coords, layout,
#     expected vector flag of the forward kernel
ROPE_CASES = {
    "fp32-interleaved-shared": (f32, True, 2, 2, 2, 20, 64, 2, False, False, "BHLD", "VEC = true"),
    "bf16-half-perhead-BLHD": (bf16, False, 2, 3, 3, 13, 32, 2, True, True, "BLHD", "VEC = true"),
    "fp16-interleaved-knone-3axes": (f16, True, 1, 3, 0, 37, 128, 3, True, False, "BHLD", "VEC = true"),
    "fp32-half-GQA-batchcoords": (f32, False, 3, 4, 1, 9, 48, 2, False, True, "BLHD", "VEC = true"),
    "bf16-interleaved-Dstride": (bf16, True, 2, 2, 1, 11, 16, 1, False, False, "Dstride", "VEC = false"),
    # 350 token blocks: 2 heads per block instead of 1 (sincos reused across heads)
    "fp32-interleaved-D512-grouped-heads": (f32, True, 1, 4, 4, 2800, 512, 2, False, False, "BHLD", "VEC = true"),
    "fp32-half-odd-pairs": (f32, False, 1, 2, 2, 7, 6, 4, True, True, "BHLD", "VEC = false"),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope(emu_rope, case):
    dtype, inter, B, Hq, Hk, L, D, A, per_head, batch_coords, layout, variant = ROPE_CASES[case]
    torch.manual_seed(len(case))
    pairing = "interleaved" if inter else "half"
    q = _rope_qk(B, Hq, L, D, dtype, layout).requires_grad_()
    k = _rope_qk(B, Hk, L, D, dtype, layout).requires_grad_() if Hk else None
    coords = torch.randn(B, L, A) * 5 if batch_coords else torch.randn(L, A) * 5
    freqs = (torch.rand(Hq, A, D // 2) if per_head else torch.rand(A, D // 2)).requires_grad_()
    tol = FWD_TOL[dtype]

    if "grouped" in case:  # the d freqs workspace has one row set per group of heads
        rows = emu_rope.rope_workspace_floats(B, Hq, Hk, L, D, A, per_head) // (A * D // 2)
        assert rows < -(-L // 8) * B * (Hq + Hk), "heads are not grouped: the case lost its point"
    qo, ko = R._rope_op(q, k, coords, freqs, inter, False, "cuda")
    _ran(emu_rope, variant)
    eq, ek = rope_ref.apply_rope(q, k, coords, freqs, pairing=pairing)
    assert qo.stride() == q.stride() or layout == "Dstride"  # outputs keep the input's layout
    _close(qo, eq, tol, "q")
    if k is not None:
        _close(ko, ek, tol, "k")

    # backward with d freqs (the reduction kernels), then without (the conjugate rotation)
    gq = torch.randn_like(qo)
    gk = torch.randn_like(ko) if k is not None else None
    outs, grads = [qo] + ([ko] if k is not None else []), [gq] + ([gk] if k is not None else [])
    leaves = [q] + ([k] if k is not None else []) + [freqs]
    got = torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    _ran(emu_rope, "DFREQS = true", "reduce_rows_kernel")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk = ref_leaves[0], (ref_leaves[1] if k is not None else None)
    r_out = rope_ref.apply_rope(rq, rk, coords.double(), ref_leaves[-1], pairing=pairing)
    exp = torch.autograd.grad([t for t in r_out if t is not None], ref_leaves, [g.double() for g in grads])
    names = ["dq"] + (["dk"] if k is not None else []) + ["dfreqs"]
    for name, a, e in zip(names, got, exp):
        # d freqs sums B * L * heads products of rounded saved outputs
        _close(a, e, tol * (8 if name == "dfreqs" else 2), name)
    again = torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    assert torch.equal(again[-1], got[-1]), "d freqs is not bitwise reproducible"
    frozen = R._rope_op(q, k, coords, freqs.detach(), inter, False, "cuda")
    emu_rope.emu_take_kernels()
    no_freqs = torch.autograd.grad([t for t in frozen if t.numel()], leaves[:-1], grads)
    _ran(emu_rope, "DFREQS = false")
    for a, b in zip(no_freqs, got):
        assert torch.equal(a, b), "the conjugate rotation differs from the d freqs backward's"

    # in place, on a clone of the inputs' storage layout
    q2, k2 = q.detach().clone(), (k.detach().clone() if k is not None else None)
    R._rope_inplace_op(q2, k2, coords, freqs.detach(), inter, False, "cuda")
    assert torch.equal(q2, qo)
    if k is not None:
        assert torch.equal(k2, ko)


@pytest.mark.parametrize("dtype,inter,B,Hq,Hk,L,D,batch_table,layout,width,variant", [
    (f32, True, 2, 2, 2, 20, 64, False, "BHLD", "pairs", "VEC = true; bool DFREQS = false; bool FULL = false"),
    (bf16, False, 3, 2, 1, 9, 32, True, "BLHD", "pairs", "VEC = true; bool DFREQS = false; bool FULL = false"),
    (f16, True, 1, 2, 0, 11, 24, False, "Dstride", "pairs", "VEC = false; bool DFREQS = false; bool FULL = false"),
    (bf16, False, 2, 3, 2, 13, 64, False, "BLHD", "full", "VEC = true; bool DFREQS = false; bool FULL = true"),
    (f32, True, 3, 2, 1, 9, 24, True, "Dstride", "full", "VEC = false; bool DFREQS = false; bool FULL = true"),
])
def test_rope_table(emu_rope, dtype, inter, B, Hq, Hk, L, D, batch_table, layout, width, variant):
    """Table-defined rotation (A = 0: the kernel reads cos/sin instead of computing
    angles; full width: 4 planes, HF / HART style), forward, the transposed backward
    and in place."""
    torch.manual_seed(D + L)
    pairing = "interleaved" if inter else "half"
    q = _rope_qk(B, Hq, L, D, dtype, layout).requires_grad_()
    k = _rope_qk(B, Hk, L, D, dtype, layout).requires_grad_() if Hk else None
    cols = D // 2 if width == "pairs" else D
    shape = (B, L, cols) if batch_table else (L, cols)
    ang = torch.randn(shape) * 4
    cos, sin = ang.cos() * 0.9, ang.sin() * 1.1  # resampled tables are not rotations
    table, no_axes = R._kernel_inputs(q, None, None, cos, sin, pairing)  # what apply_rope hands the kernels
    qo, ko = R._rope_op(q, k, table, no_axes, inter, False, "cuda")
    ko = ko if k is not None else None
    _ran(emu_rope, variant)
    eq, ek = rope_ref.apply_rope_table(q, k, cos, sin, pairing=pairing)
    _close(qo, eq, FWD_TOL[dtype], "q")
    if k is not None:
        _close(ko, ek, FWD_TOL[dtype], "k")
    outs = [qo] + ([ko] if k is not None else [])
    grads = [torch.randn_like(t) for t in outs]
    leaves = [q] + ([k] if k is not None else [])
    got = torch.autograd.grad(outs, leaves, grads)
    exp = torch.autograd.grad([t for t in (eq, ek) if t is not None], leaves, grads)
    for name, a, e in zip(("dq", "dk"), got, exp):
        _close(a, e, FWD_TOL[dtype] * 2, name)
    q2, k2 = q.detach().clone(), (k.detach().clone() if k is not None else None)
    R._rope_inplace_op(q2, k2, table, no_axes, inter, False, "cuda")
    assert torch.equal(q2, qo) and (k is None or torch.equal(k2, ko))


# --------------------------------------------------------------- qkv_proj

def _fv(hd, ppl, rope, half, vec):
    """Template arguments of a forward variant (HD: head_dim 64 / 128, 0 for any other;
    PPL: pairs per lane; VEC: 16-byte vectors with HD, 2-element ones without)."""
    b = {0: "false", 1: "true"}
    return f"HD = {hd}; int PPL = {ppl}; bool ROPE = {b[rope]}; bool HALF = {b[half]}; bool VEC = {b[vec]}"


def _bv(hd, ppl, rot, half, vec):
    """Template arguments of a backward variant: the forward's layout; ROT 0 without
    rope, 1 with cos / sin tabulated per block (shared angles or a table), 2 with
    per-head angles or d freqs."""
    b = {0: "false", 1: "true"}
    return f"HD = {hd}; int PPL = {ppl}; int ROT = {rot}; bool HALF = {b[half]}; bool VEC = {b[vec]}"


# id: B, L, H, D, dtype, bias, l2 norm, q_scale, coords kind (None: no rope), axes, half pairing,
#     per-head freqs, d freqs (freqs require grad), grad layout, SMs, forward variant, backward
#     variant, backward head slices (grid.y: with the SM count it sets how many head-warps a
#     block holds, the rest of its 16 warps being row groups: 1, 2, 4, 8 and 16 all occur)
QKV_CASES = {
    # 1 SM: 2 head-warps x 8 row groups
    "VAR-1SM": (2, 13, 2, 64, f32, True, True, True, None, 0, False, False, False, "contig", 1,
                _fv(64, 2, 0, 0, 1), _bv(64, 2, 0, 0, 1), 2),
    "VAR-bf16": (1, 21, 2, 64, bf16, True, True, True, None, 0, False, False, False, "BLHD", 132,
                 _fv(64, 4, 0, 0, 1), _bv(64, 4, 0, 0, 1), 2),
    # 63 heads in 16 head-warps of one block per chunk, no row groups
    "VAR-H21-16headwarps": (1, 100, 21, 64, bf16, True, True, True, None, 0, False, False, False, "contig", 1,
                            _fv(64, 4, 0, 0, 1), _bv(64, 4, 0, 0, 1), 1),
    "VAR-fp16-Dstride-B3": (3, 30, 3, 64, f16, True, True, True, None, 0, False, False, False, "Dstride", 2,
                            _fv(64, 4, 0, 0, 1), _bv(64, 4, 0, 0, 0), 2),
    "D128-norope-bf16-offsetgrad": (2, 9, 2, 128, bf16, False, True, True, None, 0, False, False, False, "offset",
                                    132, _fv(128, 4, 0, 0, 1), _bv(128, 4, 0, 0, 0), 3),
    # frozen freqs: the block tabulates cos / sin (2 chunks, rows in 16-row tiles)
    "Infinity-rope-frozen-bf16": (1, 70, 2, 128, bf16, False, True, False, "grid", 2, False, False, False, "BLHD", 2,
                                  _fv(128, 4, 1, 0, 1), _bv(128, 4, 1, 0, 1), 2),
    "D64-rope-frozen-fp16-B3-batchcoords": (3, 40, 4, 64, f16, True, True, True, "batch", 2, False, False, False,
                                            "contig", 132, _fv(64, 4, 1, 0, 1), _bv(64, 4, 1, 0, 1), 3),
    "D128-half-frozen-bf16": (1, 33, 2, 128, bf16, True, True, True, "grid", 2, True, False, False, "contig", 1,
                              _fv(128, 8, 1, 1, 1), _bv(128, 8, 1, 1, 1), 1),
    "D64-half-frozen-f32-Dstride": (2, 20, 3, 64, f32, True, True, True, "rand", 3, True, False, False, "Dstride", 132,
                                    _fv(64, 4, 1, 1, 1), _bv(64, 4, 1, 1, 0), 3),
    "D96-frozen-generic-bf16-B3-nonorm": (3, 11, 2, 96, bf16, True, False, True, "rand", 2, False, False, False,
                                          "contig", 1, _fv(0, 2, 1, 0, 1), _bv(0, 2, 1, 0, 1), 3),
    # d freqs (shared freqs): the general rotation; 3 H x 32 lanes > 512 threads: two forward passes
    "Infinity-rope-dfreqs-2passes": (1, 25, 6, 128, f32, False, True, False, "grid", 2, False, False, True, "contig",
                                     132, _fv(128, 2, 1, 0, 1), _bv(128, 2, 2, 0, 1), 18),
    # per-head freqs; 1 SM: 4 head-warps x 4 row groups, then 8 x 2
    "D128-perhead-f32-4headwarps": (1, 7, 4, 128, f32, True, True, True, "rand", 2, False, True, True, "contig", 1,
                                    _fv(128, 2, 1, 0, 1), _bv(128, 2, 2, 0, 1), 3),
    "D128-perhead-bf16-8headwarps": (1, 7, 5, 128, bf16, True, True, True, "rand", 2, False, True, True, "BLHD", 1,
                                     _fv(128, 4, 1, 0, 1), _bv(128, 4, 2, 0, 1), 1),
    # half pairing with the general rotation: the generic layout
    "Infinity-half-fp16-dfreqs": (3, 9, 1, 128, f16, True, True, True, "grid", 2, True, False, True, "Dstride", 132,
                                  _fv(128, 8, 1, 1, 1), _bv(0, 2, 2, 1, 0), 3),
    # 3 H x 4 lanes = 36: the forward's second warp has one live head
    "D64-half-perhead-bf16-partialwarp": (1, 7, 3, 64, bf16, True, True, True, "rand", 2, True, True, True, "BLHD",
                                          132, _fv(64, 8, 1, 1, 1), _bv(0, 1, 2, 1, 0), 9),
    "perhead-half-batchcoords-3chunks": (2, 75, 3, 32, f32, True, False, True, "batch", 3, True, True, True, "BLHD",
                                         132, _fv(0, 1, 1, 1, 0), _bv(0, 1, 2, 1, 0), 9),
    "oddM-D40-perhead": (1, 37, 2, 40, bf16, True, True, True, "rand", 1, False, True, True, "contig", 132,
                         _fv(0, 1, 1, 0, 1), _bv(0, 1, 2, 0, 1), 6),
    "D256-half-4axes": (2, 3, 2, 256, f32, False, True, False, "rand", 4, True, True, True, "Dstride", 132,
                        _fv(0, 4, 1, 1, 0), _bv(0, 4, 2, 1, 0), 6),
    # C = 66: nothing is a multiple of 16 bytes
    "oddC-D22-norope-fp16": (1, 9, 3, 22, f16, True, True, True, None, 0, False, False, False, "contig", 132,
                             _fv(0, 1, 0, 0, 1), _bv(0, 1, 0, 0, 1), 9),
}


def _qkv_grad(t, layout):
    B, H, L, D = t.shape
    if layout == "contig":
        return torch.randn_like(t)
    if layout == "BLHD":
        return torch.randn(B, L, H, D, dtype=t.dtype).transpose(1, 2)
    if layout == "offset":  # unit strides, data pointer one element past 16-byte alignment
        return torch.randn(t.numel() + 1, dtype=t.dtype)[1:].view(B, H, L, D)
    assert layout == "Dstride"
    return torch.randn(B, H, L, 2 * D, dtype=t.dtype)[..., ::2]


def _qkv_bwd_slices(module, grads, q, k, rstd, q_scale, coords, freqs, norm, half, dfreqs):
    """grid.y of the backward launch (dry: nothing runs), and checks its block size."""
    with torch.no_grad():
        (launch,) = _dry_launches(module, lambda: Q._backward_impl(
            *grads, q.detach(), k.detach(), rstd, q_scale, coords, freqs, norm, half, True, q_scale is not None,
            dfreqs, "cuda"))
    name, grid, block = launch
    assert "qkv_bwd_kernel" in name and block == (512, 1, 1), launch
    return grid[1]


@pytest.mark.parametrize("case", list(QKV_CASES))
def test_qkv_proj(emu_qkv, case):
    (B, L, H, D, dtype, bias, norm, qs, coords_kind, A, half, per_head, dfreqs, glayout, sms, fwd_variant,
     bwd_variant, slices) = QKV_CASES[case]
    torch.manual_seed(len(case))
    emu_qkv.emu_set_num_sms(sms)
    C = H * D
    x = torch.randn(B, L, C, dtype=dtype).requires_grad_()
    w = (torch.randn(3 * C, C) / C ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(3 * C) * 0.5).to(dtype).requires_grad_() if bias else None
    q_scale = (torch.rand(H) + 0.5).requires_grad_() if qs else None
    coords = freqs = None
    if coords_kind == "grid":  # Infinity-like integer 2D grid
        side = int(L ** 0.5 + 0.999)
        i = torch.arange(L)
        coords = torch.stack([(i // side).float(), (i % side).float()], -1)
    elif coords_kind == "batch":
        coords = torch.randn(B, L, A) * 5
    elif coords_kind == "rand":
        coords = torch.randn(L, A) * 5
    if coords is not None:
        freqs = (torch.rand(H, A, D // 2) if per_head else torch.rand(A, D // 2)).requires_grad_(dfreqs)

    q, k, v, rstd = Q._fwd_op(x, w, b, q_scale, coords, freqs, H, norm, half, "cuda")
    _ran(emu_qkv, f"qkv_fwd_kernel(posenc::QkvProjFwdArgs) [with T = {_CTYPE[dtype]}; int {fwd_variant}]")
    pairing = "half" if half else "interleaved"
    exp = qkv_ref.qkv_proj(x, w, b, num_heads=H, qk_l2norm=norm, q_scale=q_scale, coords=coords, freqs=freqs,
                           pairing=pairing)
    tol = FWD_TOL[dtype]
    for name, a, e in zip("qkv", (q, k, v), exp):
        assert a.dtype == dtype
        _close(a, e, 2 * tol, name)

    grads = [_qkv_grad(t, glayout) for t in (q, k, v)]
    assert _qkv_bwd_slices(emu_qkv, grads, q, k, rstd, q_scale, coords, freqs, norm, half, dfreqs) == slices
    leaves = [t for t in (x, w, b, q_scale, freqs) if t is not None and t.requires_grad]
    got = torch.autograd.grad((q, k, v), leaves, grads)
    _ran(emu_qkv, f"qkv_bwd_kernel(posenc::QkvProjBwdArgs, int) [with T = {_CTYPE[dtype]}; int {bwd_variant}]")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx, rw = next(it), next(it)
    rb = next(it) if bias else None
    rs = next(it) if qs else None
    rf = (next(it) if dfreqs else freqs.double()) if freqs is not None else None
    r_out = qkv_ref.qkv_proj(rx, rw, rb, num_heads=H, qk_l2norm=norm, q_scale=rs,
                             coords=None if coords is None else coords.double(), freqs=rf, pairing=pairing)
    exp_grads = torch.autograd.grad(r_out, ref_leaves, [g.double() for g in grads])
    # low precision: the backward recovers the pre-rotation vectors from the rounded outputs
    gtol = {f32: 1e-4, f16: 1e-2, bf16: 6e-2}[dtype]
    names = [n for n, t in zip(("dx", "dw", "dbias", "dq_scale", "dfreqs"), (x, w, b, q_scale, freqs))
             if t is not None and t.requires_grad]
    for name, a, e in zip(names, got, exp_grads):
        _close(a, e, gtol, name)
    again = torch.autograd.grad(Q._fwd_op(x, w, b, q_scale, coords, freqs, H, norm, half, "cuda")[:3], leaves,
                                grads)
    for name, a, c in zip(names, got, again):
        assert torch.equal(a, c), f"{name} is not bitwise reproducible"


# id: B, L, H, D, dtype, table (else angles), table batch, half pairing, rotary_dim, forward variant,
#     backward variant (a table: cos / sin tabulated per block; angles: freqs require grad, d freqs)
QKV_TABLE_CASES = {
    "Infinity-mode1-table": (2, 5, 2, 128, f32, True, False, False, None, _fv(128, 2, 1, 0, 1),
                             _bv(128, 2, 1, 0, 1)),
    # 16 of 32 pairs rotate; runs of 8 half pairs stay on one side of 16: 16-byte accesses
    "partial-half-bf16-vec": (1, 6, 3, 64, bf16, True, True, True, 32, _fv(64, 8, 1, 1, 1), _bv(64, 8, 1, 1, 1)),
    # 10 rotating pairs, runs of 4: the generic layout, a pair per lane
    "partial-half-fp32-generic": (2, 3, 2, 64, f32, False, False, True, 20, _fv(0, 1, 1, 1, 0),
                                  _bv(0, 1, 2, 1, 0)),
    "partial-half-fp16-table-generic": (3, 20, 2, 64, f16, True, True, True, 20, _fv(0, 1, 1, 1, 0),
                                        _bv(0, 1, 1, 1, 0)),
    "partial-interleaved-fp16-D24": (3, 4, 2, 24, f16, True, True, False, 12, _fv(0, 1, 1, 0, 1),
                                     _bv(0, 1, 1, 0, 1)),
    "partial-interleaved-bf16-D128-table": (1, 40, 3, 128, bf16, True, False, False, 96, _fv(128, 4, 1, 0, 1),
                                            _bv(128, 4, 1, 0, 1)),
}


@pytest.mark.parametrize("case", list(QKV_TABLE_CASES))
def test_qkv_proj_table_and_partial_rotary(emu_qkv, case):
    """Table-defined rotation (0 axes: the kernels read cos/sin rows) and partial
    rotary (only the first rot_pairs pairs rotate), forward and backward."""
    B, L, H, D, dtype, table, batch_table, half, r, fwd_variant, bwd_variant = QKV_TABLE_CASES[case]
    torch.manual_seed(len(case))
    C, R = H * D, r or D
    x = torch.randn(B, L, C, dtype=dtype).requires_grad_()
    w = (torch.randn(3 * C, C) / C ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(3 * C) * 0.5).to(dtype).requires_grad_()
    q_scale = (torch.rand(H) + 0.5).requires_grad_()
    if table:
        ang = torch.randn((B, L, R // 2) if batch_table else (L, R // 2)) * 4
        rot = dict(cos=ang.cos() * 0.9, sin=ang.sin() * 1.1)  # resampled tables are not rotations
    else:
        rot = dict(coords=torch.randn(L, 2) * 5, freqs=torch.rand(2, R // 2).requires_grad_())
    c, f = Q._kernel_rotation(x, rot.get("coords"), rot.get("freqs"), rot.get("cos"), rot.get("sin"))
    q, k, v, _ = Q._fwd_op(x, w, b, q_scale, c, f, H, True, half, "cuda")
    _ran(emu_qkv, f"qkv_fwd_kernel(posenc::QkvProjFwdArgs) [with T = {_CTYPE[dtype]}; int {fwd_variant}]")
    pairing = "half" if half else "interleaved"
    exp = qkv_ref.qkv_proj(x, w, b, num_heads=H, qk_l2norm=True, q_scale=q_scale, pairing=pairing, rotary_dim=r,
                           **rot)
    for name, a, e in zip("qkv", (q, k, v), exp):
        _close(a, e, 2 * FWD_TOL[dtype], name)
    grads = [torch.randn_like(t) for t in (q, k, v)]
    leaves = [x, w, b, q_scale] + ([rot["freqs"]] if "freqs" in rot else [])
    got = torch.autograd.grad((q, k, v), leaves, grads)
    _ran(emu_qkv, f"qkv_bwd_kernel(posenc::QkvProjBwdArgs, int) [with T = {_CTYPE[dtype]}; int {bwd_variant}]")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rrot = {n: (t.double() if n != "freqs" else ref_leaves[-1]) for n, t in rot.items()}
    r_out = qkv_ref.qkv_proj(*ref_leaves[:3], num_heads=H, qk_l2norm=True, q_scale=ref_leaves[3], pairing=pairing,
                             rotary_dim=r, **rrot)
    exp_grads = torch.autograd.grad(r_out, ref_leaves, [g.double() for g in grads])
    gtol = {f32: 1e-4, f16: 1e-2, bf16: 6e-2}[dtype]
    for name, a, e in zip(("dx", "dw", "dbias", "dq_scale", "dfreqs"), got, exp_grads):
        _close(a, e, gtol, name)


# id: B, L (this scale's tokens), cache_start, L_max, H, D, dtype, rope, cache layout
#     ("BHLD": contiguous; "BLHD": a (B, L_max, H, D) buffer seen as (B, H, L_max, D);
#     "padded": head rows of D + 1 elements, odd strides, so the scalar path runs), forward variant
QKV_CACHE_CASES = {
    "VAR-first-scale": (3, 1, 0, 14, 2, 64, f32, False, "BHLD", "HD = 64; int PPL = 2; bool ROPE = false; bool HALF = false; bool VEC = true"),
    "VAR-bf16-mid": (1, 9, 5, 17, 2, 64, bf16, False, "BLHD", "HD = 64; int PPL = 4; bool ROPE = false; bool HALF = false; bool VEC = true"),
    "Infinity-rope-last-rows": (3, 4, 10, 14, 1, 128, f16, True, "padded",
                                "HD = 128; int PPL = 4; bool ROPE = true; bool HALF = false; bool VEC = false"),
}


@pytest.mark.parametrize("case", list(QKV_CACHE_CASES))
def test_qkv_proj_kv_cache_append(emu_qkv, case):
    """The epilogue writes k, v straight into the cache rows [start, start + n): equal
    to the plain outputs, every other row untouched (NaN poison stays)."""
    B, L, start, L_max, H, D, dtype, rope, layout, fwd_variant = QKV_CACHE_CASES[case]
    torch.manual_seed(len(case))
    C = H * D
    x = torch.randn(B, L, C, dtype=dtype)
    w = (torch.randn(3 * C, C) / C ** 0.5).to(dtype)
    b = (torch.randn(3 * C) * 0.5).to(dtype)
    q_scale = torch.rand(H) + 0.5
    coords = torch.randn(L, 2) * 5 if rope else None
    freqs = torch.rand(2, D // 2) if rope else None

    def cache():
        if layout == "BLHD":
            return torch.full((B, L_max, H, D), float("nan"), dtype=dtype).transpose(1, 2)
        if layout == "padded":
            return torch.full((B, H, L_max, D + 1), float("nan"), dtype=dtype)[..., :D]
        return torch.full((B, H, L_max, D), float("nan"), dtype=dtype)

    kc, vc = cache(), cache()
    q = Q._cached_op(x, w, b, q_scale, coords, freqs, kc, vc, start, H, True, False, "cuda")
    _ran(emu_qkv, f"qkv_fwd_kernel(posenc::QkvProjFwdArgs) [with T = {_CTYPE[dtype]}; int {fwd_variant}]")
    q0, k0, v0, _ = Q._fwd_op(x, w, b, q_scale, coords, freqs, H, True, False, "cuda")
    assert torch.equal(q, q0)
    assert torch.equal(kc[:, :, start:start + L], k0) and torch.equal(vc[:, :, start:start + L], v0)
    for t in (kc, vc):
        assert t[:, :, :start].isnan().all() and t[:, :, start + L:].isnan().all()
    exp = qkv_ref.qkv_proj(x, w, b, num_heads=H, qk_l2norm=True, q_scale=q_scale, coords=coords, freqs=freqs)
    for name, a, e in zip("qkv", (q, kc[:, :, start:start + L], vc[:, :, start:start + L]), exp):
        _close(a, e, 2 * FWD_TOL[dtype], name)


# -------------------------------------------------------------- pos_embed

# id: kind, options, x dtype, learned table shapes (dtype), C, scales, prefix, start, x layout, SMs,
#     expected forward variant, gradient layout (learned kinds)
POS_EMBED_CASES = {
    "mae-fp32-prefix-vec": ("mae", {}, f32, None, 12, [1, 2, (2, 3)], 1, 2, "contig", 132, "VEC = 4", None),
    "timm-bf16-interleave-reverse": ("timm", {"interleave": True, "reverse_coord": True}, bf16, None, 20,
                                     [(3, 5)], 0, 1, "transposed", 1, "VEC = 1", None),
    "sincos_pyramid-fp16-oddhalf": ("sincos_pyramid", {}, f16, None, 10, [1, 2, 3], 0, 0, "chstride", 132,
                                    "VEC = 1", None),
    "sincos_1d-fp32": ("sincos_1d", {"interleave": True}, f32, None, 6, [2, 3], 2, 3, "contig", 1, "VEC = 1", None),
    "detr-normalize-mask-vec": ("detr", {"normalize": True, "mask": True}, f32, None, 8, [(3, 4)], 1, 0, "wide", 1,
                                "VEC = 4", None),
    "sam-bf16-vec": ("sam", {"gaussian": True}, bf16, None, 16, [1, (2, 3)], 0, 1, "contig", 132, "VEC = 8", None),
    "flexvar-fp32-C150": ("flexvar", {}, f32, [((1, 150, 5, 6), f32)], 150, [1, 2, (3, 7)], 0, 2, "contig", 132,
                          "VEC = 1", "contig"),
    "flexvar-bf16-vec-fp32grid": ("flexvar", {}, bf16, [((1, 24, 4, 4), f32)], 24, [1, 2, 5], 0, 1, "contig", 1,
                                  "VEC = 8", "transposed"),
    "navit-bf16-fractional": ("navit", {"fractional": True}, bf16, [((5, 12), bf16), ((3, 12), bf16)], 12,
                              [1, 2, (2, 3)], 0, 1, "transposed", 1, "VEC = 1", "contig"),
    "navit-fp16-offset": ("navit", {}, f16, [((3, 16), f16), ((3, 16), f16)], 16, [1, (3, 3)], 0, 0, "offset", 132,
                          "VEC = 1", "offset"),
    "pix2struct-fp16x-fp32tables": ("pix2struct", {}, f16, [((4, 33), f32), ((5, 33), f32)], 33,
                                    [(3, 4)], 0, 0, "contig", 132, "VEC = 1", "contig"),
    # 16-bit, C a multiple of 8: 16-byte gradient loads, several tokens per block on 1 SM
    "flexvar-bf16-C64-B9": ("flexvar", {}, bf16, [((1, 64, 4, 4), bf16)], 64, [1, 2, 3, 4], 0, 0, "contig", 1,
                            "VEC = 8", "contig"),
    # C not a multiple of 8 (but of 4): scalar 16-bit gradient, 16-byte loads of the fp32 token sums
    "navit-fp16-C36": ("navit", {}, f16, [((3, 36), f16), ((3, 36), f16)], 36, [1, (3, 3)], 0, 0, "contig", 1,
                       "VEC = 1", "contig"),
    # the gradient's layout alone forces the scalar batch sums
    "flexvar-bf16-grad-misaligned": ("flexvar", {}, bf16, [((1, 32, 4, 4), bf16)], 32, [1, 2, 4], 0, 1, "contig",
                                     132, "VEC = 8", "misaligned"),
    "navit-fp32-grad-chstride": ("navit", {}, f32, [((4, 16), f32), ((4, 16), f32)], 16, [2, (3, 4)], 0, 2,
                                 "contig", 1, "VEC = 4", "chstride"),
}


@pytest.mark.parametrize("case", list(POS_EMBED_CASES))
def test_pos_embed(emu_pos_embed, case):
    kind, opts, xdt, shapes, C, scales, prefix, start, layout, sms, variant, glayout = POS_EMBED_CASES[case]
    torch.manual_seed(len(case))
    emu_pos_embed.emu_set_num_sms(sms)  # 1 SM: the batch is split over grid.z
    sc = pyr_ref.normalize_scales(scales)
    B = 9 if case.endswith("B9") else 3
    n = prefix + pyr_ref.pyramid_length(sc) - start
    opts = dict(opts)
    if opts.pop("mask", False):
        mask = torch.zeros(B, *sc[0], dtype=torch.bool)
        mask[0, -1:] = True
        mask[2, :, 2:] = True
        opts["mask"] = mask
    if opts.pop("gaussian", False):
        opts["gaussian"] = torch.randn(2, C // 2) * 2
    tables = tuple(torch.randn(*s, dtype=dt).requires_grad_() for s, dt in (shapes or ()))
    x = _pyr_x(B, n, C, xdt, layout).requires_grad_()
    # The op layer's own argument building (the public function resolves "cuda" only on CUDA tensors).
    full = dict(temperature=10000.0, interleave=False, reverse_coord=False, normalize=False, scale=2 * math.pi,
                fractional=False)
    full.update({k: v for k, v in opts.items() if k in full})
    rows = PE._validate(x, kind, sc, start, tables, opts.get("gaussian"), opts.get("mask"), prefix, full)[2]
    static = PE._static_inputs(kind, sc, rows, prefix, full, "mask" in opts, C, start, n, x.device)

    def run():
        return PE._fwd_op(*PE._op_args(kind, x, tables, opts.get("gaussian"), opts.get("mask"), start, prefix,
                                       full, static, "cuda"))

    out = run()
    _ran(emu_pos_embed, variant)
    exp = pe_ref.pos_embed_add(x, kind, sc, start=start, tables=tables, num_prefix_tokens=prefix, **opts)
    assert out.dtype == exp.dtype
    _close(out, exp, FWD_TOL[out.dtype], "out")
    if not tables:
        return
    g = _pyr_x(B, n, C, out.dtype, glayout)
    leaves = [x, *tables]
    got = torch.autograd.grad(out, leaves, g)
    # 16-byte gradient loads whenever its layout allows; 16-byte loads of the fp32
    # token sums whenever C % 4 == 0
    names = emu_pos_embed.emu_take_kernels()
    assert any("pos_embed_bwd_tokens_kernel" in k and f"VEC = {_vec16(g)}" in k for k in names), names
    assert any("pos_embed_bwd_table_kernel" in k and f"VEC = {4 if C % 4 == 0 else 1}" in k for k in names), names
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    o = pe_ref.pos_embed_add(ref_leaves[0], kind, sc, start=start, tables=tuple(ref_leaves[1:]),
                             num_prefix_tokens=prefix, **opts)
    exp_grads = torch.autograd.grad(o, ref_leaves, g.double())
    for i, (leaf, a, e) in enumerate(zip(leaves, got, exp_grads)):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        # a table row sums up to B * n rounded gradients
        _close(a, e, FWD_TOL[leaf.dtype] * (4 if i else 1), f"grad {i}")
    again = torch.autograd.grad(run(), leaves, g)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


# FlexVAR's grid read in its own layout: x dtype, grid dtype, C, (Gh, Gw), scales, prefix,
# start, grid layout, SMs, expected variant (16-byte x and out; 16-byte grid loads)
GRID_CASES = {
    "bf16-var-pyramid": (bf16, bf16, 16, (32, 32), [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 0, 0, "contig", 132,
                         "int VEC = 8; bool GRID_VEC = true"),
    # rows wider than a chunk, Gw = 40 past a 32-cell pass, a prefix token; 1 SM: batch slices
    "fp32-wide-rows": (f32, f32, 12, (6, 40), [(1, 20), (2, 40)], 1, 2, "contig", 1,
                       "int VEC = 4; bool GRID_VEC = true"),
    "fp16-fp32grid-channels-last": (f16, f32, 24, (8, 8), [1, 2, (3, 5), 9], 0, 1, "channels_last", 132,
                                    "int VEC = 8; bool GRID_VEC = false"),
    "bf16-C13-cell-stride": (bf16, bf16, 13, (8, 16), [1, 3, (5, 9)], 0, 0, "cell_stride", 1,
                             "int VEC = 1; bool GRID_VEC = false"),
    "fp32-3d-offset": (f32, f32, 8, (8, 8), [1, 2, 4], 2, 1, "3d-offset", 132, "int VEC = 4; bool GRID_VEC = false"),
    "fp16-C20-vec-grid": (f16, f16, 20, (16, 16), [2, 5, (3, 7)], 2, 3, "contig", 132,
                          "int VEC = 1; bool GRID_VEC = true"),
    "bf16-odd-grid": (bf16, bf16, 16, (5, 6), [1, (2, 3), (7, 4)], 0, 2, "contig", 1,
                      "int VEC = 8; bool GRID_VEC = false"),
}


def _grid_in_layout(g, layout):
    """g (1, C, Gh, Gw) with the same values in another layout (a leaf)."""
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    elif layout == "cell_stride":
        wide = torch.zeros(*g.shape[:-1], 2 * g.shape[-1], dtype=g.dtype)
        wide[..., ::2] = g
        g = wide[..., ::2]
    elif layout == "3d-offset":  # (C, Gh, Gw) one element into its storage: no aligned vector loads
        flat = torch.zeros(g.numel() + 1, dtype=g.dtype)
        flat[1:] = g.flatten()
        g = flat[1:].view(g.shape[1:])
    return g.detach().requires_grad_()


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_pos_embed_flexvar_grid(emu_pos_embed, case):
    """The grid kernel against the reference, forward and backward, per layout; then
    the grid changed in place (through .data: no version bump) shows in the next
    call, since nothing of it is kept between calls."""
    xdt, gdt, C, hw, scales, prefix, start, layout, sms, variant = GRID_CASES[case]
    torch.manual_seed(len(case))
    emu_pos_embed.emu_set_num_sms(sms)
    sc = pyr_ref.normalize_scales(scales)
    B = 5
    n = prefix + pyr_ref.pyramid_length(sc) - start - 1
    grid = _grid_in_layout(torch.randn(1, C, *hw).to(gdt), layout)
    x = torch.randn(B, n, C).to(xdt).requires_grad_()
    opts = dict(temperature=10000.0, interleave=False, reverse_coord=False, normalize=False, scale=2 * math.pi,
                fractional=False)
    rows = PE._validate(x, "flexvar", sc, start, (grid,), None, None, prefix, opts)[2]
    static = PE._static_inputs("flexvar", sc, rows, prefix, opts, False, C, start, n, x.device)

    def run():
        return PE._fwd_op(*PE._op_args("flexvar", x, (grid,), None, None, start, prefix, opts, static, "cuda"))

    def expected(leaves):
        return pe_ref.pos_embed_add(leaves[0], "flexvar", sc, start=start, tables=(leaves[1],),
                                    num_prefix_tokens=prefix)

    out = run()
    _ran(emu_pos_embed, "pos_embed_grid_fwd_kernel", variant)
    exp = expected((x, grid))
    assert out.dtype == exp.dtype
    _close(out, exp, FWD_TOL[out.dtype], "out")
    g = torch.randn(out.shape).to(out.dtype)
    got = torch.autograd.grad(out, [x, grid], g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, grid)]
    exp_grads = torch.autograd.grad(expected(ref_leaves), ref_leaves, g.double())
    for i, (leaf, a, e) in enumerate(zip((x, grid), got, exp_grads)):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        _close(a, e, FWD_TOL[leaf.dtype] * (4 if i else 1), f"grad {i}")
    again = run()
    assert torch.equal(out, again)
    grid.data.mul_(-1.5)
    _close(run(), expected((x, grid)), FWD_TOL[out.dtype], "out after an in-place update")


# ------------------------------------------- launch shapes at the SPEC workloads

def _dry_launches(module, fn):
    """(kernel, grid, block) of every launch ``fn`` makes, from the real host code in
    dry mode (no kernel runs)."""
    module.emu_set_dry(True)
    try:
        fn()
    finally:
        module.emu_set_dry(False)
    launches = []
    for entry in module.emu_take_launches():
        name, grid, block, _ = entry.split("|")
        launches.append((name, tuple(map(int, grid.split(","))), tuple(map(int, block.split(",")))))
    return launches


def _dry_grids(module, fn):
    """(grid size, threads per block) of every launch ``fn`` makes."""
    return [(math.prod(grid), math.prod(block)) for _, grid, block in _dry_launches(module, fn)]


@pytest.mark.parametrize("B,C", [(64, 1024), (32, 1920)])
def test_pos_embed_launches_fill_whole_waves_at_spec_shapes(emu_pos_embed, monkeypatch, B, C):
    """FlexVAR at the VAR-d16 / d30 sizes (bf16, 132 SMs): the forward slices the batch
    by the pyramid forward's rule for whole waves of the 4 blocks an SM holds (csrc
    kGridBlocksPerSM) and the backward's batch sums take tokens per block for whole
    waves of the blocks an SM holds (2048 threads: the kernel keeps to 32 registers);
    tools/kernel_report.py checks both against the compiled kernels."""
    from posenc_fast.triton_kernels._launch import wave_efficiency

    monkeypatch.setattr(PE._checks, "_POISON", False)
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    scales = tuple((s, s) for s in pn)
    x = torch.empty(B, sum(s * s for s in pn), C, dtype=bf16)
    tables = (torch.empty(1, C, 32, 32, dtype=bf16),)
    opts = dict(temperature=10000.0, interleave=False, reverse_coord=False, normalize=False, scale=2 * math.pi,
                fractional=False)
    rows = PE._validate(x, "flexvar", scales, 0, tables, None, None, 0, opts)[2]
    static = PE._static_inputs("flexvar", scales, rows, 0, opts, False, C, 0, x.shape[1], x.device)
    args = PE._op_args("flexvar", x, tables, None, None, 0, 0, opts, static, "cuda")
    (fwd,) = _dry_grids(emu_pos_embed, lambda: PE._forward(*args))
    tokens, _ = _dry_grids(emu_pos_embed, lambda: PE._backward_impl(x, *args[5:8], 0, bf16, "cuda"))
    assert wave_efficiency(fwd[0], 4 * 132) >= 0.85, fwd
    assert wave_efficiency(tokens[0], 2048 // tokens[1] * 132) >= 0.85, tokens


@pytest.mark.parametrize("B,C,H,rope", [(32, 1024, 16, False), (32, 1920, 30, False), (4, 2048, 16, True)])
def test_qkv_proj_backward_launch_fills_whole_waves_at_spec_shapes(emu_qkv, monkeypatch, B, C, H, rope):
    """VAR-d16 / d30 and Infinity-2B (bf16, 132 SMs): the backward's head slices end in
    whole waves of the 2 blocks per SM that its launch bounds leave these variants
    (tools/kernel_report.py checks the compiled kernels against that)."""
    import posenc_fast as pf
    from posenc_fast.triton_kernels._launch import wave_efficiency

    monkeypatch.setattr(Q._checks, "_POISON", False)
    pn = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64) if rope else (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    L, D = sum(s * s for s in pn), C // H
    coords = pf.pyramid_coords(pn, mode="round") if rope else None
    freqs = pf.axial_rope_freqs(D) if rope else None
    g = [torch.empty(B, H, L, D, dtype=bf16) for _ in range(5)]
    with torch.no_grad():
        ((name, grid, block),) = _dry_launches(emu_qkv, lambda: Q._backward_impl(
            *g, torch.empty(2, B * L, H), torch.ones(H), coords, freqs, True, False, True, True, False, "cuda"))
    assert "qkv_bwd_kernel" in name and block == (512, 1, 1)
    assert wave_efficiency(math.prod(grid), 2 * 132) >= 0.85, grid


# ------------------------------------------------- planned launches (sampling)

class _PlanSpy:
    """Counts what the emulated library's planned launches answer."""

    def __init__(self, module):
        self.module, self.answers = module, []

    def __getattr__(self, name):
        fn = getattr(_EmulatedLib(self.module), name)
        if name != "launch_planned":
            return fn

        def launch(*args):
            self.answers.append(fn(*args))
            return self.answers[-1]

        return launch


@pytest.fixture(params=["exchange_api", "to_dlpack"])
def planned(request, monkeypatch):
    """Launch plans read tensors through torch's DLPack exchange API, or through
    to_dlpack capsules (torch without the API); the public ops take cuda on CPU tensors."""
    monkeypatch.setattr(_backends, "unavailable_reason", lambda name, device=None: None)

    def use(module):
        assert _cuda.connect(module, exchange_api=request.param == "exchange_api") == (
            request.param == "exchange_api" and hasattr(torch.Tensor, "__dlpack_c_exchange_api__"))
        spy = _PlanSpy(module)
        monkeypatch.setattr(_cuda, "lib", lambda: spy)
        return spy

    yield use
    for module in _MODULES.values():
        _cuda.connect(module)


def _expect_planned(spy, answers):
    assert spy.answers == answers, spy.answers
    spy.answers.clear()


@pytest.mark.parametrize("dtypes", [(f32, f32, f32), (bf16, bf16, bf16), (f16, f32, f32)])
def test_pyramid_sampling_runs_planned_launches(emu_pyramid, planned, dtypes):
    """Scale by scale under no_grad: the first call of each scale checks in Python,
    launches and makes the plan; the next calls launch the plan. A tensor that
    differs from the plan's (dtype, layout, shape, subclass, no pos) is not launched
    by the plan but checked afresh, with the right result."""
    spy = planned(emu_pyramid)
    xdt, pdt, ldt = dtypes
    torch.manual_seed(3)
    sc = pyr_ref.normalize_scales(SMALL)
    pos = torch.randn(1, 14, 40, dtype=pdt)
    lvl = torch.nn.Parameter(torch.randn(3, 40, dtype=ldt))
    begin = [0, 1, 5]
    with torch.no_grad():
        for rep in range(2):
            for s, (h, w) in enumerate(sc):
                x = torch.randn(3, h * w, 40, dtype=xdt)
                out = pf.pyramid_pos_level_add(x, pos, lvl, SMALL, start=begin[s], backend="cuda")
                _expect_planned(spy, [True] if rep else [])
                _ran(emu_pyramid, "pyramid_add_fwd_kernel")
                exp = pyr_ref.pyramid_pos_level_add(x, pos, lvl, sc, start=begin[s])
                _close(out, exp, FWD_TOL[out.dtype], f"scale {s}, call {rep}")
        x = torch.randn(3, 4, 40, dtype=xdt)

        def planned_call():
            pf.pyramid_pos_level_add(x, pos, lvl, SMALL, start=1, backend="cuda")  # (re)makes the plan
            spy.answers.clear()
            out = pf.pyramid_pos_level_add(x, pos, lvl, SMALL, start=1, backend="cuda")
            _expect_planned(spy, [True])
            return out

        for what, args in {
            "x transposed": (torch.randn(4, 3, 40, dtype=xdt).transpose(0, 1), pos, lvl),
            "x of another batch": (torch.randn(2, 4, 40, dtype=xdt), pos, lvl),
            "pos in another dtype": (x, pos.to(f16 if pdt != f16 else bf16), lvl),
            "pos column-major": (x, pos[0].t().contiguous().t(), lvl),
            "no pos": (x, None, lvl),
            "lvl a subclass": (x, pos, torch.Tensor._make_subclass(_Marked, lvl.detach())),
        }.items():
            planned_call()
            out = pf.pyramid_pos_level_add(*args, SMALL, start=1, backend="cuda")
            assert spy.answers[:1] == [False], what
            spy.answers.clear()
            exp = pyr_ref.pyramid_pos_level_add(*args, sc, start=1)
            _close(out, exp, FWD_TOL[out.dtype], what)
        # The plan reads the tables' current storage: in-place and .data updates show.
        planned_call()
        pos.mul_(-2.0)
        lvl.data = torch.randn(3, 40, dtype=ldt)
        out = pf.pyramid_pos_level_add(x, pos, lvl, SMALL, start=1, backend="cuda")
        _expect_planned(spy, [True])
        _close(out, pyr_ref.pyramid_pos_level_add(x, pos, lvl, sc, start=1), FWD_TOL[out.dtype], "after updates")


class _Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("kind", ["flexvar", "mae", "sincos_pyramid"])
def test_pos_embed_sampling_runs_planned_launches(emu_pos_embed, planned, kind):
    spy = planned(emu_pos_embed)
    torch.manual_seed(4)
    scales, prefix = ([1, 2, (2, 3)], 0) if kind != "mae" else ([4], 1)
    sc = pyr_ref.normalize_scales(scales)
    tables = (torch.randn(1, 24, 5, 7),) if kind == "flexvar" else ()
    kw = dict(tables=tables, num_prefix_tokens=prefix)
    windows = [(0, 1), (1, 4), (5, 6)] if kind != "mae" else [(1, 16)]
    with torch.no_grad():
        for rep in range(2):
            for start, n in windows:
                x = torch.randn(2, n, 24, dtype=bf16)
                out = pf.pos_embed_add(x, kind, scales, start=start, backend="cuda", **kw)
                _expect_planned(spy, [True] if rep else [])
                _close(out, pe_ref.pos_embed_add(x, kind, sc, start=start, **kw), FWD_TOL[out.dtype],
                       f"window {start}, call {rep}")
        start, n = windows[-1]
        x = torch.randn(2, n, 24, dtype=bf16)
        cases = {"x strided": (torch.randn(2, n, 48, dtype=bf16)[..., ::2], kw), "x fp32": (x.float(), kw)}
        if tables:
            cases["grid in another layout"] = (x, dict(kw, tables=(tables[0].contiguous(
                memory_format=torch.channels_last),)))
        for what, (xx, kwargs) in cases.items():
            pf.pos_embed_add(x, kind, scales, start=start, backend="cuda", **kw)
            spy.answers.clear()
            pf.pos_embed_add(x, kind, scales, start=start, backend="cuda", **kw)
            _expect_planned(spy, [True])
            out = pf.pos_embed_add(xx, kind, scales, start=start, backend="cuda", **kwargs)
            assert spy.answers[:1] == [False], what
            spy.answers.clear()
            _close(out, pe_ref.pos_embed_add(xx, kind, sc, start=start, **kwargs), FWD_TOL[out.dtype], what)


@pytest.mark.parametrize("cached", [False, True])
def test_qkv_proj_sampling_under_autocast_leaves_the_weight_cast_to_f_linear(emu_qkv, monkeypatch, cached):
    """No grad, CUDA backend, autocast: F.linear casts the fp32 weight itself (reusing
    autocast's cache of that cast, like the model's own linear); the result is the
    reference's under the same autocast, and a grad-mode call (which casts explicitly
    for its backward) gives the same numbers."""
    monkeypatch.setattr(_backends, "unavailable_reason", lambda name, device=None: None)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 64)
    lin = torch.nn.Linear(64, 192)
    q_scale = torch.rand(4) + 0.5
    kw = dict(num_heads=4, qk_l2norm=True, q_scale=q_scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exp = qkv_ref.qkv_proj(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16(), **kw)
        with torch.no_grad():
            if cached:
                kc, vc = (torch.full((2, 4, 8, 16), float("nan"), dtype=torch.bfloat16) for _ in range(2))
                q, _, _ = pf.qkv_proj(x, lin.weight, lin.bias, kv_cache=(kc, vc), cache_start=2, backend="cuda",
                                      **kw)
                got = (q, kc[:, :, 2:5], vc[:, :, 2:5])
            else:
                got = pf.qkv_proj(x, lin.weight, lin.bias, backend="cuda", **kw)
        _ran(emu_qkv, "qkv")
        for name, a, e in zip("qkv", got, exp):
            assert a.dtype == torch.bfloat16, name
            _close(a, e, FWD_TOL[torch.bfloat16], name)
        if not cached:
            again = pf.qkv_proj(x, lin.weight, lin.bias, backend="cuda", **kw)  # grad mode: explicit casts
            for a, b in zip(got, again):
                assert torch.equal(a, b.detach())
