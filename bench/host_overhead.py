"""Host time per call of each fused op against the eager code it replaces, side by side.

At sampling sizes (VAR: 2B x n tokens, n = 1 ... 256) every kernel takes a few
microseconds on the GPU, so what a call costs on the host decides the speed. This
benchmark measures that cost on any machine:

* ``--mode stub`` (default; any machine, CPU tensors): the device work is removed.
  The workloads are the first scales of a sampling run (1, 4 and 9 tokens per
  image), where host time matters most, with channels and heads shrunk (16
  channels; 2 heads of 16) so that the eager baselines' arithmetic on the CPU is
  negligible next to their dispatch (on a GPU it is device time, not host time).
  Each fused op runs its real Python path (argument checks, backend choice, autograd
  decision, output allocation, launch-parameter computation) down to the kernel
  launch, which is replaced by a no-op: ``kernel[grid](...)`` for Triton, the
  compiled library's entry point for CUDA. The CUDA library's launch plans (the
  sampling path of pyramid_pos_level_add and pos_embed_add) run in the compiled
  library itself, in its dry-run mode: their C checks of the tensors are measured,
  only the launch is left out. Excluded, and so measured only on a GPU: Triton's own
  launcher (argument binding, specialisation key), the binding's argument parsing
  of the other entry points, and the CUDA launch itself (for eager code too). The
  eager baselines run for real on tiny CPU tensors, so their figures include a
  little arithmetic as well as dispatch.
* ``--mode real`` (a GPU): every call launches for real; per-call wall time over a
  loop with one synchronisation at the end, which is host-bound at these sizes.

Rounds alternate fused and eager calls so both see the same machine state; the
figure is the median over rounds of the mean per call within a round.

    python bench/host_overhead.py [--mode stub|real] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import posenc_fast as pf  # noqa: E402
from posenc_fast import _cuda  # noqa: E402
from posenc_fast.integrations import var as var_integration  # noqa: E402
from launch_stubs import stubbed_device_work  # noqa: E402
from harness import git_commit, versions  # noqa: E402

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
BEGIN = [sum(p * p for p in PATCH_NUMS[:i]) for i in range(len(PATCH_NUMS))]


# ---------------------------------------------------------------------- timing

def per_call_us(fns: Dict[str, Callable[[], object]], *, calls: int, rounds: int, sync) -> Dict[str, float]:
    """Median over ``rounds`` of the mean microseconds per call of each fn, the fns
    interleaved round by round."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    sync()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    fn()
                sync()
                samples[name].append((time.perf_counter_ns() - t0) / calls / 1e3)
    finally:
        if gc_was:
            gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------- workloads

def _var_attention(C: int, H: int, device, dtype):
    from var_model import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(0, C, H, attn_l2_norm=True).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    return attn


