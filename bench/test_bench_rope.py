"""Benchmarks of apply_rope (q and k) against the eager reference and torch.compile
of it (SPEC §5), plus Infinity's own table-based eager code for context. On CPU:
the reference on a small workload."""

import pytest
import torch

import posenc_fast as pf
from harness import DEVICE, ON_GPU, compile_fn, measure_case
from posenc_fast.reference import rope as ref

INFINITY_1_1 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # L = 10521
VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680
# name -> (schedule, B, H, D, headline)
WORKLOADS = {
    "infinity-2b-b4": (INFINITY_1_1, 4, 16, 128, True),
    "var-d16-b64": (VAR_PN, 64, 16, 64, True),
} if ON_GPU else {"tiny-b2": ((1, 2, 3), 2, 2, 32, False)}
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = [b for b in ("cuda", "triton", "reference") if pf.available_backends(DEVICE)[b] == "available"] \
    if ON_GPU else ["reference"]


def _reference(q, k, coords, freqs):
    return ref.apply_rope(q, k, coords, freqs)


def _infinity_table(coords, freqs):
    """Infinity's precomputed (2, 1, 1, L, D/2) cos/sin cache."""
    ang = ref.rope_angles(coords, freqs)[0, 0]
    return torch.stack([ang.cos(), ang.sin()])[:, None, None]


def _infinity_eager(q, k, cache):
    """Infinity's apply_rotary_emb: stack q and k, rotate interleaved pairs from the cache."""
    qk = torch.stack((q, k), dim=0)
    qk = qk.reshape(*qk.shape[:-1], -1, 2)
    qk = torch.stack([cache[0] * qk[..., 0] - cache[1] * qk[..., 1],
                      cache[1] * qk[..., 0] + cache[0] * qk[..., 1]], dim=-1)
    return qk.reshape(*qk.shape[:-2], -1).unbind(0)


def _inputs(workload, grad, per_head=False):
    scales, B, H, D, headline = WORKLOADS[workload]
    coords = pf.pyramid_coords(scales, mode="round").to(DEVICE)
    L = coords.shape[0]
    q = torch.randn(B, H, L, D, device=DEVICE, dtype=DTYPE).requires_grad_(grad)
    k = torch.randn(B, H, L, D, device=DEVICE, dtype=DTYPE).requires_grad_(grad)
    freqs = (pf.rope_mixed_freqs(H, D) if per_head else pf.axial_rope_freqs(D)).to(DEVICE)
    return q, k, coords, freqs.requires_grad_(per_head), dict(B=B, H=H, L=L, D=D), headline


def _cases():
    return [(w, b) for w in WORKLOADS for b in BACKENDS + ["infinity-eager"]]


@pytest.mark.parametrize("workload,backend", _cases())
def test_bench_rope_fwd(benchmark, workload, backend):
    q, k, coords, freqs, shape, headline = _inputs(workload, grad=False)
    compiled = compile_fn(_reference)
    if backend == "infinity-eager":
        cache = _infinity_table(coords, freqs)
        fn = lambda: _infinity_eager(q, k, cache)  # noqa: E731
    else:
        fn = lambda: pf.apply_rope(q, k, coords, freqs, backend=backend)  # noqa: E731
    measure_case(
        benchmark, op="apply_rope", direction="fwd", workload=workload, dtype=DTYPE, backend=backend, fn=fn,
        baseline_key=("rope", "fwd", workload), eager=lambda: _reference(q, k, coords, freqs),
        compiled=lambda: compiled(q, k, coords, freqs),
        bytes_moved=4 * q.numel() * q.element_size(), headline=headline and backend != "infinity-eager",
        **shape)


@pytest.mark.parametrize("workload,backend", _cases())
def test_bench_rope_bwd(benchmark, workload, backend):
    """dq, dk from the output gradients (fixed axial frequencies, as in Infinity)."""
    q, k, coords, freqs, shape, headline = _inputs(workload, grad=True)
    g = torch.randn_like(q)
    if backend == "infinity-eager":
        out = _infinity_eager(q, k, _infinity_table(coords, freqs))
    else:
        out = pf.apply_rope(q, k, coords, freqs, backend=backend)
    eager_out = _reference(q, k, coords, freqs)
    compiled_out = compile_fn(_reference)(q, k, coords, freqs)
    measure_case(
        benchmark, op="apply_rope", direction="bwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: torch.autograd.grad(out, (q, k), (g, g), retain_graph=True),
        baseline_key=("rope", "bwd", workload),
        eager=lambda: torch.autograd.grad(eager_out, (q, k), (g, g), retain_graph=True),
        compiled=lambda: torch.autograd.grad(compiled_out, (q, k), (g, g), retain_graph=True),
        bytes_moved=4 * q.numel() * q.element_size(), headline=headline and backend != "infinity-eager",
        **shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_rope_mixed_bwd(benchmark, workload, backend):
    """RoPE-Mixed: per-head learnable frequencies, backward with the d freqs reduction
    (reads the output gradients and the saved outputs, writes dq and dk)."""
    q, k, coords, freqs, shape, _ = _inputs(workload, grad=True, per_head=True)
    g = torch.randn_like(q)
    out = pf.apply_rope(q, k, coords, freqs, backend=backend)
    eager_out = _reference(q, k, coords, freqs)
    compiled_out = compile_fn(_reference)(q, k, coords, freqs)
    measure_case(
        benchmark, op="apply_rope", direction="bwd_dfreqs", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: torch.autograd.grad(out, (q, k, freqs), (g, g), retain_graph=True),
        baseline_key=("rope", "bwd_dfreqs", workload),
        eager=lambda: torch.autograd.grad(eager_out, (q, k, freqs), (g, g), retain_graph=True),
        compiled=lambda: torch.autograd.grad(compiled_out, (q, k, freqs), (g, g), retain_graph=True),
        bytes_moved=6 * q.numel() * q.element_size(), **shape)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_rope_fwd_inplace(benchmark, workload, backend):
    """In-place rotation (inference, no autograd): q and k in one launch."""
    q, k, coords, freqs, shape, _ = _inputs(workload, grad=False)
    compiled = compile_fn(_reference)
    measure_case(
        benchmark, op="apply_rope_", direction="fwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: pf.apply_rope_(q, k, coords, freqs, backend=backend),
        baseline_key=("rope", "fwd", workload), eager=lambda: _reference(q, k, coords, freqs),
        compiled=lambda: compiled(q, k, coords, freqs),
        bytes_moved=4 * q.numel() * q.element_size(), **shape)
