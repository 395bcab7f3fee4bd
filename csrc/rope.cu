// Fused rotary position embedding of q and k (see posenc_fast/rope.h).
//
// A block owns a tile of TL tokens of one batch element and a range of heads (q
// heads, then k heads). Thread (tx, ty) always handles the same VP consecutive
// pairs of the same tokens ty, ty + TY, ... of the tile, so it computes their
// sincosf once and reuses it for every head when the frequencies are shared. Loads
// and stores are 16-byte vectors along D when strides and alignment allow.
//
// d freqs: every thread accumulates dangle * coords for its pairs over its tokens
// (and heads); the block adds its threads' values in a fixed order into one partial
// row; a second kernel adds the rows in a fixed order. No atomics: bitwise
// reproducible from run to run.
#include "posenc_fast/rope.h"

#include <algorithm>

#include "device_utils.cuh"

namespace posenc {
namespace {

constexpr int kMaxAxes = 4;
constexpr int kThreads = 256;
constexpr int kPairsPerThread = 8;  // tokens per thread x pairs per thread

struct Params {
  const void* x[2];
  void* out[2];
  const void* saved[2];
  int64_t xs[2][4], os[2][4], ss[2][4];
  const float* coords;
  int64_t cs[3];
  const float* freqs;
  int64_t fs[3];
  int Hq, Htot, L, P, A;
  int tile;             // tokens per block
  int heads_per_block;
  int n_kinds;          // per-head partial rows per slot and head: 1 + (Hk > 0)
  bool per_head, conjugate;
  float* partial;
};

// Tokens per block: 8 rows of the widest (VP = 1) thread layout, so the tiling,
// and with it the workspace, depends on P only.
inline int tile_tokens(int P) { return kPairsPerThread * std::max(1, kThreads / P); }

// Blocks of kThreads an SM holds, which the launch bounds guarantee: 4 keep enough
// 16-byte loads in flight; the d freqs variant trades occupancy for its accumulators
// (2: no spills).
constexpr int blocks_per_sm(bool dfreqs) { return dfreqs ? 2 : 4; }

inline int heads_per_block(int B, int L, int P, int Htot, bool dfreqs) {
  // Heads are split over blocks only as far as needed: to fill one wave, then to the
  // first split that ends in whole waves (>= 0.85 of the last one busy,
  // tools/kernel_report.py's gate); every split repeats the block's sin/cos work.
  // Waves of a 132-SM GPU: a constant, not the device's count, so the d freqs
  // reduction order (which follows the head grouping) depends on the shapes only.
  const long long slots = 132LL * blocks_per_sm(dfreqs);
  const long long blocks = std::max<long long>(1, (long long)ceil_div(L, tile_tokens(P)) * B);
  long long best_per = Htot;
  double best_eff = -1.0;
  for (long long s = std::min<long long>(Htot, (slots + blocks - 1) / blocks); s <= Htot; ++s) {
    const long long per = (Htot + s - 1) / s;
    const long long grid = blocks * ((Htot + per - 1) / per);
    const double eff = double(grid) / double((grid + slots - 1) / slots * slots);
    if (eff > best_eff + 1e-9) best_eff = eff, best_per = per;
    if (eff >= 0.85) break;
  }
  return (int)best_per;
}

// The VP pairs starting at pair j0 of the row at p (element stride s, P pairs).
template <typename T, int VP, bool INTERLEAVED, bool VEC>
__device__ __forceinline__ void load_pairs(const T* p, int64_t s, int j0, int P, float (&x0)[VP], float (&x1)[VP]) {
  if constexpr (INTERLEAVED) {
    float e[2 * VP];
    load_n<T, 2 * VP, VEC>(p + 2 * j0 * s, s, e);
#pragma unroll
    for (int v = 0; v < VP; ++v) { x0[v] = e[2 * v]; x1[v] = e[2 * v + 1]; }
  } else {
    load_n<T, VP, VEC>(p + j0 * s, s, x0);
    load_n<T, VP, VEC>(p + (int64_t)(P + j0) * s, s, x1);
  }
}

template <typename T, int VP, bool INTERLEAVED, bool VEC>
__device__ __forceinline__ void store_pairs(T* p, int64_t s, int j0, int P, const float (&y0)[VP], const float (&y1)[VP]) {
  if constexpr (INTERLEAVED) {
    float e[2 * VP];
#pragma unroll
    for (int v = 0; v < VP; ++v) { e[2 * v] = y0[v]; e[2 * v + 1] = y1[v]; }
    store_n<T, 2 * VP, VEC>(p + 2 * j0 * s, s, e);
  } else {
    store_n<T, VP, VEC>(p + j0 * s, s, y0);
    store_n<T, VP, VEC>(p + (int64_t)(P + j0) * s, s, y1);
  }
}

// Adds the block's per-thread accumulators in a fixed order into partial row `row`.
template <int VP>
__device__ void block_reduce_store(const Params& p, float (&acc)[kMaxAxes][VP], int64_t row, float* red) {
  const int TX = blockDim.x, TY = blockDim.y, nthr = TX * TY;
  const int tid = threadIdx.y * TX + threadIdx.x;
#pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    if (a < p.A) {
#pragma unroll
      for (int v = 0; v < VP; ++v) red[(a * VP + v) * nthr + tid] = acc[a][v];
    }
  }
  __syncthreads();
  for (int e = tid; e < p.A * p.P; e += nthr) {
    const int a = e / p.P, j = e % p.P;
    const int lane = j / VP, v = j % VP;
    const float* r = red + (a * VP + v) * nthr + lane;
    float s = 0.f;
    for (int y = 0; y < TY; ++y) s += r[y * TX];
    p.partial[row * p.A * p.P + e] = s;
  }
  __syncthreads();  // red is reused by the next head
}

