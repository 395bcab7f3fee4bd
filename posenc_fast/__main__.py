"""``python -m posenc_fast``: environment report and a VAR-shaped demo.

Prints versions, each backend's availability (with the reason when it is not
available) and the device; then runs every op on VAR-shaped inputs on the default
device (the CPU reference when there is no GPU), checks every available backend,
the reference included, forward and backward against the same math in float64 (the
reference evaluated on float64 copies of the inputs), and prints a small timing
table. Exits non-zero when a backend is off by more than its dtype's tolerance.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

import posenc_fast as pf
from posenc_fast.reference import pyramid as ref_pyramid
from posenc_fast.reference import qkv_proj as ref_qkv
from posenc_fast.reference import rope as ref_rope

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
INFINITY_SCHEDULE_TO_16 = (1, 2, 4, 6, 8, 12, 16)


def _time_ms(fn: Callable[[], object], device: torch.device, rep: int) -> float:
    fn()
    times = []
    for _ in range(rep):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_err(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x is not None)


def _fwd_bwd(fn, inputs):
    """Runs fn forward and backward; returns (outputs..., grads...)."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs = tuple(o for o in outs if o is not None)
    grads = torch.autograd.grad(outs, inputs, [torch.ones_like(o) * 0.5 for o in outs], allow_unused=True)
    return outs + tuple(grads)


def demo_cases(device: torch.device, small: bool) -> List[Tuple[str, Callable, Callable, list, float]]:
    """(name, fn(backend, *inputs), exact(*float64 inputs), differentiable inputs,
    tolerance) per op; ``exact`` is the reference math (posenc_fast.reference), which
    the ops' float32/16 contract keeps away from float64 but which runs in it."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    B, C = (2, 64) if small else (16, 1024)
    L = sum(p * p for p in VAR_PN)
    x, pos, lvl = rand(B, L, C), rand(1, L, C, scale=0.02), rand(len(VAR_PN), C, scale=0.02)
    cases = [(f"pyramid_pos_level_add  B={B} L={L} C={C}",
              lambda be, x, pos, lvl: pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, backend=be),
              lambda x, pos, lvl: ref_pyramid.pyramid_pos_level_add(x, pos, lvl, VAR_PN), [x, pos, lvl], tol)]

    if hasattr(pf, "apply_rope"):
        H, D = (2, 64) if small else (16, 128)
        coords = pf.pyramid_coords(INFINITY_SCHEDULE_TO_16, mode="round").to(device)
        freqs = pf.axial_rope_freqs(D).to(device)
        Lr = coords.shape[0]
        q, k = rand(B, H, Lr, D), rand(B, H, Lr, D)
        cases.append((f"apply_rope (2D, round) B={B} H={H} L={Lr} D={D}",
                      lambda be, q, k: pf.apply_rope(q, k, coords, freqs, backend=be),
                      lambda q, k: ref_rope.apply_rope(q, k, coords.double(), freqs.double()), [q, k], tol))

    if hasattr(pf, "qkv_proj"):
        H = 2 if small else 16
        Cq = 64 * H
        xq = rand(B, L, Cq)
        w, bias = rand(3 * Cq, Cq, scale=Cq ** -0.5), rand(3 * Cq, scale=0.02)
        q_scale = torch.full((H,), 4.0, device=device)
        cases.append((f"qkv_proj (VAR: bias+l2norm) B={B} L={L} C={Cq} H={H}",
                      lambda be, xq, w, bias: pf.qkv_proj(xq, w, bias, num_heads=H, qk_l2norm=True,
                                                          q_scale=q_scale, backend=be),
                      lambda xq, w, bias: ref_qkv.qkv_proj(xq, w, bias, num_heads=H, qk_l2norm=True,
                                                                q_scale=q_scale.double()),
                      [xq, w, bias], tol))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posenc_fast", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help="small shapes (default on CPU)")
    parser.add_argument("--rep", type=int, default=None, help="timed repetitions per backend")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.small or device.type == "cpu"
    rep = args.rep or (20 if device.type == "cuda" else 3)

    print(f"posenc_fast {pf.__version__} | torch {torch.__version__} | python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:
        print(f"triton: not importable ({exc})")
    from . import _cuda

    if _cuda.load_error() is None:
        lib = _cuda.lib()
        print(f"CUDA library: built with CUDA {lib.cuda_version} for archs {lib.cuda_archs}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"device: {device} ({dev_name})")
    print("backends:")
    avail = pf.available_backends(device)
    for name, status in avail.items():
        print(f"  {name:<10} {status}")
    backends = [b for b in ("cuda", "triton", "reference") if avail[b] == "available"]

    print(f"\nVAR-shaped demo on {device} ({'small shapes' if small else 'VAR-d16 shapes'}), "
          f"forward + backward, each backend (the reference too) checked against float64 math:")
    header = f"{'op':<52} {'backend':<10} {'err vs f64':>10} {'ms (fwd+bwd)':>13}"
    print(header)
    print("-" * len(header))
    failed = False
    for name, fn, exact_fn, inputs, tol in demo_cases(device, small):
        exact = [t.detach().double().requires_grad_() for t in inputs]
        want = _fwd_bwd(lambda: exact_fn(*exact), exact)
        for be in backends:
            try:
                got = _fwd_bwd(lambda: fn(be, *inputs), inputs)
                err = _max_err(got, want)
                ms = _time_ms(lambda: _fwd_bwd(lambda: fn(be, *inputs), inputs), device, rep)
                ok = err <= tol * max(1.0, max(w.float().abs().max().item() for w in want))
                failed |= not ok
                print(f"{name:<52} {be:<10} {err:>10.2e} {ms:>13.3f}{'' if ok else '  MISMATCH'}")
            except Exception as exc:  # report and go on: the demo's job is to show what works
                failed = True
                print(f"{name:<52} {be:<10} ERROR: {type(exc).__name__}: {exc}")
    if device.type == "cpu":
        print("\n(no GPU: the CUDA kernels are not run; timings on CPU are for orientation only. "
              "GPU benchmarks: pytest bench --benchmark-only)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
