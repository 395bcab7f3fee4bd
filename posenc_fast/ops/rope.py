"""``apply_rope`` / ``apply_rope_``: rotary position embedding of q and k in one fused op.

Public function -> argument checks -> backend choice -> either the reference (plain
autograd) or the custom ops ``posenc_fast::apply_rope`` (out of place, autograd via
``posenc_fast::apply_rope_backward``) and ``posenc_fast::apply_rope_`` (in place,
autograd through ``_InplaceRope``), whose implementations launch the Triton or CUDA
kernels. Launches go to the current stream without host syncs, so torch.compile
traces the ops without graph breaks and CUDA graphs capture them.

Outputs of the out-of-place op are dense tensors with the memory layout (stride
order) of the inputs, e.g. a (B, H, L, D) view of a (B, L, H, D) buffer gives a
(B, H, L, D) view of a fresh (B, L, H, D) buffer, which is what flash attention
wants.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import _backends, _checks, _fastpath
from .. import _cuda
from ..reference import rope as ref
from ..reference.rope import (PAIRINGS, axial_rope_freqs, hart_rope_tables, infinitystar_coords,  # noqa: F401
                              infinitystar_coords4d, infinitystar_rope4d_freqs, infinitystar_text_coords4d,
                              infinitystar_rope_freqs, mrope_freqs, pyramid_coords, rope_1d_freqs,
                              rope_mixed_freqs)

OP = "apply_rope"
# Fused kernels keep one head's pairs of a token block in registers.
MAX_FUSED_HEAD_DIM = 512
MAX_CUDA_AXES = 4


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised (poisoned in tests) dense tensor shaped like ``t`` whose strides
    follow ``t``'s stride order (ties keep the logical order)."""
    if t.is_contiguous():
        return _checks.empty_like(t, dtype=t.dtype)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    buf = _checks.empty([t.shape[d] for d in order], dtype=t.dtype, device=t.device)
    inverse = [0] * t.dim()
    for i, d in enumerate(order):
        inverse[d] = i
    return buf.permute(inverse)


def _fake_dense_like(t: torch.Tensor) -> torch.Tensor:
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    inverse = [0] * t.dim()
    for i, d in enumerate(order):
        inverse[d] = i
    return t.new_empty([t.shape[d] for d in order]).permute(inverse)


