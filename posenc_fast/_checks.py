"""Argument validation shared by every op: clear errors that name the argument."""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim=None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 allow_none: bool = False) -> None:
    """TypeError when ``t`` is not a tensor of one of ``dtypes``; ValueError when its
    number of dimensions is not ``ndim`` (an int or a tuple of ints)."""
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")


def check_float_tensor(name: str, t, *, ndim=None, allow_none: bool = False) -> None:
    """Like ``check_tensor`` for tensors of any floating dtype (positions, frequencies,
    scales: the kernels read them as fp32)."""
    check_tensor(name, t, dtypes=None, allow_none=allow_none)
    if t is None:
        return
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {str(t.dtype).replace('torch.', '')}")
    check_tensor(name, t, ndim=ndim, dtypes=None)


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """ValueError when the given tensors are not on one device; returns that device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{k} is on {d} but {first_name} is on {first}: all tensors must be on one device")
    return first


def check_int(name: str, v, *, minimum: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


# Tests set POSENC_FAST_POISON=1 so that every output buffer starts as NaN: an
# element a kernel forgets to write then fails the comparison instead of passing
# by luck on zeroed memory.
_POISON = os.environ.get("POSENC_FAST_POISON", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer that a kernel will overwrite entirely."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous output buffer shaped like ``t`` (cheaper on the host than ``empty``;
    without keywords, cheaper still, where that is contiguous too)."""
    if dtype == t.dtype and t.is_contiguous():
        out = torch.empty_like(t)
    else:
        out = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    if _POISON:
        out.fill_(float("nan"))
    return out


def check_positive_int(name: str, v) -> int:
    """TypeError unless ``v`` is an int (not a bool); ValueError unless it is >= 1."""
    return check_int(name, v, minimum=1)


def check_no_grad(name: str, t: Optional[torch.Tensor], why: str) -> None:
    """ValueError when ``t`` would need a gradient that no backend computes: every
    backend refuses alike instead of some silently leaving ``t.grad`` at None."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but {why}; pass {name}.detach() (or run under torch.no_grad())")


# Node budget of the exact overlap search; layouts that exceed it (none of the usual
# ones come close) are decided by listing their element offsets.
_OVERLAP_SEARCH_BUDGET = 20000


def _solvable(dims, lo: int, hi: int, budget: list) -> Optional[bool]:
    """Whether integers c_i in [c_lo_i, c_hi_i] exist with lo <= sum_i s_i c_i <= hi,
    for ``dims`` = [(s_i > 0, c_lo_i, c_hi_i)] sorted by decreasing s_i; None when the
    search exceeds ``budget[0]`` nodes. Depth-first over the largest stride first:
    each c_i is confined to the values that the smaller strides can still complete,
    which for nested layouts leaves one or two candidates per level."""
    rest_lo = [0] * (len(dims) + 1)
    rest_hi = [0] * (len(dims) + 1)
    for i in range(len(dims) - 1, -1, -1):
        s, a, b = dims[i]
        rest_lo[i] = rest_lo[i + 1] + s * a
        rest_hi[i] = rest_hi[i + 1] + s * b

    def search(i: int, lo: int, hi: int) -> Optional[bool]:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        if i == len(dims):
            return lo <= 0 <= hi
        s, a, b = dims[i]
        first = max(a, -((rest_hi[i + 1] - lo) // s))  # ceil((lo - rest_hi) / s)
        last = min(b, (hi - rest_lo[i + 1]) // s)
        for c in range(first, last + 1):
            found = search(i + 1, lo - s * c, hi - s * c)
            if found is None or found:
                return found
        return False

    return search(0, lo, hi)


def _offsets(shape, stride, item: int) -> torch.Tensor:
    """Byte offsets (from the data pointer) of every element of a layout, int64."""
    off = torch.zeros((), dtype=torch.int64)
    for st, n in zip(stride, shape):
        off = off[..., None] + torch.arange(n, dtype=torch.int64) * (st * item)
    return off.reshape(-1)


# The decisions depend on the layouts only (and on the distance between the data
# pointers), which repeat from call to call: cached, they cost no host time.
@functools.lru_cache(maxsize=256)
def _layout_self_overlap(shape, stride, item: int) -> bool:
    dims = sorted(((st * item, n) for st, n in zip(stride, shape) if n > 1), key=lambda d: d[0])
    if dims and dims[0][0] == 0:
        return True
    # Nested strides (each one past the span of the smaller ones, e.g. any view that
    # slices or permutes a dense buffer) cannot overlap: no search needed.
    span = 0
    for st, n in dims:
        if st <= span:
            break
        span += st * (n - 1)
    else:
        return False
    dims.reverse()
    budget = [_OVERLAP_SEARCH_BUDGET]
    # Two elements coincide iff sum_i s_i (a_i - b_i) = 0 with a != b; take the
    # largest-stride dim where they differ as i0 (differences above it are zero,
    # and by symmetry the one at i0 is positive).
    for i0, (st, n) in enumerate(dims):
        rest = [(sj, -(nj - 1), nj - 1) for sj, nj in dims[i0 + 1:]]
        found = _solvable([(st, 1, n - 1)] + rest, 0, 0, budget)
        if found is None:
            return _offsets(shape, stride, item).unique().numel() != math.prod(shape)
        if found:
            return True
    return False


@functools.lru_cache(maxsize=256)
def _layout_overlap(shape_a, stride_a, item_a: int, shape_b, stride_b, item_b: int, delta: int) -> bool:
    """Whether a layout at byte ``delta`` from another shares a byte with it."""
    # An element at byte offset x of a and one at y of b share a byte iff
    # -item_b < x - y < item_a, with x - y = delta + sum s_i c_i over a's dims
    # (c_i >= 0) and b's dims (c_i <= 0).
    ranges = {}
    for st, lo, hi in ([(st * item_a, 0, n - 1) for st, n in zip(stride_a, shape_a) if n > 1] +
                       [(st * item_b, -(n - 1), 0) for st, n in zip(stride_b, shape_b) if n > 1]):
        if st:
            # Equal strides (q and k of one packed buffer) merge into one dim: the
            # sums of two integer ranges are exactly the integers of the summed range.
            old_lo, old_hi = ranges.get(st, (0, 0))
            ranges[st] = (old_lo + lo, old_hi + hi)
    dims = sorted(((st, lo, hi) for st, (lo, hi) in ranges.items()), key=lambda d: -d[0])
    found = _solvable(dims, -delta - item_b + 1, -delta + item_a - 1, [_OVERLAP_SEARCH_BUDGET])
    if found is None:
        offs_a = _offsets(shape_a, stride_a, item_a)[:, None] + torch.arange(item_a) + delta
        offs_b = _offsets(shape_b, stride_b, item_b)[:, None] + torch.arange(item_b)
        return bool(torch.isin(offs_a.reshape(-1), offs_b.reshape(-1)).any())
    return found


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` share memory (e.g. a stride-0 expand, or
    as_strided windows), decided exactly: not torch's conservative 'too hard'."""
    verdict = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: torch cannot tell
    if verdict != 2:
        return verdict == 1
    return _layout_self_overlap(tuple(t.shape), t.stride(), t.element_size())


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when some element of ``a`` and some element of ``b`` share a byte.
    Disjoint interleaved views of one buffer (q and k of a packed qkv tensor) do not
    overlap even though their address ranges do."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):  # [first byte, end) (torch strides are never negative)
        last = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (alo, ahi), (blo, bhi) = span(a), span(b)
    if ahi <= blo or bhi <= alo:
        return False
    return _layout_overlap(tuple(a.shape), a.stride(), a.element_size(), tuple(b.shape), b.stride(),
                           b.element_size(), a.data_ptr() - b.data_ptr())