// FULL: a full-width table (4 planes), whose pairs' second elements have their own
// cos / sin.
template <typename T, bool INTERLEAVED, int VP, bool VEC, bool DFREQS, bool FULL>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(DFREQS)) rope_kernel(const Params p) {
  constexpr int NT = kPairsPerThread / VP;  // tokens per thread
  extern __shared__ float red[];
  const int tx = threadIdx.x, ty = threadIdx.y, TY = blockDim.y;
  const int j0 = tx * VP;
  const int l0 = blockIdx.x * p.tile;
  const int b = blockIdx.y;
  const float* cb = p.coords + b * p.cs[0];

  // Token of slot i of this thread, or -1.
  int tok[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int tl = ty + i * TY;
    tok[i] = (tl < p.tile && l0 + tl < p.L) ? l0 + tl : -1;
  }

  // y0 = x0 cs - x1 sn, and y1 = x0 sn + x1 cs except for a full-width table, whose
  // second-element entries are read per head (L1 hits after the first head): four
  // register arrays would spill.
  float cs[NT][VP], sn[NT][VP];
  auto angles = [&](const float* f) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      if (tok[i] < 0) continue;
#pragma unroll
      for (int v = 0; v < VP; ++v) {
        if (p.A == 0) {  // table mode: coords is the (2 or 4, B or 1, L, P) table, cs[2] its plane stride
          const float* t = cb + tok[i] * p.cs[1] + j0 + v;
          cs[i][v] = t[0];
          // The transpose (backward) of a full-width table swaps the two sines.
          const float s = t[(FULL && p.conjugate ? 3 : 1) * p.cs[2]];
          sn[i][v] = p.conjugate ? -s : s;
          continue;
        }
        // Round each product, then add in axis order: the reference's arithmetic.
        float ang = 0.f;
#pragma unroll
        for (int a = 0; a < kMaxAxes; ++a) {
          if (a < p.A) ang = __fadd_rn(ang, __fmul_rn(cb[tok[i] * p.cs[1] + a * p.cs[2]],
                                                      f[a * p.fs[1] + (j0 + v) * p.fs[2]]));
        }
        float s, c;
        sincosf(ang, &s, &c);
        cs[i][v] = c;
        sn[i][v] = p.conjugate ? -s : s;
      }
    }
  };

  float acc[kMaxAxes][VP];
  auto zero_acc = [&]() {
#pragma unroll
    for (int a = 0; a < kMaxAxes; ++a)
#pragma unroll
      for (int v = 0; v < VP; ++v) acc[a][v] = 0.f;
  };
  zero_acc();
  const int64_t slot = (int64_t)b * gridDim.x + blockIdx.x;

  if (!p.per_head) angles(p.freqs);
  const int h_lo = blockIdx.z * p.heads_per_block;
  const int h_hi = min(h_lo + p.heads_per_block, p.Htot);
  for (int hh = h_lo; hh < h_hi; ++hh) {
    const int which = hh < p.Hq ? 0 : 1;
    const int h = hh - which * p.Hq;
    if (p.per_head) angles(p.freqs + h * p.fs[0]);
    const int64_t* xs = p.xs[which];
    const int64_t* os = p.os[which];
    const T* xb = static_cast<const T*>(p.x[which]) + b * xs[0] + h * xs[1];
    T* ob = static_cast<T*>(p.out[which]) + b * os[0] + h * os[1];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      if (tok[i] < 0) continue;
      float x0[VP], x1[VP], y0[VP], y1[VP];
      load_pairs<T, VP, INTERLEAVED, VEC>(xb + tok[i] * xs[2], xs[3], j0, p.P, x0, x1);
#pragma unroll
      for (int v = 0; v < VP; ++v) {
        y0[v] = x0[v] * cs[i][v] - x1[v] * sn[i][v];
        if constexpr (FULL) {
          const float* t = cb + tok[i] * p.cs[1] + j0 + v;
          const float s1 = t[(p.conjugate ? 1 : 3) * p.cs[2]];
          y1[v] = x0[v] * (p.conjugate ? -s1 : s1) + x1[v] * t[2 * p.cs[2]];
        } else {
          y1[v] = x0[v] * sn[i][v] + x1[v] * cs[i][v];
        }
      }
      store_pairs<T, VP, INTERLEAVED, VEC>(ob + tok[i] * os[2], os[3], j0, p.P, y0, y1);
      if constexpr (DFREQS) {
        // x is the output gradient g; d angle = g1 * y0 - g0 * y1 with y the saved output.
        const int64_t* ss = p.ss[which];
        const T* sb = static_cast<const T*>(p.saved[which]) + b * ss[0] + h * ss[1] + tok[i] * ss[2];
        float s0[VP], s1[VP];
        load_pairs<T, VP, INTERLEAVED, VEC>(sb, ss[3], j0, p.P, s0, s1);
#pragma unroll
        for (int a = 0; a < kMaxAxes; ++a) {
          if (a >= p.A) continue;
          const float c = cb[tok[i] * p.cs[1] + a * p.cs[2]];
#pragma unroll
          for (int v = 0; v < VP; ++v) acc[a][v] += (x1[v] * s0[v] - x0[v] * s1[v]) * c;
        }
      }
    }
    if constexpr (DFREQS) {
      if (p.per_head) {  // partial rows (slot, q or k, head)
        block_reduce_store<VP>(p, acc, (slot * p.n_kinds + which) * p.Hq + h, red);
        zero_acc();
      }
    }
  }
  if constexpr (DFREQS) {
    if (!p.per_head) block_reduce_store<VP>(p, acc, slot * gridDim.z + blockIdx.z, red);
  }
}

