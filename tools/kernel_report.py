"""What the compiler says about every kernel the ops launch at the SPEC §5 workloads,
and what that predicts -- on a machine without a GPU.

For each op (forward and backward), workload and fast backend, the tool runs the op's
real Python path on CPU tensors of the workload's shapes with every kernel launch
intercepted (no device work), so grids, block sizes, constexprs and specialisation
are exactly the launcher's. Then, per launched kernel variant:

* Triton: compiled with ``triton.compile`` for sm_90 (and sm_80), specialised as
  the JIT specialises it on a GPU (tools/triton_aot_check.py); every autotune
  config of an autotuned kernel is a variant (the GPU's choice is unknown here);
* CUDA: the csrc/*.cu translation units compiled by nvcc for sm_90/sm_80; launch
  configurations from the real host code, run under the host emulation of
  tests/cuda_emulation in dry mode (each launch recorded, no kernel run);

and ``cuobjdump`` (the one the triton package carries) reads registers, stack
(spills), shared memory, the SASS instruction count and the widths of the global
loads/stores. From these: theoretical occupancy, resident slots on 132 SMs, waves and
wave efficiency, warp-instructions issued (static count x warps: a lower bound for
kernels with loops), bytes moved per call against the minimum (each input read once,
each output written once; temporaries and extra passes counted), and the predicted
time = max(bytes / bandwidth, issue time, FLOPs / tensor rate) / wave efficiency, with
spec-sheet H100 SXM figures -- **a prediction, not a measurement**.

    python tools/kernel_report.py [--check] [--json OUT] [--arch 90 --arch 80]

``--check`` (CI) exits 1 when a gate fails: a spill in a launched variant; a
streaming kernel (not a GEMM) on contiguous 16-bit data without 128-bit global
accesses; a loop-free memory-bound kernel issuing under ``MIN_BYTES_PER_INSTR``
bytes per warp-instruction; wave efficiency under 0.85 at a headline workload for
the kernel that carries the call; bytes moved above the ratio to the minimum
documented per op in ``BYTES_RATIO``. Failures known and tracked in an issue are
listed in ``tools/kernel_report_baseline.json``: ``--check`` fails on any failure not
listed there and on any listed one that no longer fails (the list only shrinks;
``--write-baseline`` rewrites it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
os.environ.pop("TRITON_INTERPRET", None)
from posenc_fast.triton_kernels._launch import cdiv, wave_efficiency  # noqa: E402  (the launchers' own arithmetic)

# Spec-sheet H100 SXM5 figures: the basis of the predictions (labelled as such).
H100 = dict(sms=132, clock_hz=1.98e9, hbm_bytes_s=3.35e12, bf16_flops_s=989e12, issue_per_sm_clk=4)
# A memory-bound kernel must move at least this many bytes per warp-instruction to
# stay memory-bound on H100 (bandwidth / (SMs x clock x 4 issue slots) ~ 3.2).
MIN_BYTES_PER_INSTR = 3.5
MIN_WAVE_EFFICIENCY = 0.85
# Allowed bytes moved / minimum per (op, direction, backend): what each design costs
# on purpose (see the notes printed with the report).
BYTES_RATIO = {
    ("pyramid_pos_level_add", "fwd"): 1.05,
    ("pyramid_pos_level_add", "bwd"): 1.10,
    ("pos_embed_add", "fwd"): 1.05,
    # The fp32 per-token batch sums (written, then gathered per table row) cost
    # 8 bytes per (token, channel) against the gradient's 2 B per (image, token,
    # channel): 1 + 4 / B, 1.125 at B = 32.
    ("pos_embed_add", "bwd"): 1.15,
    ("apply_rope", "fwd"): 1.02,
    ("apply_rope", "bwd"): 1.02,
    # A cos/sin table (fp32; 2 planes of D/2, or 4 at full width, per token) is read
    # again by every (batch element, head split) slice (counted, though it may hit in
    # L2): 1 + (B S - 1) T / (4 n + T). At Infinity-2B B = 4 the CUDA launcher splits
    # the heads in S = 2 for whole waves (0.83 -> 1.0 of the last wave busy): 1.05
    # (pairs), 1.11 (full width).
    ("apply_rope", "fwd", "table"): 1.12,
    ("apply_rope", "bwd", "table"): 1.12,
    ("qkv_proj", "fwd", "triton"): 1.05,
    # cuBLAS writes the packed qkv and the epilogue reads it back: (x + W + 3 M C out
    # + 2 x 3 M C) / (x + W + 3 M C out) = 2.5 for M >> C. Only a GEMM with the
    # epilogue fused (the Triton backend) moves the minimum.
    ("qkv_proj", "fwd", "cuda"): 2.55,
    ("qkv_proj", "bwd"): 1.05,
}
# (regs per SM, max warps, max blocks, shared bytes per SM, reserved shared per block, SMs)
ARCH = {90: (65536, 64, 32, 228 * 1024, 1024, 132), 80: (65536, 64, 32, 164 * 1024, 1024, 108)}

E = 2  # bf16


@dataclass
class Workload:
    name: str
    headline: bool
    params: dict
    directions: Tuple[str, ...] = ("fwd", "bwd")
    # (direction, backend) calls left out: each with the reason in WORKLOADS
    skip: Tuple[Tuple[str, str], ...] = ()


WORKLOADS: Dict[str, List[Workload]] = {
    "pyramid_pos_level_add": [Workload("var-d16-b64", True, dict(B=64, C=1024)),
                              Workload("var-d30-b32", True, dict(B=32, C=1920))],
    # FlexVAR (VAR's pyramid, learned 32 x 32 grid area-resized per scale) at the VAR
    # sizes; NaViT's factorized row + column tables, the other learned 2D layout.
    "pos_embed_add": [Workload("flexvar-d16-b64", True, dict(B=64, C=1024, kind="flexvar", grid=32)),
                      Workload("flexvar-d30-b32", True, dict(B=32, C=1920, kind="flexvar", grid=32)),
                      Workload("navit-d16-b64", False, dict(B=64, C=1024, kind="navit", grid=16)),
                      # a fixed kind: the sinusoids generated in the kernel, no backward kernel
                      Workload("sincos-d16-b64", False, dict(B=64, C=1024, kind="sincos_pyramid"), ("fwd",))],
    "apply_rope": [Workload("infinity-2b-b4", True, dict(B=4, H=16, D=128, sched="inf64")),
                   Workload("var-d16-b32", True, dict(B=32, H=16, D=64, sched="var")),
                   # table-defined rotations at the Infinity-2B shapes: mode 1's resampled
                   # per-pair tables, and a full-width rotate-half table (HART / HF style)
                   Workload("infinity-2b-b4-mode1", False, dict(B=4, H=16, D=128, sched="inf64", table="pairs")),
                   Workload("full-table-inf64-b4", False,
                            dict(B=4, H=16, D=128, sched="inf64", table="full", pairing="half"))],
    "qkv_proj": [Workload("var-d16-b32", True, dict(B=32, C=1024, H=16, sched="var", rope=False)),
                 Workload("var-d30-b32", True, dict(B=32, C=1920, H=30, sched="var", rope=False)),
                 Workload("infinity-2b-b4", True, dict(B=4, C=2048, H=16, sched="inf64", rope=True)),
                 # Infinity's rope2d_normalized_by_hw=1: a cos/sin table instead of angles. The
                 # CUDA backward reads a table in a run-time branch of the very instantiation
                 # infinity-2b-b4 reports (qkv_bwd_kernel<bf16, 128, 4, 1, false, true>, cos / sin
                 # tabulated per block): not reported twice.
                 Workload("inf-2b-b4-table", True, dict(B=4, C=2048, H=16, sched="inf64", rope="table"),
                          skip=(("bwd", "cuda"),))],
}
VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
INF64 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # Infinity 1:1, L = 10521


def _pyramid(sched: str):
    return VAR_PN if sched == "var" else INF64


# --------------------------------------------------------------- interception

@dataclass
class Launch:
    backend: str
    kernel: str
    grid: Tuple[int, int, int]
    block_threads: int
    shared_dynamic: int = 0
    spec: Optional[dict] = None  # Triton: signature/constexprs/attrs/options
    module: str = ""
    config: str = ""


class _Recorder:
    def __init__(self):
        self.launches: List[Launch] = []


@contextlib.contextmanager
def _intercept(rec: _Recorder, cuda_lib=None):
    """Every Triton launch of the ops recorded (grid, launch options, the JIT's
    specialisation) instead of run; the CUDA library replaced by ``cuda_lib`` (the
    emulated one, dry) when given; the device looks like an H100 (132 SMs)."""
    import triton

    import posenc_fast._backends as backends
    import posenc_fast._cuda as cuda
    from posenc_fast.triton_kernels import pos_embed_add as te, pyramid_pos_level_add as tp, qkv_proj as tq, \
        rope as tr
    from triton_aot_check import _specialise

    saved = []

    def swap(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    class Kernel:
        def __init__(self, module, name, obj):
            self.module, self.name, self.obj = module, name, obj

        def __getitem__(self, grid):
            return lambda *a, **k: self.launch(grid, a, k)

        def launch(self, grid, args, kwargs):
            obj = self.obj
            configs = [None]
            if isinstance(obj, triton.runtime.Autotuner):
                configs = obj.configs
                if obj.early_config_prune:  # what the autotuner would try for this call
                    configs = obj.early_config_prune(configs, dict(zip(obj.arg_names, args)), **kwargs)
                obj = obj.fn
            heur = None
            if isinstance(obj, triton.runtime.Heuristics):
                heur, obj = obj.values, obj.fn
            fn = obj.fn
            names = list(obj.arg_names)
            for cfg in configs:
                kw = dict(kwargs)
                if cfg is not None:
                    kw.update(cfg.kwargs)
                    kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                if heur:
                    named = dict(zip(names, args)) | kw
                    for k, f in heur.items():
                        kw[k] = f(named)
                meta = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages", "num_ctas")}
                g = grid(dict(zip(names, args)) | kw) if callable(grid) else grid
                g = tuple(g) + (1,) * (3 - len(g))
                options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
                spec = _specialise(fn, args, meta)
                spec["options"] = options
                label = "" if cfg is None else ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + \
                    f",w{cfg.num_warps},s{cfg.num_stages}"
                rec.launches.append(Launch("triton", f"{self.module.rsplit('.', 1)[-1]}.{self.name}", g,
                                           32 * options.get("num_warps", 4), spec=spec, module=self.module,
                                           config=label))

    swap(backends, "unavailable_reason", lambda name, device=None: None)
    for mod in (te, tp, tq, tr):
        if hasattr(mod, "num_sms"):
            swap(mod, "num_sms", lambda device: H100["sms"])
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)):
                swap(mod, name, Kernel(mod.__name__, name, obj))

    if cuda_lib is not None:
        swap(cuda, "lib", lambda: cuda_lib)
        swap(cuda, "stream", lambda device: 0)
    # The CUDA path's cuBLAS GEMM (F.linear) is not a kernel of ours: an empty result.
    from posenc_fast.ops import qkv_proj as op_qkv
    import types
    swap(op_qkv, "F", types.SimpleNamespace(linear=lambda x, w, b=None: x.new_empty(*x.shape[:-1], w.shape[0])))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


# ------------------------------------------------------------------- workloads

def _run_op(op: str, direction: str, backend: str, w: Workload) -> None:
    """Calls the op's forward or backward implementation (what its custom op and its
    autograd formula run, minus the cuBLAS GEMMs) on empty CPU tensors of the
    workload's shapes, in bf16: the launches happen, the math does not."""
    import torch

    import posenc_fast as pf
    from posenc_fast.ops import pos_embed as op_pe, pyramid as op_pyr, qkv_proj as op_qkv, rope as op_rope

    p = w.params
    dt = torch.bfloat16

    def t(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype)

    if op == "pyramid_pos_level_add":
        L, S, B, C = sum(x * x for x in VAR_PN), len(VAR_PN), p["B"], p["C"]
        flat = op_pyr._flat(tuple((x, x) for x in VAR_PN))
        if direction == "fwd":
            op_pyr._forward(t(B, L, C), t(1, L, C), t(S, C), flat, 0, 1.0, 0.0, backend)
        else:
            op_pyr._backward_impl(t(B, L, C), flat, 0, L, 1.0, True, dt, dt, backend)
    elif op == "pos_embed_add":
        L, B, C, kind = sum(x * x for x in VAR_PN), p["B"], p["C"], p["kind"]
        scales = tuple((x, x) for x in VAR_PN)
        tables = {"flexvar": lambda: (t(1, C, p["grid"], p["grid"]),),
                  "navit": lambda: (t(p["grid"], C), t(p["grid"], C))}.get(kind, tuple)()
        opts = op_pe._opts(10000.0, False, False, False, op_pe._TWO_PI, False)
        rows = op_pe._validate(t(B, L, C), kind, scales, 0, tables, None, None, 0, opts)[2]
        static = op_pe._static_inputs(kind, scales, rows, 0, opts, False, C, 0, L, torch.device("cpu"))
        args = op_pe._op_args(kind, t(B, L, C), tables, None, None, 0, 0, opts, static, backend)
        if direction == "fwd":
            op_pe._forward(*args)
        else:
            tptr, ttok, tw = args[5:8]
            op_pe._backward_impl(t(B, L, C), tptr, ttok, tw, 0, dt, backend)
    elif op == "apply_rope":
        pn = _pyramid(p["sched"])
        coords, freqs = pf.pyramid_coords(pn, mode="round"), pf.axial_rope_freqs(p["D"])
        L = coords.shape[0]
        q, k = t(p["B"], p["H"], L, p["D"]), t(p["B"], p["H"], L, p["D"])
        pairing = p.get("pairing", "interleaved")
        if p.get("table"):  # what apply_rope hands the kernels for cos= / sin= tables
            width = p["D"] if p["table"] == "full" else p["D"] // 2
            cos = sin = t(L, width, dtype=torch.float32)
            coords, freqs = op_rope._kernel_inputs(q, None, None, cos, sin, pairing)
        # backward with frozen freqs: the conjugate rotation of the output gradients
        op_rope._forward(q, k, coords, freqs, pairing == "interleaved", direction == "bwd", backend)
    else:
        pn = _pyramid(p["sched"])
        L, C, H = sum(x * x for x in pn), p["C"], p["H"]
        B, D = p["B"], C // H
        coords = pf.pyramid_coords(pn, mode="round") if p["rope"] else None
        freqs = pf.axial_rope_freqs(D) if p["rope"] else None
        if p["rope"] == "table":  # what qkv_proj hands the kernels for cos=, sin=
            ang = coords @ freqs
            coords, freqs = op_qkv._kernel_rotation(t(B, L, C), None, None, ang.cos(), ang.sin())
        q_scale = torch.ones(H)
        if direction == "fwd":
            op_qkv._forward(t(B, L, C), t(3 * C, C), t(3 * C), q_scale, coords, freqs, H, True, False, backend)
        else:
            g = [t(B, H, L, D) for _ in range(5)]
            op_qkv._backward_impl(*g, t(2, B * L, H, dtype=torch.float32), q_scale, coords, freqs, True, False,
                                  True, True, False, backend)


