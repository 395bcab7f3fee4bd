// Fused attention input projection: CUDA epilogue kernels over the packed GEMM
// output (the GEMM itself is cuBLAS, called by the framework).
//
// Forward: one block per token; a group of lanes per head of q | k | v (for head_dim
// 64 and 128 each lane owns one 16-byte chunk of the head, so a warp holds several
// heads), the token's rope angles computed once in shared memory for all its heads.
// The head's squared norm is a butterfly sum over its lanes (every lane ends with
// the bit-identical value), so bias + norm + q_scale + rotation happen in registers
// and the head is stored straight into its (B, H, L, D) output: one read of qkv, one
// write of q, k, v. A table-defined rotation reads the token's cos/sin row instead
// of computing angles; with partial rotary only the first rot_pairs pairs rotate.
// Backward: one block per (chunk of tokens, head of q | k | v); each warp walks
// rows of the chunk, un-rotates the gradient, goes through q_scale and the norm
// using the post-norm vector recovered from the saved outputs, writes the packed
// dqkv row and keeps per-lane partial sums of dbias / dq_scale / dfreqs in
// registers; the warps' partials are then added in a fixed order through shared
// memory. No atomics: results are bit-identical from run to run.
#include "device_utils.cuh"
#include "posenc_fast/qkv_proj.h"

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

