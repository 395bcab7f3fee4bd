"""Table-defined rotations: apply_rope / apply_rope_ with per-token cos and sin tables
instead of coords x freqs (Infinity's mode-1 tables, flash-attn / HF / vLLM-style
caches). Reference against float64 math; Triton against the reference forward and
backward (the CUDA kernels under host emulation: tests/test_cuda_emulation.py); errors."""

import pytest
import torch

import posenc_fast as pf
from posenc_fast.reference import rope as ref
from conftest import DEVICE, DTYPE_TOLERANCES, fast_backends

TABLE_BACKENDS = fast_backends()
needs_fast = pytest.mark.skipif(not TABLE_BACKENDS, reason="no fast backend with tables runs here")


def _tables(L, P, batch=None, seed=0, unit=False):
    g = torch.Generator().manual_seed(seed)
    shape = (L, P) if batch is None else (batch, L, P)
    ang = torch.randn(shape, generator=g) * 3
    if unit:
        return ang.cos().to(DEVICE), ang.sin().to(DEVICE)
    # resampled tables (Infinity mode 1): not a rotation, cos^2 + sin^2 != 1
    return (ang.cos() * 0.9).to(DEVICE), (ang.sin() * 1.1).to(DEVICE)


def _qk(B, Hq, Hk, L, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=g).to(DEVICE, dtype),
            torch.randn(B, Hk, L, D, generator=g).to(DEVICE, dtype))


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("batch_tables", [False, True])
def test_reference_matches_float64_math(pairing, batch_tables):
    B, L, D = 2, 7, 12
    q, k = _qk(B, 3, 2, L, D, torch.float64)
    cos, sin = _tables(L, D // 2, B if batch_tables else None)
    got_q, got_k = ref.apply_rope_table(q, k, cos, sin, pairing=pairing)
    c, s = cos.double(), sin.double()
    c, s = (c[:, None], s[:, None]) if batch_tables else (c, s)
    for x, got in ((q, got_q), (k, got_k)):
        if pairing == "interleaved":
            x0, x1 = x[..., 0::2], x[..., 1::2]
            want = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
        else:
            x0, x1 = x[..., :D // 2], x[..., D // 2:]
            want = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), -1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unit_tables_equal_the_angles_they_come_from():
    coords, freqs = pf.pyramid_coords((1, 2, 3, 5), mode="round"), pf.axial_rope_freqs(16)
    ang = coords @ freqs
    q, k = _qk(2, 2, 2, coords.shape[0], 16, torch.float32)
    a = pf.apply_rope(q, k, coords.to(DEVICE), freqs.to(DEVICE), backend="reference")
    b = pf.apply_rope(q, k, cos=ang.cos().to(DEVICE), sin=ang.sin().to(DEVICE), backend="reference")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs_fast
@pytest.mark.parametrize("backend", TABLE_BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("B,Hq,Hk,L,D,batch_tables", [(1, 2, 2, 14, 64, False), (3, 3, 1, 9, 24, True),
                                                      (2, 2, 0, 5, 128, False)])
def test_fast_backend_matches_reference(backend, dtype, atol, rtol, pairing, B, Hq, Hk, L, D, batch_tables):
    q, k = _qk(B, Hq, max(Hk, 1), L, D, dtype)
    k = k if Hk else None
    cos, sin = _tables(L, D // 2, B if batch_tables else None)
    qs = q.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided q
    ks = None if k is None else k.clone().requires_grad_()
    got = pf.apply_rope(qs, ks, cos=cos, sin=sin, pairing=pairing, backend=backend)
    qr = q.clone().requires_grad_()
    kr = None if k is None else k.clone().requires_grad_()
    want = pf.apply_rope(qr, kr, cos=cos, sin=sin, pairing=pairing, backend="reference")
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), atol=atol * 4, rtol=rtol)
    gq = torch.randn_like(want[0])
    outs_g = [got[0]] + ([got[1]] if k is not None else [])
    outs_w = [want[0]] + ([want[1]] if k is not None else [])
    grads = [gq] + ([torch.randn_like(want[1])] if k is not None else [])
    leaves_g = [qs] + ([ks] if k is not None else [])
    leaves_w = [qr] + ([kr] if k is not None else [])
    dg = torch.autograd.grad(outs_g, leaves_g, grads)
    dw = torch.autograd.grad(outs_w, leaves_w, grads)
    for a, b in zip(dg, dw):  # the backward is the conjugate rotation with the same table
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 4, rtol=rtol)


