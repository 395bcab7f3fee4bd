"""Triton kernels for the fused attention input projection (SPEC §2.2, §2.3).

Forward (``qkv_proj_fwd``): one tiled GEMM ``x @ W^T`` (fp32 accumulation) whose
N-tile holds ``HEADS`` whole heads of one of q | k | v, so the epilogue finishes
them in registers: bias, per-head L2 norm (writes the fp32 inverse norms that the
backward needs), q_scale, 2D RoPE with in-kernel fp32 angles
``sum_a coords[l, a] * freqs[(h,) a, j]`` or cos/sin read from a per-token table
(``NUM_AXES`` 0: the packed (2, B|1, L, R/2) table of ``posenc_fast.ops.rope``), and
the store straight into the (B, H, L, D) outputs. Partial rotary (``ROT`` = R < D):
pairs j >= R/2 of a head keep their values (selected, so even an Inf there stays
as it is), in the same pass.

Pairs: the epilogue always sees rotation pairs as adjacent accumulator columns
(split of an [BM, BN/2, 2] view). For ``interleaved`` pairing that is the natural
column order; for ``half`` pairing the tile loads the weight rows in the permuted
order (j, j + D/2, j + 1, ...) -- which only changes which rows the W loads
gather, each row staying a contiguous run along K -- and one register permute
restores the natural order before the store, so every head row is stored as a
contiguous run. Chosen over two accumulators (twice the epilogue's live
registers) without GPU measurements: the simpler of the two options the issue
names; ``half`` vs ``interleaved`` timings in bench/ tell whether the permute costs.
With partial rotary the same reordering runs within each block of R columns of a
head (pairs (j, j + R/2) of the first block rotate, the other blocks pass
through), which is why Triton takes half pairing only with a power-of-two R
(register shapes are powers of two).

Outputs: q contiguous; k and v any (B, H, L, D) views of one layout with contiguous
head rows. With a KV cache they are the caller's (B, H, L_max, D) caches and the
store writes the rows ``[kv_start, kv_start + L)``: the append is the store itself,
no copy afterwards. (q keeps its fixed layout and k, v share one set of strides:
fewer live values in the epilogue, which must not start spilling.)

Backward (``qkv_proj_bwd``): one pass over dq, dk, dv writes the packed dQKV
(M, 3C) that the two GEMMs dX = dQKV W and dW = dQKV^T x (done by the caller)
consume. For q/k tiles it recovers the post-norm, pre-rotation vectors from the
saved outputs (``n = Rot^-1 q / q_scale``: no GEMM recompute, no saved copies),
goes through the norm and the scale and un-rotates the gradient; the rotation
cancels in the dot products, so only the gradient tile is mapped (``_bwd_kernel``).
A table need not be a rotation (Infinity's resampled mode-1 tables have cos^2 +
sin^2 != 1): there ``Rot^-1 = Rot^T / (cos^2 + sin^2)``. Per-row-block partial
sums of dbias, dq_scale and dfreqs are written to fp32 workspaces and summed by
the caller in a fixed order (deterministic, no atomics).

Launchers assume validated arguments (see ``posenc_fast.ops.qkv_proj``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile_columns(D: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr):
    """Tile column c -> (head within the tile, dim within the head), such that
    columns (2j, 2j + 1) of every head hold the two members of pair j: for half
    pairing (ROT | D) dims (j, j + ROT/2) of each block of ROT dims."""
    c = tl.arange(0, BLOCK_N)
    i = c % D
    if HALF:
        r = i % ROT
        dim = i - r + r // 2 + (r % 2) * (ROT // 2)
    else:
        dim = i
    return c // D, dim


@triton.jit
def _to_pairs(t, BLOCK_M: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
              ROT: tl.constexpr):
    """Natural head layout -> pairs in adjacent columns (identity for interleaved
    pairing; for half pairing (j, j + ROT/2) -> (2j, 2j + 1) per block of ROT dims)."""
    if HALF:
        t = tl.reshape(tl.permute(tl.reshape(t, (BLOCK_M, HEADS * (D // ROT), 2, ROT // 2)), (0, 1, 3, 2)),
                       (BLOCK_M, HEADS * D))
    return t


@triton.jit
def _from_pairs(t, BLOCK_M: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                ROT: tl.constexpr):
    """Inverse of ``_to_pairs``: back to the natural layout for contiguous stores."""
    if HALF:
        t = tl.reshape(tl.permute(tl.reshape(t, (BLOCK_M, HEADS * (D // ROT), ROT // 2, 2)), (0, 1, 3, 2)),
                       (BLOCK_M, HEADS * D))
    return t


@triton.jit
def _cos_sin(coords_ptr, c_off, sca, freqs_ptr, f_off, sfa, jj, NUM_AXES: tl.constexpr, ROT: tl.constexpr,
             D: tl.constexpr):
    """fp32 cos/sin ([BM, BN/2]) of the tile's pairs, jj their index within the head:
    of angle[m, p] = sum_a coords[m, a] * freqs[p, a], or with NUM_AXES == 0 read
    from the cos/sin table (token row at c_off, sin plane at + sca; f_off unused).
    Pairs jj >= ROT/2 (partial rotary) read nothing; the caller passes them through."""
    ok = jj < ROT // 2
    if NUM_AXES == 0:
        off = c_off[:, None] + jj[None, :]
        if ROT < D:
            cos = tl.load(coords_ptr + off, mask=ok[None, :], other=1.0)
            sin = tl.load(coords_ptr + sca + off, mask=ok[None, :], other=0.0)
        else:
            cos = tl.load(coords_ptr + off)
            sin = tl.load(coords_ptr + sca + off)
    else:
        if ROT < D:
            ang = tl.load(coords_ptr + c_off)[:, None] * tl.load(freqs_ptr + f_off, mask=ok, other=0.0)[None, :]
            for a in tl.static_range(1, NUM_AXES):
                ang += (tl.load(coords_ptr + c_off + a * sca)[:, None]
                        * tl.load(freqs_ptr + f_off + a * sfa, mask=ok, other=0.0)[None, :])
        else:
            ang = tl.load(coords_ptr + c_off)[:, None] * tl.load(freqs_ptr + f_off)[None, :]
            for a in tl.static_range(1, NUM_AXES):
                ang += tl.load(coords_ptr + c_off + a * sca)[:, None] * tl.load(freqs_ptr + f_off + a * sfa)[None, :]
        cos = tl.cos(ang)
        sin = tl.sin(ang)
    return cos, sin


@triton.jit
def _keep_tail(new, old, jj, ROT: tl.constexpr, D: tl.constexpr):
    """``new`` on the rotating pairs, ``old`` (untouched) on pairs jj >= ROT/2."""
    if ROT < D:
        new = tl.where((jj < ROT // 2)[None, :], new, old)
    return new


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, qs_ptr, coords_ptr, freqs_ptr,
                q_ptr, k_ptr, v_ptr, rstd_ptr,
                M, L, K, H, m_class, kv_start,
                sxb, sxl, sxk, swn, swk, scb, scl, sca, sfh, sfa, skvb, skvh, skvl,
                D: tl.constexpr, HEADS: tl.constexpr, NUM_AXES: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_QSCALE: tl.constexpr, L2NORM: tl.constexpr,
                ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                UPCAST_DOT: tl.constexpr = False):
    # m_class (0: M < LARGE_M, 1: larger) is only an autotuning key.
    BLOCK_N: tl.constexpr = HEADS * D
    P: tl.constexpr = BLOCK_N // 2
    # N-tiles fastest: consecutive programs share the x row block (read from DRAM
    # once), and W (<= 25 MB for the target models) stays in L2.
    pid = tl.program_id(0)
    num_n = 3 * H // HEADS
    pid_m = pid // num_n
    pid_n = pid % num_n
    C = H * D
    n0 = pid_n * BLOCK_N
    section = n0 // C  # 0: q, 1: k, 2: v
    head0 = (n0 - section * C) // D

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rmc = tl.minimum(rm, M - 1).to(tl.int64)  # clamped: the K loop needs no row mask
    bidx = rmc // L
    lidx = rmc % L
    hh, dim = _tile_columns(D, BLOCK_N, HALF, ROT)
    col = n0 + hh * D + dim  # packed qkv column = weight row

    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (bidx * sxb + lidx * sxl)[:, None] + rk[None, :] * sxk
    w_ptrs = w_ptr + col.to(tl.int64)[None, :] * swn + rk[:, None] * swk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = rk < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            # The interpreter's bf16 tl.dot is wrong; bf16 x bf16 products are exact
            # in fp32, so the upcast dot is what the GPU's bf16 MMA computes.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + col).to(tl.float32)[None, :]
    heads = head0 + tl.arange(0, HEADS)
    if section < 2:
        if L2NORM:
            acc3 = tl.reshape(acc, (BLOCK_M, HEADS, D))
            norm = tl.sqrt(tl.sum(acc3 * acc3, axis=2))
            # max(norm, eps) that keeps a NaN norm NaN, like eager's clamp_min
            # (tl.maximum may return eps for a NaN).
            rstd = 1.0 / tl.where(norm < 1e-12, 1e-12, norm)
            tl.store(rstd_ptr + (section * M + rmc)[:, None] * H + heads[None, :], rstd, mask=row_ok[:, None])
            acc = tl.reshape(acc3 * rstd[:, :, None], (BLOCK_M, BLOCK_N))
        if HAS_QSCALE:
            s = tl.load(qs_ptr + head0 + hh)
            acc = acc * tl.where(section == 0, s, 1.0)[None, :]
        if ROPE:
            p = tl.arange(0, P)
            jj = p % (D // 2)
            cos, sin = _cos_sin(coords_ptr, bidx * scb + lidx * scl, sca,
                                freqs_ptr, (head0 + p // (D // 2)) * sfh + jj, sfa, jj, NUM_AXES, ROT, D)
            x0, x1 = tl.split(tl.reshape(acc, (BLOCK_M, P, 2)))
            acc = tl.reshape(tl.join(_keep_tail(x0 * cos - x1 * sin, x0, jj, ROT, D),
                                     _keep_tail(x0 * sin + x1 * cos, x1, jj, ROT, D)), (BLOCK_M, BLOCK_N))

    # Natural column order for the store, so that each head row is a contiguous run.
    c = tl.arange(0, BLOCK_N)
    head = (head0 + c // D).to(tl.int64)
    out = _from_pairs(acc, BLOCK_M, HEADS, D, HALF, ROT).to(q_ptr.dtype.element_ty)
    # q is contiguous (B, H, L, D); k and v share one layout whose rows start at
    # kv_start (a KV-cache window). Scalars picked per tile, one offset tensor.
    is_q = section == 0
    sb = tl.where(is_q, H * L * D, skvb)
    sh = tl.where(is_q, L * D, skvh)
    sl = tl.where(is_q, D, skvl)
    l0 = tl.where(is_q, 0, kv_start)
    off = (bidx * sb + (lidx + l0) * sl)[:, None] + (head * sh + c % D)[None, :]
    if section == 0:
        tl.store(q_ptr + off, out, mask=row_ok[:, None])
    elif section == 1:
        tl.store(k_ptr + off, out, mask=row_ok[:, None])
    else:
        tl.store(v_ptr + off, out, mask=row_ok[:, None])


_fwd_heuristic = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_fwd_kernel)

# Hopper (large tiles, deep pipelines) and Ampere (smaller, 3-5 stages) candidates;
# BLOCK_N is fixed per shape by the head tiling.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=16, num_stages=3),  # D = 128 with rope
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_M": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# fp32 accumulator elements per thread that leave the epilogue room without spills
# (tools/kernel_report.py checks every launched config with ptxas): the rotation
# holds its cos/sin tiles and both pair halves beside the accumulator, whether the
# cos/sin come from angles or a table and whether all pairs rotate or not.
ACC_PER_THREAD = {False: 64, True: 32}


def _fits_registers(configs, named_args, **kwargs):
    """Drops the configs whose tile would spill for this call's head tiling and epilogue."""
    block_n = kwargs["HEADS"] * kwargs["D"]
    budget = ACC_PER_THREAD[bool(kwargs["ROPE"])]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * block_n // (32 * c.num_warps) <= budget]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * block_n // (32 * c.num_warps))]


