"""Rotary reference (SPEC §2.3, §2.4): pyramid coordinates, frequency layouts and the
rotation against independent float64 formulas and Infinity's conventions."""

import math

import numpy as np
import pytest
import torch

import posenc_fast as pf
from posenc_fast.reference import rope as ref

INFINITY_1_1 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # L = 10521


def _rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ------------------------------------------------------------ coordinates

def test_round_coords_of_infinity_1_1_schedule():
    """h = 6 mapped onto 64 rows: round(r * 10.666...) = 0, 11, 21, 32, 43, 53."""
    coords = pf.pyramid_coords(INFINITY_1_1, mode="round")
    assert coords.shape == (10521, 2) and coords.dtype == torch.float32
    begin = sum(pn * pn for pn in INFINITY_1_1[:3])  # scales 1, 2, 4 come first
    scale6 = coords[begin:begin + 36].view(6, 6, 2)
    assert scale6[:, 0, 0].tolist() == [0, 11, 21, 32, 43, 53]
    assert scale6[0, :, 1].tolist() == [0, 11, 21, 32, 43, 53]
    # the last scale is the final grid itself
    last = coords[-64 * 64:].view(64, 64, 2)
    assert torch.equal(last[:, 0, 0], torch.arange(64.0)) and torch.equal(last[0, :, 1], torch.arange(64.0))


def _round_oracle(n, final):
    """Infinity's index: fp32 row times the fp32-rounded ratio, product rounded to
    fp32, then round half to even (numpy's rint)."""
    prod = np.arange(n, dtype=np.float32) * np.float32(final / n)
    return np.rint(prod.astype(np.float32)).astype(np.float64)


def _coords_oracle(scales, mode, final=None, corner=None):
    H, W = final if final is not None else scales[-1]
    rows = []
    for h, w in scales:
        for r in range(h):
            for c in range(w):
                if mode == "raw":
                    rows.append((r, c))
                elif mode == "round":
                    rows.append((_round_oracle(h, H)[r], _round_oracle(w, W)[c]))
                elif mode == "fractional":
                    rows.append((r * H / h, c * W / w))
                else:
                    nr, nc = corner if corner is not None else (H - 1, W - 1)
                    rows.append((0.0 if h == 1 else r / (h - 1) * nr, 0.0 if w == 1 else c / (w - 1) * nc))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["raw", "round", "fractional", "corner"])
@pytest.mark.parametrize("scales,final", [
    ([(1, 1), (2, 3), (3, 5), (6, 10)], None),           # non-square, 3:5
    ([(1, 1), (2, 2), (3, 3), (5, 5), (7, 7)], None),    # odd ratios: halves to round
    ([(1, 2), (2, 4), (3, 6)], (12, 24)),                # final grid beyond the schedule
])
def test_coords_match_float64_formulas(mode, scales, final):
    got = ref.pyramid_coords(scales, mode=mode, final=final)
    want = _coords_oracle(scales, mode, final)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)


def test_round_mode_is_half_to_even_on_fp32_products():
    # 5 rows onto 10: products r * 2.0 exact; 4 rows onto 10: r * 2.5 -> 0, 2.5, 5, 7.5
    # -> round half to even gives 0, 2, 5, 8 (half-up would give 3 for 2.5).
    assert ref.pyramid_coords([(4, 1)], mode="round", final=(10, 1))[:, 0].tolist() == [0, 2, 5, 8]
    # Infinity's own expression (fp32 product of an int arange and a Python float).
    for n, H in [(6, 64), (12, 64), (40, 64), (3, 7), (9, 16), (20, 48)]:
        want = (torch.arange(n) * (H / n)).round()
        got = ref.pyramid_coords([(n, 1)], mode="round", final=(H, 1))[:, 0]
        assert torch.equal(got, want), (n, H)


def test_coords_raster_order_is_row_major_and_row_first():
    """meshgrid 'ij': token r * w + c has (row, col) = (r, c); column 0 is the row."""
    coords = pf.pyramid_coords([(2, 3)])
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    coords = pf.pyramid_coords([1, (2, 3)])
    assert coords[0].tolist() == [0, 0] and coords[1:].tolist()[3] == [1, 0]


