"""``qkv_proj``: the fused attention input projection (QKV GEMM + bias + q/k L2 norm
+ q_scale + 2D RoPE + (B, H, L, D) head layout), forward and backward.

Public function -> argument checks -> autocast (like ``F.linear``) -> backend
choice -> either the reference (plain autograd) or the custom op
``posenc_fast::qkv_proj``:

* ``triton``: one kernel, the GEMM with the whole epilogue fused;
* ``cuda``: the GEMM through cuBLAS (``F.linear`` without bias), then one
  hand-written epilogue kernel over the packed (M, 3C) result.

The rotation is by angles (coords x freqs) or by per-token cos/sin tables, which
reach the kernels as ``apply_rope``'s table mode: the packed (2, B|1, L, r/2) fp32
table in place of coords and freqs of no axes (one custom-op schema for both). With
``rotary_dim`` r the kernels rotate the first r/2 pairs of each head (freqs' last
dim says how many) and pass the others through, in the same epilogue.

KV-cache append (sampling, no autograd): with ``kv_cache=(k_cache, v_cache)`` the
same kernels store k and v straight into the rows [cache_start, cache_start + n)
of the caller's (B, H, L_max, D) caches (custom op ``posenc_fast::qkv_proj_cached``,
which mutates them) and only q is allocated; no separate k/v, no ``torch.cat``.

Backward (custom op ``posenc_fast::qkv_proj_backward`` + two GEMMs): one kernel
turns dq, dk, dv into the packed dQKV, then ``dX = dQKV W`` and ``dW = dQKV^T x``.
Saved for backward: x, W, the per-(row, head) inverse norms and the outputs q and
k themselves (the same tensors the attention that consumes them keeps; no
copies). The pre-rotation, post-norm vectors are recovered as ``R^T q / q_scale``
instead of recomputing the GEMM, which would cost 2/3 of a GEMM more and miss the
<= 1.25x target; the price is that d q_scale cannot be had where q_scale is 0
(every backend raises then, see ``_call_checks``; the other gradients stay exact,
and VAR and Infinity use ``exp(...)``) and that bf16/fp16 outputs round that
recovered vector to the output precision, the same precision eager autocast code
keeps for its backward. A table need not be a rotation (Infinity's mode-1 tables
are resampled), so there the inverse ``R^T / (cos^2 + sin^2)`` recovers the vector;
with ``qk_l2norm``, whose backward needs it, a pair with cos = sin = 0 is refused
likewise.
"""

from __future__ import annotations

import contextlib
from typing import Hashable, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backends, _checks, _cuda, _fastpath
from ..reference import qkv_proj as ref
from .rope import _no_axes, _pack_table

OP = "qkv_proj"
PAIRINGS = ("interleaved", "half")
_CUDA_MAX_AXES = 4
_CUDA_MAX_HEAD_DIM = 256


