"""Backend registry: which implementations exist, which can run, and which one a call uses.

Backends: ``cuda`` (hand-written kernels in ``posenc_fast._C``), ``triton``
(``posenc_fast.triton_kernels``) and ``reference`` (pure PyTorch, always available).
A call's backend comes from, in order: its ``backend=`` argument, the innermost
``use_backend(...)`` context, the ``POSENC_FAST_BACKEND`` environment variable,
then ``auto``. ``auto`` picks the fastest available backend for the tensors' device
(the order per op is measured on GPUs; CPU tensors always get the reference). A
backend that is asked for by name but cannot run raises RuntimeError with the
reason: there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

BACKENDS = ("cuda", "triton", "reference")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "POSENC_FAST_BACKEND"
AVAILABLE = "available"

# Fastest-first order that `auto` tries on CUDA tensors, per op. Ops register theirs
# from measurements (bench/results); the default prefers the hand-written kernels.
_AUTO_ORDER: Dict[str, Sequence[str]] = {}
_DEFAULT_AUTO_ORDER = ("cuda", "triton", "reference")

class _Local(threading.local):
    def __init__(self):
        self.stack = []  # use_backend's names, innermost last, per thread


_local = _Local()


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name


def register_auto_order(op: str, order: Sequence[str]) -> None:
    """Sets the fastest-first backend order that ``auto`` uses for ``op`` on CUDA tensors."""
    for name in order:
        _check_name(name, "backend in auto order")
    _AUTO_ORDER[op] = tuple(order)


_TRITON_ERROR: list = []  # memo (a plain list, which torch.compile traces without warnings)


def _triton_import_error() -> Optional[str]:
    if not _TRITON_ERROR:
        err = None
        if importlib.util.find_spec("triton") is None:
            err = "triton is not installed (pip install triton)"
        else:
            try:
                import triton  # noqa: F401
            except Exception as exc:  # a broken install must not break the package
                err = f"triton failed to import: {exc}"
        _TRITON_ERROR.append(err)
    return _TRITON_ERROR[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device | str | None = None) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    device = torch.device(_default_device() if device is None else device)
    if name == "reference":
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            if _interpreting():
                return "TRITON_INTERPRET=1 is set: Triton runs on CPU tensors only"
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device.type == "cpu":
            return None if _interpreting() else (
                "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing posenc_fast)")
        return f"Triton does not run on {device.type} tensors"
    if name == "cuda":
        from . import _cuda

        err = _cuda.load_error()
        if err:
            return err
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(device: torch.device | str | None = None) -> Dict[str, str]:
    """Maps each backend to ``"available"`` or the reason it is not, for ``device``
    (default: the CUDA device when there is one, else the CPU)."""
    return {name: unavailable_reason(name, device) or AVAILABLE for name in BACKENDS}


def _stack() -> list:
    return _local.stack


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that sets the default backend of every op in this thread."""
    _check_name(name, "use_backend(name)")
    stack = _stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend name a call asks for before resolution (may be ``auto``)."""
    if backend is not None:
        return _check_name(backend, "backend")
    stack = _stack()
    if stack:
        return stack[-1]
    env = _env_backend()
    if env:
        return _check_name(env.strip().lower(), f"environment variable {ENV_VAR}")
    return "auto"


try:
    # os.environ's own dict (kept in sync by os.environ and monkeypatch.setenv): a
    # lookup there costs a tenth of os.environ.get, which encodes the key on every
    # call -- and every op call reads the variable.
    _ENV_DATA, _ENV_KEY, _decode = os.environ._data, os.environ.encodekey(ENV_VAR), os.environ.decodevalue
except AttributeError:  # not CPython's os.environ
    _ENV_DATA = None


def _env_backend() -> Optional[str]:
    if _ENV_DATA is None:
        return os.environ.get(ENV_VAR)
    v = _ENV_DATA.get(_ENV_KEY)
    return None if v is None else _decode(v)


def resolve_backend(op: str, backend: Optional[str], device: torch.device,
                    limits: Optional[Callable[[str], Optional[str]]] = None,
                    order: Optional[Sequence[str]] = None) -> str:
    """The concrete backend that runs ``op`` on tensors of ``device``.

    ``limits(name)`` says why backend ``name`` cannot take this call's shapes (None
    when it can): ``auto`` skips such a backend for the next one in its order; a
    backend asked for by name raises ValueError with that reason. ``order``: the op's
    own fastest-first order for this call's shapes (an order registered with
    ``register_auto_order`` from measurements takes precedence)."""
    name = requested_backend(backend)
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        for candidate in _AUTO_ORDER.get(op, order or _DEFAULT_AUTO_ORDER):
            if unavailable_reason(candidate, device) is None and (limits is None or limits(candidate) is None):
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"posenc_fast: backend {name!r} is not available for {op} on {device}: {reason}")
    reason = None if limits is None else limits(name)
    if reason is not None:
        raise ValueError(f"posenc_fast: backend {name!r} cannot run this {op} call: {reason}")
    return name
