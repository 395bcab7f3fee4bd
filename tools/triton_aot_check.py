"""Compiles every Triton kernel variant posenc_fast launches for real GPU targets,
on a machine without a GPU.

The Triton interpreter (how the kernels run in CI) accepts code that the
compiler rejects (loop-carried type changes, dot shapes, layout conversions) and
never runs the autotuned configs. This tool closes that gap in two steps:

* ``record``: with ``TRITON_INTERPRET=1``, drives the public ops over their
  variants (dtypes, pairings, per-head / learnable freqs, norm, rope, bias, ...)
  and records each kernel launch instead of running it, specialised exactly as
  the JIT specialises it on a GPU (the JIT's own binder for an sm_90 target:
  16-byte divisibility of pointers and integers, integers equal to 1 folded into
  constants, constexprs, launch options), so what compiles here is what the GPU
  runs -- vectorised loads included;
* ``compile``: without the interpreter, builds each recorded variant with
  ``triton.compile`` for the given CUDA capabilities down to a cubin (LLVM and
  ptxas run on the CPU), every autotune config of the qkv_proj GEMM (for every
  launch with ``--all-configs``), and reports failures and shared-memory use
  against each target's limit. Distinct specialisations compile once; workers
  die with the tool (a killed run leaves no orphans).

    TRITON_INTERPRET=1 python tools/triton_aot_check.py record launches.json
    python tools/triton_aot_check.py compile launches.json --arch 80 --arch 90

``compile`` exits 1 when a variant fails to compile, when a kernel that is not
autotuned needs more shared memory than a target has, or when no config of an
autotuned kernel fits a target for some input dtype.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

# Max dynamic shared memory per block (bytes) by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def _fits(shared: Optional[int], arch: int) -> bool:
    return shared is not None and shared <= SHARED_LIMIT.get(arch, 99 * 1024)

# Autotuned kernels: (module, kernel name) -> (attribute holding the configs, the
# values of the constexprs its heuristics derive from runtime sizes, constexprs the
# launcher sets only in the interpreter, with their GPU value). The interpreter
# runs one fixed config; the GPU tries them all, on any size.
AUTOTUNED = {
    ("posenc_fast.triton_kernels.qkv_proj", "_fwd_kernel"):
        ("_FWD_CONFIGS", {"EVEN_K": (True, False)}, {"UPCAST_DOT": False}),
}

_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
          "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# ------------------------------------------------------------------- record

def _specialise(fn, args, kwargs) -> dict:
    """The JIT's own specialisation of one launch for an sm_90 target: signature
    types, constexprs (by argument path) and divisibility attributes, as
    ``JITFunction.run`` computes them before it compiles."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(fn)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)

    def plain(v):
        return getattr(v, "value", v)

    return {"signature": signature,
            "constexprs": sorted([list(k), plain(v)] for k, v in constexprs.items()),
            "attrs": sorted([list(k), v] for k, v in attrs.items())}


