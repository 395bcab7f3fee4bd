"""Runs every kernel of every op once, forward and backward, for profilers and
sanitizers (bench/gpu_suite.sh): Nsight Compute reads DRAM throughput and occupancy
at a headline shape (the calls sit in an NVTX range "profile" after a warm-up that
compiles and autotunes outside it); compute-sanitizer checks small odd shapes.

    python bench/profile_kernels.py [--small] [--dry-run]

``--dry-run`` (no GPU): the same calls through the reference backend on tiny CPU
tensors, a check of this script's plumbing.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import posenc_fast as pf

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _workload(small: bool, cpu: bool):
    if cpu:
        return dict(B=2, pn=(1, 2, 3), C=48, H=3, D=16)
    if small:  # odd sizes: C not a power of two, several programs per grid axis
        return dict(B=3, pn=(1, 2, 3, 5), C=96 * 3, H=3, D=96)
    return dict(B=32, pn=VAR_PN, C=1024, H=16, D=64)  # VAR-d16, batch 32


def run_ops(backend: str, device: str, dtype: torch.dtype, w: dict) -> None:
    B, pn, C, H, D = w["B"], w["pn"], w["C"], w["H"], w["D"]
    L = sum(p * p for p in pn)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=True, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_(grad)

    x = rnd(B, L, C)
    out = pf.pyramid_pos_level_add(x, rnd(1, L, C), rnd(len(pn), C), pn, backend=backend)
    out.backward(torch.ones_like(out))
    grid = rnd(1, C, 32, 32, std=0.02)
    out = pf.pos_embed_add(x, "flexvar", pn, tables=(grid,), backend=backend)  # learned: grid area sums + d grid
    out.backward(torch.ones_like(out))
    pf.pos_embed_add(x, "sincos_pyramid", pn, backend=backend)  # fixed: generated in the kernel
    side = pn[-1]
    mask = torch.zeros(B, side, side, dtype=torch.bool, device=device)
    mask[0, :, side // 2:] = True
    pf.pos_embed_add(rnd(B, side * side, C, grad=False), "detr", [side], mask=mask, normalize=True,
                     backend=backend)  # per-image coordinates
    coords = pf.pyramid_coords(pn, mode="round").to(device)
    freqs = pf.axial_rope_freqs(D).to(device)
    q, k = rnd(B, H, L, D), rnd(B, H, L, D)
    qr, kr = pf.apply_rope(q, k, coords, freqs, backend=backend)
    torch.autograd.backward((qr, kr), (torch.ones_like(qr), torch.ones_like(kr)))
    xq, wq, bq = rnd(B, L, C), rnd(3 * C, C, std=C ** -0.5), rnd(3 * C)
    q_scale = torch.rand(H, device=device) + 0.5
    qkv = pf.qkv_proj(xq, wq, bq, num_heads=H, qk_l2norm=True, q_scale=q_scale, coords=coords, freqs=freqs,
                      backend=backend)
    torch.autograd.backward(qkv, [torch.ones_like(t) for t in qkv])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small odd shapes (sanitizers)")
    p.add_argument("--dry-run", action="store_true", help="reference backend on CPU (plumbing check)")
    args = p.parse_args()
    cpu = args.dry_run or not torch.cuda.is_available()
    if cpu and not args.dry_run:
        p.error("needs a CUDA device (or --dry-run)")
    device = "cpu" if cpu else "cuda"
    backends = ["reference"] if cpu else [b for b in ("cuda", "triton")
                                          if pf.available_backends(device)[b] == "available"]
    dtype = torch.float32 if cpu else torch.bfloat16
    w = _workload(args.small, cpu)
    for backend in backends:
        run_ops(backend, device, dtype, w)  # warm-up: compiles, autotunes, caches tables
        if not cpu:
            torch.cuda.synchronize()
        rng = torch.cuda.nvtx.range("profile") if not cpu else contextlib.nullcontext()
        with rng:
            run_ops(backend, device, dtype, w)
        if not cpu:
            torch.cuda.synchronize()
        print(f"# ran every op fwd+bwd with backend={backend} on {device} ({w})", flush=True)


if __name__ == "__main__":
    main()