// out[m] = sum_r part[r, m], rows added in a fixed order.
__global__ void reduce_rows_kernel(const float* __restrict__ part, int64_t rows, int64_t m, float* __restrict__ out) {
  __shared__ float s[32][33];
  const int64_t col = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < m)
    for (int64_t r = threadIdx.y; r < rows; r += blockDim.y) acc += part[r * m + col];
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < m) {
    float t = 0.f;
    for (int y = 0; y < (int)blockDim.y; ++y) t += s[y][threadIdx.x];
    out[col] = t;
  }
}

template <typename T>
constexpr int vector_pairs(bool interleaved) {
  return interleaved ? 8 / (int)sizeof(T) : 16 / (int)sizeof(T);  // 16 bytes per load
}

bool vec_ok(const RopeTensor& t, int elems) {
  if (!aligned(t.ptr, 16) || t.stride[3] != 1) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride[d] % elems != 0) return false;
  return true;
}

template <typename T, bool INTERLEAVED, int VP, bool VEC, bool DFREQS, bool FULL = false>
void launch(const Params& p, int B, int n_lblocks, int n_hsplit, cudaStream_t stream) {
  const int TX = p.P / VP;
  const int TY = std::max(1, kThreads / TX);
  const size_t smem = DFREQS ? sizeof(float) * kMaxAxes * VP * TX * TY : 0;
  rope_kernel<T, INTERLEAVED, VP, VEC, DFREQS, FULL>
      <<<dim3(n_lblocks, B, n_hsplit), dim3(TX, TY), smem, stream>>>(p);
  check_last_launch("rope_kernel");
}

