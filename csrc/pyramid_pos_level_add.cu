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

#include <algorithm>

namespace posenc {
namespace {

constexpr float kLn10000 = 9.210340371976184f;

__device__ __forceinline__ float load_any(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); return;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); return;
    default: static_cast<float*>(p)[i] = v;
  }
}

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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

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
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t xo = b * a.x_stride[0] + t * a.x_stride[1];
    const int64_t oo = (b * a.n + t) * a.C + c0;
    if constexpr (VEC > 1) {
      // Host guarantees unit channel stride, C % VEC == 0 and aligned rows.
      const Pack<TX, VEC> xv = *reinterpret_cast<const Pack<TX, VEC>*>(x + xo + c0);
      Pack<TO, VEC> ov;
#pragma unroll
      for (int v = 0; v < VEC; ++v) ov.v[v] = from_float<TO>(to_float<TX>(xv.v[v]) + emb[v]);
      *reinterpret_cast<Pack<TO, VEC>*>(out + oo) = ov;
    } else {
      out[oo] = from_float<TO>(to_float<TX>(x[xo + c0 * a.x_stride[2]]) + emb[0]);
    }
  }
}

template <typename TX, typename TO>
void launch_fwd(const PyramidAddFwdArgs& a, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TX);
  const auto aligned = [](const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  // The out pack is kVec elements of TO: 32 bytes for 16-bit x with fp32 out, which
  // sm_100+ stores with one 32-byte instruction, so out needs that alignment too.
  const bool vec = a.x_stride[2] == 1 && a.C % kVec == 0 && a.x_stride[0] % kVec == 0 &&
                   a.x_stride[1] % kVec == 0 && aligned(a.x, alignof(Pack<TX, kVec>)) &&
                   aligned(a.out, alignof(Pack<TO, kVec>));
  const int vec_width = vec ? kVec : 1;
  const int64_t lanes = (a.C + vec_width - 1) / vec_width;
  const int bx = static_cast<int>(std::min<int64_t>(128, ((lanes + 31) / 32) * 32));
  const int by = std::max(1, 256 / bx);
  const unsigned gx = ceil_div(a.n, by), gy = ceil_div(lanes, bx);
  // Each block reuses its embedding for its slice of the batch (grid.z), sliced for
  // whole waves; 32 registers leave the thread limit binding.
  const int64_t per_block = batch_per_block(int64_t(gx) * gy, a.B, thread_bound_slots(bx * by, device));
  const dim3 grid(gx, gy, static_cast<unsigned>((a.B + per_block - 1) / per_block));
  const dim3 block(bx, by);
  if (vec)
    pyramid_add_fwd_kernel<TX, TO, kVec><<<grid, block, 0, stream>>>(a, per_block);
  else
    pyramid_add_fwd_kernel<TX, TO, 1><<<grid, block, 0, stream>>>(a, per_block);
  check_last_launch("pyramid_add_fwd_kernel");
}

constexpr int kBwdThreadsX = 32;  // channel vectors per block (a warp: coalesced)
constexpr int kBwdLanes = 8;       // threads along the batch

// Each thread owns VEC consecutive channels (one 16-byte load per batch row when the
// host allows it) and a stride of the batch; the lanes' sums meet in shared memory,
// double-buffered by row so that one barrier per row separates writes and reads.
template <typename TG, int VEC>
__global__ void pyramid_add_bwd_rows_kernel(const PyramidAddBwdArgs a) {
  __shared__ float red[2][kBwdLanes][kBwdThreadsX * VEC];
  const int64_t chunk = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kBwdThreadsX + threadIdx.x) * VEC;
  const int r0 = a.chunks[3 * chunk], r1 = a.chunks[3 * chunk + 1];
  const TG* __restrict__ grad = static_cast<const TG*>(a.grad);
  const bool active = c0 < a.C;
  float chunk_sum[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) chunk_sum[v] = 0.f;
  for (int r = r0; r < r1; ++r) {
    float s[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) s[v] = 0.f;
    if (active) {
      const int64_t base = r * a.grad_stride[1] + c0 * a.grad_stride[2];
#pragma unroll 4
      for (int64_t b = threadIdx.y; b < a.B; b += kBwdLanes) {
        if constexpr (VEC > 1) {
          // Host guarantees unit channel stride, C % VEC == 0 and 16-byte aligned rows.
          const Pack<TG, VEC> g = *reinterpret_cast<const Pack<TG, VEC>*>(grad + base + b * a.grad_stride[0]);
#pragma unroll
          for (int v = 0; v < VEC; ++v) s[v] += to_float<TG>(g.v[v]);
        } else {
          s[0] += to_float<TG>(grad[base + b * a.grad_stride[0]]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[r & 1][threadIdx.y][threadIdx.x * VEC + v] = s[v];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float row = red[r & 1][0][threadIdx.x * VEC + v];
#pragma unroll
        for (int l = 1; l < kBwdLanes; ++l) row += red[r & 1][l][threadIdx.x * VEC + v];
        if (a.dpos) store_any(a.dpos, r * a.dpos_row_stride + c0 + v, a.dpos_dtype, a.pos_weight * row);
        chunk_sum[v] += row;
      }
    }
    // No second barrier: the next row writes the other buffer, and the one after
    // this buffer again only past the next row's barrier, which lane 0 also reaches.
  }
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
  dispatch_dtype(a.x_dtype, "x", [&](auto tx) {
    using TX = decltype(tx);
    dispatch_dtype(a.out_dtype, "out", [&](auto to) {
      using TO = decltype(to);
      launch_fwd<TX, TO>(a, device, stream);
    });
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
      const bool vec = a.grad_stride[2] == 1 && a.C % kVec == 0 && a.grad_stride[0] % kVec == 0 &&
                       a.grad_stride[1] % kVec == 0 && reinterpret_cast<uintptr_t>(a.grad) % 16 == 0;
      const dim3 block(kBwdThreadsX, kBwdLanes);
      if (vec) {
        const dim3 grid(static_cast<unsigned>(a.num_chunks), ceil_div(a.C, kBwdThreadsX * kVec));
        pyramid_add_bwd_rows_kernel<TG, kVec><<<grid, block, 0, stream>>>(a);
      } else {
        const dim3 grid(static_cast<unsigned>(a.num_chunks), ceil_div(a.C, kBwdThreadsX));
        pyramid_add_bwd_rows_kernel<TG, 1><<<grid, block, 0, stream>>>(a);
      }
      check_last_launch("pyramid_add_bwd_rows_kernel");
    });
  }
  // The partials are the caller's fp32 (num_chunks, C) workspace: 16-byte rows when C % 4 == 0.
  constexpr int kLevelVec = 4;
  const bool level_vec = a.C % kLevelVec == 0 && reinterpret_cast<uintptr_t>(a.partial) % 16 == 0;
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
