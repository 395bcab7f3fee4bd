"""The eager fast path shared by the ops: host time per call is what decides
scale-by-scale sampling, where each kernel takes a few microseconds.

Every public op keeps its ``torch.library`` custom op, which ``torch.compile``,
``make_fx``/``torch.export``, fake tensors and functorch transforms trace. In plain
eager mode the dispatcher round trip of a custom op costs several times the kernel
launch, so there the ops call the same implementation directly (no autograd
needed) or through a ``torch.autograd.Function`` (autograd needed), with the
argument checks and the backend choice cached per call signature (``PlanCache``).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Hashable, List, Optional

import torch

from . import _checks

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def _traced() -> bool:
    """Compiling, a dispatch or function mode, a functorch transform or a JIT trace:
    anything that must see the custom op."""
    return (_is_compiling() or bool(_dispatch_modes()) or _functorch_level() is not None or _function_modes()
            or torch._C._get_tracing_state() is not None)


def eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call may bypass its custom op: plain eager mode (``_traced`` is
    false) on plain tensors."""
    if _traced():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


CUSTOM_OP, AUTOGRAD, DIRECT = "custom op", "autograd", "direct"


def route(*tensors: Optional[torch.Tensor]) -> str:
    """How a call runs: ``DIRECT`` (plain eager, no gradient needed: the launcher
    itself), ``AUTOGRAD`` (plain eager with a gradient: the autograd Function) or
    ``CUSTOM_OP`` (anything traced or transformed): ``eager`` and ``needs_autograd``
    in one pass, for the ops whose whole host time is a few microseconds."""
    if _traced():
        return CUSTOM_OP
    grad = torch.is_grad_enabled()
    needs = False
    for t in tensors:
        if t is not None:
            if type(t) not in _PLAIN:
                return CUSTOM_OP
            if grad and t.requires_grad:
                needs = True
    return AUTOGRAD if needs else DIRECT


def pick(custom_op: Callable, impl: Callable, *tensors: Optional[torch.Tensor]) -> Callable:
    """For backward formulas: ``impl`` in plain eager mode, else the custom op. A
    backward runs with grad mode on only under create_graph=True: then the custom op,
    whose registered autograd raises a clear error for double backward, must run."""
    return impl if eager(*tensors) and not torch.is_grad_enabled() else custom_op


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def tensor_key(t: Optional[torch.Tensor]) -> Hashable:
    """What argument checks read of a tensor: shape, dtype, device."""
    return None if t is None else (t.shape, t.dtype, t.device)


_CACHES: List = []  # every plan cache, for clear_plans()


def clear_plans() -> None:
    """Empties every cached plan (tests and benchmarks that swap the CUDA library or
    the backends' availability call this)."""
    for cache in _CACHES:
        cache.clear()


def launch_plans() -> Dict[Hashable, tuple]:
    """The planned CUDA launches of an op, from its non-tensor arguments to
    ``(alloc, launch, plan, keep)``: ``out = alloc(x)``, then ``launch(plan, out,
    *tensors)`` launches the library's plan, or returns False (nothing launched) when
    a tensor's type, device, dtype, shape or strides differ from the call that made
    the plan, which the library checks in C (csrc/bindings/launch_plan.h). ``keep``
    holds the tensors whose pointers the plan holds. Grows by one entry per
    signature with new non-tensor arguments; a new plan replaces the old one."""
    plans: Dict[Hashable, tuple] = {}
    _CACHES.append(plans)
    return plans


def launch_planned(plan: tuple, x, *tensors) -> Optional[torch.Tensor]:
    """The output of ``plan`` (a ``launch_plans`` entry) launched on ``x`` and the
    op's other tensors, or None when it does not take them (nothing launched)."""
    alloc, launch, capsule, _ = plan
    try:
        out = alloc(x)
    except (TypeError, AttributeError):  # x is no tensor: the op's checks say so
        return None
    return out if launch(capsule, out, x, *tensors) else None


def output_allocator(x: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``alloc(x)``: a contiguous tensor like ``x`` in ``dtype``, as cheaply as the
    plan's signature (x contiguous, same dtype) allows."""
    if dtype == x.dtype and x.is_contiguous() and not _checks._POISON:
        return torch.empty_like
    return functools.partial(_checks.empty_like, dtype=dtype)


class PlanCache:
    """Validated metadata per call signature. A key holds everything the checks and
    the backend choice read (shapes, dtypes, devices, scalar arguments, the
    requested backend), so a hit can skip them; bounded, so an unusual workload
    with ever-new shapes cannot grow it without limit."""

    def __init__(self, capacity: int = 4096):
        self._plans: Dict[Hashable, object] = {}
        self._capacity = capacity
        _CACHES.append(self._plans)

    def lookup(self, key: Optional[Hashable]):
        """The plan of ``key``, or None (not cached, no key, or an unhashable one)."""
        try:
            return self._plans.get(key)
        except TypeError:
            return None

    def get(self, key: Optional[Hashable], build: Callable[[], object]):
        if key is None:
            return build()
        try:
            return self._plans[key]
        except KeyError:
            pass
        except TypeError:  # unhashable argument (e.g. lists inside patch_nums): no caching
            return build()
        plan = build()
        if len(self._plans) >= self._capacity:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()


def autograd_function(forward_impl: Callable, setup_context: Callable, backward: Callable,
                      name: str) -> type:
    """A ``torch.autograd.Function`` with the forward implementation, context setup
    and backward formula that the custom op registers, for the eager path."""

    def forward(ctx, *inputs):
        out = forward_impl(*inputs)
        setup_context(ctx, inputs, out)
        return out

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })
