"""Partial rotary (rotary_dim < head_dim): dims [0, rotary_dim) rotate as a head of
that size, the rest pass through untouched, out of place and in place, forward and
backward, in every backend that runs here; bad rotary_dim values are refused."""

import pytest
import torch

import posenc_fast as pf
from conftest import DEVICE, fast_backends

BACKENDS = ["reference"] + fast_backends()


def _inputs(D=24, r=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 14, D, generator=g).to(DEVICE)
    k = torch.randn(2, 1, 14, D, generator=g).to(DEVICE)
    return q, k, pf.pyramid_coords((1, 2, 3), mode="round").to(DEVICE), pf.axial_rope_freqs(r).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_partial_rotary_rotates_the_first_dims_only(backend, pairing):
    q, k, coords, freqs = _inputs()
    r = 16
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = pf.apply_rope(qg, kg, coords, freqs, rotary_dim=r, pairing=pairing, backend=backend)
    head = pf.apply_rope(q[..., :r], k[..., :r], coords, freqs, pairing=pairing, backend="reference")
    for g_, x, h in zip(got, (q, k), head):
        torch.testing.assert_close(g_[..., :r], h, atol=2e-6, rtol=2e-6)
        assert torch.equal(g_[..., r:], x[..., r:])
    w = [torch.randn_like(t) for t in got]
    dq, dk = torch.autograd.grad(got, (qg, kg), w)
    for d, wi in ((dq, w[0]), (dk, w[1])):  # rotation's transpose on the head, identity on the rest
        assert torch.equal(d[..., r:], wi[..., r:])
    qr = q[..., :r].clone().requires_grad_()
    (want,) = torch.autograd.grad(pf.apply_rope(qr, None, coords, freqs, pairing=pairing, backend="reference")[0],
                                  qr, w[0][..., :r])
    torch.testing.assert_close(dq[..., :r], want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_rotary_in_place_leaves_the_rest_untouched(backend):
    q, k, coords, freqs = _inputs()
    want = pf.apply_rope(q, k, coords, freqs, rotary_dim=16, backend="reference")
    q2, k2 = q.clone(), k.clone()
    pf.apply_rope_(q2, k2, coords, freqs, rotary_dim=16, backend=backend)
    torch.testing.assert_close((q2, k2), want, atol=2e-6, rtol=2e-6)
    # with autograd: the in-place rotation of a view carries the gradient
    leaf = q.clone().requires_grad_()
    x = leaf * 1.0
    pf.apply_rope_(x, None, coords, freqs, rotary_dim=16, backend=backend)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(x, leaf, g)
    ref_leaf = q.clone().requires_grad_()
    (dref,) = torch.autograd.grad(pf.apply_rope(ref_leaf, None, coords, freqs, rotary_dim=16,
                                                backend="reference")[0], ref_leaf, g)
    torch.testing.assert_close(dx, dref, atol=2e-6, rtol=2e-6)


def test_full_rotary_dim_is_the_plain_rotation():
    q, k, coords, _ = _inputs(D=16)
    freqs = pf.axial_rope_freqs(16).to(DEVICE)
    a = pf.apply_rope(q, k, coords, freqs, rotary_dim=16)
    b = pf.apply_rope(q, k, coords, freqs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("r,exc,msg", [(7, ValueError, "even"), (32, ValueError, "at most the head dim 24"),
                                       (0, ValueError, "rotary_dim must be >= 2"), (8.0, TypeError, "int")])
def test_bad_rotary_dim(r, exc, msg):
    q, k, coords, freqs = _inputs()
    with pytest.raises(exc, match=msg):
        pf.apply_rope(q, k, coords, freqs, rotary_dim=r)
