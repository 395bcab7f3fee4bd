"""posenc_fast.nn.FusedSelfAttention: VAR checkpoints load and give VAR's outputs,
2D RoPE matches an Infinity-style eager attention, the KV cache equals the
block-causal mask, and the rotation tables stay fp32."""

import math

import pytest
import torch

from conftest import DEVICE, fast_backends
from posenc_fast.nn.attention import KV_CACHE, FusedSelfAttention, block_causal_bias
from var_model import SelfAttention, build_var_shaped, infinity_rope_cache, infinity_style_attention

BACKENDS = ["reference"] + fast_backends()  # the backend tests run on DEVICE: CUDA when there is one
PATCH_NUMS = (1, 2, 3)
L = sum(p * p for p in PATCH_NUMS)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def randomize_(module, seed=0, scale_mul=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        if scale_mul is not None:
            module.scale_mul_1H11.copy_(torch.tensor(scale_mul).view(1, -1, 1, 1))
    return module


def grads(module, x, out, weight):
    (out * weight).sum().backward()
    g = {n: p.grad.clone() for n, p in module.named_parameters()}
    g["x"] = x.grad.clone()
    return g


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loads_var_attention_checkpoint_and_matches(backend, l2):
    C, H = 96, 3
    var_attn = randomize_(SelfAttention(0, C, H, attn_l2_norm=l2), scale_mul=[0.2, 2.0, 5.5] if l2 else None)
    var_attn.to(DEVICE)
    fused = FusedSelfAttention(C, H, attn_l2_norm=l2, backend=backend).to(DEVICE)
    assert list(fused.state_dict()) == list(var_attn.state_dict())
    fused.load_state_dict(var_attn.state_dict())
    assert fused.scale == var_attn.scale
    mask = block_causal_bias(PATCH_NUMS, device=DEVICE)
    x = torch.randn(3, L, C, device=DEVICE)
    w = torch.randn(3, L, C, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = var_attn(x1, mask)
    got = fused(x2, mask)
    assert rel_err(got, want) <= 1e-5
    g_want, g_got = grads(var_attn, x1, want, w), grads(fused, x2, got, w)
    for name in g_want:
        assert rel_err(g_got[name], g_want[name]) <= 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_matches_infinity_style_eager(backend):
    C, H = 128, 2  # D = 64
    patch_nums = (1, 2, 3, 5)
    n = sum(p * p for p in patch_nums)
    m = randomize_(FusedSelfAttention(C, H, rope=True, rope_scales=patch_nums, backend=backend),
                   seed=3, scale_mul=[1.0, 4.9]).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in infinity_rope_cache(C // H, patch_nums))
    mask = block_causal_bias(patch_nums, device=DEVICE)
    g = torch.Generator().manual_seed(4)  # not the global RNG: the inputs must not depend on test order
    x = torch.randn(2, n, C, generator=g).to(DEVICE)
    w = torch.randn(2, n, C, generator=g).to(DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = infinity_style_attention(m, x1, mask, cos, sin)
    g_want = grads(m, x1, want, w)
    m.zero_grad()
    got = m(x2, mask)
    g_got = grads(m, x2, got, w)
    assert rel_err(got, want) <= 1e-5
    for name in g_want:
        assert rel_err(g_got[name], g_want[name]) <= 1e-4, name
    # Without the rotation the result is different: the test sees the RoPE.
    plain = FusedSelfAttention(C, H).to(DEVICE)
    plain.load_state_dict(m.state_dict())
    assert rel_err(plain(x, mask), want) > 1e-3


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_equals_block_causal_mask(backend, rope):
    C, H = 96, 3  # D = 32
    m = randomize_(FusedSelfAttention(C, H, rope=rope, rope_scales=PATCH_NUMS if rope else None, backend=backend),
                   seed=1, scale_mul=[0.5, 3.0, 5.0]).to(DEVICE).eval()
    x = torch.randn(4, L, C, device=DEVICE)  # a CFG-doubled batch is just a batch here
    full = m(x, block_causal_bias(PATCH_NUMS, device=DEVICE))
    m.kv_caching(True, max_len=None if rope else L)
    parts, begin = [], 0
    with torch.no_grad():
        for pn in PATCH_NUMS:
            parts.append(m(x[:, begin:begin + pn * pn]))
            begin += pn * pn
            assert m.cached_k.shape == (4, H, begin, C // H) and m.cached_v.shape == m.cached_k.shape
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5
    m.kv_caching(False)
    assert m.cached_k is None and m.cached_v is None and not m.caching


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_is_one_buffer_pair_per_run(backend):
    """The cache is allocated at the first scale from its batch (L_max = max_len, or
    the tokens of rope_scales), appended to in place, kept across runs of the same
    batch (kv_caching(True) rewinds it), reallocated for another batch, freed by
    kv_caching(False)."""
    C, H = 128, 2  # D = 64
    m = randomize_(FusedSelfAttention(C, H, rope=True, rope_scales=PATCH_NUMS, backend=backend), seed=3)
    m = m.to(DEVICE).eval()

    def run(B):
        m.kv_caching(True)
        x = torch.randn(B, L, C, device=DEVICE)
        buffers = []
        with torch.no_grad():
            begin = 0
            for pn in PATCH_NUMS:
                m(x[:, begin:begin + pn * pn])
                begin += pn * pn
                buffers.append(m.__dict__[KV_CACHE])
                assert m.cached_k.data_ptr() == buffers[-1][0].data_ptr() and m.cached_k.shape[2] == begin
        assert all(b is buffers[0] for b in buffers)
        assert buffers[0][0].shape == (B, H, L, C // H)
        return buffers[0]

    first = run(3)
    assert run(3) is first
    assert run(1) is not first
    m.kv_caching(False)
    assert KV_CACHE not in m.__dict__
    with pytest.raises(ValueError, match="needs max_len"):
        FusedSelfAttention(C, H).kv_caching(True)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        m.kv_caching(True, max_len=0)


def test_explicit_coords_override_the_table():
    m = randomize_(FusedSelfAttention(64, 2, rope=True, rope_scales=PATCH_NUMS), seed=2)
    x = torch.randn(2, L, 64)
    mask = block_causal_bias(PATCH_NUMS)
    assert torch.equal(m(x, mask, coords=m.rope_coords.clone()), m(x, mask))
    free = FusedSelfAttention(64, 2, rope=True)
    free.load_state_dict(m.state_dict())
    assert rel_err(free(x, mask, coords=m.rope_coords), m(x, mask)) <= 1e-6
    assert rel_err(free(x, mask, coords=m.rope_coords * 2), m(x, mask)) > 1e-3


def test_block_causal_bias_is_vars_mask():
    model = build_var_shaped(patch_nums=(1, 2, 3, 4))
    assert torch.equal(block_causal_bias((1, 2, 3, 4)), model.attn_bias_for_masking)
    bias = block_causal_bias([(1, 2), (2, 3)], dtype=torch.bfloat16)
    assert bias.shape == (1, 1, 8, 8) and bias.dtype == torch.bfloat16
    assert (bias[0, 0, :2, 2:] == -math.inf).all() and (bias[0, 0, 2:] == 0).all() and (bias[0, 0, :2, :2] == 0).all()


def test_rope_tables_stay_fp32_when_the_module_is_cast():
    m = FusedSelfAttention(128, 2, rope=True, rope_scales=(1, 2, 3, 13)).to(torch.bfloat16)
    assert m.mat_qkv.weight.dtype == torch.bfloat16
    assert m.rope_freqs.dtype == torch.float32 and m.rope_coords.dtype == torch.float32
    fresh = FusedSelfAttention(128, 2, rope=True, rope_scales=(1, 2, 3, 13))
    assert torch.equal(m.rope_freqs, fresh.rope_freqs) and torch.equal(m.rope_coords, fresh.rope_coords)
    assert "rope_freqs" not in m.state_dict() and "rope_coords" not in m.state_dict()


def test_argument_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FusedSelfAttention(100, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        FusedSelfAttention(36, 6, rope=True)  # D = 6
    with pytest.raises(ValueError, match="rope=False"):
        FusedSelfAttention(64, 2, rope_scales=PATCH_NUMS)
    with pytest.raises(ValueError, match="pairing"):
        FusedSelfAttention(64, 2, pairing="neox")
    with pytest.raises(ValueError, match="scale"):
        FusedSelfAttention(64, 2, scale=0.1)
    x = torch.randn(1, L, 64)
    with pytest.raises(ValueError, match="pass coords"):
        FusedSelfAttention(64, 2, rope=True)(x)
    with pytest.raises(ValueError, match="rope=False"):
        FusedSelfAttention(64, 2)(x, coords=torch.zeros(L, 2))
    m = FusedSelfAttention(64, 2, rope=True, rope_scales=PATCH_NUMS)
    with pytest.raises(ValueError, match="exceed"):
        m(torch.randn(1, L + 1, 64))


def test_scale_without_l2_norm():
    m = FusedSelfAttention(64, 4, attn_l2_norm=False)
    assert m.scale == 0.25 / math.sqrt(16) and not hasattr(m, "scale_mul_1H11")
    assert FusedSelfAttention(64, 4, attn_l2_norm=False, scale=0.25).scale == 0.25


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [False, True])
def test_autocast_on_gpu_is_as_accurate_as_eager(rope):
    """bf16 against fp32: the fused module's error is of the size of the eager VAR /
    Infinity attention's own error under the same autocast."""
    C, H = 256, 4
    patch_nums = (1, 2, 3, 4, 5, 6, 8)
    n = sum(p * p for p in patch_nums)
    m = randomize_(FusedSelfAttention(C, H, rope=rope, rope_scales=patch_nums if rope else None), seed=4,
                   scale_mul=[0.5, 1.5, 3.0, 5.0]).cuda()
    if rope:
        cos, sin = (t.cuda() for t in infinity_rope_cache(C // H, patch_nums))
        eager = lambda x, mask: infinity_style_attention(m, x, mask, cos, sin)  # noqa: E731
    else:
        var_attn = SelfAttention(0, C, H, attn_l2_norm=True).cuda()
        var_attn.load_state_dict(m.state_dict())
        eager = var_attn
    mask = block_causal_bias(patch_nums, device="cuda")
    x = torch.randn(8, n, C, device="cuda")
    want = m(x, mask)
    assert rel_err(eager(x, mask), want) <= 1e-4  # fp32: the same function
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = m(x, mask.to(torch.bfloat16))
        base = eager(x, mask.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16

    def err(a):
        return ((a.double() - want.double()).norm() / want.double().norm()).item()

    assert err(got) <= 1.5 * err(base) + 1e-3


def test_rope_final_maps_a_small_schedule_onto_the_large_grid():
    """Infinity trains a 0.06M schedule with the positions of its ratio's 1M grid:
    coordinates scale by final / last, so they differ from the default mapping."""
    sched = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6)]
    m = FusedSelfAttention(64, 2, rope=True, rope_scales=sched, rope_final=(1, 24, 24))
    # token (1, 1) of the 2x2 scale sits at round(1 * 24/2) = 12; (5, 5) of the 6x6 at 20.
    assert m.rope_coords[1].tolist() == [0.0, 0.0] and m.rope_coords[4].tolist() == [12.0, 12.0]
    assert m.rope_coords[-1].tolist() == [20.0, 20.0]
    default = FusedSelfAttention(64, 2, rope=True, rope_scales=sched)
    assert default.rope_coords[-1].tolist() == [5.0, 5.0]
    cast = m.to(torch.float16)  # rebuilt with the same final grid
    assert cast.rope_coords.dtype == torch.float32 and cast.rope_coords[-1].tolist() == [20.0, 20.0]
    with pytest.raises(ValueError, match="rope_final is given without rope_scales"):
        FusedSelfAttention(64, 2, rope=True, rope_final=(24, 24))


def test_loads_infinity_flash_layout_of_scale_mul():
    """Infinity with its customized flash attention stores scale_mul_1H11 as
    (1, 1, H, 1); it loads as the (1, H, 1, 1) that VAR and the SDPA path use."""
    src = randomize_(FusedSelfAttention(96, 3), seed=4, scale_mul=[0.1, 1.0, 3.0])
    sd = src.state_dict()
    sd["scale_mul_1H11"] = sd["scale_mul_1H11"].reshape(1, 1, 3, 1)
    dst = FusedSelfAttention(96, 3)
    dst.load_state_dict(sd)
    assert torch.equal(dst.scale_mul_1H11, src.scale_mul_1H11)
    x = torch.randn(2, L, 96)
    assert torch.equal(dst(x, block_causal_bias(PATCH_NUMS)), src(x, block_causal_bias(PATCH_NUMS)))
    bad = dict(sd, scale_mul_1H11=torch.zeros(1, 3, 1, 2))
    with pytest.raises(RuntimeError, match="size mismatch for scale_mul_1H11"):
        dst.load_state_dict(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_per_scale_equals_eager(backend):
    """An Infinity-style stack (2D RoPE, l2 norm) sampled scale by scale: each scale
    captured in a CUDA graph (static shapes and cache addresses) and replayed on new
    inputs equals eager sampling."""
    C, H, B = 256, 2, 3  # D = 128
    layers = [randomize_(FusedSelfAttention(C, H, rope=True, rope_scales=PATCH_NUMS, backend=backend), seed=i)
              .cuda().eval() for i in range(2)]

    def stack(x):
        for m in layers:
            x = x + m(x)
        return x

    def sample(xs):
        for m in layers:
            m.kv_caching(True)
        return [stack(x) for x in xs]

    def inputs():
        return [torch.randn(B, pn * pn, C, device="cuda") for pn in PATCH_NUMS]

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sample(inputs())
        torch.cuda.current_stream().wait_stream(side)
        for m in layers:
            m.kv_caching(True)  # rewind; the buffers stay where the graphs will write them
        static = [torch.zeros_like(x) for x in inputs()]
        pool = torch.cuda.graph_pool_handle()
        graphs, outs = [], []
        for s in static:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outs.append(stack(s))
            graphs.append(graph)
        xs = inputs()
        for x, s, graph in zip(xs, static, graphs):
            s.copy_(x)
            graph.replay()
        want = sample(xs)
    torch.cuda.synchronize()
    for a, w in zip(outs, want):
        torch.testing.assert_close(a, w)