def record(op: str, direction: str, backend: str, w: Workload) -> List[Launch]:
    rec = _Recorder()
    lib = _emulated(op) if backend == "cuda" else None
    with _intercept(rec, lib):
        if lib is not None:
            lib.emu_set_dry(True)
        try:
            _run_op(op, direction, backend, w)
        finally:
            if lib is not None:
                lib.emu_set_dry(False)
    if lib is None:
        return rec.launches
    launches = []
    for entry in lib.emu_take_launches():
        pretty, grid, block, smem = entry.split("|")
        name, values = _parse_pretty(pretty)
        gx, gy, gz = map(int, grid.split(","))
        bx, by, bz = map(int, block.split(","))
        launches.append(Launch("cuda", name, (gx, gy, gz), bx * by * bz, shared_dynamic=int(smem),
                               config=",".join(values)))
    return launches


# ------------------------------------- CUDA launches: the host code, dry-run

_EMU_MODULES: Dict[str, object] = {}
_FAMILY = {"pyramid_pos_level_add": "pyramid", "pos_embed_add": "pos_embed", "apply_rope": "rope",
           "qkv_proj": "qkv_proj"}


def _emulated(op: str):
    """The op family's CUDA library built for host emulation (tests/cuda_emulation):
    the real host code of csrc/*.cu computes each launch's grid, block and shared
    memory; in dry mode the kernels themselves do not run."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "tests"))
    import test_cuda_emulation as emu

    family = _FAMILY[op]
    if family not in _EMU_MODULES:
        why = emu._missing_toolchain()
        if why:
            raise SystemExit(f"kernel_report: the CUDA launch configurations need the host emulation build: {why}")
        path = emu._build(family)
        spec = importlib.util.spec_from_file_location(f"posenc_emu_{family}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.emu_set_num_sms(H100["sms"])
        _EMU_MODULES[family] = emu._EmulatedLib(module)
    return _EMU_MODULES[family]


def _parse_pretty(pretty: str) -> Tuple[str, List[str]]:
    """g++'s __PRETTY_FUNCTION__ of a kernel -> (name, template argument values)."""
    name = re.search(r"(\w+)\(", pretty.split("[with")[0]).group(1)
    m = re.search(r"\[with (.*)\]$", pretty)
    values = [part.split(" = ", 1)[1].strip() for part in m.group(1).split("; ")] if m else []
    return name, values


