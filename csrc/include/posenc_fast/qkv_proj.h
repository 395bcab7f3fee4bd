// Fused attention input projection (SPEC §2.2, §2.3): the epilogue that turns the
// packed GEMM output qkv = x @ W^T (M = B*L rows, 3C columns, rows q | k | v,
// head-major) into attention-ready q, k, v, and its backward.
//
// Forward, per token m = (b, l) and head h of section s (0 q, 1 k, 2 v):
//   u = qkv[m, s*C + h*D + :] + bias[s*C + h*D + :]
//   q/k: if l2norm  u *= rstd = 1 / max(||u||_2, 1e-12)   (rstd saved for backward)
//        q only:    u *= q_scale[h]                        (if q_scale)
//        if rope    pair j < rot_pairs rotated by angle = sum_a coords[b, l, a] * freqs[h, a, j]
//                   (num_axes 0: by cos = table[0, b, l, j], sin = table[1, b, l, j]);
//                   pairs j >= rot_pairs unchanged (partial rotary, rotary_dim = 2 rot_pairs)
//   out_s[b, h, l, :] = u                                  ((B, H, L, D), any strides of b, h, l)
// Pairs (P = D/2, R = rot_pairs): interleaved = dims (2j, 2j+1); half = dims (j, j + R)
// for j < R, and the pass-through dims [2R, D) as pairs (j + R, j + P) for j >= R.
// Rotation: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos). All math in fp32.
// Strides are in elements; a stride of 0 broadcasts (coords over the batch, freqs
// over heads). Needs D even, D <= 256, num_axes <= 4.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "posenc_fast/common.h"

namespace posenc {

struct QkvRopeArgs {
  const float* coords; int64_t coords_stride[3];  // (B|1, L, A): batch, token, axis; null: no rope.
                                                  // num_axes 0: the (2, B|1, L, rot_pairs) cos/sin
                                                  // table, strides batch, token, plane; pairs contiguous
  const float* freqs; int64_t freqs_stride[2];    // (H|1, A, rot_pairs): head, axis; pairs contiguous
                                                  // (unused with a table)
  int num_axes;                                   // 1..4, or 0: a table
  int rot_pairs;                                  // pairs that rotate, 1..D/2
  bool half_pairing;
};

struct QkvProjFwdArgs {
  const void* qkv; int64_t qkv_row_stride;  // (M, 3C), columns contiguous
  const void* bias;                         // (3C,) contiguous, or null
  DType dtype;                              // of qkv, bias and the outputs
  const float* q_scale;                     // (H,) or null
  QkvRopeArgs rope;
  void* q; void* k; void* v;                // (B, H, L, D), dims contiguous: the pointer of
  int64_t q_stride[3], k_stride[3], v_stride[3];  // element (0, 0, 0, 0) and strides (b, h, l);
                                            // a KV-cache window is k/v_cache + start * stride_l
  float* rstd;                              // (2, M, H) when l2norm, else null
  int64_t B, L, H, D;
};

void qkv_proj_fwd(const QkvProjFwdArgs& args, int device, cudaStream_t stream);

// Backward: from dq, dk, dv (any strides) and the saved forward outputs q, k
// (contiguous), rstd and parameters, writes the packed gradient of the GEMM output
// dqkv (M, 3C) contiguous, and per chunk of `rows_per_chunk` tokens fp32 partial
// sums (each null when not wanted; no d freqs with a table):
//   dbias_part (R, 3C), dscale_part (R, H), dfreqs_part (R, 2, H, A, rot_pairs),
// R = ceil(M / qkv_proj_bwd_rows_per_chunk()); the caller adds them over R in a
// fixed order (deterministic, no atomics). The post-norm, pre-rotation vectors
// are recovered as R^-1 out / q_scale (R^-1 = R^T / (cos^2 + sin^2): a table need
// not be a rotation), so q_scale must be nonzero, and with l2 norm no table pair
// may have cos = sin = 0.
struct QkvProjBwdArgs {
  const void* dq; int64_t dq_stride[4];  // (B, H, L, D)
  const void* dk; int64_t dk_stride[4];
  const void* dv; int64_t dv_stride[4];
  const void* q; const void* k;          // forward outputs, (B, H, L, D) contiguous
  DType dtype;                           // of every tensor above and of dqkv
  const float* rstd;                     // (2, M, H), or null without l2norm
  const float* q_scale;                  // (H,) or null
  QkvRopeArgs rope;
  void* dqkv;                            // (M, 3C) contiguous
  float* dbias_part; float* dscale_part; float* dfreqs_part;
  int64_t B, L, H, D;
};

int64_t qkv_proj_bwd_rows_per_chunk();

void qkv_proj_bwd(const QkvProjBwdArgs& args, int device, cudaStream_t stream);

}  // namespace posenc
