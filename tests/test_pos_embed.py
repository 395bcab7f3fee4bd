"""pos_embed_add: each convention's reference vs float64 math written from its
definition (and vs re-derivations of the small upstream functions: MAE's, timm's,
DETR's, SAM's, FlexVAR's interpolation), fast backends vs the reference (forward
and backward, every dtype, odd sizes), modules and their state dicts, errors."""

import functools
import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import posenc_fast as pf
from posenc_fast.ops import pos_embed as P
from posenc_fast.reference import pos_embed as ref
from conftest import DEVICE, DTYPE_TOLERANCES, fast_backends

PYR = [1, 2, (2, 3)]        # L = 11, a non-square scale
FIXED_CASES = [              # kind, options, C
    ("mae", {}, 12),
    ("timm", {}, 12),
    ("timm", {"interleave": True}, 20),
    ("timm", {"reverse_coord": True, "temperature": 100.0}, 8),
    ("sincos_pyramid", {}, 10),     # C/2 odd
    ("sincos_pyramid", {"temperature": 500.0}, 12),
    ("sincos_1d", {}, 10),
    ("sincos_1d", {"interleave": True}, 6),
    ("detr", {}, 12),
    ("detr", {"normalize": True}, 8),
    ("detr", {"normalize": True, "scale": 1.0, "temperature": 20.0}, 12),
]


def _tokens(patch_nums):
    """[(r, c, h, w, flat index)] of the pyramid, coarse first, raster order."""
    out, flat = [], 0
    for s in patch_nums:
        h, w = (s, s) if isinstance(s, int) else s
        for r in range(h):
            for c in range(w):
                out.append((r, c, h, w, flat))
                flat += 1
    return out


