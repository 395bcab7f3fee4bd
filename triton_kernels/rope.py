"""Triton kernel of the rotary family: q and k rotated in one launch.

One program owns a block of tokens of one batch element and a range of heads (q
heads first, then k heads). Angles ``sum_a coords[l, a] * freqs[a, j]`` are computed
in fp32 inside the program (no cos/sin tables in memory) and, for shared
frequencies, reused by every head of the range. Inputs and outputs take any
strides, so views into a packed qkv tensor and in-place rotation (output pointer =
input pointer) need no copies.

Backward = the same kernel with the rotation conjugated. With ``DFREQS`` it also
loads the saved forward outputs y and reduces ``dangle = g1 * y0 - g0 * y1`` times
the coordinates over the program's tokens (and heads, for shared frequencies) into
one fp32 partial per program; the launcher's caller adds the partials in a fixed
order, so d freqs is deterministic (no atomics).

The launcher assumes arguments validated by ``posenc_fast.ops.rope``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2, num_sms, wave_efficiency


@triton.jit
def _angles(c_base, scl, sca, f_base, sfa, sfp, offs_l, offs_p, l_ok, p_ok,
            A: tl.constexpr, CONJ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    ang = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
    for a in tl.static_range(A):
        c = tl.load(c_base + offs_l * scl + a * sca, mask=l_ok, other=0.0)
        f = tl.load(f_base + a * sfa + offs_p * sfp, mask=p_ok, other=0.0)
        ang += c[:, None] * f[None, :]
    sin = tl.sin(ang)
    if CONJ:
        sin = -sin
    return tl.cos(ang), sin


@triton.jit
def _table(t_base, stl, plane, offs_l, offs_p, l_ok, p_ok, CONJ: tl.constexpr, FULL_TABLE: tl.constexpr):
    """(cos0, sin0, cos1, sin1) of a tile (A = 0: table mode): y0 = x0 cos0 - x1 sin0,
    y1 = x0 sin1 + x1 cos1. From a (2, ..., L, P) fp32 table, or a (4, ..., L, P)
    full-width one with separate entries for the pairs' second elements; its
    transpose (CONJ) swaps the two sines."""
    m = l_ok[:, None] & p_ok[None, :]
    off = offs_l[:, None] * stl + offs_p[None, :]
    cos = tl.load(t_base + off, mask=m, other=0.0)
    sin = tl.load(t_base + plane + off, mask=m, other=0.0)
    if FULL_TABLE:
        cos1 = tl.load(t_base + 2 * plane + off, mask=m, other=0.0)
        sin1 = tl.load(t_base + 3 * plane + off, mask=m, other=0.0)
        if CONJ:
            return cos, -sin1, cos1, -sin
        return cos, sin, cos1, sin1
    if CONJ:
        sin = -sin
    return cos, sin, cos, sin


@triton.jit
def _tile_mask(l_ok, limit, WIDTH: tl.constexpr, EVEN_P: tl.constexpr):
    # With P a power of two only the token mask remains: constant along D, so the
    # compiler keeps 16-byte vector accesses.
    if EVEN_P:
        return tl.broadcast_to(l_ok[:, None], (l_ok.shape[0], WIDTH))
    return l_ok[:, None] & (tl.arange(0, WIDTH) < limit)[None, :]


@triton.jit
def _half(P, BLOCK_P: tl.constexpr, EVEN_P: tl.constexpr):
    # Offset of the second half of a head: a compile-time constant when P is a power
    # of two, so the second half's accesses stay vectorised too.
    if EVEN_P:
        return BLOCK_P
    return P


@triton.jit
def _load_pairs(base, sl, sd, offs_l, offs_p, l_ok, P, INTERLEAVED: tl.constexpr, EVEN_P: tl.constexpr):
    # offs_l is int64 and the dim indices are widened too: index x stride may pass 2^31.
    BLOCK_L: tl.constexpr = offs_l.shape[0]
    BLOCK_P: tl.constexpr = offs_p.shape[0]
    if INTERLEAVED:
        # One (L, 2P) tile contiguous along D, split in registers into the pair halves.
        offs_d = tl.arange(0, 2 * BLOCK_P)
        m = _tile_mask(l_ok, 2 * P, 2 * BLOCK_P, EVEN_P)
        x = tl.load(base + offs_l[:, None] * sl + offs_d.to(tl.int64)[None, :] * sd, mask=m,
                    other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_L, BLOCK_P, 2)))
    else:
        m = _tile_mask(l_ok, P, BLOCK_P, EVEN_P)
        row = offs_l[:, None] * sl
        x0 = tl.load(base + row + offs_p.to(tl.int64)[None, :] * sd, mask=m, other=0.0).to(tl.float32)
        x1 = tl.load(base + row + (offs_p + _half(P, BLOCK_P, EVEN_P)).to(tl.int64)[None, :] * sd, mask=m,
                     other=0.0).to(tl.float32)
    return x0, x1


@triton.jit
def _store_pairs(base, sl, sd, offs_l, offs_p, l_ok, P, y0, y1, INTERLEAVED: tl.constexpr, EVEN_P: tl.constexpr):
    BLOCK_L: tl.constexpr = offs_l.shape[0]
    BLOCK_P: tl.constexpr = offs_p.shape[0]
    ty = base.dtype.element_ty
    if INTERLEAVED:
        offs_d = tl.arange(0, 2 * BLOCK_P)
        m = _tile_mask(l_ok, 2 * P, 2 * BLOCK_P, EVEN_P)
        y = tl.reshape(tl.join(y0, y1), (BLOCK_L, 2 * BLOCK_P))
        tl.store(base + offs_l[:, None] * sl + offs_d.to(tl.int64)[None, :] * sd, y.to(ty), mask=m)
    else:
        m = _tile_mask(l_ok, P, BLOCK_P, EVEN_P)
        row = offs_l[:, None] * sl
        tl.store(base + row + offs_p.to(tl.int64)[None, :] * sd, y0.to(ty), mask=m)
        tl.store(base + row + (offs_p + _half(P, BLOCK_P, EVEN_P)).to(tl.int64)[None, :] * sd, y1.to(ty), mask=m)


@triton.jit
def _rotate_head(x_base, sxl, sxd, o_base, sol, sod, y_base, syl, syd, cos, sin, cos1, sin1,
                 offs_l, offs_p, l_ok, P, INTERLEAVED: tl.constexpr, EVEN_P: tl.constexpr, DFREQS: tl.constexpr):
    """Rotates one head's tile (cos1 / sin1: the pairs' second elements, the same
    tensors as cos / sin except for full-width tables); returns dangle (zeros unless
    DFREQS)."""
    x0, x1 = _load_pairs(x_base, sxl, sxd, offs_l, offs_p, l_ok, P, INTERLEAVED, EVEN_P)
    _store_pairs(o_base, sol, sod, offs_l, offs_p, l_ok, P,
                 x0 * cos - x1 * sin, x0 * sin1 + x1 * cos1, INTERLEAVED, EVEN_P)
    if DFREQS:
        y0, y1 = _load_pairs(y_base, syl, syd, offs_l, offs_p, l_ok, P, INTERLEAVED, EVEN_P)
        dang = x1 * y0 - x0 * y1
    else:
        dang = tl.zeros_like(x0)
    return dang


@triton.jit
def _coord_tile(c_base, scl, sca, offs_l, l_ok, A, BLOCK_A: tl.constexpr):
    offs_a = tl.arange(0, BLOCK_A)
    return tl.load(c_base + offs_l[:, None] * scl + offs_a[None, :] * sca,
                   mask=l_ok[:, None] & (offs_a < A)[None, :], other=0.0)


@triton.jit
def _store_partial(part_ptr, row, acc, A, P, BLOCK_A: tl.constexpr, BLOCK_P: tl.constexpr):
    offs_a = tl.arange(0, BLOCK_A)
    offs_p = tl.arange(0, BLOCK_P)
    off = row * (A * P) + offs_a[:, None] * P + offs_p[None, :]
    tl.store(part_ptr + off, acc, mask=(offs_a < A)[:, None] & (offs_p < P)[None, :])


@triton.jit
def _rotate_heads(x_ptr, o_ptr, y_ptr, sxb, sxh, sxl, sxd, sob, soh, sol, sod, syb, syh, syl, syd,
                  b, h_begin, h_end, cos, sin, cos1, sin1, acc, coords, part_ptr, part_row0, Hq,
                  c_base, scl, sca, f_ptr, sfh, sfa, sfp, offs_l, offs_p, l_ok, p_ok, P,
                  A: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                  INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, PER_HEAD: tl.constexpr,
                  DFREQS: tl.constexpr, EVEN_P: tl.constexpr):
    """Heads [h_begin, h_end) of one tensor (q or k); returns the updated shared-freqs
    d freqs accumulator (per-head partials go straight to rows part_row0 + h)."""
    for h in range(h_begin, h_end):
        if PER_HEAD:
            cs, sn = _angles(c_base, scl, sca, f_ptr + h * sfh, sfa, sfp, offs_l, offs_p, l_ok, p_ok,
                             A, CONJ, BLOCK_L, BLOCK_P)
            cs1, sn1 = cs, sn
        else:
            cs, sn, cs1, sn1 = cos, sin, cos1, sin1
        dang = _rotate_head(x_ptr + b * sxb + h * sxh, sxl, sxd, o_ptr + b * sob + h * soh, sol, sod,
                            y_ptr + b * syb + h * syh, syl, syd, cs, sn, cs1, sn1, offs_l, offs_p, l_ok, P,
                            INTERLEAVED, EVEN_P, DFREQS)
        if DFREQS:
            contrib = tl.sum(dang[:, None, :] * coords[:, :, None], axis=0)
            if PER_HEAD:
                _store_partial(part_ptr, part_row0 + h, contrib, A, P, BLOCK_A, BLOCK_P)
            else:
                acc += contrib
    return acc


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qy_ptr, ky_ptr, c_ptr, f_ptr, part_ptr,
                 L, P, Hq, Hk, heads_per_prog, n_hsplit, n_kinds,
                 sqb, sqh, sql, sqd, skb, skh, skl, skd,
                 sqob, sqoh, sqol, sqod, skob, skoh, skol, skod,
                 sqyb, sqyh, sqyl, sqyd, skyb, skyh, skyl, skyd,
                 scb, scl, sca, sfh, sfa, sfp,
                 A: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, PER_HEAD: tl.constexpr,
                 DFREQS: tl.constexpr, EVEN_P: tl.constexpr, FULL_TABLE: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    # int64 token indices: token x stride may pass 2^31 in large or strided tensors.
    offs_l = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    l_ok = offs_l < L
    p_ok = offs_p < P
    b = pid_b.to(tl.int64)
    c_base = c_ptr + b * scb
    if A == 0:  # table mode: c_ptr holds the (2 or 4, B or 1, L, P) table, sca its plane stride
        cos, sin, cos1, sin1 = _table(c_base, scl, sca, offs_l, offs_p, l_ok, p_ok, CONJ, FULL_TABLE)
    elif PER_HEAD:
        cos, sin, cos1, sin1 = 0.0, 0.0, 0.0, 0.0  # computed per head in _rotate_heads
    else:
        cos, sin = _angles(c_base, scl, sca, f_ptr, sfa, sfp, offs_l, offs_p, l_ok, p_ok,
                           A, CONJ, BLOCK_L, BLOCK_P)
        cos1, sin1 = cos, sin
    if DFREQS:
        coords = _coord_tile(c_base, scl, sca, offs_l, l_ok, A, BLOCK_A)
        acc = tl.zeros((BLOCK_A, BLOCK_P), dtype=tl.float32)
    else:
        coords, acc = 0.0, 0.0
    slot = pid_b * tl.num_programs(0) + pid_l
    # int64 head indices: head offsets of large packed tensors overflow int32.
    h_lo = pid_h.to(tl.int64) * heads_per_prog
    h_hi = tl.minimum(h_lo + heads_per_prog, Hq + Hk)
    # q heads [h_lo, h_hi) ∩ [0, Hq), then k heads; per-head partial rows are
    # (slot, q or k, head).
    acc = _rotate_heads(q_ptr, qo_ptr, qy_ptr, sqb, sqh, sql, sqd, sqob, sqoh, sqol, sqod, sqyb, sqyh, sqyl, sqyd,
                        b, h_lo, tl.minimum(h_hi, Hq), cos, sin, cos1, sin1, acc, coords, part_ptr,
                        slot * n_kinds * Hq, Hq,
                        c_base, scl, sca, f_ptr, sfh, sfa, sfp, offs_l, offs_p, l_ok, p_ok, P,
                        A, BLOCK_A, BLOCK_L, BLOCK_P, INTERLEAVED, CONJ, PER_HEAD, DFREQS, EVEN_P)
    acc = _rotate_heads(k_ptr, ko_ptr, ky_ptr, skb, skh, skl, skd, skob, skoh, skol, skod, skyb, skyh, skyl, skyd,
                        b, tl.maximum(h_lo, Hq) - Hq, h_hi - Hq, cos, sin, cos1, sin1, acc, coords, part_ptr,
                        (slot * n_kinds + 1) * Hq, Hq,
                        c_base, scl, sca, f_ptr, sfh, sfa, sfp, offs_l, offs_p, l_ok, p_ok, P,
                        A, BLOCK_A, BLOCK_L, BLOCK_P, INTERLEAVED, CONJ, PER_HEAD, DFREQS, EVEN_P)
    if DFREQS:
        if not PER_HEAD:
            _store_partial(part_ptr, slot * n_hsplit + pid_h, acc, A, P, BLOCK_A, BLOCK_P)


def _strides(t):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def grid_shape(B: int, L: int, P: int, Hq: int, Hk: int, device: torch.device):
    """(BLOCK_L, token blocks, head splits, heads per program): ~2K pairs per head tile;
    heads are split across programs only when tokens x batch cannot fill the device."""
    BLOCK_P = next_power_of_2(P)
    BLOCK_L = max(1, min(next_power_of_2(max(L, 1)), 2048 // BLOCK_P))
    n_l = cdiv(L, BLOCK_L)
    heads = Hq + Hk
    per = _heads_per_program(max(n_l * B, 1), heads, PROGRAMS_PER_SM * num_sms(device))
    return BLOCK_L, n_l, cdiv(heads, per), per


# Programs of _rope_kernel an SM holds (93 registers x 4 warps on sm_90); the kernel
# report's wave gate fails if this stops being true at the SPEC workloads.
PROGRAMS_PER_SM = 5


@functools.lru_cache(maxsize=1024)
def _heads_per_program(blocks: int, heads: int, slots: int) -> int:
    """Heads split over programs only as far as needed: to fill one wave, then to the
    first split that ends in whole waves (>= 0.85 of the last one busy); every split
    repeats the program's sin/cos work."""
    best_per, best_eff = heads, -1.0
    for s in range(min(heads, cdiv(slots, blocks)), heads + 1):
        per = cdiv(heads, s)
        eff = wave_efficiency(blocks * cdiv(heads, per), slots)
        if eff > best_eff + 1e-9:
            best_eff, best_per = eff, per
        if eff >= 0.85:
            break
    return best_per