def cases(device: torch.device, quick: bool, tiny: bool):
    """Yields (op, workload, {fused backend: fn}, eager fn, context factory).

    ``tiny`` (stub mode: CPU tensors) shrinks channels and heads so the eager
    baselines' CPU arithmetic stays negligible next to their dispatch; the fused
    ops' host path does not depend on these sizes."""
    dt = torch.float32
    B = 2  # batch 1 with classifier-free guidance
    C_pyr = 16 if tiny else 1024
    scales = (0, 1) if quick else (0, 1, 2)
    pos = torch.randn(1, BEGIN[-1] + PATCH_NUMS[-1] ** 2, C_pyr, device=device, dtype=dt)
    lvl = torch.randn(len(PATCH_NUMS), C_pyr, device=device, dtype=dt)
    lvl_1L = torch.cat([torch.full((p * p,), i, device=device) for i, p in enumerate(PATCH_NUMS)]).long()
    lvl_pos = F.embedding(lvl_1L, lvl)[None] + pos  # VAR precomputes this once per sampling run
    for si in scales:
        n, a = PATCH_NUMS[si] ** 2, BEGIN[si]
        x = torch.randn(B, n, C_pyr, device=device, dtype=dt)
        fused = {b: (lambda b=b, x=x, a=a: pf.pyramid_pos_level_add(x, pos, lvl, PATCH_NUMS, start=a, backend=b))
                 for b in ("triton", "cuda")}
        yield "pyramid_pos_level_add", f"VAR sampling scale {si} (B={B}, n={n}, C={C_pyr})", fused, \
            (lambda x=x, a=a, n=n: x + lvl_pos[:, a:a + n]), contextlib.nullcontext

    # pos_embed_add against the models' own sampling expressions: FlexVAR interpolates
    # its learned grid to every scale once per sampling run, then adds a slice per
    # scale (like VAR); MAE / timm add the fixed table's patch rows.
    grid = torch.randn(1, C_pyr, 32, 32, device=device, dtype=dt)
    flex_pos = torch.cat([F.interpolate(grid, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                          for pn in PATCH_NUMS], dim=1)
    for si in scales:
        pn, a = PATCH_NUMS[si], BEGIN[si]
        x = torch.randn(B, pn * pn, C_pyr, device=device, dtype=dt)
        fused = {b: (lambda b=b, x=x, a=a: pf.pos_embed_add(x, "flexvar", PATCH_NUMS, start=a, tables=(grid,),
                                                            backend=b)) for b in ("triton", "cuda")}
        yield "pos_embed_add", f"FlexVAR sampling scale {si} (B={B}, n={pn * pn}, C={C_pyr})", fused, \
            (lambda x=x, a=a, n=pn * pn: x + flex_pos[:, a:a + n]), contextlib.nullcontext
    # MAE's fixed table has a class-token row first; the patches get rows 1..256.
    side = 4 if tiny else 16
    mae = pf.pos_embed_table("mae", [side], C_pyr, num_prefix_tokens=1, device=device)[None]
    x = torch.randn(B, side * side, C_pyr, device=device, dtype=dt)
    yield "pos_embed_add", f"MAE 2D sin-cos, {side}x{side} grid (B={B}, n={side * side}, C={C_pyr})", \
        {b: (lambda b=b: pf.pos_embed_add(x, "mae", [side], backend=b)) for b in ("triton", "cuda")}, \
        (lambda: x + mae[:, 1:, :]), contextlib.nullcontext

    # RoPE: Infinity-2B heads (H=16, D=128; tiny: 2 x 16) on one sampling scale; the eager baseline
    # is the interleaved rotation with cos/sin tables cached once per run.
    H, D = (2, 16) if tiny else (16, 128)
    schedule = (1, 2, 4, 6, 8, 12, 16)
    coords_all = pf.pyramid_coords(schedule, mode="round").to(device)
    freqs = pf.axial_rope_freqs(D).to(device)
    angles = coords_all @ freqs
    cos_all, sin_all = angles.cos(), angles.sin()
    begin = [sum(p * p for p in schedule[:i]) for i in range(len(schedule))]
    for si in ((0, 1) if quick else (0, 1, 2)):
        n, a = schedule[si] ** 2, begin[si]
        q = torch.randn(B, H, n, D, device=device, dtype=dt)
        k = torch.randn(B, H, n, D, device=device, dtype=dt)
        coords = coords_all[a:a + n]
        cos, sin = cos_all[a:a + n], sin_all[a:a + n]

        def eager(q=q, k=k, cos=cos, sin=sin):
            out = []
            for t in (q, k):
                t0, t1 = t.float()[..., 0::2], t.float()[..., 1::2]
                out.append(torch.stack([t0 * cos - t1 * sin, t0 * sin + t1 * cos], dim=-1).flatten(-2).type_as(t))
            return out

        fused = {b: (lambda b=b, q=q, k=k, coords=coords: pf.apply_rope(q, k, coords, freqs, backend=b))
                 for b in ("triton", "cuda")}
        yield "apply_rope", f"Infinity sampling scale {si} (B={B}, H={H}, n={n}, D={D})", fused, eager, \
            contextlib.nullcontext

    # qkv_proj against VAR's 7 eager ops. Small C keeps the eager GEMM's CPU
    # arithmetic negligible; the host path does not depend on C.
    Cq, Hq = 128, 2
    attn = _var_attention(Cq, Hq, device, dt)
    for n in ((1, 4) if quick else (1, 4, 9)):
        x = torch.randn(B, n, Cq, device=device, dtype=dt)

        def eager(x=x, n=n):
            bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
            qkv = F.linear(x, attn.mat_qkv.weight, bias).view(B, n, 3, Hq, Cq // Hq)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            gain = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
            return F.normalize(q, dim=-1) * gain, F.normalize(k, dim=-1), v

        def fused_fn(b, x=x):
            q_scale = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp().view(Hq)
            bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
            return pf.qkv_proj(x, attn.mat_qkv.weight, bias, num_heads=Hq, qk_l2norm=True, q_scale=q_scale,
                               backend=b)

        fused = {b: (lambda b=b, f=fused_fn: f(b)) for b in ("triton", "cuda")}
        for amp in (False, True):
            ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
            yield "qkv_proj", f"VAR attention input (B={B}, n={n}, C={Cq}, H={Hq})" + (" autocast bf16" if amp else ""), \
                fused, eager, ctx

    # Patched VAR's whole attention forward at one sampling scale (KV cache on, the
    # scales before it cached), against VAR's own forward of the same module (which
    # grows its cache by torch.cat).
    for si in ((0,) if quick else (0, 1)):
        n, start = PATCH_NUMS[si] ** 2, BEGIN[si]
        x = torch.randn(B, n, Cq, device=device, dtype=dt)
        eager_attn = _var_attention(Cq, Hq, device, dt)
        eager_attn.kv_caching(True)
        prefix = tuple(torch.randn(B, Hq, start, Cq // Hq, device=device, dtype=dt) for _ in range(2))
        patched = {}
        for b in ("triton", "cuda"):
            m = patch_var_attention(_var_attention(Cq, Hq, device, dt), b)
            m.kv_caching(True)
            m(torch.randn(B, max(start, 1), Cq, device=device, dtype=dt), None)  # allocates the cache
            cached = (m.cached_k[:, :, :start], m.cached_v[:, :, :start]) if start else (None, None)
            patched[b] = (m, cached)

        def run(m, cached, x=x):
            m.cached_k, m.cached_v = cached  # the scales before this one are in the cache
            return m(x, None)

        eager_cached = prefix if start else (None, None)
        yield "patched VAR attention", f"one block, sampling scale {si} (B={B}, n={n}, C={Cq}, H={Hq}, cached)", \
            {b: (lambda m=m, c=c: run(m, c)) for b, (m, c) in patched.items()}, \
            (lambda: run(eager_attn, eager_cached)), contextlib.nullcontext


def patch_var_attention(attn, backend: str):
    """What patch_var does to one block's attention (forward, kv_caching, the cache length = VAR's L)."""
    attn.forward = types.MethodType(
        lambda self, x, attn_bias: var_integration.self_attention_forward(self, x, attn_bias, backend=backend), attn)
    attn.kv_caching = types.MethodType(var_integration._attn_kv_caching, attn)
    attn.__dict__[var_integration.KV_LEN] = BEGIN[-1] + PATCH_NUMS[-1] ** 2
    return attn


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("stub", "real"), default="stub")
    p.add_argument("--json", type=Path, help="append one JSON line per case to this file")
    p.add_argument("--quick", action="store_true", help="fewer cases and rounds (plumbing check)")
    args = p.parse_args(argv)
    real = args.mode == "real"
    if real and not torch.cuda.is_available():
        p.error("--mode real needs a CUDA device")
    device = torch.device("cuda" if real else "cpu")
    sync = torch.cuda.synchronize if real else (lambda: None)
    calls, rounds = (50, 5) if args.quick else (200, 15)
    stub = contextlib.nullcontext() if real else stubbed_device_work()
    machine = torch.cuda.get_device_name() if real else (platform.processor() or platform.machine())
    records = []
    plans = "launched" if real else ("the compiled library's, dry run" if _cuda.load_error() is None
                                      else "stand-ins (CUDA library not built)")
    print(f"host time per call, us ({args.mode} mode, {machine}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; CUDA launch plans: {plans})")
    print(f"{'op':24s} {'workload':58s} {'eager':>7s} {'triton':>7s} {'cuda':>7s}")
    with stub, torch.no_grad():
        for op, workload, fused, eager, ctx in cases(device, args.quick, tiny=not real):
            with ctx():
                us = per_call_us({"eager": eager, **fused}, calls=calls, rounds=rounds, sync=sync)
            rec = {"kind": "host_overhead", "op": op, "workload": workload, "mode": args.mode, "launch_plans": plans,
                   "device": machine, **{f"{k}_version": v for k, v in versions().items()},
                   "commit": git_commit(), "eager_us": us["eager"], "triton_us": us["triton"],
                   "cuda_us": us["cuda"]}
            records.append(rec)
            print(f"{op:24s} {workload:58s} {us['eager']:7.1f} {us['triton']:7.1f} {us['cuda']:7.1f}")
    if args.json:
        with open(args.json, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return records


if __name__ == "__main__":
    main()
