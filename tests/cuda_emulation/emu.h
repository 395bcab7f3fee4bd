// Host emulation of the CUDA features the posenc_fast kernels use, for testing their
// logic on machines without a GPU (see tests/test_cuda_emulation.py for what this can
// and cannot verify). prep.py rewrites a .cu file so that it compiles as host C++
// with this header force-included first.
//
// Execution model: the blocks of a launch run one after another; the threads of a
// block run concurrently as std::threads (created once per launch and reused for
// every block), so __syncthreads is a real barrier and nothing runs in warp
// lock-step: a kernel that relies on implicit warp synchrony fails here.
// Shared memory is fresh per block and filled with 0xff bytes (NaN as float); static
// __shared__ arrays also report reads of unwritten elements and races between the
// threads of a block (EmuShared). Dynamic (extern) shared memory is plain memory.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The toolkit headers define these for nvcc's host pass; here everything is host code.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

using std::max;
using std::min;

inline constexpr size_t kEmuSharedLimit = 48 * 1024;  // per block without an opt-in attribute

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// State of the block being run; reset by the launching thread between blocks.
struct EmuBlock {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<float> exchange;         // [warps * 32] shuffle values
  std::unique_ptr<std::atomic<bool>[]> running;  // per thread, false once it returned from the kernel
  std::mutex mu;
  std::vector<std::unique_ptr<unsigned char[]>> statics;  // static __shared__ arrays, in declaration order
  size_t static_bytes = 0;
  std::vector<unsigned char> dyn;  // extern __shared__ memory

  void reset(int threads, size_t dyn_bytes) {
    const int warps = (threads + 31) / 32;
    bar = std::make_unique<std::barrier<>>(threads);
    warp_bars.clear();
    for (int w = 0; w < warps; ++w) warp_bars.emplace_back(new std::barrier<>(std::min(32, threads - w * 32)));
    exchange.assign(warps * 32, NAN);
    running.reset(new std::atomic<bool>[threads]);
    for (int t = 0; t < threads; ++t) running[t] = true;
    statics.clear();
    static_bytes = 0;
    dyn.assign(2 * dyn_bytes + 16, 0xff);  // doubled like the static arrays
  }
};

inline EmuBlock emu_block;
inline thread_local int emu_static_index = 0;
inline thread_local int emu_thread = 0;  // linear thread index in the block

// Misuse of CUDA that a GPU would report (bad launch configuration, too much shared
// memory, partial-warp shuffles); posenc::check_last_launch turns it into an error.
inline std::mutex emu_error_mu;
inline std::string emu_first_error;
inline std::atomic<int> emu_error_count{0};
inline void emu_error(const std::string& what) {
  std::lock_guard<std::mutex> g(emu_error_mu);
  if (emu_error_count++ == 0)
    emu_first_error = what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                      std::to_string(blockIdx.z) + ", thread " + std::to_string(emu_thread) + ")";
}

// Names (with template arguments) of the kernels that ran, so tests can check which
// variant a configuration exercised.
inline std::mutex emu_kernels_mu;
inline std::set<std::string> emu_kernels;

// Dry launches (tools/kernel_report.py): each launch records its kernel, grid, block
// and dynamic shared memory, as the host code computed them, and runs nothing: the
// kernel body stops at its first statement (emu_note_kernel).
struct EmuDryStop {};
inline bool emu_dry = false;
inline thread_local std::string emu_dry_name;
inline std::vector<std::string> emu_launches;

inline void emu_note_kernel(const char* name) {
  if (emu_dry) {
    emu_dry_name = name;
    throw EmuDryStop{};
  }
  std::lock_guard<std::mutex> g(emu_kernels_mu);
  emu_kernels.insert(name);
}

inline int emu_num_sms = 132;

// Barrier intervals a thread has completed in the current block.
inline thread_local int emu_epoch = 0;
inline void __syncthreads() {
  emu_block.bar->arrive_and_wait();
  ++emu_epoch;
}

// Element of a static __shared__ array (prep.py wraps their element type in this):
// remembers its last writer and reader per barrier interval, so a read of a value
// another thread wrote in the same interval, two writers, or a write after another
// thread's read without a __syncthreads in between is reported as a race, whatever
// order the host threads happened to run in. Storage starts as 0xff bytes: epoch -1
// means never written.
inline std::mutex emu_shared_mu;
template <class T>
struct EmuShared {
  T v;
  int writer, write_epoch, reader, read_epoch;  // reader -2: several threads read