template <typename T, bool INTERLEAVED>
void dispatch_vec(const RopeArgs& args, const Params& p, int n_lblocks, int n_hsplit, bool dfreqs,
                  cudaStream_t stream) {
  constexpr int V = vector_pairs<T>(INTERLEAVED);
  constexpr int elems = 16 / (int)sizeof(T);
  bool vec = p.P % V == 0;
  for (int w = 0; w < (args.Hk > 0 ? 2 : 1); ++w) {
    vec = vec && vec_ok(args.x[w], elems) && vec_ok(args.out[w], elems);
    if (dfreqs) vec = vec && vec_ok(args.saved[w], elems);
  }
  if (vec) {
    if (dfreqs) launch<T, INTERLEAVED, V, true, true>(p, args.B, n_lblocks, n_hsplit, stream);
    else if (args.full_table) launch<T, INTERLEAVED, V, true, false, true>(p, args.B, n_lblocks, n_hsplit, stream);
    else launch<T, INTERLEAVED, V, true, false>(p, args.B, n_lblocks, n_hsplit, stream);
  } else {
    if (dfreqs) launch<T, INTERLEAVED, 1, false, true>(p, args.B, n_lblocks, n_hsplit, stream);
    else if (args.full_table) launch<T, INTERLEAVED, 1, false, false, true>(p, args.B, n_lblocks, n_hsplit, stream);
    else launch<T, INTERLEAVED, 1, false, false>(p, args.B, n_lblocks, n_hsplit, stream);
  }
}

}  // namespace

namespace {

// Rows of the d freqs workspace, each one value of dfreqs: (Hq, A, P) floats per
// (token block, batch, q or k) per head, (A, P) per (token block, batch, head split)
// shared. The kernel writes per-head rows head by head: the same memory.
size_t reduce_rows(int B, int Hq, int Hk, int L, int P, bool per_head) {
  const int Htot = Hq + Hk;
  if (B <= 0 || L <= 0 || P <= 0 || Htot <= 0) return 0;
  const size_t n_l = ceil_div(L, tile_tokens(P));
  const int per = heads_per_block(B, L, P, Htot, true);
  return per_head ? n_l * B * (Hk > 0 ? 2 : 1) : n_l * B * ((Htot + per - 1) / per);
}

size_t dfreqs_size(int Hq, int A, int P, bool per_head) { return (size_t)(per_head ? Hq : 1) * A * P; }

}  // namespace

size_t rope_workspace_floats(int B, int Hq, int Hk, int L, int D, int A, bool per_head) {
  return reduce_rows(B, Hq, Hk, L, D / 2, per_head) * dfreqs_size(Hq, A, D / 2, per_head);
}