def _rope_strides(coords: Optional[torch.Tensor], freqs: Optional[torch.Tensor]):
    """CUDA-side rope arguments: coords strides (batch, token, axis) with 0 for a
    broadcast batch, freqs strides (head, axis) with 0 for shared freqs, axes, and
    the rotating pairs per head. A table (freqs of no axes, ``_kernel_rotation``)
    has strides (batch, token, plane) and no freqs strides."""
    if coords is None:
        return [0, 0, 0], [0, 0], 0, 0
    if freqs.shape[-2] == 0:
        return [coords.stride(1) if coords.shape[1] > 1 else 0, coords.stride(2), coords.stride(0)], [0, 0], 0, \
            freqs.shape[-1]
    cb = coords.stride(0) if coords.dim() == 3 and coords.shape[0] > 1 else 0
    fh = freqs.stride(0) if freqs.dim() == 3 else 0
    return [cb, coords.stride(-2), coords.stride(-1)], [fh, freqs.stride(-2)], coords.shape[-1], freqs.shape[-1]


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], q_scale: Optional[torch.Tensor],
            coords: Optional[torch.Tensor], freqs: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, kv_start: int, rstd: torch.Tensor, num_heads: int, qk_l2norm: bool, half_pairing: bool,
            backend: str) -> None:
    """The forward kernels: q (B, H, L, D) and the rows [kv_start, kv_start + L) of k
    and v ((B, H, >= kv_start + L, D)); any strides with contiguous head rows."""
    B, L, C = x.shape
    H = num_heads
    if backend == "triton":
        from ..triton_kernels import qkv_proj as tk

        tk.qkv_proj_fwd(x, weight, bias, q_scale, coords, freqs, q, k, v, rstd if qk_l2norm else None,
                        num_heads=H, half_pairing=half_pairing, kv_start=kv_start)
    elif backend == "cuda":
        qkv = F.linear(x, weight)  # cuBLAS, (B, L, 3C) contiguous; the bias is added by the epilogue
        cs, fs, axes, rot_pairs = _rope_strides(coords, freqs)
        # The cache window is a pointer offset: no slicing op on the host.
        k_off = kv_start * k.stride(2) * k.element_size()
        v_off = kv_start * v.stride(2) * v.element_size()
        _cuda.lib().qkv_proj_fwd(
            qkv.data_ptr(), qkv.stride(1), _cuda.ptr(bias), _cuda.dtype_code(qkv), _cuda.ptr(q_scale),
            _cuda.ptr(coords), cs, _cuda.ptr(freqs), fs, axes, rot_pairs, half_pairing,
            _cuda.ptr(q), q.stride()[:3], _cuda.ptr(k) + k_off, k.stride()[:3], _cuda.ptr(v) + v_off,
            v.stride()[:3], _cuda.ptr(rstd) if qk_l2norm else 0, B, L, H, C // H, x.device.index,
            _cuda.stream(x.device))
    else:
        raise ValueError(f"posenc_fast::{OP} has no kernel for backend {backend!r}")


