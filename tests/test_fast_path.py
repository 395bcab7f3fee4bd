"""The eager fast path (posenc_fast/_fastpath.py): in plain eager mode the ops skip
their torch.library custom op (direct call without autograd, an autograd.Function
with it), cache their argument checks per signature, and still give the reference's
numbers; under tracing (make_fx, torch.compile) the custom op is what gets traced.
The op counts below are the host-overhead guard: a fused call must stay one output
allocation plus its launch (with a KV cache: q, plus the returned cache views)."""

import os

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import posenc_fast as pf
from posenc_fast import _backends
from posenc_fast.ops import pyramid as pyramid_ops, qkv_proj as qkv_ops, rope as rope_ops
from conftest import DEVICE, fast_backends

BACKENDS = fast_backends()
needs_fast = pytest.mark.skipif(not BACKENDS, reason="no fast backend runs here")
PN = (1, 2, 3)


def _pyramid_args(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 14, 40, generator=g).to(DEVICE)
    pos = torch.randn(1, 14, 40, generator=g).to(DEVICE).requires_grad_(requires_grad)
    lvl = torch.randn(3, 40, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return x, pos, lvl


def _rope_args(requires_grad=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 14, 16, generator=g).to(DEVICE).requires_grad_(requires_grad)
    k = torch.randn(2, 3, 14, 16, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return q, k, pf.pyramid_coords(PN, mode="round").to(DEVICE), pf.axial_rope_freqs(16).to(DEVICE)


def _qkv_args(requires_grad=False):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 64, generator=g).to(DEVICE).requires_grad_(requires_grad)
    w = (torch.randn(192, 64, generator=g) / 8).to(DEVICE).requires_grad_(requires_grad)
    b = torch.randn(192, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return x, w, b


def _forbid_custom_ops(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the eager fast path went through the torch.library custom op")

    monkeypatch.setattr(pyramid_ops, "_fwd_op", boom)
    monkeypatch.setattr(rope_ops, "_rope_op", boom)
    monkeypatch.setattr(rope_ops, "_rope_inplace_op", boom)
    monkeypatch.setattr(qkv_ops, "_fwd_op", boom)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_eager_calls_bypass_the_custom_ops_and_match_the_reference(backend, grad, monkeypatch):
    x, pos, lvl = _pyramid_args(grad)
    want_p = pf.pyramid_pos_level_add(x, pos, lvl, PN, backend="reference")
    q, k, coords, freqs = _rope_args(grad)
    want_r = pf.apply_rope(q, k, coords, freqs, backend="reference")
    xq, w, b = _qkv_args(grad)
    want_q = pf.qkv_proj(xq, w, b, num_heads=4, qk_l2norm=True, backend="reference")
    _forbid_custom_ops(monkeypatch)
    got_p = pf.pyramid_pos_level_add(x, pos, lvl, PN, backend=backend)
    got_r = pf.apply_rope(q, k, coords, freqs, backend=backend)
    got_q = pf.qkv_proj(xq, w, b, num_heads=4, qk_l2norm=True, backend=backend)
    torch.testing.assert_close(got_p, want_p, atol=1e-5, rtol=1e-5)
    for g_, w_ in zip(got_r + got_q, want_r + want_q):
        torch.testing.assert_close(g_, w_, atol=2e-5, rtol=2e-5)
    assert got_p.requires_grad == grad and got_q[0].requires_grad == grad
    if grad:  # the autograd.Function carries the custom op's backward formula
        gp = torch.autograd.grad(got_p.square().sum(), (pos, lvl))
        wp = torch.autograd.grad(want_p.square().sum(), (pos, lvl))
        gq = torch.autograd.grad(sum(t.square().sum() for t in got_q), (xq, w, b))
        wq = torch.autograd.grad(sum(t.square().sum() for t in want_q), (xq, w, b))
        gr = torch.autograd.grad(sum(t.square().sum() for t in got_r), (q, k))
        wr = torch.autograd.grad(sum(t.square().sum() for t in want_r), (q, k))
        for g_, w_ in zip(gp + gq + gr, wp + wq + wr):
            torch.testing.assert_close(g_, w_, atol=5e-5, rtol=5e-5)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_rope_fast_path(backend, monkeypatch):
    q, k, coords, freqs = _rope_args()
    want = pf.apply_rope(q, k, coords, freqs, backend="reference")
    _forbid_custom_ops(monkeypatch)
    pf.apply_rope_(q, k, coords, freqs, backend=backend)
    torch.testing.assert_close((q, k), want, atol=2e-5, rtol=2e-5)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_tracing_sees_the_custom_ops(backend):
    x, pos, lvl = _pyramid_args()
    q, k, coords, freqs = _rope_args()
    xq, w, b = _qkv_args()

    def f(x, pos, lvl, q, k, coords, freqs, xq, w, b):
        out = pf.pyramid_pos_level_add(x, pos, lvl, PN, backend=backend)
        qr, kr = pf.apply_rope(q, k, coords, freqs, backend=backend)
        return out, qr, kr, pf.qkv_proj(xq, w, b, num_heads=4, backend=backend)

    gm = make_fx(f, tracing_mode="fake")(x, pos, lvl, q, k, coords, freqs, xq, w, b)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("posenc_fast.pyramid_pos_level_add.default", "posenc_fast.apply_rope.default",
               "posenc_fast.qkv_proj.default"):
        assert op in targets, (op, targets)


def test_cached_checks_still_reject_bad_calls():
    x, pos, lvl = _pyramid_args()
    pf.pyramid_pos_level_add(x, pos, lvl, PN)  # a validated signature, now cached
    with pytest.raises(TypeError, match="lvl"):
        pf.pyramid_pos_level_add(x, pos, lvl.double(), PN)
    with pytest.raises(ValueError, match="window"):
        pf.pyramid_pos_level_add(x, pos, lvl, PN, start=1)
    with pytest.raises(ValueError, match="patch_nums"):
        pf.pyramid_pos_level_add(x, pos, lvl, [1, 2, [3, 3, 3]])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pf.pyramid_pos_level_add(x.tolist(), pos, lvl, PN)
    q, k, coords, freqs = _rope_args()
    pf.apply_rope(q, k, coords, freqs)
    with pytest.raises(ValueError, match="pairing"):
        pf.apply_rope(q, k, coords, freqs, pairing="rotate_half")
    xq, w, b = _qkv_args()
    pf.qkv_proj(xq, w, b, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        pf.qkv_proj(xq, w, b, num_heads=5)
    with pytest.raises(TypeError, match="bias"):
        pf.qkv_proj(xq, w, b.double(), num_heads=4)


def test_backend_choice_is_not_frozen_by_the_cache(monkeypatch):
    x, pos, lvl = _pyramid_args()
    pf.pyramid_pos_level_add(x, pos, lvl, PN)
    with pf.use_backend("cuda"):
        if pf.available_backends(DEVICE)["cuda"] != "available":
            with pytest.raises(RuntimeError, match="cuda"):
                pf.pyramid_pos_level_add(x, pos, lvl, PN)
    monkeypatch.setenv("POSENC_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="POSENC_FAST_BACKEND"):
        pf.pyramid_pos_level_add(x, pos, lvl, PN)
    # The variable is read on every call (from os.environ's own dict): plain
    # assignment and deletion are seen at once, like monkeypatch's.
    os.environ["POSENC_FAST_BACKEND"] = "reference"
    assert _backends.requested_backend() == "reference"
    del os.environ["POSENC_FAST_BACKEND"]
    assert _backends.requested_backend() == "auto"


def _aten_ops(fn):
    fn()  # the first call of a signature builds and caches its plan and tables
    with torch.autograd.profiler.profile() as prof:
        fn()
    # top-level torch ops only: what the op's Python code called
    return [e.name for e in prof.function_events
            if e.cpu_parent is None and e.name.startswith(("aten::", "posenc_fast::"))]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sampling_calls_dispatch_only_their_output_allocations(backend, monkeypatch):
    """Host-overhead guard: at sampling time (no grad) a fused call allocates its
    outputs and launches; any extra torch op (a copy, a view, the custom op) shows
    here. Launches are stubbed (tests/launch_stubs.py), so both backends run on CPU."""
    pytest.importorskip("triton")
    from launch_stubs import stubbed_device_work

    monkeypatch.setattr(pf._checks, "_POISON", False)
    x, pos, lvl = _pyramid_args()
    q, k, coords, freqs = _rope_args()
    xq, w, b = _qkv_args()
    with torch.no_grad(), stubbed_device_work():
        ops = _aten_ops(lambda: pf.pyramid_pos_level_add(x, pos, lvl, PN, start=0, backend=backend))
        assert ops == ["aten::empty_like"], ops
        ops = _aten_ops(lambda: pf.apply_rope(q, k, coords, freqs, backend=backend))
        assert ops == ["aten::empty_like"] * 2, ops
        ops = _aten_ops(lambda: pf.apply_rope_(q, k, coords, freqs, backend=backend))
        assert ops == ["aten::_debug_has_internal_overlap"] * 2, ops  # the aliasing checks of q and k
        ops = _aten_ops(lambda: pf.qkv_proj(xq, w, b, num_heads=4, qk_l2norm=True, backend=backend))
        want = ["aten::empty"] * 4 + ([] if backend == "triton" else ["aten::linear"])
        assert ops == want, ops  # q, k, v, inverse norms (+ cuBLAS GEMM for cuda)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cached_sampling_calls_dispatch_only_q_and_the_cache_views(backend, monkeypatch):
    """The same guard for qkv_proj with a KV cache: k and v go into the caches, so
    the call allocates q (and the inverse norms) and returns two views."""
    pytest.importorskip("triton")
    from launch_stubs import stubbed_device_work

    monkeypatch.setattr(pf._checks, "_POISON", False)
    xq, w, b = _qkv_args()
    kc, vc = (torch.empty(2, 4, 20, 16) for _ in range(2))
    with torch.no_grad(), stubbed_device_work():
        ops = _aten_ops(lambda: pf.qkv_proj(xq, w, b, num_heads=4, qk_l2norm=True, kv_cache=(kc, vc), cache_start=7,
                                            backend=backend))
    want = ["aten::empty"] * 2 + ([] if backend == "triton" else ["aten::linear"]) + ["aten::slice"] * 2
    assert ops == want, ops


def test_compiled_sampling_calls_do_not_guard_on_the_plan_caches():
    """A compiled no-grad call traces the custom op: new eager plans (of the checks and
    of CUDA launches) made after it must not make it recompile."""
    from launch_stubs import stubbed_device_work

    x, pos, lvl = _pyramid_args()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), stubbed_device_work():
        pf.pyramid_pos_level_add(x, pos, lvl, PN, start=0, backend="cuda")  # plans for start 0
        f = torch.compile(lambda x: pf.pyramid_pos_level_add(x, pos, lvl, PN, start=0, backend="cuda"),
                          fullgraph=True, backend=count)
        f(x)
        pf.pyramid_pos_level_add(x[:, 1:], pos, lvl, PN, start=1, backend="cuda")  # new plans
        pf.pos_embed_add(x, "mae", [(2, 7)], backend="cuda")
        f(x)
    assert len(graphs) == 1


@pytest.mark.parametrize("contiguous", [True, False])
def test_planned_calls_still_name_a_bad_x(contiguous, monkeypatch):
    """A launch plan for the call's other arguments exists; an x that is no tensor
    still gets the op's own error, whatever output allocation the plan uses."""
    from launch_stubs import stubbed_device_work

    monkeypatch.setattr(pf._checks, "_POISON", False)
    x, pos, lvl = _pyramid_args()
    if not contiguous:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    with torch.no_grad(), stubbed_device_work():
        pf.pyramid_pos_level_add(x, pos, lvl, PN, backend="cuda")
        for bad in (None, x.tolist()):
            with pytest.raises(TypeError, match="x"):
                pf.pyramid_pos_level_add(bad, pos, lvl, PN, backend="cuda")
