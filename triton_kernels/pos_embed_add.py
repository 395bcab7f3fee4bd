"""Triton kernels for ``pos_embed_add`` (the additive position encodings of the wider family).

Forward: one program owns a (token block, channel block) tile and builds its
embedding once in fp32: the weighted sum of the tile's learned table rows (sparse
row map, ``posenc_fast.ops.pos_embed``) plus ``weight * sin|cos((y fy + x fx) s)``
from per-token coordinates and per-channel descriptors (fixed kinds, no table in
memory); then streams it onto a slice of the batch. With per-image coordinates
(DETR's padding mask) the fixed part is computed per image.

Backward (deterministic, no atomics): ``_bwd_tokens_kernel`` sums the gradient over
the batch per token (fp32); ``_bwd_table_kernel`` gathers each table row from the
tokens that read it, in token order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2, num_sms


@triton.jit
def _fixed(coords_ptr, desc_ptr, t, t_ok, c, c_ok, angle_scale):
    """(BLOCK_T, BLOCK_C) fp32 of weight * sin|cos((y fy + x fx) angle_scale); coords rows by t."""
    y = tl.load(coords_ptr + t * 3, mask=t_ok, other=0.0)
    x = tl.load(coords_ptr + t * 3 + 1, mask=t_ok, other=0.0)
    wt = tl.load(coords_ptr + t * 3 + 2, mask=t_ok, other=0.0)
    fy = tl.load(desc_ptr + c * 3, mask=c_ok, other=0.0)
    fx = tl.load(desc_ptr + c * 3 + 1, mask=c_ok, other=0.0)
    is_cos = tl.load(desc_ptr + c * 3 + 2, mask=c_ok, other=0.0)
    angle = (y[:, None] * fy[None, :] + x[:, None] * fx[None, :]) * angle_scale
    return wt[:, None] * tl.where(is_cos[None, :] != 0.0, tl.cos(angle), tl.sin(angle))


@triton.jit
def _fwd_kernel(x_ptr, out_ptr, table_ptr, cptr_ptr, cidx_ptr, cw_ptr, coords_ptr, desc_ptr,
                B, n, C, start, b_per_prog, sxb, sxt, sxc, stk, stc, scb, angle_scale,
                HAS_TABLE: tl.constexpr, HAS_FIXED: tl.constexpr, COORDS_PER_IMAGE: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    # int64 indices: index x stride may pass 2^31 for large or strided tensors.
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    t_ok = t < n
    c_ok = c < C
    mask = t_ok[:, None] & c_ok[None, :]
    emb = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_TABLE:
        g = start + t
        p0 = tl.load(cptr_ptr + g, mask=t_ok, other=0)
        cnt = tl.load(cptr_ptr + g + 1, mask=t_ok, other=0) - p0
        for j in range(0, tl.max(cnt, axis=0)):
            ok = t_ok & (j < cnt)
            k = tl.load(cidx_ptr + p0 + j, mask=ok, other=0).to(tl.int64)
            w = tl.load(cw_ptr + p0 + j, mask=ok, other=0.0)
            v = tl.load(table_ptr + k[:, None] * stk + c[None, :] * stc, mask=ok[:, None] & c_ok[None, :], other=0.0)
            emb += w[:, None] * v.to(tl.float32)
    if HAS_FIXED and not COORDS_PER_IMAGE:
        emb += _fixed(coords_ptr + start * 3, desc_ptr, t, t_ok, c, c_ok, angle_scale)

    b0 = pid_b.to(tl.int64) * b_per_prog
    x_ptrs = x_ptr + b0 * sxb + t[:, None] * sxt + c[None, :] * sxc
    out_ptrs = out_ptr + b0 * n * C + t[:, None] * C + c[None, :]
    for b in range(b0, tl.minimum(b0 + b_per_prog, B)):
        e = emb
        if HAS_FIXED and COORDS_PER_IMAGE:
            e += _fixed(coords_ptr + b * scb + start * 3, desc_ptr, t, t_ok, c, c_ok, angle_scale)
        xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (xv + e).to(out_ptr.dtype.element_ty), mask=mask)
        x_ptrs += sxb
        out_ptrs += n * C


@triton.jit
def _bwd_tokens_kernel(g_ptr, gtok_ptr, B, n, C, sgb, sgt, sgc,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (t < n)[:, None] & (c < C)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    g_ptrs = g_ptr + t[:, None] * sgt + c[None, :] * sgc
    for _ in range(0, B):  # a counter only (the pointers advance)
        acc += tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        g_ptrs += sgb
    tl.store(gtok_ptr + t[:, None] * C + c[None, :], acc, mask=mask)


@triton.jit
def _bwd_table_kernel(gtok_ptr, tptr_ptr, ttok_ptr, tw_ptr, dtab_ptr, C, n, start, sdk,
                      BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    q0 = tl.load(tptr_ptr + k)
    q1 = tl.load(tptr_ptr + k + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(q0, q1):
        t = tl.load(ttok_ptr + j).to(tl.int64) - start
        w = tl.load(tw_ptr + j)
        # Tokens outside the window have no gradient (a broadcast mask: scalar masks fail in the interpreter).
        ok = c_ok & ((c * 0 + t) >= 0) & ((c * 0 + t) < n)
        acc += w * tl.load(gtok_ptr + t * C + c, mask=ok, other=0.0)
    tl.store(dtab_ptr + k.to(tl.int64) * sdk + c, acc.to(dtab_ptr.dtype.element_ty), mask=c_ok)


def pos_embed_add_fwd(x, table, cptr, cidx, cw, coords, desc, out, *, start: int, angle_scale: float) -> None:
    """Writes ``out`` (contiguous (B, n, C)). ``table`` (K, C) with its row map
    (cptr, cidx, cw) or None; ``coords`` (P + L, 3) or per image (B, P + L, 3) with
    ``desc`` (C, 3), or None."""
    B, n, C = x.shape
    if B == 0 or n == 0:
        return
    BLOCK_C = min(next_power_of_2(C), 128)
    BLOCK_T = max(1, min(2048 // BLOCK_C, next_power_of_2(n)))
    tiles = cdiv(n, BLOCK_T) * cdiv(C, BLOCK_C)
    has_table, has_fixed = table is not None, coords is not None
    per_image = has_fixed and coords.dim() == 3
    # Split the batch until the grid fills the device; each program reuses its
    # embedding tile across its batch slice.
    splits = max(1, min(B, (8 * num_sms(x.device)) // max(tiles, 1)))
    b_per_prog = cdiv(B, splits)
    grid = (cdiv(n, BLOCK_T), cdiv(C, BLOCK_C), cdiv(B, b_per_prog))
    dummy = out
    _fwd_kernel[grid](
        x, out, table if has_table else dummy, cptr if has_table else dummy, cidx if has_table else dummy,
        cw if has_table else dummy, coords if has_fixed else dummy, desc if has_fixed else dummy,
        B, n, C, start, b_per_prog, x.stride(0), x.stride(1), x.stride(2),
        table.stride(0) if has_table else 0, table.stride(1) if has_table else 0,
        coords.stride(0) if per_image else 0, float(angle_scale),
        HAS_TABLE=has_table, HAS_FIXED=has_fixed, COORDS_PER_IMAGE=per_image,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
    )


def pos_embed_add_bwd(grad, gtok, tptr, ttok, tw, dtable, *, start: int) -> None:
    """Writes ``gtok`` (n, C) fp32 workspace and every row of ``dtable`` (K, C)."""
    B, n, C = grad.shape
    K = dtable.shape[0]
    BLOCK_C = min(next_power_of_2(C), 128)
    if n > 0:
        BLOCK_T = max(1, min(2048 // BLOCK_C, next_power_of_2(n)))
        _bwd_tokens_kernel[(cdiv(n, BLOCK_T), cdiv(C, BLOCK_C))](
            grad, gtok, B, n, C, grad.stride(0), grad.stride(1), grad.stride(2), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        )
    if K > 0:
        _bwd_table_kernel[(K, cdiv(C, BLOCK_C))](
            gtok, tptr, ttok, tw, dtable, C, n, start, dtable.stride(0), BLOCK_C=BLOCK_C,
        )