  operator T() {
    std::lock_guard<std::mutex> g(emu_shared_mu);
    if (write_epoch == -1) emu_error("read of shared memory no thread wrote");
    else if (write_epoch == emu_epoch && writer != emu_thread)
      emu_error("shared memory race: read of another thread's write without a barrier in between");
    if (read_epoch != emu_epoch) {
      read_epoch = emu_epoch;
      reader = emu_thread;
    } else if (reader != emu_thread) {
      reader = -2;
    }
    return v;
  }
  EmuShared& operator=(T x) {
    std::lock_guard<std::mutex> g(emu_shared_mu);
    if (write_epoch == emu_epoch && writer != emu_thread)
      emu_error("shared memory race: two threads write without a barrier in between");
    if (read_epoch == emu_epoch && reader != emu_thread)
      emu_error("shared memory race: write after another thread's read without a barrier in between");
    write_epoch = emu_epoch;
    writer = emu_thread;
    v = x;
    return *this;
  }
  EmuShared& operator+=(T x) { return *this = static_cast<T>(*this) + x; }
};

// prep.py turns `__shared__ T name[a][b];` into a reference to emu_shared<T[a][b]>():
// the i-th declaration a thread meets maps to the i-th buffer of the block (all
// threads meet them in the same order), 16-byte aligned like real shared memory.
template <class T>
T* emu_shared() {
  EmuBlock& b = emu_block;
  const int i = emu_static_index++;
  std::lock_guard<std::mutex> g(b.mu);
  if ((int)b.statics.size() <= i) {
    b.statics.resize(i + 1);
    // Twice the size: an off-by-one index (which -fsanitize=bounds reports) lands in
    // memory of the emulator's own instead of corrupting the heap.
    b.statics[i].reset(new unsigned char[2 * sizeof(T) + 16]);
    memset(b.statics[i].get(), 0xff, 2 * sizeof(T) + 16);
    using Element = std::remove_all_extents_t<T>;  // EmuShared<U>: the GPU stores only U
    b.static_bytes += sizeof(T) / sizeof(Element) * sizeof(decltype(std::declval<Element&>().v));
    if (b.static_bytes + (b.dyn.size() - 16) / 2 > kEmuSharedLimit) emu_error("more than 48 KiB of shared memory");
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.statics[i].get());
  return reinterpret_cast<T*>((p + 15) & ~uintptr_t(15));
}

inline void* emu_dyn_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(emu_block.dyn.data());
  return reinterpret_cast<void*>((p + 15) & ~uintptr_t(15));
}

// Warp shuffles exchange through the block's buffer between two warp barriers. Only
// full-mask shuffles with every lane of the warp still running are modelled; any
// other use is reported as an error rather than guessed at.
inline float emu_shfl(unsigned mask, float v, int src_lane) {
  EmuBlock& b = emu_block;
  const int w = emu_thread / 32, lane = emu_thread % 32;
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int lanes = std::min(32, threads - w * 32);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  unsigned live = 0;
  for (int l = 0; l < lanes; ++l)
    if (b.running[w * 32 + l]) live |= 1u << l;
  if (mask != full || live != full) emu_error("warp shuffle with a partial mask or exited lanes");
  b.exchange[w * 32 + lane] = v;
  b.warp_bars[w]->arrive_and_wait();
  const float r = (src_lane >= 0 && src_lane < lanes) ? b.exchange[w * 32 + src_lane] : v;
  b.warp_bars[w]->arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  const int lane = emu_thread % 32;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu_shfl(mask, v, src);
}
inline float __shfl_sync(unsigned mask, float v, int src_lane, int width = 32) {
  const int lane = emu_thread % 32;
  return emu_shfl(mask, v, (lane & ~(width - 1)) + (src_lane % width));
}
inline float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width = 32) {
  const int lane = emu_thread % 32;
  int src = lane + static_cast<int>(delta);
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu_shfl(mask, v, src);
}

// prep.py routes every reinterpret_cast through here. A GPU faults on a vector access
// (e.g. a 16-byte Pack) at an address that is not a multiple of its alignment; the
// host would mostly not notice, or crash the test process. Such an access is reported
// (check_last_launch then throws) and redirected to a scratch buffer.
alignas(64) inline thread_local unsigned char emu_scratch[256];
template <class To, class From>
To emu_reinterpret_cast(From p) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using Pointee = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<Pointee>) {
      static_assert(sizeof(Pointee) <= sizeof(emu_scratch), "enlarge emu_scratch");
      if (reinterpret_cast<uintptr_t>(p) % alignof(Pointee) != 0) {
        emu_error("misaligned access: " + std::to_string(sizeof(Pointee)) + "-byte type needing " +
                  std::to_string(alignof(Pointee)) + "-byte alignment at address % " +
                  std::to_string(alignof(Pointee)) + " = " +
                  std::to_string(reinterpret_cast<uintptr_t>(p) % alignof(Pointee)));
        memset(emu_scratch, 0xff, sizeof(emu_scratch));
        return reinterpret_cast<To>(emu_scratch);
      }
    }
  }
  return reinterpret_cast<To>(p);
}

