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
// Backward: one block per (chunk of 64 tokens, slice of the 3H heads), in the
// forward's lane layout (16-byte accesses, several heads per warp at head_dim 64 /
// 128); its warps split into head-warps and row groups that walk the chunk's rows.
// Per row a lane un-rotates its gradient pairs (cos / sin tabulated in shared memory
// once per block for all its heads, or a table's rows), goes through q_scale and the
// norm with the post-norm vector recovered from the saved outputs and stores its run
// of the packed dqkv row; partial sums of dbias / dq_scale / dfreqs stay in
// registers over the rows and meet in a fixed-order tree through shared memory. No
// atomics: results are bit-identical from run to run.
#include "device_utils.cuh"
#include "posenc_fast/qkv_proj.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace posenc {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxAxes = 4;
constexpr int kMaxPairs = 128;  // D <= 256
constexpr int kFwdMaxThreads = 512;
constexpr int kBwdThreads = 512;
constexpr int kBwdWarps = kBwdThreads / kWarp;
constexpr int kBwdRowsPerChunk = 64;  // tokens per partial sum
constexpr int kBwdTile = 16;          // rows whose rotation a block tabulates at once
constexpr int kBwdRedBatch = 16;      // sums per lane per pass of the row-group tree

// Sum over aligned groups of G lanes (butterfly: every lane of a group ends with the
// bit-identical value). Every lane of the warp must call it.
template <int G>
__device__ __forceinline__ float lane_group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Dims of pair p of a head of 2P dims whose first R pairs rotate: interleaved (2p,
// 2p + 1); half (p, p + R) for p < R, and the pass-through dims [2R, 2P) as
// (p + R, p + P) for p >= R (qkv_proj.h).
__device__ __forceinline__ int half_first(int p, int R) { return p < R ? p : p + R; }
__device__ __forceinline__ int half_second(int p, int P, int R) { return p < R ? p + R : p + P; }

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
  // Bounded by kMaxAxes: a loop of unknown length was unrolled 16 times, its loads in flight.
#pragma unroll
  for (int a = 0; a < kMaxAxes; ++a)
    if (a < r.num_axes) ang = __fadd_rn(ang, __fmul_rn(c[a * r.coords_stride[2]], f[a * r.freqs_stride[1]]));
  return ang;
}

// cos and sin of pair j of a token with shared freqs: from its row c of a cos/sin
// table (`table`; the sin row one plane further), or from its coords row c.
__device__ __forceinline__ void rope_cos_sin(const float* c, int j, const QkvRopeArgs& r, bool table, float& cs,
                                             float& sn) {
  if (table) {
    cs = c[j];
    sn = c[r.coords_stride[2] + j];
  } else {
    sincosf(rope_angle(c, r.freqs + j, r), &sn, &cs);
  }
}

// Pairs j0 .. j0 + VP - 1 of a head row of 2P elements whose first R pairs rotate:
// interleaved, one run of 2 VP elements; half, runs of VP elements at the pairs'
// first and second dims (half_first / half_second; the VP pairs lie on one side of R).
template <typename T, int VP, bool HALF, bool VEC>
__device__ __forceinline__ void load_pairs(const T* row, int j0, int P, int R, float (&x0)[VP], float (&x1)[VP]) {
  if constexpr (HALF) {
    load_n<T, VP, VEC>(row + half_first(j0, R), 1, x0);
    load_n<T, VP, VEC>(row + half_second(j0, P, R), 1, x1);
  } else {
    float e[2 * VP];
    load_n<T, 2 * VP, VEC>(row + 2 * j0, 1, e);
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
    store_n<T, VP, VEC>(row + half_first(j0, R), 1, x0);
    store_n<T, VP, VEC>(row + half_second(j0, P, R), 1, x1);
  } else {
    float e[2 * VP];
#pragma unroll
    for (int v = 0; v < VP; ++v) {
      e[2 * v] = x0[v];
      e[2 * v + 1] = x1[v];
    }
    store_n<T, 2 * VP, VEC>(row + 2 * j0, 1, e);
  }
}

// N elements of T packed in 32-bit words, the layout of a vector access.
template <typename T, int N>
struct alignas(N * sizeof(T) < 4 ? 4 : N * sizeof(T)) Packed {
  static constexpr int kPerWord = 4 / sizeof(T);
  uint32_t w[(N + kPerWord - 1) / kPerWord];

