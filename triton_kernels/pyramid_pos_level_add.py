"""Triton kernels for the fused pyramid position + level embedding addition.

Forward: one program owns a (token block, channel block) tile, builds its
embedding once in fp32 (level row + weighted learned row + weighted in-kernel
sinusoid, SPEC §2.1) and streams it onto a slice of the batch, so pos/lvl are read
once per token and x/out once per element.

Backward (deterministic, no atomics): ``_bwd_rows_kernel`` sums the gradient over
the batch for each row of a chunk (chunks never straddle levels), writes dpos and
one fp32 partial per chunk; ``_bwd_levels_kernel`` adds each level's partials in
chunk order.

The launchers take the token/chunk tables built by ``posenc_fast.ops.pyramid`` and
assume validated arguments.
"""

from __future__ import annotations

import functools
import math

import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2, num_sms, stream_tiling

_LN_10000 = math.log(10000.0)


@triton.jit
def _fwd_kernel(x_ptr, pos_ptr, lvl_ptr, meta_ptr, out_ptr,
                B, n, C, start, b_per_prog,
                sxb, sxt, sxc, spt, spc, sls, slc,
                pos_weight, sincos_weight, sincos_coef,
                HAS_POS: tl.constexpr, HAS_SINCOS: tl.constexpr,
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
    g = start + t
    level = tl.load(meta_ptr + g * 3, mask=t_ok, other=0)
    emb = tl.load(lvl_ptr + level[:, None] * sls + c[None, :] * slc, mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        p = tl.load(pos_ptr + g[:, None] * spt + c[None, :] * spc, mask=mask, other=0.0).to(tl.float32)
        emb += pos_weight * p
    if HAS_SINCOS:
        row = tl.load(meta_ptr + g * 3 + 1, mask=t_ok, other=0).to(tl.float32)
        col = tl.load(meta_ptr + g * 3 + 2, mask=t_ok, other=0).to(tl.float32)
        half = C // 2
        is_row = c < half
        k = tl.where(is_row, c, c - half)
        w = tl.exp((k // 2).to(tl.float32) * 2.0 * sincos_coef)
        angle = tl.where(is_row[None, :], row[:, None], col[:, None]) * w[None, :]
        pe = tl.where((k % 2 == 0)[None, :], tl.sin(angle), tl.cos(angle))
        emb += sincos_weight * pe

    b0 = pid_b.to(tl.int64) * b_per_prog
    x_ptrs = x_ptr + b0 * sxb + t[:, None] * sxt + c[None, :] * sxc
    out_ptrs = out_ptr + b0 * n * C + t[:, None] * C + c[None, :]
    for _ in range(b0, tl.minimum(b0 + b_per_prog, B)):
        xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (xv + emb).to(out_ptr.dtype.element_ty), mask=mask)
        x_ptrs += sxb
        out_ptrs += n * C


@triton.jit
def _bwd_rows_kernel(g_ptr, dpos_ptr, partial_ptr, chunks_ptr,
                     B, C, sgb, sgt, sgc, sdp, pos_weight,
                     HAS_DPOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    pid_c = tl.program_id(1)
    r0 = tl.load(chunks_ptr + chunk * 3)
    r1 = tl.load(chunks_ptr + chunk * 3 + 1)
    # int64 indices and row pointers advanced by their stride: the gradient's batch
    # or row offsets may pass 2^31 elements.
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    bb = tl.arange(0, BLOCK_B).to(tl.int64)
    chunk_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_row = g_ptr + r0.to(tl.int64) * sgt + c[None, :] * sgc
    dpos_row = dpos_ptr + r0.to(tl.int64) * sdp + c
    for r in range(r0, r1):  # r, b0: counters only (the pointers advance)
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        b = bb
        for b0 in range(0, B, BLOCK_B):
            m = (b < B)[:, None] & c_ok[None, :]
            acc += tl.load(g_row + b[:, None] * sgb, mask=m, other=0.0).to(tl.float32)
            b += BLOCK_B
        row = tl.sum(acc, axis=0)
        if HAS_DPOS:
            tl.store(dpos_row, (pos_weight * row).to(dpos_ptr.dtype.element_ty), mask=c_ok)
        chunk_sum += row
        g_row += sgt
        dpos_row += sdp
    tl.store(partial_ptr + chunk.to(tl.int64) * C + c, chunk_sum, mask=c_ok)


@triton.jit
def _bwd_levels_kernel(partial_ptr, offsets_ptr, dlvl_ptr, C, sdl, BLOCK_C: tl.constexpr):
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    k0 = tl.load(offsets_ptr + s)
    k1 = tl.load(offsets_ptr + s + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    part = partial_ptr + k0.to(tl.int64) * C + c  # advanced by pointer: k * C may pass 2^31
    for k in range(k0, k1):  # k: a counter only (the pointer advances)
        acc += tl.load(part, mask=c_ok, other=0.0)
        part += C
    tl.store(dlvl_ptr + s * sdl + c, acc.to(dlvl_ptr.dtype.element_ty), mask=c_ok)


# Programs of _fwd_kernel an SM holds (48 registers x 4 warps on sm_90); the kernel
# report's wave-efficiency gate fails if this stops being true at the SPEC workloads.
FWD_PROGRAMS_PER_SM = 10


@functools.lru_cache(maxsize=1024)
def _fwd_config(B: int, n: int, C: int, device: torch.device):
    """(grid, BLOCK_C, BLOCK_T, batch rows per program), cached per shape: at sampling
    sizes the launcher's host time is the op's cost."""
    BLOCK_C, BLOCK_T, b_per_prog = stream_tiling(B, n, C, FWD_PROGRAMS_PER_SM * num_sms(device))
    return (cdiv(n, BLOCK_T), cdiv(C, BLOCK_C), cdiv(B, b_per_prog)), BLOCK_C, BLOCK_T, b_per_prog


def pyramid_pos_level_add_fwd(x, pos, lvl, token_meta, out, *, start: int, pos_weight: float,
                              sincos_weight: float) -> None:
    """Writes ``out`` (contiguous (B, n, C)). ``pos`` is (L, C), (1, L, C) or None."""
    B, n, C = x.shape
    if B == 0 or n == 0:
        return
    grid, BLOCK_C, BLOCK_T, b_per_prog = _fwd_config(B, n, C, x.device)
    has_pos = pos is not None
    sx, sl = x.stride(), lvl.stride()
    _fwd_kernel[grid](
        x, pos if has_pos else lvl, lvl, token_meta, out,
        B, n, C, start, b_per_prog,
        sx[0], sx[1], sx[2],
        pos.stride(-2) if has_pos else 0, pos.stride(-1) if has_pos else 0,
        sl[0], sl[1],
        float(pos_weight), float(sincos_weight), -_LN_10000 / max(C // 2, 1),
        HAS_POS=has_pos, HAS_SINCOS=sincos_weight != 0.0,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
    )


def pyramid_pos_level_add_bwd(grad, dpos_window, dlvl, chunks, level_chunk_offsets, partial, *,
                              pos_weight: float) -> None:
    """Writes ``dpos_window`` (n, C) rows (when not None), every row of ``dlvl`` and ``partial``."""
    B, n, C = grad.shape
    num_chunks = chunks.shape[0]
    BLOCK_C = min(next_power_of_2(C), 64)  # 128 left under a wave's worth of programs at VAR-d16
    BLOCK_B = max(1, min(next_power_of_2(max(B, 1)), 4096 // BLOCK_C))
    has_dpos = dpos_window is not None
    if num_chunks > 0:
        _bwd_rows_kernel[(num_chunks, cdiv(C, BLOCK_C))](
            grad, dpos_window if has_dpos else partial, partial, chunks,
            B, C, grad.stride(0), grad.stride(1), grad.stride(2),
            dpos_window.stride(0) if has_dpos else 0, float(pos_weight),
            HAS_DPOS=has_dpos, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
        )
    LEVEL_BLOCK_C = min(next_power_of_2(C), 1024)
    _bwd_levels_kernel[(dlvl.shape[0], cdiv(C, LEVEL_BLOCK_C))](
        partial, level_chunk_offsets, dlvl, C, dlvl.stride(0), BLOCK_C=LEVEL_BLOCK_C,
    )