# ---------------------------------------------------------------- byte models

def bytes_model(op: str, direction: str, backend: str, w: Workload, launches: List[Launch]) -> Tuple[int, int, str]:
    """(bytes moved per call, minimum, how) for bf16 data, fp32 side tables."""
    p = w.params
    if op == "pyramid_pos_level_add":
        L, S, B, C = 680, len(VAR_PN), p["B"], p["C"]
        if direction == "fwd":
            minimum = (2 * B * L * C + L * C + S * C) * E
            splits = max(l.grid[2] for l in launches)
            moved = minimum + (splits - 1) * (L * C + S * C) * E + L * 3 * 4
            return moved, minimum, f"x + out once; pos/lvl re-read by {splits} batch slices; token table"
        from posenc_fast.ops.pyramid import _CHUNK_ROWS

        chunks = sum(cdiv(x * x, _CHUNK_ROWS) for x in VAR_PN)
        minimum = (B * L * C + L * C + S * C) * E
        return minimum + 2 * chunks * C * 4, minimum, "grad once; fp32 per-chunk partials written and read"
    if op == "pos_embed_add":
        L, B, C = sum(x * x for x in VAR_PN), p["B"], p["C"]
        if p["kind"] not in ("flexvar", "navit"):
            return 2 * B * L * C * E + L * 3 * 4 + C * 3 * 4, 2 * B * L * C * E, \
                "x + out once; fp32 coordinates and channel descriptors"
        K = p["grid"] ** 2 if p["kind"] == "flexvar" else 2 * p["grid"]
        entries = _pos_embed_entries(p)
        if direction == "fwd":
            minimum = (2 * B * L * C + K * C) * E
            splits = max(l.grid[2] for l in launches)
            if p["kind"] == "flexvar":  # one launch: grid.x = the chunks of (Q, 8) int32
                chunks = launches[0].grid[0]
                return minimum + (splits - 1) * K * C * E + chunks * 8 * 4, minimum, (
                    f"x + out once; the grid read by each of {splits} batch slices in its own layout (per slice "
                    f"each scale's token rows read their window rows, about a grid per scale, from L2); "
                    f"{chunks} chunks")
            moved = minimum + (splits - 1) * K * C * E + (L + 1) * 4 + entries * 8
            return moved, minimum, (f"x + out once; table re-read by {splits} batch slices (its {entries} row "
                                    f"gathers per slice hit L2); row map")
        minimum = (B * L * C + K * C) * E
        return minimum + 2 * L * C * 4 + (K + 1) * 4 + entries * 8, minimum, \
            "grad once; fp32 per-token sums written and gathered; transposed row map"
    if op == "apply_rope":
        L = sum(x * x for x in _pyramid(p["sched"]))
        n = p["B"] * p["H"] * L * p["D"] * E
        if p.get("table"):
            table = L * (p["D"] if p["table"] == "full" else p["D"] // 2) * 2 * 4
            splits = max(l.grid[2] for l in launches)
            return 4 * n + p["B"] * splits * table, 4 * n + table, \
                f"q, k read and written once; the fp32 table read by each of {p['B']} x {splits} batch x head slices"
        minimum = 4 * n
        return minimum + L * 2 * 4, minimum, "q, k read and written once; fp32 coords"
    L = sum(x * x for x in _pyramid(p["sched"]))
    M, C = p["B"] * L, p["C"]
    # A cos/sin table (L, D/2) fp32 is an input, shared by the batch: read once (L2).
    table = 2 * L * (C // p["H"] // 2) * 4 if p["rope"] == "table" else 0
    with_table = "; fp32 cos/sin table once" if table else ""
    if direction == "fwd":
        minimum = (M * C + 3 * C * C + 3 * C + 3 * M * C) * E + table
        extra = 2 * M * 3 * C * E if backend == "cuda" else 0
        return minimum + extra + 2 * M * p["H"] * 4, minimum, \
            "x, W, out once (operand reuse from L2)" + ("; packed qkv written and re-read" if extra else "") + \
            "; fp32 inverse norms" + with_table
    minimum = (3 * M * C + 2 * M * C + 3 * M * C) * E + table  # dq dk dv, saved q k, dqkv
    return minimum + 2 * M * p["H"] * 4, minimum, "dq, dk, dv, saved q, k read; dqkv written; inverse norms" + \
        with_table


def _pos_embed_entries(p: dict) -> int:
    """Table rows the pyramid's tokens read (FlexVAR: the area windows' cells)."""
    from posenc_fast.ops import pos_embed as op_pe

    if p["kind"] != "flexvar":
        return 2 * sum(x * x for x in VAR_PN)
    g = p["grid"]
    return sum(sum(b - a for a, b in op_pe._area_windows(x, g)) ** 2 for x in VAR_PN)


# -------------------------------------------------------------- compiler facts

def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


@dataclass
class Facts:
    regs: int
    stack: int
    shared: int
    local: int
    sass: int
    spill_stores: int = 0
    spill_loads: int = 0
    ldg_bits: List[int] = field(default_factory=list)
    stg_bits: List[int] = field(default_factory=list)
    has_loop: bool = False


_PTXAS_FUNC = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")


def ptxas_spills(log: str) -> Dict[str, Tuple[int, int]]:
    """ptxas -v output -> {mangled function: (spill store bytes, spill load bytes)}."""
    return {m.group(1): (int(m.group(3)), int(m.group(4))) for m in _PTXAS_FUNC.finditer(log)}


def _width(op: str) -> int:
    for w in ("128", "64"):
        if f".{w}" in op:
            return int(w)
    if ".U16" in op or ".S16" in op:
        return 16
    if ".U8" in op or ".S8" in op:
        return 8
    return 32


def cubin_facts(cubin: bytes) -> Dict[str, Facts]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    facts: Dict[str, Facts] = {}
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", res):
        v = dict(re.findall(r"(\w+):(\d+)", body))
        facts[name] = Facts(int(v["REG"]), int(v["STACK"]), int(v["SHARED"]), int(v["LOCAL"]), 0)
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = facts.setdefault(m.group(1), Facts(0, 0, 0, 0, 0))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if not m or current is None:
            continue
        current.sass += 1
        addr, opcode, rest = int(m.group(1), 16), m.group(2), m.group(3)
        if opcode.startswith(("LDG", "LDGSTS")):
            current.ldg_bits.append(_width(opcode))
        elif opcode.startswith("STG"):
            current.stg_bits.append(_width(opcode))
        elif opcode.startswith("BRA"):
            target = re.search(r"`\(\.L_x_\d+\)|0x([0-9a-f]+)", rest)
            if target and target.group(1) and int(target.group(1), 16) < addr:
                current.has_loop = True
    return facts


_TRITON_CACHE: Dict[str, Tuple[Facts, int]] = {}


def triton_facts(launch: Launch, arch: int) -> Tuple[Facts, int]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = json.dumps([launch.module, launch.kernel, launch.spec, arch], sort_keys=True, default=str)
    if key not in _TRITON_CACHE:
        obj = getattr(importlib.import_module(launch.module), launch.kernel.split(".")[-1])
        while not isinstance(obj, triton.runtime.JITFunction):
            obj = obj.fn
        spec = launch.spec
        src = ASTSource(obj, spec["signature"], constexprs={tuple(p): v for p, v in spec["constexprs"]},
                        attrs={tuple(p): v for p, v in spec["attrs"]})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
        facts = cubin_facts(k.asm["cubin"])
        f = facts.get(k.metadata.name) or next(iter(facts.values()))
        f.shared = max(f.shared, k.metadata.shared)
        # Spills as ptxas counts them (the stack frame alone may be ABI, not spills).
        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.TemporaryDirectory() as d:
            ptx = Path(d) / "k.ptx"
            ptx.write_text(k.asm["ptx"])
            res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a" if arch == 90 else
                                  f"--gpu-name=sm_{arch}", str(ptx), "-o", str(Path(d) / "k.cubin")],
                                 capture_output=True, text=True)
        spills = ptxas_spills(res.stdout + res.stderr)
        if res.returncode or not spills:
            raise RuntimeError(f"ptxas -v on {launch.kernel} for sm_{arch} failed:\n{res.stderr[-2000:]}")
        f.spill_stores, f.spill_loads = next(iter(spills.values()))
        _TRITON_CACHE[key] = (f, k.metadata.shared)
    return _TRITON_CACHE[key]


