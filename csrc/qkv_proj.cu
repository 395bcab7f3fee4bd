// Fused attention input projection: CUDA epilogue kernels over the packed GEMM
// output (the GEMM itself is cuBLAS, called by the framework).
//
// Forward: one warp per (token, head of q | k | v). Each lane owns rotation pairs
// j = lane + 32 i; the head's squared norm is a butterfly warp sum (every lane ends
// with the bit-identical value), so bias + norm + q_scale + rotation happen in
// registers and the head is stored straight into its (B, H, L, D) output: one read
// of qkv, one write of q, k, v.
// Backward: one block per (chunk of tokens, head of q | k | v); each warp walks
// rows of the chunk, un-rotates the gradient, goes through q_scale and the norm
// using the post-norm vector recovered from the saved outputs, writes the packed
// dqkv row and keeps per-lane partial sums of dbias / dq_scale / dfreqs in
// registers; the warps' partials are then added in a fixed order through shared
// memory. No atomics: results are bit-identical from run to run.
#include "device_utils.cuh"
#include "posenc_fast/qkv_proj.h"

#include <string>
#include <type_traits>

namespace posenc {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxAxes = 4;
constexpr int kMaxPairs = 128;  // D <= 256
constexpr int kFwdWarpsPerBlock = 8;
constexpr int kBwdWarps = 8;
constexpr int64_t kBwdRowsPerChunk = 64;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T> struct Vec2;
template <> struct Vec2<float> { using type = float2; };
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

// Elements (d0, d1) of a row of D elements: two scalar accesses, or one aligned
// 2-vector when the pair is adjacent (interleaved pairing) and `vec` says the
// pointers allow it.
template <typename T>
__device__ __forceinline__ void load_pair(const T* row, int d0, int d1, bool vec, float& x0, float& x1) {
  if (vec) {
    const typename Vec2<T>::type v = *reinterpret_cast<const typename Vec2<T>::type*>(row + d0);
    x0 = to_float<T>(v.x);
    x1 = to_float<T>(v.y);
  } else {
    x0 = to_float<T>(row[d0]);
    x1 = to_float<T>(row[d1]);
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(T* row, int d0, int d1, bool vec, float x0, float x1) {
  if (vec) {
    typename Vec2<T>::type v;
    v.x = from_float<T>(x0);
    v.y = from_float<T>(x1);
    *reinterpret_cast<typename Vec2<T>::type*>(row + d0) = v;
  } else {
    row[d0] = from_float<T>(x0);
    row[d1] = from_float<T>(x1);
  }
}

__device__ __forceinline__ void pair_dims(int p, int D, bool half, int& d0, int& d1) {
  d0 = half ? p : 2 * p;
  d1 = half ? p + D / 2 : 2 * p + 1;
}

// (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos); with -sin, the conjugate rotation.
__device__ __forceinline__ void rotate_pair(float& x0, float& x1, float cs, float sn) {
  const float y0 = x0 * cs - x1 * sn;
  x1 = x0 * sn + x1 * cs;
  x0 = y0;
}

// angle = sum_a coords[b, l, a] * freqs[h, a, j], fp32.
__device__ __forceinline__ float rope_angle(const float* c, const float* f, const QkvRopeArgs& r) {
  float ang = 0.f;
  // Explicit rounding (no FMA contraction): the same angle as the reference and apply_rope.
  for (int a = 0; a < r.num_axes; ++a)
    ang = __fadd_rn(ang, __fmul_rn(c[a * r.coords_stride[2]], f[a * r.freqs_stride[1]]));
  return ang;
}

template <typename T, int PPL>
__global__ void __launch_bounds__(kFwdWarpsPerBlock * kWarp)
qkv_fwd_kernel(const QkvProjFwdArgs a, bool vec) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kFwdWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t H = a.H, L = a.L, M = a.B * a.L;
  const int D = static_cast<int>(a.D), P = D / 2;
  if (warp >= M * 3 * H) return;
  const int64_t m = warp / (3 * H);
  const int64_t sh = warp % (3 * H);
  const int s = static_cast<int>(sh / H);
  const int64_t h = sh % H, b = m / L, l = m % L;
  const bool half = a.rope.half_pairing;

  const T* src = static_cast<const T*>(a.qkv) + m * a.qkv_row_stride + sh * D;
  const T* bias = a.bias ? static_cast<const T*>(a.bias) + sh * D : nullptr;
  float x0[PPL], x1[PPL];
#pragma unroll
  for (int i = 0; i < PPL; ++i) {
    const int p = lane + i * kWarp;
    x0[i] = x1[i] = 0.f;
    if (p < P) {
      int d0, d1;
      pair_dims(p, D, half, d0, d1);
      load_pair(src, d0, d1, vec, x0[i], x1[i]);
      if (bias) {
        x0[i] += to_float<T>(bias[d0]);
        x1[i] += to_float<T>(bias[d1]);
      }
    }
  }
  if (s < 2) {
    if (a.rstd) {
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < PPL; ++i) ss += x0[i] * x0[i] + x1[i] * x1[i];
      const float norm = sqrtf(warp_sum(ss));
      // max(norm, eps) that keeps a NaN norm NaN like eager's clamp_min (fmaxf drops it).
      const float r = 1.f / (norm < 1e-12f ? 1e-12f : norm);
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        x0[i] *= r;
        x1[i] *= r;
      }
      if (lane == 0) a.rstd[(s * M + m) * H + h] = r;
    }
    if (a.q_scale && s == 0) {
      const float sc = a.q_scale[h];
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        x0[i] *= sc;
        x1[i] *= sc;
      }
    }
    if (a.rope.coords) {
      const float* c = a.rope.coords + b * a.rope.coords_stride[0] + l * a.rope.coords_stride[1];
      const float* f = a.rope.freqs + h * a.rope.freqs_stride[0];
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        const int p = lane + i * kWarp;
        if (p < P) {
          float sn, cs;
          sincosf(rope_angle(c, f + p, a.rope), &sn, &cs);
          rotate_pair(x0[i], x1[i], cs, sn);
        }
      }
    }
  }
  const int64_t* os = s == 0 ? a.q_stride : (s == 1 ? a.k_stride : a.v_stride);
  T* dst = static_cast<T*>(s == 0 ? a.q : (s == 1 ? a.k : a.v)) + b * os[0] + h * os[1] + l * os[2];
