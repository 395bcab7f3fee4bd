"""patch_infinity / unpatch_infinity against an Infinity-shaped attention
(tests/infinity_model.py): the same outputs and gradients in training with the
block-wise mask, the same outputs scale by scale with the KV cache, in all three
rope2d_normalized_by_hw modes, with and without cosine attention, both scale_mul
layouts, the flash build's own attention function, state dict and unpatching; on
the reference, Triton (the interpreter without a GPU) and CUDA (host emulation
without a GPU) backends. The rotation runs inside qkv_proj: no separate launch."""

import copy
import math

import pytest
import torch

import posenc_fast as pf
from posenc_fast.integrations.infinity import patch_infinity, unpatch_infinity
from posenc_fast.nn.attention import KV_CACHE
from posenc_fast.ops import rope as rope_ops
from conftest import DEVICE
from infinity_model import InfinityBlockStack, InfinitySelfAttention, rope_tables
from test_cuda_emulation import emu_builds, sanitizer_dir  # noqa: F401 (fixtures of the cuda backend)
from test_edge_cases import backend  # noqa: F401 (reference, triton, cuda; cuda emulated without a GPU)

SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 3, 4), (1, 4, 6)]  # non-square last scale
L = sum(t * h * w for t, h, w in SCHEDULE)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.3))
        for a in m.modules():
            if isinstance(a, InfinitySelfAttention) and a.cos_attn:
                a.scale_mul_1H11.copy_(torch.linspace(0.5, 5.0, a.num_heads).reshape(a.scale_mul_1H11.shape))
    return m


def _mask(device=DEVICE):
    level = torch.cat([torch.full((t * h * w,), i) for i, (t, h, w) in enumerate(SCHEDULE)])
    return torch.where(level[:, None] >= level[None, :], 0.0, -math.inf)[None, None].to(device)


def _pair(seed=0, device=DEVICE, **kw):
    want = _randomize(InfinityBlockStack(48, 3, **kw), seed).to(device)  # head_dim 16
    got = copy.deepcopy(want)
    return want, got


@pytest.fixture
def no_separate_rotation(backend, monkeypatch):
    """The patched SDPA path rotates inside qkv_proj: a rope kernel launch fails."""
    def boom(*a, **k):
        raise AssertionError("a separate apply_rope launch ran")

    monkeypatch.setattr(rope_ops, "_launch", boom)
    return backend


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("cos_attn", [True, False])
def test_training_outputs_and_gradients_match(no_separate_rotation, mode, cos_attn):
    backend = no_separate_rotation
    want, got = _pair(mode, backend.device, cos_attn=cos_attn, rope2d_normalized_by_hw=mode)
    patch_infinity(got, backend=backend.name)
    tables = rope_tables(16, SCHEDULE, mode, max_side=16)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, L, 48, generator=g).to(backend.device)
    w = torch.randn(2, L, 48, generator=g).to(backend.device)
    outs, grads = [], []
    for m in (want, got):
        xi = x.clone().requires_grad_()
        out = m(xi, _mask(backend.device), SCHEDULE, tables)
        (out * w).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    # fp32 rounding of q and k (an ulp apart from eager's order of operations), times
    # cosine attention's gain of up to 100 on the logits
    assert rel_err(outs[1], outs[0]) <= 2e-5
    for gw, gg in zip(grads[0], grads[1]):
        assert rel_err(gg, gw) <= 1e-4


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("cos_attn", [True, False])
def test_kv_cached_sampling_matches(no_separate_rotation, mode, cos_attn):
    backend = no_separate_rotation
    want, got = _pair(3, backend.device, cos_attn=cos_attn, rope2d_normalized_by_hw=mode)
    patch_infinity(got, backend=backend.name)
    tables = rope_tables(16, SCHEDULE, mode, max_side=16)
    # Without cosine attention the logits grow with |x|^2: small inputs keep the softmax
    # well-conditioned, so that the comparison measures the kernels rather than how
    # much a sharp softmax amplifies fp32 rounding.
    gain = 1.0 if cos_attn else 0.25
    x = torch.randn(2, L, 48, generator=torch.Generator().manual_seed(1)).to(backend.device) * gain
    for m in (want, got):
        for a in m.attentions():
            a.kv_caching(True)
    begin, first_ptr = 0, {}
    with torch.no_grad():
        for si, (t, h, w) in enumerate(SCHEDULE):
            xs = x[:, begin:begin + t * h * w]
            ref = want(xs, None, SCHEDULE, tables, scale_ind=si)
            out = got(xs, None, SCHEDULE, tables, scale_ind=si)
            # fp32 rounding of q and k, times cosine attention's gain of up to 100 on the logits
            assert rel_err(out, ref) <= 1e-4, si
            begin += t * h * w
            for a in got.attentions():  # views of one buffer pair per run, not a growing cat
                assert a.cached_k.data_ptr() == first_ptr.setdefault(id(a), a.cached_k.data_ptr())
    for a, b in zip(want.attentions(), got.attentions()):
        assert rel_err(b.cached_k, a.cached_k) <= 1e-5 and rel_err(b.cached_v, a.cached_v) <= 1e-5
        assert b.cached_k.shape == a.cached_k.shape
        b.kv_caching(False)  # frees the buffers
        assert b.cached_k is None and KV_CACHE not in b.__dict__