_CUDA_FACTS: Dict[int, Dict[str, Facts]] = {}


def cuda_facts(arch: int) -> Dict[str, Facts]:
    """Per demangled kernel name: facts of every kernel in csrc/*.cu for ``arch``."""
    if arch not in _CUDA_FACTS:
        out: Dict[str, Facts] = {}
        with tempfile.TemporaryDirectory() as d:
            for cu in sorted((ROOT / "csrc").glob("*.cu")):
                cubin = Path(d) / (cu.stem + ".cubin")
                log = subprocess.run(["nvcc", "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                      "-Xptxas", "-v",
                                      "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "include"), "-o", str(cubin),
                                      str(cu)], check=True, capture_output=True, text=True).stderr
                spills = ptxas_spills(log)
                for name, f in cubin_facts(cubin.read_bytes()).items():
                    f.spill_stores, f.spill_loads = spills[name]
                    demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
                    out[demangled] = f
        _CUDA_FACTS[arch] = out
    return _CUDA_FACTS[arch]


def _match_cuda(launch: Launch, facts: Dict[str, Facts]) -> Tuple[str, Facts]:
    """The compiled instantiation of a dry launch: the demangled kernel whose name and
    leading template arguments are the launch's (g++ lists typedefs after them)."""
    values = [v for v in launch.config.split(",") if v]
    for name, f in facts.items():
        m = re.search(rf"::{re.escape(launch.kernel)}(?:<(.*)>)?\(", name)
        if not m:
            continue
        targs = [a.strip() for a in (m.group(1) or "").split(",") if a.strip()]
        if targs == values[:len(targs)]:
            return f"{launch.kernel}<{', '.join(targs)}>" if targs else launch.kernel, f
    raise KeyError(f"no compiled CUDA kernel matches {launch.kernel} {values}")


