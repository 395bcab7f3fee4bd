// Shared definitions of the posenc_fast CUDA core: torch-agnostic C-style API
// (raw pointers, sizes, element strides, dtype code, stream handle).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace posenc {

// Element types understood by every kernel; the binding maps framework dtypes to these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Argument errors become std::invalid_argument (ValueError in Python), CUDA
// errors std::runtime_error (RuntimeError), so no launch failure goes unnoticed.
#define POSENC_CHECK_ARG(cond, msg)                                                       \
  do {                                                                                    \
    if (!(cond)) throw std::invalid_argument(std::string("posenc_fast: ") + (msg));      \
  } while (0)

#define POSENC_CUDA_CHECK(expr)                                                           \
  do {                                                                                    \
    cudaError_t posenc_err_ = (expr);                                                     \
    if (posenc_err_ != cudaSuccess)                                                       \
      throw std::runtime_error(std::string("posenc_fast CUDA error: ") +                  \
                               cudaGetErrorString(posenc_err_) + " (" #expr ") at " +    \
                               __FILE__ + ":" + std::to_string(__LINE__));                \
  } while (0)

// Makes `device` current for the calling thread (no-op when it already is) so that
// launches land on the device of the tensors, whatever the caller's current device.
void set_device(int device);

// Checks the launch that was just issued (configuration errors, sticky errors).
void check_last_launch(const char* kernel_name);

// Streaming multiprocessors of `device`, cached: a device query per launch would cost
// more host time than a small kernel takes on the GPU.
int num_sms(int device);

}  // namespace posenc
