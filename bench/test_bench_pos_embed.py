"""Benchmarks of pos_embed_add (fused: table generated or area-averaged in the
kernel) against the eager table-add the upstream models run and torch.compile of
it. On CPU: the reference on small workloads."""

import pytest
import torch
import torch.nn.functional as F

import posenc_fast as pf
from harness import DEVICE, ON_GPU, compile_fn, measure_case

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = [b for b in ("cuda", "triton", "reference") if pf.available_backends(DEVICE)[b] == "available"] \
    if ON_GPU else ["reference"]
# name -> (kind, B, C, patch_nums, prefix, headline)
WORKLOADS = {
    "flexvar-d16-b16": ("flexvar", 16, 1024, VAR_PN, 0, True),
    "mae-vitb-b64": ("mae", 64, 768, (14,), 1, True),
    "detr-r50-b8": ("detr", 8, 256, ((25, 38),), 0, False),
    "navit-b32": ("navit", 32, 768, ((16, 12),), 0, False),
} if ON_GPU else {
    "flexvar-tiny": ("flexvar", 2, 64, (1, 2, 3), 0, False),
    "mae-tiny": ("mae", 2, 64, (4,), 1, False),
}


def _length(patch_nums, prefix):
    return prefix + sum((s * s if isinstance(s, int) else s[0] * s[1]) for s in patch_nums)


def _setup(kind, C, patch_nums, prefix, grad):
    """(kwargs of pos_embed_add, eager table builder as upstream runs it, learned leaves)."""
    if kind == "flexvar":
        grid = (torch.randn(1, C, 32, 32, device=DEVICE) * 0.02).to(DTYPE).requires_grad_(grad)

        def table(g):  # FlexVAR's forward: area-resize per scale, flatten, concatenate
            return torch.cat([F.interpolate(g, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                              for pn in patch_nums], dim=1)
        return {"tables": (grid,)}, table, (grid,)
    if kind == "navit":
        h, w = patch_nums[0]
        rows = (torch.randn(64, C, device=DEVICE) * 0.02).to(DTYPE).requires_grad_(grad)
        cols = (torch.randn(64, C, device=DEVICE) * 0.02).to(DTYPE).requires_grad_(grad)
        r = torch.arange(h, device=DEVICE).repeat_interleave(w)
        c = torch.arange(w, device=DEVICE).repeat(h)
        return {"tables": (rows, cols)}, (lambda a, b: a[r] + b[c]), (rows, cols)
    # fixed kinds: the upstream models keep the table in memory and add it
    fixed = pf.pos_embed_table(kind, patch_nums, C, num_prefix_tokens=prefix, device=DEVICE).to(DTYPE)
    return {"num_prefix_tokens": prefix}, (lambda: fixed), ()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_pos_embed_fwd(benchmark, workload, backend):
    kind, B, C, patch_nums, prefix, headline = WORKLOADS[workload]
    L = _length(patch_nums, prefix)
    x = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE)
    kw, table, leaves = _setup(kind, C, patch_nums, prefix, grad=False)

    def eager(x, *t):
        return x + table(*t)

    compiled = compile_fn(eager)
    esize = x.element_size()
    table_bytes = sum(t.numel() for t in leaves) * esize
    measure_case(
        benchmark, op="pos_embed_add", direction="fwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: pf.pos_embed_add(x, kind, patch_nums, backend=backend, **kw),
        baseline_key=("pos_embed", "fwd", workload), eager=lambda: eager(x, *leaves),
        compiled=lambda: compiled(x, *leaves), bytes_moved=2 * B * L * C * esize + table_bytes,
        headline=headline, B=B, C=C, L=L, kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", [w for w in WORKLOADS if WORKLOADS[w][0] in ("flexvar", "navit")])
def test_bench_pos_embed_bwd(benchmark, workload, backend):
    """Backward to the learned tables (dx is the gradient itself)."""
    kind, B, C, patch_nums, prefix, headline = WORKLOADS[workload]
    L = _length(patch_nums, prefix)
    x = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE)
    kw, table, leaves = _setup(kind, C, patch_nums, prefix, grad=True)
    g = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE)

    def eager(x, *t):
        return x + table(*t)

    out = pf.pos_embed_add(x, kind, patch_nums, backend=backend, **kw)
    eager_out = eager(x, *leaves)
    compiled = compile_fn(eager)
    compiled_out = compiled(x, *leaves)
    esize = x.element_size()
    measure_case(
        benchmark, op="pos_embed_add", direction="bwd", workload=workload, dtype=DTYPE, backend=backend,
        fn=lambda: torch.autograd.grad(out, leaves, g, retain_graph=True),
        baseline_key=("pos_embed", "bwd", workload),
        eager=lambda: torch.autograd.grad(eager_out, leaves, g, retain_graph=True),
        compiled=lambda: torch.autograd.grad(compiled_out, leaves, g, retain_graph=True),
        bytes_moved=(B * L * C + sum(t.numel() for t in leaves)) * esize, headline=headline, B=B, C=C, L=L,
        kind=kind)