# -------------------------------------------------------------------- analysis

def occupancy(arch: int, regs: int, threads: int, shared: int) -> Tuple[int, float]:
    """(resident blocks per SM, theoretical occupancy)."""
    regs_sm, max_warps, max_blocks, smem_sm, smem_res, _ = ARCH[arch]
    warps = cdiv(threads, 32)
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = regs_sm // (per_warp * warps)
    by_warps = max_warps // warps
    by_smem = smem_sm // (shared + smem_res) if shared else max_blocks
    blocks = max(0, min(by_regs, by_warps, by_smem, max_blocks))
    return blocks, blocks * warps / max_warps


@dataclass
class Row:
    op: str
    direction: str
    workload: str
    headline: bool
    backend: str
    arch: int
    kernel: str
    config: str
    grid: int
    threads: int
    regs: int
    spill_bytes: int
    shared: int
    occupancy: float
    waves: float
    wave_efficiency: float
    sass: int
    ldg_bits: List[int]
    stg_bits: List[int]
    has_loop: bool
    warp_instructions: int
    gates: List[str] = field(default_factory=list)


def analyse(archs: List[int]) -> Tuple[List[Row], List[dict]]:
    rows: List[Row] = []
    calls: List[dict] = []
    for op, workloads in WORKLOADS.items():
        for direction in ("fwd", "bwd"):
            for w in workloads:
                if direction not in w.directions:
                    continue
                for backend in ("triton", "cuda"):
                    if (direction, backend) in w.skip:
                        continue
                    launches = record(op, direction, backend, w)
                    moved, minimum, how = bytes_model(op, direction, backend, w, launches)
                    call = dict(op=op, direction=direction, workload=w.name, backend=backend,
                                launches=len({(l.kernel) for l in launches}), bytes=moved, min_bytes=minimum,
                                ratio=moved / minimum, how=how, gates=[])
                    variant = "table" if w.params.get("table") else None
                    limit = BYTES_RATIO.get((op, direction, backend),
                                            BYTES_RATIO.get((op, direction, variant), BYTES_RATIO.get((op, direction))))
                    if limit and moved / minimum > limit + 1e-9:
                        call["gates"].append(f"bytes {moved / minimum:.2f}x the minimum > {limit}")
                    kernel_rows = []
                    for arch in archs:
                        for l in launches:
                            if backend == "triton":
                                f, _ = triton_facts(l, arch)
                                name = l.kernel
                            else:
                                name, f = _match_cuda(l, cuda_facts(arch))
                            threads = l.block_threads
                            blocks, occ = occupancy(arch, f.regs, threads, f.shared + l.shared_dynamic)
                            slots = max(1, blocks * ARCH[arch][5])
                            grid = l.grid[0] * l.grid[1] * l.grid[2]
                            waves = grid / slots
                            eff = wave_efficiency(grid, slots) if grid else 1.0
                            r = Row(op, direction, w.name, w.headline, backend, arch, name, l.config, grid, threads,
                                    f.regs, f.spill_stores + f.spill_loads, f.shared + l.shared_dynamic, occ, waves, eff,
                                    f.sass,
                                    sorted(set(f.ldg_bits)), sorted(set(f.stg_bits)), f.has_loop,
                                    f.sass * grid * cdiv(threads, 32))
                            kernel_rows.append(r)
                    _gate(kernel_rows, call)
                    rows += kernel_rows
                    call["predicted_us"] = _predict(op, direction, w, moved, kernel_rows)
                    calls.append(call)
    return rows, calls