def apply_rope(q, k, q_out, k_out, coords, coord_strides, freqs, *, interleaved: bool, conjugate: bool,
               q_saved=None, k_saved=None, partial=None, full_table: bool = False) -> None:
    """Rotates q (B, Hq, L, D) into q_out and k (B, Hk, L, D) (or None) into k_out.

    coords: fp32 (L, A) or (B or 1, L, A), read through ``coord_strides`` (batch,
    token, axis; batch stride 0 for shared coords); or, with freqs (0, P) (no axes), a
    contiguous (2, B or 1, L, P) cos/sin table (``full_table``: (4, B or 1, L, P), cos
    and sin of the pairs' first, then second elements) with ``coord_strides`` (batch,
    token, plane); freqs: fp32
    (A, P) or per head (Hq, A, P). ``partial`` (fp32, see ``partial_rows``) turns on
    the d freqs reduction, which needs the forward outputs ``q_saved`` / ``k_saved``
    (k only when k is given); q/k are then the output gradients."""
    B, Hq, L, D = q.shape
    P = D // 2
    Hk = 0 if k is None else k.shape[1]
    if B == 0 or L == 0 or Hq + Hk == 0:
        return
    per_head = freqs.dim() == 3
    A = freqs.shape[-2]
    dfreqs = partial is not None
    BLOCK_L, n_l, n_h, per = grid_shape(B, L, P, Hq, Hk, q.device)
    kk, ko = (k, k_out) if k is not None else (q, q_out)
    qy = q_saved if dfreqs else q
    ky = (k_saved if k is not None else q_saved) if dfreqs else kk
    fs = (freqs.stride(0), freqs.stride(1), freqs.stride(2)) if per_head else (0, freqs.stride(0), freqs.stride(1))
    _rope_kernel[(n_l, B, n_h)](
        q, kk, q_out, ko, qy, ky, coords, freqs, partial if dfreqs else coords,
        L, P, Hq, Hk, per, n_h, 2 if Hk else 1,
        *_strides(q), *_strides(kk), *_strides(q_out), *_strides(ko), *_strides(qy), *_strides(ky),
        *coord_strides, *fs,
        A=A, BLOCK_A=max(1, next_power_of_2(A)), BLOCK_L=BLOCK_L, BLOCK_P=next_power_of_2(P),
        INTERLEAVED=interleaved, CONJ=conjugate, PER_HEAD=per_head, DFREQS=dfreqs,
        EVEN_P=P == next_power_of_2(P), FULL_TABLE=full_table,
    )


def partial_rows(B: int, L: int, P: int, Hq: int, Hk: int, per_head: bool, device: torch.device) -> int:
    """Number of (A, P) partial rows the d freqs reduction writes: per head,
    (B * token blocks, 1 + has k, H); shared, (B * token blocks, head splits)."""
    _, n_l, n_h, _ = grid_shape(B, L, P, Hq, Hk, device)
    return B * n_l * (2 if Hk else 1) * Hq if per_head else B * n_l * n_h
