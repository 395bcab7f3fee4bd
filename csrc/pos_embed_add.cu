// Additive position encodings of the wider family: CUDA kernels (see pos_embed_add.h).
//
// Forward: each thread builds the embedding of its (token, channel vector) once in fp32
// (the weighted learned rows of the token, plus the fixed sinusoid generated from
// the token's coordinates and the channel's descriptor: no (L, C) table is read),
// then streams it onto its share of the batch. With per-image coordinates (DETR's
// padding mask) the fixed part is computed per image.
// FlexVAR's grid is read in its own layout: a block owns a chunk of one token row of a
// scale (whose area windows share grid rows) and a channel block; its threads first
// sum those grid rows per cell into shared memory (loads along the cells, 16 bytes at
// a time), then each token's thread sums its column window there and streams it. A
// coarse token's many cells are spread over the whole block.
// Backward: per (token, channel vector) the batch sum of the gradient (16-byte loads,
// lanes along the batch meeting in shared memory in a fixed order); then per (table
// row, channel vector) the weighted sum over the tokens that read the row, in token
// order. No atomics: results are bit-identical from run to run.
#include "device_utils.cuh"
#include "posenc_fast/pos_embed_add.h"

#include <algorithm>

namespace posenc {
namespace {

__device__ __forceinline__ float fixed_value(const float* coords, const float* desc, int64_t g, int64_t c,
                                             float angle_scale) {
  const float y = coords[3 * g], x = coords[3 * g + 1], weight = coords[3 * g + 2];
  const float angle = (y * desc[3 * c] + x * desc[3 * c + 1]) * angle_scale;
  return weight * (desc[3 * c + 2] != 0.f ? cosf(angle) : sinf(angle));
}

// Each thread owns VEC consecutive channels of one token (VEC > 1: one 16-byte
// load of x and one store of out per batch row). PER_IMAGE (DETR's padding mask)
// is a template argument: its per-row sinusoid would otherwise cost every variant
// registers (40 instead of 32), and so resident blocks.
template <typename TX, typename TO, int VEC, bool PER_IMAGE>
__global__ void pos_embed_fwd_kernel(const PosEmbedFwdArgs a, int64_t batch_per_block) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (t >= a.n || c0 >= a.C) return;
  const int64_t g = a.start + t;
  float emb[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) emb[v] = 0.f;
  if (a.table) {
    for (int j = a.ptr[g]; j < a.ptr[g + 1]; ++j) {
      const int64_t row = a.idx[j] * a.table_stride[0];
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        emb[v] += a.w[j] * load_any(a.table, row + (c0 + v) * a.table_stride[1], a.table_dtype);
    }
  }
  if (a.coords && !PER_IMAGE) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) emb[v] += fixed_value(a.coords, a.desc, g, c0 + v, a.angle_scale);
  }

  const TX* __restrict__ x = static_cast<const TX*>(a.x);
  TO* __restrict__ out = static_cast<TO*>(a.out);
  const int64_t b_begin = static_cast<int64_t>(blockIdx.z) * batch_per_block;
  const int64_t b_end = b_begin + batch_per_block < a.B ? b_begin + batch_per_block : a.B;
  for (int64_t b = b_begin; b < b_end; ++b) {
    float e[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      e[v] = emb[v];
      if constexpr (PER_IMAGE)
        e[v] += fixed_value(a.coords + b * a.coords_image_stride, a.desc, g, c0 + v, a.angle_scale);
    }
    store_sum<TX, TO, VEC>(x, b * a.x_stride[0] + t * a.x_stride[1], c0, a.x_stride[2], out,
                           (b * a.n + t) * a.C + c0, e);
  }
}