namespace posenc {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxAxes = 4;
constexpr int kMaxPairs = 128;  // D <= 256
constexpr int kFwdMaxThreads = 512;
constexpr int kBwdWarps = 8;
constexpr int64_t kBwdRowsPerChunk = 64;

// Sum over aligned groups of G lanes (butterfly: every lane of a group ends with the
// bit-identical value). Every lane of the warp must call it.
template <int G>
__device__ __forceinline__ float lane_group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
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

// Dims of pair p of a head of 2P dims whose first R pairs rotate: interleaved (2p,
// 2p + 1); half (p, p + R) for p < R, and the pass-through dims [2R, 2P) as
// (p + R, p + P) for p >= R (qkv_proj.h).
__device__ __forceinline__ int half_first(int p, int R) { return p < R ? p : p + R; }
__device__ __forceinline__ int half_second(int p, int P, int R) { return p < R ? p + R : p + P; }

__device__ __forceinline__ void pair_dims(int p, int P, int R, bool half, int& d0, int& d1) {
  d0 = half ? half_first(p, R) : 2 * p;
  d1 = half ? half_second(p, P, R) : 2 * p + 1;
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

template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

// N consecutive elements at p: one N-vector (VEC: p is aligned to it) or N scalars.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_run(const T* p, float (&out)[N]) {
  if constexpr (VEC) {
    const VecN<T, N> v = *reinterpret_cast<const VecN<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float<T>(v.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float<T>(p[i]);
  }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void store_run(T* p, const float (&in)[N]) {
  if constexpr (VEC) {
    VecN<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<VecN<T, N>*>(p) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
  }
}

// Pairs j0 .. j0 + VP - 1 of a head row of 2P elements whose first R pairs rotate:
// interleaved, one run of 2 VP elements; half, runs of VP elements at the pairs'
// first and second dims (pair_dims; the VP pairs lie on one side of R).
template <typename T, int VP, bool HALF, bool VEC>
__device__ __forceinline__ void load_pairs(const T* row, int j0, int P, int R, float (&x0)[VP], float (&x1)[VP]) {
  if constexpr (HALF) {
    load_run<T, VP, VEC>(row + half_first(j0, R), x0);
    load_run<T, VP, VEC>(row + half_second(j0, P, R), x1);
  } else {
    float e[2 * VP];
    load_run<T, 2 * VP, VEC>(row + 2 * j0, e);
#pragma unroll
    for (int v = 0; v < VP; ++v) {
      x0[v] = e[2 * v];
      x1[v] = e[2 * v + 1];
    }
  }
}

template <typename T, int VP, bool HALF, bool VEC>
__device__ __forceinline__ void store_pairs(T* row, int j0, int P, int R, const float (&x0)[VP],
                                            const float (&x1)[VP]) {
  if constexpr (HALF) {
    store_run<T, VP, VEC>(row + half_first(j0, R), x0);
    store_run<T, VP, VEC>(row + half_second(j0, P, R), x1);
  } else {
    float e[2 * VP];
#pragma unroll
    for (int v = 0; v < VP; ++v) {
      e[2 * v] = x0[v];
      e[2 * v + 1] = x1[v];
    }
    store_run<T, 2 * VP, VEC>(row + 2 * j0, e);
  }
}

// Thread layout of the forward. HD = head_dim 64 or 128 (0: any other, read at run
// time); PPL = pairs per lane. A group of G lanes owns one head; lane g of a group
// owns chunks c = g + G i (i < K) of VP consecutive pairs. With HD the chunk is one
// 16-byte vector (interleaved) or two (half, at j0 and j0 + D/2) and K = 1; the
// generic layout has VP = 1 and a warp per head.
template <int HD, int PPL, bool HALF>
struct FwdLayout {
  static constexpr int VP = HD ? PPL : 1;
  static constexpr int K = PPL / VP;
  static constexpr int G = HD ? HD / 2 / PPL : kWarp;
  static constexpr int kVecElems = HALF ? VP : 2 * VP;  // elements per vector access
  static_assert(kWarp % G == 0 && (HD == 0 || G * VP == HD / 2), "a head must fill whole lanes of a warp");
};

// One block per token m = (b, l); its threads walk the 3H heads of q | k | v (several
// heads per warp with HD) in block-sized passes, so the token's rope angles are
// computed once, into shared memory, and read by every head (with per-head freqs
// each lane computes its own; a table's row is read into the same shared arrays).
// Accesses are 16-byte vectors with HD and VEC. ROPE is a template flag so the
// rope-free kernel carries none of sincosf's code and registers; without rope the
// pairing does not matter (HALF is false). Pairs j >= R (partial rotary) are not
// rotated; with HD and HALF, R is a multiple of VP (a lane's run of pairs lies on
// one side of R: launch_fwd).
template <typename T, int HD, int PPL, bool ROPE, bool HALF, bool VEC>
__global__ void __launch_bounds__(kFwdMaxThreads)
qkv_fwd_kernel(const QkvProjFwdArgs a) {
  static_assert(ROPE || !HALF, "the pairing only matters with rope");
  using Lay = FwdLayout<HD, PPL, HALF>;
  constexpr int VP = Lay::VP, K = Lay::K, G = Lay::G;
  __shared__ float cos_s[kMaxPairs];
  __shared__ float sin_s[kMaxPairs];

  const int H = static_cast<int>(a.H), L = static_cast<int>(a.L);
  const int D = HD ? HD : static_cast<int>(a.D), P = D / 2, R = ROPE ? a.rope.rot_pairs : P;
  const int m = blockIdx.x, b = m / L, l = m % L, g = threadIdx.x % G;
  const bool per_head = a.rope.freqs_stride[0] != 0;
  const bool table = a.rope.num_axes == 0;
  const float* coord = ROPE ? a.rope.coords + b * a.rope.coords_stride[0] + l * a.rope.coords_stride[1] : nullptr;

  float cs[K][VP], sn[K][VP];
  // Per-head freqs: each lane's own pairs. One sincosf call site in a rolled loop
  // (unrolled copies of its slow path made ptxas spill); constant indices keep cs, sn
  // in registers.
  auto lane_angles = [&](const float* f) {
#pragma unroll 1
    for (int e = 0; e < K * VP; ++e) {
      const int i = e / VP, v = e % VP, j = (g + G * i) * VP + v;
      float s = 0.f, c = 1.f;
      if ((HD || j < P) && j < R) sincosf(rope_angle(coord, f + j, a.rope), &s, &c);
#pragma unroll
      for (int u = 0; u < K * VP; ++u)
        if (u == e) {
          sn[u / VP][u % VP] = s;
          cs[u / VP][u % VP] = c;
        }
    }
  };
  if (ROPE && !per_head) {  // block-uniform: every thread reaches the barrier
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      float s, c;
      if (table) {
        c = coord[j];
        s = coord[a.rope.coords_stride[2] + j];
      } else {
        sincosf(rope_angle(coord, a.rope.freqs + j, a.rope), &s, &c);
      }
      cos_s[j] = c;
      sin_s[j] = s;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int v = 0; v < VP; ++v) {
        const int j = (g + G * i) * VP + v;
        if ((HD || j < P) && j < R) {
          cs[i][v] = cos_s[j];
          sn[i][v] = sin_s[j];
        }
      }
  }

  const T* src_row = static_cast<const T*>(a.qkv) + m * a.qkv_row_stride;
  const T* bias = static_cast<const T*>(a.bias);
  T* const q_row = static_cast<T*>(a.q) + b * a.q_stride[0] + l * a.q_stride[2];
  T* const k_row = static_cast<T*>(a.k) + b * a.k_stride[0] + l * a.k_stride[2];
  T* const v_row = static_cast<T*>(a.v) + b * a.v_stride[0] + l * a.v_stride[2];
  const int total = 3 * H * G;
  const int lane = threadIdx.x % kWarp;
  // The bound is warp-uniform: the norm's shuffles need every lane of the warp.
  for (int t0 = threadIdx.x - lane; t0 < total; t0 += blockDim.x) {
    const int t = t0 + lane;
    const bool live = t < total;  // the same for the G lanes of a head
    const int sh = t / G, s = sh / H, h = sh - s * H;
    float x0[K][VP], x1[K][VP];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int j0 = (g + G * i) * VP;
#pragma unroll
      for (int v = 0; v < VP; ++v) x0[i][v] = x1[i][v] = 0.f;
      if (live && (HD || j0 < P)) {
        load_pairs<T, VP, HALF, VEC>(src_row + sh * D, j0, P, R, x0[i], x1[i]);
        if (bias) {
          float b0[VP], b1[VP];
          load_pairs<T, VP, HALF, VEC>(bias + sh * D, j0, P, R, b0, b1);
#pragma unroll
          for (int v = 0; v < VP; ++v) {
            x0[i][v] += b0[v];
            x1[i][v] += b1[v];
          }
        }
      }
    }
    const bool qk = live && s < 2;
    if (a.rstd) {
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < K; ++i)
#pragma unroll
        for (int v = 0; v < VP; ++v) ss += x0[i][v] * x0[i][v] + x1[i][v] * x1[i][v];
      const float norm = sqrtf(lane_group_sum<G>(ss));
      // max(norm, eps) that keeps a NaN norm NaN like eager's clamp_min (fmaxf drops it).
      const float r = 1.f / (norm < 1e-12f ? 1e-12f : norm);
      if (qk) {
#pragma unroll
        for (int i = 0; i < K; ++i)
#pragma unroll
          for (int v = 0; v < VP; ++v) {
            x0[i][v] *= r;
            x1[i][v] *= r;
          }
        if (g == 0) a.rstd[(static_cast<int64_t>(s) * a.B * a.L + m) * H + h] = r;
      }
    }
    if (a.q_scale && live && s == 0) {
      const float sc = a.q_scale[h];
#pragma unroll
      for (int i = 0; i < K; ++i)
#pragma unroll
        for (int v = 0; v < VP; ++v) {
          x0[i][v] *= sc;
          x1[i][v] *= sc;
        }
    }
    if (ROPE && qk) {
      if (per_head) lane_angles(a.rope.freqs + h * a.rope.freqs_stride[0]);
#pragma unroll
      for (int i = 0; i < K; ++i)
#pragma unroll
        for (int v = 0; v < VP; ++v) {
          const int j = (g + G * i) * VP + v;
          if ((HD || j < P) && j < R) rotate_pair(x0[i][v], x1[i][v], cs[i][v], sn[i][v]);
        }
    }
    if (live) {
      const int64_t hs = s == 0 ? a.q_stride[1] : (s == 1 ? a.k_stride[1] : a.v_stride[1]);
      T* dst = (s == 0 ? q_row : (s == 1 ? k_row : v_row)) + h * hs;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int j0 = (g + G * i) * VP;
        if (HD || j0 < P) store_pairs<T, VP, HALF, VEC>(dst, j0, P, R, x0[i], x1[i]);
      }
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
  const bool table = A == 0;
  const int R = a.rope.coords ? a.rope.rot_pairs : P;  // rotating pairs
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
        pair_dims(p, P, R, half, d0, d1);
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
        if (p < R) {
          float sn, cs;
          if (table) {
            cs = c[p];
            sn = c[a.rope.coords_stride[2] + p];
          } else {
            sincosf(rope_angle(c, f + p, a.rope), &sn, &cs);
          }
          if (want_dfreqs) {
            // d out / d angle = (-out1, out0) for the rotated output (out0, out1).
            const float dang = g1[i] * y0[i] - g0[i] * y1[i];
#pragma unroll
            for (int ax = 0; ax < kMaxAxes; ++ax)  // constant indices keep acc_f in registers
              if (ax < A) acc_f[i][ax] += c[ax * a.rope.coords_stride[2]] * dang;
          }
          // The transpose takes the gradient back, the inverse the output: the
          // conjugate rotation, over cos^2 + sin^2 for a table (which need not be a
          // rotation). Where cos = sin = 0 the output pair and its gradient are 0:
          // dividing by 1 keeps everything exact but the l2 norm's backward, which
          // needs the lost pair (posenc_fast/ops/qkv_proj.py refuses that case).
          rotate_pair(g0[i], g1[i], cs, -sn);
          rotate_pair(y0[i], y1[i], cs, -sn);
          if (table) {
            const float mag = cs * cs + sn * sn;
            const float inv = mag == 0.f ? 1.f : 1.f / mag;
            y0[i] *= inv;
            y1[i] *= inv;
          }
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
      dot = lane_group_sum<kWarp>(dot);
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
        pair_dims(p, P, R, half, d0, d1);
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
      pair_dims(p, P, R, half, d0, d1);
      red_bias[w][d0] = acc_b0[i];
      red_bias[w][d1] = acc_b1[i];
#pragma unroll
      for (int ax = 0; ax < kMaxAxes; ++ax)
        if (ax < A && p < R) red_freqs[w][ax * R + p] = acc_f[i][ax];
    }
  }
  const float lane_sum = lane_group_sum<kWarp>(acc_s);
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
    float* out = a.dfreqs_part + ((chunk * 2 + s) * H + h) * A * R;
    for (int t = threadIdx.x; t < A * R; t += blockDim.x) {
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
  POSENC_CHECK_ARG(!r.coords || (r.num_axes >= 0 && r.num_axes <= kMaxAxes && (r.num_axes == 0 || r.freqs)),
                   std::string(fn) + ": rope needs freqs and 1 to 4 axes (or 0 axes: a cos/sin table)");
  POSENC_CHECK_ARG(!r.coords || (r.rot_pairs >= 1 && r.rot_pairs <= D / 2),
                   std::string(fn) + ": rot_pairs must be in [1, head_dim / 2], got " + std::to_string(r.rot_pairs));
  POSENC_CHECK_ARG(!r.coords || r.num_axes > 0 || r.freqs_stride[0] == 0,
                   std::string(fn) + ": a cos/sin table has no per-head freqs");
}

// Calls f(std::integral_constant<int, PPL>{}) with PPL = pairs per lane.
template <typename F>
void dispatch_ppl(int64_t D, F&& f) {
  const int64_t P = D / 2;
  if (P <= kWarp) f(std::integral_constant<int, 1>{});
  else if (P <= 2 * kWarp) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 4>{});
}

