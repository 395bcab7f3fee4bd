"""pyramid_pos_level_add: reference vs float64 math and VAR's eager expressions,
fast backends vs the reference (forward and backward), module, errors."""

import math

import pytest
import torch

import posenc_fast as pf
from posenc_fast.reference import pyramid as ref
from conftest import DEVICE, DTYPE_TOLERANCES, HAS_CUDA, capture_and_replay, cuda_library, fast_backends

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680
SMALL_PN = (1, 2, 3, 4)  # L = 30


def _rand(*shape, dtype=torch.float32, device=DEVICE, grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


# ---------------------------------------------------------------- float64 oracle

def _oracle(x, pos, lvl, patch_nums, start, pos_weight=1.0, sincos_weight=0.0):
    """SPEC §2.1 written out with loops in float64."""
    x, lvl = x.double(), lvl.double()
    B, n, C = x.shape
    levels, rows, cols = [], [], []
    for s, pn in enumerate(patch_nums):
        for r in range(pn):
            for c in range(pn):
                levels.append(s), rows.append(r), cols.append(c)
    out = torch.empty_like(x)
    half = C // 2
    for i in range(n):
        g = start + i
        e = lvl[levels[g]].clone()
        if pos is not None:
            e += pos_weight * pos.reshape(-1, C).double()[g]
        if sincos_weight:
            pe = torch.empty(C, dtype=torch.float64)
            for ch in range(C):
                p, k = (rows[g], ch) if ch < half else (cols[g], ch - half)
                w = 10000.0 ** (-(2 * (k // 2)) / half)
                pe[ch] = math.sin(p * w) if k % 2 == 0 else math.cos(p * w)
            e += sincos_weight * pe.to(x.device)
        out[:, i] = x[:, i] + e
    return out


@pytest.mark.parametrize("start,n", [(0, 30), (5, 9), (14, 16)])
@pytest.mark.parametrize("pos_weight,sincos_weight", [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)])
def test_reference_matches_float64_math(start, n, pos_weight, sincos_weight):
    C = 10
    x, pos, lvl = _rand(3, n, C, device="cpu"), _rand(1, 30, C, device="cpu"), _rand(4, C, device="cpu")
    got = ref.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, start=start, pos_weight=pos_weight,
                                    sincos_weight=sincos_weight)
    want = _oracle(x, pos, lvl, SMALL_PN, start, pos_weight, sincos_weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-6)


def test_sincos_table_layout():
    """Row in the first half, column in the second, interleaved sin/cos, 10000^(-2i/(C/2))."""
    C, pn = 8, (1, 3)
    table = ref.sincos_pyramid_table(pn, C, dtype=torch.float64)
    assert table.shape == (10, C)
    # token 1 + 2*3 + 1 = 8: scale 1, row 2, col 1
    row, col, half = 2.0, 1.0, C // 2
    want = []
    for p in (row, col):
        for k in range(half):
            w = 10000.0 ** (-(2 * (k // 2)) / half)
            want.append(math.sin(p * w) if k % 2 == 0 else math.cos(p * w))
    torch.testing.assert_close(table[8], torch.tensor(want, dtype=torch.float64))
    # position 0 of each axis: sin 0 = 0, cos 0 = 1
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 4, dtype=torch.float64))


def _var_lvl_1L(patch_nums):
    L = sum(pn * pn for pn in patch_nums)
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, L, 1)
    return d.transpose(1, 2)[:, 0].contiguous()


def test_reference_matches_var_teacher_forcing_expression():
    """VAR.forward: x_BLC += lvl_embed(lvl_1L[:, :ed].expand(B, -1)) + pos_1LC[:, :ed]."""
    torch.manual_seed(0)
    B, C = 3, 40
    L = 680
    x = _rand(B, L, C, device="cpu")
    pos_1LC, lvl_embed = _rand(1, L, C, device="cpu"), torch.nn.Embedding(len(VAR_PN), C)
    lvl_1L = _var_lvl_1L(VAR_PN)
    want = x + (lvl_embed(lvl_1L[:, :L].expand(B, -1)) + pos_1LC[:, :L])
    got = ref.pyramid_pos_level_add(x, pos_1LC, lvl_embed.weight, VAR_PN)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # progressive training window (prog_si): tokens [0, ed)
    ed = 1 + 4 + 9 + 16
    got = ref.pyramid_pos_level_add(x[:, :ed], pos_1LC, lvl_embed.weight, VAR_PN)
    torch.testing.assert_close(got, want[:, :ed], atol=1e-6, rtol=1e-6)


def test_reference_matches_var_inference_expression():
    """autoregressive_infer_cfg: next_token_map = word_embed(f) + lvl_pos[:, cur_L:cur_L + pn^2], batch doubled."""
    torch.manual_seed(1)
    B, C = 2, 24
    pos_1LC, lvl_w = _rand(1, 680, C, device="cpu"), _rand(len(VAR_PN), C, device="cpu")
    lvl_pos = torch.nn.functional.embedding(_var_lvl_1L(VAR_PN), lvl_w) + pos_1LC
    cur_L = 0
    for si, pn in enumerate(VAR_PN):
        if si > 0:
            tokens = _rand(B, pn * pn, C, device="cpu")
            want = (tokens + lvl_pos[:, cur_L:cur_L + pn * pn]).repeat(2, 1, 1)
            got = ref.pyramid_pos_level_add(tokens.repeat(2, 1, 1), pos_1LC, lvl_w, VAR_PN, start=cur_L)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        cur_L += pn * pn


def test_reference_gradcheck():
    x = _rand(2, 9, 6, dtype=torch.float64, device="cpu", grad=True)
    pos = _rand(30, 6, dtype=torch.float64, device="cpu", grad=True)
    lvl = _rand(4, 6, dtype=torch.float64, device="cpu", grad=True)

    def f(x, pos, lvl):
        return ref.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, start=5, pos_weight=0.6, sincos_weight=0.4)

    assert torch.autograd.gradcheck(f, (x, pos, lvl))


def test_reference_backward_formulas():
    """dpos[l] = pos_weight * sum_b dX[b, l]; dlvl[s] = sum_b sum_{l in s} dX[b, l]; dx = dX."""
    x, pos, lvl = _rand(3, 30, 5, device="cpu", grad=True), _rand(30, 5, device="cpu", grad=True), \
        _rand(4, 5, device="cpu", grad=True)
    g = torch.randn(3, 30, 5)
    ref.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, pos_weight=0.5).backward(g)
    torch.testing.assert_close(x.grad, g)
    torch.testing.assert_close(pos.grad, 0.5 * g.sum(0))
    bounds = [0, 1, 5, 14, 30]
    want = torch.stack([g[:, bounds[s]:bounds[s + 1]].sum((0, 1)) for s in range(4)])
    torch.testing.assert_close(lvl.grad, want)