def _drive_ops() -> None:
    """Calls every public op over the variants its kernels have (small shapes)."""
    import torch

    import posenc_fast as pf

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    def backward(*outs):
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    patch_nums = (1, 2, 3)
    L = sum(p * p for p in patch_nums)
    # pyramid_pos_level_add: learned / sincos / mixed tables, windows, every dtype.
    for dtype in dtypes:
        for pos_dtype in {torch.float32, dtype}:
            x = rand(2, L, 24, dtype=dtype)
            pos, lvl = rand(L, 24, dtype=pos_dtype), rand(len(patch_nums), 24, dtype=pos_dtype)
            backward(pf.pyramid_pos_level_add(x, pos, lvl, patch_nums, backend="triton"))
            backward(pf.pyramid_pos_level_add(x, None, lvl, patch_nums, sincos_weight=1.0, backend="triton"))
            backward(pf.pyramid_pos_level_add(x, pos, lvl, patch_nums, sincos_weight=0.5, backend="triton"))
            x = rand(2, 9, 24, dtype=dtype)
            backward(pf.pyramid_pos_level_add(x, pos, lvl, patch_nums, start=5, backend="triton"))
    # pos_embed_add: fixed kinds (shared and per-image coordinates), learned kinds
    # (tables in x's dtype or fp32), windows, every dtype.
    for dtype in dtypes:
        x = rand(2, L, 24, dtype=dtype)
        backward(pf.pos_embed_add(x, "mae", patch_nums, backend="triton"))
        backward(pf.pos_embed_add(x, "sam", patch_nums, gaussian=rand(2, 12, grad=False), backend="triton"))
        mask = torch.zeros(2, 3, 3, dtype=torch.bool)
        mask[0, 2:] = True
        backward(pf.pos_embed_add(rand(2, 9, 24, dtype=dtype), "detr", [3], mask=mask, normalize=True,
                                  backend="triton"))
        for table_dtype in {torch.float32, dtype}:
            # FlexVAR grids: Gw a multiple of 8 (aligned cell ranges) or not
            for grid in (rand(1, 24, 4, 4, dtype=table_dtype), rand(1, 24, 8, 16, dtype=table_dtype)):
                backward(pf.pos_embed_add(x, "flexvar", patch_nums, tables=(grid,), backend="triton"))
            tables = (rand(4, 24, dtype=table_dtype), rand(4, 24, dtype=table_dtype))
            backward(pf.pos_embed_add(rand(2, 9, 24, dtype=dtype), "pix2struct", patch_nums, start=5, tables=tables,
                                      backend="triton"))
    # apply_rope / apply_rope_: pairings, k or not, shared / per-head / learnable
    # freqs, 1-3 axes, D/2 a power of two or not.
    coords2 = pf.pyramid_coords(patch_nums, mode="round")
    for dtype in dtypes:
        for D in (24, 64):
            for pairing in ("interleaved", "half"):
                for per_head, learn in ((False, False), (False, True), (True, True)):
                    freqs = pf.axial_rope_freqs(D).clone()
                    if per_head:
                        freqs = freqs.expand(3, -1, -1).clone()
                    freqs.requires_grad_(learn)
                    q, k = rand(2, 3, L, D, dtype=dtype), rand(2, 3, L, D, dtype=dtype)
                    backward(*pf.apply_rope(q, k, coords2, freqs, pairing=pairing, backend="triton"))
                q = rand(2, 3, L, D, dtype=dtype)
                backward(pf.apply_rope(q, None, coords2[:, :1], pf.rope_1d_freqs(D), pairing=pairing,
                                       backend="triton")[0])
                coords3 = torch.cat([coords2, coords2[:, :1]], dim=1)
                q, k = rand(2, 3, L, D, dtype=dtype, grad=False), rand(2, 1, L, D, dtype=dtype, grad=False)
                pf.apply_rope_(q, k, coords3, pf.mrope_freqs(D, (D // 8, D // 8, D // 4)), pairing=pairing,
                               backend="triton")
                # table-defined rotation (cos/sin per token; no angles)
                ang = coords2 @ pf.axial_rope_freqs(D)
                q, k = rand(2, 3, L, D, dtype=dtype), rand(2, 3, L, D, dtype=dtype)
                backward(*pf.apply_rope(q, k, cos=ang.cos(), sin=ang.sin(), pairing=pairing, backend="triton"))
    # qkv_proj: VAR (l2 norm, q_scale, q/v bias), Infinity (l2 norm + rope), rope
    # without norm, half pairing, per-head freqs, no bias, cos/sin tables and partial
    # rotary (angles and tables); fp32 with and without TF32.
    H = 2
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    for dtype in dtypes:
        for D in (64, 128):
            C = H * D
            coords = pf.pyramid_coords(patch_nums, mode="round")
            freqs = pf.axial_rope_freqs(D)
            ang = coords @ freqs
            configs = [
                dict(qk_l2norm=True, q_scale=rand(H, grad=False).exp().requires_grad_()),
                dict(qk_l2norm=True, q_scale=rand(H, grad=False).exp().requires_grad_(), coords=coords, freqs=freqs),
                dict(coords=coords, freqs=freqs, pairing="half"),
                dict(coords=coords, freqs=freqs.expand(H, -1, -1).clone().requires_grad_()),
                dict(),
                dict(qk_l2norm=True, q_scale=rand(H, grad=False).exp(), cos=ang.cos(), sin=ang.sin()),
                dict(qk_l2norm=True, cos=ang[:, :D // 4].cos(), sin=ang[:, :D // 4].sin(), rotary_dim=D // 2,
                     pairing="half"),
                dict(coords=coords, freqs=freqs[:, :D // 4].clone().requires_grad_(), rotary_dim=D // 2),
            ]
            for i, kw in enumerate(configs):
                for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    x, w = rand(2, L, C, dtype=dtype), rand(3 * C, C, dtype=dtype)
                    b = rand(3 * C, dtype=dtype) if i != 4 else None
                    backward(*pf.qkv_proj(x, w, b, num_heads=H, backend="triton", **kw))
            # sampling: k and v appended to preallocated caches (B, H, L_max, D)
            with torch.no_grad():
                kc, vc = (torch.empty(2, H, L + 3, D, dtype=dtype) for _ in range(2))
                x, w = rand(2, 5, C, dtype=dtype, grad=False), rand(3 * C, C, dtype=dtype, grad=False)
                pf.qkv_proj(x, w, None, num_heads=H, qk_l2norm=True, coords=coords[2:7], freqs=freqs,
                            kv_cache=(kc, vc), cache_start=2, backend="triton")
                pf.qkv_proj(x, w, None, num_heads=H, qk_l2norm=True, cos=ang[2:7].cos(), sin=ang[2:7].sin(),
                            kv_cache=(kc, vc), cache_start=2, backend="triton")
    torch.backends.cuda.matmul.allow_tf32 = tf32_before


def record(path: str) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("record needs TRITON_INTERPRET=1 (set before Python starts)")
    from triton.runtime.interpreter import InterpretedFunction

    launches: Dict[str, dict] = {}

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
        entry = {"module": fn.__module__, "kernel": fn.__name__, **_specialise(fn, args, kwargs),
                 "options": options}
        launches[json.dumps(entry, sort_keys=True)] = entry  # each distinct specialisation once
        # Not run: the outputs stay poisoned, which no recorded launch depends on.

    original = InterpretedFunction.run
    InterpretedFunction.run = run
    try:
        _drive_ops()
    finally:
        InterpretedFunction.run = original
    with open(path, "w") as f:
        json.dump(list(launches.values()), f, indent=1)
    print(f"recorded {len(launches)} distinct launches -> {path}")
    return 0


# ------------------------------------------------------------------ compile

def _jit_function(module: str, kernel: str):
    import triton

    fn = getattr(importlib.import_module(module), kernel)
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # heuristics / autotune wrappers
    return fn


def _compile_one(job: Tuple[dict, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entry, arch = job
    fn = _jit_function(entry["module"], entry["kernel"])
    constexprs = {tuple(path): value for path, value in entry["constexprs"]}
    attrs = {tuple(path): value for path, value in entry["attrs"]}
    options = dict(entry["options"])
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, entry["signature"], constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=options)
        shared, error = kernel.metadata.shared, None
    except Exception as exc:  # report every failing variant, not just the first
        shared, error = None, f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    names = list(entry["signature"])
    return {"kernel": f"{entry['module'].rsplit('.', 1)[-1]}.{entry['kernel']}", "arch": arch,
            "constexprs": {names[p[0]]: v for p, v in constexprs.items() if len(p) == 1},
            "options": options, "shared": shared,
            "error": error, "seconds": round(time.perf_counter() - t0, 2), "group": entry.get("group")}


def _expand(entries: List[dict], all_configs: bool) -> List[dict]:
    """Autotuned launches become compile jobs with their configs: with
    ``all_configs`` each launch with every config and derived value; else each
    launch with one of them in turn, so every config and every derived value
    compiles for some launch. ``group`` names the jobs of which at least one
    config must fit a target's shared memory."""
    out = []
    turn: Dict[tuple, int] = {}
    for i, entry in enumerate(entries):
        key = (entry["module"], entry["kernel"])
        if key not in AUTOTUNED:
            out.append({**entry, "group": None})
            continue
        attr, derived, on_gpu = AUTOTUNED[key]
        if entry["options"]:
            # A launch with its own config (qkv_proj's small-M path), not the autotuner's
            # stand-in: compiled as launched, with the GPU values of interpreter-only flags.
            names = list(entry["signature"])
            constexprs = {tuple(p): v for p, v in entry["constexprs"]}
            for name, value in on_gpu.items():
                constexprs[(names.index(name),)] = value
            out.append({**entry, "constexprs": sorted([list(p), v] for p, v in constexprs.items()), "group": None})
            continue
        configs = getattr(importlib.import_module(entry["module"]), attr)
        choices = list(itertools.product(itertools.product(*derived.values()), configs))
        if not all_configs:
            n = turn.get(key, 0)
            turn[key] = n + 1
            choices = [choices[n % len(choices)]]
        first_ptr = next(t for t in entry["signature"].values() if t.startswith("*"))
        group = f"launch {i}" if all_configs else f"{entry['kernel']} with {first_ptr[1:]} inputs"
        names = list(entry["signature"])
        for combo, cfg in choices:
            constexprs = {tuple(p): v for p, v in entry["constexprs"]}
            for name, value in [*cfg.kwargs.items(), *zip(derived, combo), *on_gpu.items()]:
                constexprs[(names.index(name),)] = value
            out.append({**entry, "constexprs": sorted([list(p), v] for p, v in constexprs.items()),
                        "group": group, "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return out


def _die_with_parent() -> None:
    """Pool initializer: the kernel sends SIGKILL to a worker whose parent dies, so a
    run killed by a timeout leaves no compiler processes behind (Linux; elsewhere the
    executor's own shutdown is all there is)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


def compile_all(path: str, archs: List[int], jobs: int, all_configs: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile needs the real compiler: unset TRITON_INTERPRET")
    with open(path) as f:
        entries = _expand(json.load(f), all_configs)
    work = [(e, a) for e in entries for a in archs]
    results = []
    with ProcessPoolExecutor(max_workers=jobs, initializer=_die_with_parent) as pool:
        for r in pool.map(_compile_one, work):
            results.append(r)
            if r["error"]:  # as it happens: a full run takes minutes
                print(f"FAILED {r['kernel']} sm_{r['arch']} {r['constexprs']} {r['options']}\n  {r['error']}",
                      flush=True)
    failed = [r for r in results if r["error"]]
    too_big = [r for r in results if r["group"] is None and r["shared"] is not None
               and not _fits(r["shared"], r["arch"])]
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        if r["group"] is not None:
            groups.setdefault((r["group"], r["arch"]), []).append(r)
    unfit = [k for k, rs in groups.items() if not any(_fits(r["shared"], r["arch"]) for r in rs)]
    by_kernel: Dict[str, List[dict]] = {}
    for r in results:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for name, rs in sorted(by_kernel.items()):
        ok = [r for r in rs if not r["error"]]
        print(f"{name}: {len(ok)}/{len(rs)} compiled, max shared "
              f"{max((r['shared'] for r in ok), default=0)} B, {sum(r['seconds'] for r in rs):.0f} s")
    for r in too_big:
        print(f"TOO MUCH SHARED MEMORY {r['kernel']} sm_{r['arch']}: {r['shared']} B {r['constexprs']}")
    for g, arch in unfit:
        print(f"NO CONFIG FITS sm_{arch}: {g}")
    return 1 if failed or too_big or unfit else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="record the launches of the ops (TRITON_INTERPRET=1)")
    rec.add_argument("out")
    comp = sub.add_parser("compile", help="compile recorded launches for CUDA targets")
    comp.add_argument("launches")
    comp.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    comp.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    comp.add_argument("--all-configs", action="store_true",
                      help="every autotune config for every launch (default: each config for some launch)")
    args = parser.parse_args(argv)
    if args.cmd == "record":
        return record(args.out)
    return compile_all(args.launches, args.arch or [80, 90], args.jobs, args.all_configs)


if __name__ == "__main__":
    sys.exit(main())