// Whether every row of qkv, bias, q, k and v can be accessed in aligned vectors of n
// elements of `bytes` bytes (head rows start at multiples of D, a multiple of n).
bool fwd_vectors_fit(const QkvProjFwdArgs& a, int n, size_t bytes) {
  bool ok = a.qkv_row_stride % n == 0 && aligned(a.qkv, bytes) && (!a.bias || aligned(a.bias, bytes)) &&
            aligned(a.q, bytes) && aligned(a.k, bytes) && aligned(a.v, bytes);
  for (int i = 0; i < 3; ++i) ok = ok && a.q_stride[i] % n == 0 && a.k_stride[i] % n == 0 && a.v_stride[i] % n == 0;
  return ok;
}

template <typename T, int HD, int PPL, bool ROPE, bool HALF>
void launch_fwd(const QkvProjFwdArgs& a, cudaStream_t stream) {
  using Lay = FwdLayout<HD, PPL, HALF>;
  // As few block-sized passes over the 3H heads as kFwdMaxThreads allows, in blocks
  // of whole warps balanced between the passes.
  const int64_t lanes = 3 * a.H * Lay::G;
  const int64_t passes = (lanes + kFwdMaxThreads - 1) / kFwdMaxThreads;
  const int threads = static_cast<int>(((lanes + passes - 1) / passes + kWarp - 1) / kWarp * kWarp);
  const unsigned blocks = static_cast<unsigned>(a.B * a.L);
  if constexpr (Lay::kVecElems > 1) {
    if (fwd_vectors_fit(a, Lay::kVecElems, Lay::kVecElems * sizeof(T))) {
      qkv_fwd_kernel<T, HD, PPL, ROPE, HALF, true><<<blocks, threads, 0, stream>>>(a);
      return;
    }
  }
  qkv_fwd_kernel<T, HD, PPL, ROPE, HALF, false><<<blocks, threads, 0, stream>>>(a);
}

}  // namespace

