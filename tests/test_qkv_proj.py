"""qkv_proj: reference vs float64 math, VAR's and Infinity's eager code, gradcheck;
fast backends vs the reference (forward and backward) on the VAR, Infinity, rope
without norm, half pairing and per-head freqs configurations; autocast, saved
tensors, torch.compile, errors; GPU-only checks (all dtypes, CUDA graphs,
inductor, determinism, cuda vs triton)."""

import math

import pytest
import torch
import torch.nn.functional as F

import posenc_fast as pf
from posenc_fast.reference import qkv_proj as ref
from posenc_fast.reference.rope import axial_rope_freqs, pyramid_coords
from conftest import DEVICE, HAS_CUDA, capture_and_replay, cuda_library, fast_backends

BACKENDS = fast_backends()
needs_fast = pytest.mark.skipif(not BACKENDS, reason="no fast backend runs here")
# bf16 tl.dot is wrong in the Triton interpreter: the launcher upcasts its operands
# there (exact products, as on the GPU), so bf16 runs everywhere.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerance relative to the largest reference magnitude: forward, gradients.
TOL = {torch.float32: (2e-5, 5e-5), torch.float16: (3e-3, 6e-3), torch.bfloat16: (2e-2, 4e-2)}
VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680


def _close(got, want, tol, what=""):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.detach().float().abs().max().item() or 1.0
    torch.testing.assert_close(got.detach().float(), want.detach().float(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def _case(B, L, H, D, *, dtype=torch.float32, device=DEVICE, bias=True, zero_k_bias=False, l2norm=False,
          q_scale=False, rope=None, per_head=False, batch_coords=False, seed=0):
    """Fresh random inputs: (x, weight, bias, kwargs) with leaf tensors needing grad."""
    g = torch.Generator().manual_seed(seed)
    C = H * D

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device)

    x = rnd(B, L, C).to(dtype).requires_grad_()
    w = rnd(3 * C, C, std=C ** -0.5).to(dtype).requires_grad_()
    b = None
    if bias:
        b = rnd(3 * C, std=0.5)
        if zero_k_bias:
            b[C:2 * C] = 0
        b = b.to(dtype).requires_grad_()
    kw = dict(num_heads=H, qk_l2norm=l2norm)
    if q_scale:
        kw["q_scale"] = (torch.rand(H, generator=g) * 3 + 0.5).to(device).requires_grad_()
    if rope is not None:
        if rope == "axial":
            side = int(math.isqrt(L))
            assert side * side == L
            coords = pyramid_coords([side], mode="raw")
            freqs = axial_rope_freqs(D)
        else:
            coords = rnd(L, 2, std=4.0)
            freqs = rnd(2, D // 2, std=0.5)
        if batch_coords:
            coords = coords[None] + rnd(B, 1, 2)
        if per_head:
            freqs = freqs[None].repeat(H, 1, 1) + rnd(H, 2, D // 2, std=0.1)
        kw["coords"] = coords.to(device)
        kw["freqs"] = freqs.to(device).requires_grad_()
        kw["pairing"] = rope if rope in ("interleaved", "half") else "interleaved"
    return x, w, b, kw


def _leaves(x, w, b, kw):
    out = [("x", x), ("weight", w)]
    if b is not None:
        out.append(("bias", b))
    for name in ("q_scale", "freqs"):
        if kw.get(name) is not None:
            out.append((name, kw[name]))
    return out


def _fwd_bwd(backend, x, w, b, kw, grads=None, seed=1):
    outs = pf.qkv_proj(x, w, b, backend=backend, **kw)
    if grads is None:
        g = torch.Generator().manual_seed(seed)
        grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    names, leaves = zip(*_leaves(x, w, b, kw))
    d = torch.autograd.grad(outs, leaves, grads)
    return outs, dict(zip(names, d)), grads


def _compare_with_reference(backend, x, w, b, kw, dtype):
    tol_f, tol_g = TOL[dtype]
    outs, grads, g = _fwd_bwd(backend, x, w, b, kw)
    want, want_grads, _ = _fwd_bwd("reference", x, w, b, kw, grads=g)
    for name, o, r in zip("qkv", outs, want):
        assert o.is_contiguous()
        _close(o, r, tol_f, name)
    for name in want_grads:
        _close(grads[name], want_grads[name], tol_g, f"d{name}")


# ---------------------------------------------------------------- float64 oracle

def _oracle(x, w, b, num_heads, qk_l2norm=False, q_scale=None, coords=None, freqs=None, pairing="interleaved"):
    """SPEC §2.2 / §2.3 written out in float64 (pairs rotated one by one)."""
    x, w = x.double(), w.double()
    B, L, C = x.shape
    H = num_heads
    D = C // H
    qkv = x @ w.T + (0 if b is None else b.double())
    q, k, v = qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    if qk_l2norm:
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if q_scale is not None:
        q = q * q_scale.double().view(1, H, 1, 1)
    if coords is not None:
        c = coords.double()
        c = c[None] if c.dim() == 2 else c  # (B|1, L, A)
        f = freqs.double()
        f = f[None] if f.dim() == 2 else f  # (H|1, A, P)
        ang = torch.zeros(c.shape[0], f.shape[0], L, D // 2, dtype=torch.float64)
        for a in range(c.shape[-1]):
            ang += c[:, None, :, a, None] * f[None, :, None, a, :]
        out = []
        for t in (q, k):
            r = t.clone()
            for j in range(D // 2):
                i0, i1 = (2 * j, 2 * j + 1) if pairing == "interleaved" else (j, j + D // 2)
                cs, sn = torch.cos(ang[..., j]), torch.sin(ang[..., j])
                r[..., i0] = t[..., i0] * cs - t[..., i1] * sn
                r[..., i1] = t[..., i0] * sn + t[..., i1] * cs
            out.append(r)
        q, k = out
    return q, k, v


@pytest.mark.parametrize("cfg", [
    dict(l2norm=True, q_scale=True, zero_k_bias=True),
    dict(l2norm=True, rope="axial"),
    dict(rope="interleaved", batch_coords=True),
    dict(l2norm=True, q_scale=True, rope="half", per_head=True),
    dict(bias=False, q_scale=True),
])
def test_reference_matches_float64_math(cfg):
    x, w, b, kw = _case(2, 16, 3, 8, device="cpu", **cfg)
    got = ref.qkv_proj(x, w, b, **kw)
    want = _oracle(x, w, b, **kw)
    for name, o, r in zip("qkv", got, want):
        assert o.dtype == torch.float32 and o.is_contiguous() and o.shape == (2, 3, 16, 8)
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def test_reference_gradcheck():
    """Norm and scale in float64 (the rotation's own gradcheck lives with the rope
    reference, which rotates in fp32)."""
    x, w, b, kw = _case(1, 4, 2, 4, dtype=torch.float64, device="cpu", l2norm=True)
    s = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()

    def f(x, w, b, s):
        return ref.qkv_proj(x, w, b, q_scale=s, **kw)

    assert torch.autograd.gradcheck(f, (x, w, b, s))


# ---------------------------------------------------------------- the models' eager code

def _var_attention_qkv(x, W, q_bias, zero_k_bias, v_bias, scale_mul_1H11, H):
    """VAR SelfAttention (attn_l2_norm=True) up to the attention call, (B, H, L, D)."""
    B, L, C = x.shape
    qkv = F.linear(input=x, weight=W, bias=torch.cat((q_bias, zero_k_bias, v_bias))).view(B, L, 3, H, C // H)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)
    scale_mul = scale_mul_1H11.clamp_max(math.log(100)).exp()
    return F.normalize(q, dim=-1).mul(scale_mul), F.normalize(k, dim=-1), v


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_var_configuration_matches_var_eager(backend):
    """VAR: D = 64, q and v bias with a zero k bias, l2 norm, q_scale from the
    clamped learnable log-scale (one head above the clamp), no rope; grads included."""
    B, L, H, D = 2, 30, 3, 64
    C = H * D
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, L, C, generator=g).to(DEVICE).requires_grad_()
    W = (torch.randn(3 * C, C, generator=g) * C ** -0.5).to(DEVICE).requires_grad_()
    q_bias = torch.randn(C, generator=g).to(DEVICE).requires_grad_()
    v_bias = torch.randn(C, generator=g).to(DEVICE).requires_grad_()
    zero_k = torch.zeros(C, device=DEVICE)
    scale_mul = torch.tensor([math.log(4.0), math.log(150.0), 1.0], device=DEVICE).view(1, H, 1, 1).requires_grad_()

    want = _var_attention_qkv(x, W, q_bias, zero_k, v_bias, scale_mul, H)
    q_scale = scale_mul.clamp_max(math.log(100)).exp().reshape(H)
    got = pf.qkv_proj(x, W, torch.cat((q_bias, zero_k, v_bias)), num_heads=H, qk_l2norm=True, q_scale=q_scale,
                      backend=backend)
    for name, o, r in zip("qkv", got, want):
        _close(o, r, 2e-5, name)
    grads = [torch.randn_like(r) for r in want]
    leaves = (x, W, q_bias, v_bias, scale_mul)
    dg = torch.autograd.grad(got, leaves, grads)
    dw = torch.autograd.grad(want, leaves, grads)
    for name, a, r in zip(("x", "W", "q_bias", "v_bias", "scale_mul"), dg, dw):
        _close(a, r, 5e-5, f"d{name}")
    assert dg[-1][0, 1].item() == 0.0  # the clamped head gets no gradient


def _infinity_rope_qk(q, k, scales, D, scale_mul):
    """Infinity (cos_attn, rope2d_normalized_by_hw=2): normalise, scale q, then rotate
    with the 'star style' cache built from a (height, width) frequency grid."""
    half = D // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    H_, W_ = scales[-1]
    grid_h = torch.outer(torch.arange(H_).float(), inv_freq)
    grid_w = torch.outer(torch.arange(W_).float(), inv_freq)
    grid = torch.cat([grid_h[:, None, :].expand(-1, W_, -1), grid_w[None, :, :].expand(H_, -1, -1)], dim=-1)
    grid = torch.stack([torch.cos(grid), torch.sin(grid)], dim=0)  # (2, H, W, D/2)
    caches = []
    for ph, pw in scales:
        idx = torch.stack([(torch.arange(ph) * (H_ / ph)).reshape(ph, 1).expand(ph, pw),
                           (torch.arange(pw) * (W_ / pw)).reshape(1, pw).expand(ph, pw)], dim=-1).round().int()
        idx = idx.reshape(-1, 2)
        caches.append(grid[:, idx[:, 0], idx[:, 1], :])
    cache = torch.cat(caches, 1)[:, None, None].to(q.device)  # (2, 1, 1, L, D/2)
    q = F.normalize(q.float(), dim=-1, eps=1e-12).mul(scale_mul)
    k = F.normalize(k.float(), dim=-1, eps=1e-12)
    out = []
    for t in (q, k):
        t = t.reshape(*t.shape[:-1], -1, 2)
        t = torch.stack([cache[0] * t[..., 0] - cache[1] * t[..., 1],
                         cache[1] * t[..., 0] + cache[0] * t[..., 1]], dim=-1)
        out.append(t.reshape(*t.shape[:-2], -1))
    return out


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_infinity_configuration_matches_infinity_eager(backend):
    """Infinity: D = 128, l2 norm + q_scale, axial 2D RoPE on 'round' pyramid coords."""
    scales = [(1, 1), (2, 2), (3, 3), (5, 5)]
    L = sum(h * w for h, w in scales)
    H, D = 3, 128
    x, w, b, kw = _case(2, L, H, D, l2norm=True, q_scale=True, seed=5)
    kw.update(coords=pyramid_coords(scales, mode="round").to(DEVICE), freqs=axial_rope_freqs(D).to(DEVICE))
    q, k, v = pf.qkv_proj(x, w, b, backend=backend, **kw)
    B = x.shape[0]
    qkv = F.linear(x, w, b).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    want_q, want_k = _infinity_rope_qk(qkv[0], qkv[1], scales, D, kw["q_scale"].view(1, H, 1, 1))
    _close(q, want_q, 2e-5, "q")
    _close(k, want_k, 2e-5, "k")
    _close(v, qkv[2], 2e-5, "v")


# ---------------------------------------------------------------- fast backends vs the reference

CONFIGS = {
    "var": dict(H=3, D=64, cfg=dict(l2norm=True, q_scale=True, zero_k_bias=True)),
    "infinity": dict(H=3, D=128, cfg=dict(l2norm=True, q_scale=True, rope="axial")),
    "rope_no_norm": dict(H=2, D=32, cfg=dict(rope="interleaved", batch_coords=True)),
    "half_pairing": dict(H=6, D=16, cfg=dict(l2norm=True, q_scale=True, rope="half")),
    "per_head_freqs": dict(H=3, D=32, cfg=dict(l2norm=True, rope="interleaved", per_head=True)),
    "scale_no_norm": dict(H=2, D=32, cfg=dict(q_scale=True, rope="half")),
    "plain_no_bias": dict(H=5, D=16, cfg=dict(bias=False)),
}


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_backend_matches_reference(backend, dtype, config):
    spec = CONFIGS[config]
    B, L = (1, 25) if config == "infinity" else (3, 25)  # axial rope needs a square L
    x, w, b, kw = _case(B, L, spec["H"], spec["D"], dtype=dtype, **spec["cfg"])
    _compare_with_reference(backend, x, w, b, kw, dtype)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_var_pyramid_odd_m(backend):
    """M = B * L = 2 * 680 (not a multiple of any tile), C = 192."""
    x, w, b, kw = _case(2, 680, 3, 64, l2norm=True, q_scale=True, zero_k_bias=True, seed=7)
    _compare_with_reference(backend, x, w, b, kw, torch.float32)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_non_contiguous_inputs_and_grads(backend):
    B, L, H, D = 2, 9, 3, 32
    x, w, b, kw = _case(B, L, H, D, l2norm=True, q_scale=True, rope="half")
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (B, L, C), batch innermost
    wt = w.detach().t().contiguous().t().requires_grad_()  # column-major weight
    assert not xt.is_contiguous() and not wt.is_contiguous()
    g = torch.Generator().manual_seed(2)
    # Upstream grads in (B, L, H, D) memory, seen as (B, H, L, D): like SDPA's.
    grads = [torch.randn(B, L, H, D, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3)]
    outs = pf.qkv_proj(xt, wt, b, backend=backend, **kw)
    want = pf.qkv_proj(x, w, b, backend="reference", **kw)
    for name, o, r in zip("qkv", outs, want):
        _close(o, r, 2e-5, name)
    leaves = (xt, wt, b, kw["q_scale"], kw["freqs"])
    got = torch.autograd.grad(outs, leaves, grads)
    ref_g = torch.autograd.grad(want, (x, w, b, kw["q_scale"], kw["freqs"]), grads)
    for a, r in zip(got, ref_g):
        _close(a, r, 5e-5, "grad")


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_partial_grads_and_unused_outputs(backend):
    """Only some inputs need grad; the loss uses q alone."""
    x, w, b, kw = _case(2, 7, 2, 16, l2norm=True, q_scale=True, rope="interleaved")
    w.requires_grad_(False)
    kw["freqs"].requires_grad_(False)
    q, _, _ = pf.qkv_proj(x, w, b, backend=backend, **kw)
    qr, _, _ = pf.qkv_proj(x, w, b, backend="reference", **kw)
    r = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got = torch.autograd.grad((q * r).sum(), (x, b, kw["q_scale"]))
    want = torch.autograd.grad((qr * r).sum(), (x, b, kw["q_scale"]))
    for a, r in zip(got, want):
        _close(a, r, 5e-5, "grad")
    assert torch.count_nonzero(got[1][32:]) == 0  # no gradient reaches the k and v biases (C = 32)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_autocast_like_linear(backend):
    """Under autocast: inputs cast like F.linear, outputs in the autocast dtype."""
    dev = torch.device(DEVICE)
    dt = torch.bfloat16 if HAS_CUDA else torch.float16
    x, w, b, kw = _case(2, 16, 2, 32, l2norm=True, q_scale=True, rope="axial")
    with torch.autocast(dev.type, dtype=dt):
        outs, grads, g = _fwd_bwd(backend, x, w, b, kw)
        lin_dtype = F.linear(x, w, b).dtype
    assert lin_dtype == dt and all(o.dtype == dt for o in outs)
    xc, wc, bc = (t.detach().to(dt).requires_grad_() for t in (x, w, b))
    want = pf.qkv_proj(xc, wc, bc, backend="reference", **kw)
    for name, o, r in zip("qkv", outs, want):
        _close(o, r, TOL[dt][0], name)
    want_g = torch.autograd.grad(want, (xc, wc, bc), g)
    for name, r in zip(("x", "weight", "bias"), want_g):
        assert grads[name].dtype == torch.float32  # cast back to the leaf's dtype by autograd
        _close(grads[name].to(dt), r, TOL[dt][1], f"d{name}")


def test_reference_backend_autocast_like_linear():
    x, w, b, kw = _case(1, 4, 2, 8, device="cpu", l2norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = pf.qkv_proj(x, w, b, backend="reference", **kw)
    want = ref.qkv_proj(x.bfloat16(), w.bfloat16(), b.bfloat16(), **kw)
    for o, r in zip(outs, want):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o, r, atol=0, rtol=0)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_qkv_copies(backend):
    """Saved for backward: x, W, the outputs q and k themselves, inverse norms and
    the small parameters; no packed qkv and no copy of q, k or v."""
    B, L, H, D = 2, 8, 2, 16
    x, w, b, kw = _case(B, L, H, D, l2norm=True, q_scale=True, rope="interleaved")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k, v = pf.qkv_proj(x, w, b, backend=backend, **kw)
    act = B * L * H * D
    big = [t for t in saved if t.numel() >= act]
    ptrs = {t.data_ptr() for t in big}
    assert ptrs <= {x.data_ptr(), w.data_ptr(), q.data_ptr(), k.data_ptr()}, [tuple(t.shape) for t in big]
    assert v.data_ptr() not in ptrs
    small = [t for t in saved if t.numel() < act]
    assert sum(t.numel() for t in small) <= 2 * B * L * H + H + L * 2 + 2 * D // 2


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_backward_is_deterministic(backend):
    x, w, b, kw = _case(3, 20, 2, 32, l2norm=True, q_scale=True, rope="interleaved", per_head=True)
    _, g1, grads = _fwd_bwd(backend, x, w, b, kw)
    _, g2, _ = _fwd_bwd(backend, x, w, b, kw, grads=grads)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, w, b, kw = _case(2, 9, 2, 16, l2norm=True, q_scale=True, rope="half")

    def f(x, w, b, s, fr):
        q, k, v = pf.qkv_proj(x, w, b, num_heads=2, qk_l2norm=True, q_scale=s, coords=kw["coords"], freqs=fr,
                              pairing="half", backend=backend)
        return (q * 1.5 + k - v).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (x, w, b, kw["q_scale"], kw["freqs"])
    got = compiled(*args)
    want = f(*args)
    _close(got, want, 2e-5, "loss")
    for a, r in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        _close(a, r, 5e-5, "grad")


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, kw = _case(0, 5, 2, 16, l2norm=True, rope="interleaved")
    q, k, v = pf.qkv_proj(x, w, b, backend=backend, **kw)
    assert q.shape == k.shape == v.shape == (0, 2, 5, 16)


# ---------------------------------------------------------------- errors

def _ok_args():
    x, w, b, kw = _case(2, 6, 2, 8, device="cpu", l2norm=True, q_scale=True, rope="interleaved")
    return dict(x=x.detach(), weight=w.detach(), bias=b.detach(), **{k: (v.detach() if torch.is_tensor(v) else v)
                                                                      for k, v in kw.items()})


@pytest.mark.parametrize("change,exc,msg", [
    (dict(x=torch.randn(6, 16)), ValueError, "x must have 3"),
    (dict(x=torch.ones(2, 6, 16, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(weight=torch.randn(32, 16)), ValueError, r"weight must have shape \(3\*C, C\)"),
    (dict(weight=torch.randn(48, 17)), ValueError, r"weight must have shape \(3\*C, C\)"),
    (dict(num_heads=3), ValueError, "does not divide"),
    (dict(num_heads=2.0), TypeError, "num_heads must be an int"),
    (dict(num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(bias=torch.randn(16)), ValueError, r"bias must have shape \(3\*C,\)"),
    (dict(q_scale=torch.randn(3)), ValueError, r"q_scale must have shape \(num_heads,\)"),
    (dict(freqs=None), ValueError, "coords and freqs must be given together"),
    (dict(freqs=torch.randn(2, 3)), ValueError, r"freqs must be \(A, D/2\)"),
    (dict(freqs=torch.randn(3, 2, 4)), ValueError, "per-head freqs must have num_heads"),
    (dict(coords=torch.randn(5, 2)), ValueError, "coords has 5 positions"),
    (dict(coords=torch.randn(3, 6, 2)), ValueError, r"coords must be \(L, A\) or \(B, L, A\)"),
    (dict(coords=torch.ones(6, 2, dtype=torch.int64)), TypeError, "coords must be a floating-point"),
    (dict(pairing="rotate_half"), ValueError, "pairing must be one of"),
    (dict(qk_l2norm=1), TypeError, "qk_l2norm must be a bool"),
    (dict(weight=torch.randn(48, 16, dtype=torch.float16)), TypeError, "weight has dtype float16 but x has float32"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_inputs_raise_clear_errors(change, exc, msg):
    args = _ok_args()
    args.update(change)
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=msg):
        pf.qkv_proj(x, w, b, **args)


def test_odd_head_dim_with_rope_raises():
    x, w = torch.randn(1, 4, 6), torch.randn(18, 6)
    with pytest.raises(ValueError, match="rope needs an even head_dim"):
        pf.qkv_proj(x, w, num_heads=2, coords=torch.randn(4, 1), freqs=torch.randn(1, 1), backend="reference")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_triton_rejects_non_power_of_two_head_dim():
    x, w = torch.randn(1, 4, 48, device=DEVICE), torch.randn(144, 48, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        pf.qkv_proj(x, w, num_heads=2, backend="triton")


def test_auto_skips_a_backend_that_cannot_take_the_shape(monkeypatch):
    """On CUDA tensors ``auto`` walks its order past a kernel whose limits exclude
    the call (head_dim 96 is not a power of two: not Triton), where naming that
    backend raises. Availability is faked so the resolution runs without a GPU."""
    from posenc_fast import _backends
    from posenc_fast.ops.qkv_proj import _backend_limits

    monkeypatch.setattr(_backends, "unavailable_reason", lambda name, device=None: None)
    cuda = torch.device("cuda")
    monkeypatch.setitem(_backends._AUTO_ORDER, "qkv_proj", ("triton", "cuda", "reference"))
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, _backend_limits(96, None)) == "cuda"
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, _backend_limits(64, None)) == "triton"
    # half pairing reorders Triton's accumulator in blocks of rotary_dim columns: powers of two only
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, _backend_limits(64, None, 48, True)) == "cuda"
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, _backend_limits(64, None, 48, False)) == "triton"
    # Neither kernel takes D = 258 (over both limits); the reference runs it.
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, _backend_limits(258, None)) == "reference"
    five_axes = torch.zeros(4, 5)
    monkeypatch.setitem(_backends._AUTO_ORDER, "qkv_proj", ("cuda", "triton"))
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, _backend_limits(64, five_axes)) == "triton"
    with pytest.raises(ValueError, match="backend 'triton' cannot run this qkv_proj call: .*power-of-two"):
        _backends.resolve_backend("qkv_proj", "triton", cuda, _backend_limits(96, None))
    with pytest.raises(ValueError, match="backend 'cuda' cannot run .* at most 4 rope axes, got 5"):
        _backends.resolve_backend("qkv_proj", "cuda", cuda, _backend_limits(64, five_axes))


def test_auto_order_follows_the_evidence_per_shape(monkeypatch):
    """Until GPU measurements are registered: sampling-size calls (few rows, host time
    decides) take the CUDA path, training-size calls the fused Triton GEMM (README,
    Performance); a measured order registered for the op takes precedence."""
    from posenc_fast import _backends
    from posenc_fast.ops import qkv_proj as Q

    monkeypatch.setattr(_backends, "unavailable_reason", lambda name, device=None: None)
    monkeypatch.delitem(_backends._AUTO_ORDER, "qkv_proj", raising=False)
    cuda = torch.device("cuda")
    limits = Q._backend_limits(64, None)
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, limits, Q._auto_order(2 * 256)) == "cuda"
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, limits, Q._auto_order(32 * 680)) == "triton"
    monkeypatch.setitem(_backends._AUTO_ORDER, "qkv_proj", ("cuda", "triton"))
    assert _backends.resolve_backend("qkv_proj", "auto", cuda, limits, Q._auto_order(32 * 680)) == "cuda"


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_cuda_backend_unavailable_raises_with_reason():
    x, w = torch.randn(1, 4, 32), torch.randn(96, 32)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for qkv_proj"):
        pf.qkv_proj(x, w, num_heads=2, backend="cuda")


def test_cuda_extension_exposes_kernels_and_checks_arguments():
    lib = cuda_library()
    assert lib.qkv_proj_bwd_rows_per_chunk() > 0
    rope = ([0, 0, 0], 0, [0, 0], 0, 0, False)  # coords strides, freqs, its strides, axes, rot_pairs, half
    s = [8, 8, 8]  # output strides (b, h, l)
    # Argument errors from the C++ core arrive as ValueError before any CUDA call.
    with pytest.raises(ValueError, match="head_dim must be even"):
        lib.qkv_proj_fwd(0, 0, 0, 0, 0, 0, *rope, 0, s, 0, s, 0, s, 0, 1, 1, 1, 3, 0, 0)
    with pytest.raises(ValueError, match="1 to 4 axes"):
        lib.qkv_proj_fwd(8, 24, 0, 0, 0, 8, [0, 1, 1], 8, [0, 2], 5, 4, False, 8, s, 8, s, 8, s, 0, 1, 1, 1, 8, 0,
                         0)
    with pytest.raises(ValueError, match=r"rot_pairs must be in \[1, head_dim / 2\], got 5"):
        lib.qkv_proj_fwd(8, 24, 0, 0, 0, 8, [0, 1, 1], 8, [0, 2], 2, 5, False, 8, s, 8, s, 8, s, 0, 1, 1, 1, 8, 0,
                         0)
    with pytest.raises(ValueError, match="a cos/sin table has no per-head freqs"):
        lib.qkv_proj_fwd(8, 24, 0, 0, 0, 8, [0, 4, 16], 0, [4, 0], 0, 4, False, 8, s, 8, s, 8, s, 0, 1, 1, 1, 8, 0,
                         0)
    with pytest.raises(ValueError, match="dq_stride needs 4"):
        lib.qkv_proj_bwd(8, [1], 8, [1, 1, 1, 1], 8, [1, 1, 1, 1], 0, 0, 0, 0, 0, 0, *rope, 8, 0, 0, 0,
                         1, 1, 1, 8, 0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        lib.qkv_proj_fwd(8, 24, 0, 9, 0, 0, *rope, 8, s, 8, s, 8, s, 0, 1, 1, 1, 8, 0, 0)
    with pytest.raises(ValueError, match="k_stride needs 3"):
        lib.qkv_proj_fwd(8, 24, 0, 0, 0, 0, *rope, 8, s, 8, [1, 1], 8, s, 0, 1, 1, 1, 8, 0, 0)


# ---------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("C,H,rope", [(1024, 16, None), (1920, 30, None), (2048, 16, "axial")])
def test_gpu_model_shapes(backend, dtype, C, H, rope):
    """VAR-d16, VAR-d30 (H = 30: odd number of head pairs) and Infinity-2B widths."""
    L = 680 if rope is None else 256
    x, w, b, kw = _case(2, L, H, C // H, dtype=dtype, l2norm=True, q_scale=True, rope=rope, zero_k_bias=True)
    _compare_with_reference(backend, x, w, b, kw, dtype)


@pytest.mark.gpu
def test_gpu_fp32_without_tf32_matches_reference_tightly():
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: IEEE fp32 GEMMs
    x, w, b, kw = _case(2, 100, 4, 64, l2norm=True, rope="half")
    for backend in ("cuda", "triton"):
        _compare_with_reference(backend, x, w, b, kw, torch.float32)


@pytest.mark.gpu
def test_gpu_cuda_and_triton_agree():
    x, w, b, kw = _case(3, 300, 8, 64, dtype=torch.bfloat16, l2norm=True, q_scale=True, rope="interleaved",
                        per_head=True)
    oc, gc, g = _fwd_bwd("cuda", x, w, b, kw)
    ot, gt, _ = _fwd_bwd("triton", x, w, b, kw, grads=g)
    for a, r in zip(oc, ot):
        _close(a, r, 2e-2, "out")
    for name in gc:
        _close(gc[name], gt[name], 4e-2, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_inductor_fullgraph(backend):
    x, w, b, kw = _case(2, 64, 4, 64, dtype=torch.bfloat16, l2norm=True, q_scale=True, rope="axial")

    def f(x, w, b):
        q, k, v = pf.qkv_proj(x, w, b, backend=backend, **kw)
        return F.scaled_dot_product_attention(q, k, v).float().sum()

    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(x, w, b), f(x, w, b)
    _close(got, want, 2e-2, "loss")
    for a, r in zip(torch.autograd.grad(got, (x, w, b)), torch.autograd.grad(want, (x, w, b))):
        _close(a, r, 4e-2, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    x, w, b, kw = _case(2, 64, 4, 64, dtype=torch.bfloat16, l2norm=True, q_scale=True, rope="interleaved")
    g = [torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    leaves = (x, w, b, kw["q_scale"], kw["freqs"])

    def step():
        outs = pf.qkv_proj(x, w, b, backend=backend, **kw)
        return tuple(outs) + torch.autograd.grad(outs, leaves, g)

    replayed, eager = capture_and_replay(step, lambda: x.data.copy_(torch.randn_like(x)))
    want = pf.qkv_proj(x, w, b, backend="reference", **kw)
    for o, r in zip(replayed[:3], want):
        _close(o, r, TOL[torch.bfloat16][0], "out")
    for a, r in zip(replayed, eager):
        torch.testing.assert_close(a, r)
