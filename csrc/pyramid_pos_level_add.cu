// Fused pyramid position + level embedding addition: CUDA kernels.
//
// Forward: each thread builds the embedding of its (token, channel vector) once in
// fp32 registers (level row + weighted learned row + weighted in-kernel sinusoid),
// then streams it onto its share of the batch: x is read once and out written
// once, pos/lvl are read once per token instead of once per (batch, token).
// Backward: per chunk of rows inside one level, sum the gradient over the batch
// (16-byte loads; shared-memory reduction in a fixed order), write dpos rows, keep
// the chunk sum; a second tiny kernel adds the chunk sums of each level in chunk
// order (16-byte loads of the fp32 partials). No atomics, so results are
// bit-identical from run to run.
#include "device_utils.cuh"
#include "posenc_fast/pyramid_pos_level_add.h"

namespace posenc {
namespace {

constexpr float kLn10000 = 9.210340371976184f;

// Fixed pyramid table (SPEC §2.1): channels [0, C/2) encode the row, [C/2, C) the
// column; within a half, pe[2i] = sin(p * w_i), pe[2i+1] = cos(p * w_i),
// w_i = 10000^(-2i / (C/2)).
__device__ __forceinline__ float sincos_value(int row, int col, int64_t c, int64_t C) {
  const int64_t half = C / 2;
  const bool is_row = c < half;
  const int64_t k = is_row ? c : c - half;
  const float w = expf(-static_cast<float>(2 * (k / 2)) / static_cast<float>(half) * kLn10000);
  const float angle = static_cast<float>(is_row ? row : col) * w;
  return (k % 2 == 0) ? sinf(angle) : cosf(angle);
}

template <typename TX, typename TO, int VEC>
__global__ void pyramid_add_fwd_kernel(const PyramidAddFwdArgs a, int64_t batch_per_block) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (t >= a.n || c0 >= a.C) return;
  const int64_t g = a.start + t;
  const int level = a.token_meta[3 * g], row = a.token_meta[3 * g + 1], col = a.token_meta[3 * g + 2];

  float emb[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int64_t c = c0 + v;
    float e = 0.f;
    if (c < a.C) {
      e = load_any(a.lvl, level * a.lvl_stride[0] + c * a.lvl_stride[1], a.lvl_dtype);
      if (a.pos) e += a.pos_weight * load_any(a.pos, g * a.pos_stride[0] + c * a.pos_stride[1], a.pos_dtype);
      if (a.sincos_weight != 0.f) e += a.sincos_weight * sincos_value(row, col, c, a.C);
    }
    emb[v] = e;
  }

  const TX* __restrict__ x = static_cast<const TX*>(a.x);
  TO* __restrict__ out = static_cast<TO*>(a.out);
  const int64_t b_begin = static_cast<int64_t>(blockIdx.z) * batch_per_block;
  const int64_t b_end = b_begin + batch_per_block < a.B ? b_begin + batch_per_block : a.B;
#pragma unroll 4
  for (int64_t b = b_begin; b < b_end; ++b)
    store_sum<TX, TO, VEC>(x, b * a.x_stride[0] + t * a.x_stride[1], c0, a.x_stride[2], out,
                           (b * a.n + t) * a.C + c0, emb);
}

template <typename TX, typename TO>
void launch_fwd(const PyramidAddFwdArgs& a, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TX);
  const bool vec = token_packs_fit<TX, TO, kVec>(a.x, a.x_stride, a.C, a.out);
  const auto kernel = vec ? &pyramid_add_fwd_kernel<TX, TO, kVec> : &pyramid_add_fwd_kernel<TX, TO, 1>;
  // Each block reuses its embedding for its slice of the batch (grid.z), sliced for
  // whole waves.
  const TokenLaunch l = token_launch(kernel, a.n, a.C, vec ? kVec : 1, a.B, device);
  kernel<<<l.grid, l.block, 0, stream>>>(a, l.batch_per_block);
  check_last_launch("pyramid_add_fwd_kernel");
}

// Per row of the chunk, the batch sum of its gradient (batch_row_sums): its dpos row
// written, and the chunk's sum kept for the level.
template <typename TG, int VEC>
__global__ void pyramid_add_bwd_rows_kernel(const PyramidAddBwdArgs a) {
  const int64_t chunk = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kRowSumThreadsX + threadIdx.x) * VEC;
  const bool active = c0 < a.C;
  float chunk_sum[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) chunk_sum[v] = 0.f;
  const auto add = [&](int64_t r, const float (&row)[VEC]) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (a.dpos) store_any(a.dpos, r * a.dpos_row_stride + c0 + v, a.dpos_dtype, a.pos_weight * row[v]);
      chunk_sum[v] += row[v];
    }
  };
  batch_row_sums<TG, VEC>(static_cast<const TG*>(a.grad), a.grad_stride, a.B, a.chunks[3 * chunk],
                          a.chunks[3 * chunk + 1], c0, active, add);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) a.partial[chunk * a.C + c0 + v] = chunk_sum[v];
  }
}