@pytest.mark.parametrize("xd,pd,ld", [(torch.bfloat16, torch.float32, torch.float32),
                                      (torch.float16, torch.float16, torch.float16),
                                      (torch.bfloat16, torch.bfloat16, torch.float16)])
def test_reference_output_dtype_follows_eager_promotion(xd, pd, ld):
    x, pos, lvl = _rand(1, 30, 4, dtype=xd, device="cpu"), _rand(30, 4, dtype=pd, device="cpu"), \
        _rand(4, 4, dtype=ld, device="cpu")
    eager = x + pos + lvl[torch.zeros(30, dtype=torch.long)]
    assert ref.pyramid_pos_level_add(x, pos, lvl, SMALL_PN).dtype == eager.dtype


# ------------------------------------------------------------- fast backends

BACKENDS = fast_backends()
needs_fast = pytest.mark.skipif(not BACKENDS, reason="no fast backend runs here")


def _compare(backend, x, pos, lvl, pn, *, start, atol, rtol, pos_weight=1.0, sincos_weight=0.0):
    args = dict(start=start, pos_weight=pos_weight, sincos_weight=sincos_weight)
    leaves = [t for t in (x, pos, lvl) if t is not None]
    out = pf.pyramid_pos_level_add(x, pos, lvl, pn, backend=backend, **args)
    want = pf.pyramid_pos_level_add(x, pos, lvl, pn, backend="reference", **args)
    assert out.dtype == want.dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(out, leaves, g)
    want_g = torch.autograd.grad(want, leaves, g)
    for name, a, b in zip(("dx", "dpos", "dlvl"), got_g, want_g):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # Sums over B * rows: the error of one rounding to the output dtype of a larger value.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("B,C", [(1, 40), (3, 24), (2, 37)])