#pragma unroll
  for (int i = 0; i < PPL; ++i) {
    const int p = lane + i * kWarp;
    if (p < P) {
      int d0, d1;
      pair_dims(p, D, half, d0, d1);
      store_pair(dst, d0, d1, vec, x0[i], x1[i]);
    }
  }
}

template <typename T, int PPL>
__global__ void __launch_bounds__(kBwdWarps * kWarp)
qkv_bwd_kernel(const QkvProjBwdArgs a, bool vec) {
  __shared__ float red_bias[kBwdWarps][2 * kMaxPairs];
  __shared__ float red_freqs[kBwdWarps][kMaxAxes * kMaxPairs];
  __shared__ float red_scale[kBwdWarps];

  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp;
  const int64_t chunk = blockIdx.x, sh = blockIdx.y;
  const int64_t H = a.H, L = a.L, M = a.B * a.L, C = a.H * a.D;
  const int D = static_cast<int>(a.D), P = D / 2, A = a.rope.num_axes;
  const int s = static_cast<int>(sh / H);
  const int64_t h = sh % H;
  const bool half = a.rope.half_pairing;
  const bool qk = s < 2;
  const bool rope = qk && a.rope.coords;
  const bool scaled = a.q_scale && s == 0;
  const bool norm = qk && a.rstd;
  const bool use_y = rope || scaled || norm;
  const bool want_dfreqs = rope && a.dfreqs_part;
  const bool want_dscale = scaled && a.dscale_part;
  const float sc = scaled ? a.q_scale[h] : 1.f;
  const T* g_base = static_cast<const T*>(s == 0 ? a.dq : (s == 1 ? a.dk : a.dv));
  const int64_t* gs = s == 0 ? a.dq_stride : (s == 1 ? a.dk_stride : a.dv_stride);
  const T* y_base = static_cast<const T*>(s == 0 ? a.q : a.k);

  float acc_b0[PPL], acc_b1[PPL], acc_f[PPL][kMaxAxes], acc_s = 0.f;
#pragma unroll
  for (int i = 0; i < PPL; ++i) {
    acc_b0[i] = acc_b1[i] = 0.f;
#pragma unroll
    for (int ax = 0; ax < kMaxAxes; ++ax) acc_f[i][ax] = 0.f;
  }

  for (int64_t r = w; r < kBwdRowsPerChunk; r += kBwdWarps) {
    const int64_t m = chunk * kBwdRowsPerChunk + r;
    if (m >= M) break;  // warp-uniform
    const int64_t b = m / L, l = m % L;
    const T* grow = g_base + b * gs[0] + h * gs[1] + l * gs[2];
    const T* yrow = y_base + ((b * H + h) * L + l) * D;
    const float* c = rope ? a.rope.coords + b * a.rope.coords_stride[0] + l * a.rope.coords_stride[1] : nullptr;
    float g0[PPL], g1[PPL], y0[PPL], y1[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int p = lane + i * kWarp;
      g0[i] = g1[i] = y0[i] = y1[i] = 0.f;
      if (p < P) {
        int d0, d1;
        pair_dims(p, D, half, d0, d1);
        g0[i] = to_float<T>(grow[d0 * gs[3]]);
        g1[i] = to_float<T>(grow[d1 * gs[3]]);
        if (use_y) load_pair(yrow, d0, d1, vec, y0[i], y1[i]);
      }
    }
    if (rope) {
      const float* f = a.rope.freqs + h * a.rope.freqs_stride[0];
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        const int p = lane + i * kWarp;
        if (p < P) {
          float sn, cs;
          sincosf(rope_angle(c, f + p, a.rope), &sn, &cs);
          if (want_dfreqs) {
            // d out / d angle = (-out1, out0) for the rotated output (out0, out1).
            const float dang = g1[i] * y0[i] - g0[i] * y1[i];
#pragma unroll
            for (int ax = 0; ax < kMaxAxes; ++ax)  // constant indices keep acc_f in registers
              if (ax < A) acc_f[i][ax] += c[ax * a.rope.coords_stride[2]] * dang;
          }
          // The conjugate rotation takes the gradient and the output back.
          rotate_pair(g0[i], g1[i], cs, -sn);
          rotate_pair(y0[i], y1[i], cs, -sn);
        }
      }
    }
    if (scaled) {
      // The value before the scale. Where the scale is 0 the output is 0 and so is
      // every gradient through it: divide by 1 instead, which keeps dx and dW exact
      // (d q_scale needs nonzero scales; posenc_fast/ops/qkv_proj.py checks that).
      const float div = sc == 0.f ? 1.f : sc;
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        y0[i] /= div;
        y1[i] /= div;
        if (want_dscale) acc_s += g0[i] * y0[i] + g1[i] * y1[i];
        g0[i] *= sc;
        g1[i] *= sc;
      }
    }
    if (norm) {
      const float rs = a.rstd[(s * M + m) * H + h];
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < PPL; ++i) dot += g0[i] * y0[i] + g1[i] * y1[i];
      dot = warp_sum(dot);
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        g0[i] = (g0[i] - y0[i] * dot) * rs;
        g1[i] = (g1[i] - y1[i] * dot) * rs;
      }
    }
    T* drow = static_cast<T*>(a.dqkv) + m * 3 * C + sh * D;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int p = lane + i * kWarp;
      if (p < P) {
        int d0, d1;
        pair_dims(p, D, half, d0, d1);
        store_pair(drow, d0, d1, vec, g0[i], g1[i]);
        acc_b0[i] += g0[i];
        acc_b1[i] += g1[i];
      }
    }
  }

  // Fixed-order reduction over the warps of the block.