def _fixed_value(kind, r, c, h, w, flat, ch, C, o, G=None):
    """One channel of one token, float64, from the definitions in the issue / upstream docs."""
    T = o.get("temperature", 10000.0)
    if kind == "mae":  # first half from the column, [sin | cos] per half, omega_i = T^(-i/(C/4))
        q = C // 4
        p = c if ch < 2 * q else r
        i = ch % q
        a = p * T ** (-i / q)
        return math.sin(a) if (ch // q) % 2 == 0 else math.cos(a)
    if kind == "timm":
        q = C // 4
        if o.get("reverse_coord"):
            t = r * w + c
            a0, a1 = t // h, t % h
        else:
            a0, a1 = r, c
        block, i = ch // q, ch % q
        f = T ** (-i / q)
        if o.get("interleave"):
            p, fn = (a0 if block < 2 else a1), (math.sin if block % 2 == 0 else math.cos)
        else:
            p, fn = (a0 if block % 2 == 0 else a1), (math.sin if block < 2 else math.cos)
        return fn(p * f)
    if kind == "sincos_pyramid":
        half = C // 2
        p, k = (r, ch) if ch < half else (c, ch - half)
        a = p * T ** (-2 * (k // 2) / half)
        return math.sin(a) if k % 2 == 0 else math.cos(a)
    if kind == "sincos_1d":
        if o.get("interleave"):
            i, fn = ch // 2, (math.sin if ch % 2 == 0 else math.cos)
        else:
            i, fn = ch % (C // 2), (math.sin if ch < C // 2 else math.cos)
        return fn(flat * T ** (-2 * i / C))
    if kind == "detr":
        npf = C // 2
        y, x = r + 1.0, c + 1.0
        if o.get("normalize"):
            s = o.get("scale", 2 * math.pi)
            y, x = y / (h + 1e-6) * s, x / (w + 1e-6) * s
        p, k = (y, ch) if ch < npf else (x, ch - npf)
        a = p / T ** (2 * (k // 2) / npf)
        return math.sin(a) if k % 2 == 0 else math.cos(a)
    assert kind == "sam"
    x, y = 2 * (c + 0.5) / w - 1, 2 * (r + 0.5) / h - 1
    j = ch % (C // 2)
    a = 2 * math.pi * (x * float(G[0, j]) + y * float(G[1, j]))
    return math.sin(a) if ch < C // 2 else math.cos(a)


def _fixed_oracle(kind, patch_nums, C, o, prefix=0, G=None):
    rows = [[0.0] * C for _ in range(prefix)]
    for r, c, h, w, flat in _tokens(patch_nums):
        rows.append([_fixed_value(kind, r, c, h, w, flat, ch, C, o, G) for ch in range(C)])
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------ reference vs definitions

@pytest.mark.parametrize("kind,opts,C", FIXED_CASES)
@pytest.mark.parametrize("prefix", [0, 1])
def test_fixed_reference_matches_definition(kind, opts, C, prefix):
    got = pf.pos_embed_table(kind, PYR, C, num_prefix_tokens=prefix, dtype=torch.float64, **opts)
    torch.testing.assert_close(got, _fixed_oracle(kind, PYR, C, opts, prefix), atol=1e-12, rtol=0)


def test_sam_reference_matches_definition():
    G = torch.randn(2, 5)
    got = pf.pos_embed_table("sam", PYR, 10, gaussian=G, dtype=torch.float64)
    torch.testing.assert_close(got, _fixed_oracle("sam", PYR, 10, {}, G=G), atol=1e-12, rtol=0)


def test_mae_matches_upstream_style_derivation():
    """MAE's get_2d_sincos_pos_embed, re-derived: meshgrid(w, h) puts the column first;
    each half is [sin | cos] of pos * 1/10000^(i / (D/4)); a zero class row."""
    C, n = 16, 5

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    gw, gh = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="xy")
    want = torch.cat([one_axis(C // 2, gw), one_axis(C // 2, gh)], dim=1)
    want = torch.cat([torch.zeros(1, C, dtype=torch.float64), want])
    got = pf.pos_embed_table("mae", [n], C, num_prefix_tokens=1, dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(3, 5), (4, 4)])
@pytest.mark.parametrize("reverse,interleave", [(False, False), (True, False), (False, True), (True, True)])
def test_timm_matches_upstream_style_derivation(shape, reverse, interleave):
    """timm's build_sincos2d_pos_embed, re-derived: ij grid over feat_shape (reversed
    with reverse_coord), flattened; sin/cos stacked on dim 1 (blocks) or 2 (per axis)."""
    C = 12
    pos_dim = C // 4
    bands = 1.0 / 10000.0 ** (torch.arange(pos_dim, dtype=torch.float64) / pos_dim)
    fs = shape[::-1] if reverse else shape
    grid = torch.stack(torch.meshgrid([torch.arange(s, dtype=torch.float64) for s in fs], indexing="ij"))
    grid = grid.flatten(1).transpose(0, 1)
    pos2 = grid[..., None] * bands[None]
    want = torch.stack([pos2.sin(), pos2.cos()], dim=2 if interleave else 1).flatten(1)
    got = pf.pos_embed_table("timm", [shape], C, reverse_coord=reverse, interleave=interleave,
                             dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_detr_matches_upstream_style_derivation(normalize):
    """DETR's PositionEmbeddingSine, re-derived: cumsum of the not-mask, optional
    normalisation by the last value (+1e-6) * 2 pi, dim_t = T^(2 (k // 2) / npf),
    sin of even / cos of odd channels stacked and flattened, y half first."""
    npf, B, H, W = 6, 3, 4, 5
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 3:] = True
    mask[2, :, 2:] = True
    nm = (~mask).to(torch.float64)
    y, x = nm.cumsum(1), nm.cumsum(2)
    if normalize:
        y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
        x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(npf, dtype=torch.float64)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    want = torch.cat((py, px), dim=3).flatten(1, 2)  # (B, H W, C)
    got = pf.pos_embed_table("detr", [(H, W)], 2 * npf, mask=mask, normalize=normalize, dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # an all-valid mask is the unmasked table
    free = pf.pos_embed_table("detr", [(H, W)], 2 * npf, mask=torch.zeros(1, H, W, dtype=torch.bool),
                              normalize=normalize, dtype=torch.float64)
    torch.testing.assert_close(free[0], pf.pos_embed_table("detr", [(H, W)], 2 * npf, normalize=normalize,
                                                           dtype=torch.float64), atol=1e-12, rtol=0)


def test_sam_matches_upstream_style_derivation():
    """SAM's PositionEmbeddingRandom.forward(size), re-derived: cumsum - 0.5 over the
    size, 2 u - 1, @ G, * 2 pi, [sin | cos] with x first; channels-last, raster order."""
    h, w, npf = 3, 5, 4
    G = torch.randn(2, npf, dtype=torch.float64)
    ones = torch.ones(h, w, dtype=torch.float64)
    ye, xe = (ones.cumsum(0) - 0.5) / h, (ones.cumsum(1) - 0.5) / w
    coords = 2 * torch.stack([xe, ye], dim=-1) - 1
    a = 2 * math.pi * (coords @ G)
    want = torch.cat([a.sin(), a.cos()], dim=-1).reshape(h * w, 2 * npf)
    got = pf.pos_embed_table("sam", [(h, w)], 2 * npf, gaussian=G, dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_flexvar_matches_area_interpolation_and_init():
    """The table per scale is F.interpolate(grid, (h, w), mode='area') flattened
    (checked against explicit window averages), and the module's init is FlexVAR's."""
    C, G = 6, 7
    grid = torch.randn(1, C, G, G, dtype=torch.float64)
    got = pf.pos_embed_table("flexvar", [1, 2, (3, 5), 9], C, tables=(grid,))
    rows = []
    for h, w in [(1, 1), (2, 2), (3, 5), (9, 9)]:
        for r in range(h):
            for c in range(w):
                y0, y1 = (r * G) // h, -(-((r + 1) * G) // h)
                x0, x1 = (c * G) // w, -(-((c + 1) * G) // w)
                rows.append(grid[0, :, y0:y1, x0:x1].mean(dim=(1, 2)))
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-12, rtol=0)
    init = pf.FlexVARPosEmbedding(8, [1, 2]).pos_1LC
    assert init.shape == (1, 8, 32, 32)
    for ch in range(8):
        d = math.exp(2 * (ch // 2) * -(math.log(10000.0) / 8))
        for r, c in [(0, 0), (3, 7), (31, 2)]:
            want = math.sin(r * d) if ch % 2 == 0 else math.cos(c * d)
            assert abs(init[0, ch, r, c].item() - want) < 1e-5


@pytest.mark.parametrize("kind,fractional", [("navit", False), ("navit", True), ("pix2struct", False)])
def test_factorized_reference_matches_definition(kind, fractional):
    C = 5
    rows_t, cols_t = torch.randn(7, C, dtype=torch.float64), torch.randn(6, C, dtype=torch.float64)
    kw = {"fractional": True} if fractional else {}
    got = pf.pos_embed_table(kind, PYR, C, tables=(rows_t, cols_t), **kw)
    want = []
    for r, c, h, w, _ in _tokens(PYR):
        if kind == "pix2struct":
            ri, ci = r + 1, c + 1
        elif fractional:  # floor(r / h * max_len), exactly
            ri, ci = math.floor(r * 7 / h), math.floor(c * 6 / w)
        else:
            ri, ci = r, c
        want.append(rows_t[ri] + cols_t[ci])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-12, rtol=0)


def test_fractional_indices_equal_the_float_formula():
    """floor(r * max_len / h) in integers == the fp32 floor(r / h * max_len) that float
    NaViT implementations compute, for the sides and table lengths in use."""
    for max_len in (16, 32, 64):
        table = torch.arange(max_len, dtype=torch.float32)[:, None]
        for h in range(1, 65):
            got = pf.pos_embed_table("navit", [(h, 1)], 1, tables=(table, torch.zeros(1, 1)), fractional=True)
            want = (torch.arange(h, dtype=torch.float32) / h * max_len).floor()
            assert torch.equal(got[:, 0], want), (max_len, h)


def test_reference_add_window_and_gradcheck():
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    grid = torch.randn(1, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    out = ref.pos_embed_add(x, "flexvar", PYR, start=3, tables=(grid,))
    table = pf.pos_embed_table("flexvar", PYR, 6, tables=(grid,))
    torch.testing.assert_close(out, x + table[3:10])
    torch.autograd.gradcheck(lambda a, g: ref.pos_embed_add(a, "flexvar", PYR, start=3, tables=(g,)), (x, grid))


# ------------------------------------------------------ fast backends vs reference

def _x(B, n, C, dtype, strided):
    if strided:  # transposed batch/token layout, channel stride 2
        return torch.randn(n, B, 2 * C, device=DEVICE).to(dtype)[..., ::2].transpose(0, 1)
    return torch.randn(B, n, C, device=DEVICE).to(dtype)


def _check_forward(backend, kind, C, kw, dtype, start, prefix, strided, B=3):
    total = prefix + sum((s * s if isinstance(s, int) else s[0] * s[1]) for s in PYR)
    n = total - start - 1
    x = _x(B, n, C, dtype, strided)
    got = pf.pos_embed_add(x, kind, PYR, start=start, num_prefix_tokens=prefix, backend=backend, **kw)
    want = pf.pos_embed_add(x, kind, PYR, start=start, num_prefix_tokens=prefix, backend="reference", **kw)
    _, atol, rtol = next(t for t in DTYPE_TOLERANCES if t[0] == dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("kind,opts,C", FIXED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fixed_fast_matches_reference(backend, kind, opts, C, dtype):
    _check_forward(backend, kind, C, opts, dtype, start=2, prefix=1, strided=dtype == torch.bfloat16)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sam_fast_matches_reference(backend, dtype):
    G = torch.randn(2, 7, device=DEVICE) * 3
    _check_forward(backend, "sam", 14, {"gaussian": G}, dtype, start=1, prefix=0, strided=False)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("normalize", [False, True])
def test_detr_mask_fast_matches_reference(backend, normalize):
    mask = torch.zeros(3, 4, 5, dtype=torch.bool, device=DEVICE)
    mask[0, 3:] = True
    mask[2, :, 1:] = True
    x = torch.randn(3, 19, 12, device=DEVICE)
    kw = dict(mask=mask, normalize=normalize, num_prefix_tokens=2, start=3)
    got = pf.pos_embed_add(x, "detr", [(4, 5)], backend=backend, **kw)
    want = pf.pos_embed_add(x, "detr", [(4, 5)], backend="reference", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


LEARNED_CASES = [  # kind, table shapes, options
    ("flexvar", [(1, 12, 8, 8)], {}),
    ("flexvar", [(7, 5, 6)], {}),          # (C, Gh, Gw), C odd, upsampled rows (h > Gh)
    ("navit", [(4, 6), (3, 6)], {}),
    ("navit", [(5, 9), (2, 9)], {"fractional": True}),
    ("pix2struct", [(6, 10), (5, 10)], {}),
]


def _learned(shapes, dtype, table_dtype):
    return [torch.randn(*s, device=DEVICE).to(table_dtype or dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("kind,shapes,opts", LEARNED_CASES)
@pytest.mark.parametrize("dtype,table_dtype", [(torch.float32, None), (torch.float16, None),
                                               (torch.bfloat16, None), (torch.bfloat16, torch.float32)])
def test_learned_fast_matches_reference_fwd_bwd(backend, kind, shapes, opts, dtype, table_dtype):
    C = shapes[0][-3] if kind == "flexvar" else shapes[0][1]
    pyr = [1, 2, (2, 3)] if kind != "flexvar" or len(shapes[0]) == 4 else [1, (2, 3), (7, 4)]
    total = sum((s * s if isinstance(s, int) else s[0] * s[1]) for s in pyr)
    start, n = 2, total - 3
    tabs = _learned(shapes, dtype, table_dtype)
    x = _x(3, n, C, dtype, strided=dtype == torch.float16).detach().requires_grad_()
    out = pf.pos_embed_add(x, kind, pyr, start=start, tables=tuple(tabs), backend=backend, **opts)
    grad = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    got = torch.autograd.grad(out, [x] + tabs, grad)
    rtabs = [t.detach().double().requires_grad_() for t in tabs]
    rx = x.detach().double().requires_grad_()
    rout = ref.pos_embed_add(rx, kind, pyr, start=start, tables=tuple(rtabs), **opts)
    want = torch.autograd.grad(rout, [rx] + rtabs, grad.double())
    _, atol, rtol = next(t for t in DTYPE_TOLERANCES if t[0] == out.dtype)
    assert out.dtype == pf.pos_embed_add(x, kind, pyr, start=start, tables=tuple(tabs), backend="reference",
                                         **opts).dtype
    torch.testing.assert_close(out.double(), rout.detach(), atol=atol, rtol=rtol)
    for name, a, e, leaf in zip(["dx"] + [f"d{i}" for i in range(len(tabs))], got, want, [x] + tabs):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        _, atol, rtol = next(t for t in DTYPE_TOLERANCES if t[0] == leaf.dtype)
        # a table row sums up to B * tokens gradients: scale the tolerance with the magnitude
        torch.testing.assert_close(a.double(), e, atol=4 * atol * max(1.0, e.abs().max().item() / 4), rtol=rtol,
                                   msg=name)
    again = torch.autograd.grad(pf.pos_embed_add(x, kind, pyr, start=start, tables=tuple(tabs), backend=backend,
                                                 **opts), tabs, grad)
    for a, b in zip(got[1:], again):
        assert torch.equal(a, b), "the table gradient is not bitwise reproducible"


# FlexVAR's grid is read by the kernels as given (no copy, view or cache of it).
VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
GRID_CASES = [  # C, (Gh, Gw), scales, prefix, start, tokens left off the end, grid layout
    (13, (8, 8), [1, 2, (3, 5), 9], 1, 0, 0, "channels_last"),  # C odd, upsampled rows (9 > 8), a prefix token
    (10, (6, 40), [(1, 20), (2, 40)], 0, 3, 5, "cell_stride"),  # rows wider than a chunk, Gw past a pass
    (12, (5, 6), [1, 2, (2, 3)], 2, 1, 1, "3d"),
    (16, (16, 16), [1, 4, 7], 0, 2, 0, "transposed"),
    (20, (8, 16), [1, 3, (5, 9)], 0, 0, 0, "offset"),    # storage offset: no aligned vector loads
]


def _grid_in_layout(g, layout):
    """g (1, C, Gh, Gw) with the same values in another memory layout."""
    if layout == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    if layout == "3d":
        return g[0]
    if layout == "cell_stride":
        wide = torch.zeros(*g.shape[:-1], 2 * g.shape[-1], dtype=g.dtype, device=g.device)
        wide[..., ::2] = g
        return wide[..., ::2]
    if layout == "transposed":
        return g.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "offset":
        flat = torch.zeros(g.numel() + 1, dtype=g.dtype, device=g.device)
        flat[1:] = g.flatten()
        return flat[1:].view(g.shape)
    return g


GRID_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("C,hw,scales,prefix,start,trim,layout", GRID_CASES)
@pytest.mark.parametrize("dtype,grid_dtype", GRID_DTYPES)
def test_flexvar_grid_layouts_fwd_bwd(backend, C, hw, scales, prefix, start, trim, layout, dtype, grid_dtype):
    _check_flexvar_grid(backend, C, hw, scales, prefix, start, trim, layout, dtype, grid_dtype)


@pytest.mark.parametrize("backend", fast_backends())
def test_flexvar_var_grid_fwd_bwd(backend):
    """FlexVAR's 32 x 32 grid on VAR's pyramid: a scale-1 token averages all 1024
    cells (one dtype pair: 9 s in the interpreter)."""
    _check_flexvar_grid(backend, 24, (32, 32), VAR_PN, 0, 0, 0, "contig", torch.bfloat16, torch.float32)


def _check_flexvar_grid(backend, C, hw, scales, prefix, start, trim, layout, dtype, grid_dtype):
    """Forward and backward (x and grid) against the float64 reference."""
    torch.manual_seed(C)
    grid = _grid_in_layout(torch.randn(1, C, *hw, device=DEVICE).to(grid_dtype), layout).requires_grad_()
    total = prefix + sum((s * s if isinstance(s, int) else s[0] * s[1]) for s in scales)
    x = torch.randn(2, total - start - trim, C, device=DEVICE).to(dtype).requires_grad_()
    kw = dict(start=start, num_prefix_tokens=prefix)
    out = pf.pos_embed_add(x, "flexvar", scales, tables=(grid,), backend=backend, **kw)
    gout = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    dx, dgrid = torch.autograd.grad(out, [x, grid], gout)
    rx, rgrid = x.detach().double().requires_grad_(), grid.detach().double().requires_grad_()
    rout = ref.pos_embed_add(rx, "flexvar", scales, tables=(rgrid,), **kw)
    want_dx, want_dgrid = torch.autograd.grad(rout, [rx, rgrid], gout.double())
    _, atol, rtol = next(t for t in DTYPE_TOLERANCES if t[0] == out.dtype)
    assert out.dtype == torch.promote_types(dtype, grid_dtype)
    torch.testing.assert_close(out.double(), rout.detach(), atol=atol, rtol=rtol)
    _, atol, rtol = next(t for t in DTYPE_TOLERANCES if t[0] == dtype)
    torch.testing.assert_close(dx.double(), want_dx, atol=atol, rtol=rtol)
    assert dgrid.shape == grid.shape and dgrid.dtype == grid.dtype
    _, atol, rtol = next(t for t in DTYPE_TOLERANCES if t[0] == grid_dtype)
    # a grid cell sums up to B * tokens gradients: scale the tolerance with the magnitude
    torch.testing.assert_close(dgrid.double(), want_dgrid, atol=4 * atol * max(1.0, want_dgrid.abs().max().item() / 4),
                               rtol=rtol)


@pytest.mark.parametrize("backend", fast_backends())
def test_flexvar_sees_in_place_grid_updates(backend):
    """Nothing of the grid is kept between calls: an optimizer step, a write under
    no_grad and one through .data (which bypasses the version counter) each show in
    the next call, on the autograd and the no-grad paths."""
    grid = torch.nn.Parameter(torch.randn(1, 16, 8, 8, device=DEVICE))
    x = torch.randn(2, 14, 16, device=DEVICE)
    opt = torch.optim.SGD([grid], lr=0.5)

    def call():
        got = pf.pos_embed_add(x, "flexvar", [1, 2, 3], tables=(grid,), backend=backend)
        want = pf.pos_embed_add(x, "flexvar", [1, 2, 3], tables=(grid,), backend="reference")
        torch.testing.assert_close(got, want)
        with torch.no_grad():
            torch.testing.assert_close(pf.pos_embed_add(x, "flexvar", [1, 2, 3], tables=(grid,), backend=backend),
                                       want)
        return got

    before = call()
    before.square().sum().backward()
    opt.step()
    after = call()
    assert not torch.equal(before, after)
    with torch.no_grad():
        grid.mul_(-2.0)
    scaled = call()
    assert not torch.equal(after, scaled)
    version = grid._version
    grid.data.add_(3.0)  # no version bump: a cache keyed on _version would miss it
    assert grid._version == version
    assert not torch.equal(scaled, call())


@pytest.mark.parametrize("scales,prefix,start,n,hw", [
    (tuple((s, s) for s in VAR_PN), 0, 0, 680, (32, 32)),
    (((1, 20), (2, 40)), 1, 3, 90, (6, 40)),
    (((3, 5), (9, 9)), 2, 0, 98, (8, 12)),    # Gw not a multiple of 8, upsampled scale
    (((4, 4), (5, 7)), 0, 6, 20, (8, 8)),     # a window starting and ending mid-row
])
def test_grid_chunks_cover_the_window(scales, prefix, start, n, hw):
    """Every window token is in exactly one chunk, in order, at most _GRID_CHUNK_TOKENS
    of one token row, with its row's grid rows and a cell range holding its columns'
    area windows (aligned to 8 cells when Gw is a multiple of 8)."""
    chunks = P._grid_chunks(scales, prefix, start, n, hw, torch.device("cpu")).tolist()
    tokens = [(None, None)] * prefix
    for h, w in scales:
        rows, cols = P._area_windows(h, hw[0]), P._area_windows(w, hw[1])
        tokens += [(rows[r], cols[c], c, w) for r in range(h) for c in range(w)]
    t = 0
    for t0, cnt, y0, y1, xa, xb, j0, w in chunks:
        assert t0 == t and 0 < cnt <= P._GRID_CHUNK_TOKENS
        for k in range(cnt):
            tok = tokens[start + t0 + k]
            if tok[0] is None:
                assert (y0, y1, xa, xb) == (0, 0, 0, 0)
                continue
            (ty0, ty1), (tx0, tx1), col, width = tok
            assert (ty0, ty1, col, width) == (y0, y1, j0 + k, w)
            assert xa <= tx0 and tx1 <= xb <= hw[1]
        if hw[1] % 8 == 0:
            assert xa % 8 == 0 and xb % 8 == 0
        t += cnt
    assert t == n


def test_triton_grid_chunk_slots_match_the_chunks():
    pytest.importorskip("triton")
    from posenc_fast.triton_kernels import pos_embed_add as tk

    assert tk._GRID_BLOCK_T == P._GRID_CHUNK_TOKENS


@pytest.mark.parametrize("backend", fast_backends())
def test_learned_table_only_and_no_grad(backend):
    grid = torch.randn(1, 4, 3, 3, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 5, 4, device=DEVICE)
    out = pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend=backend)
    (g,) = torch.autograd.grad(out.sum(), [grid])
    want = torch.autograd.grad(pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend="reference").sum(),
                               [grid])[0]
    torch.testing.assert_close(g, want)
    with torch.no_grad():
        torch.testing.assert_close(pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend=backend),
                                   out.detach())


@pytest.mark.parametrize("backend", fast_backends())
def test_custom_op_traces(backend):
    """The custom op path (what torch.compile / make_fx see): fake tensors and autograd."""
    grid = torch.randn(1, 4, 3, 3, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    tptr, ttok, tw = P._sparse_map("flexvar", ((1, 1), (2, 2)), 0, (3, 3), False, x.device)[3:]
    chunks = P._grid_chunks(((1, 1), (2, 2)), 0, 0, 5, (3, 3), x.device)
    args = (x, grid, chunks, None, None, tptr, ttok, tw, None, None, 0, 1.0, backend)
    torch.library.opcheck(P._fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                       "test_autograd_registration"))
    out = P._fwd_op(*args)
    gx, gg = torch.autograd.grad(out.sum(), [x, grid])
    torch.testing.assert_close(gx, torch.ones_like(x))
    want = torch.autograd.grad(pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend="reference").sum(),
                               [grid])[0]
    torch.testing.assert_close(gg, want)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("grad", [False, True])
def test_eager_calls_bypass_the_custom_op(backend, grad, monkeypatch):
    grid = torch.randn(1, 6, 4, 4, device=DEVICE, requires_grad=grad)
    x = torch.randn(2, 5, 6, device=DEVICE)
    want = pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend="reference")

    def boom(*a, **k):
        raise AssertionError("the eager fast path went through the torch.library custom op")

    monkeypatch.setattr(P, "_fwd_op", boom)
    got = pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend=backend)
    torch.testing.assert_close(got, want)
    assert got.requires_grad == grad
    if grad:
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), grid)[0],
                                   torch.autograd.grad(want.square().sum(), grid)[0])


@pytest.mark.parametrize("backend", fast_backends())
def test_tracing_sees_the_custom_op(backend):
    x = torch.randn(2, 5, 8, device=DEVICE)
    gm = make_fx(lambda a: pf.pos_embed_add(a, "mae", [1, 2], backend=backend))(x)
    assert "posenc_fast.pos_embed_add.default" in {str(n.target) for n in gm.graph.nodes}
    torch.testing.assert_close(gm(x), pf.pos_embed_add(x, "mae", [1, 2], backend="reference"))


@pytest.mark.parametrize("backend", fast_backends())
def test_double_backward_is_refused(backend):
    grid = torch.randn(1, 4, 3, 3, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 5, 4, device=DEVICE)
    out = pf.pos_embed_add(x, "flexvar", [1, 2], tables=(grid,), backend=backend)
    (g,) = torch.autograd.grad(out.square().sum(), grid, create_graph=True)
    with pytest.raises(RuntimeError, match="pos_embed_add .* does not support double backward"):
        g.sum().backward()


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("B,n", [(0, 5), (2, 0)])
def test_degenerate_sizes(backend, B, n):
    grid = torch.randn(1, 4, 3, 3, device=DEVICE, requires_grad=True)
    x = torch.randn(B, n, 4, device=DEVICE)
    out = pf.pos_embed_add(x, "flexvar", [1, 2], start=5 - n, tables=(grid,), backend=backend)
    assert out.shape == (B, n, 4)
    (g,) = torch.autograd.grad(out, grid, torch.ones_like(out))
    assert torch.equal(g, torch.zeros_like(grid))
    assert pf.pos_embed_add(x, "sincos_pyramid", [1, 2], start=5 - n, backend=backend).shape == (B, n, 4)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sampling_calls_dispatch_only_their_output_allocation(backend, monkeypatch):
    """Host-overhead guard (launches stubbed, both backends on CPU): a fixed kind and
    FlexVAR (its grid read as given: no views) allocate their output and launch."""
    pytest.importorskip("triton")
    from launch_stubs import stubbed_device_work
    from test_fast_path import _aten_ops

    monkeypatch.setattr(pf._checks, "_POISON", False)
    x = torch.randn(4, 14, 64)
    grid = torch.randn(1, 64, 8, 8)
    with torch.no_grad(), stubbed_device_work():
        for kind in ("mae", "sincos_pyramid", "detr"):
            ops = _aten_ops(lambda: pf.pos_embed_add(x, kind, [1, 2, 3], backend=backend))
            assert ops == ["aten::empty_like"], (kind, ops)
        ops = _aten_ops(lambda: pf.pos_embed_add(x, "flexvar", [1, 2, 3], tables=(grid,), backend=backend))
        assert ops == ["aten::empty_like"], ops


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("kind", ["flexvar", "navit", "sam", "detr-mask", "mae"])
def test_torch_compile_fullgraph(backend, kind):
    """The custom op traces without graph breaks, forward and backward."""
    torch._dynamo.reset()
    C = 8
    x = torch.randn(2, 9, C, device=DEVICE, requires_grad=True)
    leaves, kw = [x], {}
    if kind == "flexvar":
        kw["tables"] = (torch.randn(1, C, 4, 4, device=DEVICE, requires_grad=True),)
    elif kind == "navit":
        kw["tables"] = (torch.randn(3, C, device=DEVICE, requires_grad=True),
                        torch.randn(3, C, device=DEVICE, requires_grad=True))
    elif kind == "sam":
        kw["gaussian"] = torch.randn(2, C // 2, device=DEVICE)
    elif kind == "detr-mask":
        kw["mask"] = torch.zeros(2, 3, 3, dtype=torch.bool, device=DEVICE)
        kw["mask"][1, 2] = True
        kw["normalize"] = True
    leaves += list(kw.get("tables", ()))
    pn = [3] if kind == "detr-mask" else [1, 2, 2]

    def f(x, **kw):
        return pf.pos_embed_add(x, kind.split("-")[0], pn, backend=backend, **kw) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, **kw)
    want = f(x, **kw)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_flexvar_var_shape_inductor_and_graphs(backend):
    from conftest import capture_and_replay

    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    x = torch.randn(8, 680, 1024, device="cuda", dtype=torch.bfloat16)
    grid = torch.randn(1, 1024, 32, 32, device="cuda", requires_grad=True)
    want = pf.pos_embed_add(x, "flexvar", pn, tables=(grid,), backend="reference")
    torch._dynamo.reset()
    f = torch.compile(lambda x, g: pf.pos_embed_add(x, "flexvar", pn, tables=(g,), backend=backend),
                      fullgraph=True)
    torch.testing.assert_close(f(x, grid), want, atol=1.6e-2, rtol=1.6e-2)
    dy = torch.randn_like(want)

    def step():
        out = pf.pos_embed_add(x, "flexvar", pn, tables=(grid,), backend=backend)
        return (out,) + torch.autograd.grad(out, grid, dy)

    def refresh():  # the grid too: the replay reads it as it is now (nothing of it is cached)
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
        grid.data.copy_(torch.randn_like(grid))

    static, fresh = capture_and_replay(step, refresh)
    for a, b in zip(static, fresh):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ modules

def test_modules_state_dict_layouts_load():
    flex = pf.FlexVARPosEmbedding(16, [1, 2, 4])
    assert {k: tuple(v.shape) for k, v in flex.state_dict().items()} == {"pos_1LC": (1, 16, 32, 32)}
    navit = pf.NaViTPosEmbedding(16, 8, 6)
    assert {k: tuple(v.shape) for k, v in navit.state_dict().items()} == {
        "pos_embed_height": (8, 16), "pos_embed_width": (6, 16)}
    p2s = pf.Pix2StructPosEmbedding(16, seq_len=10)
    assert {k: tuple(v.shape) for k, v in p2s.state_dict().items()} == {
        "row_embedder.weight": (10, 16), "column_embedder.weight": (10, 16)}
    sam = pf.SAMPositionEmbeddingRandom(8)
    assert {k: tuple(v.shape) for k, v in sam.state_dict().items()} == {
        "positional_encoding_gaussian_matrix": (2, 8)}
    mae = pf.SinCosPosEmbedding(16, [4], "mae", num_prefix_tokens=1, keep_table=True)
    assert tuple(mae.pos_embed.shape) == (1, 17, 16) and not mae.pos_embed.requires_grad
    assert pf.DETRPositionEmbeddingSine(8).state_dict() == {}
    # an upstream-style state dict loads as it is (strict)
    for module in (flex, navit, p2s, sam, mae):
        sd = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
        module.load_state_dict(sd)
        for k, v in module.state_dict().items():
            assert torch.equal(v, sd[k])


def test_modules_forward_match_functional():
    x = torch.randn(2, 14, 16)
    flex = pf.FlexVARPosEmbedding(16, [1, 2, 3])
    torch.testing.assert_close(flex(x), x + flex.table())
    navit = pf.NaViTPosEmbedding(16, 4, 4, fractional=True)
    torch.testing.assert_close(navit(x[:, :12], [(3, 4)]), x[:, :12] + navit.table([(3, 4)]))
    p2s = pf.Pix2StructPosEmbedding(16, seq_len=5)
    torch.testing.assert_close(p2s(x[:, :12], [(3, 4)]), x[:, :12] + p2s.table([(3, 4)]))
    sam = pf.SAMPositionEmbeddingRandom(8, scale=2.0)
    torch.testing.assert_close(sam(x, [1, 2, 3]), x + sam.table([1, 2, 3]))
    mae = pf.SinCosPosEmbedding(16, [3], "mae", num_prefix_tokens=1, keep_table=True)
    torch.testing.assert_close(mae(x[:, :10]), x[:, :10] + mae.pos_embed[0])
    detr = pf.DETRPositionEmbeddingSine(8, normalize=True)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True
    torch.testing.assert_close(detr(x[:, :12], (3, 4), mask), x[:, :12] + detr.table((3, 4), mask))
    timm = pf.SinCosPosEmbedding(16, [(2, 3)], "timm", interleave=True)
    torch.testing.assert_close(timm(x[:, :6]), x[:, :6] + timm.table())


def test_flexvar_module_grads_reach_grid():
    flex = pf.FlexVARPosEmbedding(8, [1, 2], grid_size=4)
    x = torch.randn(2, 5, 8)
    flex(x).sum().backward()
    # every cell is averaged into the 1x1 scale and one 2x2 cell: 2 * (1/16 + 1/4)
    torch.testing.assert_close(flex.pos_1LC.grad, torch.full_like(flex.pos_1LC, 2 * (1 / 16 + 1 / 4)))


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("call,exc,match", [
    (lambda x: pf.pos_embed_add(x, "nope", [2]), ValueError, "kind must be one of"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], interleave=True), ValueError, "interleave applies to"),
    (lambda x: pf.pos_embed_add(x[..., :6], "mae", [2]), ValueError, "divisible by 4"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], tables=(x,)), ValueError, "no tables"),
    (lambda x: pf.pos_embed_add(x, "navit", [2], tables=(torch.randn(2, 8),)), ValueError, "row_table, col_table"),
    (lambda x: pf.pos_embed_add(x, "navit", [3], tables=(torch.randn(2, 8), torch.randn(3, 8))), ValueError,
     "row_table has 2 rows"),
    (lambda x: pf.pos_embed_add(x, "pix2struct", [2], tables=(torch.randn(3, 8), torch.randn(2, 8))), ValueError,
     "1-based"),
    (lambda x: pf.pos_embed_add(x, "flexvar", [2], tables=(torch.randn(2, 8, 4, 4),)), ValueError, "grid must"),
    (lambda x: pf.pos_embed_add(x, "flexvar", [(1, 2 ** 16)], tables=(torch.zeros(1, 8, 1, 1).expand(1, 8, 1, 32768),)),
     ValueError, "below 2"),
    (lambda x: pf.pos_embed_add(x, "flexvar", [2], tables=(torch.randn(1, 6, 4, 4),)), ValueError, "channels"),
    (lambda x: pf.pos_embed_add(x, "flexvar", [2], tables=torch.randn(1, 8, 4, 4)), TypeError, "tuple"),
    (lambda x: pf.pos_embed_add(x, "sam", [2]), TypeError, "gaussian"),
    (lambda x: pf.pos_embed_add(x, "sam", [2], gaussian=torch.randn(2, 3)), ValueError, r"\(2, C/2\)"),
    (lambda x: pf.pos_embed_add(x, "detr", [2], gaussian=torch.randn(2, 4)), ValueError, "gaussian applies"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], mask=torch.zeros(2, 2, 2, dtype=torch.bool)), ValueError,
     "mask applies"),
    (lambda x: pf.pos_embed_add(x, "detr", [1, 2], mask=torch.zeros(2, 2, 2, dtype=torch.bool)), ValueError,
     "one scale"),
    (lambda x: pf.pos_embed_add(x, "detr", [2], mask=torch.zeros(3, 2, 2, dtype=torch.bool)), ValueError,
     "mask has 3 images"),
    (lambda x: pf.pos_embed_add(x, "detr", [2], mask=torch.zeros(2, 2, 2)), TypeError, "mask must have dtype"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], start=1), ValueError, "window"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], temperature=0.0), ValueError, "temperature"),
    (lambda x: pf.pos_embed_add(x, "timm", [2], interleave=1), TypeError, "interleave must be a bool"),
    (lambda x: pf.pos_embed_add(x[0], "mae", [2]), ValueError, "x must have 3 dimensions"),
    (lambda x: pf.pos_embed_add(x, "mae", [2], backend="gpu"), ValueError, "backend"),
])
def test_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 4, 8))


