// Rotary position embedding of q and k (SPEC §2.3), torch-agnostic C-style API.
//
// angle[b, h, l, j] = sum_a coords[b, l, a] * freqs[h, a, j]   (fp32, sincosf)
// pair j of a head: dims (2j, 2j+1) ("interleaved") or (j, j + D/2) ("half");
// (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), negated angle when `conjugate`.
// With A = 0 (a table-defined rotation), `coords` is a (2, B or 1, L, P) fp32 table
// of cos (plane 0) and sin (plane 1), coord_stride = (batch, token, plane) with unit
// pair stride; freqs, per_head and d freqs do not apply. With `full_table` it has 4
// planes, cos0, sin0, cos1, sin1: y0 = x0 cos0 - x1 sin0, y1 = x0 sin1 + x1 cos1
// (per-element tables, e.g. HF's (L, D) caches); `conjugate` applies the transpose.
#pragma once

#include <cstddef>
#include <cstdint>

#include "posenc_fast/common.h"

namespace posenc {

// A (B, H, L, D) tensor given by its data pointer and element strides.
struct RopeTensor {
  const void* ptr = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

struct RopeArgs {
  // Inputs, outputs (may equal the inputs: in place) and, for the d freqs reduction,
  // the saved forward outputs; index 0 is q, 1 is k (ignored when Hk == 0).
  RopeTensor x[2], out[2], saved[2];
  DType dtype = DType::kFloat32;      // of every tensor above
  const float* coords = nullptr;      // (B, L, A); batch stride 0 for shared coords
  int64_t coord_stride[3] = {0, 0, 0};
  const float* freqs = nullptr;       // (H, A, P); head stride 0 for shared freqs
  int64_t freq_stride[3] = {0, 0, 0};
  int B = 0, Hq = 0, Hk = 0, L = 0, D = 0, A = 0;
  bool per_head = false;              // freqs differ per head (then Hk is 0 or Hq)
  bool interleaved = true;
  bool conjugate = false;
  bool full_table = false;            // A = 0 only: a 4-plane table (see above)
  // d freqs: with x = the output gradients, also reduce
  // sum_{b, l, heads} (x1 * saved0 - x0 * saved1) * coords[b, l, a]
  // into dfreqs, (Hq, A, P) per head or (A, P), contiguous fp32. The reduction is
  // deterministic: per-block partials in `workspace` (rope_workspace_floats floats),
  // then a fixed-order sum. Both null to skip it.
  float* workspace = nullptr;
  float* dfreqs = nullptr;
};

// Floats of workspace the d freqs reduction needs for these shapes.
size_t rope_workspace_floats(int B, int Hq, int Hk, int L, int D, int A, bool per_head);

// Launches on `stream` of `device`; no host synchronisation, no allocation.
void rope_apply(const RopeArgs& args, int device, cudaStream_t stream);

}  // namespace posenc
