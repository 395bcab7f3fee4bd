"""VAR-family RoPE conventions beyond Infinity (README "2D rotary position embedding"):
InfinityStar's 3D (t, h, w) and 4D (scale, t, h, w) RoPE, HART's per-element 2D embedding and STAR / Switti's
normalised axial positions, each against float64 formulas re-derived from the
definitions (not from posenc_fast's own builders)."""

import math

import numpy as np
import pytest
import torch

import posenc_fast as pf

VAR_PNS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _rotate_pairs64(x, angle, pairing):
    """Float64 rotation of (..., D) by per-pair angles (..., D/2)."""
    x = x.double()
    if pairing == "interleaved":
        x0, x1 = x[..., 0::2], x[..., 1::2]
    else:
        x0, x1 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    y0 = x0 * torch.cos(angle) - x1 * torch.sin(angle)
    y1 = x0 * torch.sin(angle) + x1 * torch.cos(angle)
    if pairing == "interleaved":
        return torch.stack([y0, y1], dim=-1).flatten(-2)
    return torch.cat([y0, y1], dim=-1)


def _infinity_round(n, final):
    """Infinity's index round(fp32(r * fp32(final / n))), half to even."""
    return np.rint((np.arange(n, dtype=np.float32) * np.float32(final / n)).astype(np.float32))


# ------------------------------------------------------------------ InfinityStar

def _istar_sections(D):
    """Pairs per axis (t, h, w): ceil(D/2 / 3) each, minus the dropped ones."""
    F = math.ceil(D / 2 / 3)
    extra = 3 * F - D // 2
    return F, {0: (F, F, F), 1: (F - 1, F, F), 2: (F, F - 1, F - 1)}[extra]


@pytest.mark.parametrize("D,sections", [(64, (10, 11, 11)), (66, (11, 11, 11)), (68, (12, 11, 11)),
                                        (128, (22, 21, 21)), (6, (1, 1, 1)), (2, (1, 0, 0))])