_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS,
    # Not M itself: sampling calls with ever-new M, and each new key would tune again
    # (device syncs, no CUDA-graph capture). Small M never gets here (qkv_proj_fwd).
    key=["m_class", "K", "H", "D", "HEADS", "NUM_AXES", "L2NORM", "ROPE", "ROT", "IEEE"],
    prune_configs_by={"early_config_prune": _fits_registers},
)(_fwd_heuristic)

# Up to this many rows (sampling: 2B x n tokens of one scale) one fixed small-tile
# config runs, with one head per tile for the most programs; from LARGE_M rows the
# autotuner keys a second config family.
SMALL_M = 1024
LARGE_M = 8192


@triton.jit
def _bwd_kernel(dq_ptr, dk_ptr, dv_ptr, q_ptr, k_ptr, rstd_ptr, qs_ptr, coords_ptr, freqs_ptr,
                dqkv_ptr, dbias_ptr, dscale_ptr, dfreqs_ptr,
                M, L, H,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                scb, scl, sca, sfh, sfa,
                D: tl.constexpr, HEADS: tl.constexpr, NUM_AXES: tl.constexpr,
                HAS_QSCALE: tl.constexpr, L2NORM: tl.constexpr, ROPE: tl.constexpr, ROT: tl.constexpr,
                HALF: tl.constexpr,
                NEED_DBIAS: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DFREQS: tl.constexpr,
                BLOCK_M: tl.constexpr):
    BLOCK_N: tl.constexpr = HEADS * D
    P: tl.constexpr = BLOCK_N // 2
    pid_m = tl.program_id(0).to(tl.int64)  # workspace rows x widths may pass 2^31
    pid_n = tl.program_id(1)
    C = H * D
    n0 = pid_n * BLOCK_N
    section = n0 // C
    head0 = (n0 - section * C) // D

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rmc = tl.minimum(rm, M - 1).to(tl.int64)
    bidx = rmc // L
    lidx = rmc % L
    c = tl.arange(0, BLOCK_N)  # natural column order for loads and stores
    dim = (c % D).to(tl.int64)
    head = (head0 + c // D).to(tl.int64)
    col = n0 + c
    heads = head0 + tl.arange(0, HEADS)
    mask = row_ok[:, None]

    # Masked rows load as 0, so they add nothing to the partial sums below.
    if section == 0:
        g = tl.load(dq_ptr + (bidx * sqb + lidx * sql)[:, None] + (head * sqh + dim * sqd)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
    elif section == 1:
        g = tl.load(dk_ptr + (bidx * skb + lidx * skl)[:, None] + (head * skh + dim * skd)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(dv_ptr + (bidx * svb + lidx * svl)[:, None] + (head * svh + dim * svd)[None, :],
                    mask=mask, other=0.0).to(tl.float32)

    if section < 2:
        if L2NORM or HAS_QSCALE or ROPE:
            # Per head, with u = Rot^-1 out the pre-rotation value (s n: n normalised,
            # s the q scale; 1 for k) and g_u = Rot^T g its gradient, the maps cancel in
            # the dot products: g_u . u = g . out. So d q_scale = sum g . out / s, and
            # the norm's backward rstd (s g_u - n (g . out)) = rstd Rot^T (s g - out
            # (g . out) / (s |pair|^2)), with |pair|^2 = cos^2 + sin^2 (1 for angles:
            # Rot^-T Rot^-1 = 1 / |pair|^2): one map of one tile per pair.
            g = _to_pairs(g, BLOCK_M, HEADS, D, HALF, ROT)
            if L2NORM or NEED_DSCALE or NEED_DFREQS:  # what needs the saved output
                y_off = ((bidx * H * L + lidx) * D)[:, None] + (head * L * D + dim)[None, :]
                if section == 0:
                    y = tl.load(q_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
                else:
                    y = tl.load(k_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
                y = _to_pairs(y, BLOCK_M, HEADS, D, HALF, ROT)
            if HAS_QSCALE:
                s_h = tl.where(section == 0, tl.load(qs_ptr + heads), 1.0)
                # Where the scale is 0 the output is 0 and so is every gradient through
                # it: dividing by 1 instead keeps dx and dW exact (d q_scale needs nonzero
                # scales; ops/qkv_proj.py).
                s_div = tl.where(s_h == 0.0, 1.0, s_h)
                if NEED_DSCALE:
                    if section == 0:
                        gy = tl.sum(tl.reshape(g * y, (BLOCK_M, HEADS, D)), axis=2) / s_div[None, :]
                        tl.store(dscale_ptr + pid_m * H + heads, tl.sum(gy, axis=0))
            if ROPE:
                p = tl.arange(0, P)
                hp = head0 + p // (D // 2)
                jp = p % (D // 2)
                c_off = bidx * scb + lidx * scl
                if NEED_DFREQS:
                    g0, g1 = tl.split(tl.reshape(g, (BLOCK_M, P, 2)))
                    y0, y1 = tl.split(tl.reshape(y, (BLOCK_M, P, 2)))
                    # d out / d angle = (-out1, out0) for the rotated output (out0, out1).
                    dang = g1 * y0 - g0 * y1
                    f_base = ((pid_m * 2 + section) * H + hp) * (NUM_AXES * (ROT // 2)) + jp
                    for a in tl.static_range(NUM_AXES):
                        ca = tl.load(coords_ptr + c_off + a * sca)
                        tl.store(dfreqs_ptr + f_base + a * (ROT // 2), tl.sum(ca[:, None] * dang, axis=0),
                                 mask=jp < ROT // 2)
            g3 = tl.reshape(g, (BLOCK_M, HEADS, D))
            if L2NORM:
                dot = tl.sum(g3 * tl.reshape(y, (BLOCK_M, HEADS, D)), axis=2)
                if ROPE:
                    if NUM_AXES == 0:
                        cos, sin = _cos_sin(coords_ptr, c_off, sca, freqs_ptr, 0, 0, jp, NUM_AXES, ROT, D)
                        # Where cos = sin = 0 the output pair and its gradient are 0:
                        # dividing by 1 keeps the pair's gradient 0, but the norm's needs
                        # the lost value (ops/qkv_proj.py refuses that case).
                        mag = cos * cos + sin * sin
                        inv = 1.0 / tl.where(mag == 0.0, 1.0, mag)
                        y0, y1 = tl.split(tl.reshape(y, (BLOCK_M, P, 2)))
                        y = tl.reshape(tl.join(y0 * inv, y1 * inv), (BLOCK_M, BLOCK_N))
                y3 = tl.reshape(y, (BLOCK_M, HEADS, D))
                if HAS_QSCALE:
                    g3 = g3 * s_h[None, :, None] - y3 * (dot / s_div[None, :])[:, :, None]
                else:
                    g3 = g3 - y3 * dot[:, :, None]
                rstd = tl.load(rstd_ptr + (section * M + rmc)[:, None] * H + heads[None, :])
                g3 = g3 * rstd[:, :, None]
            elif HAS_QSCALE:
                g3 = g3 * s_h[None, :, None]
            g = tl.reshape(g3, (BLOCK_M, BLOCK_N))
            if ROPE:  # the transpose takes the gradient back through the rotation
                # cos and sin only now, where y is dead (fewer live registers); a table's
                # were read above already when the norm needed them.
                if NUM_AXES != 0:
                    cos, sin = _cos_sin(coords_ptr, c_off, sca, freqs_ptr, hp * sfh + jp, sfa, jp, NUM_AXES, ROT, D)
                elif not L2NORM:
                    cos, sin = _cos_sin(coords_ptr, c_off, sca, freqs_ptr, 0, 0, jp, NUM_AXES, ROT, D)
                g0, g1 = tl.split(tl.reshape(g, (BLOCK_M, P, 2)))
                g = tl.reshape(tl.join(_keep_tail(g0 * cos + g1 * sin, g0, jp, ROT, D),
                                       _keep_tail(g1 * cos - g0 * sin, g1, jp, ROT, D)), (BLOCK_M, BLOCK_N))
            g = _from_pairs(g, BLOCK_M, HEADS, D, HALF, ROT)

    if NEED_DBIAS:
        tl.store(dbias_ptr + pid_m * (3 * C) + col, tl.sum(g, axis=0))
    tl.store(dqkv_ptr + (rmc * (3 * C))[:, None] + col[None, :], g.to(dqkv_ptr.dtype.element_ty), mask=mask)


def heads_per_tile(num_heads: int, head_dim: int) -> int:
    """Heads per N-tile: the most (<= 8) whose tile stays <= 128 columns and divides H."""
    best = 1
    for h in (2, 4, 8):
        if h * head_dim <= 128 and num_heads % h == 0:
            best = h
    return best


def _check_head_dim(D: int) -> None:
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"the Triton qkv_proj kernel needs a power-of-two head_dim in [16, 256], got {D}")


def _rope_args(coords: Optional[torch.Tensor], freqs: Optional[torch.Tensor], dummy: torch.Tensor, D: int):
    """(coords, freqs, strides (b, l, a, h, a), num_axes, rotary dim); broadcast dims
    get stride 0. Freqs of no axes: coords is the (2, B|1, L, R/2) cos/sin table,
    strides (batch, token, plane)."""
    if coords is None:
        return dummy, dummy, (0, 0, 0, 0, 0), 1, D
    R = 2 * freqs.shape[-1]
    if freqs.shape[-2] == 0:
        assert coords.stride(-1) == 1
        return coords, dummy, (coords.stride(1) if coords.shape[1] > 1 else 0, coords.stride(2), coords.stride(0),
                               0, 0), 0, R
    scb = coords.stride(0) if coords.dim() == 3 and coords.shape[0] > 1 else 0
    sfh = freqs.stride(0) if freqs.dim() == 3 else 0
    assert freqs.stride(-1) == 1
    return (coords, freqs, (scb, coords.stride(-2), coords.stride(-1), sfh, freqs.stride(-2)), coords.shape[-1],
            R)


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def qkv_proj_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 q_scale: Optional[torch.Tensor], coords: Optional[torch.Tensor], freqs: Optional[torch.Tensor],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rstd: Optional[torch.Tensor], *,
                 num_heads: int, half_pairing: bool, kv_start: int = 0) -> None:
    """Writes q (contiguous (B, H, L, D)) and the rows [kv_start, kv_start + L) of k
    and v ((B, H, >= kv_start + L, D), both with the same strides, head rows
    contiguous) and, when ``rstd`` (2, M, H) fp32 is given, the inverse norms.
    x (B, L, C) any strides; weight (3C, C) any strides; bias (3C,) contiguous;
    q_scale (H,) fp32; coords (L, A) or (B, L, A) fp32; freqs (A, R/2) or
    (H, A, R/2) fp32, last dim contiguous, R the rotary dim (D: all pairs); or
    coords the packed (2, B|1, L, R/2) fp32 cos/sin table and freqs (0, R/2)."""
    B, L, C = x.shape
    H = num_heads
    D = C // H
    _check_head_dim(D)
    M = B * L
    small = M <= SMALL_M
    HEADS = 1 if small else heads_per_tile(H, D)
    coords_t, freqs_t, (scb, scl, sca, sfh, sfa), A, R = _rope_args(coords, freqs, q, D)
    ieee = x.dtype == torch.float32 and not _tf32_allowed()
    args = (x, weight, q if bias is None else bias, q if q_scale is None else q_scale, coords_t, freqs_t,
            q, k, v, q if rstd is None else rstd,
            M, L, C, H, int(M >= LARGE_M), kv_start,
            x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
            scb, scl, sca, sfh, sfa, *k.stride()[:3])
    flags = dict(D=D, HEADS=HEADS, NUM_AXES=A, HAS_BIAS=bias is not None, HAS_QSCALE=q_scale is not None,
                 L2NORM=rstd is not None, ROPE=coords is not None, ROT=R, HALF=bool(half_pairing), IEEE=ieee)
    num_n = 3 * H // HEADS

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * num_n,)

    upcast = _interpreting() and x.dtype == torch.bfloat16
    if small:
        block_m = min(64, max(16, next_power_of_2(M)))
        _fwd_heuristic[grid](*args, **flags, BLOCK_M=block_m, BLOCK_K=64, UPCAST_DOT=upcast, num_warps=4,
                             num_stages=3)
    elif _interpreting():
        _fwd_heuristic[grid](*args, **flags, BLOCK_M=32, BLOCK_K=64, UPCAST_DOT=upcast)
    else:
        _fwd_tuned[grid](*args, **flags)


# Rows per backward program: a (64 x 128) fp32 tile per program, and per-row-block
# partial sums small next to dQKV (1/64 of its rows).
BWD_BLOCK_M = 64
_BWD_BLOCK_M_INTERPRET = 32


def bwd_row_blocks(M: int) -> int:
    """Number of row blocks (= rows of the partial-sum workspaces) of the backward."""
    return cdiv(M, _BWD_BLOCK_M_INTERPRET if _interpreting() else BWD_BLOCK_M)


def qkv_proj_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 rstd: Optional[torch.Tensor], q_scale: Optional[torch.Tensor], coords: Optional[torch.Tensor],
                 freqs: Optional[torch.Tensor], dqkv: torch.Tensor, dbias_part: Optional[torch.Tensor],
                 dscale_part: Optional[torch.Tensor], dfreqs_part: Optional[torch.Tensor], *,
                 half_pairing: bool) -> None:
    """Writes dqkv (M, 3C) contiguous and the requested fp32 partial sums:
    dbias_part (R, 3C), dscale_part (R, H), dfreqs_part (R, 2, H, A, freqs' pairs), with
    R = ``bwd_row_blocks(M)``. dq, dk, dv (B, H, L, D) any strides; q, k the
    contiguous forward outputs; rstd (2, M, H) when the forward normalised;
    coords and freqs as for ``qkv_proj_fwd``."""
    B, H, L, D = dq.shape
    _check_head_dim(D)
    M = B * L
    HEADS = heads_per_tile(H, D)
    block_m = _BWD_BLOCK_M_INTERPRET if _interpreting() else BWD_BLOCK_M
    coords_t, freqs_t, (scb, scl, sca, sfh, sfa), A, R = _rope_args(coords, freqs, dqkv, D)
    grid = (cdiv(M, block_m), 3 * H // HEADS)
    _bwd_kernel[grid](
        dq, dk, dv, q, k, dqkv if rstd is None else rstd, dqkv if q_scale is None else q_scale,
        coords_t, freqs_t, dqkv,
        dqkv if dbias_part is None else dbias_part, dqkv if dscale_part is None else dscale_part,
        dqkv if dfreqs_part is None else dfreqs_part,
        M, L, H, *dq.stride(), *dk.stride(), *dv.stride(), scb, scl, sca, sfh, sfa,
        D=D, HEADS=HEADS, NUM_AXES=A, HAS_QSCALE=q_scale is not None, L2NORM=rstd is not None,
        ROPE=coords is not None, ROT=R, HALF=bool(half_pairing), NEED_DBIAS=dbias_part is not None,
        NEED_DSCALE=dscale_part is not None, NEED_DFREQS=dfreqs_part is not None,
        BLOCK_M=block_m, num_warps=4 if HEADS * D <= 64 else 8)
