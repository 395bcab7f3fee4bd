"""Triton kernels for ``pos_embed_add`` (the additive position encodings of the wider family).

Forward: one program owns a (token block, channel block) tile and builds its
embedding once in fp32: the weighted sum of the tile's learned table rows (sparse
row map, ``posenc_fast.ops.pos_embed``) plus ``weight * sin|cos((y fy + x fx) s)``
from per-token coordinates and per-channel descriptors (fixed kinds, no table in
memory); then streams it onto a slice of the batch. With per-image coordinates
(DETR's padding mask) the fixed part is computed per image.

FlexVAR's grid (C, Gh, Gw) is read in its own layout by ``_grid_fwd_kernel``: a
program owns a chunk of one token row of one scale (the area windows of a row share
their grid rows), sums those grid rows per cell with (cells, channels) tile loads,
contiguous along the cells, then adds each cell sum into the tokens whose column
windows hold it. So no thread walks a coarse token's window alone (a scale-1
token's 1024 cells are 64 (16-cell, channel-block) tile loads), and no copy or cache
of the grid exists that could go stale.

Backward (deterministic, no atomics): ``_bwd_tokens_kernel`` sums the gradient over
the batch per token (fp32; a (batch block, channel block) tile per step, reduced
in a fixed order); ``_bwd_table_kernel`` gathers each table row from the tokens
that read it, in token order.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from ._launch import batch_per_program, cdiv, next_power_of_2, num_sms, stream_tiling


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
def _grid_fwd_kernel(x_ptr, out_ptr, grid_ptr, chunks_ptr, B, n, C, Gw, b_per_prog, sxb, sxt, sxc, sgc, sgy, sgx,
                     ALIGN_X: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
    # A chunk: tokens [t0, t0 + cnt) of the window, columns j0.. of a row of a scale
    # w tokens wide whose area windows span grid rows [y0, y1); their windows lie in
    # cells [xa, xb) (xa, xb multiples of ALIGN_X: aligned vector loads). Prefix
    # tokens: an empty range.
    q = tl.program_id(0) * 8
    t0 = tl.load(chunks_ptr + q)
    cnt = tl.load(chunks_ptr + q + 1)
    y0 = tl.load(chunks_ptr + q + 2)
    y1 = tl.load(chunks_ptr + q + 3)
    xa = tl.multiple_of(tl.load(chunks_ptr + q + 4), ALIGN_X)
    xb = tl.multiple_of(tl.load(chunks_ptr + q + 5), ALIGN_X)
    j0 = tl.load(chunks_ptr + q + 6)
    w = tl.load(chunks_ptr + q + 7)
    jj = tl.arange(0, BLOCK_T)
    t_ok = jj < cnt
    # int64 indices: index x stride may pass 2^31 for large or strided tensors.
    t = t0.to(tl.int64) + jj
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    # each token's column window, and 1 / its cell count
    j = j0 + jj
    x0 = (j * Gw) // w
    x1 = ((j + 1) * Gw + w - 1) // w
    emb = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for xs in range(xa, xb, BLOCK_X):
        xv = xs + tl.arange(0, BLOCK_X)
        m = (xv < xb)[:, None] & c_ok[None, :]
        ptrs = grid_ptr + xv[:, None] * sgx + c[None, :] * sgc + y0 * sgy
        acc = tl.zeros([BLOCK_X, BLOCK_C], dtype=tl.float32)
        # A counter only (ptrs advance). Unrolled so that two rows' loads are in flight
        # (a scale-1 token sums all Gh rows); at 3 or 4, ptxas spilled on sm_90.
        for _ in tl.range(y0, y1, loop_unroll_factor=2):
            acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
            ptrs += sgy
        # Each cell's sum into the tokens whose windows hold it, by selection: a 0-weighted
        # product (a dot) would spread a NaN / Inf cell into its neighbours' tokens.
        for k in tl.static_range(BLOCK_X):
            cell = tl.sum(tl.where((xv == xs + k)[:, None], acc, 0.0), axis=0)
            emb += tl.where(((x0 <= xs + k) & (xs + k < x1))[:, None], cell[None, :], 0.0)
    emb *= (1.0 / tl.maximum((y1 - y0) * (x1 - x0), 1).to(tl.float32))[:, None]

    mask = t_ok[:, None] & c_ok[None, :]
    b0 = tl.program_id(2).to(tl.int64) * b_per_prog
    x_ptrs = x_ptr + b0 * sxb + t[:, None] * sxt + c[None, :] * sxc
    out_ptrs = out_ptr + b0 * n * C + t[:, None] * C + c[None, :]
    for _ in range(b0, tl.minimum(b0 + b_per_prog, B)):  # a counter only (the pointers advance)
        xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (xv + emb).to(out_ptr.dtype.element_ty), mask=mask)
        x_ptrs += sxb
        out_ptrs += n * C


@triton.jit
def _bwd_tokens_kernel(g_ptr, gtok_ptr, B, C, sgb, sgt, sgc, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # int64 indices: the gradient's batch or row offsets may pass 2^31 elements.
    t = tl.program_id(0).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    b = tl.arange(0, BLOCK_B).to(tl.int64)
    g_row = g_ptr + t * sgt + c[None, :] * sgc
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for _ in range(0, B, BLOCK_B):  # a counter only (b advances)
        m = (b < B)[:, None] & c_ok[None, :]
        acc += tl.load(g_row + b[:, None] * sgb, mask=m, other=0.0).to(tl.float32)
        b += BLOCK_B
    tl.store(gtok_ptr + t * C + c, tl.sum(acc, axis=0), mask=c_ok)


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


# _fwd_kernel (4 warps, Triton's default) by how the embedding is built: (elements of
# the tile a thread holds, programs an SM holds on sm_90). Registers there: rows of a
# table with unit channel stride 48; a shared sinusoid 71 at 8 elements a thread (sin
# and cos are both evaluated: at 16 it spilled); per-image sinusoids (DETR's mask) 117
# (at 8 it spilled). tools/kernel_report.py checks these at its workloads.
_FWD_THREADS = 128
_FWD_SHAPE = {"rows": (16, 10), "fixed": (8, 7), "per_image": (16, 4)}


@functools.lru_cache(maxsize=1024)
def _fwd_config(B: int, n: int, C: int, shape: str, device: torch.device):
    """(grid, BLOCK_C, BLOCK_T, batch rows per program), cached per shape (host time at
    sampling sizes). Each program reuses its embedding tile across its batch slice,
    sliced for whole waves as in the pyramid forward."""
    per_thread, programs = _FWD_SHAPE[shape]
    BLOCK_C, BLOCK_T, b_per_prog = stream_tiling(B, n, C, programs * num_sms(device), per_thread * _FWD_THREADS)
    return (cdiv(n, BLOCK_T), cdiv(C, BLOCK_C), cdiv(B, b_per_prog)), BLOCK_C, BLOCK_T, b_per_prog


def pos_embed_add_fwd(x, table, cptr, cidx, cw, coords, desc, out, *, start: int, angle_scale: float) -> None:
    """Writes ``out`` (contiguous (B, n, C)). ``table`` (K, C) with its row map
    (cptr, cidx, cw) or None; ``coords`` (P + L, 3) or per image (B, P + L, 3) with
    ``desc`` (C, 3), or None."""
    B, n, C = x.shape
    if B == 0 or n == 0:
        return
    has_table, has_fixed = table is not None, coords is not None
    per_image = has_fixed and coords.dim() == 3
    if has_table:
        shape = "rows"
    else:
        shape = "per_image" if per_image else "fixed"
    grid, BLOCK_C, BLOCK_T, b_per_prog = _fwd_config(B, n, C, shape, x.device)
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
    if n > 0:
        # One token a program: over ten waves at the SPEC workloads.
        BLOCK_C = min(next_power_of_2(C), 64)
        BLOCK_B = max(1, min(next_power_of_2(max(B, 1)), 4096 // BLOCK_C))
        _bwd_tokens_kernel[(n, cdiv(C, BLOCK_C))](
            grad, gtok, B, C, grad.stride(0), grad.stride(1), grad.stride(2), BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
        )
    if K > 0:
        # Four fp32 channels a thread: 16-byte loads of the workspace.
        BLOCK_C = min(next_power_of_2(C), 512)
        _bwd_table_kernel[(K, cdiv(C, BLOCK_C))](
            gtok, tptr, ttok, tw, dtable, C, n, start, dtable.stride(0), BLOCK_C=BLOCK_C,
            num_warps=max(1, BLOCK_C // 128),
        )


# _grid_fwd_kernel: chunks of ops.pos_embed._GRID_CHUNK_TOKENS tokens; BLOCK_X cells a
# pass (32 took 122 registers on sm_90); BLOCK_C channels over 8 warps: 8 tile elements
# (16 bytes of 16-bit x) a thread, 64 registers, 4 programs an SM on sm_90 and sm_80
# (tools/kernel_report.py checks them).
_GRID_BLOCK_T = 16
_GRID_BLOCK_X = 16
_GRID_BLOCK_C = 128
_GRID_WARPS = 8
_GRID_PROGRAMS = 4


@functools.lru_cache(maxsize=1024)
def _grid_config(B: int, n: int, C: int, chunks: int, x_bytes: int, grid_bytes: int, device: torch.device):
    """(grid, batch rows per program), cached per shape (host time at sampling sizes).
    Each program reuses its embedding tile across its batch slice, sliced for whole
    waves as in the other forwards; each slice re-reads the grid (``grid_bytes``,
    from L2), at most about 5% of x's ``x_bytes``."""
    tiles = chunks * cdiv(C, _GRID_BLOCK_C)
    b_per_prog = batch_per_program(tiles, B, _GRID_PROGRAMS * num_sms(device), 1 + x_bytes // (10 * grid_bytes))
    return (chunks, cdiv(C, _GRID_BLOCK_C), cdiv(B, b_per_prog)), b_per_prog


def pos_embed_grid_fwd(x, table, chunks, out) -> None:
    """Writes ``out`` (contiguous (B, n, C)) = x + FlexVAR's area-resized grid: ``table``
    (C, Gh, Gw) or (1, C, Gh, Gw), any strides; ``chunks`` int32 (Q, 8) (ops.pos_embed
    ``_grid_chunks``) of at most 16 tokens each."""
    B, n, C = x.shape
    if B == 0 or n == 0:
        return
    Gw = table.shape[-1]
    grid, b_per_prog = _grid_config(B, n, C, chunks.shape[0], x.numel() * x.element_size(),
                                    table.numel() * table.element_size(), x.device)
    sgc, sgy, sgx = table.stride()[-3:]
    _grid_fwd_kernel[grid](
        x, out, table, chunks, B, n, C, Gw, b_per_prog, x.stride(0), x.stride(1), x.stride(2), sgc, sgy, sgx,
        ALIGN_X=8 if Gw % 8 == 0 else 1, BLOCK_T=_GRID_BLOCK_T, BLOCK_X=_GRID_BLOCK_X, BLOCK_C=_GRID_BLOCK_C,
        num_warps=_GRID_WARPS,
    )
