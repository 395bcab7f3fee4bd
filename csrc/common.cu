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

int num_sms(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 108;
  if (cached[device] == 0)
    POSENC_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device));
  return cached[device];
}

}  // namespace posenc