def test_infinitystar_freqs_sections_and_values(D, sections):
    F, want_sections = _istar_sections(D)
    assert want_sections == sections
    freqs = pf.infinitystar_rope_freqs(D)
    assert freqs.shape == (3, D // 2) and freqs.dtype == torch.float32
    start = 0
    for a, n in enumerate(sections):
        want = torch.zeros(D // 2, dtype=torch.float64)
        # exponent i / F (not 2i / F): InfinityStar's theta, highest frequency first
        want[start:start + n] = torch.tensor([10000.0 ** (-i / F) for i in range(n)], dtype=torch.float64)
        torch.testing.assert_close(freqs[a].double(), want, rtol=1e-6, atol=0)
        start += n
    assert start == D // 2


def _istar_coords64(schedule, time, spf):
    _, H, W = schedule[-1]
    s_full = min(s for s, (_, h, w) in enumerate(schedule) if (h, w) == (H, W))
    rows = []
    for s, (t, h, w) in enumerate(schedule):
        rr, cc = _infinity_round(h, H), _infinity_round(w, W)
        for f in range(t):
            ti = f if time == "frames" else max(math.ceil((s - s_full) / spf), 0)
            for r in range(h):
                for c in range(w):
                    rows.append((ti, rr[r], cc[c]))
    return torch.tensor(rows, dtype=torch.float64)


IMAGE = [(1, h, w) for h, w in [(1, 1), (2, 3), (3, 4), (6, 8), (9, 12), (15, 20)]]
VIDEO = [(1, 1, 1), (2, 2, 3), (3, 3, 4), (4, 6, 8), (5, 9, 12), (6, 15, 20)]
TOWER = [(1, 1, 1), (1, 2, 2), (1, 5, 5), (1, 7, 7), (1, 7, 7), (1, 7, 7), (1, 7, 7), (1, 7, 7)]


@pytest.mark.parametrize("schedule,time,spf", [(IMAGE, "frames", 4), (VIDEO, "frames", 4),
                                               (TOWER, "tower", 2), (TOWER, "tower", 1), (IMAGE, "tower", 4)])
def test_infinitystar_coords_match_definition(schedule, time, spf):
    got = pf.infinitystar_coords(schedule, time=time, steps_per_frame=spf)
    want = _istar_coords64(schedule, time, spf)
    assert got.dtype == torch.float32 and got.shape == (sum(t * h * w for t, h, w in schedule), 3)
    assert torch.equal(got.double(), want)


def test_infinitystar_image_schedule_has_time_zero_and_infinity_rows():
    got = pf.infinitystar_coords(IMAGE)
    assert (got[:, 0] == 0).all()
    # h, w columns are Infinity's mode 2 (pyramid_coords "round") on the last scale
    assert torch.equal(got[:, 1:], pf.pyramid_coords(IMAGE, mode="round"))


def test_infinitystar_tower_time_index():
    # first full-size scale is index 3; with 2 steps per frame: 0,0,0,0,1,1,2,2
    got = pf.infinitystar_coords(TOWER, time="tower", steps_per_frame=2)
    offsets = np.cumsum([0] + [t * h * w for t, h, w in TOWER])
    assert [got[o, 0].item() for o in offsets[:-1]] == [0, 0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("D", [64, 66, 68])
def test_infinitystar_rotation_matches_float64(D):
    schedule = VIDEO
    coords = pf.infinitystar_coords(schedule)
    q = torch.randn(2, 3, coords.shape[0], D)
    k = torch.randn(2, 3, coords.shape[0], D)
    qo, ko = pf.apply_rope(q, k, coords, pf.infinitystar_rope_freqs(D), backend="reference")
    F, (nt, nh, nw) = _istar_sections(D)
    theta = torch.tensor([10000.0 ** (-i / F) for i in range(F)], dtype=torch.float64)
    c = _istar_coords64(schedule, "frames", 4)
    angle = torch.cat([c[:, 0:1] * theta[:nt], c[:, 1:2] * theta[:nh], c[:, 2:3] * theta[:nw]], dim=1)
    torch.testing.assert_close(qo.double(), _rotate_pairs64(q, angle, "interleaved"), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), _rotate_pairs64(k, angle, "interleaved"), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: pf.infinitystar_rope_freqs(63), ValueError, "head_dim"),
    (lambda: pf.infinitystar_rope_freqs(64.0), TypeError, "head_dim"),
    (lambda: pf.infinitystar_rope_freqs(64, base=0), ValueError, "base"),
    (lambda: pf.infinitystar_coords([]), ValueError, "schedule"),
    (lambda: pf.infinitystar_coords([(1, 2)]), ValueError, r"schedule\[0\]"),
    (lambda: pf.infinitystar_coords([(1, 1, 1), (0, 2, 2)]), ValueError, r"schedule\[1\]"),
    (lambda: pf.infinitystar_coords(IMAGE, time="frame"), ValueError, "time"),
    (lambda: pf.infinitystar_coords(IMAGE, steps_per_frame=0), ValueError, "steps_per_frame"),
])
def test_infinitystar_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# InfinityStar's shipped 4D cache (scale, t, h, w): D/8 frequencies per axis.