  __device__ __forceinline__ T get(int i) const {
    T x;
    if constexpr (kPerWord == 1) {
      memcpy(&x, &w[i], sizeof(T));
    } else {
      const uint16_t bits = static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2)));
      memcpy(&x, &bits, sizeof(T));
    }
    return x;
  }
  __device__ __forceinline__ void put(int i, T x) {
    if constexpr (kPerWord == 1) {
      memcpy(&w[i], &x, sizeof(T));
    } else {
      uint16_t bits;
      memcpy(&bits, &x, sizeof(T));
      const int sh = 16 * (i % 2);
      w[i / 2] = (w[i / 2] & ~(0xffffu << sh)) | (uint32_t(bits) << sh);
    }
  }
};

// The pairs of load_pairs in their storage type: x0 of pair v is run[0][v] and x1
// run[1][v] (half), or run[0][2v] and run[0][2v + 1] (interleaved). The backward keeps
// its loaded rows so until each pair is used: packed 16-bit elements take half the
// registers of their fp32 values.
template <typename T, int VP, bool HALF>
struct RawPairs {
  Packed<T, HALF ? VP : 2 * VP> run[HALF ? 2 : 1];
  __device__ __forceinline__ float x0(int v) const { return to_float<T>(run[0].get(HALF ? v : 2 * v)); }
  __device__ __forceinline__ float x1(int v) const { return to_float<T>(run[HALF].get(HALF ? v : 2 * v + 1)); }
  __device__ __forceinline__ void set(int v, float x0, float x1) {
    run[0].put(HALF ? v : 2 * v, from_float<T>(x0));
    run[HALF].put(HALF ? v : 2 * v + 1, from_float<T>(x1));
  }
};

// N elements at p, es apart: one vector (VEC: es is 1 and p is aligned to it) or N
// scalars.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_raw_run(const T* p, int64_t es, Packed<T, N>& out) {
  if constexpr (VEC) {
    out = *reinterpret_cast<const Packed<T, N>*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out.put(i, p[i * es]);
  }
}

