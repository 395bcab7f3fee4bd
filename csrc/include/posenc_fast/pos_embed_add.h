// Additive position encodings of the wider family (FlexVAR, NaViT, Pix2Struct,
// MAE / timm / pyramid / 1D sin-cos, DETR sine, SAM random Fourier), forward and
// backward, in one form (posenc_fast/ops/pos_embed.py builds the tables):
//
//   out[b, i, c] = x[b, i, c] + sum_{j in [ptr[g], ptr[g+1])} w[j] * table[idx[j], c]
//                + coords[g].weight * (is_cos[c] ? cos : sin)((coords[g].y * fy[c]
//                                                              + coords[g].x * fx[c]) * angle_scale)
//   with g = start + i. `table` (K, C) with its row map (ptr (P+L+1), idx, w: int32,
//   int32, fp32) is the learned part, or null; `coords` fp32 (P+L, 3) = (y, x, weight)
//   per token, or per image (B, P+L, 3) with coords_image_stride, and `desc` fp32
//   (C, 3) = (fy, fx, is_cos) are the fixed part, or null. Strides are in elements.
//   `out` is contiguous (B, n, C).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "posenc_fast/common.h"

namespace posenc {

struct PosEmbedFwdArgs {
  const void* x; DType x_dtype; int64_t x_stride[3];           // (B, n, C)
  const void* table; DType table_dtype; int64_t table_stride[2];  // (K, C) or null
  const int32_t* ptr; const int32_t* idx; const float* w;      // row map, indexed by token
  const float* coords; int64_t coords_image_stride;            // (P+L, 3) or (B, P+L, 3); null: no fixed part
  const float* desc;                                           // (C, 3)
  void* out; DType out_dtype;                                  // (B, n, C) contiguous
  int64_t B, n, C, start;
  float angle_scale;
};

void pos_embed_add_fwd(const PosEmbedFwdArgs& args, int device, cudaStream_t stream);

// FlexVAR: out = x + the grid (C, Gh, Gw) area-resized per scale, the grid read in its
// own layout (element strides grid_stride = channel, row, cell). `chunks` int32 (Q, 8),
// one block row per chunk, (t0, cnt, y0, y1, xa, xb, j0, w): window tokens [t0, t0 +
// cnt), cnt <= kGridChunkTokens, are columns j0.. of a token row of a scale w tokens
// wide; the row's area windows span grid rows [y0, y1), and column j's cells
// [j Gw / w, ceil((j + 1) Gw / w)) lie in [xa, xb), both multiples of 8 when Gw is.
// Empty ranges (y0 == y1, xa == xb): prefix tokens, no embedding. Every token of the
// window is in one chunk. `out` is contiguous (B, n, C).
constexpr int kGridChunkTokens = 16;

struct PosEmbedGridFwdArgs {
  const void* x; DType x_dtype; int64_t x_stride[3];              // (B, n, C)
  const void* grid; DType grid_dtype; int64_t grid_stride[3];     // (C, Gh, Gw)
  int64_t Gh, Gw;
  const int32_t* chunks; int64_t Q;                               // (Q, 8)
  void* out; DType out_dtype;                                     // (B, n, C) contiguous
  int64_t B, n, C;
};

void pos_embed_add_grid_fwd(const PosEmbedGridFwdArgs& args, int device, cudaStream_t stream);

// Backward to the learned table, deterministic (no atomics):
//   gtok[i, c]   = sum_b grad[b, i, c]                                (fp32 workspace (n, C))
//   dtable[k, c] = sum_{j in [tptr[k], tptr[k+1])} tw[j] * gtok[ttok[j] - start, c]
// over the entries whose token lies in the window [start, start + n), in entry order.
// Every dtable row is written.
struct PosEmbedBwdArgs {
  const void* grad; DType grad_dtype; int64_t grad_stride[3];  // (B, n, C)
  float* gtok;                                                 // (n, C)
  const int32_t* tptr; const int32_t* ttok; const float* tw; int64_t K;
  void* dtable; DType dtable_dtype;                            // (K, C) contiguous
  int64_t B, n, C, start;
};

void pos_embed_add_bwd(const PosEmbedBwdArgs& args, int device, cudaStream_t stream);

}  // namespace posenc
