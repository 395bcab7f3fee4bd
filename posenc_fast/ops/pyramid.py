"""``pyramid_pos_level_add``: the fused VAR pyramid position + level embedding op.

Public function -> argument checks -> backend choice -> either the reference
(plain autograd) or the custom op ``posenc_fast::pyramid_pos_level_add`` whose
implementation launches the Triton or CUDA kernels. The custom ops have fake
implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces them without graph breaks and CUDA graphs can capture them (launches go to
the current stream; no host syncs once the per-pyramid tables are cached).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backends, _checks, _fastpath
from .. import _cuda
from ..reference import pyramid as ref
from ..reference.pyramid import Scale, normalize_scales, pyramid_length

OP = "pyramid_pos_level_add"
# Rows per backward chunk: 2 gives the row kernels whole waves at the SPEC workloads
# (tools/kernel_report.py: 0.86-0.97 wave efficiency where 8 rows left 0.3-0.7)
# while the fp32 chunk partials stay a few % of the gradient's bytes.
_CHUNK_ROWS = 2


def _flat(scales: Tuple[Tuple[int, int], ...]) -> Tuple[int, ...]:
    """The scales as the flat int list the custom ops take (a tuple: it keys caches)."""
    return tuple(v for hw in scales for v in hw)


@functools.lru_cache(maxsize=128)
def _unflat(flat: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
    return tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))


@functools.lru_cache(maxsize=128)
def _token_meta(flat: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 (L, 3) table of (level, row, col), cached per pyramid and device."""
    return ref.token_table(_unflat(flat), device=device).to(torch.int32)


@functools.lru_cache(maxsize=128)
def _chunk_tables(scales: Tuple[Tuple[int, int], ...], start: int, n: int,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward work split of the window [start, start + n): int32 chunks
    (row_begin, row_end, level) that never straddle a level, sorted by level, and
    int32 (S + 1) offsets of each level's first chunk."""
    chunks, offsets, begin = [], [0], 0
    for s, (h, w) in enumerate(scales):
        lo, hi = max(begin, start) - start, min(begin + h * w, start + n) - start
        for r in range(lo, hi, _CHUNK_ROWS):
            chunks.append((r, min(r + _CHUNK_ROWS, hi), s))
        offsets.append(len(chunks))
        begin += h * w
    table = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 3)
    return table.to(device), torch.tensor(offsets, dtype=torch.int32, device=device)


def _dtype_codes(x, pos, lvl, out_dtype) -> Tuple[int, int, int, int]:
    """The CUDA library's dtype codes of x, pos (0 without), lvl and the output."""
    codes = _cuda.DTYPE_CODES
    return (codes[x.dtype], codes[pos.dtype] if pos is not None else 0, codes[lvl.dtype],
            codes.get(out_dtype, -1))


def _cuda_fwd_args(x: torch.Tensor, pos: Optional[torch.Tensor], lvl: torch.Tensor, meta: torch.Tensor,
                   out: Optional[torch.Tensor], start: int, pos_weight: float, sincos_weight: float,
                   codes: Tuple[int, int, int, int]) -> tuple:
    """The CUDA library's forward arguments; ``out=None``: those of a launch plan
    (the tensors x, pos, lvl in place of their pointers; out and stream given at
    each launch)."""
    B, n, C = x.shape
    cx, cp, cl, co = codes
    dev = x.device
    if out is None:
        xa, pa, la, oa, stream = x, pos, lvl, 0, 0
    else:
        xa, pa, la = x.data_ptr(), 0 if pos is None else pos.data_ptr(), lvl.data_ptr()
        oa, stream = out.data_ptr(), _cuda.stream(dev)
    return (xa, cx, x.stride(), pa, cp, (0, 0) if pos is None else pos.stride()[-2:], la, cl, lvl.stride(),
            meta.data_ptr(), oa, co, B, n, C, start, pos_weight, sincos_weight, dev.index or 0, stream)