def test_corner_scale_argument_and_side_one():
    got = ref.pyramid_coords([(1, 3), (3, 5)], mode="corner", corner_scale=8.0)
    assert got[:3].tolist() == [[0, 0], [0, 4], [0, 8]]
    assert got[3:8, 1].tolist() == [0, 2, 4, 6, 8] and got[-1].tolist() == [8, 8]
    got = ref.pyramid_coords([(3, 3)], mode="corner", corner_scale=(4.0, 2.0))
    assert got[-1].tolist() == [4, 2]


def test_scale_formats_are_equivalent():
    a = pf.pyramid_coords([1, 2, 4], mode="round")
    b = pf.pyramid_coords([(1, 1), (2, 2), (4, 4)], mode="round")
    c = pf.pyramid_coords([(1, 1, 1), (1, 2, 2), (1, 4, 4)], mode="round")
    assert torch.equal(a, b) and torch.equal(a, c)
    assert ref.scale_offsets([1, 2, (3, 4)]) == (0, 1, 5, 17)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(scales=[]), ValueError, "at least one scale"),
    (dict(scales=[1, 0]), ValueError, "positive"),
    (dict(scales=[1.5]), TypeError, "int"),
    (dict(scales=[(2, 1, 1)]), ValueError, "t == 1"),
    (dict(scales=[1, 2], mode="nearest"), ValueError, "mode"),
    (dict(scales=[1, 2], corner_scale=3.0), ValueError, "corner"),
])
def test_coords_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ref.pyramid_coords(**kwargs)


# ------------------------------------------------------------ frequencies