@pytest.mark.parametrize("D", [64, 128, 8])
def test_infinitystar_4d_freqs_sections(D):
    F = D // 8
    freqs = pf.infinitystar_rope4d_freqs(D)
    assert freqs.shape == (4, D // 2) and freqs.dtype == torch.float32
    theta = torch.tensor([10000.0 ** (-i / F) for i in range(F)], dtype=torch.float64)
    for a in range(4):
        want = torch.zeros(D // 2, dtype=torch.float64)
        want[a * F:(a + 1) * F] = theta
        torch.testing.assert_close(freqs[a].double(), want, rtol=1e-6, atol=0)


def test_infinitystar_4d_coords_and_rotation():
    final, scale = (3, 8, 12), (2, 3, 4)
    got = pf.infinitystar_coords4d(scale, final, frames=[1, 2], scale_index=5, text_maxlen=32)
    rr, cc = _infinity_round(3, 8), _infinity_round(4, 12)
    want = torch.tensor([(37, f, rr[r], cc[c]) for f in (1, 2) for r in range(3) for c in range(4)],
                        dtype=torch.float64)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    text = pf.infinitystar_text_coords4d(5)
    assert torch.equal(text.double(), torch.tensor([(j, 0, 0, 0) for j in range(5)], dtype=torch.float64))
    D = 64
    coords = torch.cat([text, got])
    q, k = torch.randn(2, 3, coords.shape[0], D), torch.randn(2, 3, coords.shape[0], D)
    qo, ko = pf.apply_rope(q, k, coords, pf.infinitystar_rope4d_freqs(D), backend="reference")
    theta = torch.tensor([10000.0 ** (-i / (D // 8)) for i in range(D // 8)], dtype=torch.float64)
    c = torch.cat([torch.tensor([(j, 0, 0, 0) for j in range(5)], dtype=torch.float64), want])
    angle = torch.cat([c[:, a:a + 1] * theta for a in range(4)], dim=1)
    torch.testing.assert_close(qo.double(), _rotate_pairs64(q, angle, "interleaved"), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), _rotate_pairs64(k, angle, "interleaved"), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: pf.infinitystar_rope4d_freqs(60), ValueError, "multiple of 8"),
    (lambda: pf.infinitystar_coords4d((1, 2), (1, 2, 2), frames=[0], scale_index=0, text_maxlen=0), ValueError,
     "scale must be"),
    (lambda: pf.infinitystar_coords4d((2, 2, 2), (2, 2, 2), frames=[0], scale_index=0, text_maxlen=0), ValueError,
     "one index per frame"),
    (lambda: pf.infinitystar_coords4d((1, 2, 2), (1, 2, 2), frames=[0], scale_index=-1, text_maxlen=0), ValueError,
     "scale_index"),
    (lambda: pf.infinitystar_text_coords4d(-1), ValueError, "length"),
])
def test_infinitystar_4d_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# ------------------------------------------------------------------ HART

def _hart64(x, pos, base=10000.0):
    """HART by its definition: element d of the head has its own angle; blocks of D/4
    are (row, row, col, col) times theta_i = base^(-4i/D); rotate-half partners."""
    D = x.shape[-1]
    q4 = D // 4
    theta = torch.tensor([base ** (-4 * i / D) for i in range(q4)], dtype=torch.float64)
    pos = pos.double()
    angle = torch.empty(pos.shape[0], D, dtype=torch.float64)
    for d in range(D):
        axis = 0 if d < D // 2 else 1
        angle[:, d] = pos[:, axis] * theta[d % q4]
    x = x.double()
    out = torch.empty_like(x)
    for d in range(D):
        partner = (d + D // 2) % D
        sign = -1.0 if d < D // 2 else 1.0
        out[..., d] = x[..., d] * torch.cos(angle[:, d]) + sign * x[..., partner] * torch.sin(angle[:, d])
    return out


def test_hart_matches_float64_definition():
    pos = pf.pyramid_coords(VAR_PNS, mode="fractional")  # HART's r / pn * 16
    q = torch.randn(2, 2, pos.shape[0], 64)
    k = torch.randn(2, 2, pos.shape[0], 64)
    qo, ko = pf.hart_rope(q, k, pos)
    torch.testing.assert_close(qo.double(), _hart64(q, pos), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), _hart64(k, pos), atol=1e-5, rtol=1e-5)
    # per batch positions (HART offsets them by the text length), k None
    pos_b = torch.stack([pos, pos + 7.0])
    qb, kb = pf.hart_rope(q, None, pos_b)
    assert kb is None
    torch.testing.assert_close(qb[1].double(), _hart64(q[1:], pos + 7.0)[0], atol=2e-5, rtol=1e-5)


def test_hart_is_not_a_rotation_but_is_one_on_the_diagonal():
    pos = pf.pyramid_coords([16], mode="raw")
    q = torch.randn(1, 1, pos.shape[0], 64)
    out, _ = pf.hart_rope(q, None, pos)
    ratio = out.norm(dim=-1) / q.norm(dim=-1)
    off_diag = pos[:, 0] != pos[:, 1]
    assert (ratio[0, 0, off_diag] - 1).abs().max() > 1e-2  # norms change where row != col
    # row == col == p: both partners get p * theta_(j mod D/4): rotate-half RoPE
    diag = pos[~off_diag]
    qd = q[:, :, ~off_diag]
    theta = pf.axial_rope_freqs(64)[0, :16]
    freqs = torch.cat([theta, theta])[None]  # (1, D/2)
    want, _ = pf.apply_rope(qd, None, diag[:, :1], freqs, pairing="half", backend="reference")
    got, _ = pf.hart_rope(qd, None, diag)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_hart_dtypes_follow_its_torch_path():
    pos = pf.pyramid_coords(VAR_PNS, mode="fractional")
    q = torch.randn(1, 2, pos.shape[0], 64).bfloat16()
    out, _ = pf.hart_rope(q, q, pos)
    assert out.dtype == torch.bfloat16
    # cos / sin rounded to bf16 and products in bf16: within a few bf16 ulps of float64
    torch.testing.assert_close(out.double(), _hart64(q, pos), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("call,msg", [
    (lambda: pf.hart_rope(torch.zeros(2, 4, 6), None, torch.zeros(4, 2)), "q must"),
    (lambda: pf.hart_rope(torch.zeros(1, 1, 4, 6), None, torch.zeros(4, 2)), "multiple of 4"),
    (lambda: pf.hart_rope(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 3, 8), torch.zeros(4, 2)), "k must be"),
    (lambda: pf.hart_rope(torch.zeros(1, 1, 4, 8), None, torch.zeros(4, 3)), "positions"),
    (lambda: pf.hart_rope(torch.zeros(1, 1, 4, 8), None, torch.zeros(4, 2), base=-1.0), "base"),
])
def test_hart_bad_arguments(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


# ------------------------------------------------------------------ STAR / Switti

def _star_angles64(pns, D, theta, norm):
    """STAR: token (r, c) of a pn x pn scale at (r, c) / (pn - 1) * norm (0 for pn = 1);
    pairs [0, D/4) rotate with the column (x), [D/4, D/2) with the row (y)."""
    t = torch.tensor([theta ** (-4 * i / D) for i in range(D // 4)], dtype=torch.float64)
    rows = []
    for pn in pns:
        for r in range(pn):
            for c in range(pn):
                y = 0.0 if pn == 1 else r / (pn - 1) * norm
                x = 0.0 if pn == 1 else c / (pn - 1) * norm
                rows.append(torch.cat([x * t, y * t]))
    return torch.stack(rows)


@pytest.mark.parametrize("D,theta,norm", [(64, 100.0, 32.0), (64, 10000.0, 64.0), (128, 10000.0, 64.0),
                                          (64, 10000.0, 128.0)])  # last: Switti's rope_size
def test_star_switti_normalised_axial_rope(D, theta, norm):
    coords = pf.pyramid_coords(VAR_PNS, mode="corner", corner_scale=norm)
    freqs = pf.axial_rope_freqs(D, base=theta, first="col")
    q = torch.randn(2, 2, coords.shape[0], D)
    qo, _ = pf.apply_rope(q, None, coords, freqs, pairing="interleaved", backend="reference")
    want = _rotate_pairs64(q, _star_angles64(VAR_PNS, D, theta, norm), "interleaved")
    # angles up to ~norm rad in fp32
    torch.testing.assert_close(qo.double(), want, atol=norm * 1e-6, rtol=1e-5)


def test_corner_coords_are_stars_fp32_expression():
    """STAR's t / t.max() * rope_norm: fp32 quotient, then fp32 product."""
    for pn, norm in [(3, 32.0), (7, 64.0), (13, 64.0), (21, 32.0), (27, 64.0)]:
        t = torch.arange(pn, dtype=torch.float32)
        want = t / t.max() * norm
        got = pf.pyramid_coords([pn], mode="corner", corner_scale=norm)
        assert torch.equal(got[:pn, 1], want) and torch.equal(got[::pn, 0], want), pn


def test_star_keeps_level_embedding_without_position_table():
    """STAR / Switti add lvl_embed only (positions come from RoPE): pos=None."""
    L = sum(pn * pn for pn in VAR_PNS)
    x = torch.randn(2, L, 32)
    lvl = torch.randn(len(VAR_PNS), 32)
    out = pf.pyramid_pos_level_add(x, None, lvl, VAR_PNS, backend="reference")
    level = torch.cat([torch.full((pn * pn,), s) for s, pn in enumerate(VAR_PNS)])
    torch.testing.assert_close(out.double(), x.double() + lvl.double()[level], atol=1e-6, rtol=1e-6)
