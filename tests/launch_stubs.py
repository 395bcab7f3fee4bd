"""Fast backends on CPU tensors with every kernel launch replaced by a no-op.

Used by the host-overhead benchmark (bench/host_overhead.py) and its guard test
(tests/test_fast_path.py): the ops run their whole Python path -- checks, backend
choice, autograd decision, output allocation, launch parameters -- down to the
launch itself, with no device work and no interpreter. The CUDA library's launch
plans (csrc/bindings/launch_plan.h) run in the compiled library itself where it is
built, in its dry-run mode: their C checks of the tensors count, only the launch is
left out; without it, stand-ins that launch nothing take their place.
"""

import contextlib
from typing import Iterator

from posenc_fast import _backends, _cuda, _fastpath


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


class _StubLibrary:
    """Stands in for the compiled CUDA library: every entry point returns at once,
    except the two that size workspaces, which answer like the real ones, and the
    launch plans (the real library's, dry, where it is built)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name == "launch_planned" or name.endswith("_plan"):
            if self._real is not None:
                fn = getattr(self._real, name)
            elif name == "launch_planned":
                fn = lambda *a: True  # noqa: E731
            else:
                fn = lambda *a: object()  # noqa: E731
        elif name == "qkv_proj_bwd_rows_per_chunk":
            fn = lambda: 64  # noqa: E731
        elif name == "rope_workspace_floats":
            fn = lambda *a: 1  # noqa: E731
        else:
            fn = lambda *a: None  # noqa: E731
        # Kept as an attribute: later calls find it like the module's own functions,
        # so the stub costs no more host time than the entry point it replaces.
        setattr(self, name, fn)
        return fn


def _triton_modules():
    from posenc_fast.triton_kernels import pos_embed_add as te, pyramid_pos_level_add as tp, qkv_proj as tq, \
        rope as tr

    return tp, tq, tr, te


@contextlib.contextmanager
def stubbed_device_work() -> Iterator[None]:
    """Fast backends run on CPU tensors with their kernel launches replaced by no-ops."""
    saved = []

    def swap(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    swap(_backends, "unavailable_reason", lambda name, device=None: None)
    real = _cuda._C if _cuda.load_error() is None else None
    stub_library = _StubLibrary(real)
    if real is not None:
        real.set_dry_run(True)
    swap(_cuda, "lib", lambda: stub_library)
    swap(_cuda, "stream", lambda device: 0)  # CPU tensors have no CUDA stream
    import triton

    for mod in _triton_modules():
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)) or \
                    type(obj).__name__ in ("InterpretedFunction", "Heuristics"):
                swap(mod, name, _NoLaunch())
    _fastpath.clear_plans()  # plans made with the real library (or another stub) stay out
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        if real is not None:
            real.set_dry_run(False)
        _fastpath.clear_plans()