def _rstd(M: int, H: int, qk_l2norm: bool, dev: torch.device) -> torch.Tensor:
    """The per-(row, head) inverse norms (their presence also tells the kernels to normalise)."""
    return (_checks.empty((2, M, H), dtype=torch.float32, device=dev) if qk_l2norm
            else torch.empty((0,), dtype=torch.float32, device=dev))


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], q_scale: Optional[torch.Tensor],
            coords: Optional[torch.Tensor], freqs: Optional[torch.Tensor], num_heads: int, qk_l2norm: bool,
            half_pairing: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    H = num_heads
    dev = x.device
    q, k, v = (_checks.empty((B, H, L, C // H), dtype=x.dtype, device=dev) for _ in range(3))
    rstd = _rstd(B * L, H, qk_l2norm, dev)
    if B * L > 0:
        _launch(x, weight, bias, q_scale, coords, freqs, q, k, v, 0, rstd, H, qk_l2norm, half_pairing, backend)
    return q, k, v, rstd


def _forward_cached(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    q_scale: Optional[torch.Tensor], coords: Optional[torch.Tensor], freqs: Optional[torch.Tensor],
                    k_cache: torch.Tensor, v_cache: torch.Tensor, cache_start: int, num_heads: int,
                    qk_l2norm: bool, half_pairing: bool, backend: str) -> torch.Tensor:
    """Sampling: returns q; k and v go into the rows [cache_start, cache_start + L) of the caches."""
    B, L, C = x.shape
    H = num_heads
    q = _checks.empty((B, H, L, C // H), dtype=x.dtype, device=x.device)
    if B * L > 0:
        _launch(x, weight, bias, q_scale, coords, freqs, q, k_cache, v_cache, cache_start,
                _rstd(B * L, H, qk_l2norm, x.device), H, qk_l2norm, half_pairing, backend)
    return q


_fwd_op = torch.library.custom_op("posenc_fast::qkv_proj", mutates_args=())(_forward)
_cached_op = torch.library.custom_op("posenc_fast::qkv_proj_cached",
                                     mutates_args=("k_cache", "v_cache"))(_forward_cached)


@_cached_op.register_fake
def _(x, weight, bias, q_scale, coords, freqs, k_cache, v_cache, cache_start, num_heads, qk_l2norm, half_pairing,
      backend):
    B, L, C = x.shape
    return x.new_empty((B, num_heads, L, C // num_heads))


@_fwd_op.register_fake
def _(x, weight, bias, q_scale, coords, freqs, num_heads, qk_l2norm, half_pairing, backend):
    B, L, C = x.shape
    H = num_heads
    shape = (B, H, L, C // H)
    rstd = x.new_empty((2, B * L, H) if qk_l2norm else (0,), dtype=torch.float32)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape), rstd


def _backward_impl(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            rstd: torch.Tensor, q_scale: Optional[torch.Tensor], coords: Optional[torch.Tensor],
            freqs: Optional[torch.Tensor], qk_l2norm: bool, half_pairing: bool, need_dbias: bool,
            need_dscale: bool, need_dfreqs: bool,
            backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dqkv (M, 3C) in the outputs' dtype and fp32 dbias (3C,), dq_scale (H,),
    dfreqs (freqs' shape); each of the last three is empty when not needed."""
    B, H, L, D = dq.shape
    C = H * D
    M = B * L
    dev = dq.device
    dqkv = _checks.empty((M, 3 * C), dtype=dq.dtype, device=dev)
    need_dscale = need_dscale and q_scale is not None
    need_dfreqs = need_dfreqs and coords is not None
    if backend == "triton":
        from ..triton_kernels import qkv_proj as tk

        R = tk.bwd_row_blocks(M)
    elif backend == "cuda":
        R = -(-M // _cuda.lib().qkv_proj_bwd_rows_per_chunk())
    else:
        raise ValueError(f"posenc_fast::{OP} has no kernel for backend {backend!r}")
    dbias_part = _checks.empty((R, 3 * C), dtype=torch.float32, device=dev) if need_dbias else None
    dscale_part = _checks.empty((R, H), dtype=torch.float32, device=dev) if need_dscale else None
    dfreqs_part = (_checks.empty((R, 2, H) + tuple(freqs.shape[-2:]), dtype=torch.float32, device=dev)
                   if need_dfreqs else None)
    norm_rstd = rstd if qk_l2norm else None
    if M > 0 and backend == "triton":
        tk.qkv_proj_bwd(dq, dk, dv, q, k, norm_rstd, q_scale, coords, freqs, dqkv, dbias_part, dscale_part,
                        dfreqs_part, half_pairing=half_pairing)
    elif M > 0:
        cs, fs, axes, rot_pairs = _rope_strides(coords, freqs)
        _cuda.lib().qkv_proj_bwd(
            _cuda.ptr(dq), list(dq.stride()), _cuda.ptr(dk), list(dk.stride()), _cuda.ptr(dv), list(dv.stride()),
            _cuda.ptr(q), _cuda.ptr(k), _cuda.dtype_code(dq), _cuda.ptr(norm_rstd), _cuda.ptr(q_scale),
            _cuda.ptr(coords), cs, _cuda.ptr(freqs), fs, axes, rot_pairs, half_pairing, _cuda.ptr(dqkv),
            _cuda.ptr(dbias_part), _cuda.ptr(dscale_part), _cuda.ptr(dfreqs_part), B, L, H, D,
            dev.index, _cuda.stream(dev))

    def unused():  # a fresh tensor each: custom-op outputs must not alias
        return torch.empty((0,), dtype=torch.float32, device=dev)

    # Fixed-order sums over the row blocks: deterministic.
    dbias = dbias_part.sum(0) if need_dbias else unused()
    dscale = dscale_part.sum(0) if need_dscale else unused()
    if need_dfreqs:
        dfreqs = dfreqs_part.sum((0, 1))
        if freqs.dim() == 2:
            dfreqs = dfreqs.sum(0)
    else:
        dfreqs = unused()
    return dqkv, dbias, dscale, dfreqs


_bwd_op = torch.library.custom_op("posenc_fast::qkv_proj_backward", mutates_args=())(_backward_impl)


@_bwd_op.register_fake
def _(dq, dk, dv, q, k, rstd, q_scale, coords, freqs, qk_l2norm, half_pairing, need_dbias, need_dscale,
      need_dfreqs, backend):
    B, H, L, D = dq.shape
    f32 = dict(dtype=torch.float32)
    dqkv = dq.new_empty((B * L, 3 * H * D))
    dbias = dq.new_empty((3 * H * D,) if need_dbias else (0,), **f32)
    dscale = dq.new_empty((H,) if need_dscale and q_scale is not None else (0,), **f32)
    dfreqs = dq.new_empty(tuple(freqs.shape) if need_dfreqs and coords is not None else (0,), **f32)
    return dqkv, dbias, dscale, dfreqs


def _setup_context(ctx, inputs, output):
    x, weight, bias, q_scale, coords, freqs, num_heads, qk_l2norm, half_pairing, backend = inputs
    q, k, _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, q, k, rstd, q_scale, coords, freqs)
    ctx.qk_l2norm, ctx.half_pairing, ctx.backend = qk_l2norm, half_pairing, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dq, dk, dv, _drstd):
    x, weight, q, k, rstd, q_scale, coords, freqs = ctx.saved_tensors
    need_x, need_w, need_b, need_s, _, need_f = ctx.needs_input_grad[:6]
    dq = torch.zeros_like(q) if dq is None else dq
    dk = torch.zeros_like(k) if dk is None else dk
    dv = torch.zeros_like(q) if dv is None else dv
    bwd = _fastpath.pick(_bwd_op, _backward_impl, dq, dk, dv)
    dqkv, dbias, dscale, dfreqs = bwd(dq, dk, dv, q, k, rstd, q_scale, coords, freqs, ctx.qk_l2norm,
                                          ctx.half_pairing, need_b, need_s, need_f, ctx.backend)
    B, L, C = x.shape
    dx = (dqkv @ weight).view(B, L, C) if need_x else None
    dw = dqkv.t() @ x.reshape(B * L, C) if need_w else None
    return (dx, dw, dbias.to(ctx.bias_dtype) if need_b else None, dscale if need_s else None, None,
            dfreqs if need_f else None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_checks.refuse_double_backward(_bwd_op, OP)
_Function = _fastpath.autograd_function(_forward, _setup_context, _backward, "QkvProj")
_PLANS = _fastpath.PlanCache()


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def _validate(x, weight, bias, num_heads, qk_l2norm, q_scale, coords, freqs, cos, sin, pairing,
              rotary_dim) -> torch.device:
    _checks.check_tensor("x", x, ndim=3)
    _checks.check_tensor("weight", weight, ndim=2)
    _checks.check_tensor("bias", bias, ndim=1, allow_none=True)
    _checks.check_int("num_heads", num_heads, minimum=1)
    _check_bool("qk_l2norm", qk_l2norm)
    for name, t, ndim in (("q_scale", q_scale, 1), ("coords", coords, (2, 3)), ("freqs", freqs, (2, 3)),
                          ("cos", cos, (2, 3)), ("sin", sin, (2, 3))):
        _checks.check_float_tensor(name, t, ndim=ndim, allow_none=True)
    if not isinstance(pairing, str) or pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    device = _checks.check_same_device(x=x, weight=weight, bias=bias, q_scale=q_scale, coords=coords, freqs=freqs,
                                       cos=cos, sin=sin)
    B, L, C = x.shape
    H = num_heads
    if C == 0:
        raise ValueError(f"x must have at least one channel (C = x.shape[2] >= 1), got shape {tuple(x.shape)}")
    if C % H:
        raise ValueError(f"x has C = {C} channels, which num_heads = {H} does not divide")
    D = C // H
    if tuple(weight.shape) != (3 * C, C):
        raise ValueError(f"weight must have shape (3*C, C) = ({3 * C}, {C}) for x with C = {C}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != 3 * C:
        raise ValueError(f"bias must have shape (3*C,) = ({3 * C},), got {tuple(bias.shape)}")
    if q_scale is not None and q_scale.shape[0] != H:
        raise ValueError(f"q_scale must have shape (num_heads,) = ({H},), got {tuple(q_scale.shape)}")
    table = cos is not None or sin is not None
    if table and (coords is not None or freqs is not None):
        raise ValueError("give either coords and freqs (angles) or cos and sin (tables), not both")
    if (coords is None) != (freqs is None):
        raise ValueError("coords and freqs must be given together (rope) or both be None")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (a table-defined rotation) or both be None")
    R = D
    if rotary_dim is not None:
        _checks.check_int("rotary_dim", rotary_dim, minimum=2)
        if not table and coords is None:
            raise ValueError("rotary_dim is given without a rotation (coords and freqs, or cos and sin)")
        if rotary_dim % 2 or rotary_dim > D:
            raise ValueError(f"rotary_dim must be even and at most the head dim {D}, got {rotary_dim}")
        R = rotary_dim
    if (table or coords is not None) and R % 2:
        raise ValueError(f"rope needs an even head_dim, got D = C / num_heads = {D} (or pass an even rotary_dim)")
    if table:
        if cos.shape != sin.shape:
            raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if cos.shape[-2:] != (L, R // 2) or (cos.dim() == 3 and cos.shape[0] not in (1, B)):
            pairs = "D/2" if rotary_dim is None else "rotary_dim/2"
            raise ValueError(f"cos and sin must be (L, {pairs}) = ({L}, {R // 2}) or (B, L, {pairs}) = "
                             f"({B}, {L}, {R // 2}), got {tuple(cos.shape)}")
    if coords is not None:
        if coords.shape[-2] != L:
            raise ValueError(f"coords has {coords.shape[-2]} positions but x has L = {L} tokens")
        if coords.dim() == 3 and coords.shape[0] not in (1, B):
            raise ValueError(f"coords must be (L, A) or (B, L, A) with B = {B}, got shape {tuple(coords.shape)}")
        A = coords.shape[-1]
        if freqs.shape[-2:] != (A, R // 2):
            pairs = "D/2" if rotary_dim is None else "rotary_dim/2"
            raise ValueError(f"freqs must be (A, {pairs}) = ({A}, {R // 2}) or per head (H, A, {pairs}), "
                             f"got shape {tuple(freqs.shape)}")
        if freqs.dim() == 3 and freqs.shape[0] != H:
            raise ValueError(f"per-head freqs must have num_heads = {H} rows, got shape {tuple(freqs.shape)}")
        if A < 1:
            raise ValueError("coords must have at least one axis")
    return device


def _validate_cache(kv_cache, cache_start, x: torch.Tensor, num_heads: int, dtype: torch.dtype) -> None:
    """The caches must be (B, H, L_max, D) with contiguous head rows and equal strides,
    in the outputs' dtype, on x's device, and hold the rows [cache_start, cache_start + L)."""
    if not isinstance(kv_cache, (tuple, list)) or len(kv_cache) != 2:
        raise TypeError(f"kv_cache must be a (k_cache, v_cache) pair of tensors, got {type(kv_cache).__name__}")
    _checks.check_int("cache_start", cache_start, minimum=0)
    B, L, C = x.shape
    H = num_heads
    D = C // H
    end = cache_start + L
    for name, t in zip(("k_cache", "v_cache"), kv_cache):
        _checks.check_tensor(f"kv_cache {name}", t, ndim=4)
        _checks.check_same_device(x=x, **{name: t})
        if t.dtype != dtype:
            raise TypeError(f"kv_cache {name} has dtype {str(t.dtype).replace('torch.', '')} but the outputs are "
                            f"{str(dtype).replace('torch.', '')} (x's dtype, or the autocast dtype): they must match")
        if (t.shape[0], t.shape[1], t.shape[3]) != (B, H, D):
            raise ValueError(f"kv_cache {name} must have shape (B, H, L_max, D) = ({B}, {H}, L_max, {D}), "
                             f"got {tuple(t.shape)}")
        if end > t.shape[2]:
            raise ValueError(f"kv_cache {name} has L_max = {t.shape[2]} rows, but cache_start + n = "
                             f"{cache_start} + {L} = {end} exceeds it")
        if t.stride(3) != 1 and D > 1:
            raise ValueError(f"kv_cache {name} must have contiguous head rows (stride(3) == 1), got strides "
                             f"{tuple(t.stride())}")
        _checks.check_writable(f"kv_cache {name}", t)
    if kv_cache[0].stride() != kv_cache[1].stride():
        # The Triton epilogue stores k and v through one set of strides (registers).
        raise ValueError(f"kv_cache k_cache and v_cache must have the same strides, got {tuple(kv_cache[0].stride())} "
                         f"and {tuple(kv_cache[1].stride())}")


def _cache_key(kv_cache) -> Hashable:
    """What ``_validate_cache`` reads of the caches (strides included)."""
    if kv_cache is None:
        return None
    k_cache, v_cache = kv_cache
    return (_fastpath.tensor_key(k_cache), k_cache.stride(), _fastpath.tensor_key(v_cache), v_cache.stride())


def _cache_call_checks(kv_cache, x, weight, bias, q_scale, freqs) -> None:
    """Per call (grad mode and addresses are not part of the plan): the append has no
    backward, and two caches that share memory would overwrite each other."""
    if torch.is_grad_enabled():
        named = (("x", x), ("weight", weight), ("bias", bias), ("q_scale", q_scale), ("freqs", freqs),
                 ("kv_cache k_cache", kv_cache[0]), ("kv_cache v_cache", kv_cache[1]))
        needs = [n for n, t in named if t is not None and t.requires_grad]
        if needs:
            raise RuntimeError(f"qkv_proj with kv_cache is for sampling and has no backward, but {', '.join(needs)} "
                               f"require grad: call it under torch.no_grad() (or inference_mode), or pass "
                               f"kv_cache=None and concatenate the caches yourself to train through them")
    if _fastpath.eager(*kv_cache):  # traced tensors have no addresses
        _checks.check_disjoint("kv_cache k_cache", kv_cache[0], "kv_cache v_cache", kv_cache[1])


def _call_checks(x, weight, bias, q_scale, coords, cos, sin, qk_l2norm: bool) -> None:
    """The checks that depend on more than the call signature (grad mode, values):
    run on every call, after the cached ones."""
    _checks.check_no_grad("coords", coords, "qkv_proj gives no gradient for coordinates (positions)")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_no_grad(name, t, "qkv_proj gives no gradient for rotation tables")
    if not torch.is_grad_enabled():
        return
    if q_scale is not None and q_scale.requires_grad:
        # d q_scale needs the normalised q, which the fused backward recovers from the
        # output as q / q_scale: lost where q_scale is 0. Checked on the device (no
        # host sync): on CUDA a failure is a device-side assert.
        torch._assert_async((q_scale != 0).all(), "qkv_proj: q_scale requires grad and has a zero entry; "
                            "d q_scale cannot be computed there (pass q_scale.detach() or nonzero scales)")
    if cos is not None and qk_l2norm and any(t is not None and t.requires_grad for t in (x, weight, bias, q_scale)):
        # Likewise the normalised q and k are recovered through the inverse of the
        # table's 2x2 maps: lost where cos = sin = 0, which the l2 norm's backward needs.
        torch._assert_async(((cos != 0) | (sin != 0)).all(), "qkv_proj: cos and sin are both 0 at some pair, "
                            "where the backward of qk_l2norm cannot recover the normalised q and k (the output "
                            "pair is 0); give tables without such pairs or run without gradients")


def _check_dtypes(x_dtype: torch.dtype, weight, bias) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x_dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but x has "
                            f"{str(x_dtype).replace('torch.', '')}: they must match (or run under autocast)")


def _backend_limits(D: int, coords: Optional[torch.Tensor], rotary_dim: Optional[int] = None,
                    half: bool = False):
    """What each fast kernel supports: a reason string when ``name`` cannot run
    head_dim ``D`` with ``coords``' axes and this partial rotation, else None."""
    def reason(name: str) -> Optional[str]:
        if name == "triton":
            if D < 16 or D > 256 or D & (D - 1):
                return f"the Triton kernel needs a power-of-two head_dim in [16, 256], got {D}"
            if half and rotary_dim is not None and rotary_dim & (rotary_dim - 1):
                # Half pairing reorders the accumulator in blocks of rotary_dim columns
                # (triton_kernels/qkv_proj.py), and register shapes are powers of two.
                return f"the Triton kernel needs a power-of-two rotary_dim with half pairing, got {rotary_dim}"
        if name == "cuda":
            if D % 2 or D > _CUDA_MAX_HEAD_DIM:
                return f"the CUDA kernels need an even head_dim <= {_CUDA_MAX_HEAD_DIM}, got {D}"
            if coords is not None and coords.shape[-1] > _CUDA_MAX_AXES:
                return f"the CUDA kernels support at most {_CUDA_MAX_AXES} rope axes, got {coords.shape[-1]}"
        return None
    return reason


# The evidence until GPU measurements replace it (README, Performance): at training
# sizes both paths are predicted at the GEMM's FLOP bound and the fused Triton GEMM
# moves the minimum bytes, where cuBLAS plus the CUDA epilogue moves 2.5x
# (tools/kernel_report.py); at sampling sizes (few rows) host time decides, and the
# CUDA path's is the lower (bench/host_overhead.py: no Triton launcher).
_SAMPLING_ROWS = 1024


def _auto_order(rows: int):
    return ("cuda", "triton", "reference") if rows <= _SAMPLING_ROWS else ("triton", "cuda", "reference")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _kernel_rotation(x: torch.Tensor, coords, freqs, cos, sin):
    """(coords, freqs) as the kernels take them: fp32 angle inputs, or the packed
    (2, B|1, L, r/2) cos/sin table with freqs of no axes (apply_rope's table mode).
    The rotating pairs per head are freqs' last dim: r/2 (D/2 without rotary_dim)."""
    if cos is not None:
        # pair tables only (r/2 per token): never the full-width (4-plane) packing
        return _pack_table(cos, sin, 2 * cos.shape[-1], "interleaved"), _no_axes(cos.shape[-1], x.device)
    return (None if coords is None else coords.float().contiguous(),
            None if freqs is None else freqs.float().contiguous())


def qkv_proj(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, num_heads: int,
             qk_l2norm: bool = False, q_scale: Optional[torch.Tensor] = None, coords: Optional[torch.Tensor] = None,
             freqs: Optional[torch.Tensor] = None, cos: Optional[torch.Tensor] = None,
             sin: Optional[torch.Tensor] = None, rotary_dim: Optional[int] = None, pairing: str = "interleaved",
             kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, cache_start: int = 0,
             backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention-ready ``q, k, v`` (B, H, L, D) from ``x`` in one fused pass.

    ``qkv = x @ weight^T + bias`` (weight (3C, C), rows q | k | v, head-major);
    split into ``num_heads`` heads of D = C / H; if ``qk_l2norm`` q and k are
    divided by ``max(||.||_2, 1e-12)`` per head; q is multiplied by ``q_scale[h]``
    when given (VAR: ``exp(min(scale_mul, ln 100))``, computed by the caller); then
    q and k are rotated (SPEC §2.3, ``pairing`` "interleaved" or "half"), after the
    norm like Infinity, either by angles -- ``coords`` (L, A) or (B, L, A) and
    ``freqs`` (A, D/2) or per head (H, A, D/2) -- or by per-token tables ``cos``,
    ``sin`` (L, D/2) or (B, L, D/2), any float dtype, applied in fp32: pair j of
    token l becomes ``(x0 cos - x1 sin, x0 sin + x1 cos)`` (Infinity's mode-1
    tables, which are not rotations by an angle; flash-attn / HF / vLLM caches).
    Angles and tables exclude each other. ``rotary_dim`` r (even, <= D): only dims
    [0, r) rotate, as a head of size r (freqs and tables with r/2 pairs; "half"
    pairs (j, j + r/2)); the rest pass through, after the norm and scale that act
    on the whole head -- ``apply_rope(..., rotary_dim=r)`` after the norm, fused.

    Outputs are contiguous, in x's dtype; under ``torch.autocast`` the inputs are
    cast like ``F.linear`` does and the outputs have the autocast dtype. Norm,
    scale and rotation run in fp32. fp32 GEMMs use TF32 only where
    ``torch.backends.cuda.matmul.allow_tf32`` lets ``F.linear`` use it. Gradients
    flow to x, weight, bias, q_scale and freqs, not to coords or tables (ValueError
    when they require grad). A q_scale that requires grad must be nonzero
    (RuntimeError; on CUDA a device-side assert, which needs no host sync).

    KV cache (scale-by-scale sampling): with ``kv_cache=(k_cache, v_cache)``, two
    (B, H, L_max, D) tensors in the outputs' dtype with contiguous head rows and the
    same strides (e.g.
    allocated once per sampling run with L_max the whole pyramid), k and v of the n
    tokens of x are written by the kernel straight into the rows
    ``[cache_start, cache_start + n)`` (rows outside stay untouched; k normed and
    rotated), and the call returns
    ``q, k_cache[:, :, :cache_start + n], v_cache[:, :, :cache_start + n]``:
    attention over every token so far, without a separate k/v or a ``torch.cat``.
    The shapes and addresses are the same in every sampling run (CUDA-graph
    capturable). It has no backward: with a cache, RuntimeError when grad mode is
    on and an input requires grad (sample under ``torch.no_grad()``). ValueError
    when ``cache_start + n > L_max`` or a cache has the wrong shape or layout,
    TypeError for a wrong dtype. Under ``torch.compile`` it is the mutating custom
    op ``posenc_fast::qkv_proj_cached``.

    Kernel limits: Triton needs a power-of-two head_dim in [16, 256] (and, with
    "half" pairing, a power-of-two rotary_dim); CUDA an even head_dim <= 256 and at
    most 4 rope axes. ``auto`` takes the fastest backend whose limits admit the
    call; a backend named explicitly raises ValueError.
    """
    requested = _backends.requested_backend(backend)
    try:
        dev_type = x.device.type
        key = (requested, _fastpath.tensor_key(x), _fastpath.tensor_key(weight), _fastpath.tensor_key(bias),
               num_heads, qk_l2norm, _fastpath.tensor_key(q_scale), _fastpath.tensor_key(coords),
               _fastpath.tensor_key(freqs), _fastpath.tensor_key(cos), _fastpath.tensor_key(sin), rotary_dim,
               pairing, _autocast_dtype(dev_type), _cache_key(kv_cache), cache_start)
    except (AttributeError, TypeError, ValueError):  # not tensors (or pairs): the checks say what is wrong
        key = None

    def plan():
        device = _validate(x, weight, bias, num_heads, qk_l2norm, q_scale, coords, freqs, cos, sin, pairing,
                           rotary_dim)
        D = x.shape[2] // num_heads
        partial = None if rotary_dim is None or rotary_dim == D else rotary_dim
        name = _backends.resolve_backend(OP, requested, device,
                                         _backend_limits(D, coords, partial, pairing == "half"),
                                         _auto_order(x.shape[0] * x.shape[1]))
        cast = _autocast_dtype(device.type)
        dt = x.dtype if cast is None else cast
        _check_dtypes(dt, weight if cast is None else None, bias if cast is None else None)
        if kv_cache is not None:
            _validate_cache(kv_cache, cache_start, x, num_heads, dt)
        elif cache_start != 0:
            raise ValueError(f"cache_start = {cache_start!r} is given without kv_cache")
        return name, cast, device

    name, cast, device = _PLANS.get(key, plan)
    _call_checks(x, weight, bias, q_scale, coords, cos, sin, qk_l2norm)
    if kv_cache is not None:
        _cache_call_checks(kv_cache, x, weight, bias, q_scale, freqs)
    if cast is not None:
        # The CUDA backend's GEMM is F.linear, which under autocast casts the weight
        # itself and keeps that cast across the calls of one autocast region (as for
        # the model's own F.linear): with no autograd to feed, it gets the weight as is.
        if not (name == "cuda" and not torch.is_grad_enabled() and not _fastpath._traced()):
            weight = weight.to(cast)
        x = x.to(cast)
        bias = None if bias is None else bias.to(cast)
    if name == "reference":
        with torch.autocast(device.type, enabled=False) if cast is not None else contextlib.nullcontext():
            return ref.qkv_proj(x, weight, bias, num_heads=num_heads, qk_l2norm=qk_l2norm, q_scale=q_scale,
                                coords=coords, freqs=freqs, pairing=pairing, kv_cache=kv_cache,
                                cache_start=cache_start, cos=cos, sin=sin, rotary_dim=rotary_dim)
    # The fused path needs no autocast guard: its inputs are cast already, and the
    # only autocast-aware op it calls (the CUDA backend's F.linear) then keeps them.
    rot_in, rot_f = _kernel_rotation(x, coords, freqs, cos, sin)
    if q_scale is not None and not (q_scale.dtype is torch.float32 and q_scale.is_contiguous()):
        q_scale = q_scale.float().contiguous()  # (a call that changes nothing still dispatches: skipped)
    params = (x, weight, None if bias is None else bias.contiguous(), q_scale, rot_in, rot_f)
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        args = params + (k_cache, v_cache, cache_start, num_heads, qk_l2norm, pairing == "half", name)
        if _fastpath.eager(x, weight, bias, q_scale, rot_in, rot_f, k_cache, v_cache):
            q = _forward_cached(*args)
        else:
            q = _cached_op(*args)
        end = cache_start + x.shape[1]
        return q, k_cache[:, :, :end], v_cache[:, :, :end]
    args = params + (num_heads, qk_l2norm, pairing == "half", name)
    if not _fastpath.eager(x, weight, bias, q_scale, rot_in, rot_f):
        q, k, v, _ = _fwd_op(*args)
    elif _fastpath.needs_autograd(x, weight, bias, q_scale, rot_in, rot_f):
        q, k, v, _ = _Function.apply(*args)
    else:
        q, k, v, _ = _forward(*args)
    return q, k, v
