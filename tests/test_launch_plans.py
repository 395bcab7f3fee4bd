"""The compiled library's launch plans (csrc/bindings/launch_plan.h), in its dry-run
mode (every check, no launch), so they run without a GPU: a plan launches only for
tensors whose type, device, dtype, shape and strides are those it was made with,
read through torch's DLPack exchange API or through to_dlpack capsules. The ops'
use of them, with the kernels run, is tested in test_cuda_emulation.py."""

import os

import pytest
import torch

from posenc_fast import _cuda

if _cuda.load_error() is not None:
    if os.environ.get("POSENC_FAST_REQUIRE_CUDA_EXT") == "1":
        raise RuntimeError(f"the CUDA extension must load here: {_cuda.load_error()}")
    pytest.skip(f"no CUDA extension: {_cuda.load_error()}", allow_module_level=True)

LIB = _cuda._C


@pytest.fixture(params=["exchange_api", "to_dlpack"])
def lib(request):
    _cuda.connect(LIB, exchange_api=request.param == "exchange_api")
    LIB.set_dry_run(True)
    yield LIB
    LIB.set_dry_run(False)
    _cuda.connect(LIB)


class _Sub(torch.Tensor):
    pass


def _pyramid_plan(lib, x, pos, lvl, meta):
    B, n, C = x.shape
    return lib.pyramid_pos_level_add_fwd_plan(
        x, 0, x.stride(), pos, 0 if pos is None else 0, (0, 0) if pos is None else pos.stride()[-2:], lvl, 0,
        lvl.stride(), meta.data_ptr(), 0, 0, B, n, C, 1, 1.0, 0.0, 0, 0)


def test_a_plan_launches_only_for_the_tensors_it_was_made_with(lib):
    x, pos, lvl = torch.randn(2, 4, 8), torch.randn(1, 14, 8), torch.nn.Parameter(torch.randn(3, 8))
    meta = torch.zeros(14, 3, dtype=torch.int32)
    plan = _pyramid_plan(lib, x, pos, lvl, meta)
    out = torch.empty_like(x)
    assert lib.launch_planned(plan, out, x, pos, lvl) is True
    # Other tensors of the same signature (other storage, requires_grad, a Parameter) launch.
    assert lib.launch_planned(plan, out, torch.randn(2, 4, 8).requires_grad_(), torch.randn(1, 14, 8),
                              torch.randn(3, 8)) is True
    different = {
        "x dtype": (x.double(), pos, lvl),
        "x shape": (torch.randn(3, 4, 8), pos, lvl),
        "x strides": (torch.randn(4, 2, 8).transpose(0, 1), pos, lvl),
        "x broadcast along C": (torch.randn(2, 8, 4).transpose(1, 2)[:, :, :1].expand(2, 4, 8), pos, lvl),
        "pos missing": (x, None, lvl),
        "pos dims": (x, pos[0], lvl),
        "lvl dtype": (x, pos, lvl.detach().half()),
        "lvl subclass": (x, pos, torch.Tensor._make_subclass(_Sub, lvl.detach())),
        "lvl not a tensor": (x, pos, [[0.0] * 8] * 3),
        "x 5-d": (torch.randn(1, 1, 2, 4, 8), pos, lvl),
    }
    for what, tensors in different.items():
        assert lib.launch_planned(plan, out, *tensors) is False, what
    assert lib.launch_planned(plan, None, x, pos, lvl) is False  # no output tensor
    with pytest.raises(TypeError, match="takes 3 tensors"):
        lib.launch_planned(plan, out, x, pos)
    with pytest.raises((TypeError, ValueError)):
        lib.launch_planned(object(), out, x, pos, lvl)


def test_plans_without_optional_tensors_and_of_every_family(lib):
    x, lvl = torch.randn(2, 4, 8, dtype=torch.bfloat16), torch.randn(3, 8)
    meta = torch.zeros(14, 3, dtype=torch.int32)
    plan = _pyramid_plan(lib, x, None, lvl, meta)
    assert lib.launch_planned(plan, torch.empty(2, 4, 8), x, None, lvl) is True
    assert lib.launch_planned(plan, torch.empty(2, 4, 8), x, torch.randn(1, 14, 8), lvl) is False
    grid = torch.randn(1, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    chunks = torch.zeros(3, 8, dtype=torch.int32)
    plan = lib.pos_embed_add_grid_fwd_plan(x, 2, x.stride(), grid, 0, grid.stride()[-3:], 5, 7, chunks.data_ptr(),
                                           3, 0, 0, 2, 4, 8, 0, 0)
    assert lib.launch_planned(plan, torch.empty(2, 4, 8), x, grid) is True
    assert lib.launch_planned(plan, torch.empty(2, 4, 8), x, grid.contiguous()) is False
    plan = lib.pos_embed_add_fwd_plan(x, 2, x.stride(), None, 0, (0, 0), 0, 0, 0, 0, 0, 0, 0, 0, 2, 4, 8, 0, 1.0,
                                      0, 0)
    assert lib.launch_planned(plan, torch.empty(2, 4, 8), x, None) is True


def test_plan_arguments_are_checked_when_the_plan_is_made(lib):
    x, lvl = torch.randn(2, 4, 8), torch.randn(3, 8)
    meta = torch.zeros(14, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype code"):
        lib.pyramid_pos_level_add_fwd_plan(x, 7, x.stride(), None, 0, (0, 0), lvl, 0, lvl.stride(),
                                           meta.data_ptr(), 0, 0, 2, 4, 8, 1, 1.0, 0.0, 0, 0)
    with pytest.raises(TypeError, match="launch plan takes None or a tensor"):
        lib.pyramid_pos_level_add_fwd_plan(torch.randn(1, 1, 2, 4, 8), 0, x.stride(), None, 0, (0, 0), lvl, 0,
                                           lvl.stride(), meta.data_ptr(), 0, 0, 2, 4, 8, 1, 1.0, 0.0, 0, 0)
    with pytest.raises(TypeError, match="x_stride"):
        lib.pyramid_pos_level_add_fwd_plan(x, 0, "no", None, 0, (0, 0), lvl, 0, lvl.stride(), meta.data_ptr(), 0,
                                           0, 2, 4, 8, 1, 1.0, 0.0, 0, 0)


def test_set_tensor_exchange_checks_its_arguments():
    with pytest.raises(TypeError):
        LIB.set_tensor_exchange(None, None, None, torch.Tensor, torch.nn.Parameter)
    with pytest.raises(TypeError):
        LIB.set_tensor_exchange(None, torch.utils.dlpack.to_dlpack, None, torch.Tensor)
    assert _cuda.connect(LIB) == hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
