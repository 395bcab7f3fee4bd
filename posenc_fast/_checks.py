"""Argument validation shared by every op: clear errors that name the argument."""

from __future__ import annotations

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
    """Contiguous output buffer shaped like ``t`` (cheaper on the host than ``empty``)."""
    out = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    if _POISON:
        out.fill_(float("nan"))
    return out
