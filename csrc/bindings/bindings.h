// Thin pybind11 layer over the torch-agnostic core: each op family registers its
// functions from its own file. Pointers and streams arrive as integers.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "posenc_fast/common.h"

namespace posenc_bind {

namespace py = pybind11;

inline const void* cptr(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
inline void* mptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline posenc::DType as_dtype(int code) {
  POSENC_CHECK_ARG(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<posenc::DType>(code);
}

void bind_pyramid_pos_level_add(py::module_& m);
void bind_rope(py::module_& m);
void bind_qkv_proj(py::module_& m);

}  // namespace posenc_bind