def test_flash_build_layout_and_its_own_attention_function(backend):
    want, got = _pair(5, backend.device, using_flash=True)
    assert got.blocks[0].attn.scale_mul_1H11.shape == (1, 1, 3, 1)
    patch_infinity(got, backend=backend.name)
    tables = rope_tables(16, SCHEDULE, 2, max_side=16)
    x = torch.randn(2, L, 48, generator=torch.Generator().manual_seed(2)).to(backend.device)
    level = torch.cat([torch.full((t * h * w,), i) for i, (t, h, w) in enumerate(SCHEDULE)])
    visible = torch.tensor([int((level <= lv).sum()) for lv in level], device=backend.device)
    two = (visible, torch.zeros_like(visible))
    assert rel_err(got(x, two, SCHEDULE, tables), want(x, two, SCHEDULE, tables)) <= 1e-5


def test_state_dict_and_unpatch():
    want, got = _pair(4)
    keys = {k: v.clone() for k, v in got.state_dict().items()}
    patch_infinity(got)
    assert got.state_dict().keys() == keys.keys()
    assert all(torch.equal(got.state_dict()[k], v) for k, v in keys.items())
    patch_infinity(got, backend="reference")  # patching again only changes the backend
    tables = rope_tables(16, SCHEDULE, 2, max_side=16)
    x = torch.randn(1, L, 48).to(DEVICE)
    unpatch_infinity(got)
    assert all("forward" not in a.__dict__ and "kv_caching" not in a.__dict__ for a in got.attentions())
    assert torch.equal(got(x, _mask(), SCHEDULE, tables), want(x, _mask(), SCHEDULE, tables))
    with pytest.raises(ValueError, match="not patched"):
        unpatch_infinity(got)


def test_one_attention_module_and_bad_inputs():
    attn = _randomize(InfinitySelfAttention(48, 3), 6).to(DEVICE)
    assert patch_infinity(attn) is attn and "forward" in attn.__dict__
    with pytest.raises(TypeError, match="no FoundationVision/Infinity SelfAttention"):
        patch_infinity(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_infinity("model")
    with pytest.raises(ValueError, match="backend"):
        patch_infinity(InfinitySelfAttention(48, 3), backend="fast")
    tables = rope_tables(16, SCHEDULE, 2, max_side=16)
    with pytest.raises(ValueError, match="exceed"):
        attn(torch.randn(1, 3, 48).to(DEVICE), None, scale_schedule=SCHEDULE, rope2d_freqs_grid=tables,
             scale_ind=len(SCHEDULE))


def test_reachable_from_the_package():
    assert pf.integrations.infinity.patch_infinity is patch_infinity