template <typename T, int VP, bool HALF, bool VEC>
__device__ __forceinline__ void load_raw_pairs(const T* row, int64_t es, int j0, int P, int R,
                                               RawPairs<T, VP, HALF>& x) {
  if constexpr (HALF) {
    load_raw_run<T, VP, VEC>(row + half_first(j0, R) * es, es, x.run[0]);
    load_raw_run<T, VP, VEC>(row + half_second(j0, P, R) * es, es, x.run[1]);
  } else {
    load_raw_run<T, 2 * VP, VEC>(row + 2 * j0 * es, es, x.run[0]);
  }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void store_raw_run(T* p, const Packed<T, N>& in) {
  if constexpr (VEC) {
    *reinterpret_cast<Packed<T, N>*>(p) = in;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = in.get(i);
  }
}

template <typename T, int VP, bool HALF, bool VEC>
__device__ __forceinline__ void store_raw_pairs(T* row, int j0, int P, int R, const RawPairs<T, VP, HALF>& x) {
  if constexpr (HALF) {
    store_raw_run<T, VP, VEC>(row + half_first(j0, R), x.run[0]);
    store_raw_run<T, VP, VEC>(row + half_second(j0, P, R), x.run[1]);
  } else {
    store_raw_run<T, 2 * VP, VEC>(row + 2 * j0, x.run[0]);
  }
}

// Per-head freqs: the rotation of a lane's own pairs j = (g + G i) VP + v (identity
// past R). One sincosf call site in a rolled loop (unrolled copies of its slow path
// made ptxas spill); constant indices keep cs, sn in registers.
template <int HD, int G, int K, int VP>
__device__ __forceinline__ void lane_angles(const float* coord, const float* f, const QkvRopeArgs& r, int g, int P,
                                            int R, float (&cs)[K][VP], float (&sn)[K][VP]) {
#pragma unroll 1
  for (int e = 0; e < K * VP; ++e) {
    const int j = (g + G * (e / VP)) * VP + e % VP;
    float s = 0.f, c = 1.f;
    if ((HD || j < P) && j < R) sincosf(rope_angle(coord, f + j, r), &s, &c);
#pragma unroll
    for (int u = 0; u < K * VP; ++u)
      if (u == e) {
        sn[u / VP][u % VP] = s;
        cs[u / VP][u % VP] = c;
      }
  }
}

// Thread layout of a head, forward and backward. HD = head_dim 64 or 128 (0: any
// other, read at run time); PPL = pairs per lane. A group of G lanes owns one head;
// lane g of a group owns chunks c = g + G i (i < K) of VP consecutive pairs. With HD
// the chunk is one 16-byte vector (interleaved) or two (half, at j0 and j0 + D/2)
// and K = 1; the generic layout has VP = 1 and a warp per head.
template <int HD, int PPL, bool HALF>
struct HeadLayout {
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
  using Lay = HeadLayout<HD, PPL, HALF>;
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
  if (ROPE && !per_head) {  // block-uniform: every thread reaches the barrier
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      float s, c;
      rope_cos_sin(coord, j, a.rope, table, c, s);
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
      if (per_head) lane_angles<HD, G>(coord, a.rope.freqs + h * a.rope.freqs_stride[0], a.rope, g, P, R, cs, sn);
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

// How the backward rotates q and k back: not at all; by cos / sin the block tabulates
// in shared memory once for all its heads (angles shared by the heads, or a table's
// rows), without d freqs; or in any way (per-head angles each lane computes for its
// own pairs, d freqs) with the registers that takes (one block per SM).
constexpr int kRotNone = 0, kRotShared = 1, kRotAny = 2;

// Blocks of the backward per SM, which the launch bounds' register cap (64 or 128)
// guarantees and the host sizes grids for (tools/kernel_report.py checks the compiled
// kernels). 2 where a lane holds at most 16 bytes of each row in one run of pairs; 1,
// with twice the registers and as many bytes in flight per SM, where its state is
// larger: two 16-byte runs (half pairing, fp32 runs of 8), the generic layout's
// several pairs or scalar accesses with rope, and kRotAny. 64 registers spilled there.
template <typename T, int HD, int PPL, int ROT, bool HALF, bool VEC>
constexpr int bwd_blocks_per_sm() {
  using Lay = HeadLayout<HD, PPL, HALF>;
  constexpr int words = Lay::K * static_cast<int>(sizeof(RawPairs<T, Lay::VP, HALF>)) / 4;
  return ROT == kRotAny || words > 4 || (ROT != kRotNone && (Lay::K > 1 || !VEC)) ? 1 : 2;
}

// Backward thread layout: a block of kBwdWarps warps is head_warps warps side by side,
// each holding 32 / G heads of the block's slice of the 3H heads in the forward's lane
// layout, times kBwdWarps / head_warps row groups that hold the same heads and take
// the rows of the block's chunk in turn. The sums of dbias / d q_scale / d freqs stay
// in each lane's registers over its rows; at the end of the chunk the row groups'
// sums meet in a fixed-order tree through shared memory.
//
// Per row and head, with g the output gradient and out the saved output: the dot
// product g . out equals the same product taken before the rotation (a table's 2x2
// maps T have T T^T = (cos^2 + sin^2) I and the pre-rotation value is T^T out /
// (cos^2 + sin^2)), and over the head it is both q_scale * (d q_scale) and the norm's
// projection, so one butterfly sum serves both and only the norm needs the saved
// output rotated back.
template <typename T, int HD, int PPL, int ROT, bool HALF, bool VEC>
__global__ void __launch_bounds__(kBwdThreads, (bwd_blocks_per_sm<T, HD, PPL, ROT, HALF, VEC>()))
qkv_bwd_kernel(const QkvProjBwdArgs a, int head_warps) {
  static_assert(ROT != kRotNone || !HALF, "the pairing only matters with rope");
  using Lay = HeadLayout<HD, PPL, HALF>;
  constexpr int VP = Lay::VP, K = Lay::K, G = Lay::G;
  constexpr int NB = 2 * K * VP;                                 // dbias sums: acc[0, NB)
  constexpr int NF = ROT == kRotAny ? K * VP * kMaxAxes : 0;     // d freqs sums: acc[NB, NB + NF)
  constexpr int NA = NB + NF + 1;                                // d q_scale sum: acc[NA - 1]
  __shared__ float cos_s[ROT != kRotNone ? kBwdTile : 1][kMaxPairs];
  __shared__ float sin_s[ROT != kRotNone ? kBwdTile : 1][kMaxPairs];
  __shared__ float red[kBwdWarps / 2 * kWarp][kBwdRedBatch];

  const int H = static_cast<int>(a.H), L = static_cast<int>(a.L), M = static_cast<int>(a.B * a.L);
  const int D = HD ? HD : static_cast<int>(a.D), P = D / 2, R = ROT != kRotNone ? a.rope.rot_pairs : P;
  const int A = a.rope.num_axes;
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp, g = lane % G;
  const int hw = w % head_warps, rg = w / head_warps, groups = kBwdWarps / head_warps;
  const int first_sh = static_cast<int>(blockIdx.y) * head_warps * (kWarp / G);
  const int sh = first_sh + hw * (kWarp / G) + lane / G;
  const bool live = sh < 3 * H;  // the same for the G lanes of a head
  const int s = sh / H, h = sh - s * H;
  const bool qk = live && s < 2;
  const bool per_head = ROT == kRotAny && a.rope.freqs_stride[0] != 0;
  const bool table = ROT != kRotNone && A == 0;
  const bool want_dfreqs = ROT == kRotAny && a.dfreqs_part;
  const bool norm = a.rstd != nullptr;  // kernel-uniform: every lane joins the norm's shuffles
  const bool scaled = a.q_scale && live && s == 0;
  const float sc = scaled ? a.q_scale[h] : 1.f;
  // The value before the scale. Where the scale is 0 the output is 0 and so is every
  // gradient through it: dividing by 1 instead keeps dx and dW exact (d q_scale needs
  // nonzero scales; posenc_fast/ops/qkv_proj.py checks that).
  const float inv_sc = sc == 0.f ? 1.f : 1.f / sc;
  const bool want_dscale = scaled && a.dscale_part;
  const bool need_out = qk && (norm || want_dscale || want_dfreqs);
  const T* g_base = static_cast<const T*>(s == 0 ? a.dq : (s == 1 ? a.dk : a.dv));
  const int64_t* gs = s == 0 ? a.dq_stride : (s == 1 ? a.dk_stride : a.dv_stride);
  const int64_t ge = VEC ? 1 : gs[3];
  const T* out_base = static_cast<const T*>(s == 0 ? a.q : a.k);
  // Block-uniform, so every thread meets the tabulation's barriers.
  const bool tabulate = ROT != kRotNone && !per_head && first_sh < 2 * H;

  float acc[NA];
#pragma unroll
  for (int c = 0; c < NA; ++c) acc[c] = 0.f;

  const int m0 = static_cast<int>(blockIdx.x) * kBwdRowsPerChunk;
  const int m1 = min(M, m0 + kBwdRowsPerChunk);
  for (int t0 = m0; t0 < m1; t0 += kBwdTile) {
    const int t1 = min(m1, t0 + kBwdTile);
    if (tabulate) {
      if (t0 != m0) __syncthreads();  // the previous tile's readers are done
      // Rolled: unrolled copies (table loads, sincosf slow paths) in flight at once cost
      // more registers than the rows' loop takes.
#pragma unroll 1
      for (int e = threadIdx.x; e < (t1 - t0) * R; e += kBwdThreads) {
        const int r = e / R, j = e - r * R, m = t0 + r, b = m / L;
        const float* c = a.rope.coords + b * a.rope.coords_stride[0] + (m - b * L) * a.rope.coords_stride[1];
        float sn, cs;
        rope_cos_sin(c, j, a.rope, table, cs, sn);
        cos_s[r][j] = cs;
        sin_s[r][j] = sn;
      }
      __syncthreads();
    }
    // The row is warp-uniform: the norm's shuffles see every lane.
#pragma unroll 1
    for (int m = t0 + rg; m < t1; m += groups) {
      const int b = m / L, l = m - b * L;
      const float* coord =
          ROT != kRotNone ? a.rope.coords + b * a.rope.coords_stride[0] + l * a.rope.coords_stride[1] : nullptr;
      RawPairs<T, VP, HALF> gr[K], yr[K];
      float dot = 0.f;  // g . out over the lane's pairs
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int j0 = (g + G * i) * VP;
#pragma unroll
        for (int v = 0; v < VP; ++v) {
          gr[i].set(v, 0.f, 0.f);
          yr[i].set(v, 0.f, 0.f);
        }
        if (live && (HD || j0 < P)) {
          load_raw_pairs<T, VP, HALF, VEC>(g_base + b * gs[0] + h * gs[1] + l * gs[2], ge, j0, P, R, gr[i]);
          if (need_out)
            load_raw_pairs<T, VP, HALF, VEC>(out_base + ((static_cast<int64_t>(b) * H + h) * L + l) * D, 1, j0, P,
                                             R, yr[i]);
        }
#pragma unroll
        for (int v = 0; v < VP; ++v) dot += gr[i].x0(v) * yr[i].x0(v) + gr[i].x1(v) * yr[i].x1(v);
      }
      if (want_dscale) acc[NA - 1] += dot * inv_sc;
      const float head_dot = norm ? lane_group_sum<G>(dot) : 0.f;
      // dx = (g sc - n head_dot) rs, n = y inv_sc the normalised vector: g gain - y proj.
      const float rs = norm && qk ? a.rstd[(static_cast<int64_t>(s) * M + m) * H + h] : 1.f;
      const float gain = sc * rs, proj = inv_sc * head_dot * rs;
      float lane_cs[K][VP], lane_sn[K][VP];  // per-head angles only
      if (per_head && qk)
        lane_angles<HD, G>(coord, a.rope.freqs + h * a.rope.freqs_stride[0], a.rope, g, P, R, lane_cs, lane_sn);
      T* d_row = static_cast<T*>(a.dqkv) + static_cast<int64_t>(m) * 3 * H * D + sh * D;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        RawPairs<T, VP, HALF> dx;
#pragma unroll
        for (int v = 0; v < VP; ++v) {
          const int j = (g + G * i) * VP + v;
          float g0 = gr[i].x0(v), g1 = gr[i].x1(v), y0 = yr[i].x0(v), y1 = yr[i].x1(v);
          if (ROT != kRotNone && qk && (HD || j < P) && j < R) {
            const float cs = per_head ? lane_cs[i][v] : cos_s[m - t0][j];
            const float sn = per_head ? lane_sn[i][v] : sin_s[m - t0][j];
            if (want_dfreqs) {
              // d out / d angle = (-out1, out0) for the rotated output (out0, out1).
              const float dang = g1 * y0 - g0 * y1;
#pragma unroll
              for (int ax = 0; ax < kMaxAxes; ++ax)  // constant indices keep acc in registers
                if (ax < A) acc[NB + (i * VP + v) * kMaxAxes + ax] += coord[ax * a.rope.coords_stride[2]] * dang;
            }
            rotate_pair(g0, g1, cs, -sn);
            if (norm) {
              // The inverse: the conjugate rotation over cos^2 + sin^2 (a table need not be
              // a rotation). Where cos = sin = 0 the output pair and its gradient are 0:
              // dividing by 1 keeps everything exact but the norm's backward, which needs
              // the lost pair (posenc_fast/ops/qkv_proj.py refuses that case).
              rotate_pair(y0, y1, cs, -sn);
              if (table) {
                const float mag = cs * cs + sn * sn;
                const float inv = mag == 0.f ? 1.f : 1.f / mag;
                y0 *= inv;
                y1 *= inv;
              }
            }
          }
          if (norm && qk) {
            g0 = g0 * gain - y0 * proj;
            g1 = g1 * gain - y1 * proj;
          } else {
            g0 *= gain;
            g1 *= gain;
          }
          dx.set(v, g0, g1);
          acc[i * VP + v] += g0;
          acc[K * VP + i * VP + v] += g1;
        }
        const int j0 = (g + G * i) * VP;
        if (live && (HD || j0 < P)) store_raw_pairs<T, VP, HALF, VEC>(d_row, j0, P, R, dx);
      }
    }
  }

  // Fixed-order tree over the row groups: group rg + half adds into rg.
  for (int half = groups / 2; half >= 1; half /= 2) {
#pragma unroll
    for (int c0 = 0; c0 < NA; c0 += kBwdRedBatch) {
      __syncthreads();  // the previous pass's readers are done
      if (rg >= half && rg < 2 * half) {
#pragma unroll
        for (int c = 0; c < kBwdRedBatch; ++c)
          if (c0 + c < NA) red[((rg - half) * head_warps + hw) * kWarp + lane][c] = acc[c0 + c];
      }
      __syncthreads();
      if (rg < half) {
#pragma unroll
        for (int c = 0; c < kBwdRedBatch; ++c)
          if (c0 + c < NA) acc[c0 + c] += red[(rg * head_warps + hw) * kWarp + lane][c];
      }
    }
  }
  if (rg != 0) return;

  const int chunk = static_cast<int>(blockIdx.x);
  if (a.dscale_part && a.q_scale) {  // kernel-uniform: every lane joins the shuffles
    const float v = lane_group_sum<G>(acc[NA - 1]);
    if (want_dscale && g == 0) a.dscale_part[static_cast<int64_t>(chunk) * H + h] = v;
  }
  if (!live) return;
  if (a.dbias_part) {
    float* row = a.dbias_part + static_cast<int64_t>(chunk) * 3 * H * D + sh * D;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int j0 = (g + G * i) * VP;
      float b0[VP], b1[VP];
#pragma unroll
      for (int v = 0; v < VP; ++v) {
        b0[v] = acc[i * VP + v];
        b1[v] = acc[K * VP + i * VP + v];
      }
      if (HD || j0 < P) store_pairs<float, VP, HALF, false>(row, j0, P, R, b0, b1);
    }
  }
  if constexpr (ROT == kRotAny) {
    if (!want_dfreqs || !qk) return;
    float* out = a.dfreqs_part + ((static_cast<int64_t>(chunk) * 2 + s) * H + h) * A * R;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int v = 0; v < VP; ++v) {
        const int j = (g + G * i) * VP + v;
#pragma unroll
        for (int ax = 0; ax < kMaxAxes; ++ax)
          if ((HD || j < P) && j < R && ax < A) out[ax * R + j] = acc[NB + (i * VP + v) * kMaxAxes + ax];
      }
  }
}

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