def _coord_strides(coords: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, token, axis) strides of (L, A) or (B, L, A) coords; batch 0 when shared."""
    if coords.dim() == 2:
        return 0, coords.stride(0), coords.stride(1)
    return coords.stride(0) if coords.shape[0] > 1 else 0, coords.stride(1), coords.stride(2)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


@functools.lru_cache(maxsize=64)
def _no_axes(P: int, device: torch.device) -> torch.Tensor:
    """The freqs of a table-defined rotation: no axes, (0, P). With it, the kernels
    read ``coords`` as the (2, B or 1, L, P) cos/sin table (one launch path, one
    custom-op schema for both kinds of rotation)."""
    return torch.empty((0, P), dtype=torch.float32, device=device)


def _pack_table(cos: torch.Tensor, sin: torch.Tensor, D: int, pairing: str) -> torch.Tensor:
    """(2, B or 1, L, P) contiguous fp32 cos/sin table; a full-width table (last dim
    D) becomes (4, B or 1, L, P): cos and sin of the pairs' first elements, then of
    their second elements."""
    if cos.shape[-1] == D:
        (c0, c1), (s0, s1) = ref._split_pairs(cos, pairing), ref._split_pairs(sin, pairing)
        t = torch.stack((c0, s0, c1, s1)).to(torch.float32)
    else:
        t = torch.stack((cos, sin)).to(torch.float32)
    return (t[:, None] if t.dim() == 3 else t).contiguous()


def _launch(q, k, q_out, k_out, coords, freqs, interleaved, conjugate, backend,
            q_saved=None, k_saved=None, dfreqs=None):
    """Runs the rotation kernel; with ``dfreqs`` (fp32, shaped like freqs) also the
    deterministic d freqs reduction into it, from the saved forward outputs. With
    freqs of no axes, ``coords`` is a packed cos/sin table (``_pack_table``)."""
    full_table = freqs.shape[-2] == 0 and coords.shape[0] == 4
    if freqs.shape[-2] == 0:  # (batch, token, plane) strides of the table
        cs = (coords.stride(1) if coords.shape[1] > 1 else 0, coords.stride(2), coords.stride(0))
    else:
        cs = _coord_strides(coords)
    B, Hq, L, D = q.shape
    Hk = 0 if k is None else k.shape[1]
    per_head = freqs.dim() == 3
    A = freqs.shape[-2]
    if backend == "triton":
        from ..triton_kernels import rope as tk

        partial = None
        if dfreqs is not None:
            rows = tk.partial_rows(B, L, D // 2, Hq, Hk, per_head, q.device)
            partial = _checks.empty((rows, A, D // 2), dtype=torch.float32, device=q.device)
        tk.apply_rope(q, k, q_out, k_out, coords, cs, freqs, interleaved=interleaved, conjugate=conjugate,
                      q_saved=q_saved, k_saved=k_saved, partial=partial, full_table=full_table)
        if dfreqs is not None:
            # Stage two of the reduction: a fixed-order sum over the partials.
            if per_head:
                torch.sum(partial.view(-1, Hq, A, D // 2), dim=0, out=dfreqs)
            else:
                torch.sum(partial, dim=0, out=dfreqs.view(A, D // 2))
    elif backend == "cuda":
        lib = _cuda.lib()
        kk, ko = (k, k_out) if k is not None else (q, q_out)
        qy = q_saved if dfreqs is not None else q
        ky = (k_saved if k is not None else q_saved) if dfreqs is not None else kk
        workspace = None
        if dfreqs is not None:
            n = lib.rope_workspace_floats(B, Hq, Hk, L, D, A, per_head)
            workspace = _checks.empty((n,), dtype=torch.float32, device=q.device)
        fstr = list(freqs.stride()) if per_head else [0] + list(freqs.stride())
        lib.rope_apply(
            _cuda.ptr(q), list(q.stride()), _cuda.ptr(kk), list(kk.stride()),
            _cuda.ptr(q_out), list(q_out.stride()), _cuda.ptr(ko), list(ko.stride()),
            _cuda.ptr(qy), list(qy.stride()), _cuda.ptr(ky), list(ky.stride()), _cuda.dtype_code(q),
            coords.data_ptr(), list(cs),
            _cuda.ptr(freqs), fstr, B, Hq, Hk, L, D, A, per_head, interleaved, conjugate, full_table,
            _cuda.ptr(workspace), _cuda.ptr(dfreqs), q.device.index, _cuda.stream(q.device))
    else:
        raise ValueError(f"posenc_fast::{OP} has no kernel for backend {backend!r}")


# ---------------------------------------------------------------- out of place

def _forward(q: torch.Tensor, k: Optional[torch.Tensor], coords: torch.Tensor, freqs: torch.Tensor,
             interleaved: bool, conjugate: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    q_out = _dense_like(q)
    k_out = _dense_like(k) if k is not None else q.new_empty((0,))
    _launch(q, k, q_out, k_out if k is not None else None, coords, freqs, interleaved, conjugate, backend)
    return q_out, k_out


_rope_op = torch.library.custom_op("posenc_fast::apply_rope", mutates_args=())(_forward)


@_rope_op.register_fake
def _(q, k, coords, freqs, interleaved, conjugate, backend):
    return _fake_dense_like(q), (_fake_dense_like(k) if k is not None else q.new_empty((0,)))


def _backward_impl(grad_q: torch.Tensor, grad_k: Optional[torch.Tensor], q_out: torch.Tensor,
                 k_out: Optional[torch.Tensor], coords: torch.Tensor, freqs: torch.Tensor, interleaved: bool,
                 conjugate: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a rotation whose outputs were (q_out, k_out): the conjugate
    rotation of the output gradients, and d freqs (fp32, shaped like freqs)."""
    dq = _dense_like(grad_q)
    dk = _dense_like(grad_k) if grad_k is not None else grad_q.new_empty((0,))
    dfreqs = _checks.empty(freqs.shape, dtype=torch.float32, device=freqs.device)
    _launch(grad_q, grad_k, dq, dk if grad_k is not None else None, coords, freqs, interleaved,
            not conjugate, backend, q_saved=q_out, k_saved=k_out, dfreqs=dfreqs)
    if conjugate:  # d/dtheta of R(-theta) is minus that of R(theta)
        dfreqs.neg_()
    return dq, dk, dfreqs


