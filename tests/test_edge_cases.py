"""Bad or unusual input that used to corrupt memory silently or make the backends
disagree (issue 17), checked on every backend: the reference, Triton (under the
interpreter without a GPU) and CUDA (under host emulation without a GPU, see
tests/test_cuda_emulation.py; the real kernels on a GPU).

* in-place rope on memory that aliases itself or the other tensor is refused;
  disjoint interleaved views (q and k of a packed qkv buffer) are accepted;
* coordinates that require grad are refused by every backend;
* NaN / Inf masks of every op equal those of the eager composition;
* degenerate sizes raise ValueError / TypeError naming the argument;
* index x stride offsets beyond 2^31 elements (huge strides over a buffer that is
  mostly never touched);
* a zero q_scale gives exact gradients (and a clear error when q_scale itself
  needs a gradient there);
* double backward through a fused op raises a RuntimeError naming the op.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import posenc_fast as pf
from posenc_fast import _backends, _checks, _cuda
from posenc_fast.nn.attention import FusedSelfAttention
from posenc_fast.ops import pos_embed as PE
from posenc_fast.ops import pyramid as P
from posenc_fast.reference import pyramid as pyr_ref
from posenc_fast.reference import rope as rope_ref
from conftest import DEVICE, HAS_CUDA
from test_cuda_emulation import FAMILIES, _EmulatedLib, _use, emu_builds, sanitizer_dir  # noqa: F401 (fixtures)

BACKENDS = ("reference", "triton", "cuda")


class _AllFamilies:
    """The emulated family modules as one ``posenc_fast._C``."""

    def __init__(self, modules):
        self._libs = [_EmulatedLib(m) for m in modules]
        self._modules = modules

    def __getattr__(self, name):
        for lib, module in zip(self._libs, self._modules):
            if hasattr(module, name):
                return getattr(lib, name)
        raise AttributeError(name)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """SimpleNamespace(name, device) of one backend: Triton on this machine's test
    device; CUDA on the GPU when there is one with the extension built, else the
    emulated kernels on CPU tensors through the real op layer."""
    name = request.param
    if name == "triton" and pf.available_backends(DEVICE)["triton"] != "available":
        pytest.skip(pf.available_backends(DEVICE)["triton"])
    if name != "cuda" or (HAS_CUDA and _cuda.load_error() is None):
        yield SimpleNamespace(name=name, device=DEVICE)
        return
    builds = request.getfixturevalue("emu_builds")
    reports = request.getfixturevalue("sanitizer_dir")
    # test_cuda_emulation's per-family setup (build, load once, sanitizer check at
    # teardown), then one library object over the families.
    uses = [_use(family, builds, reports, monkeypatch) for family in FAMILIES]
    modules = [next(u) for u in uses]
    original = _backends.unavailable_reason
    monkeypatch.setattr(_backends, "unavailable_reason",
                        lambda n, device=None: None if n == "cuda" else original(n, device))
    monkeypatch.setattr(_cuda, "lib", lambda: _AllFamilies(modules))
    yield SimpleNamespace(name=name, device="cpu")
    for u in uses:
        next(u, None)


def _rand(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=device)


def _rope_inputs(device, L=7, D=16):
    coords = torch.randn(L, 2, device=device) * 4
    freqs = pf.axial_rope_freqs(D).to(device)
    return coords, freqs


# --------------------------------------------------- 1. aliased in-place rope

def _aliasing_cases(device):
    """(name of the tensor the error names, q, k, buffer) for each refused layout."""
    B, H, L, D = 2, 3, 7, 16
    base = _rand(B, 4, L, D, device=device)
    one = _rand(1, H, L, D, device=device)
    row = _rand(B, H, 1, D, device=device)
    flat = _rand(L * D // 2 + D, device=device)
    return {
        "k-is-q": ("q and k", base[:, :3], base[:, :3], base),
        "partial-overlap": ("q and k", base[:, 0:3], base[:, 1:4], base),
        "q-expanded-batch": ("q", one.expand(B, H, L, D), None, one),
        "q-expanded-L": ("q", row.expand(B, H, L, D), base[:, :3], row),
        "k-expanded-batch": ("k", base[:, :3], one.expand(B, H, L, D), one),
        # overlapping windows: torch calls this layout 'too hard' and lets it pass
        "q-windows": ("q", flat.as_strided((1, 1, L, D), (0, 0, D // 2, 1)), None, flat),
        "k-head-of-q": ("q and k", base[:, :3], base[:, 2:3], base),
    }


@pytest.mark.parametrize("case", ["k-is-q", "partial-overlap", "q-expanded-batch", "q-expanded-L",
                                  "k-expanded-batch", "q-windows", "k-head-of-q"])
def test_inplace_rope_refuses_aliasing(backend, case):
    coords, freqs = _rope_inputs(backend.device)
    names, q, k, buf = _aliasing_cases(backend.device)[case]
    before = buf.clone()
    with pytest.raises(ValueError, match=names):
        pf.apply_rope_(q, k, coords, freqs, backend=backend.name)
    assert torch.equal(buf, before), "memory changed before the error"


B_, H_, L_, D_ = 2, 3, 7, 16
PACKED = {  # kind -> shape of the buffer q and k are views of
    "qkv-unbind": (B_, L_, 3, H_, D_),       # packed qkv: q and k interleave in every token
    "qk-interleaved-D": (B_, H_, L_, 2 * D_),  # q and k alternate element by element
    "gqa-heads": (B_, L_, H_ + 1, D_),         # 3 q heads and 1 k head per token
    "halves": (2, B_, H_, L_, D_),             # two halves of one allocation
}


def _packed_views(kind, buf):
    """The (B, H, L, D) q and k views of a buffer shaped ``PACKED[kind]``."""
    if kind == "qkv-unbind":
        q, k, _ = buf.permute(2, 0, 3, 1, 4).unbind(0)
    elif kind == "qk-interleaved-D":
        q, k = buf[..., 0::2], buf[..., 1::2]
    elif kind == "gqa-heads":
        q, k = buf[:, :, :H_].transpose(1, 2), buf[:, :, H_:].transpose(1, 2)
    else:
        q, k = buf[0], buf[1]
    return q, k


@pytest.mark.parametrize("kind", list(PACKED))
def test_inplace_rope_accepts_disjoint_views_of_one_buffer(backend, kind):
    coords, freqs = _rope_inputs(backend.device)
    buf = _rand(*PACKED[kind], device=backend.device)
    q, k = _packed_views(kind, buf)
    assert _checks.has_internal_overlap(q) is False and _checks.overlap(q, k) is False
    exp_q, exp_k = rope_ref.apply_rope(q.clone(), k.clone(), coords, freqs)
    untouched = buf.clone()
    pf.apply_rope_(q, k, coords, freqs, backend=backend.name)
    torch.testing.assert_close(q, exp_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, exp_k, atol=1e-5, rtol=1e-5)
    # everything of the buffer outside q and k is unchanged
    marks = torch.zeros_like(buf)
    for view in _packed_views(kind, marks):
        view.fill_(1)
    outside = marks == 0
    assert torch.equal(buf[outside], untouched[outside])


@pytest.mark.parametrize("search", ["search", "listing"])
def test_overlap_decisions_match_brute_force(monkeypatch, search):
    """The exact overlap decisions against sets of every element's bytes, on random
    as_strided layouts, both by the search and by its fallback (offset listing)."""
    if search == "listing":
        monkeypatch.setattr(_checks, "_OVERLAP_SEARCH_BUDGET", 0)
    _checks._layout_self_overlap.cache_clear()
    _checks._layout_overlap.cache_clear()
    gen = torch.Generator().manual_seed(17)
    buf = torch.zeros(512)

    def element_bytes(t):
        out = []
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in t.shape]).reshape(t.numel(), -1).tolist():
            start = t.data_ptr() + 4 * sum(i * st for i, st in zip(idx, t.stride()))
            out.append(set(range(start, start + 4)))
        return out

    for _ in range(300):
        nd = int(torch.randint(1, 4, (), generator=gen))
        views = []
        for _ in range(2):
            sizes = torch.randint(1, 5, (nd,), generator=gen).tolist()
            strides = torch.randint(0, 8, (nd,), generator=gen).tolist()
            views.append(buf.as_strided(sizes, strides, int(torch.randint(0, 30, (), generator=gen))))
        a, b = views
        bytes_a, bytes_b = element_bytes(a), element_bytes(b)
        shared_within = len(set().union(*bytes_a)) != 4 * a.numel()
        assert _checks.has_internal_overlap(a) == shared_within, (a.shape, a.stride())
        assert _checks._layout_self_overlap(tuple(a.shape), a.stride(), 4) == shared_within
        assert _checks.overlap(a, b) == bool(set().union(*bytes_a) & set().union(*bytes_b)), \
            (a.shape, a.stride(), b.shape, b.stride())
    _checks._layout_self_overlap.cache_clear()
    _checks._layout_overlap.cache_clear()


# ------------------------------------------- 2. coordinates that require grad

def test_coords_requiring_grad_are_refused(backend):
    dev = backend.device
    coords, freqs = _rope_inputs(dev)
    q, k = _rand(2, 3, 7, 16, device=dev), _rand(2, 3, 7, 16, device=dev)
    c = coords.clone().requires_grad_()
    with pytest.raises(ValueError, match="coords requires grad"):
        pf.apply_rope(q, k, c, freqs, backend=backend.name)
    with pytest.raises(ValueError, match="coords requires grad"):
        pf.apply_rope_(q.clone(), k.clone(), c, freqs, backend=backend.name)
    x, w = _rand(2, 7, 32, device=dev), _rand(96, 32, device=dev) / 6
    with pytest.raises(ValueError, match="coords requires grad"):
        pf.qkv_proj(x, w, num_heads=2, coords=c, freqs=freqs, backend=backend.name)
    # Without autograd the same coordinates are fine, and detached ones give the
    # result of the plain tensor.
    with torch.no_grad():
        got = pf.apply_rope(q, k, c, freqs, backend=backend.name)
        got_qkv = pf.qkv_proj(x, w, num_heads=2, coords=c, freqs=freqs, backend=backend.name)
    exp = pf.apply_rope(q, k, coords, freqs, backend="reference")
    exp_qkv = pf.qkv_proj(x, w, num_heads=2, coords=coords, freqs=freqs, backend="reference")
    for a, e in zip(got + got_qkv, exp + exp_qkv):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ 3. NaN / Inf

def _poke(t, gen, n, values=(float("nan"), float("inf"), float("-inf"))):
    """``t`` with ``n`` random elements set to NaN / +Inf / -Inf."""
    t = t.clone()
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:n].to(t.device)
    flat[idx] = torch.tensor(values, dtype=t.dtype, device=t.device).repeat(n)[:n]
    return t


def _assert_same_masks(got, exp, what):
    assert got.dtype == exp.dtype, what
    for name, fn in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        g, e = fn(got), fn(exp)
        assert torch.equal(g, e), (f"{what}: {name} masks differ: {int(g.sum())} vs eager {int(e.sum())} "
                                   f"({int((g != e).sum())} positions)")
    finite = torch.isfinite(exp)
    assert finite.any(), f"{what}: nothing finite left to compare"
    torch.testing.assert_close(got[finite], exp[finite], atol=1e-4, rtol=1e-4)


def test_nan_inf_masks_pyramid(backend):
    dev = backend.device
    gen = torch.Generator().manual_seed(3)
    sc = [1, 2, 3]
    L, C = 14, 24
    x = _poke(_rand(3, L, C, device=dev), gen, 12)
    pos = _poke(_rand(1, L, C, device=dev), gen, 5)
    lvl = _poke(_rand(3, C, device=dev), gen, 2)
    level = pyr_ref.token_table(sc, device=dev)[:, 0]
    eager = x + pos + lvl[level]  # VAR: x += lvl_embed(lvl_1L) + pos_1LC (same masks either way)
    got = pf.pyramid_pos_level_add(x, pos, lvl, sc, backend=backend.name)
    _assert_same_masks(got, eager, "pyramid_pos_level_add")


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_nan_inf_masks_rope(backend, pairing):
    dev = backend.device
    gen = torch.Generator().manual_seed(4)
    B, H, L, D = 2, 3, 9, 16
    q = _poke(_rand(B, H, L, D, device=dev), gen, 20)
    k = _poke(_rand(B, 1, L, D, device=dev), gen, 8)
    coords = _poke(torch.randn(L, 2, device=dev) * 4, gen, 2)
    coords[0] = 0.0  # angle 0: Inf x sin(0) = NaN in eager too
    freqs = _poke(pf.axial_rope_freqs(D).to(dev), gen, 1, (float("nan"),))

    # eager composition: angles, cos / sin, rotate the pairs
    ang = (coords[:, :, None] * freqs[None]).sum(1)
    cos, sin = ang.cos(), ang.sin()

    def eager(x):
        x0, x1 = (x[..., 0::2], x[..., 1::2]) if pairing == "interleaved" else x.chunk(2, -1)
        y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return torch.stack([y0, y1], -1).flatten(-2) if pairing == "interleaved" else torch.cat([y0, y1], -1)

    got_q, got_k = pf.apply_rope(q, k, coords, freqs, pairing=pairing, backend=backend.name)
    _assert_same_masks(got_q, eager(q), "apply_rope q")
    _assert_same_masks(got_k, eager(k), "apply_rope k")
    q2, k2 = q.clone(), k.clone()
    pf.apply_rope_(q2, k2, coords, freqs, pairing=pairing, backend=backend.name)
    _assert_same_masks(q2, eager(q), "apply_rope_ q")
    _assert_same_masks(k2, eager(k), "apply_rope_ k")


@pytest.mark.parametrize("rope", [False, True])
def test_nan_inf_masks_qkv_proj(backend, rope):
    dev = backend.device
    gen = torch.Generator().manual_seed(5)
    B, L, H, D = 2, 12, 2, 32
    C = H * D
    x = _poke(_rand(B, L, C, device=dev), gen, 3)
    w = _poke(_rand(3 * C, C, device=dev) / 8, gen, 3)
    bias = _poke(_rand(3 * C, device=dev), gen, 1)
    scale = torch.rand(H, device=dev) + 0.5
    coords = torch.randn(L, 2, device=dev) * 3 if rope else None
    freqs = pf.axial_rope_freqs(D).to(dev) if rope else None

    # VAR's / Infinity's eager expressions
    qkv = F.linear(x, w, bias).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = F.normalize(q, dim=-1, eps=1e-12) * scale.view(1, H, 1, 1)
    k = F.normalize(k, dim=-1, eps=1e-12)
    if rope:
        q, k = rope_ref.apply_rope(q, k, coords, freqs)
    got = pf.qkv_proj(x, w, bias, num_heads=H, qk_l2norm=True, q_scale=scale, coords=coords, freqs=freqs,
                      backend=backend.name)
    for name, a, e in zip("qkv", got, (q, k, v)):
        assert torch.isnan(e).any() and not torch.isnan(e).all(), "the case lost its point"
        _assert_same_masks(a, e, f"qkv_proj {name}")


@pytest.mark.parametrize("kind", ["flexvar", "navit", "mae"])
def test_nan_inf_masks_pos_embed(backend, kind):
    dev = backend.device
    gen = torch.Generator().manual_seed(5)
    sc = [1, 2, (2, 3)]
    L, C = 11, 24
    x = _poke(_rand(3, L, C, device=dev), gen, 12)
    if kind == "flexvar":
        tables = (_poke(_rand(1, C, 4, 4, device=dev), gen, 3),)
        eager = x + torch.cat([F.interpolate(tables[0], size=hw, mode="area").flatten(2).transpose(1, 2)
                               for hw in [(1, 1), (2, 2), (2, 3)]], dim=1)
    elif kind == "navit":
        tables = (_poke(_rand(3, C, device=dev), gen, 2), _poke(_rand(3, C, device=dev), gen, 2))
        r = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1], device=dev)
        c = torch.tensor([0, 0, 1, 0, 1, 0, 1, 2, 0, 1, 2], device=dev)
        eager = x + tables[0][r] + tables[1][c]  # NaViT: patches + h_pos + w_pos
    else:
        tables = ()
        eager = x + pf.pos_embed_table("mae", sc, C, device=dev)
    got = pf.pos_embed_add(x, kind, sc, tables=tables, backend=backend.name)
    _assert_same_masks(got, eager, f"pos_embed_add {kind}")


# ---------------------------------------------------------- 4. degenerate sizes

def test_degenerate_sizes(backend):
    dev, name = backend.device, backend.name
    coords = torch.zeros(5, 1, device=dev)
    freqs = torch.zeros(1, 0, device=dev)
    q0 = _rand(1, 2, 5, 0, device=dev)
    with pytest.raises(ValueError, match="head dim"):
        pf.apply_rope(q0, None, coords, freqs, backend=name)
    with pytest.raises(ValueError, match="head dim"):
        pf.apply_rope_(q0, q0.clone(), coords, freqs, backend=name)
    with pytest.raises(ValueError, match="at least one channel"):
        pf.qkv_proj(_rand(2, 3, 0, device=dev), _rand(0, 0, device=dev), num_heads=1, backend=name)
    with pytest.raises(ValueError, match="num_heads"):
        pf.qkv_proj(_rand(2, 3, 8, device=dev), _rand(24, 8, device=dev), num_heads=0, backend=name)
    # empty batches and sequences are fine: empty results
    q, k = pf.apply_rope(_rand(0, 2, 5, 8, device=dev), None, coords[:, :1].expand(5, 1).contiguous(),
                         torch.ones(1, 4, device=dev), backend=name)
    assert q.shape == (0, 2, 5, 8) and k is None
    out = pf.qkv_proj(_rand(2, 0, 32, device=dev), _rand(96, 32, device=dev), num_heads=2, backend=name)
    assert [t.shape for t in out] == [(2, 2, 0, 16)] * 3


@pytest.mark.parametrize("embed_dim,error", [(0, ValueError), (-4, ValueError), (64.0, TypeError),
                                             (True, TypeError)])
def test_module_embed_dims(embed_dim, error):
    with pytest.raises(error, match="embed_dim"):
        pf.PyramidPosLevelEmbedding(embed_dim, [1, 2])
    with pytest.raises(error, match="embed_dim"):
        FusedSelfAttention(embed_dim, 2)


@pytest.mark.parametrize("num_heads,error", [(0, ValueError), (-2, ValueError), (2.0, TypeError)])
def test_attention_num_heads(num_heads, error):
    with pytest.raises(error, match="num_heads"):
        FusedSelfAttention(64, num_heads)


# ------------------------------------------------- 5. offsets beyond 2^31 elements

_HUGE = 1 << 30  # a stride of 2^30 elements: index 2 lands at 2^31, past int32


def _sparse_view(shape, huge_dim, dtype, device):
    """A view of ``shape`` whose dim ``huge_dim`` has stride 2^30 elements, over a
    buffer of 2^31 + a few elements of which only the viewed ones are ever written
    (the rest stays untouched virtual memory), filled with random values."""
    dense = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        dense[d] = dense[d + 1] * shape[d + 1]
    strides = [(_HUGE if d == huge_dim else dense[d]) for d in range(len(shape))]
    extent = sum(s * (n - 1) for s, n in zip(strides, shape)) + 1
    buf = torch.empty(extent, dtype=dtype, device=device)
    view = buf.as_strided(shape, strides)
    view.copy_(torch.randn(shape, device=device).to(dtype))
    return view


def test_offsets_beyond_int32_pyramid(backend):
    """Forward x and backward gradient whose batch offset b * stride(0) passes 2^31."""
    dev = backend.device
    sc = [1, 2]
    L, C, B = 5, 8, 3
    x = _sparse_view((B, L, C), 0, torch.float16, dev)
    pos, lvl = _rand(L, C, device=dev), _rand(2, C, device=dev)
    exp = pyr_ref.pyramid_pos_level_add(x.contiguous(), pos, lvl, sc)
    got = pf.pyramid_pos_level_add(x, pos, lvl, sc, backend=backend.name)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)

    grad = _sparse_view((B, L, C), 0, torch.float32, dev)
    if backend.name == "reference":
        pos_l, lvl_l = pos.clone().requires_grad_(), lvl.clone().requires_grad_()
        out = pf.pyramid_pos_level_add(x, pos_l, lvl_l, sc, backend="reference")
        dpos, dlvl = torch.autograd.grad(out, (pos_l, lvl_l), grad)
    else:  # the backward op itself, fed the strided gradient as it is
        dpos, dlvl = P._bwd_op(grad, P._flat(P.normalize_scales(sc)), 0, L, 1.0, True, torch.float32,
                               torch.float32, backend.name)
    dense = grad.double().sum(0)
    torch.testing.assert_close(dpos.double(), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dlvl.double(), torch.stack([dense[:1].sum(0), dense[1:].sum(0)]), atol=1e-5,
                               rtol=1e-5)


def test_offsets_beyond_int32_rope(backend):
    """q and its output gradient whose token offset l * stride(2) passes 2^31."""
    dev = backend.device
    D = 16
    q = _sparse_view((1, 2, 3, D), 2, torch.float16, dev).requires_grad_()
    k = _rand(1, 1, 3, D, device=dev, dtype=torch.float16)
    coords = torch.randn(3, 2, device=dev) * 3
    freqs = pf.axial_rope_freqs(D).to(dev).requires_grad_()
    exp_q, exp_k = rope_ref.apply_rope(q.detach().contiguous(), k, coords, freqs.detach())
    got_q, got_k = pf.apply_rope(q, k, coords, freqs, backend=backend.name)
    torch.testing.assert_close(got_q, exp_q, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_k, exp_k, atol=2e-3, rtol=2e-3)
    grad = _sparse_view(tuple(q.shape), 2, torch.float16, dev)
    dq, dfreqs = torch.autograd.grad(got_q, (q, freqs), grad)
    # dq: the conjugate rotation of the gradient; d freqs from fp32 math
    exp_dq = rope_ref.apply_rope(grad.contiguous(), None, -coords, freqs.detach())[0]
    q_ref = rope_ref.apply_rope(q.detach().contiguous().float(), None, coords, freqs)[0]
    exp_dfreqs = torch.autograd.grad(q_ref, freqs, grad.float())[0]
    torch.testing.assert_close(dq, exp_dq, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(dfreqs, exp_dfreqs, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        pf.apply_rope_(q, k, coords, freqs, backend=backend.name)
    torch.testing.assert_close(q.detach().contiguous(), exp_q, atol=2e-3, rtol=2e-3)


def test_offsets_beyond_int32_qkv_proj(backend):
    """x whose batch offset b * stride(0) passes 2^31."""
    dev = backend.device
    B, L, H, D = 3, 4, 1, 16
    x = _sparse_view((B, L, H * D), 0, torch.float16, dev)
    w = (_rand(3 * H * D, H * D, device=dev) / 4).half()
    coords, freqs = torch.randn(L, 2, device=dev), pf.axial_rope_freqs(D).to(dev)
    exp = pf.qkv_proj(x.contiguous().float(), w.float(), num_heads=H, qk_l2norm=True, coords=coords, freqs=freqs,
                      backend="reference")
    got = pf.qkv_proj(x, w, num_heads=H, qk_l2norm=True, coords=coords, freqs=freqs, backend=backend.name)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.float(), e, atol=4e-3, rtol=4e-3)


def test_offsets_beyond_int32_qkv_proj_backward(backend):
    """Output gradients whose batch offset b * stride(0) passes 2^31."""
    dev = backend.device
    B, L, H, D = 3, 4, 2, 16
    C = H * D
    x = _rand(B, L, C, device=dev).half().requires_grad_()
    w = (_rand(3 * C, C, device=dev) / 6).half().requires_grad_()
    coords, freqs = torch.randn(L, 2, device=dev), pf.axial_rope_freqs(D).to(dev).requires_grad_()
    kw = dict(num_heads=H, qk_l2norm=True, q_scale=torch.rand(H, device=dev) + 0.5, coords=coords, freqs=freqs)
    grads = [_sparse_view((B, H, L, D), 0, torch.float16, dev) for _ in range(3)]
    got = torch.autograd.grad(pf.qkv_proj(x, w, backend=backend.name, **kw), (x, w, freqs), grads)
    exp = torch.autograd.grad(pf.qkv_proj(x, w, backend="reference", **kw), (x, w, freqs),
                              [g.contiguous() for g in grads])
    for name, a, e in zip(("dx", "dw", "dfreqs"), got, exp):
        torch.testing.assert_close(a.float(), e.float(), atol=3e-2, rtol=3e-2, msg=name)


def test_offsets_beyond_int32_pos_embed(backend):
    """Forward x and backward gradient whose batch offset b * stride(0) passes 2^31."""
    dev = backend.device
    sc = [1, 2]
    L, C, B = 5, 8, 3
    x = _sparse_view((B, L, C), 0, torch.float16, dev)
    grid = _rand(1, C, 3, 3, device=dev)
    exp = pf.pos_embed_add(x.contiguous(), "flexvar", sc, tables=(grid,), backend="reference")
    got = pf.pos_embed_add(x, "flexvar", sc, tables=(grid,), backend=backend.name)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    exp = pf.pos_embed_add(x.contiguous(), "sincos_pyramid", sc, backend="reference")
    torch.testing.assert_close(pf.pos_embed_add(x, "sincos_pyramid", sc, backend=backend.name), exp,
                               atol=1e-5, rtol=1e-5)

    grad = _sparse_view((B, L, C), 0, torch.float32, dev)
    leaf = grid.clone().requires_grad_()
    if backend.name == "reference":
        out = pf.pos_embed_add(x, "flexvar", sc, tables=(leaf,), backend="reference")
        (dgrid,) = torch.autograd.grad(out, leaf, grad)
        dtable = dgrid.reshape(C, -1).t()
    else:  # the backward op itself, fed the strided gradient as it is
        tptr, ttok, tw = PE._sparse_map("flexvar", ((1, 1), (2, 2)), 0, (3, 3), False, torch.device(dev))[3:]
        dtable = PE._bwd_op(grad, tptr, ttok, tw, 0, torch.float32, backend.name)
    out = pf.pos_embed_add(torch.zeros(B, L, C, device=dev), "flexvar", sc, tables=(leaf,), backend="reference")
    (want,) = torch.autograd.grad(out, leaf, grad.contiguous())
    torch.testing.assert_close(dtable, want.reshape(C, -1).t(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ 6. zero q_scale

def _qkv_leaves(dev, H=2, D=16, L=6, B=2):
    C = H * D
    x = _rand(B, L, C, device=dev).requires_grad_()
    w = (_rand(3 * C, C, device=dev) / math.sqrt(C)).requires_grad_()
    b = _rand(3 * C, device=dev).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("rope", [False, True])
def test_zero_q_scale_gradients(backend, rope):
    dev = backend.device
    H, D, L = 2, 16, 6
    x, w, b = _qkv_leaves(dev, H, D, L)
    scale = torch.tensor([0.0, 1.5], device=dev)
    coords = torch.randn(L, 2, device=dev) if rope else None
    freqs = pf.axial_rope_freqs(D).to(dev).requires_grad_() if rope else None
    leaves = [t for t in (x, w, b, freqs) if t is not None]
    outs = pf.qkv_proj(x, w, b, num_heads=H, qk_l2norm=True, q_scale=scale, coords=coords, freqs=freqs,
                       backend=backend.name)
    grads = [torch.randn_like(t) for t in outs]
    got = torch.autograd.grad(outs, leaves, grads)
    ref_outs = pf.qkv_proj(x, w, b, num_heads=H, qk_l2norm=True, q_scale=scale, coords=coords, freqs=freqs,
                           backend="reference")
    exp = torch.autograd.grad(ref_outs, leaves, grads)
    for name, a, e in zip(("dx", "dw", "dbias", "dfreqs"), got, exp):
        assert torch.isfinite(a).all(), f"{name} has NaN/Inf"
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=name)


def test_zero_q_scale_that_requires_grad_is_refused(backend):
    dev = backend.device
    x, w, b = _qkv_leaves(dev)
    scale = torch.tensor([1.0, 0.0], device=dev, requires_grad=True)
    if torch.device(dev).type == "cuda":
        pytest.skip("on CUDA the check is a device-side assert, which ends the process's CUDA context")
    with pytest.raises(RuntimeError, match="q_scale requires grad and has a zero entry"):
        pf.qkv_proj(x, w, b, num_heads=2, qk_l2norm=True, q_scale=scale, backend=backend.name)
    with torch.no_grad():  # no gradient needed: accepted
        pf.qkv_proj(x, w, b, num_heads=2, qk_l2norm=True, q_scale=scale, backend=backend.name)
    nonzero = torch.tensor([1.0, 0.5], device=dev, requires_grad=True)
    pf.qkv_proj(x, w, b, num_heads=2, qk_l2norm=True, q_scale=nonzero, backend=backend.name)


# ------------------------------------------------------------ 7. double backward

def _double_backward_cases(dev, name):
    """op -> (outputs, the leaf whose first gradient is differentiated again)."""
    x = _rand(2, 5, 8, device=dev).requires_grad_()
    pos = _rand(5, 8, device=dev).requires_grad_()
    lvl = _rand(2, 8, device=dev).requires_grad_()
    q = _rand(1, 2, 5, 8, device=dev).requires_grad_()
    freqs = pf.axial_rope_freqs(8).to(dev).requires_grad_()
    coords = torch.randn(5, 2, device=dev)
    xq = _rand(2, 5, 32, device=dev).requires_grad_()
    w = (_rand(96, 32, device=dev) / 6).requires_grad_()
    grid = _rand(1, 8, 3, 3, device=dev).requires_grad_()
    return {
        "pyramid_pos_level_add": ((pf.pyramid_pos_level_add(x, pos, lvl, [1, 2], backend=name),), pos),
        "apply_rope": (pf.apply_rope(q, None, coords, freqs, backend=name)[:1], q),
        "qkv_proj": (pf.qkv_proj(xq, w, num_heads=2, qk_l2norm=True, backend=name), xq),
        "pos_embed_add": ((pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend=name),), grid),
    }


@pytest.mark.parametrize("op", ["pyramid_pos_level_add", "apply_rope", "qkv_proj", "pos_embed_add"])
def test_double_backward(backend, op):
    outs, leaf = _double_backward_cases(backend.device, backend.name)[op]
    loss = sum((t.float() ** 2).sum() for t in outs)
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    if backend.name == "reference":  # plain autograd: supported
        (gg,) = torch.autograd.grad(g.sum(), leaf)
        assert torch.isfinite(gg).all()
        return
    with pytest.raises(RuntimeError, match=rf"{op} \(backend '{backend.name}'\) does not support double backward"):
        torch.autograd.grad(g.sum(), leaf)
    # create_graph=True alone (e.g. for another part of a model) is fine
    again = torch.autograd.grad(sum((t.float() ** 2).sum() for t in outs), leaf, create_graph=True)[0]
    torch.testing.assert_close(again, g)


def test_double_backward_of_rope_with_frozen_freqs(backend):
    """Without learnable frequencies the backward is the conjugate rotation, itself
    differentiable: second derivatives match the reference's on every backend."""
    dev = backend.device
    q = _rand(2, 2, 5, 8, device=dev).requires_grad_()
    coords, freqs = torch.randn(5, 2, device=dev), pf.axial_rope_freqs(8).to(dev)
    weight = _rand(2, 2, 5, 8, device=dev)

    def second(name):
        (out,) = pf.apply_rope(q, None, coords, freqs, backend=name)[:1]
        (g,) = torch.autograd.grad((out * out * weight).sum(), q, create_graph=True)
        return torch.autograd.grad((g * weight).sum(), q)[0]

    torch.testing.assert_close(second(backend.name), second("reference"), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------- 8. python -m posenc_fast

def test_demo_checks_against_float64(capsys):
    """The demo's error column compares with float64 math, so even the reference row
    is a real check (fp32 rounding shows), not the reference against itself."""
    from posenc_fast.__main__ import main

    assert main(["--small", "--rep", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "err vs f64" in out
    rows = [line for line in out.splitlines() if line.split()[-3:-2] == ["reference"]]
    assert len(rows) == 3, out
    for row in rows:
        err = float(row.split()[-2])
        assert 0.0 < err < 1e-3, row