@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_axial_freqs_layout_and_exponent(D):
    f = pf.axial_rope_freqs(D)
    assert f.shape == (2, D // 2) and f.dtype == torch.float32
    q = D // 4
    theta = torch.tensor([10000.0 ** (-4 * j / D) for j in range(q)], dtype=torch.float64)
    torch.testing.assert_close(f[0, :q].double(), theta, rtol=1e-6, atol=0)   # row axis: first quarter pairs
    torch.testing.assert_close(f[1, q:].double(), theta, rtol=1e-6, atol=0)   # column axis: second
    assert not f[0, q:].any() and not f[1, :q].any()
    # exponent denominator is D/4 (k/(D/4)), not D/4 - 1: the last theta is not 1/base
    assert f[0, q - 1].item() > 1.1 / 10000.0  # base^(-1 + 4/D), >= 1.15 / base for D <= 256
    # computed like Infinity: 1 / base ** (arange(0, D/2, 2) / (D/2)) in fp32, bit for bit
    infinity = 1.0 / (10000.0 ** (torch.arange(0, D // 2, 2, dtype=torch.int64).float() / (D // 2)))
    assert torch.equal(f[0, :q], infinity)


def test_axial_freqs_column_first_layout():
    """first="col" (RoPE-ViT axial): the column takes pairs [0, D/4), the row the rest."""
    D = 32
    row, col = pf.axial_rope_freqs(D, base=100.0), pf.axial_rope_freqs(D, base=100.0, first="col")
    assert torch.equal(col, row.flip(0))
    # RoPE-ViT's angle of pair j of the token in raster slot t of a W-wide grid:
    # (t % W) * 100^(-4j/D) for j < D/4, (t // W) * 100^(-4(j - D/4)/D) after.
    H, W = 3, 5
    coords = pf.pyramid_coords([(H, W)])
    angles = ref.rope_angles(coords, col)[0, 0].double()
    for t in range(H * W):
        for j in range(D // 2):
            pos = t % W if j < D // 4 else t // W
            want = pos * 100.0 ** (-4 * (j % (D // 4)) / D)
            assert abs(angles[t, j].item() - want) <= 1e-6 * max(1.0, want), (t, j)
    with pytest.raises(ValueError, match="first must be one of"):
        pf.axial_rope_freqs(D, first="x")


def test_1d_and_mrope_freqs():
    D = 16
    f1 = pf.rope_1d_freqs(D, base=500.0)
    torch.testing.assert_close(f1[0].double(), torch.tensor([500.0 ** (-2 * j / D) for j in range(8)],
                                                            dtype=torch.float64), rtol=1e-6, atol=0)
    fm = pf.mrope_freqs(D, (2, 3, 3), base=500.0)
    assert fm.shape == (3, 8)
    assert torch.equal(fm.sum(0), f1[0])  # disjoint sections covering every pair
    assert fm[0, :2].all() and not fm[0, 2:].any() and fm[1, 2:5].all() and fm[2, 5:].all()
    with pytest.raises(ValueError, match="sum to"):
        pf.mrope_freqs(D, (2, 2, 2))


def test_mrope_text_tokens_reduce_to_1d_rope():
    """Equal coordinates on the (t, h, w) axes -> standard 1D RoPE."""
    torch.manual_seed(0)
    D, L = 32, 9
    q, k = _rand(2, 3, L, D), _rand(2, 1, L, D)
    t = torch.arange(L, dtype=torch.float32)[:, None] * 3.0
    got = ref.apply_rope(q, k, t.expand(L, 3), pf.mrope_freqs(D, (4, 6, 6)), pairing="half")
    want = ref.apply_rope(q, k, t, pf.rope_1d_freqs(D), pairing="half")
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


def test_rope_mixed_init():
    H, D = 3, 32
    g = torch.Generator().manual_seed(0)
    f = pf.rope_mixed_freqs(H, D, generator=g)
    assert f.shape == (H, 2, D // 2) and f.dtype == torch.float32
    mag = torch.tensor([10.0 ** (-4 * i / D) for i in range(D // 4)], dtype=torch.float64)
    norms = f.double().norm(dim=1)  # |(row, col)| per pair
    torch.testing.assert_close(norms, torch.cat([mag, mag]).expand(H, -1), rtol=1e-6, atol=1e-7)
    # pairs j and j + D/4 point in orthogonal directions
    dots = (f[:, :, :D // 4] * f[:, :, D // 4:]).sum(1)
    torch.testing.assert_close(dots, torch.zeros_like(dots), atol=1e-6, rtol=0)
    # heads draw different directions; rotate=False gives the axis-aligned layout
    assert not torch.allclose(f[0], f[1])
    f0 = pf.rope_mixed_freqs(H, D, rotate=False)
    assert not f0[:, 0, :D // 4].any() and torch.allclose(f0[:, 1, :D // 4].double(), mag.expand(H, -1))
    # the same generator seed gives the same init
    assert torch.equal(f, pf.rope_mixed_freqs(H, D, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("fn,args", [(pf.axial_rope_freqs, (30,)), (pf.rope_1d_freqs, (7,)),
                                     (pf.axial_rope_freqs, (0,))])
def test_freqs_bad_head_dim(fn, args):
    with pytest.raises(ValueError, match="head_dim"):
        fn(*args)


# ----------------------------------------------------------------- rotation

def _rotate_oracle(x, coords, freqs, pairing):
    """float64 loops over tokens and pairs: angle = sum_a c[a] * f[a, j]."""
    x = x.double()
    B, H, L, D = x.shape
    P = D // 2
    out = torch.empty_like(x)
    c = coords.double()
    f = freqs.double()
    for b in range(B):
        for h in range(H):
            for l in range(L):
                cl = c[b, l] if c.dim() == 3 else c[l]
                fh = f[h] if f.dim() == 3 else f
                for j in range(P):
                    ang = float((cl * fh[:, j]).sum())
                    i0, i1 = (2 * j, 2 * j + 1) if pairing == "interleaved" else (j, j + P)
                    x0, x1 = float(x[b, h, l, i0]), float(x[b, h, l, i1])
                    out[b, h, l, i0] = x0 * math.cos(ang) - x1 * math.sin(ang)
                    out[b, h, l, i1] = x0 * math.sin(ang) + x1 * math.cos(ang)
    return out


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("case", ["axial", "per_head", "per_batch_coords", "three_axes"])
def test_apply_rope_matches_float64_oracle(pairing, case):
    torch.manual_seed(1)
    B, H, L, D = 2, 3, 7, 12
    coords = pf.pyramid_coords([1, (2, 3)], mode="raw") * 5.0
    freqs = pf.axial_rope_freqs(D)
    if case == "per_head":
        freqs = torch.randn(H, 2, D // 2)
    elif case == "per_batch_coords":
        coords = torch.randn(B, L, 2) * 20
    elif case == "three_axes":
        coords, freqs = torch.randn(L, 3) * 10, pf.mrope_freqs(D, (2, 2, 2))
    q = _rand(B, H, L, D)
    k = _rand(B, H, L, D)
    got_q, got_k = ref.apply_rope(q, k, coords, freqs, pairing=pairing)
    # fp32 angles up to ~64 rad: |error| <~ 64 * 2^-24 per angle
    torch.testing.assert_close(got_q.double(), _rotate_oracle(q, coords, freqs, pairing), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.double(), _rotate_oracle(k, coords, freqs, pairing), atol=2e-5, rtol=1e-5)


def _infinity_style(q, k, scales, D):
    """Infinity's mode-2 construction re-derived: a (2, maxH, maxW, D/2) cos/sin grid of
    outer(row, theta) | outer(col, theta), gathered at round(r * H/h) indices, applied
    to interleaved pairs."""
    half = D // 2
    theta = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    H, W = scales[-1]
    fh = torch.outer(torch.arange(H).float(), theta)
    fw = torch.outer(torch.arange(W).float(), theta)
    grid = torch.cat([fh[:, None, :].expand(-1, W, -1), fw[None, :, :].expand(H, -1, -1)], dim=-1)
    grid = torch.stack([grid.cos(), grid.sin()])
    caches = []
    for h, w in scales:
        ri = (torch.arange(h) * (H / h)).round().int()
        ci = (torch.arange(w) * (W / w)).round().int()
        idx = torch.stack(torch.meshgrid(ri, ci, indexing="ij"), -1).reshape(-1, 2)
        caches.append(grid[:, idx[:, 0], idx[:, 1], :])
    cache = torch.cat(caches, 1)[:, None, None]  # (2, 1, 1, L, D/2)
    out = []
    for x in (q, k):
        xp = x.reshape(*x.shape[:-1], -1, 2)
        y = torch.stack([cache[0] * xp[..., 0] - cache[1] * xp[..., 1],
                         cache[1] * xp[..., 0] + cache[0] * xp[..., 1]], -1)
        out.append(y.reshape(x.shape))
    return out


def test_apply_rope_is_bitwise_infinitys_round_mode():
    """Same fp32 angles, same cos/sin, same pairing: identical bits, so which half of
    the pairs gets the row, the exponents and the pairing all match Infinity."""
    torch.manual_seed(2)
    scales = [(1, 1), (2, 2), (3, 3), (4, 6), (8, 12)]
    D = 32
    L = sum(h * w for h, w in scales)
    q, k = _rand(2, 2, L, D), _rand(2, 2, L, D)
    got = ref.apply_rope(q, k, ref.pyramid_coords(scales, mode="round"), pf.axial_rope_freqs(D))
    want = _infinity_style(q, k, scales, D)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_row_rotates_first_quarter_of_pairs_only():
    D = 16
    x = _rand(1, 1, 2, D)
    coords = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    y, _ = ref.apply_rope(x, None, coords, pf.axial_rope_freqs(D))
    # token 0 moves along the row: dims [0, D/2) change, [D/2, D) do not (interleaved)
    assert torch.equal(y[0, 0, 0, D // 2:], x[0, 0, 0, D // 2:]) and not torch.equal(y[0, 0, 0, :D // 2], x[0, 0, 0, :D // 2])
    assert torch.equal(y[0, 0, 1, :D // 2], x[0, 0, 1, :D // 2]) and not torch.equal(y[0, 0, 1, D // 2:], x[0, 0, 1, D // 2:])


def test_interleaved_and_half_agree_under_channel_permutation():
    """half layout = interleaved layout with channels (0, 2, 4, ..., 1, 3, 5, ...)."""
    torch.manual_seed(3)
    D = 24
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    q, k = _rand(2, 3, 10, D), _rand(2, 3, 10, D)
    coords, freqs = torch.randn(10, 2) * 8, pf.axial_rope_freqs(D)
    qi, ki = ref.apply_rope(q, k, coords, freqs, pairing="interleaved")
    qh, kh = ref.apply_rope(q[..., perm], k[..., perm], coords, freqs, pairing="half")
    assert torch.equal(qi[..., perm], qh) and torch.equal(ki[..., perm], kh)
    assert not torch.allclose(qi, ref.apply_rope(q, None, coords, freqs, pairing="half")[0])


def test_identity_at_position_zero_and_norm_preserved():
    torch.manual_seed(4)
    q = _rand(2, 2, 5, 16)
    y, _ = ref.apply_rope(q, None, torch.zeros(5, 2), torch.randn(2, 2, 8))
    assert torch.equal(y, q)
    y, _ = ref.apply_rope(q, None, torch.randn(5, 2) * 30, pf.axial_rope_freqs(16))
    torch.testing.assert_close(y.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-6)


def test_relative_property_of_axial_freqs():
    """<R(p) q, R(p') k> depends only on p - p'."""
    torch.manual_seed(5)
    D = 32
    freqs = pf.axial_rope_freqs(D).double()
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)
    p, pp = torch.tensor([[3.0, 7.0]]), torch.tensor([[5.0, 1.0]])
    base = None
    for shift in ([0.0, 0.0], [11.0, -4.0], [40.0, 25.0]):
        s = torch.tensor([shift])
        rq, _ = ref.apply_rope(q, None, p + s, freqs)
        rk, _ = ref.apply_rope(k, None, pp + s, freqs)
        dot = (rq.double() * rk.double()).sum().item()
        base = dot if base is None else base
        assert abs(dot - base) < 1e-5
    rk, _ = ref.apply_rope(k, None, pp + torch.tensor([[1.0, 0.0]]), freqs)
    assert abs((ref.apply_rope(q, None, p, freqs)[0] * rk).sum().item() - base) > 1e-3


def test_gqa_heads_k_none_and_dtypes():
    torch.manual_seed(6)
    q, k = _rand(2, 4, 6, 16, dtype=torch.bfloat16), _rand(2, 2, 6, 16, dtype=torch.bfloat16)
    coords, freqs = torch.randn(6, 2) * 10, pf.axial_rope_freqs(16)
    qo, ko = ref.apply_rope(q, k, coords, freqs)
    assert qo.dtype == ko.dtype == torch.bfloat16 and ko.shape == k.shape
    # math in fp32, one rounding at the end: equals the fp32 rotation of the bf16 values, rounded
    q32, _ = ref.apply_rope(q.float(), None, coords, freqs)
    assert torch.equal(qo, q32.to(torch.bfloat16))
    assert ref.apply_rope(q, None, coords, freqs)[1] is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ref.apply_rope(q.float(), None, coords, freqs)
    assert out.dtype == torch.float32 and torch.equal(out, q32)


@pytest.mark.parametrize("per_head", [False, True])
def test_reference_gradcheck(per_head):
    torch.manual_seed(7)
    q = _rand(2, 2, 3, 8, dtype=torch.float64, grad=True)
    k = _rand(2, 2, 3, 8, dtype=torch.float64, grad=True)
    coords = torch.randn(2, 3, 2, dtype=torch.float64)
    freqs = torch.randn(*((2,) if per_head else ()), 2, 4, dtype=torch.float64, requires_grad=True)
    for pairing in ("interleaved", "half"):
        assert torch.autograd.gradcheck(lambda q, k, f: ref.apply_rope(q, k, coords, f, pairing=pairing),
                                        (q, k, freqs))