def test_fast_backend_full_var_pyramid(backend, dtype, atol, rtol, B, C):
    """L = 680, C not a power of two (and odd), batch 1 and 3; x, pos and lvl in the same dtype."""
    x = _rand(B, 680, C, dtype=dtype, grad=True)
    pos = _rand(1, 680, C, dtype=dtype, grad=True)
    lvl = _rand(len(VAR_PN), C, dtype=dtype, grad=True)
    _compare(backend, x, pos, lvl, VAR_PN, start=0, atol=atol, rtol=rtol)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("start,n", [(0, 14), (5, 9), (14, 16), (29, 1)])
def test_fast_backend_windows_mixed_dtypes(backend, dtype, atol, rtol, start, n):
    """Inference windows; activations in `dtype`, fp32 tables (autocast-style mix)."""
    x = _rand(3, n, 20, dtype=dtype, grad=True)
    pos, lvl = _rand(30, 20, grad=True), _rand(4, 20, grad=True)
    _compare(backend, x, pos, lvl, SMALL_PN, start=start, atol=atol, rtol=rtol)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_tables"])
def test_fast_backend_non_contiguous(backend, layout):
    B, C = 3, 18
    base = _rand(30, B, C)
    if layout == "transposed":
        x = base.transpose(0, 1).requires_grad_()
        pos, lvl = _rand(30, C, grad=True), _rand(4, C, grad=True)
    elif layout == "sliced":
        x = _rand(B, 30, 2 * C)[:, :, ::2].requires_grad_()
        pos = _rand(30, 3 * C)[:, C:2 * C].requires_grad_()
        lvl = _rand(C, 4).t().requires_grad_()
    else:
        x = _rand(B, 30, C, grad=True)
        pos = _rand(1, 30, C, grad=True)
        lvl = _rand(4, 2 * C)[:, ::2].requires_grad_()
    assert not x.is_contiguous() or not lvl.is_contiguous()
    _compare(backend, x, pos, lvl, SMALL_PN, start=0, atol=1e-5, rtol=1e-5)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_weight,sincos_weight,has_pos", [(0.0, 1.0, False), (0.7, 0.3, True)])