template <typename TX, typename TO>
void launch_fwd(const PosEmbedFwdArgs& a, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TX);
  const bool vec = token_packs_fit<TX, TO, kVec>(a.x, a.x_stride, a.C, a.out);
  const bool per_image = a.coords && a.coords_image_stride != 0;
  const auto kernel =
      per_image ? (vec ? &pos_embed_fwd_kernel<TX, TO, kVec, true> : &pos_embed_fwd_kernel<TX, TO, 1, true>)
                : (vec ? &pos_embed_fwd_kernel<TX, TO, kVec, false> : &pos_embed_fwd_kernel<TX, TO, 1, false>);
  // Each block reuses its embedding for its slice of the batch (grid.z), sliced for
  // whole waves as in the pyramid forward.
  const TokenLaunch l = token_launch(kernel, a.n, a.C, vec ? kVec : 1, a.B, device);
  kernel<<<l.grid, l.block, 0, stream>>>(a, l.batch_per_block);
  check_last_launch("pos_embed_fwd_kernel");
}

constexpr int kGridLanes = 16;   // channel vectors per token: blockDim.x (blockDim.y: the chunk's tokens)
constexpr int kGridPassX = 32;   // cells per pass through shared memory
// Resident blocks an SM is promised (__launch_bounds__: <= 64 registers; left alone,
// ptxas capped some variants at 32 and spilled) and the launcher counts on for whole
// waves: 4 fills whole waves at the VAR-d16 / d30 workloads (68 token rows x 8 or 15
// channel blocks), where 5 left 0.82 of the last wave busy.
constexpr int kGridBlocksPerSM = 4;

// s[k] += sum over `rows` grid rows (y_stride apart) of the 8 consecutive cells at p,
// 16-byte aligned (the host checks it). Two rows' loads in flight at a time.
template <typename TG>
__device__ __forceinline__ void add_rows8(const TG* p, int64_t y_stride, int rows, float (&s)[8]) {
#pragma unroll 2
  for (int y = 0; y < rows; ++y, p += y_stride) {
    if constexpr (sizeof(TG) == 2) {
      const Pack<TG, 8> v = *reinterpret_cast<const Pack<TG, 8>*>(p);
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] += to_float<TG>(v.v[k]);
    } else {
      const Pack<float, 4> lo = *reinterpret_cast<const Pack<float, 4>*>(p);
      const Pack<float, 4> hi = *reinterpret_cast<const Pack<float, 4>*>(p + 4);
#pragma unroll
      for (int k = 0; k < 4; ++k) s[k] += lo.v[k], s[k + 4] += hi.v[k];
    }
  }
}