_rope_bwd_op = torch.library.custom_op("posenc_fast::apply_rope_backward", mutates_args=())(_backward_impl)


@_rope_bwd_op.register_fake
def _(grad_q, grad_k, q_out, k_out, coords, freqs, interleaved, conjugate, backend):
    dk = _fake_dense_like(grad_k) if grad_k is not None else grad_q.new_empty((0,))
    return _fake_dense_like(grad_q), dk, freqs.new_empty(freqs.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, coords, freqs, interleaved, conjugate, backend = inputs
    ctx.has_k = k is not None
    ctx.args = (interleaved, conjugate, backend)
    ctx.need_dfreqs = ctx.needs_input_grad[3]
    if ctx.need_dfreqs:
        # The outputs, not the inputs: attention keeps them alive anyway.
        ctx.save_for_backward(coords, freqs, output[0], output[1] if ctx.has_k else None)
    else:
        ctx.save_for_backward(coords, freqs)


def _backward(ctx, grad_q, grad_k):
    interleaved, conjugate, backend = ctx.args
    gk = grad_k if ctx.has_k else None
    if ctx.need_dfreqs:
        coords, freqs, q_out, k_out = ctx.saved_tensors
        bwd = _fastpath.pick(_rope_bwd_op, _backward_impl, grad_q, gk)
        dq, dk, dfreqs = bwd(grad_q, gk, q_out, k_out, coords, freqs, interleaved, conjugate, backend)
    else:
        coords, freqs = ctx.saved_tensors
        dq, dk = _fastpath.pick(_rope_op, _forward, grad_q, gk)(grad_q, gk, coords, freqs, interleaved,
                                                                 not conjugate, backend)
        dfreqs = None
    return dq, (dk if ctx.has_k else None), None, dfreqs, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)
_checks.refuse_double_backward(_rope_bwd_op, OP)
_Function = _fastpath.autograd_function(_forward, _setup_context, _backward, "ApplyRope")
_PLANS = _fastpath.PlanCache()


# -------------------------------------------------------------------- in place

@torch.library.custom_op("posenc_fast::apply_rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: Optional[torch.Tensor], coords: torch.Tensor, freqs: torch.Tensor,
                     interleaved: bool, conjugate: bool, backend: str) -> None:
    _launch(q, k, q, k, coords, freqs, interleaved, conjugate, backend)


@_rope_inplace_op.register_fake
def _(q, k, coords, freqs, interleaved, conjugate, backend):
    return None


class _InplaceRope(torch.autograd.Function):
    """Autograd for the in-place op on one tensor, frequencies frozen (mutable custom
    ops cannot register autograd, and autograd refuses a Function that modifies a
    view in place and returns two tensors, so q and k go through one Function each).
    The backward needs only coords and freqs, so later in-place writes to the same
    buffer (k after q in a packed qkv tensor) stay legal."""

    @staticmethod
    def forward(ctx, x, coords, freqs, interleaved, backend):
        _rope_inplace_op(x, None, coords, freqs, interleaved, False, backend)
        ctx.mark_dirty(x)
        ctx.args = (interleaved, backend)
        ctx.save_for_backward(coords, freqs)
        return x

    @staticmethod
    def backward(ctx, grad):
        interleaved, backend = ctx.args
        coords, freqs = ctx.saved_tensors
        dx, _ = _fastpath.pick(_rope_op, _forward, grad)(grad, None, coords, freqs, interleaved, True, backend)
        return dx, None, None, None, None