def test_fast_backend_sincos_and_mixed_tables(backend, pos_weight, sincos_weight, has_pos):
    x = _rand(2, 30, 16, grad=True)
    pos = _rand(30, 16, grad=True) if has_pos else None
    lvl = _rand(4, 16, grad=True)
    _compare(backend, x, pos, lvl, SMALL_PN, start=0, atol=2e-5, rtol=1e-5,
             pos_weight=pos_weight, sincos_weight=sincos_weight)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_non_square_scales_and_frozen_tables(backend):
    scales = [(1, 2), (2, 3), (3, 5)]  # L = 2 + 6 + 15
    x = _rand(2, 23, 12, grad=True)
    pos, lvl = _rand(23, 12), _rand(3, 12, grad=True)  # pos frozen: no dpos computed
    out = pf.pyramid_pos_level_add(x, pos, lvl, scales, backend=backend, sincos_weight=0.5)
    want = pf.pyramid_pos_level_add(x, pos, lvl, scales, backend="reference", sincos_weight=0.5)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, lvl), g), torch.autograd.grad(want, (x, lvl), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,start,n", [(0, 0, 30), (2, 5, 0)])
def test_fast_backend_empty_batch_or_window(backend, B, start, n):
    x = _rand(B, n, 8, grad=True)
    pos, lvl = _rand(30, 8, grad=True), _rand(4, 8, grad=True)
    out = pf.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, start=start, backend=backend)
    assert out.shape == (B, n, 8)
    dpos, dlvl = torch.autograd.grad(out, (pos, lvl), torch.randn_like(out))
    assert torch.equal(dpos, torch.zeros_like(pos)) and torch.equal(dlvl, torch.zeros_like(lvl))


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_backend_backward_is_deterministic(backend):
    x = _rand(5, 680, 24, dtype=torch.bfloat16, grad=True)
    pos, lvl = _rand(680, 24, grad=True), _rand(len(VAR_PN), 24, grad=True)
    g = torch.randn(5, 680, 24)
    runs = [torch.autograd.grad(pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, backend=backend), (pos, lvl), g)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The custom op traces without graph breaks, forward and backward."""
    torch._dynamo.reset()
    x, pos, lvl = _rand(2, 9, 8, grad=True), _rand(1, 30, 8, grad=True), _rand(4, 8, grad=True)

    def f(x, pos, lvl):
        return pf.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, start=5, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, pos, lvl)
    want = f(x, pos, lvl)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, pos, lvl), g), torch.autograd.grad(want, (x, pos, lvl), g)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_var_d16_shape_and_inductor(backend):
    x = _rand(8, 680, 1024, dtype=torch.bfloat16, grad=True)
    pos, lvl = _rand(1, 680, 1024, grad=True), _rand(len(VAR_PN), 1024, grad=True)
    _compare(backend, x, pos, lvl, VAR_PN, start=0, atol=1.6e-2, rtol=1.6e-2)
    torch._dynamo.reset()
    f = torch.compile(lambda x, p, l: pf.pyramid_pos_level_add(x, p, l, VAR_PN, backend=backend), fullgraph=True)
    torch.testing.assert_close(f(x, pos, lvl), pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, backend="reference"),
                               atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    x = _rand(4, 680, 64, dtype=torch.bfloat16, grad=True)
    pos, lvl = _rand(680, 64, grad=True), _rand(len(VAR_PN), 64, grad=True)
    g = torch.randn(4, 680, 64, device="cuda")

    def step():
        out = pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, backend=backend)
        return (out,) + torch.autograd.grad(out, (pos, lvl), g)

    replayed, eager = capture_and_replay(step, lambda: x.data.copy_(torch.randn_like(x)))
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("exchange_api", [True, False])
def test_gpu_sampling_launch_plans_follow_streams_and_graphs(exchange_api):
    """No grad, CUDA backend: the calls after the first of a scale are planned launches
    (csrc/bindings/launch_plan.h). They go to the current stream (a side stream, a
    CUDA graph being captured) and read the tables' current storage."""
    from posenc_fast import _cuda

    _cuda.connect(_cuda.lib(), exchange_api=exchange_api)
    try:
        pos, lvl = _rand(1, 680, 64), _rand(len(VAR_PN), 64)
        x = _rand(4, 100, 64, dtype=torch.bfloat16)  # scale 8 (10 x 10): tokens [270, 370)
        with torch.no_grad():
            def step():
                return pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, start=270, backend="cuda")

            want = pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, start=270, backend="reference")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outs = [step() for _ in range(3)]  # the first makes the plan
            torch.cuda.current_stream().wait_stream(side)
            for out in outs:
                torch.testing.assert_close(out, want, atol=1.6e-2, rtol=1.6e-2)

            def refresh():
                x.copy_(torch.randn_like(x))
                pos.mul_(-1.0)

            replayed, eager = capture_and_replay(step, refresh)
            torch.testing.assert_close(replayed, eager, atol=0, rtol=0)
            torch.testing.assert_close(eager, pf.pyramid_pos_level_add(x, pos, lvl, VAR_PN, start=270,
                                                                       backend="reference"), atol=1.6e-2, rtol=1.6e-2)
    finally:
        _cuda.connect(_cuda.lib())