// One block per (chunk, channel block, batch slice); thread (lane, token slot) owns VEC
// consecutive channels of one token. Per pass of kGridPassX cells: the block sums the
// chunk's grid rows per (cell, channel) into S (GRID_VEC: 8 cells a thread, 16-byte
// loads along the cells; else one cell, consecutive threads on consecutive cells),
// then each token's threads add the cells of their column window. The grid is read
// as it is at launch: nothing is cached between calls.
template <typename TX, typename TO, int VEC, bool GRID_VEC>
__global__ void __launch_bounds__(kGridLanes * kGridChunkTokens, kGridBlocksPerSM)
    pos_embed_grid_fwd_kernel(const PosEmbedGridFwdArgs a, int64_t batch_per_block) {
  constexpr int kChannels = kGridLanes * VEC;
  constexpr int kThreads = kGridLanes * kGridChunkTokens;
  // +1: the phase-1 stores (lanes along cells and channels) fall on distinct banks.
  __shared__ float S[kGridPassX][kChannels + 1];
  const int32_t* chunk = a.chunks + 8 * static_cast<int64_t>(blockIdx.x);
  const int t0 = chunk[0], cnt = chunk[1], y0 = chunk[2], y1 = chunk[3], xa = chunk[4], xb = chunk[5];
  // The token's column j in its row and its cells [x0, x1); 32-bit (the host checks
  // that (w + 1) Gw fits).
  const int w = chunk[7], gw = static_cast<int>(a.Gw);
  const int j = chunk[6] + static_cast<int>(threadIdx.y);
  const int x0 = j * gw / w, x1 = ((j + 1) * gw + w - 1) / w;
  const int64_t cb = static_cast<int64_t>(blockIdx.y) * kChannels;
  // Not cb + threadIdx.x * VEC: from that form NVVM split the 16-byte stores of out.
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const int tid = threadIdx.y * kGridLanes + threadIdx.x;
  const bool active = static_cast<int>(threadIdx.y) < cnt && c0 < a.C;
  const int64_t sgc = a.grid_stride[0], sgy = a.grid_stride[1], sgx = a.grid_stride[2];
  float e[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) e[v] = 0.f;
  for (int xs = xa; xs < xb; xs += kGridPassX) {  // the same for the whole block: barriers are safe
    const int xn = min(kGridPassX, xb - xs);
    if constexpr (GRID_VEC) {
      const int groups = xn / 8;  // xa, xb, kGridPassX: multiples of 8
      for (int i = tid; i < kChannels * groups; i += kThreads) {
        const int cl = i / groups, g = i % groups;
        if (cb + cl >= a.C) continue;
        float s[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) s[k] = 0.f;
        const int64_t off = (cb + cl) * sgc + y0 * sgy + xs + 8 * g;
        switch (a.grid_dtype) {
          case DType::kFloat16: add_rows8(static_cast<const __half*>(a.grid) + off, sgy, y1 - y0, s); break;
          case DType::kBFloat16: add_rows8(static_cast<const __nv_bfloat16*>(a.grid) + off, sgy, y1 - y0, s); break;
          default: add_rows8(static_cast<const float*>(a.grid) + off, sgy, y1 - y0, s);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) S[8 * g + k][cl] = s[k];
      }
    } else {
      for (int i = tid; i < kChannels * xn; i += kThreads) {
        const int cl = i / xn, xi = i % xn;
        if (cb + cl >= a.C) continue;
        const int64_t off = (cb + cl) * sgc + (xs + xi) * sgx;
        float s = 0.f;
        for (int y = y0; y < y1; ++y) s += load_any(a.grid, off + y * sgy, a.grid_dtype);
        S[xi][cl] = s;
      }
    }
    __syncthreads();
    if (active) {
      const int hi = min(x1, xs + xn);
      for (int x = max(x0, xs); x < hi; ++x) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) e[v] += S[x - xs][threadIdx.x * VEC + v];
      }
    }
    __syncthreads();  // S is overwritten by the next pass
  }
  if (!active) return;
  if (y1 > y0) {  // not a prefix token: the area average
    const float inv = 1.f / static_cast<float>((y1 - y0) * (x1 - x0));
#pragma unroll
    for (int v = 0; v < VEC; ++v) e[v] *= inv;
  }
  const int64_t t = t0 + threadIdx.y;
  const TX* __restrict__ x = static_cast<const TX*>(a.x);
  TO* __restrict__ out = static_cast<TO*>(a.out);
  const int64_t b_begin = static_cast<int64_t>(blockIdx.z) * batch_per_block;
  const int64_t b_end = b_begin + batch_per_block < a.B ? b_begin + batch_per_block : a.B;
  for (int64_t b = b_begin; b < b_end; ++b)
    store_sum<TX, TO, VEC>(x, b * a.x_stride[0] + t * a.x_stride[1], c0, a.x_stride[2], out,
                           (b * a.n + t) * a.C + c0, e);
}