void qkv_proj_fwd(const QkvProjFwdArgs& a, int device, cudaStream_t stream) {
  check_common(a.B, a.L, a.H, a.D, a.rope, "qkv_proj_fwd");
  // Empty tensors (B or L zero) have null data pointers: nothing to do, and no error.
  const int64_t M = a.B * a.L;
  if (M == 0) return;
  POSENC_CHECK_ARG(a.qkv && a.q && a.k && a.v, "qkv_proj_fwd: qkv, q, k and v must be non-null");
  POSENC_CHECK_ARG(a.qkv_row_stride >= 3 * a.H * a.D, "qkv_proj_fwd: qkv_row_stride must be >= 3 * H * D");
  // One block per token; the in-row offsets 3 H D and the lane count 3 H 32 are ints.
  POSENC_CHECK_ARG(M <= INT32_MAX && 3 * a.H * std::max<int64_t>(a.D, kWarp) <= INT32_MAX,
                   "qkv_proj_fwd: B * L and 3 * num_heads * max(head_dim, 32) must be < 2^31");
  set_device(device);
  dispatch_dtype(a.dtype, "qkv", [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
    // Calls launch(ROPE, HALF): the pairing's variant with rope, the interleaved layout without.
    const auto with_pairing = [&](auto launch) {
      if (!a.rope.coords) launch(std::false_type{}, std::false_type{});
      else if (a.rope.half_pairing) launch(std::true_type{}, std::true_type{});
      else launch(std::true_type{}, std::false_type{});
    };
    // With half pairing a lane's kVec pairs are two runs, which must not straddle the
    // rotating pairs' end (partial rotary): else the generic layout, a pair per lane.
    const bool runs_fit = !a.rope.coords || !a.rope.half_pairing || a.rope.rot_pairs % kVec == 0;
    if ((a.D == 64 || a.D == 128) && runs_fit) {
      // A 16-byte chunk per lane: kVec / 2 interleaved pairs, or kVec half pairs in two.
      const auto with_hd = [&](auto hd) {
        with_pairing([&](auto rope, auto half) {
          launch_fwd<T, decltype(hd)::value, decltype(half)::value ? kVec : kVec / 2, decltype(rope)::value,
                     decltype(half)::value>(a, stream);
        });
      };
      if (a.D == 64) with_hd(std::integral_constant<int, 64>{});
      else with_hd(std::integral_constant<int, 128>{});
    } else {
      dispatch_ppl(a.D, [&](auto ppl) {
        with_pairing([&](auto rope, auto half) {
          launch_fwd<T, 0, decltype(ppl)::value, decltype(rope)::value, decltype(half)::value>(a, stream);
        });
      });
    }
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
  POSENC_CHECK_ARG(!a.rope.coords || a.rope.num_axes > 0 || !a.dfreqs_part,
                   "qkv_proj_bwd: a cos/sin table has no d freqs");
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
