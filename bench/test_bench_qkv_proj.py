"""Benchmarks of qkv_proj (SPEC §5): against the bare projection GEMM (``F.linear``
without bias; backward: the two GEMMs dX = dQKV W and dW = dQKV^T x), the eager
pipeline (the reference: linear + split + transpose + norms + scale + rotation +
contiguous copies) and torch.compile of it with ``max-autotune-no-cudagraphs``.
Records carry ``gemm_ms`` (targets: ``ms / gemm_ms`` <= 1.15 forward, <= 1.25
backward) and the peak memory of forward + backward. On CPU: the
reference on a tiny workload."""

import math

import pytest
import torch
import torch.nn.functional as F

import posenc_fast as pf
from posenc_fast.reference import qkv_proj as ref
from posenc_fast.reference.rope import axial_rope_freqs, pyramid_coords
from harness import DEVICE, ON_GPU, compile_fn, measure_case, peak_memory_bytes, time_ms

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680
INFINITY_PN = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32)  # 1:1 up to 32x32, L = 2521
# name -> (B, scales, C, H, rope pairing or None, headline)
WORKLOADS = {
    "var-d16-b32": (32, VAR_PN, 1024, 16, None, True),
    "var-d30-b32": (32, VAR_PN, 1920, 30, None, True),
    "infinity-2b-b4": (4, INFINITY_PN, 2048, 16, "interleaved", True),
    "infinity-2b-b4-half": (4, INFINITY_PN, 2048, 16, "half", False),  # cost of the half-pairing permute
    "var-d16-b8": (8, VAR_PN, 1024, 16, None, False),
} if ON_GPU else {"tiny": (2, (1, 2, 3), 64, 4, "interleaved", False)}
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = [b for b in ("cuda", "triton", "reference") if pf.available_backends(DEVICE)[b] == "available"] \
    if ON_GPU else ["reference"]
_STATE = {}


def _workload(name):
    """Inputs and keyword arguments of a workload (VAR: l2 norm + q_scale + q/v bias;
    Infinity: plus axial 2D RoPE on 'round' coordinates), built once."""
    if name not in _STATE:
        B, scales, C, H, rope, _ = WORKLOADS[name]
        L = sum(s * s for s in scales)
        D = C // H
        x = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE).requires_grad_()
        w = (torch.randn(3 * C, C, device=DEVICE, dtype=DTYPE) * C ** -0.5).requires_grad_()
        bias = torch.randn(3 * C, device=DEVICE, dtype=DTYPE) * 0.02
        bias[C:2 * C] = 0
        bias.requires_grad_()
        q_scale = torch.full((H,), math.log(4.0), device=DEVICE).exp().requires_grad_()
        kw = dict(num_heads=H, qk_l2norm=True, q_scale=q_scale)
        if rope:
            kw.update(coords=pyramid_coords(scales, mode="round").to(DEVICE), freqs=axial_rope_freqs(D).to(DEVICE),
                      pairing=rope)
        _STATE[name] = (x, w, bias, kw, B * L, C)
    return _STATE[name]


def _eager(x, w, b, kw):
    return ref.qkv_proj(x, w, b, **kw)


def _compiled(name):
    key = ("compiled", name)
    if key not in _STATE:
        _STATE[key] = compile_fn(_eager, mode="max-autotune-no-cudagraphs") if ON_GPU else None
    return _STATE[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_qkv_proj_fwd(benchmark, workload, backend):
    x, w, b, kw, M, C = _workload(workload)
    headline = WORKLOADS[workload][-1]
    with torch.no_grad():
        gemm_ms = time_ms(lambda: F.linear(x, w))
        compiled = _compiled(workload)
        esize = x.element_size()
        rec = measure_case(
            benchmark, op="qkv_proj", direction="fwd", workload=workload, dtype=DTYPE, backend=backend,
            fn=lambda: pf.qkv_proj(x, w, b, backend=backend, **kw),
            baseline_key=("qkv_proj", "fwd", workload), eager=lambda: _eager(x, w, b, kw),
            compiled=(lambda: compiled(x, w, b, kw)) if compiled is not None else None,
            bytes_moved=(4 * M * C + 3 * C * C) * esize, flops=2.0 * M * 3 * C * C, headline=headline,
            gemm_ms=gemm_ms, M=M, C=C, H=kw["num_heads"], rope=kw.get("pairing"))
    benchmark.extra_info["ratio_vs_gemm"] = rec["ms"] / gemm_ms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_qkv_proj_bwd(benchmark, workload, backend):
    """Backward to x, W, bias and q_scale; peak memory of forward + backward."""
    x, w, b, kw, M, C = _workload(workload)
    headline = WORKLOADS[workload][-1]
    leaves = (x, w, b, kw["q_scale"])
    outs = pf.qkv_proj(x, w, b, backend=backend, **kw)
    grads = [torch.randn_like(o) for o in outs]
    eager_outs = _eager(x, w, b, kw)
    compiled = _compiled(workload)
    compiled_outs = []

    def compiled_bwd():
        if not compiled_outs:  # compile (and autotune) outside the forward-only timings
            compiled_outs.extend(compiled(x, w, b, kw))
        return torch.autograd.grad(compiled_outs, leaves, grads, retain_graph=True)

    dqkv = torch.randn(M, 3 * C, device=DEVICE, dtype=DTYPE)
    x2, w_ = x.detach().reshape(M, C), w.detach()
    gemm_ms = time_ms(lambda: (dqkv @ w_, dqkv.t() @ x2))

    def fwd_bwd(fwd):
        def run():
            o = fwd()
            return torch.autograd.grad(o, leaves, grads)
        return run

    eager_peak = peak_memory_bytes(fwd_bwd(lambda: _eager(x, w, b, kw)))
    esize = x.element_size()
    rec = measure_case(
        benchmark, op="qkv_proj", direction="bwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True),
        baseline_key=("qkv_proj", "bwd", workload),
        eager=lambda: torch.autograd.grad(eager_outs, leaves, grads, retain_graph=True),
        compiled=compiled_bwd if compiled is not None else None,
        # dq, dk, dv + q, k read; dQKV written, read by both GEMMs; x read, dX written; W, dW.
        bytes_moved=(16 * M * C + 6 * C * C) * esize, flops=4.0 * M * 3 * C * C,
        headline=headline, memory_fn=fwd_bwd(lambda: pf.qkv_proj(x, w, b, backend=backend, **kw)),
        gemm_ms=gemm_ms, eager_fwd_bwd_peak_mem_bytes=eager_peak, M=M, C=C, H=kw["num_heads"],
        rope=kw.get("pairing"))
    benchmark.extra_info["ratio_vs_gemm"] = rec["ms"] / gemm_ms
