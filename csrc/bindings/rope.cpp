#include "posenc_fast/rope.h"

#include "bindings.h"

namespace posenc_bind {

namespace {

posenc::RopeTensor tensor4(std::uintptr_t ptr, const std::vector<int64_t>& strides, const char* name) {
  POSENC_CHECK_ARG(strides.size() == 4, std::string(name) + " needs 4 strides (B, H, L, D)");
  posenc::RopeTensor t;
  t.ptr = cptr(ptr);
  for (int d = 0; d < 4; ++d) t.stride[d] = strides[d];
  return t;
}

void copy3(const std::vector<int64_t>& src, int64_t (&dst)[3], const char* name) {
  POSENC_CHECK_ARG(src.size() == 3, std::string(name) + " needs 3 strides");
  for (int d = 0; d < 3; ++d) dst[d] = src[d];
}

}  // namespace

void bind_rope(py::module_& m) {
  m.def("rope_workspace_floats", &posenc::rope_workspace_floats, py::arg("B"), py::arg("Hq"), py::arg("Hk"),
        py::arg("L"), py::arg("D"), py::arg("A"), py::arg("per_head"),
        "floats of fp32 workspace the d freqs reduction of rope_apply needs");
  m.def(
      "rope_apply",
      [](std::uintptr_t q, const std::vector<int64_t>& q_strides, std::uintptr_t k,
         const std::vector<int64_t>& k_strides, std::uintptr_t q_out, const std::vector<int64_t>& q_out_strides,
         std::uintptr_t k_out, const std::vector<int64_t>& k_out_strides, std::uintptr_t q_saved,
         const std::vector<int64_t>& q_saved_strides, std::uintptr_t k_saved,
         const std::vector<int64_t>& k_saved_strides, int dtype, std::uintptr_t coords,
         const std::vector<int64_t>& coord_strides, std::uintptr_t freqs, const std::vector<int64_t>& freq_strides,
         int B, int Hq, int Hk, int L, int D, int A, bool per_head, bool interleaved, bool conjugate,
         std::uintptr_t workspace, std::uintptr_t dfreqs, int device, std::uintptr_t stream) {
        posenc::RopeArgs a;
        a.x[0] = tensor4(q, q_strides, "q");
        a.x[1] = tensor4(k, k_strides, "k");
        a.out[0] = tensor4(q_out, q_out_strides, "q_out");
        a.out[1] = tensor4(k_out, k_out_strides, "k_out");
        a.saved[0] = tensor4(q_saved, q_saved_strides, "q_saved");
        a.saved[1] = tensor4(k_saved, k_saved_strides, "k_saved");
        a.dtype = as_dtype(dtype);
        a.coords = static_cast<const float*>(cptr(coords));
        copy3(coord_strides, a.coord_stride, "coords");
        a.freqs = static_cast<const float*>(cptr(freqs));
        copy3(freq_strides, a.freq_stride, "freqs");
        a.B = B;
        a.Hq = Hq;
        a.Hk = Hk;
        a.L = L;
        a.D = D;
        a.A = A;
        a.per_head = per_head;
        a.interleaved = interleaved;
        a.conjugate = conjugate;
        a.workspace = static_cast<float*>(mptr(workspace));
        a.dfreqs = static_cast<float*>(mptr(dfreqs));
        posenc::rope_apply(a, device, as_stream(stream));
      },
      "Rotates q and k (or only q when Hk == 0) into q_out / k_out (may alias them); with dfreqs also "
      "reduces d freqs from the saved outputs (q/k are then the output gradients)");
}

}  // namespace posenc_bind