# ---------------------------------------------------------------- public API

def _validate_qk(q, k, pairing):
    """Checks of q, k and the pairing shared by both kinds of rotation; (B, Hq, L, D)."""
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_tensor("k", k, ndim=4, allow_none=True)
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    B, Hq, L, D = q.shape
    if D % 2 or D == 0:
        raise ValueError(f"the head dim (last dim of q) must be even and positive to form rotation pairs, got {D}")
    if k is not None:
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
        if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
            raise ValueError(f"k must be (B={B}, Hk, L={L}, D={D}) like q, got shape {tuple(k.shape)}")
    return B, Hq, L, D


def _validate(q, k, coords, freqs, pairing):
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_float_tensor("coords", coords, ndim=(2, 3))
    _checks.check_float_tensor("freqs", freqs, ndim=(2, 3))
    B, Hq, L, D = _validate_qk(q, k, pairing)
    device = _checks.check_same_device(q=q, k=k, coords=coords, freqs=freqs)
    A = coords.shape[-1]
    if coords.shape[-2] != L:
        raise ValueError(f"coords has {coords.shape[-2]} positions but q has L = {L} tokens")
    if coords.dim() == 3 and coords.shape[0] != B:
        raise ValueError(f"per-batch coords must be (B={B}, L, A), got shape {tuple(coords.shape)}")
    if freqs.shape[-1] != D // 2:
        raise ValueError(f"freqs must have D/2 = {D // 2} pairs in its last dim, got shape {tuple(freqs.shape)}")
    if freqs.shape[-2] != A:
        raise ValueError(f"freqs has {freqs.shape[-2]} axes but coords has A = {A} (its last dim)")
    if freqs.dim() == 3:
        if freqs.shape[0] != Hq:
            raise ValueError(f"per-head freqs must be (Hq={Hq}, A, D/2), got shape {tuple(freqs.shape)}")
        if k is not None and k.shape[1] != Hq:
            raise ValueError(f"per-head freqs need as many k heads as q heads ({Hq}), k has {k.shape[1]}")
    if A < 1:
        raise ValueError("coords must have at least one axis")
    return device