def _launch_fwd(x: torch.Tensor, pos: Optional[torch.Tensor], lvl: torch.Tensor, meta: torch.Tensor,
                out: torch.Tensor, start: int, pos_weight: float, sincos_weight: float, backend: str,
                codes: Optional[Tuple[int, int, int, int]] = None) -> None:
    """Writes ``out``; pos is (L, C), (1, L, C) or None. ``codes``: ``_dtype_codes``
    (the eager path keeps them in its plan)."""
    if backend == "triton":
        from ..triton_kernels import pyramid_pos_level_add as tk

        tk.pyramid_pos_level_add_fwd(x, pos, lvl, meta, out, start=start, pos_weight=pos_weight,
                                     sincos_weight=sincos_weight)
    elif backend == "cuda":
        _cuda.lib().pyramid_pos_level_add_fwd(*_cuda_fwd_args(
            x, pos, lvl, meta, out, start, pos_weight, sincos_weight, codes or _dtype_codes(x, pos, lvl, out.dtype)))
    else:
        raise ValueError(f"posenc_fast::{OP} has no kernel for backend {backend!r}")


def _forward(x: torch.Tensor, pos: Optional[torch.Tensor], lvl: torch.Tensor, scales: List[int],
             start: int, pos_weight: float, sincos_weight: float, backend: str) -> torch.Tensor:
    out = _checks.empty_like(x, dtype=ref.output_dtype(x, pos, lvl))
    _launch_fwd(x, pos, lvl, _token_meta(tuple(scales), x.device), out, start, pos_weight, sincos_weight, backend)
    return out


_fwd_op = torch.library.custom_op("posenc_fast::pyramid_pos_level_add", mutates_args=())(_forward)


@_fwd_op.register_fake
def _(x, pos, lvl, scales, start, pos_weight, sincos_weight, backend):
    return x.new_empty(x.shape, dtype=ref.output_dtype(x, pos, lvl))


