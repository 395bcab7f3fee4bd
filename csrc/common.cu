#include "posenc_fast/common.h"

namespace posenc {

void set_device(int device) {
  int current = -1;
  POSENC_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) POSENC_CUDA_CHECK(cudaSetDevice(device));
}

void check_last_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("posenc_fast CUDA error in ") + kernel_name + ": " +
                             cudaGetErrorString(err));
}

}  // namespace posenc