def _main_rows(rows: List[Row]) -> List[Row]:
    """Per arch and autotune config, the kernel that launches the most warps: the one
    whose grid decides the call (reductions over a few partial rows do not)."""
    best: Dict[tuple, Row] = {}
    for r in rows:
        key = (r.arch, r.config if r.backend == "triton" else "")
        if key not in best or r.grid * r.threads > best[key].grid * best[key].threads:
            best[key] = r
    return list(best.values())


def _issued(rows: List[Row], arch: int) -> int:
    """Warp-instructions of one call on ``arch`` (the first autotune config's kernels)."""
    rs = [r for r in rows if r.arch == arch]
    first = rs[0].config if rs else ""
    return sum(r.warp_instructions for r in rs if r.backend == "cuda" or r.config == first or not r.config)


def _gate(rows: List[Row], call: dict) -> None:
    gemm = call["op"] == "qkv_proj" and call["direction"] == "fwd" and call["backend"] == "triton"
    for r in rows:
        if r.spill_bytes:
            r.gates.append(f"spills {r.spill_bytes} B (ptxas spill stores + loads)")
        if not gemm and r.arch == 90 and r.ldg_bits and max(r.ldg_bits) < 128:
            r.gates.append(f"no 128-bit global loads (widest {max(r.ldg_bits)} bits)")
    for r in _main_rows(rows):
        if r.headline and r.arch == 90 and r.wave_efficiency < MIN_WAVE_EFFICIENCY and r.waves < 8:
            r.gates.append(f"wave efficiency {r.wave_efficiency:.2f} < {MIN_WAVE_EFFICIENCY}")
    issued = _issued(rows, 90)
    call["bytes_per_warp_instr"] = call["bytes"] / issued if issued else None
    loop_free = all(not r.has_loop for r in rows if r.arch == 90)
    if not gemm and loop_free and issued and call["bytes_per_warp_instr"] < MIN_BYTES_PER_INSTR:
        call["gates"].append(f"{call['bytes_per_warp_instr']:.1f} bytes per warp-instruction < "
                             f"{MIN_BYTES_PER_INSTR} (issue-bound)")