@pytest.mark.gpu
def test_gpu_cuda_and_triton_agree_and_other_device_index():
    x = _rand(3, 30, 40, dtype=torch.float16)
    pos, lvl = _rand(30, 40), _rand(4, 40)
    a = pf.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, backend="cuda")
    b = pf.pyramid_pos_level_add(x, pos, lvl, SMALL_PN, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------- module

def test_module_state_dict_matches_var_and_init_std():
    torch.manual_seed(0)
    C = 96
    m = pf.PyramidPosLevelEmbedding(C, VAR_PN)
    sd = m.state_dict()
    assert set(sd) == {"pos_1LC", "lvl_embed.weight"}
    assert sd["pos_1LC"].shape == (1, 680, C) and sd["lvl_embed.weight"].shape == (10, C)
    std = math.sqrt(1 / (3 * C))
    assert abs(sd["pos_1LC"].std().item() - std) < 0.1 * std
    assert abs(sd["lvl_embed.weight"].std().item() - std) < 0.2 * std
    # a VAR checkpoint's tensors load as they are
    m2 = pf.PyramidPosLevelEmbedding(C, VAR_PN)
    m2.load_state_dict({"pos_1LC": torch.randn(1, 680, C), "lvl_embed.weight": torch.randn(10, C)})


def test_module_tables():
    torch.manual_seed(0)
    C, B = 16, 2
    x = _rand(B, 30, C, device="cpu")
    learned = pf.PyramidPosLevelEmbedding(C, SMALL_PN, backend="reference")
    sincos = pf.PyramidPosLevelEmbedding(C, SMALL_PN, table="sincos", backend="reference")
    mixed = pf.PyramidPosLevelEmbedding(C, SMALL_PN, table="mixed", mix_alpha=0.7, backend="reference")
    assert "pos_1LC" not in sincos.state_dict()
    sincos.lvl_embed.weight.data.copy_(learned.lvl_embed.weight)
    mixed.load_state_dict(learned.state_dict())
    table = ref.sincos_pyramid_table(SMALL_PN, C)
    lvl_rows = learned.lvl_embed.weight[torch.tensor([0, 1, 1, 1, 1] + [2] * 9 + [3] * 16)]
    torch.testing.assert_close(learned(x), x + learned.pos_1LC[0] + lvl_rows)
    torch.testing.assert_close(sincos(x), x + table + lvl_rows, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed(x), x + 0.7 * learned.pos_1LC[0] + 0.3 * table + lvl_rows, atol=1e-6, rtol=1e-6)
    # inference window: one scale with its absolute start
    torch.testing.assert_close(learned(x[:, 5:14], start=5), learned(x)[:, 5:14])


@pytest.mark.parametrize("kwargs,err", [
    (dict(table="rotary"), "table must be one of"),
    (dict(table="mixed", mix_alpha=1.5), "mix_alpha"),
    (dict(table="sincos", embed_dim=15), "even embed_dim"),
])
def test_module_bad_arguments(kwargs, err):
    args = dict(embed_dim=16, patch_nums=SMALL_PN)
    args.update(kwargs)
    with pytest.raises(ValueError, match=err):
        pf.PyramidPosLevelEmbedding(**args)


# ------------------------------------------------------------------- errors

def _good():
    return dict(x=_rand(2, 30, 8, device="cpu"), pos=_rand(1, 30, 8, device="cpu"), lvl=_rand(4, 8, device="cpu"))


@pytest.mark.parametrize("change,exc,msg", [
    (dict(x=torch.randn(30, 8)), ValueError, "x must have 3 dimensions"),
    (dict(x=torch.randn(2, 30, 0), pos=None, lvl=torch.randn(4, 0)), ValueError, "at least one channel"),
    (dict(x=torch.randint(0, 3, (2, 30, 8))), TypeError, "x must have dtype"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(pos=torch.randn(2, 30, 8)), ValueError, r"pos must be \(L, C\) or \(1, L, C\)"),
    (dict(pos=torch.randn(1, 31, 8)), ValueError, "patch_nums .* describe L = 30"),
    (dict(pos=torch.randn(1, 30, 9)), ValueError, "pos has 9 channels but x has C = 8"),
    (dict(lvl=torch.randn(5, 8)), ValueError, "lvl has 5 rows but patch_nums has 4 scales"),
    (dict(lvl=torch.randn(4, 7)), ValueError, "lvl has 7 channels"),
    (dict(lvl=torch.randn(4, 8, dtype=torch.float64)), TypeError, "lvl must have dtype"),
    (dict(pos=torch.randn(1, 30, 8, device="meta")), ValueError, "must be on one device"),
    (dict(start=25), ValueError, r"window \[start, start \+ n\) = \[25, 55\) exceeds"),
    (dict(start=-1), ValueError, "start must be >= 0"),
    (dict(start=1.0), TypeError, "start must be an int"),
    (dict(patch_nums=(1, 2, 0, 4)), ValueError, "patch_nums\\[2\\] must be positive"),
    (dict(patch_nums="1234"), TypeError, "patch_nums must be a sequence"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(sincos_weight=0.5, x=torch.randn(2, 30, 7), pos=None, lvl=torch.randn(4, 7)), ValueError, "even number"),
])
def test_bad_inputs_raise_clear_errors(change, exc, msg):
    args = _good()
    args.update(patch_nums=SMALL_PN, start=0)
    args.update(change)
    x, pos, lvl, pn = args.pop("x"), args.pop("pos"), args.pop("lvl"), args.pop("patch_nums")
    with pytest.raises(exc, match=msg):
        pf.pyramid_pos_level_add(x, pos, lvl, pn, **args)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_unavailable_backend_raises_with_reason():
    a = _good()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available .*no CUDA device"):
        pf.pyramid_pos_level_add(a["x"], a["pos"], a["lvl"], SMALL_PN, backend="cuda")


# ------------------------------------------------------------------ backends

def test_available_backends_and_selection(monkeypatch):
    av = pf.available_backends()
    assert set(av) == {"cuda", "triton", "reference"} and av["reference"] == "available"
    for name, status in av.items():
        assert isinstance(status, str) and status
    a = _good()
    calls = []
    monkeypatch.setattr(ref, "pyramid_pos_level_add",
                        lambda *args, **kw: calls.append(1) or torch.zeros(1))
    pf.pyramid_pos_level_add(a["x"], a["pos"], a["lvl"], SMALL_PN)  # auto on CPU -> reference
    with pf.use_backend("reference"):
        pf.pyramid_pos_level_add(a["x"], a["pos"], a["lvl"], SMALL_PN)
    monkeypatch.setenv("POSENC_FAST_BACKEND", "reference")
    pf.pyramid_pos_level_add(a["x"], a["pos"], a["lvl"], SMALL_PN)
    assert len(calls) == 3
    monkeypatch.setenv("POSENC_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="POSENC_FAST_BACKEND"):
        pf.pyramid_pos_level_add(a["x"], a["pos"], a["lvl"], SMALL_PN)
    with pytest.raises(ValueError, match="use_backend"):
        with pf.use_backend("gpu"):
            pass


def test_triton_cpu_availability_follows_interpreter(monkeypatch):
    from posenc_fast import _backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in _backends.unavailable_reason("triton", "cpu") or \
        "triton" in _backends.unavailable_reason("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _backends._triton_import_error() is None:
        assert _backends.unavailable_reason("triton", "cpu") is None


# ------------------------------------------------------------ CUDA library

def test_cuda_extension_exposes_kernels():
    lib = cuda_library()
    for fn in ("pyramid_pos_level_add_fwd", "pyramid_pos_level_add_bwd", "driver_version"):
        assert callable(getattr(lib, fn)), fn
    archs = lib.cuda_archs.split(",")
    assert archs and all(a for a in archs)
    assert lib.cuda_version.split(".")[0].isdigit()
    # Argument errors from the C++ core arrive as ValueError before any CUDA call.
    with pytest.raises(ValueError, match="dtype code"):
        lib.pyramid_pos_level_add_fwd(0, 7, [1, 1, 1], 0, 0, [0, 0], 0, 0, [1, 1], 0, 0, 0,
                                      1, 1, 1, 0, 1.0, 0.0, 0, 0)
