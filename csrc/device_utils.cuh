// Helpers shared by the kernels and their launchers: dtype conversion to/from fp32,
// the dtype dispatch used by every launcher, and the launch-shape rules.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

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

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

// Host-side launch rules shared by the launchers (the Triton launchers use the same
// ones, triton_kernels/_launch.py).

// Blocks of `threads` threads that `device` holds at once when the thread limit binds
// (2048 threads and 32 blocks per SM: kernels of <= 32 registers a thread;
// tools/kernel_report.py checks the waves against the compiled kernels).
inline int64_t thread_bound_slots(int threads, int device) {
  return static_cast<int64_t>(std::min(32, 2048 / threads)) * num_sms(device);
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