def check_writable(name: str, t: Optional[torch.Tensor]) -> None:
    """ValueError when an in-place write to ``t`` would write one memory location
    through several elements (eager PyTorch refuses such writes too)."""
    if t is not None and has_internal_overlap(t):
        raise ValueError(f"{name} is written in place but more than one of its elements refers to a single "
                         f"memory location (e.g. an expanded tensor, shape {tuple(t.shape)}, strides "
                         f"{tuple(t.stride())}): pass {name}.clone() or a tensor with its own memory")


def check_disjoint(name_a: str, a: Optional[torch.Tensor], name_b: str, b: Optional[torch.Tensor]) -> None:
    """ValueError when tensors written in place share memory (the result would depend
    on the order of the writes, which differs between backends)."""
    if a is not None and b is not None and overlap(a, b):
        what = "are the same tensor" if (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                                         and a.stride() == b.stride()) else "share memory"
        raise ValueError(f"{name_a} and {name_b} {what}, but both are written in place: pass tensors whose "
                         f"elements do not overlap (e.g. the q and k views of a packed qkv buffer)")


def refuse_double_backward(backward_op, op: str) -> None:
    """Registers an autograd formula for a fused backward custom op (whose last
    argument is the backend) that raises a clear RuntimeError: the kernels have no
    second derivative, and torch's own message ("no autograd formula was registered")
    names an internal op. The error comes only when a double backward really goes
    through the op, so create_graph=True elsewhere in a model keeps working."""

    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[-1]

    def backward(ctx, *grads):
        raise RuntimeError(
            f"posenc_fast: {op} (backend {ctx.backend!r}) does not support double backward (a backward through "
            f"gradients made with create_graph=True): its fused backward kernels have no derivative; use "
            f"backend='reference' for higher-order gradients")

    backward_op.register_autograd(backward, setup_context=setup_context)