template <typename TX, typename TO>
void launch_grid_fwd(const PosEmbedGridFwdArgs& a, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TX);
  const bool vec = token_packs_fit<TX, TO, kVec>(a.x, a.x_stride, a.C, a.out);
  // 16-byte loads of 8 cells: unit cell stride, rows and channels on 8-cell (16- or
  // 32-byte) boundaries; the chunks' cell ranges are then multiples of 8 too.
  const bool grid_vec = a.grid_stride[2] == 1 && a.grid_stride[1] % 8 == 0 && a.grid_stride[0] % 8 == 0 &&
                        a.Gw % 8 == 0 && aligned(a.grid, 16);
  const int channels = kGridLanes * (vec ? kVec : 1);
  const unsigned gy = ceil_div(a.C, channels);
  // Each block reuses its embedding for its slice of the batch (grid.z); each slice
  // reads the grid again (from L2), at most about 5% of x's bytes.
  const int64_t grid_bytes = a.C * a.Gh * a.Gw * (a.grid_dtype == DType::kFloat32 ? 4 : 2);
  const int64_t max_slices = 1 + a.B * a.n * a.C * static_cast<int64_t>(sizeof(TX)) / (10 * grid_bytes);
  const int64_t per_block = batch_per_block(a.Q * gy, a.B, int64_t(kGridBlocksPerSM) * num_sms(device), max_slices);
  const dim3 grid(static_cast<unsigned>(a.Q), gy, static_cast<unsigned>((a.B + per_block - 1) / per_block));
  const dim3 block(kGridLanes, kGridChunkTokens);
  if (vec && grid_vec)
    pos_embed_grid_fwd_kernel<TX, TO, kVec, true><<<grid, block, 0, stream>>>(a, per_block);
  else if (vec)
    pos_embed_grid_fwd_kernel<TX, TO, kVec, false><<<grid, block, 0, stream>>>(a, per_block);
  else if (grid_vec)
    pos_embed_grid_fwd_kernel<TX, TO, 1, true><<<grid, block, 0, stream>>>(a, per_block);
  else
    pos_embed_grid_fwd_kernel<TX, TO, 1, false><<<grid, block, 0, stream>>>(a, per_block);
  check_last_launch("pos_embed_grid_fwd_kernel");
}

constexpr int kBwdMaxRows = 4;  // tokens per block, chosen for whole waves

// Per token of the block's rows, the batch sum of its gradient (batch_row_sums) into
// the fp32 workspace. 32 registers (8 blocks per SM: the thread limit binds on
// sm_80 / sm_90) spill nothing there.
template <typename TG, int VEC>
__global__ void __launch_bounds__(kRowSumThreads, 8)
    pos_embed_bwd_tokens_kernel(const PosEmbedBwdArgs a, int64_t rows_per_block) {
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t t1 = t0 + rows_per_block < a.n ? t0 + rows_per_block : a.n;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kRowSumThreadsX + threadIdx.x) * VEC;
  const auto store = [&](int64_t t, const float (&sum)[VEC]) {
    float* out = a.gtok + t * a.C + c0;
    if constexpr (VEC > 1) {
      // VEC is 4 or 8 here; the host guarantees a 16-byte aligned workspace.
#pragma unroll
      for (int v = 0; v < VEC; v += 4)
        *reinterpret_cast<Pack<float, 4>*>(out + v) = Pack<float, 4>{{sum[v], sum[v + 1], sum[v + 2], sum[v + 3]}};
    } else {
      out[0] = sum[0];
    }
  };
  batch_row_sums<TG, VEC>(static_cast<const TG*>(a.grad), a.grad_stride, a.B, t0, t1, c0, c0 < a.C, store);
}

// Each thread owns VEC consecutive channels of one table row (VEC = 4: one 16-byte
// load per token that reads the row).
template <int VEC>
__global__ void pos_embed_bwd_table_kernel(const PosEmbedBwdArgs a) {
  const int64_t k = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= a.C) return;
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  for (int j = a.tptr[k]; j < a.tptr[k + 1]; ++j) {
    const int64_t t = static_cast<int64_t>(a.ttok[j]) - a.start;
    if (t < 0 || t >= a.n) continue;  // tokens outside the window: no gradient
    const float w = a.tw[j];
    const float* row = a.gtok + t * a.C + c0;
    if constexpr (VEC > 1) {
      // Host guarantees C % VEC == 0 and a 16-byte aligned workspace.
      const Pack<float, VEC> p = *reinterpret_cast<const Pack<float, VEC>*>(row);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += w * p.v[v];
    } else {
      acc[0] += w * row[0];
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) store_any(a.dtable, k * a.C + c0 + v, a.dtable_dtype, acc[v]);
}

}  // namespace

