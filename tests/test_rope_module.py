"""PyramidRoPE: whole sequence vs scale-by-scale inference, prefix tokens, schedules,
RoPE-Mixed parameters, state dict, dtype casts."""

import pytest
import torch

import posenc_fast as pf
from posenc_fast.reference import rope as ref
from conftest import DEVICE, fast_backends

BACKENDS = ["reference"] + fast_backends()
SCHEDULE = [1, 2, (3, 4), (4, 6)]  # L = 41


def _rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_by_scale_equals_whole_sequence(backend):
    """KV-cached inference (batch doubled for CFG) gives the rows of the training call."""
    torch.manual_seed(0)
    rope = pf.PyramidRoPE(32, SCHEDULE, mode="round", backend=backend).to(DEVICE)
    L = ref.scale_offsets(SCHEDULE)[-1]
    q, k = _rand(2, 2, L, 32), _rand(2, 2, L, 32)
    whole = rope(q, k)
    want = pf.apply_rope(q, k, pf.pyramid_coords(SCHEDULE, mode="round").to(DEVICE), pf.axial_rope_freqs(32).to(DEVICE),
                         backend="reference")
    torch.testing.assert_close(whole[0], want[0], atol=1e-5, rtol=1e-5)
    offsets = ref.scale_offsets(SCHEDULE)
    for s in range(len(SCHEDULE)):
        a, b = offsets[s], offsets[s + 1]
        qs, ks = q[:, :, a:b].repeat(2, 1, 1, 1), k[:, :, a:b].repeat(2, 1, 1, 1)
        part = rope(qs, ks, scale_index=s)
        assert torch.equal(part[0], whole[0][:, :, a:b].repeat(2, 1, 1, 1))
        assert torch.equal(part[1], whole[1][:, :, a:b].repeat(2, 1, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_forward(backend):
    torch.manual_seed(1)
    rope = pf.PyramidRoPE(16, SCHEDULE, backend=backend).to(DEVICE)
    q, k = _rand(1, 2, 41, 16), _rand(1, 2, 41, 16)
    want = rope(q, k)
    qq, kk = q.clone(), k.clone()
    out = rope(qq, kk, inplace=True)
    assert out[0] is qq and out[1] is kk
    torch.testing.assert_close(qq, want[0], atol=1e-6, rtol=1e-6)


def test_prefix_tokens_are_not_rotated():
    """A class / sos token before the pyramid sits at position (0, 0): identity."""
    torch.manual_seed(2)
    rope = pf.PyramidRoPE(16, [(2, 2)], mode="raw", prefix_tokens=1)
    q = _rand(1, 1, 5, 16)
    out, _ = rope(q, None)
    assert torch.equal(out[:, :, 0], q[:, :, 0])
    want, _ = pf.apply_rope(q[:, :, 1:], None, pf.pyramid_coords([(2, 2)]), pf.axial_rope_freqs(16))
    assert torch.equal(out[:, :, 1:], want)
    # the prefix travels with the first scale in scale-by-scale calls
    assert torch.equal(rope(q, None, scale_index=0)[0], out)


def test_other_schedule_and_final_grid():
    """Infinity maps every schedule of an aspect ratio onto the largest grid (final)."""
    full = (1, 2, 4, 6, 8, 12, 16)
    prefix = full[:5]
    rope = pf.PyramidRoPE(16, full, mode="round", final=(16, 16))
    coords, sched = rope.coords_for(prefix)
    L = ref.scale_offsets(prefix)[-1]
    assert sched == tuple((p, p) for p in prefix)
    assert torch.equal(coords, rope.coords[:L])  # the prefix of the full schedule's coordinates
    assert rope.coords_for(prefix)[0] is coords  # built once
    q = _rand(1, 1, L, 16)
    torch.testing.assert_close(rope(q, None, scales=prefix)[0],
                               pf.apply_rope(q, None, rope.coords[:L], rope.freqs)[0])


def test_state_dict_and_mixed_parameters():
    rope = pf.PyramidRoPE(32, SCHEDULE)
    assert list(rope.state_dict()) == []  # no coordinate or frequency tables
    mixed = pf.PyramidRoPE(32, SCHEDULE, mixed=True, num_heads=4)
    assert list(mixed.state_dict()) == ["freqs"] and isinstance(mixed.freqs, torch.nn.Parameter)
    assert mixed.freqs.shape == (4, 2, 16)
    other = pf.PyramidRoPE(32, SCHEDULE, mixed=True, num_heads=4)
    other.load_state_dict(mixed.state_dict())
    assert torch.equal(other.freqs, mixed.freqs)
    # learnable: gradients reach the frequencies
    q = _rand(2, 4, 41, 32, grad=True).cpu()
    out, _ = mixed(q, None)
    out.square().sum().backward()
    assert mixed.freqs.grad is not None and mixed.freqs.grad.abs().sum() > 0


def test_column_first_vit_grid_with_class_token():
    """RoPE-ViT's axial variant: one grid, a class token that does not rotate, the
    column on the first quarter of the pairs, base 100."""
    torch.manual_seed(5)
    rope = pf.PyramidRoPE(32, [(3, 4)], mode="raw", base=100.0, first="col", prefix_tokens=1)
    assert torch.equal(rope.freqs, pf.axial_rope_freqs(32, base=100.0, first="col"))
    q = _rand(2, 2, 13, 32).cpu()
    out, _ = rope(q, None)
    assert torch.equal(out[:, :, 0], q[:, :, 0])
    # moving one column rotates only dims [0, D/2) (pairs [0, D/4), interleaved)
    assert torch.equal(out[:, :, 2, 16:], q[:, :, 2, 16:]) and not torch.equal(out[:, :, 2, :16], q[:, :, 2, :16])
    cast = rope.to(torch.float16)
    assert torch.equal(cast.freqs, pf.axial_rope_freqs(32, base=100.0, first="col"))


def test_dtype_cast_keeps_fp32_positions_and_freqs():
    rope = pf.PyramidRoPE(64, (1, 2, 3, 5), mode="fractional").to(torch.bfloat16)
    assert rope.coords.dtype == torch.float32 and rope.freqs.dtype == torch.float32
    assert torch.equal(rope.freqs, pf.axial_rope_freqs(64))
    assert torch.equal(rope.coords, pf.pyramid_coords((1, 2, 3, 5), mode="fractional"))


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(mode="nearest"), ValueError, "mode"),
    (dict(pairing="neox"), ValueError, "pairing"),
    (dict(mixed=True), ValueError, "num_heads"),
    (dict(prefix_tokens=-1), ValueError, "prefix_tokens"),
    (dict(first="y"), ValueError, "first must be one of"),
    (dict(mixed=True, num_heads=2, first="col"), ValueError, "learns its own directions"),
])
def test_module_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        pf.PyramidRoPE(16, SCHEDULE, **kwargs)


def test_bad_scale_index():
    rope = pf.PyramidRoPE(16, SCHEDULE)
    with pytest.raises(ValueError, match="scale_index"):
        rope(_rand(1, 1, 1, 16).cpu(), None, scale_index=4)