// The same for the backward: dq, dk, dv (contiguous head rows with strides that
// keep them aligned), the saved q, k and dqkv.
bool bwd_vectors_fit(const QkvProjBwdArgs& a, int n, size_t bytes) {
  bool ok = aligned(a.dqkv, bytes) && (!a.q || aligned(a.q, bytes)) && (!a.k || aligned(a.k, bytes));
  for (const auto& [p, st] : {std::pair{a.dq, a.dq_stride}, {a.dk, a.dk_stride}, {a.dv, a.dv_stride}})
    ok = ok && aligned(p, bytes) && st[3] == 1 && st[0] % n == 0 && st[1] % n == 0 && st[2] % n == 0;
  return ok;
}

// Calls f(HD, PPL, ROPE, HALF) (integral constants) with the head layout the element
// type T and the rotation take: for head_dim 64 or 128 a 16-byte chunk per lane,
// kVec / 2 interleaved pairs or kVec half pairs in two runs; the generic layout, a
// pair per lane, for other head dims, for half pairing whose runs would straddle the
// rotating pairs' end (partial rotary), and where `generic_half` asks it for half
// pairing. Without rope the pairing does not matter (the interleaved layout).
template <typename T, typename F>
void dispatch_layout(int64_t D, const QkvRopeArgs& r, bool generic_half, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  const auto with_pairing = [&](auto hd, auto ppl_interleaved, auto ppl_half) {
    if (!r.coords) f(hd, ppl_interleaved, std::false_type{}, std::false_type{});
    else if (r.half_pairing) f(hd, ppl_half, std::true_type{}, std::true_type{});
    else f(hd, ppl_interleaved, std::true_type{}, std::false_type{});
  };
  using Inter = std::integral_constant<int, kVec / 2>;
  using Half = std::integral_constant<int, kVec>;
  const bool runs_fit = !r.coords || !r.half_pairing || (r.rot_pairs % kVec == 0 && !generic_half);
  if (D == 64 && runs_fit) with_pairing(std::integral_constant<int, 64>{}, Inter{}, Half{});
  else if (D == 128 && runs_fit) with_pairing(std::integral_constant<int, 128>{}, Inter{}, Half{});
  else dispatch_ppl(D, [&](auto ppl) { with_pairing(std::integral_constant<int, 0>{}, ppl, ppl); });
}