def _validate_table(q, k, cos, sin, pairing):
    """Checks of a table-defined rotation: cos and sin (L, D/2) or (B, L, D/2), or
    full width (L, D) or (B, L, D)."""
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_float_tensor("cos", cos, ndim=(2, 3))
    _checks.check_float_tensor("sin", sin, ndim=(2, 3))
    B, Hq, L, D = _validate_qk(q, k, pairing)
    device = _checks.check_same_device(q=q, k=k, cos=cos, sin=sin)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    lead = (L,) if cos.dim() == 2 else (B, L)
    if tuple(cos.shape) not in (lead + (D // 2,), lead + (D,)):
        raise ValueError(f"cos and sin must be (L, D/2) = ({L}, {D // 2}) or (B, L, D/2) = ({B}, {L}, {D // 2}), "
                         f"or full width (L, D) or (B, L, D) with D = {D}, got {tuple(cos.shape)}")
    return device


def _limits(q, coords, table: bool):
    """Why each fast kernel cannot take this call (None when it can): ``auto`` skips
    such a backend, one named explicitly raises ValueError with the reason."""
    D = q.shape[-1]

    def reason(name: str) -> Optional[str]:
        if name == "reference":
            return None
        if D > MAX_FUSED_HEAD_DIM:
            return f"the {name} backend supports head dims up to {MAX_FUSED_HEAD_DIM}, got {D}"
        if name == "cuda" and not table and coords.shape[-1] > MAX_CUDA_AXES:
            return f"the cuda backend supports up to {MAX_CUDA_AXES} axes, coords has {coords.shape[-1]}"
        return None
    return reason


def _call_checks(q, k, coords, inplace: bool, table: bool = False) -> None:
    """The checks that depend on more than the call signature (memory, grad mode):
    run on every call, after the cached ones. ``coords``: the cos/sin pair of a table."""
    if inplace and not torch.compiler.is_compiling():
        # Each backend writes aliased elements in its own order (rotating some twice):
        # refuse them like eager in-place ops do. (Traced tensors have no addresses;
        # torch.compile functionalises the in-place op instead.)
        _checks.check_writable("q", q)
        _checks.check_writable("k", k)
        _checks.check_disjoint("q", q, "k", k)
    if table:
        for name, t in zip(("cos", "sin"), coords):
            _checks.check_no_grad(name, t, "apply_rope gives no gradient for rotation tables")
    else:
        _checks.check_no_grad("coords", coords, "apply_rope gives no gradient for coordinates (positions)")


def _plan(q, k, coords, freqs, cos, sin, pairing, backend, inplace: bool = False) -> str:
    """The backend that runs this call, after the argument checks (those that depend
    only on the call signature are cached per signature)."""
    table = cos is not None or sin is not None
    if table and (coords is not None or freqs is not None):
        raise ValueError("give either coords and freqs (angles) or cos and sin (tables), not both")
    if not table and (coords is None or freqs is None):
        raise TypeError("apply_rope needs coords and freqs, or cos= and sin= tables")
    a, b = (cos, sin) if table else (coords, freqs)
    requested = _backends.requested_backend(backend)
    try:
        key = (requested, table, _fastpath.tensor_key(q), _fastpath.tensor_key(k), _fastpath.tensor_key(a),
               _fastpath.tensor_key(b), pairing)
    except (AttributeError, TypeError):  # not tensors: the checks say what is wrong
        key = None

    def build():
        device = (_validate_table if table else _validate)(q, k, a, b, pairing)
        return _backends.resolve_backend(OP, requested, device, _limits(q, a, table))

    name = _PLANS.get(key, build)
    _call_checks(q, k, (cos, sin) if table else coords, inplace, table)
    return name


def _kernel_inputs(q, coords, freqs, cos, sin, pairing):
    """(coords, freqs) as the kernels take them: fp32 angles inputs, or a packed
    cos/sin table with freqs of no axes."""
    if cos is not None:
        return _pack_table(cos, sin, q.shape[-1], pairing), _no_axes(q.shape[-1] // 2, q.device)
    return _fp32(coords), _fp32(freqs)


def _rotary_split(q, k, rotary_dim) -> bool:
    """Whether only the first ``rotary_dim`` dims rotate (checked: even, in (0, D])."""
    if rotary_dim is None:
        return False
    _checks.check_tensor("q", q, ndim=4)
    D = q.shape[-1]
    _checks.check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be even and at most the head dim {D}, got {rotary_dim}")
    return rotary_dim < D


def apply_rope(q: torch.Tensor, k: Optional[torch.Tensor], coords: Optional[torch.Tensor] = None,
               freqs: Optional[torch.Tensor] = None, *, cos: Optional[torch.Tensor] = None,
               sin: Optional[torch.Tensor] = None, pairing: str = "interleaved",
               rotary_dim: Optional[int] = None,
               backend: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotary position embedding of q and k (SPEC §2.3): returns new (q, k).

    Args:
        q: (B, Hq, L, D) queries, any strides (e.g. a view into a packed qkv tensor).
        k: (B, Hk, L, D) keys with q's dtype, or None (then the result's k is None).
        coords: positions (L, A) shared by the batch or (B, L, A), any float dtype
            (used in fp32), e.g. ``pyramid_coords(scales, mode="round")``.
        freqs: (A, D/2) frequencies shared by all heads (``axial_rope_freqs``,
            ``rope_1d_freqs``, ``mrope_freqs``) or (Hq, A, D/2) per head (RoPE-Mixed,
            then Hk must equal Hq). Angles ``sum_a coords[l, a] * freqs[a, j]`` in fp32.
        cos, sin: instead of coords and freqs, per-token tables (L, D/2) or
            (B, L, D/2), any float dtype, applied in fp32: pair j of token l becomes
            ``(x0 cos - x1 sin, x0 sin + x1 cos)``. For Infinity's mode-1 tables
            (resampled, so cos^2 + sin^2 != 1) and flash-attn / vLLM-style caches.
            Full-width tables (L, D) or (B, L, D) give every element its own entry,
            split into pairs like q: ``(x0 cos0 - x1 sin0, x0 sin1 + x1 cos1)``; with
            ``pairing="half"`` that is HF's ``q * cos + rotate_half(q) * sin`` on its
            (L, D) caches, and HART's per-element angles (``hart_rope``).
            A 16-bit table has already rounded its values (about 3 significant digits
            in bf16: angle errors up to ~4e-3 rad): keep tables in fp32.
        pairing: ``"interleaved"`` (dims 2j, 2j+1; Infinity) or ``"half"`` (dims j,
            j + D/2; NeoX / Qwen2-VL).
        rotary_dim: partial rotary (flash-attn, TE, vLLM, GPT-NeoX ``rotary_pct``):
            only dims [0, rotary_dim) rotate, as a head of that size (freqs and tables
            then have rotary_dim / 2 pairs, or rotary_dim entries at full width); the
            rest pass through. The rotated part
            and the rest are joined with one copy (not fused into the kernel yet).
        backend: None, "auto", "cuda", "triton" or "reference".

    Math in fp32 with autocast off; outputs in the input dtype. Gradients flow to q,
    k and (when it requires grad) freqs; d freqs is a deterministic reduction. coords
    and tables get none: ValueError when they require grad.
    """
    if _rotary_split(q, k, rotary_dim):
        r = rotary_dim
        qr, kr = apply_rope(q[..., :r], None if k is None else k[..., :r], coords, freqs, cos=cos, sin=sin,
                            pairing=pairing, backend=backend)
        return (torch.cat((qr, q[..., r:]), dim=-1),
                None if k is None else torch.cat((kr, k[..., r:]), dim=-1))
    name = _plan(q, k, coords, freqs, cos, sin, pairing, backend)
    return _apply_planned(name, q, k, coords, freqs, cos, sin, pairing)


def _apply_planned(name, q, k, coords, freqs, cos, sin, pairing):
    if name == "reference":
        if cos is not None:
            return ref.apply_rope_table(q, k, cos, sin, pairing=pairing)
        return ref.apply_rope(q, k, coords, freqs, pairing=pairing)
    coords, freqs = _kernel_inputs(q, coords, freqs, cos, sin, pairing)
    args = (q, k, coords, freqs, pairing == "interleaved", False, name)
    if not _fastpath.eager(q, k, coords, freqs):
        q_out, k_out = _rope_op(*args)
    elif _fastpath.needs_autograd(q, k, freqs):
        q_out, k_out = _Function.apply(*args)
    else:
        q_out, k_out = _forward(*args)
    return q_out, (k_out if k is not None else None)


def hart_rope(q: torch.Tensor, k: Optional[torch.Tensor], positions: torch.Tensor, *, base: float = 10000.0,
              backend: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """HART's 2D embedding of its image tokens (mit-han-lab/hart): per-element angles
    ``[row*theta | row*theta | col*theta | col*theta]`` applied rotate-half style, which
    is not a rotation (see ``posenc_fast.reference.rope.hart_rope`` for the math).

    q (B, H, L, D) with D a multiple of 4, k likewise or None; positions (L, 2) or
    (B, L, 2) (row, col), e.g. ``pyramid_coords(patch_nums, mode="fractional")``.
    The fused backends run it as ``apply_rope`` with HART's full-width tables
    (``hart_rope_tables``) and ``pairing="half"``: math in fp32, rounded once, like
    HART's fused CUDA kernel. The reference backend reproduces HART's torch path
    bit for bit (cos / sin rounded to the input dtype, products in it); the two agree
    within fp32 rounding in fp32 and within the dtype's rounding in fp16 / bf16. To reuse the
    tables across layers, build them once with ``hart_rope_tables`` and call
    ``apply_rope(q, k, cos=cos, sin=sin, pairing="half")``. Gradients flow to q and k.
    """
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_float_tensor("positions", positions, ndim=(2, 3))
    D = q.shape[-1]
    if D % 4:
        raise ValueError(f"hart_rope needs q's head dim to be a multiple of 4, got {D}")
    if positions.shape[-1] != 2 or positions.shape[-2] != q.shape[-2]:
        raise ValueError(f"positions must be (L, 2) or (B, L, 2) with L = {q.shape[-2]} (row, col), "
                         f"got {tuple(positions.shape)}")
    _checks.check_no_grad("positions", positions, "hart_rope gives no gradient for positions")
    cos, sin = hart_rope_tables(positions, D, base=base)
    name = _plan(q, k, None, None, cos, sin, "half", backend)
    if name == "reference":
        return ref.hart_rope(q, k, positions, base=base)
    return _apply_planned(name, q, k, None, None, cos, sin, "half")


def apply_rope_(q: torch.Tensor, k: Optional[torch.Tensor], coords: Optional[torch.Tensor] = None,
                freqs: Optional[torch.Tensor] = None, *, cos: Optional[torch.Tensor] = None,
                sin: Optional[torch.Tensor] = None, pairing: str = "interleaved",
                rotary_dim: Optional[int] = None,
                backend: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """In-place ``apply_rope``: rotates q and k in their own memory and returns them.

    Safe for autograd: gradients are those of ``apply_rope``, and autograd's version
    counters raise if a tensor needed by the backward is overwritten afterwards.
    Like any in-place op it is refused on leaves that require grad, and (ValueError)
    when q or k has elements sharing memory or q and k share elements; disjoint
    views of one buffer (q and k of a packed qkv tensor) are fine. Without autograd
    q and k are rotated in one launch; with it, in one launch each; with learnable
    freqs (requires_grad) out of place and copied back. ``cos``/``sin`` tables and
    ``rotary_dim`` as in ``apply_rope`` (here the pass-through dims are not touched
    at all: only the views of the rotated dims are written).
    """
    if _rotary_split(q, k, rotary_dim):
        r = rotary_dim
        apply_rope_(q[..., :r], None if k is None else k[..., :r], coords, freqs, cos=cos, sin=sin,
                    pairing=pairing, backend=backend)
        return q, k
    name = _plan(q, k, coords, freqs, cos, sin, pairing, backend, inplace=True)
    if name == "reference":
        # Clones: for fp32 the reference's .float() would alias what copy_ overwrites.
        qc, kc = q.clone(), None if k is None else k.clone()
        if cos is not None:
            q_out, k_out = ref.apply_rope_table(qc, kc, cos, sin, pairing=pairing)
        else:
            q_out, k_out = ref.apply_rope(qc, kc, coords, freqs, pairing=pairing)
        q.copy_(q_out)
        if k is not None:
            k.copy_(k_out)
        return q, k
    interleaved = pairing == "interleaved"
    c, f = _kernel_inputs(q, coords, freqs, cos, sin, pairing)
    if torch.is_grad_enabled() and f.requires_grad:
        # d freqs needs the rotated values, which a later write to the same buffer
        # (k after q in a packed qkv tensor) would clobber: rotate out of place into
        # tensors autograd owns, then copy back.
        q_out, k_out = _rope_op(q, k, c, f, interleaved, False, name)
        q.copy_(q_out)
        if k is not None:
            k.copy_(k_out)
        return q, k
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k)):
        q = _InplaceRope.apply(q, c, f, interleaved, name)
        if k is not None:
            k = _InplaceRope.apply(k, c, f, interleaved, name)
        return q, k
    # q and k in one launch
    if _fastpath.eager(q, k, c, f):
        _launch(q, k, q, k, c, f, interleaved, False, name)
    else:
        _rope_inplace_op(q, k, c, f, interleaved, False, name)
    return q, k