@needs_fast
@pytest.mark.parametrize("backend", TABLE_BACKENDS)
def test_in_place_and_16_bit_tables(backend):
    q, k = _qk(2, 2, 2, 6, 32, torch.float32)
    cos, sin = _tables(6, 16, unit=True)
    want = pf.apply_rope(q, k, cos=cos, sin=sin, backend="reference")
    q2, k2 = q.clone(), k.clone()
    assert pf.apply_rope_(q2, k2, cos=cos, sin=sin, backend=backend) == (q2, k2)
    torch.testing.assert_close((q2, k2), want, atol=1e-5, rtol=1e-5)
    # A bf16 table rounds its values (~3 significant digits): applied in fp32 as given.
    c16, s16 = cos.bfloat16(), sin.bfloat16()
    got = pf.apply_rope(q, k, cos=c16, sin=s16, backend=backend)
    torch.testing.assert_close(got, pf.apply_rope(q, k, cos=c16.float(), sin=s16.float(), backend="reference"),
                               atol=1e-5, rtol=1e-5)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("batch_tables", [False, True])
def test_full_width_tables_are_hf_style_caches(pairing, batch_tables):
    """(L, D) tables: HF's ``x * cos + rotate_half(x) * sin`` (half), GPT-J's
    ``x * cos + rotate_every_two(x) * sin`` (interleaved), for any table (not only
    duplicated halves), in float64."""
    B, L, D = 2, 7, 12
    q, k = _qk(B, 3, 2, L, D, torch.float64)
    cos, sin = (t.double() for t in _tables(L, D, B if batch_tables else None))
    got_q, got_k = ref.apply_rope_table(q, k, cos, sin, pairing=pairing)
    c, s = (cos[:, None], sin[:, None]) if batch_tables else (cos, sin)
    turn = _rotate_half if pairing == "half" else _rotate_every_two
    for x, got in ((q, got_q), (k, got_k)):
        torch.testing.assert_close(got, x * c + turn(x) * s, rtol=1e-12, atol=1e-12)
    # Duplicated halves (HF's own caches) are the pair tables they come from.
    pc, ps = _tables(L, D // 2, B if batch_tables else None, unit=True)
    dup = (lambda t: torch.cat((t, t), -1)) if pairing == "half" else (lambda t: t.repeat_interleave(2, -1))
    torch.testing.assert_close(ref.apply_rope_table(q, k, dup(pc), dup(ps), pairing=pairing),
                               ref.apply_rope_table(q, k, pc, ps, pairing=pairing), rtol=1e-12, atol=1e-12)


@needs_fast
@pytest.mark.parametrize("backend", TABLE_BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("B,Hq,Hk,L,D,batch_tables", [(1, 2, 2, 14, 64, False), (3, 3, 1, 9, 24, True)])
def test_fast_backend_full_width_tables(backend, dtype, atol, rtol, pairing, B, Hq, Hk, L, D, batch_tables):
    q, k = _qk(B, Hq, Hk, L, D, dtype)
    cos, sin = _tables(L, D, B if batch_tables else None)
    qs = q.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    ks = k.clone().requires_grad_()
    got = pf.apply_rope(qs, ks, cos=cos, sin=sin, pairing=pairing, backend=backend)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    want = pf.apply_rope(qr, kr, cos=cos, sin=sin, pairing=pairing, backend="reference")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), atol=atol * 4, rtol=rtol)
    grads = [torch.randn_like(w) for w in want]
    dg = torch.autograd.grad(got, (qs, ks), grads)
    dw = torch.autograd.grad(want, (qr, kr), grads)
    for a, b in zip(dg, dw):  # the backward is the table's transpose: the sines swap
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 4, rtol=rtol)
    q2, k2 = q.clone(), k.clone()
    pf.apply_rope_(q2, k2, cos=cos, sin=sin, pairing=pairing, backend=backend)
    torch.testing.assert_close((q2.float(), k2.float()), tuple(w.float() for w in want), atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("backend", ["reference"] + TABLE_BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_hart_rope_in_every_backend(backend, dtype, atol, rtol):
    """HART's per-element angles through the full-width tables: the reference is
    HART's torch path bit for bit; the fused backends round once (fp32 math), equal to
    it in fp32 and within the dtype's rounding otherwise; gradients likewise."""
    pos = pf.pyramid_coords((1, 2, 3, 4), mode="fractional").to(DEVICE)
    q, k = _qk(2, 2, 2, pos.shape[0], 32, dtype)
    q, k = q.requires_grad_(), k.requires_grad_()
    got = pf.hart_rope(q, k, pos, backend=backend)
    want = ref.hart_rope(q, k, pos)
    if backend == "reference":
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), atol=atol * 4, rtol=rtol)
    grads = [torch.randn_like(w) for w in want]
    for a, b in zip(torch.autograd.grad(got, (q, k), grads), torch.autograd.grad(want, (q, k), grads)):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 4, rtol=rtol)
    qo, _ = pf.hart_rope(q.detach()[:1], None, pos[None] + 3.0, backend=backend)  # per-batch positions
    torch.testing.assert_close(qo.float(), ref.hart_rope(q.detach()[:1], None, pos + 3.0)[0].float(),
                               atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda q, p: pf.hart_rope(q, None, p[:-1]), ValueError, r"positions must be \(L, 2\)"),
    (lambda q, p: pf.hart_rope(q, None, p.long()), TypeError, "positions must be a floating-point"),
    (lambda q, p: pf.hart_rope(q, None, p.clone().requires_grad_()), ValueError, "positions requires grad"),
])
def test_hart_rope_bad_arguments(call, exc, msg):  # (shape errors of q / k: test_rope_models.py)
    pos = pf.pyramid_coords((1, 2), mode="fractional").to(DEVICE)
    q, _ = _qk(1, 2, 1, pos.shape[0], 32, torch.float32)
    with pytest.raises(exc, match=msg):
        call(q, pos)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(cos="table"), ValueError, "not both"),
    (dict(swap_shape=True), ValueError, r"cos and sin must be \(L, D/2\)"),
    (dict(mismatch=True), ValueError, "one shape"),
    (dict(int_table=True), TypeError, "cos must be a floating-point tensor"),
    (dict(none=True), TypeError, "needs coords and freqs, or cos= and sin="),
])
def test_bad_table_arguments(kwargs, exc, msg):
    q, k = _qk(1, 2, 2, 5, 8, torch.float32)
    cos, sin = _tables(5, 4)
    if kwargs.get("cos") == "table":
        call = dict(coords=torch.zeros(5, 2, device=DEVICE), freqs=torch.zeros(2, 4, device=DEVICE), cos=cos, sin=sin)
    elif kwargs.get("swap_shape"):
        call = dict(cos=cos.t(), sin=sin.t())
    elif kwargs.get("mismatch"):
        call = dict(cos=cos, sin=sin[:4])
    elif kwargs.get("int_table"):
        call = dict(cos=cos.long(), sin=sin)
    else:
        call = {}
    with pytest.raises(exc, match=msg):
        pf.apply_rope(q, k, **call)


def test_tables_get_no_gradient_in_every_backend():
    q, k = _qk(1, 2, 2, 5, 8, torch.float32)
    cos, sin = _tables(5, 4)
    for backend in ["reference"] + TABLE_BACKENDS:
        with pytest.raises(ValueError, match="cos requires grad"):
            pf.apply_rope(q, k, cos=cos.clone().requires_grad_(), sin=sin, backend=backend)
    with torch.no_grad():
        pf.apply_rope(q, k, cos=cos.clone().requires_grad_(), sin=sin)  # nothing to differentiate
