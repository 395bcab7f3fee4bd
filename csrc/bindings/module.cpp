#include <cuda_runtime.h>

#include "bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "posenc_fast CUDA kernels (torch-agnostic: raw pointers, strides, dtype codes, streams)";
  m.attr("cuda_version") = POSENC_FAST_CUDA_VERSION;  // toolkit the library was built with
  m.attr("cuda_archs") = POSENC_FAST_CUDA_ARCHS;
  m.def("driver_version", []() {
    int v = 0;
    POSENC_CUDA_CHECK(cudaDriverGetVersion(&v));
    return v;  // 0 when no driver is installed
  }, "CUDA version the installed driver supports (e.g. 13000), 0 without a driver");
  // Each family's bindings live in csrc/bindings/<family>.cpp.
  posenc_bind::bind_pyramid_pos_level_add(m);
  posenc_bind::bind_rope(m);
  posenc_bind::bind_qkv_proj(m);
}
