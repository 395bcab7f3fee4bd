#include "posenc_fast/qkv_proj.h"

#include <algorithm>

#include "bindings.h"

namespace posenc_bind {

namespace {

// coords (B|1, L, A) strides (batch, token, axis) and freqs (H|1, A, D/2) strides
// (head, axis); a null coords pointer means no rotation.
posenc::QkvRopeArgs rope_args(std::uintptr_t coords, const std::vector<int64_t>& coords_stride,
                              std::uintptr_t freqs, const std::vector<int64_t>& freqs_stride, int num_axes,
                              bool half_pairing) {
  POSENC_CHECK_ARG(coords_stride.size() == 3 && freqs_stride.size() == 2,
                   "qkv_proj: coords_stride needs 3 entries and freqs_stride 2");
  posenc::QkvRopeArgs r{};
  r.coords = static_cast<const float*>(cptr(coords));
  std::copy(coords_stride.begin(), coords_stride.end(), r.coords_stride);
  r.freqs = static_cast<const float*>(cptr(freqs));
  std::copy(freqs_stride.begin(), freqs_stride.end(), r.freqs_stride);
  r.num_axes = num_axes;
  r.half_pairing = half_pairing;
  return r;
}

void copy4(const std::vector<int64_t>& v, int64_t* out, const char* name) {
  POSENC_CHECK_ARG(v.size() == 4, std::string("qkv_proj_bwd: ") + name + " needs 4 entries (B, H, L, D)");
  std::copy(v.begin(), v.end(), out);
}

}  // namespace

void bind_qkv_proj(py::module_& m) {
  m.def(
      "qkv_proj_fwd",
      [](std::uintptr_t qkv, int64_t qkv_row_stride, std::uintptr_t bias, int dtype, std::uintptr_t q_scale,
         std::uintptr_t coords, std::vector<int64_t> coords_stride, std::uintptr_t freqs,
         std::vector<int64_t> freqs_stride, int num_axes, bool half_pairing, std::uintptr_t q, std::uintptr_t k,
         std::uintptr_t v, std::uintptr_t rstd, int64_t B, int64_t L, int64_t H, int64_t D, int device,
         std::uintptr_t stream) {
        posenc::QkvProjFwdArgs a{};
        a.qkv = cptr(qkv); a.qkv_row_stride = qkv_row_stride;
        a.bias = cptr(bias); a.dtype = as_dtype(dtype);
        a.q_scale = static_cast<const float*>(cptr(q_scale));
        a.rope = rope_args(coords, coords_stride, freqs, freqs_stride, num_axes, half_pairing);
        a.q = mptr(q); a.k = mptr(k); a.v = mptr(v);
        a.rstd = static_cast<float*>(mptr(rstd));
        a.B = B; a.L = L; a.H = H; a.D = D;
        py::gil_scoped_release nogil;
        posenc::qkv_proj_fwd(a, device, as_stream(stream));
      },
      py::arg("qkv"), py::arg("qkv_row_stride"), py::arg("bias"), py::arg("dtype"), py::arg("q_scale"),
      py::arg("coords"), py::arg("coords_stride"), py::arg("freqs"), py::arg("freqs_stride"), py::arg("num_axes"),
      py::arg("half_pairing"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("rstd"), py::arg("B"),
      py::arg("L"), py::arg("H"), py::arg("D"), py::arg("device"), py::arg("stream"),
      "packed qkv GEMM output -> bias, l2 norm, q_scale, rope, (B, H, L, D) q, k, v (see qkv_proj.h)");

  m.def("qkv_proj_bwd_rows_per_chunk", &posenc::qkv_proj_bwd_rows_per_chunk,
        "tokens per chunk of the backward's partial sums");

  m.def(
      "qkv_proj_bwd",
      [](std::uintptr_t dq, std::vector<int64_t> dq_stride, std::uintptr_t dk, std::vector<int64_t> dk_stride,
         std::uintptr_t dv, std::vector<int64_t> dv_stride, std::uintptr_t q, std::uintptr_t k, int dtype,
         std::uintptr_t rstd, std::uintptr_t q_scale, std::uintptr_t coords, std::vector<int64_t> coords_stride,
         std::uintptr_t freqs, std::vector<int64_t> freqs_stride, int num_axes, bool half_pairing,
         std::uintptr_t dqkv, std::uintptr_t dbias_part, std::uintptr_t dscale_part, std::uintptr_t dfreqs_part,
         int64_t B, int64_t L, int64_t H, int64_t D, int device, std::uintptr_t stream) {
        posenc::QkvProjBwdArgs a{};
        a.dq = cptr(dq); copy4(dq_stride, a.dq_stride, "dq_stride");
        a.dk = cptr(dk); copy4(dk_stride, a.dk_stride, "dk_stride");
        a.dv = cptr(dv); copy4(dv_stride, a.dv_stride, "dv_stride");
        a.q = cptr(q); a.k = cptr(k); a.dtype = as_dtype(dtype);
        a.rstd = static_cast<const float*>(cptr(rstd));
        a.q_scale = static_cast<const float*>(cptr(q_scale));
        a.rope = rope_args(coords, coords_stride, freqs, freqs_stride, num_axes, half_pairing);
        a.dqkv = mptr(dqkv);
        a.dbias_part = static_cast<float*>(mptr(dbias_part));
        a.dscale_part = static_cast<float*>(mptr(dscale_part));
        a.dfreqs_part = static_cast<float*>(mptr(dfreqs_part));
        a.B = B; a.L = L; a.H = H; a.D = D;
        py::gil_scoped_release nogil;
        posenc::qkv_proj_bwd(a, device, as_stream(stream));
      },
      py::arg("dq"), py::arg("dq_stride"), py::arg("dk"), py::arg("dk_stride"), py::arg("dv"), py::arg("dv_stride"),
      py::arg("q"), py::arg("k"), py::arg("dtype"), py::arg("rstd"), py::arg("q_scale"), py::arg("coords"),
      py::arg("coords_stride"), py::arg("freqs"), py::arg("freqs_stride"), py::arg("num_axes"),
      py::arg("half_pairing"), py::arg("dqkv"), py::arg("dbias_part"), py::arg("dscale_part"),
      py::arg("dfreqs_part"), py::arg("B"), py::arg("L"), py::arg("H"), py::arg("D"), py::arg("device"),
      py::arg("stream"),
      "dq, dk, dv -> packed dqkv and partial sums of dbias, dq_scale, dfreqs (see qkv_proj.h)");
}

}  // namespace posenc_bind