// Only float shuffles are modelled; any other type fails to compile instead of
// silently going through float.
template <class T> T __shfl_xor_sync(unsigned, T, int, int = 32) = delete;
template <class T> T __shfl_sync(unsigned, T, int, int = 32) = delete;
template <class T> T __shfl_down_sync(unsigned, T, unsigned, int = 32) = delete;

// Round-to-nearest intrinsics: `volatile` keeps the compiler from contracting them into FMAs.
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}

inline cudaError_t emu_cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) {
    emu_error("unsupported cudaDeviceGetAttribute");
    return cudaErrorInvalidValue;
  }
  *v = emu_num_sms;
  return cudaSuccess;
}
#define cudaDeviceGetAttribute emu_cudaDeviceGetAttribute
#define cudaGetErrorString(e) "emulated CUDA error"

// The occupancy of a compiled kernel: the emulator has no registers, so the thread
// limit (2048 threads and 32 blocks per SM), as for a kernel of <= 32 registers.
template <class Kernel>
cudaError_t emu_cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads, size_t) {
  *blocks = std::min(32, 2048 / threads);
  return cudaSuccess;
}
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor emu_cudaOccupancyMaxActiveBlocksPerMultiprocessor

// kernel<<<grid, block, smem, stream>>>(args) becomes emu_launch(grid, block, smem, [&] { kernel(args); }).
template <class F>
void emu_launch(dim3 g, dim3 b, size_t smem, F&& body) {
  const long long threads = (long long)b.x * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535) return emu_error("invalid grid");
  if (threads == 0 || threads > 1024 || b.z > 64) return emu_error("invalid block");
  if (smem > kEmuSharedLimit) return emu_error("more than 48 KiB of dynamic shared memory");
  gridDim = g;
  blockDim = b;
  if (emu_dry) {
    blockIdx = threadIdx = dim3(0, 0, 0);
    emu_dry_name.clear();
    try {
      body();
    } catch (const EmuDryStop&) {
    }
    emu_launches.push_back(emu_dry_name + "|" + std::to_string(g.x) + "," + std::to_string(g.y) + "," +
                           std::to_string(g.z) + "|" + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
                           std::to_string(b.z) + "|" + std::to_string(smem));
    return;
  }
  const int n = static_cast<int>(threads);
  const long long blocks = (long long)g.x * g.y * g.z;
  // Workers and this thread meet at `gate` before and after every block.
  std::barrier<> gate(n + 1);
  std::vector<std::thread> workers;
  workers.reserve(n);
  for (int t = 0; t < n; ++t) {
    workers.emplace_back([&, t] {
      emu_thread = t;
      threadIdx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
      for (long long k = 0; k < blocks; ++k) {
        gate.arrive_and_wait();
        blockIdx = dim3(k % g.x, (k / g.x) % g.y, k / ((long long)g.x * g.y));
        emu_static_index = 0;
        emu_epoch = 0;
        body();
        // A thread that returned no longer takes part in __syncthreads nor in its warp.
        emu_block.running[t] = false;
        emu_block.warp_bars[t / 32]->arrive_and_drop();
        emu_block.bar->arrive_and_drop();
        gate.arrive_and_wait();
      }
    });
  }
  for (long long k = 0; k < blocks; ++k) {
    emu_block.reset(n, smem);
    gate.arrive_and_wait();
    gate.arrive_and_wait();
  }
  for (auto& w : workers) w.join();
}

// The emulated replacements of csrc/common.cu.
namespace posenc {
inline void set_device(int) {}
// Not cached: tests change the SM count between calls.
inline int num_sms(int) { return emu_num_sms; }
inline void check_last_launch(const char* kernel_name) {
  std::lock_guard<std::mutex> g(emu_error_mu);
  if (emu_error_count == 0) return;
  const std::string msg = std::string("posenc_fast emulated launch of ") + kernel_name + " failed: " + emu_first_error;
  emu_error_count = 0;
  throw std::runtime_error(msg);
}
}  // namespace posenc