void rope_apply(const RopeArgs& args, int device, cudaStream_t stream) {
  POSENC_CHECK_ARG(args.B >= 0 && args.Hq >= 0 && args.Hk >= 0 && args.L >= 0, "rope: negative size");
  POSENC_CHECK_ARG(args.D % 2 == 0 && args.D >= 2 && args.D <= 512, "rope: head dim must be even, 2..512");
  POSENC_CHECK_ARG(args.A >= 0 && args.A <= kMaxAxes, "rope: the cuda backend supports 1 to 4 axes (0: a table)");
  POSENC_CHECK_ARG(args.A > 0 || (!args.per_head && args.dfreqs == nullptr),
                   "rope: a cos/sin table (A = 0) has no per-head freqs and no d freqs");
  POSENC_CHECK_ARG(!args.full_table || args.A == 0, "rope: full_table needs a table (A = 0)");
  POSENC_CHECK_ARG(!args.per_head || args.Hk == 0 || args.Hk == args.Hq,
                   "rope: per-head freqs need as many k heads as q heads");
  const bool dfreqs = args.dfreqs != nullptr;
  POSENC_CHECK_ARG(!dfreqs || args.workspace != nullptr || rope_workspace_floats(args.B, args.Hq, args.Hk, args.L, args.D, args.A, args.per_head) == 0,
                   "rope: the d freqs reduction needs a workspace");
  set_device(device);

  const int P = args.D / 2;
  const int Htot = args.Hq + args.Hk;
  if (args.B > 0 && args.L > 0 && Htot > 0) {
    Params p{};
    for (int w = 0; w < 2; ++w) {
      const int src = (w == 1 && args.Hk > 0) ? 1 : 0;  // without k, slot 1 mirrors q (never read)
      p.x[w] = args.x[src].ptr;
      p.out[w] = const_cast<void*>(args.out[src].ptr);
      p.saved[w] = dfreqs ? args.saved[src].ptr : args.x[src].ptr;
      for (int d = 0; d < 4; ++d) {
        p.xs[w][d] = args.x[src].stride[d];
        p.os[w][d] = args.out[src].stride[d];
        p.ss[w][d] = dfreqs ? args.saved[src].stride[d] : args.x[src].stride[d];
      }
    }
    p.coords = args.coords;
    p.freqs = args.freqs;
    for (int d = 0; d < 3; ++d) { p.cs[d] = args.coord_stride[d]; p.fs[d] = args.freq_stride[d]; }
    p.Hq = args.Hq;
    p.Htot = Htot;
    p.L = args.L;
    p.P = P;
    p.A = args.A;
    p.tile = tile_tokens(P);
    p.heads_per_block = heads_per_block(args.B, args.L, P, Htot, dfreqs);
    p.n_kinds = args.Hk > 0 ? 2 : 1;
    p.per_head = args.per_head;
    p.conjugate = args.conjugate;
    p.partial = args.workspace;
    const int n_lblocks = (int)ceil_div(args.L, p.tile);
    const int n_hsplit = (Htot + p.heads_per_block - 1) / p.heads_per_block;
    POSENC_CHECK_ARG(args.B <= 65535 && n_hsplit <= 65535, "rope: batch too large for one launch");
    RopeArgs used = args;
    if (args.Hk == 0) { used.x[1] = args.x[0]; used.out[1] = args.out[0]; used.saved[1] = args.saved[0]; }
    dispatch_dtype(args.dtype, "q", [&](auto tag) {
      using T = decltype(tag);
      if (args.interleaved) dispatch_vec<T, true>(used, p, n_lblocks, n_hsplit, dfreqs, stream);
      else dispatch_vec<T, false>(used, p, n_lblocks, n_hsplit, dfreqs, stream);
    });
  }
  const int64_t m = (int64_t)dfreqs_size(args.Hq, args.A, P, args.per_head);
  if (dfreqs && m > 0) {
    // Zero rows (empty input) still write dfreqs: zeros.
    const int64_t rows = (int64_t)reduce_rows(args.B, args.Hq, args.Hk, args.L, P, args.per_head);
    reduce_rows_kernel<<<ceil_div(m, 32), dim3(32, 32), 0, stream>>>(args.workspace, rows, m, args.dfreqs);
    check_last_launch("rope reduce_rows_kernel");
  }
}

}  // namespace posenc