void pos_embed_add_fwd(const PosEmbedFwdArgs& a, int device, cudaStream_t stream) {
  POSENC_CHECK_ARG(a.B >= 0 && a.n >= 0 && a.C > 0 && a.start >= 0, "pos_embed_add_fwd: bad sizes");
  // Empty x / out have null data pointers: nothing to do, and no error.
  if (a.B == 0 || a.n == 0) return;
  POSENC_CHECK_ARG(a.x && a.out && (!a.table || (a.ptr && a.idx && a.w)) && (!a.coords || a.desc),
                   "pos_embed_add_fwd: null pointer");
  set_device(device);
  dispatch_x_out(a.x_dtype, a.out_dtype, [&](auto tx, auto to) {
    launch_fwd<decltype(tx), decltype(to)>(a, device, stream);
  });
}

void pos_embed_add_grid_fwd(const PosEmbedGridFwdArgs& a, int device, cudaStream_t stream) {
  POSENC_CHECK_ARG(a.B >= 0 && a.n >= 0 && a.C > 0 && a.Gh > 0 && a.Gw > 0 && a.Q >= 0,
                   "pos_embed_add_grid_fwd: bad sizes");
  // Empty x / out have null data pointers: nothing to do, and no error.
  if (a.B == 0 || a.n == 0) return;
  POSENC_CHECK_ARG(a.x && a.out && a.grid && a.chunks && a.Q > 0, "pos_embed_add_grid_fwd: null pointer");
  set_device(device);
  dispatch_x_out(a.x_dtype, a.out_dtype, [&](auto tx, auto to) {
    launch_grid_fwd<decltype(tx), decltype(to)>(a, device, stream);
  });
}

void pos_embed_add_bwd(const PosEmbedBwdArgs& a, int device, cudaStream_t stream) {
  POSENC_CHECK_ARG(a.B >= 0 && a.n >= 0 && a.C > 0 && a.K >= 0 && a.start >= 0, "pos_embed_add_bwd: bad sizes");
  // An empty window has a null gradient and workspace; the table rows (zeros) are still written.
  POSENC_CHECK_ARG((a.K == 0 || (a.dtable && a.tptr)) && (a.n == 0 || a.gtok) && (a.B * a.n == 0 || a.grad),
                   "pos_embed_add_bwd: null pointer");
  set_device(device);
  const bool ws_aligned = aligned(a.gtok, 16);
  if (a.n > 0) {
    dispatch_dtype(a.grad_dtype, "grad", [&](auto tg) {
      using TG = decltype(tg);
      constexpr int kVec = 16 / sizeof(TG);
      const bool vec = vector_rows(a.grad, a.grad_stride, a.C, kVec, 16) && ws_aligned;
      const auto kernel = vec ? &pos_embed_bwd_tokens_kernel<TG, kVec> : &pos_embed_bwd_tokens_kernel<TG, 1>;
      const unsigned gy = ceil_div(a.C, kRowSumThreadsX * (vec ? kVec : 1));
      const int64_t rows = rows_per_block(gy, a.n, resident_slots(kernel, kRowSumThreads, device), kBwdMaxRows);
      kernel<<<dim3(ceil_div(a.n, rows), gy), dim3(kRowSumThreadsX, kRowSumLanes), 0, stream>>>(a, rows);
      check_last_launch("pos_embed_bwd_tokens_kernel");
    });
  }
  if (a.K > 0) {
    // gtok is the caller's fp32 (n, C) workspace: 16-byte rows when C % 4 == 0.
    constexpr int kTableVec = 4;
    const int vec_width = a.C % kTableVec == 0 && ws_aligned ? kTableVec : 1;
    const int64_t lanes = (a.C + vec_width - 1) / vec_width;
    const int bx = static_cast<int>(std::min<int64_t>(128, ((lanes + 31) / 32) * 32));
    const dim3 grid(static_cast<unsigned>(a.K), ceil_div(lanes, bx));
    if (vec_width > 1)
      pos_embed_bwd_table_kernel<kTableVec><<<grid, bx, 0, stream>>>(a);
    else
      pos_embed_bwd_table_kernel<1><<<grid, bx, 0, stream>>>(a);
    check_last_launch("pos_embed_bwd_table_kernel");
  }
}

}  // namespace posenc