def test_gaussian_requiring_grad_is_refused():
    with pytest.raises(ValueError, match="gaussian requires grad"):
        pf.pos_embed_add(torch.randn(1, 4, 8), "sam", [2], gaussian=torch.randn(2, 4, requires_grad=True))


def test_detr_module_scale_without_normalize():
    with pytest.raises(ValueError, match="normalize should be True"):
        pf.DETRPositionEmbeddingSine(8, scale=3.0)


class _GridRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the grid."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(tuple(grid))


@pytest.mark.parametrize("kind,B,C", [("flexvar", 64, 1024), ("flexvar", 32, 1920), ("navit", 64, 1024),
                                      ("sincos_pyramid", 64, 1024)])
def test_triton_forward_grid_fills_whole_waves_at_spec_shapes(monkeypatch, kind, B, C):
    """The forward launcher slices the batch as the pyramid forward does
    (_launch.batch_per_program): whole waves of the programs an H100 holds, the
    tables re-read by at most 1 + B / 10 slices (FlexVAR's grid: slices re-reading at
    most about 5% of x's bytes). (tools/kernel_report.py checks the programs per SM
    against the compiled kernel.)"""
    pytest.importorskip("triton")
    from posenc_fast.triton_kernels import _launch, pos_embed_add as tk

    rec = _GridRecorder()
    monkeypatch.setattr(tk, "_fwd_kernel", rec)
    monkeypatch.setattr(tk, "_grid_fwd_kernel", rec)
    monkeypatch.setattr(tk, "num_sms", lambda device: 132)
    # grids are cached per shape: none computed for another SM count may answer
    monkeypatch.setattr(tk, "_fwd_config", functools.lru_cache(tk._fwd_config.__wrapped__))
    monkeypatch.setattr(tk, "_grid_config", functools.lru_cache(tk._grid_config.__wrapped__))
    monkeypatch.setattr(pf._checks, "_POISON", False)
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    scales = tuple((s, s) for s in pn)
    x = torch.empty(B, sum(s * s for s in pn), C, dtype=torch.bfloat16)
    tables = {"flexvar": (torch.empty(1, C, 32, 32, dtype=torch.bfloat16),),
              "navit": (torch.empty(16, C, dtype=torch.bfloat16),) * 2}.get(kind, ())
    opts = P._opts(10000.0, False, False, False, P._TWO_PI, False)
    rows = P._validate(x, kind, scales, 0, tables, None, None, 0, opts)[2]
    static = P._static_inputs(kind, scales, rows, 0, opts, False, C, 0, x.shape[1], x.device)
    P._forward(*P._op_args(kind, x, tables, None, None, 0, 0, opts, static, "triton"))
    (grid,) = rec.grids
    if kind == "flexvar":  # each slice re-reads the grid: at most about 5% of x's bytes
        slots, max_slices = tk._GRID_PROGRAMS * 132, 1 + B * x.shape[1] // (10 * 32 * 32)
    else:
        slots, max_slices = tk._FWD_SHAPE[{"navit": "rows"}.get(kind, "fixed")][1] * 132, 1 + B // 10
    assert _launch.wave_efficiency(math.prod(grid), slots) >= 0.85, grid
    assert grid[2] <= max_slices, grid