#pragma unroll
  for (int i = 0; i < PPL; ++i) {
    const int p = lane + i * kWarp;
    if (p < P) {
      int d0, d1;
      pair_dims(p, D, half, d0, d1);
      red_bias[w][d0] = acc_b0[i];
      red_bias[w][d1] = acc_b1[i];
#pragma unroll
      for (int ax = 0; ax < kMaxAxes; ++ax)
        if (ax < A) red_freqs[w][ax * P + p] = acc_f[i][ax];
    }
  }
  const float lane_sum = warp_sum(acc_s);
  if (lane == 0) red_scale[w] = lane_sum;
  __syncthreads();
  if (a.dbias_part) {
    for (int t = threadIdx.x; t < D; t += blockDim.x) {
      float v = 0.f;
      for (int j = 0; j < kBwdWarps; ++j) v += red_bias[j][t];
      a.dbias_part[chunk * 3 * C + sh * D + t] = v;
    }
  }
  if (want_dfreqs) {
    float* out = a.dfreqs_part + ((chunk * 2 + s) * H + h) * A * P;
    for (int t = threadIdx.x; t < A * P; t += blockDim.x) {
      float v = 0.f;
      for (int j = 0; j < kBwdWarps; ++j) v += red_freqs[j][t];
      out[t] = v;
    }
  }
  if (want_dscale && threadIdx.x == 0) {
    float v = 0.f;
    for (int j = 0; j < kBwdWarps; ++j) v += red_scale[j];
    a.dscale_part[chunk * H + h] = v;
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_common(int64_t B, int64_t L, int64_t H, int64_t D, const QkvRopeArgs& r, const char* fn) {
  POSENC_CHECK_ARG(B >= 0 && L >= 0 && H >= 1, std::string(fn) + ": needs B, L >= 0 and H >= 1");
  POSENC_CHECK_ARG(D >= 2 && D % 2 == 0 && D <= 2 * kMaxPairs,
                   std::string(fn) + ": head_dim must be even and <= 256, got " + std::to_string(D));
  POSENC_CHECK_ARG(!r.coords || (r.freqs && r.num_axes >= 1 && r.num_axes <= kMaxAxes),
                   std::string(fn) + ": rope needs freqs and 1 to 4 axes");
}

// Calls f(std::integral_constant<int, PPL>{}) with PPL = pairs per lane.
template <typename F>
void dispatch_ppl(int64_t D, F&& f) {
  const int64_t P = D / 2;
  if (P <= kWarp) f(std::integral_constant<int, 1>{});
  else if (P <= 2 * kWarp) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 4>{});
}

}  // namespace