template <typename T, int HD, int PPL, bool ROPE, bool HALF>
void launch_fwd(const QkvProjFwdArgs& a, cudaStream_t stream) {
  using Lay = HeadLayout<HD, PPL, HALF>;
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

// Head-warps per backward block (a power of two; the rest of its warps are row
// groups): the grid chunks x ceil(warps / head_warps) that ends closest to whole
// waves of `slots` with the fewest idle warps, and among equals the most heads per
// block (each block tabulates its rows' rotation once). The sums' order follows the
// choice: bit-identical from run to run on a device.
int bwd_head_warps(int64_t chunks, int64_t warps, int64_t slots) {
  int best = kBwdWarps;
  double best_score = -1.0;
  for (int hw = kBwdWarps; hw >= 1; hw /= 2) {
    const int64_t slices = (warps + hw - 1) / hw;
    const double score = wave_efficiency(chunks * slices, slots) * double(warps) / double(slices * hw);
    if (score > best_score + 1e-9) best_score = score, best = hw;
  }
  return best;
}

// The backward's rotation needs kRotAny: per-head angles or d freqs.
bool bwd_rot_any(const QkvProjBwdArgs& a) { return a.rope.freqs_stride[0] != 0 || a.dfreqs_part; }

template <typename T, int HD, int PPL, bool ROPE, bool HALF>
void launch_bwd(const QkvProjBwdArgs& a, int device, cudaStream_t stream) {
  using Lay = HeadLayout<HD, PPL, HALF>;
  const int64_t chunks = (a.B * a.L + kBwdRowsPerChunk - 1) / kBwdRowsPerChunk;
  const int64_t heads_per_warp = kWarp / Lay::G;
  const int64_t warps = (3 * a.H + heads_per_warp - 1) / heads_per_warp;
  const auto launch = [&](auto rot, auto vec) {
    constexpr int kRot = decltype(rot)::value;
    constexpr bool kVecOk = decltype(vec)::value;
    const int head_warps =
        bwd_head_warps(chunks, warps, bwd_blocks_per_sm<T, HD, PPL, kRot, HALF, kVecOk>() * int64_t(num_sms(device)));
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((warps + head_warps - 1) / head_warps));
    qkv_bwd_kernel<T, HD, PPL, kRot, HALF, kVecOk><<<grid, kBwdThreads, 0, stream>>>(a, head_warps);
  };
  const auto with_rot = [&](auto vec) {
    if constexpr (!ROPE) {
      launch(std::integral_constant<int, kRotNone>{}, vec);
    } else if constexpr (HALF && HD != 0) {
      launch(std::integral_constant<int, kRotShared>{}, vec);  // kRotAny takes the generic layout
    } else {
      if (bwd_rot_any(a)) launch(std::integral_constant<int, kRotAny>{}, vec);
      else launch(std::integral_constant<int, kRotShared>{}, vec);
    }
  };
  if constexpr (Lay::kVecElems > 1) {
    if (bwd_vectors_fit(a, Lay::kVecElems, Lay::kVecElems * sizeof(T))) {
      with_rot(std::true_type{});
      return;
    }
  }
  with_rot(std::false_type{});
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
    dispatch_layout<T>(a.D, a.rope, false, [&](auto hd, auto ppl, auto rope, auto half) {
      launch_fwd<T, decltype(hd)::value, decltype(ppl)::value, decltype(rope)::value, decltype(half)::value>(a,
                                                                                                           stream);
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
  POSENC_CHECK_ARG(!a.rope.coords || a.rope.num_axes > 0 || !a.dfreqs_part,
                   "qkv_proj_bwd: a cos/sin table has no d freqs");
  // Row indices and the in-row offsets 3 H D are ints; heads slice over grid.y.
  POSENC_CHECK_ARG(M <= INT32_MAX && 3 * a.H * std::max<int64_t>(a.D, kWarp) <= INT32_MAX,
                   "qkv_proj_bwd: B * L and 3 * num_heads * max(head_dim, 32) must be < 2^31");
  POSENC_CHECK_ARG(3 * a.H <= 65535, "qkv_proj_bwd: 3 * num_heads must be <= 65535");
  set_device(device);
  dispatch_dtype(a.dtype, "dq", [&](auto tag) {
    using T = decltype(tag);
    // kRotAny with two runs of half pairs per lane would need more than 128 registers.
    dispatch_layout<T>(a.D, a.rope, bwd_rot_any(a), [&](auto hd, auto ppl, auto rope, auto half) {
      launch_bwd<T, decltype(hd)::value, decltype(ppl)::value, decltype(rope)::value, decltype(half)::value>(
          a, device, stream);
    });
  });
  check_last_launch("qkv_proj_bwd");
}

}  // namespace posenc