def _predict(op, direction, w, moved, rows) -> Optional[float]:
    """Predicted microseconds on H100 SXM (spec-sheet bandwidth, issue and tensor rates)."""
    r90 = [r for r in rows if r.arch == 90]
    if not r90:
        return None
    t_mem = moved / H100["hbm_bytes_s"]
    t_issue = _issued(rows, 90) / (H100["sms"] * H100["clock_hz"] * H100["issue_per_sm_clk"])
    t_flops = 0.0
    if op == "qkv_proj":
        L = sum(x * x for x in _pyramid(w.params["sched"]))
        M, C = w.params["B"] * L, w.params["C"]
        t_flops = (2 if direction == "fwd" else 4) * M * 3 * C * C / H100["bf16_flops_s"]
    eff = min((r.wave_efficiency for r in _main_rows(r90)), default=1.0)
    return 1e6 * max(t_mem, t_issue, t_flops) / max(eff, 1e-3)


def markdown(rows: List[Row], calls: List[dict]) -> str:
    """Per call on sm_90: launches, bytes vs minimum, the main kernel's registers,
    occupancy and wave efficiency, the widest global load, the predicted time."""
    lines = ["| op | dir | workload | backend | launches | bytes / min | B per warp-instr | main kernel: regs, "
             "occupancy, waves (eff.) | widest load | predicted us (H100 SXM) |", "|" + "---|" * 10]
    for c in calls:
        main = [r for r in _main_rows([r for r in rows if (r.op, r.direction, r.workload, r.backend, r.arch) ==
                                       (c["op"], c["direction"], c["workload"], c["backend"], 90)])]
        m = max(main, key=lambda r: r.wave_efficiency) if main else None
        kern = f"{m.regs}, {m.occupancy:.2f}, {m.waves:.2f} ({m.wave_efficiency:.2f})" if m else ""
        widest = f"{max(m.ldg_bits)} bit" if m and m.ldg_bits else ""
        bpi = c.get("bytes_per_warp_instr")
        lines.append(f"| {c['op']} | {c['direction']} | {c['workload']} | {c['backend']} | {c['launches']} | "
                     f"{c['ratio']:.2f} | {'' if bpi is None else f'{bpi:.1f}'} | {kern} | {widest} | "
                     f"{c['predicted_us']:.0f} |")
    return "\n".join(lines) + "\n"


