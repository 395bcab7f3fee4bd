// Helpers shared by the kernels and their launchers: dtype conversion to/from fp32,
// vector loads and stores, the batch-row sums of the backward kernels, the dtype
// dispatch used by every launcher, and the launch-shape rules.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "posenc_fast/common.h"

namespace posenc {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements of T, aligned for one vector access of all of them.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Element i of a buffer of run-time dtype t, in fp32 (tables and gradients of another
// dtype than x's).
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

// N elements at p, s apart, in fp32: one Pack (VEC: s is 1 and p is aligned to it) or
// N scalars.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_n(const T* p, int64_t s, float (&out)[N]) {
  if constexpr (VEC) {
    const Pack<T, N> v = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float<T>(v.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float<T>(p[i * s]);
  }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void store_n(T* p, int64_t s, const float (&in)[N]) {
  if constexpr (VEC) {
    Pack<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i * s] = from_float<T>(in[i]);
  }
}

// out[oo + v] = x[xo + (c0 + v) * x_stride_c] + e[v], v < VEC: xo the offset of x's
// (image, token) row (VEC > 1: one Pack load of x and one store of out; the host
// guarantees unit channel stride, C % VEC == 0 and aligned rows: token_packs_fit).
template <typename TX, typename TO, int VEC>
__device__ __forceinline__ void store_sum(const TX* __restrict__ x, int64_t xo, int64_t c0, int64_t x_stride_c,
                                          TO* __restrict__ out, int64_t oo, const float (&e)[VEC]) {
  if constexpr (VEC > 1) {
    const Pack<TX, VEC> xv = *reinterpret_cast<const Pack<TX, VEC>*>(x + xo + c0);
    Pack<TO, VEC> ov;
#pragma unroll
    for (int v = 0; v < VEC; ++v) ov.v[v] = from_float<TO>(to_float<TX>(xv.v[v]) + e[v]);
    *reinterpret_cast<Pack<TO, VEC>*>(out + oo) = ov;
  } else {
    out[oo] = from_float<TO>(to_float<TX>(x[xo + c0 * x_stride_c]) + e[0]);
  }
}

// Block shape of batch_row_sums: a warp of channel vectors (coalesced) by lanes along
// the batch.
constexpr int kRowSumThreadsX = 32;
constexpr int kRowSumLanes = 8;
constexpr int kRowSumThreads = kRowSumThreadsX * kRowSumLanes;

// The sums over the B batch rows of rows r0 <= r < r1 of grad (element strides gs:
// batch, row, channel), in a block of (kRowSumThreadsX, kRowSumLanes) threads: thread
// (x, y) owns the VEC channels from c0 (`active`: c0 < C; VEC > 1: one Pack load per
// batch row, the host guarantees unit channel stride, C % VEC == 0 and 16-byte aligned
// rows) and the batch rows y, y + kRowSumLanes, ... The lanes' sums meet in shared
// memory, double-buffered by row so that one barrier per row separates writes and
// reads; lane 0 adds them in lane order (bit-identical from run to run) and calls
// done(r, sums). Every thread of the block must call it (barriers).
template <typename TG, int VEC, typename Done>
__device__ __forceinline__ void batch_row_sums(const TG* __restrict__ grad, const int64_t (&gs)[3], int64_t B,
                                               int64_t r0, int64_t r1, int64_t c0, bool active, Done&& done) {
  __shared__ float red[2][kRowSumLanes][kRowSumThreadsX * VEC];
  for (int64_t r = r0; r < r1; ++r) {
    float s[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) s[v] = 0.f;
    if (active) {
      const int64_t base = r * gs[1] + c0 * gs[2];
#pragma unroll 4
      for (int64_t b = threadIdx.y; b < B; b += kRowSumLanes) {
        if constexpr (VEC > 1) {
          const Pack<TG, VEC> g = *reinterpret_cast<const Pack<TG, VEC>*>(grad + base + b * gs[0]);
#pragma unroll
          for (int v = 0; v < VEC; ++v) s[v] += to_float<TG>(g.v[v]);
        } else {
          s[0] += to_float<TG>(grad[base + b * gs[0]]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[r & 1][threadIdx.y][threadIdx.x * VEC + v] = s[v];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      float sum[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        sum[v] = red[r & 1][0][threadIdx.x * VEC + v];
#pragma unroll
        for (int l = 1; l < kRowSumLanes; ++l) sum[v] += red[r & 1][l][threadIdx.x * VEC + v];
      }
      done(r, sum);
    }
    // No second barrier: the next row writes the other buffer, and the one after
    // this buffer again only past the next row's barrier, which lane 0 also reaches.
  }
}

// Calls f(T{}) with T the C++ type of `t`.
template <typename F>
void dispatch_dtype(DType t, const char* arg_name, F&& f) {
  switch (t) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(__half{}); return;
    case DType::kBFloat16: f(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument(std::string("posenc_fast: unsupported dtype code for ") + arg_name);
}

// Calls f(TX{}, TO{}) with TX, TO the C++ types of x's and out's dtypes.
template <typename F>
void dispatch_x_out(DType x, DType out, F&& f) {
  dispatch_dtype(x, "x", [&](auto tx) { dispatch_dtype(out, "out", [&](auto to) { f(tx, to); }); });
}

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the rows of C elements at p (element strides: two outer dims, then the
// channel) can be accessed in vectors of `vec` elements aligned to `bytes`.
inline bool vector_rows(const void* p, const int64_t (&stride)[3], int64_t C, int vec, size_t bytes) {
  return stride[2] == 1 && C % vec == 0 && stride[0] % vec == 0 && stride[1] % vec == 0 && aligned(p, bytes);
}

// Host-side launch rules shared by the launchers (the Triton launchers use the same
// ones, triton_kernels/_launch.py).

// Blocks of `threads` threads of `kernel` (no dynamic shared memory) that `device`
// holds at once, as compiled for it: launch bounds holding a kernel to the 32
// registers at which 2048 threads fill an SM make some variants spill (pos_embed's
// forward on sm_90, pyramid's on sm_100) and do not apply on 1536-thread SMs. Cached
// per device, kernel and block size: a query per launch would cost more host time
// than a small kernel takes.
template <typename Kernel>
int64_t resident_slots(Kernel kernel, int threads, int device) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int>, int> per_sm;
  int blocks;
  {
    const std::lock_guard<std::mutex> lock(mu);
    int& cached = per_sm[{device, reinterpret_cast<const void*>(kernel), threads}];
    if (cached == 0) POSENC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cached, kernel, threads, 0));
    blocks = cached;
  }
  return static_cast<int64_t>(std::max(blocks, 1)) * num_sms(device);
}

// Fraction of the `slots` resident blocks the last wave leaves busy, over the run.
inline double wave_efficiency(int64_t grid, int64_t slots) {
  return double(grid) / double((grid + slots - 1) / slots * slots);
}

// Batch rows per block of a kernel that streams each embedding tile onto a slice of
// the batch (grid = tiles x slices, slices on grid.z). A problem too small to fill one
// wave gets one row per block (sampling: latency over reuse). Otherwise the slice
// count whose grid ends closest to whole waves, among those that re-read the tables
// at most about 5% of x's bytes (max_slices; by default 1 + B / 10, for tables of x's
// rows and dtype), fewest slices first.
inline int64_t batch_per_block(int64_t tiles, int64_t B, int64_t slots, int64_t max_slices = -1) {
  int64_t per_block = 1;
  if (tiles * B > slots) {
    double best = -1.0;
    if (max_slices < 0) max_slices = 1 + B / 10;
    for (int64_t s = 1; s <= std::max<int64_t>(1, std::min<int64_t>(B, max_slices)); ++s) {
      const int64_t per = (B + s - 1) / s;
      const double eff = wave_efficiency(tiles * ((B + per - 1) / per), slots);
      if (eff > best + 1e-9) best = eff, per_block = per;
    }
  }
  return std::max<int64_t>(per_block, (B + 65534) / 65535);  // grid.z <= 65535
}

// Whether a forward can move x's rows (element strides: batch, token, channel) and the
// contiguous out in Packs of VEC elements. The out pack is VEC elements of TO: 32
// bytes for 16-bit x with fp32 out, which sm_100+ stores with one 32-byte
// instruction, so out needs that alignment too.
template <typename TX, typename TO, int VEC>
bool token_packs_fit(const void* x, const int64_t (&x_stride)[3], int64_t C, const void* out) {
  return vector_rows(x, x_stride, C, VEC, alignof(Pack<TX, VEC>)) && aligned(out, alignof(Pack<TO, VEC>));
}

// Threads per block, at most, of the forwards that stream each token's embedding onto
// the batch (token_launch).
constexpr int kTokenThreads = 256;

struct TokenLaunch {
  dim3 grid, block;
  int64_t batch_per_block;
};

// Launch shape of such a forward `kernel`, `vec` channels a thread: thread (x, y) of
// block (i, j, k) owns token i blockDim.y + y, channels from (j blockDim.x + x) vec,
// and the batch rows of slice k. Up to 128 lanes of channel vectors by as many tokens
// as fill kTokenThreads; the batch sliced for whole waves of the blocks the kernel
// leaves resident.
template <typename Kernel>
TokenLaunch token_launch(Kernel kernel, int64_t n, int64_t C, int vec, int64_t B, int device) {
  const int64_t lanes = (C + vec - 1) / vec;
  const int bx = static_cast<int>(std::min<int64_t>(128, ((lanes + 31) / 32) * 32));
  const int by = std::max(1, kTokenThreads / bx);
  const unsigned gx = ceil_div(n, by), gy = ceil_div(lanes, bx);
  const int64_t per_block = batch_per_block(int64_t(gx) * gy, B, resident_slots(kernel, bx * by, device));
  return {dim3(gx, gy, static_cast<unsigned>((B + per_block - 1) / per_block)), dim3(bx, by), per_block};
}

// Rows per block, 1 to max_rows, of a kernel whose grid is tiles x ceil(rows / per):
// the count whose grid ends closest to whole waves of `slots`, fewest rows first.
inline int64_t rows_per_block(int64_t tiles, int64_t rows, int64_t slots, int64_t max_rows) {
  int64_t best_rows = 1;
  double best = -1.0;
  for (int64_t r = 1; r <= max_rows; ++r) {
    const double eff = wave_efficiency(tiles * ((rows + r - 1) / r), slots);
    if (eff > best + 1e-9) best = eff, best_rows = r;
  }
  return best_rows;
}

}  // namespace posenc
