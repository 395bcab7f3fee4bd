"""Access to the compiled CUDA library ``posenc_fast._C`` (torch-agnostic).

The library takes raw pointers, sizes, element strides, a dtype code and a stream
handle; this module turns tensors into those arguments.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C  # type: ignore[attr-defined]

    _LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # not built (no nvcc / POSENC_FAST_BUILD_CUDA=0) or broken
    _C = None
    _LOAD_ERROR = f"the CUDA extension is not built or failed to load ({exc})"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def load_error() -> Optional[str]:
    return _LOAD_ERROR


def lib():
    """The extension module; RuntimeError with the reason when it is missing."""
    if _C is None:
        raise RuntimeError(f"posenc_fast: {_LOAD_ERROR}")
    return _C


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def stream(device: torch.device) -> int:
    """Handle of the current stream of ``device`` (launches follow torch's stream, so
    CUDA graphs capture them)."""
    return torch.cuda.current_stream(device).cuda_stream