// Each thread owns VEC consecutive channels of one level (VEC = 4: one 16-byte load
// per chunk partial) and adds the level's partials in chunk order.
template <int VEC>
__global__ void pyramid_add_bwd_levels_kernel(const PyramidAddBwdArgs a) {
  const int64_t s = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= a.C) return;
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  for (int64_t k = a.level_chunk_offsets[s]; k < a.level_chunk_offsets[s + 1]; ++k) {
    const float* row = a.partial + k * a.C + c0;
    if constexpr (VEC > 1) {
      // Host guarantees C % VEC == 0 and a 16-byte aligned workspace.
      const Pack<float, VEC> p = *reinterpret_cast<const Pack<float, VEC>*>(row);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += p.v[v];
    } else {
      acc[0] += row[0];
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) store_any(a.dlvl, s * a.dlvl_row_stride + c0 + v, a.dlvl_dtype, acc[v]);
}

}  // namespace

void pyramid_pos_level_add_fwd(const PyramidAddFwdArgs& a, int device, cudaStream_t stream) {
  POSENC_CHECK_ARG(a.B >= 0 && a.n >= 0 && a.C > 0 && a.start >= 0, "pyramid_pos_level_add_fwd: bad sizes");
  // Empty x / out have null data pointers: nothing to do, and no error.
  if (a.B == 0 || a.n == 0) return;
  POSENC_CHECK_ARG(a.x && a.lvl && a.token_meta && a.out, "pyramid_pos_level_add_fwd: null pointer");
  set_device(device);
  dispatch_x_out(a.x_dtype, a.out_dtype, [&](auto tx, auto to) {
    launch_fwd<decltype(tx), decltype(to)>(a, device, stream);
  });
}

void pyramid_pos_level_add_bwd(const PyramidAddBwdArgs& a, int device, cudaStream_t stream) {
  POSENC_CHECK_ARG(a.B >= 0 && a.n >= 0 && a.C > 0 && a.S > 0 && a.num_chunks >= 0,
                   "pyramid_pos_level_add_bwd: bad sizes");
  // An empty grad (B or n zero) and the chunk tables of an empty window have null
  // data pointers; dlvl (zeros) and the dpos rows are still written.
  POSENC_CHECK_ARG(a.dlvl && a.level_chunk_offsets && (a.B * a.n == 0 || a.grad) &&
                       (a.num_chunks == 0 || (a.chunks && a.partial)),
                   "pyramid_pos_level_add_bwd: null pointer");
  set_device(device);
  if (a.num_chunks > 0) {
    dispatch_dtype(a.grad_dtype, "grad", [&](auto tg) {
      using TG = decltype(tg);
      constexpr int kVec = 16 / sizeof(TG);
      const bool vec = vector_rows(a.grad, a.grad_stride, a.C, kVec, 16);
      const dim3 block(kRowSumThreadsX, kRowSumLanes);
      if (vec) {
        const dim3 grid(static_cast<unsigned>(a.num_chunks), ceil_div(a.C, kRowSumThreadsX * kVec));
        pyramid_add_bwd_rows_kernel<TG, kVec><<<grid, block, 0, stream>>>(a);
      } else {
        const dim3 grid(static_cast<unsigned>(a.num_chunks), ceil_div(a.C, kRowSumThreadsX));
        pyramid_add_bwd_rows_kernel<TG, 1><<<grid, block, 0, stream>>>(a);
      }
      check_last_launch("pyramid_add_bwd_rows_kernel");
    });
  }
  // The partials are the caller's fp32 (num_chunks, C) workspace: 16-byte rows when C % 4 == 0.
  constexpr int kLevelVec = 4;
  const bool level_vec = a.C % kLevelVec == 0 && aligned(a.partial, 16);
  if (level_vec) {
    const dim3 grid(static_cast<unsigned>(a.S), ceil_div(a.C, 256 * kLevelVec));
    pyramid_add_bwd_levels_kernel<kLevelVec><<<grid, 256, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(a.S), ceil_div(a.C, 256));
    pyramid_add_bwd_levels_kernel<1><<<grid, 256, 0, stream>>>(a);
  }
  check_last_launch("pyramid_add_bwd_levels_kernel");
}

}  // namespace posenc
