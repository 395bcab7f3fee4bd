"""qkv_proj with cos/sin tables and partial rotary (rotary_dim) fused into the
projection, on every backend: the reference, Triton (under the interpreter without
a GPU) and CUDA (under host emulation without a GPU: tests/test_cuda_emulation.py,
through the real op layer; the real kernels on a GPU).

The expected values are the definition in float64: the projection without
rotation (norm, q_scale), then ``apply_rope(..., rotary_dim=r)`` of the reference
(angles or tables). Forward and backward (x, weight, bias, q_scale, freqs), (L, P),
(1, L, P) and (B, L, P) tables that are not rotations (cos^2 + sin^2 != 1, like
Infinity's mode-1 tables), fp32/fp16/bf16 inputs and tables, both pairings, odd
shapes, non-contiguous x, the KV-cache append, tracing, bad inputs. Outputs and
caches start NaN-poisoned (conftest)."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import posenc_fast as pf
from posenc_fast.reference import qkv_proj as ref
from posenc_fast.reference import rope as rope_ref
from conftest import DEVICE
from test_cuda_emulation import emu_builds, sanitizer_dir  # noqa: F401 (fixtures of the cuda backend)
from test_edge_cases import backend  # noqa: F401 (reference, triton, cuda; cuda emulated without a GPU)

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
# Relative to the largest expected magnitude: forward; gradients (the fast
# backwards recover the pre-rotation vectors from the outputs rounded to their dtype).
TOL = {f32: (2e-5, 1e-4), f16: (3e-3, 1e-2), bf16: (2e-2, 6e-2)}

# id: B, L, H, D, x dtype, table dtype (None: angles), table batch ("", "one": (1, L, P),
#     "batch": (B, L, P); angles: "perhead" freqs), pairing, rotary_dim, l2 norm, q_scale, bias, x layout
CASES = {
    # Infinity mode 1: (L, D/2) fp32 table, cosine attention, D = 64 (CUDA's 16-byte layout)
    "infinity-mode1": (2, 7, 2, 64, f32, f32, "", "interleaved", None, True, True, True, "contig"),
    "batch-table-half-bf16-C48": (3, 5, 3, 16, bf16, bf16, "batch", "half", None, True, False, True, "transposed"),
    "one-table-fp16-B3": (3, 4, 2, 32, f16, f16, "one", "interleaved", None, False, True, True, "contig"),
    # partial rotary, half pairing, 16 pairs rotate: CUDA keeps 16-byte runs (16 % 8 == 0)
    "partial-table-half-fp16": (1, 6, 2, 64, f16, f32, "", "half", 32, True, True, True, "sliced"),
    "partial-table-interleaved-bf16-B3": (3, 3, 2, 64, bf16, bf16, "batch", "interleaved", 24, True, True, False,
                                         "contig"),
    # partial rotary with angles: d freqs over the rotating pairs only
    "partial-angles-interleaved-r24": (3, 5, 2, 32, f32, None, "", "interleaved", 24, False, True, True,
                                       "transposed"),
    "partial-angles-half-perhead-bf16": (2, 4, 2, 64, bf16, None, "perhead", "half", 16, True, True, True,
                                         "contig"),
    # head_dim 24 (not a power of two: no Triton kernel), 6 of 12 pairs rotate
    "D24-partial-table-half": (2, 5, 2, 24, f32, f32, "batch", "half", 12, True, True, True, "sliced"),
    # half pairing, 10 rotating pairs: CUDA's generic layout (10 % 4 != 0), no Triton kernel
    "D64-half-r20-fp32": (1, 3, 3, 64, f32, None, "", "half", 20, True, False, True, "contig"),
}


def _skip_unsupported(backend, D, pairing, r):
    if backend.name != "triton":
        return
    if D & (D - 1):
        pytest.skip("the Triton kernel needs a power-of-two head_dim")
    if pairing == "half" and r is not None and r & (r - 1):
        pytest.skip("the Triton kernel needs a power-of-two rotary_dim with half pairing")


def _x(B, L, C, dtype, layout, g, device):
    if layout == "transposed":
        x = torch.randn(L, B, C, generator=g).transpose(0, 1)
    elif layout == "sliced":  # channel stride 1, row stride C + 8
        x = torch.randn(B, L, C + 8, generator=g)[..., 4:C + 4]
    else:
        x = torch.randn(B, L, C, generator=g)
    return x.to(device, dtype)


def _tables(shape, dtype, g, device):
    ang = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    # resampled tables (Infinity mode 1): not rotations, cos^2 + sin^2 != 1
    return (ang.cos() * 0.9).to(device, dtype), (ang.sin() * 1.1).to(device, dtype)


def _inputs(case, device, seed=0):
    B, L, H, D, dtype, tdtype, tb, pairing, r, norm, qs, bias, layout = CASES[case]
    g = torch.Generator().manual_seed(seed)
    C = H * D
    R = r or D
    x = _x(B, L, C, dtype, layout, g, device).requires_grad_()
    w = (torch.randn(3 * C, C, generator=g) * C ** -0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(3 * C, generator=g) * 0.5).to(device, dtype).requires_grad_() if bias else None
    kw = dict(num_heads=H, qk_l2norm=norm, pairing=pairing, rotary_dim=r)
    if qs:
        kw["q_scale"] = (torch.rand(H, generator=g) * 3 + 0.5).to(device).requires_grad_()
    if tdtype is not None:
        shape = {"": (L, R // 2), "one": (1, L, R // 2), "batch": (B, L, R // 2)}[tb]
        kw["cos"], kw["sin"] = _tables(shape, tdtype, g, device)
    else:
        kw["coords"] = (torch.randn(L, 2, generator=g) * 4).to(device)
        freqs = torch.rand((H, 2, R // 2) if tb == "perhead" else (2, R // 2), generator=g)
        kw["freqs"] = freqs.to(device).requires_grad_()
    return x, w, b, kw


def _leaves(x, w, b, kw):
    return [t for t in (x, w, b, kw.get("q_scale"), kw.get("freqs")) if t is not None]


def _definition(x, w, b, kw):
    """float64: the projection without rotation, then the reference rotation of the
    first rotary_dim dims (after the norm and the scale, which act on the whole head)."""
    d = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
         for k, v in kw.items()}
    leaves = [t.detach().double().requires_grad_() for t in _leaves(x, w, b, kw)]
    it = iter(leaves)
    xd, wd = next(it), next(it)
    bd = next(it) if b is not None else None
    qs = next(it) if kw.get("q_scale") is not None else None
    fd = next(it) if kw.get("freqs") is not None else None
    q, k, v = ref.qkv_proj(xd, wd, bd, num_heads=d["num_heads"], qk_l2norm=d["qk_l2norm"], q_scale=qs)
    r = d["rotary_dim"] or q.shape[-1]
    if "cos" in d:
        qr, kr = rope_ref.apply_rope_table(q[..., :r], k[..., :r], d["cos"], d["sin"], pairing=d["pairing"])
    else:
        qr, kr = rope_ref.apply_rope(q[..., :r], k[..., :r], d["coords"], fd, pairing=d["pairing"])
    # apply_rope's rotary_dim: the rotated dims, then the rest as they were
    return (torch.cat((qr, q[..., r:]), -1), torch.cat((kr, k[..., r:]), -1), v), leaves


def _close(got, want, tol, what):
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was not written?)"
    scale = want.detach().abs().max().item() or 1.0
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} * {scale:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_definition_forward_and_backward(backend, case):
    B, L, H, D, dtype, _, _, pairing, r, *_ = CASES[case]
    _skip_unsupported(backend, D, pairing, r)
    x, w, b, kw = _inputs(case, backend.device, seed=len(case))
    out = pf.qkv_proj(x, w, b, backend=backend.name, **kw)
    want, ref_leaves = _definition(x, w, b, kw)
    ftol, gtol = TOL[dtype]
    for name, got, exp in zip("qkv", out, want):
        assert got.dtype == dtype and got.shape == (B, H, L, D) and got.is_contiguous()
        _close(got, exp, ftol, name)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in out]
    got_grads = torch.autograd.grad(out, _leaves(x, w, b, kw), grads)
    exp_grads = torch.autograd.grad(want, ref_leaves, [t.double() for t in grads])
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dq_scale", "dfreqs"),
                               (x, w, b, kw.get("q_scale"), kw.get("freqs"))) if t is not None]
    for name, got, exp in zip(names, got_grads, exp_grads):
        _close(got, exp, gtol, name)


@pytest.mark.parametrize("mode", ["table", "angles"])
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_rotary_dim_leaves_the_tail_as_the_norm_and_scale_left_it(backend, mode, pairing):
    """The dims [r, D) equal the projection without rotation; rotary_dim = D is the
    full rotation, bit for bit."""
    H, D, r = 2, 32, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, H * D, generator=g).to(backend.device)
    w = (torch.randn(3 * H * D, H * D, generator=g) / 8).to(backend.device)
    kw = dict(num_heads=H, qk_l2norm=True, q_scale=torch.tensor([2.0, 0.5]).to(backend.device), pairing=pairing,
              backend=backend.name)
    plain = pf.qkv_proj(x, w, **kw)

    def rot(R):
        if mode == "table":
            c, s = _tables((5, R // 2), f32, g, backend.device)
            return dict(cos=c, sin=s)
        return dict(coords=torch.randn(5, 2, generator=g).to(backend.device),
                    freqs=torch.rand(2, R // 2, generator=g).to(backend.device))

    part = pf.qkv_proj(x, w, rotary_dim=r, **rot(r), **kw)
    for a, p in zip(part, plain):
        torch.testing.assert_close(a[..., r:], p[..., r:], rtol=1e-6, atol=1e-7)
    full = rot(D)
    a, b = pf.qkv_proj(x, w, rotary_dim=D, **full, **kw), pf.qkv_proj(x, w, **full, **kw)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("rotary_dim", [None, 16])
def test_kv_cache_append_with_tables(backend, rotary_dim, layout):
    """Scale by scale, the rotated k and v of each scale's rows go straight into
    the caches: equal to the call without a cache, rows outside untouched."""
    B, H, D, scales = 2, 2, 32, (1, 2, 3)
    L = sum(s * s for s in scales)
    L_max = L + 2
    R = rotary_dim or D
    g = torch.Generator().manual_seed(4)
    dev = backend.device
    x = torch.randn(B, L, H * D, generator=g).to(dev)
    w = (torch.randn(3 * H * D, H * D, generator=g) / 8).to(dev)
    bias = torch.randn(3 * H * D, generator=g).to(dev)
    cos, sin = _tables((L, R // 2), f32, g, dev)
    kw = dict(num_heads=H, qk_l2norm=True, q_scale=torch.tensor([3.0, 0.7]).to(dev), rotary_dim=rotary_dim,
              backend=backend.name)
    if layout == "BLHD":
        kc, vc = (torch.full((B, L_max, H, D), float("nan")).to(dev).transpose(1, 2) for _ in range(2))
    else:
        kc, vc = (torch.full((B, H, L_max, D), float("nan")).to(dev) for _ in range(2))
    start = 0
    with torch.no_grad():
        for s in scales:
            n = s * s
            rows = slice(start, start + n)
            q, k, v = pf.qkv_proj(x[:, rows], w, bias, cos=cos[rows], sin=sin[rows], kv_cache=(kc, vc),
                                  cache_start=start, **kw)
            q0, k0, v0 = pf.qkv_proj(x[:, rows], w, bias, cos=cos[rows], sin=sin[rows], **kw)
            assert k.shape == (B, H, start + n, D) and k.data_ptr() == kc.data_ptr()
            torch.testing.assert_close(q, q0, rtol=0, atol=0)
            torch.testing.assert_close(k[:, :, rows], k0, rtol=0, atol=0)
            torch.testing.assert_close(v[:, :, rows], v0, rtol=0, atol=0)
            start += n
    for t in (kc, vc):
        assert t[:, :, L:].isnan().all() and not t[:, :, :L].isnan().any()
    want, _ = _definition(x, w, bias, dict(kw, cos=cos, sin=sin, pairing="interleaved"))
    _close(kc[:, :, :L], want[1], 2e-5, "k_cache")


def test_traced_as_the_custom_op(backend):
    if backend.name == "reference":
        pytest.skip("the reference is plain autograd")
    g = torch.Generator().manual_seed(5)
    dev = backend.device
    x = torch.randn(2, 5, 64, generator=g).to(dev)
    w = (torch.randn(192, 64, generator=g) / 8).to(dev)
    cos, sin = _tables((2, 5, 8), f32, g, dev)
    kw = dict(num_heads=2, qk_l2norm=True, cos=cos, sin=sin, rotary_dim=16, pairing="half", backend=backend.name)
    gm = make_fx(lambda t: pf.qkv_proj(t, w, **kw))(x)
    assert "posenc_fast.qkv_proj.default" in str(gm.graph)
    for a, b in zip(gm(x), pf.qkv_proj(x, w, **kw)):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_tables(backend):
    """No graph break (the tables are packed by traceable ops), and gradients equal
    the eager ones."""
    if backend.name == "reference":
        pytest.skip("the reference is plain autograd")
    g = torch.Generator().manual_seed(7)
    dev = backend.device
    x = torch.randn(2, 5, 64, generator=g).to(dev).requires_grad_()
    w = (torch.randn(192, 64, generator=g) / 8).to(dev).requires_grad_()
    s = torch.tensor([1.5, 3.0]).to(dev).requires_grad_()
    cos, sin = _tables((5, 8), f32, g, dev)

    def f(x, w, s):
        q, k, v = pf.qkv_proj(x, w, num_heads=2, qk_l2norm=True, q_scale=s, cos=cos, sin=sin, rotary_dim=16,
                              backend=backend.name)
        return (q * 1.5 + k - v).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, s)
    want = f(x, w, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (x, w, s)), torch.autograd.grad(want, (x, w, s))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors

def _ok(device=DEVICE):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 32, generator=g).to(device)  # H = 2, D = 16
    w = torch.randn(96, 32, generator=g).to(device)
    cos, sin = _tables((4, 8), f32, g, device)
    return x, w, dict(num_heads=2, cos=cos, sin=sin)


@pytest.mark.parametrize("change,exc,msg", [
    (lambda a: a.update(cos=a["cos"][:, :7], sin=a["sin"][:, :7]), ValueError,
     r"cos and sin must be \(L, D/2\) = \(4, 8\) or \(B, L, D/2\) = \(3, 4, 8\), got \(4, 7\)"),
    (lambda a: a.update(cos=a["cos"][None].expand(2, 4, 8), sin=a["sin"][None].expand(2, 4, 8)), ValueError,
     r"cos and sin must be \(L, D/2\).*got \(2, 4, 8\)"),
    (lambda a: a.update(cos=a["cos"][:3], sin=a["sin"][:3]), ValueError, r"got \(3, 8\)"),
    (lambda a: a.update(sin=a["sin"][None]), ValueError, "cos and sin must have one shape"),
    (lambda a: a.update(sin=None), ValueError, "cos and sin must be given together"),
    (lambda a: a.update(coords=torch.zeros(4, 1), freqs=torch.zeros(1, 8)), ValueError,
     "give either coords and freqs .angles. or cos and sin .tables., not both"),
    (lambda a: a.update(cos=a["cos"].clone().requires_grad_()), ValueError,
     "cos requires grad, but qkv_proj gives no gradient for rotation tables"),
    (lambda a: a.update(sin=a["sin"].clone().requires_grad_()), ValueError, "sin requires grad"),
    (lambda a: a.update(cos=a["cos"].long()), TypeError, "cos must be a floating-point tensor"),
    (lambda a: a.update(cos=a["cos"].reshape(-1), sin=a["sin"].reshape(-1)), ValueError,
     "cos must have 2 or 3 dimensions"),
    (lambda a: a.update(rotary_dim=7), ValueError, "rotary_dim must be even and at most the head dim 16, got 7"),
    (lambda a: a.update(rotary_dim=18), ValueError, "rotary_dim must be even and at most the head dim 16, got 18"),
    (lambda a: a.update(rotary_dim=0), ValueError, "rotary_dim must be >= 2"),
    (lambda a: a.update(rotary_dim=8.0), TypeError, "rotary_dim must be an int"),
    (lambda a: a.update(rotary_dim=8), ValueError,
     r"cos and sin must be \(L, rotary_dim/2\) = \(4, 4\) or \(B, L, rotary_dim/2\) = \(3, 4, 4\), got \(4, 8\)"),
    (lambda a: a.update(cos=None, sin=None, rotary_dim=8), ValueError, "rotary_dim is given without a rotation"),
    (lambda a: a.update(cos=None, sin=None, coords=torch.zeros(4, 2), freqs=torch.zeros(2, 8), rotary_dim=8),
     ValueError, r"freqs must be \(A, rotary_dim/2\) = \(2, 4\)"),
], ids=["pairs", "batch", "tokens", "shapes-differ", "cos-alone", "with-coords", "cos-grad", "sin-grad", "int",
        "1d", "odd-rotary-dim", "rotary-dim-too-large", "rotary-dim-0", "rotary-dim-float", "table-vs-rotary-dim",
        "rotary-dim-alone", "freqs-vs-rotary-dim"])
def test_bad_inputs_raise_clear_errors(backend, change, exc, msg):
    x, w, kw = _ok(backend.device)
    kw = dict(kw, backend=backend.name)
    change(kw)
    kw = {k: (v.to(backend.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    with pytest.raises(exc, match=msg):
        pf.qkv_proj(x, w, **kw)


def test_triton_names_its_half_pairing_rotary_dim_limit(backend):
    if backend.name != "triton":
        pytest.skip("a Triton kernel limit")
    x, w, kw = _ok(backend.device)
    c, s = _tables((4, 3), f32, torch.Generator().manual_seed(0), backend.device)
    with pytest.raises(ValueError, match="power-of-two rotary_dim with half pairing, got 6"):
        pf.qkv_proj(x, w, **dict(kw, cos=c, sin=s, rotary_dim=6, pairing="half", backend="triton"))


def test_l2norm_backward_refuses_pairs_where_cos_and_sin_are_zero(backend):
    """The fused backward recovers the normalised q and k through the inverse of the
    tables' 2x2 maps; where cos = sin = 0 that is lost, and every backend refuses
    (when a gradient is needed and the l2 norm needs it)."""
    x, w, kw = _ok(backend.device)
    kw["cos"][2, 3] = 0.0
    kw["sin"][2, 3] = 0.0
    kw = dict(kw, backend=backend.name)
    with torch.no_grad():
        pf.qkv_proj(x, w, qk_l2norm=True, **kw)
    xg = x.clone().requires_grad_()
    pf.qkv_proj(xg, w, qk_l2norm=False, **kw)  # no norm: the backward needs no recovered pair
    with pytest.raises(RuntimeError, match="cos and sin are both 0 at some pair"):
        pf.qkv_proj(xg, w, qk_l2norm=True, **kw)