BASELINE = ROOT / "tools" / "kernel_report_baseline.json"


def _failure_keys(rows: List[Row], calls: List[dict]) -> List[str]:
    """One stable key per gate failure: where, and which gate (not its number)."""
    keys = set()
    for r in rows:
        for g in r.gates:
            kind = g.split(" (")[0].split(" <")[0].rstrip("0123456789. B")
            keys.add(f"{r.op} {r.direction} {r.workload} {r.backend} sm_{r.arch} {r.kernel} [{r.config}]: {kind}")
    for c in calls:
        for g in c["gates"]:
            kind = "bytes over the documented ratio" if g.startswith("bytes") else "issue-bound"
            keys.add(f"{c['op']} {c['direction']} {c['workload']} {c['backend']}: {kind}")
    return sorted(keys)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a gate fails (CI)")
    ap.add_argument("--json", type=Path, help="write every row and call as JSON here")
    ap.add_argument("--arch", type=int, action="append", help="compute capability (default 90 and 80)")
    ap.add_argument("--write-baseline", action="store_true", help=f"record today's failures in {BASELINE.name}")
    ap.add_argument("--markdown", type=Path, help="write the per-call table (PREDICTED times) as markdown here")
    args = ap.parse_args(argv)
    if args.write_baseline and args.arch and sorted(args.arch) != [80, 90]:
        ap.error("--write-baseline records the failures of every arch: leave --arch out")
    rows, calls = analyse(args.arch or [90, 80])
    print("Kernel variants (compiler facts; grids at the SPEC workloads, 132 SMs)")
    print(f"{'op':22s} {'dir':3s} {'workload':15s} {'be':6s} {'sm':>3s} {'kernel':42s} {'config':24s} "
          f"{'grid':>7s} {'thr':>4s} {'reg':>4s} {'spill':>5s} {'smem':>6s} {'occ':>5s} {'waves':>6s} {'w.eff':>5s} "
          f"{'sass':>5s} {'ld bits':10s} {'st bits':10s} gates")
    for r in rows:
        print(f"{r.op:22s} {r.direction:3s} {r.workload:15s} {r.backend:6s} {r.arch:3d} {r.kernel[:42]:42s} "
              f"{r.config[:24]:24s} {r.grid:7d} {r.threads:4d} {r.regs:4d} {r.spill_bytes:5d} {r.shared:6d} "
              f"{r.occupancy:5.2f} {r.waves:6.2f} {r.wave_efficiency:5.2f} {r.sass:5d} "
              f"{','.join(map(str, r.ldg_bits)):10s} {','.join(map(str, r.stg_bits)):10s} {'; '.join(r.gates)}")
    print("\nPer call: bytes moved vs minimum, kernel launches, PREDICTED time on H100 SXM (spec-sheet rates)")
    for c in calls:
        pred = f"{c['predicted_us']:.1f} us (predicted)" if c["predicted_us"] else ""
        bpi = c.get("bytes_per_warp_instr")
        print(f"{c['op']:22s} {c['direction']:3s} {c['workload']:15s} {c['backend']:6s} launches {c['launches']} "
              f"bytes {c['bytes'] / 1e6:9.1f} MB = {c['ratio']:.2f}x min  "
              f"{(f'{bpi:6.1f} B/warp-instr' if bpi else ''):20s} {pred:28s} {c['how']} {'; '.join(c['gates'])}")
    failures = _failure_keys(rows, calls)
    known = json.loads(BASELINE.read_text())["known_failures"] if BASELINE.exists() else []
    archs = args.arch or [90, 80]
    known = [k for k in known if not re.search(r" sm_(\d+) ", k) or int(re.search(r" sm_(\d+) ", k).group(1)) in archs]
    new = [k for k in failures if k not in known]
    fixed = [k for k in known if k not in failures]
    print(f"\n{len(failures)} gate failure(s): {len(failures) - len(new)} known (tools/{BASELINE.name}), "
          f"{len(new)} new; {len(fixed)} known failure(s) no longer fail")
    for k in new:
        print(f"NEW FAILURE {k}")
    for k in fixed:
        print(f"NOW PASSES (remove it from the baseline) {k}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "calls": calls}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(rows, calls))
    if args.write_baseline:
        BASELINE.write_text(json.dumps({
            "why": "Gate failures of tools/kernel_report.py known and tracked in an issue (kernel efficiency); "
                   "--check fails on any other failure and on entries here that pass. Shrink it, never grow it "
                   "without an issue.",
            "known_failures": failures}, indent=1) + "\n")
    return 1 if (args.check and (new or fixed)) else 0


if __name__ == "__main__":
    sys.exit(main())