def _backward_impl(grad: torch.Tensor, scales: List[int], start: int, L: int, pos_weight: float,
            need_dpos: bool, pos_dtype: torch.dtype, lvl_dtype: torch.dtype,
            backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    sc = _unflat(tuple(scales))
    B, n, C = grad.shape
    dev = grad.device
    chunks, offsets = _chunk_tables(sc, start, n, dev)
    partial = _checks.empty((chunks.shape[0], C), dtype=torch.float32, device=dev)
    dlvl = _checks.empty((len(sc), C), dtype=lvl_dtype, device=dev)
    if need_dpos:
        # Rows outside the window get no gradient; inside, the kernel writes every element.
        full = n == L
        dpos = _checks.empty((L, C), dtype=pos_dtype, device=dev) if full else torch.zeros(
            (L, C), dtype=pos_dtype, device=dev)
        window = dpos[start:start + n]
    else:
        dpos, window = grad.new_empty((0,), dtype=pos_dtype), None
    if backend == "triton":
        from ..triton_kernels import pyramid_pos_level_add as tk

        tk.pyramid_pos_level_add_bwd(grad, window, dlvl, chunks, offsets, partial, pos_weight=pos_weight)
    elif backend == "cuda":
        lib = _cuda.lib()
        lib.pyramid_pos_level_add_bwd(
            _cuda.ptr(grad), _cuda.dtype_code(grad), list(grad.stride()),
            _cuda.ptr(window), _cuda.dtype_code(dpos) if need_dpos else 0, C,
            _cuda.ptr(dlvl), _cuda.dtype_code(dlvl), C,
            _cuda.ptr(chunks), chunks.shape[0], _cuda.ptr(offsets), len(sc),
            _cuda.ptr(partial), B, n, C, pos_weight, dev.index, _cuda.stream(dev))
    else:
        raise ValueError(f"posenc_fast::{OP} has no kernel for backend {backend!r}")
    return dpos, dlvl


_bwd_op = torch.library.custom_op("posenc_fast::pyramid_pos_level_add_backward", mutates_args=())(_backward_impl)


@_bwd_op.register_fake
def _(grad, scales, start, L, pos_weight, need_dpos, pos_dtype, lvl_dtype, backend):
    C = grad.shape[2]
    dpos = grad.new_empty((L, C) if need_dpos else (0,), dtype=pos_dtype)
    return dpos, grad.new_empty((len(scales) // 2, C), dtype=lvl_dtype)


def _setup_context(ctx, inputs, output):
    x, pos, lvl, scales, start, pos_weight, sincos_weight, backend = inputs
    ctx.scales, ctx.start, ctx.pos_weight, ctx.backend = scales, start, pos_weight, backend
    ctx.x_dtype, ctx.lvl_dtype = x.dtype, lvl.dtype
    ctx.has_pos = pos is not None
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = lvl.dtype if pos is None else pos.dtype


def _backward(ctx, grad):
    _, need_pos, need_lvl = ctx.needs_input_grad[:3]
    dx = grad.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    if not (need_pos or need_lvl):
        return dx, None, None, None, None, None, None, None
    L = pyramid_length(_unflat(tuple(ctx.scales)))
    bwd = _fastpath.pick(_bwd_op, _backward_impl, grad)
    dpos, dlvl = bwd(grad, ctx.scales, ctx.start, L, ctx.pos_weight, bool(ctx.has_pos and need_pos),
                     ctx.pos_dtype, ctx.lvl_dtype, ctx.backend)
    dpos = dpos.reshape(ctx.pos_shape) if (ctx.has_pos and need_pos) else None
    return dx, dpos, (dlvl if need_lvl else None), None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_checks.refuse_double_backward(_bwd_op, OP)
_Function = _fastpath.autograd_function(_forward, _setup_context, _backward, "PyramidPosLevelAdd")
_PLANS = _fastpath.PlanCache()
_LAUNCHES = _fastpath.launch_plans()
_grad_enabled = torch.is_grad_enabled
_traced = _fastpath._traced


def _validate(x, pos, lvl, patch_nums, start, pos_weight, sincos_weight):
    _checks.check_tensor("x", x, ndim=3)
    _checks.check_tensor("pos", pos, ndim=(2, 3), allow_none=True)
    _checks.check_tensor("lvl", lvl, ndim=2)
    device = _checks.check_same_device(x=x, pos=pos, lvl=lvl)
    scales = normalize_scales(patch_nums)
    L, S = pyramid_length(scales), len(scales)
    B, n, C = x.shape
    if C == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if pos is not None:
        if pos.dim() == 3 and pos.shape[0] != 1:
            raise ValueError(f"pos must be (L, C) or (1, L, C), got shape {tuple(pos.shape)}")
        if pos.shape[-2] != L:
            raise ValueError(f"pos has {pos.shape[-2]} positions but patch_nums {list(patch_nums)} "
                             f"describe L = {L} tokens")
        if pos.shape[-1] != C:
            raise ValueError(f"pos has {pos.shape[-1]} channels but x has C = {C}")
    if lvl.shape[0] != S:
        raise ValueError(f"lvl has {lvl.shape[0]} rows but patch_nums has {S} scales")
    if lvl.shape[1] != C:
        raise ValueError(f"lvl has {lvl.shape[1]} channels but x has C = {C}")
    _checks.check_int("start", start, minimum=0)
    if start + n > L:
        raise ValueError(f"window [start, start + n) = [{start}, {start + n}) exceeds the pyramid's L = {L} tokens")
    for name, v in (("pos_weight", pos_weight), ("sincos_weight", sincos_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if sincos_weight != 0.0 and C % 2:
        raise ValueError(f"the sincos table needs an even number of channels, x has C = {C}")
    return device, scales


def _plan(x, pos, lvl, patch_nums, start, pos_weight, sincos_weight, requested):
    """What the checks and the backend choice give a call signature (cached)."""
    device, scales = _validate(x, pos, lvl, patch_nums, start, pos_weight, sincos_weight)
    name = _backends.resolve_backend(OP, requested, device)
    flat = _flat(scales)
    meta = None if name == "reference" else _token_meta(flat, device)
    out_dtype = ref.output_dtype(x, pos, lvl)
    codes = None if name == "reference" else _dtype_codes(x, pos, lvl, out_dtype)
    return name, scales, flat, out_dtype, meta, float(pos_weight), float(sincos_weight), codes


def pyramid_pos_level_add(x: torch.Tensor, pos: Optional[torch.Tensor], lvl: torch.Tensor,
                          patch_nums: Sequence[Scale], *, start: int = 0, pos_weight: float = 1.0,
                          sincos_weight: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """``x + pos[start + i] + lvl[level(start + i)]`` for the pyramid tokens ``[start, start + n)``.

    Args:
        x: (B, n, C) token embeddings holding pyramid tokens ``[start, start + n)``
            (any batch: classifier-free guidance doubles it). Any strides.
        pos: learned position table (L, C) or VAR's ``pos_1LC`` (1, L, C); None for
            no learned table.
        lvl: level embedding (S, C), e.g. VAR's ``lvl_embed.weight``.
        patch_nums: the scales, coarse to fine: ``[pn]`` (square) or ``[(h, w)]``.
        start: first pyramid token held by x (scale-by-scale inference: ``begin_s``).
        pos_weight / sincos_weight: coefficients of the learned table and of the fixed
            2D sinusoidal pyramid table (SPEC §2.1), generated inside the kernels;
            ``mixed`` tables use ``alpha`` and ``1 - alpha``.
        backend: None, "auto", "cuda", "triton" or "reference" (see ``use_backend``).

    Returns a new (B, n, C) tensor in the dtype eager PyTorch gives ``x + pos + lvl``;
    sums in fp32. Gradients: ``dx = dout``; ``dpos`` for the window rows and ``dlvl``
    come from one deterministic pass over ``dout``.
    """
    requested = _backends.requested_backend(backend)
    # Written for host time: at sampling sizes this function is the op's whole cost,
    # against one eager add (bench/host_overhead.py). First the CUDA launch plan of
    # the non-tensor arguments, whose tensors the library checks in C.
    # (Grad mode and tracing first: a compiled graph must not guard on the plans.)
    # The key also files the plan a direct CUDA launch below makes.
    fast_key = fast = None
    if not _grad_enabled() and not _traced():
        try:
            fast_key = (requested, patch_nums if type(patch_nums) is tuple else tuple(patch_nums), start, pos_weight,
                        sincos_weight)
            fast = _LAUNCHES.get(fast_key)
        except TypeError:  # unhashable or not a sequence: the checks below say what is wrong
            fast_key = None
        if fast is not None:
            out = _fastpath.launch_planned(fast, x, pos, lvl)
            if out is not None:
                return out
    # Then the plan of the whole signature: its key is built inline (no helper
    # calls); a cached plan skips every check that reads only what it holds.
    try:
        key = (requested, x.shape, x.dtype, x.device, None if pos is None else (pos.shape, pos.dtype, pos.device),
               lvl.shape, lvl.dtype, lvl.device, patch_nums if type(patch_nums) is tuple else tuple(patch_nums),
               start, pos_weight, sincos_weight)
    except (AttributeError, TypeError):  # not tensors / not a sequence: the checks say what is wrong
        key = None
    plan = _PLANS.lookup(key)
    if plan is None:
        plan = _PLANS.get(key, lambda: _plan(x, pos, lvl, patch_nums, start, pos_weight, sincos_weight, requested))
    name, scales, flat, out_dtype, meta, pw, sw, codes = plan
    if name == "reference":
        return ref.pyramid_pos_level_add(x, pos, lvl, scales, start=start, pos_weight=pw, sincos_weight=sw)
    route = _fastpath.route(x, pos, lvl)
    if route is _fastpath.DIRECT:
        out = _checks.empty_like(x, dtype=out_dtype)
        _launch_fwd(x, pos, lvl, meta, out, start, pw, sw, name, codes)
        if name == "cuda" and fast_key is not None:
            lib = _cuda.lib()
            _LAUNCHES[fast_key] = (
                _fastpath.output_allocator(x, out_dtype), lib.launch_planned,
                lib.pyramid_pos_level_add_fwd_plan(*_cuda_fwd_args(x, pos, lvl, meta, None, start, pw, sw, codes)),
                meta)
        return out
    if route is _fastpath.AUTOGRAD:
        return _Function.apply(x, pos, lvl, flat, start, pw, sw, name)
    return _fwd_op(x, pos, lvl, flat, start, pw, sw, name)
