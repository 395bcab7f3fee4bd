"""apply_rope / apply_rope_ fast backends (Triton, CUDA) against the reference:
forward and backward (q, k, d freqs), dtypes, strided views, in place, scale rows,
torch.compile, argument errors. Triton runs under the interpreter on CPU."""


import pytest
import torch

import posenc_fast as pf
from posenc_fast.reference import rope as ref
from conftest import DEVICE, DTYPE_TOLERANCES, HAS_CUDA, capture_and_replay, cuda_library, fast_backends

BACKENDS = fast_backends()
needs_fast = pytest.mark.skipif(not BACKENDS, reason="no fast backend runs here")
SMALL = [(1, 1), (2, 2), (3, 5)]  # L = 20, non-square last scale


def _rand(*shape, dtype=torch.float32, grad=False, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=DEVICE) * scale).requires_grad_(grad)


def _freqs(kind, H, D, grad=False):
    if kind == "axial":
        f = pf.axial_rope_freqs(D)
    elif kind == "per_head":
        f = pf.rope_mixed_freqs(H, D, generator=torch.Generator().manual_seed(0)) * 3.0
    else:  # three axes (M-RoPE)
        f = pf.mrope_freqs(D, (D // 2 - 2 * (D // 6), D // 6, D // 6))
    return f.to(DEVICE).requires_grad_(grad)


def _coords(kind, B, L, A):
    if kind == "pyramid":
        return pf.pyramid_coords(SMALL, mode="round", final=(12, 20))[:L].to(DEVICE)
    if kind == "per_batch":
        return torch.randn(B, L, A, device=DEVICE) * 10
    return torch.randn(L, A, device=DEVICE) * 10


def _compare(backend, q, k, coords, freqs, *, pairing, atol, rtol, inplace=False):
    """Forward and backward of `backend` vs the reference on the same leaves."""
    leaves = [t for t in (q, k, freqs) if t is not None and t.requires_grad]

    def run(name):
        if inplace:
            qq, kk = q.clone(), (k.clone() if k is not None else None)
            return pf.apply_rope_(qq, kk, coords, freqs, pairing=pairing, backend=name)
        return pf.apply_rope(q, k, coords, freqs, pairing=pairing, backend=name)

    got, want = run(backend), run("reference")
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    if not leaves:
        return got
    outs = [t for t in got if t is not None]
    grads = [torch.randn_like(t) for t in outs]
    got_g = torch.autograd.grad(outs, leaves, grads)
    want_g = torch.autograd.grad([t for t in want if t is not None], leaves, grads)
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        assert a.dtype == b.dtype and a.shape == b.shape
        # d freqs sums over B * H * L products: one output-dtype rounding of a larger value.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=lambda m: f"grad {i}: {m}")
    return got


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("freq_kind,coord_kind,B,Hq,Hk,D", [
    ("axial", "pyramid", 1, 3, 2, 64),         # GQA head counts, Infinity coordinates
    ("per_head", "shared", 3, 2, 2, 40),       # learnable per-head freqs, P = 20 (not a power of two)
    ("three_axes", "per_batch", 2, 2, 1, 36),  # M-RoPE, per-batch coordinates
])
def test_fast_matches_reference(backend, dtype, atol, rtol, pairing, freq_kind, coord_kind, B, Hq, Hk, D):
    torch.manual_seed(0)
    L = 20
    freqs = _freqs(freq_kind, Hq, D, grad=freq_kind == "per_head")
    coords = _coords(coord_kind, B, L, freqs.shape[-2])
    q, k = _rand(B, Hq, L, D, dtype=dtype, grad=True), _rand(B, Hk, L, D, dtype=dtype, grad=True)
    _compare(backend, q, k, coords, freqs, pairing=pairing, atol=atol, rtol=rtol)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [32, 128, 256])
def test_fast_head_dims_and_learnable_shared_freqs(backend, D):
    torch.manual_seed(1)
    q, k = _rand(1, 2, 9, D, grad=True), _rand(1, 1, 9, D, grad=True)
    freqs = (pf.axial_rope_freqs(D).to(DEVICE) + 0.01).requires_grad_()
    _compare(backend, q, k, torch.randn(9, 2, device=DEVICE) * 30, freqs, pairing="interleaved",
             atol=2e-5, rtol=1e-5)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_k_none_and_one_axis(backend):
    torch.manual_seed(2)
    q = _rand(2, 3, 11, 48, grad=True)
    freqs = pf.rope_1d_freqs(48).to(DEVICE).requires_grad_()
    got = _compare(backend, q, None, torch.arange(11.0, device=DEVICE)[:, None], freqs, pairing="half",
                   atol=1e-5, rtol=1e-5)
    assert got[1] is None


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed_qkv_blhd", "bhld_views_of_packed", "strided_head_dim"])
def test_fast_strided_views(backend, layout):
    torch.manual_seed(3)
    B, L, H, D = 2, 7, 3, 32
    if layout == "packed_qkv_blhd":  # flash layout: (B, L, 3, H, D) -> (B, H, L, D) views
        qkv = _rand(B, L, 3, H, D, grad=True)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    elif layout == "bhld_views_of_packed":
        qkv = _rand(B, 3, H, L, D, grad=True)
        q, k = qkv[:, 0], qkv[:, 1]
    else:
        q = _rand(B, H, L, 2 * D)[..., ::2].requires_grad_()
        k = _rand(B, H, L, 2 * D)[..., 1::2].requires_grad_()
    assert not q.is_contiguous()
    freqs = pf.rope_mixed_freqs(H, D, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    got = _compare(backend, q, k, torch.randn(L, 2, device=DEVICE) * 5, freqs, pairing="interleaved",
                   atol=1e-5, rtol=1e-5)
    # outputs are dense with the inputs' stride order (flash layout stays flash layout)
    if layout == "packed_qkv_blhd":
        assert got[0].transpose(1, 2).is_contiguous() and got[1].transpose(1, 2).is_contiguous()
    else:
        assert got[0].is_contiguous()


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("learn_freqs", [False, True])
def test_fast_inplace_on_packed_qkv(backend, dtype, atol, rtol, learn_freqs):
    """apply_rope_ rotates q and k inside the packed tensor; gradients equal the
    out-of-place ones (learnable freqs included)."""
    torch.manual_seed(4)
    B, L, H, D = 2, 6, 2, 32
    leaf = _rand(B, L, 3, H, D, dtype=dtype, grad=True)
    freqs = pf.rope_mixed_freqs(H, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    freqs.requires_grad_(learn_freqs)
    coords = torch.randn(L, 2, device=DEVICE) * 4

    def run(name):
        qkv = leaf * 1.0  # non-leaf, so it may be modified in place
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        qo, ko = pf.apply_rope_(q, k, coords, freqs, backend=name)
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
        return qkv

    got, want = run(backend), run("reference")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    g = torch.randn_like(got)
    leaves = (leaf, freqs) if learn_freqs else (leaf,)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_inplace_without_grad_and_version_counter(backend):
    torch.manual_seed(5)
    q, k = _rand(2, 2, 5, 16), _rand(2, 1, 5, 16)
    coords, freqs = torch.randn(5, 2, device=DEVICE), pf.axial_rope_freqs(16).to(DEVICE)
    want = pf.apply_rope(q, k, coords, freqs, backend="reference")
    with torch.no_grad():
        qq, kk = pf.apply_rope_(q.clone(), k.clone(), coords, freqs, backend=backend)
    torch.testing.assert_close(qq, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kk, want[1], atol=1e-5, rtol=1e-5)
    # a tensor saved by an earlier op and then rotated in place: autograd refuses
    x = _rand(2, 2, 5, 16, grad=True) * 1.0
    y = x.sin()
    pf.apply_rope_(x, None, coords, freqs, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_scale_rows_equal_whole_sequence_rows(backend):
    """KV-cached inference: the tokens of scale s alone, at positions begin_s..., give
    exactly the matching rows of the whole-sequence result (any batch, e.g. doubled)."""
    torch.manual_seed(6)
    scales = [1, 2, (3, 4), (5, 6)]
    offsets = ref.scale_offsets(scales)
    L, D = offsets[-1], 32
    coords, freqs = pf.pyramid_coords(scales, mode="round").to(DEVICE), pf.axial_rope_freqs(D).to(DEVICE)
    q, k = _rand(4, 2, L, D, dtype=torch.bfloat16), _rand(4, 2, L, D, dtype=torch.bfloat16)
    whole = pf.apply_rope(q, k, coords, freqs, backend=backend)
    for s in range(len(scales)):
        a, b = offsets[s], offsets[s + 1]
        part = pf.apply_rope(q[:, :, a:b], k[:, :, a:b], coords[a:b], freqs, backend=backend)
        assert torch.equal(part[0], whole[0][:, :, a:b]) and torch.equal(part[1], whole[1][:, :, a:b])


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_dfreqs_is_deterministic(backend):
    torch.manual_seed(7)
    q, k = _rand(3, 2, 33, 32, grad=True), _rand(3, 2, 33, 32, grad=True)
    coords = torch.randn(33, 2, device=DEVICE) * 9
    for freqs in (pf.axial_rope_freqs(32).to(DEVICE).requires_grad_(),
                  pf.rope_mixed_freqs(2, 32).to(DEVICE).requires_grad_()):
        g = [torch.randn(3, 2, 33, 32, device=DEVICE) for _ in range(2)]
        runs = [torch.autograd.grad(pf.apply_rope(q, k, coords, freqs, backend=backend), freqs, g)[0]
                for _ in range(2)]
        assert torch.equal(runs[0], runs[1])


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_empty_sequence(backend):
    q, k = _rand(2, 2, 0, 16, grad=True), _rand(2, 2, 0, 16, grad=True)
    freqs = pf.rope_mixed_freqs(2, 16).to(DEVICE).requires_grad_()
    qo, ko = pf.apply_rope(q, k, torch.zeros(0, 2, device=DEVICE), freqs, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape
    (dfreqs,) = torch.autograd.grad([qo, ko], freqs, [torch.ones_like(qo), torch.ones_like(ko)])
    assert torch.equal(dfreqs, torch.zeros_like(freqs))


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace,learn_freqs", [(False, True), (True, True), (True, False)])
def test_torch_compile_fullgraph(backend, inplace, learn_freqs):
    torch._dynamo.reset()
    torch.manual_seed(8)
    B, L, H, D = 2, 5, 2, 16
    leaf = _rand(B, L, 3, H, D, grad=True)
    coords = torch.randn(L, 2, device=DEVICE)
    freqs = pf.rope_mixed_freqs(H, D).to(DEVICE).requires_grad_(learn_freqs)
    leaves = (leaf, freqs) if learn_freqs else (leaf,)

    def f(leaf, freqs):
        qkv = leaf * 2.0
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        if inplace:
            pf.apply_rope_(q, k, coords, freqs, backend=backend)
            return qkv
        qo, ko = pf.apply_rope(q, k, coords, freqs, backend=backend)
        return qo * ko

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = compiled(leaf, freqs), f(leaf, freqs)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    """Schemas, fake impls (output strides included), autograd registration, AOT dispatch."""
    from posenc_fast.ops import rope as ops

    torch.manual_seed(9)
    qkv = _rand(2, 5, 3, 2, 16)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # flash-layout views
    c = torch.randn(5, 2, device=DEVICE)
    f, fh = torch.randn(2, 8, device=DEVICE), torch.randn(2, 2, 8, device=DEVICE)
    cases = [
        (ops._rope_op, (q.requires_grad_(), k, c, f.requires_grad_(), True, False, backend)),
        (ops._rope_op, (q, None, c, fh, False, True, backend)),
        (ops._rope_bwd_op, (q.detach(), k.detach(), q.detach(), k.detach(), c, fh, True, False, backend)),
        (ops._rope_inplace_op, (q.detach().clone(), k.detach().clone(), c, f.detach(), True, False, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------- errors

def _good():
    return dict(q=torch.randn(2, 4, 6, 16), k=torch.randn(2, 2, 6, 16), coords=torch.randn(6, 2),
                freqs=pf.axial_rope_freqs(16))


@pytest.mark.parametrize("change,exc,msg", [
    (dict(q=torch.randn(2, 4, 6, 15), k=None, freqs=torch.randn(2, 7)), ValueError, "even"),
    (dict(q=torch.randn(4, 6, 16)), ValueError, "q must have 4 dimensions"),
    (dict(q=torch.randint(0, 3, (2, 4, 6, 16))), TypeError, "q must have dtype"),
    (dict(k=torch.randn(2, 2, 6, 16, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(k=torch.randn(2, 2, 5, 16)), ValueError, "k must be"),
    (dict(coords=torch.arange(12).view(6, 2)), TypeError, "coords must be a floating-point"),
    (dict(coords=torch.randn(5, 2)), ValueError, "coords has 5 positions"),
    (dict(coords=torch.randn(3, 6, 2)), ValueError, "per-batch coords"),
    (dict(coords=torch.randn(6)), ValueError, "coords must have 2 or 3 dimensions"),
    (dict(coords=torch.randn(6, 3)), ValueError, "freqs has 2 axes but coords has A = 3"),
    (dict(freqs=torch.randn(2, 7)), ValueError, "D/2 = 8 pairs"),
    (dict(freqs=torch.randn(3, 2, 8)), ValueError, "per-head freqs must be"),
    (dict(freqs=torch.randn(4, 2, 8)), ValueError, "as many k heads"),
    (dict(freqs=torch.randint(0, 3, (2, 8))), TypeError, "freqs must be a floating-point"),
    (dict(coords=[[0.0, 1.0]] * 6), TypeError, "coords must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(change, exc, msg):
    args = {**_good(), **change}
    with pytest.raises(exc, match=msg):
        pf.apply_rope(args["q"], args["k"], args["coords"], args["freqs"], backend="reference")


def test_bad_pairing_and_unavailable_backend():
    a = _good()
    with pytest.raises(ValueError, match="pairing"):
        pf.apply_rope(a["q"], a["k"], a["coords"], a["freqs"], pairing="rotate_half")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            pf.apply_rope(a["q"], a["k"], a["coords"], a["freqs"], backend="cuda")


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_limits(backend):
    q = torch.randn(1, 1, 2, 1028, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 512"):
        pf.apply_rope(q, None, torch.randn(2, 1, device=DEVICE), torch.randn(1, 514, device=DEVICE),
                      backend=backend)


# ----------------------------------------------------------- CUDA library

def test_cuda_extension_exposes_rope():
    lib = cuda_library()
    assert lib.rope_workspace_floats(0, 2, 2, 10, 64, 2, False) == 0
    assert lib.rope_workspace_floats(2, 2, 2, 10, 64, 2, True) % (2 * 32) == 0
    s4 = [0, 0, 0, 1]
    with pytest.raises(ValueError, match="1 to 4 axes"):  # argument errors before any CUDA call
        lib.rope_apply(0, s4, 0, s4, 0, s4, 0, s4, 0, s4, 0, s4, 0, 0, [0, 0, 0], 0, [0, 0, 0],
                       1, 1, 0, 1, 16, 5, False, True, False, False, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="full_table needs a table"):
        lib.rope_apply(0, s4, 0, s4, 0, s4, 0, s4, 0, s4, 0, s4, 0, 0, [0, 0, 0], 0, [0, 0, 0],
                       1, 1, 0, 1, 16, 2, False, True, False, True, 0, 0, 0, 0)


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", ["infinity_2b", "var_d16"])
def test_gpu_model_shapes_and_inductor(backend, shape):
    if shape == "infinity_2b":
        B, H, D = 1, 16, 128
        coords = pf.pyramid_coords((1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64), mode="round").cuda()
    else:
        B, H, D = 8, 16, 64
        coords = pf.pyramid_coords((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), mode="round").cuda()
    L = coords.shape[0]
    q, k = _rand(B, H, L, D, dtype=torch.bfloat16, grad=True), _rand(B, H, L, D, dtype=torch.bfloat16, grad=True)
    freqs = (pf.axial_rope_freqs(D).cuda() * 1.0).requires_grad_()
    _compare(backend, q, k, coords, freqs, pairing="interleaved", atol=1.6e-2, rtol=1.6e-2)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k: pf.apply_rope(q, k, coords, freqs, backend=backend), fullgraph=True)
    for a, b in zip(f(q, k), pf.apply_rope(q, k, coords, freqs, backend="reference")):
        torch.testing.assert_close(a, b, atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_fp32_precision_at_large_angles(backend):
    """Precise sincos (no fast-math): fp32 results match the fp32 reference at angles ~100 rad."""
    q = _rand(2, 4, 300, 64)
    coords = torch.rand(300, 2, device="cuda") * 120
    freqs = pf.rope_mixed_freqs(4, 64).cuda()
    got = pf.apply_rope(q, None, coords, freqs, backend=backend)[0]
    want = pf.apply_rope(q, None, coords, freqs, backend="reference")[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    q, k = _rand(4, 8, 680, 64, dtype=torch.bfloat16, grad=True), _rand(4, 8, 680, 64, dtype=torch.bfloat16, grad=True)
    coords = pf.pyramid_coords((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), mode="round").cuda()
    freqs = pf.rope_mixed_freqs(8, 64).cuda().requires_grad_()
    g = torch.randn(4, 8, 680, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        qo, ko = pf.apply_rope(q, k, coords, freqs, backend=backend)
        return (qo, ko) + torch.autograd.grad((qo, ko), (q, k, freqs), (g, g))

    replayed, eager = capture_and_replay(step, lambda: q.data.copy_(torch.randn_like(q)))
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_cuda_vector_and_scalar_paths_and_triton_agree():
    """Aligned dense views take the 16-byte path of the CUDA kernel, misaligned ones
    the scalar path; both agree with Triton."""
    base = _rand(2, 3, 50, 64 * 3 + 1, dtype=torch.float16)
    aligned = base[..., :64]
    misaligned = base[..., 1:65]
    coords, freqs = torch.randn(50, 2, device="cuda") * 20, pf.axial_rope_freqs(64).cuda()
    for x in (aligned, misaligned):
        for pairing in ("interleaved", "half"):
            a = pf.apply_rope(x, None, coords, freqs, pairing=pairing, backend="cuda")[0]
            b = pf.apply_rope(x, None, coords, freqs, pairing=pairing, backend="triton")[0]
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