void qkv_proj_fwd(const QkvProjFwdArgs& a, int device, cudaStream_t stream) {
  check_common(a.B, a.L, a.H, a.D, a.rope, "qkv_proj_fwd");
  // Empty tensors (B or L zero) have null data pointers: nothing to do, and no error.
  const int64_t warps = a.B * a.L * 3 * a.H;
  if (warps == 0) return;
  POSENC_CHECK_ARG(a.qkv && a.q && a.k && a.v, "qkv_proj_fwd: qkv, q, k and v must be non-null");
  POSENC_CHECK_ARG(a.qkv_row_stride >= 3 * a.H * a.D, "qkv_proj_fwd: qkv_row_stride must be >= 3 * H * D");
  set_device(device);
  dispatch_dtype(a.dtype, "qkv", [&](auto tag) {
    using T = decltype(tag);
    const size_t v2 = 2 * sizeof(T);
    bool even = a.qkv_row_stride % 2 == 0;  // every row start keeps the 2-vector alignment
    for (int i = 0; i < 3; ++i) even = even && a.q_stride[i] % 2 == 0 && a.k_stride[i] % 2 == 0 &&
                                       a.v_stride[i] % 2 == 0;
    const bool vec = !a.rope.half_pairing && even && aligned(a.qkv, v2) && aligned(a.q, v2) &&
                     aligned(a.k, v2) && aligned(a.v, v2);
    dispatch_ppl(a.D, [&](auto ppl) {
      qkv_fwd_kernel<T, decltype(ppl)::value>
          <<<ceil_div(warps, kFwdWarpsPerBlock), kFwdWarpsPerBlock * kWarp, 0, stream>>>(a, vec);
    });
  });
  check_last_launch("qkv_proj_fwd");
}

int64_t qkv_proj_bwd_rows_per_chunk() { return kBwdRowsPerChunk; }

void qkv_proj_bwd(const QkvProjBwdArgs& a, int device, cudaStream_t stream) {
  check_common(a.B, a.L, a.H, a.D, a.rope, "qkv_proj_bwd");
  // Empty tensors (B or L zero) have null data pointers: nothing to do, and no error.
  const int64_t M = a.B * a.L;
  if (M == 0) return;
  POSENC_CHECK_ARG(a.dq && a.dk && a.dv && a.dqkv, "qkv_proj_bwd: dq, dk, dv and dqkv must be non-null");
  POSENC_CHECK_ARG(!(a.rstd || a.q_scale || a.rope.coords) || (a.q && a.k),
                   "qkv_proj_bwd: the forward outputs q and k are needed with l2 norm, q_scale or rope");
  const int64_t chunks = (M + kBwdRowsPerChunk - 1) / kBwdRowsPerChunk;
  POSENC_CHECK_ARG(3 * a.H <= 65535, "qkv_proj_bwd: 3 * num_heads must be <= 65535");
  set_device(device);
  dispatch_dtype(a.dtype, "dq", [&](auto tag) {
    using T = decltype(tag);
    const size_t v2 = 2 * sizeof(T);
    const bool vec = !a.rope.half_pairing && aligned(a.dqkv, v2) && (!a.q || aligned(a.q, v2)) &&
                     (!a.k || aligned(a.k, v2));
    dispatch_ppl(a.D, [&](auto ppl) {
      qkv_bwd_kernel<T, decltype(ppl)::value>
          <<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(3 * a.H)), kBwdWarps * kWarp, 0, stream>>>(
              a, vec);
    });
  });
  check_last_launch("qkv_proj_bwd");
}

}  // namespace posenc
