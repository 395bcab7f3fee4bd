"""Benchmarks of pyramid_pos_level_add against VAR's eager expression and
torch.compile of it (SPEC §5). On CPU: the reference on a small workload."""

import pytest
import torch
import torch.nn.functional as F

import posenc_fast as pf
from harness import DEVICE, ON_GPU, compile_fn, measure_case

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
L = 680
# name -> (B, C, headline)
WORKLOADS = {"var-d16-b64": (64, 1024, True), "var-d30-b32": (32, 1920, True), "var-d16-b16": (16, 1024, False)} \
    if ON_GPU else {"tiny-b2": (2, 64, False)}
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = [b for b in ("cuda", "triton", "reference") if pf.available_backends(DEVICE)[b] == "available"] \
    if ON_GPU else ["reference"]
LVL_1L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(VAR_PN)]).view(1, L).to(DEVICE)


def var_eager(x, pos_1LC, lvl_weight):
    """VAR.forward's position add: x + (lvl_embed(lvl_1L.expand(B, -1)) + pos_1LC)."""
    return x + (F.embedding(LVL_1L.expand(x.shape[0], -1), lvl_weight) + pos_1LC)


def _inputs(B, C, grad):
    x = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE)
    pos = (torch.randn(1, L, C, device=DEVICE, dtype=DTYPE) * 0.02).requires_grad_(grad)
    lvl = (torch.randn(len(VAR_PN), C, device=DEVICE, dtype=DTYPE) * 0.02).requires_grad_(grad)
    return x, pos, lvl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_pyramid_fwd(benchmark, workload, backend):
    B, C, headline = WORKLOADS[workload]
    x, pos, lvl = _inputs(B, C, grad=False)
    esize = x.element_size()
    compiled = compile_fn(var_eager)
    measure_case(
        benchmark, op="pyramid_pos_level_add", direction="fwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, backend=backend),
        baseline_key=("pyramid", "fwd", workload), eager=lambda: var_eager(x, pos, lvl),
        compiled=lambda: compiled(x, pos, lvl),
        bytes_moved=(2 * B * L * C + L * C + len(VAR_PN) * C) * esize, headline=headline, B=B, C=C, L=L)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_pyramid_bwd(benchmark, workload, backend):
    """Backward of the position part: dpos and dlvl from dX (dx is dX itself)."""
    B, C, headline = WORKLOADS[workload]
    x, pos, lvl = _inputs(B, C, grad=True)
    g = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE)
    out = pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, backend=backend)
    eager_out = var_eager(x, pos, lvl)
    compiled = compile_fn(var_eager)
    compiled_out = compiled(x, pos, lvl)
    esize = x.element_size()
    measure_case(
        benchmark, op="pyramid_pos_level_add", direction="bwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: torch.autograd.grad(out, (pos, lvl), g, retain_graph=True),
        baseline_key=("pyramid", "bwd", workload),
        eager=lambda: torch.autograd.grad(eager_out, (pos, lvl), g, retain_graph=True),
        compiled=lambda: torch.autograd.grad(compiled_out, (pos, lvl), g, retain_graph=True),
        bytes_moved=(B * L * C + L * C + len(VAR_PN) * C) * esize, headline=headline, B=B, C=C, L=L)
