// Fused pyramid position + level embedding addition (VAR), forward and backward.
//
//   out[b, i, c] = x[b, i, c] + lvl[level(g), c] + pos_weight * pos[g, c]
//                + sincos_weight * sincos(g, c),            g = start + i
//
// `token_meta` is an int32 (L, 3) table of (level, row, col) for every pyramid
// token; `sincos` is the fixed 2D sinusoidal pyramid table (SPEC §2.1), generated
// in the kernel. Strides are in elements. `out` is contiguous (B, n, C).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "posenc_fast/common.h"

namespace posenc {

struct PyramidAddFwdArgs {
  const void* x; DType x_dtype; int64_t x_stride[3];      // (B, n, C)
  const void* pos; DType pos_dtype; int64_t pos_stride[2]; // (L, C) or null
  const void* lvl; DType lvl_dtype; int64_t lvl_stride[2]; // (S, C)
  const int32_t* token_meta;                               // (L, 3) contiguous
  void* out; DType out_dtype;                              // (B, n, C) contiguous
  int64_t B, n, C, start;
  float pos_weight, sincos_weight;
};

void pyramid_pos_level_add_fwd(const PyramidAddFwdArgs& args, int device, cudaStream_t stream);

// Backward of the position part in one pass over the gradient, deterministic:
//   dpos[i, c] = pos_weight * sum_b grad[b, i, c]          (window rows, if dpos)
//   dlvl[s, c] = sum over window rows i of level s of sum_b grad[b, i, c]
// `chunks` (num_chunks, 3) int32 = (row_begin, row_end, level), window-relative,
// each chunk inside one level and chunks sorted by level; `level_chunk_offsets`
// (S + 1) int32 = first chunk of each level. `partial` is fp32 workspace
// (num_chunks, C). Every dlvl row is written (zero for levels outside the window).
struct PyramidAddBwdArgs {
  const void* grad; DType grad_dtype; int64_t grad_stride[3];  // (B, n, C)
  void* dpos; DType dpos_dtype; int64_t dpos_row_stride;       // window rows (n, C), or null
  void* dlvl; DType dlvl_dtype; int64_t dlvl_row_stride;       // (S, C)
  const int32_t* chunks; int64_t num_chunks;
  const int32_t* level_chunk_offsets; int64_t S;
  float* partial;
  int64_t B, n, C;
  float pos_weight;
};

void pyramid_pos_level_add_bwd(const PyramidAddBwdArgs& args, int device, cudaStream_t stream);

}  // namespace posenc
