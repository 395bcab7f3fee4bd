"""Access to the compiled CUDA library ``posenc_fast._C`` (torch-agnostic).

The library takes raw pointers, sizes, element strides, a dtype code and a stream
handle; this module turns tensors into those arguments.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def driver_error(lib) -> Optional[str]:
    """Why the installed NVIDIA driver cannot run ``lib`` (None when it can, or when
    there is no driver at all: that is reported per device as "no CUDA device").

    The library links the CUDA runtime statically, so it needs a driver of at least
    its CUDA major; within a major, CUDA's minor-version compatibility applies."""
    built = str(lib.cuda_version)
    need = int(built.split(".")[0])
    try:
        driver = int(lib.driver_version())
    except RuntimeError as exc:
        return f"the CUDA driver could not be queried ({exc})"
    have = driver // 1000
    if driver == 0 or have >= need:
        return None
    return (f"this posenc_fast build needs an NVIDIA driver for CUDA {need} (it was built with "
            f"CUDA {built}), but the installed driver supports CUDA {have}.{driver % 1000 // 10} at "
            f"most: install the posenc-fast wheel for CUDA {have} (version suffix +cu{have}) or "
            f"upgrade the driver")


try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # not built (no nvcc / POSENC_FAST_BUILD_CUDA=0) or broken
    _C = None
    _LOAD_ERROR: Optional[str] = f"the CUDA extension is not built or failed to load ({exc})"
else:
    _LOAD_ERROR = driver_error(_C)
    if _LOAD_ERROR:
        # Said once, at import; the cuda backend then reports it as its reason while
        # the triton and reference backends keep working.
        warnings.warn(f"posenc_fast: the cuda backend is disabled: {_LOAD_ERROR}", RuntimeWarning)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def connect(library, exchange_api: bool = True) -> bool:
    """Tells ``library`` (``_C``, or a stand-in with its API) how its launch plans
    read torch tensors: through torch's DLPack C exchange API where torch has one
    (torch.Tensor.__dlpack_c_exchange_api__: a C call per tensor, no Python), else
    through ``torch.utils.dlpack.to_dlpack`` (one capsule per tensor). Returns
    whether the exchange API is used; ``exchange_api=False`` forces the fallback."""
    api = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None) if exchange_api else None
    return bool(library.set_tensor_exchange(api, torch.utils.dlpack.to_dlpack, _raw_stream, torch.Tensor,
                                            torch.nn.Parameter))


if _C is not None and not _LOAD_ERROR:
    connect(_C)


def load_error() -> Optional[str]:
    return _LOAD_ERROR


def lib():
    """The extension module; RuntimeError with the reason when it is missing or the
    driver cannot run it."""
    if _LOAD_ERROR:
        raise RuntimeError(f"posenc_fast: {_LOAD_ERROR}")
    return _C


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def stream(device: torch.device) -> int:
    """Handle of the current stream of ``device`` (launches follow torch's stream, so
    CUDA graphs capture them). The raw query skips building a Stream object: a tenth
    of the host time, which counts at sampling sizes."""
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream
