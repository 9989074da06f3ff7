// A CPU stand-in for the CUDA runtime, enough to compile this project's kernels (csrc/cuda/*.cu)
// with a host C++ compiler and run them: every thread of a block is an OS thread, blocks run
// one after another. __syncthreads and the warp shuffles are barriers over those threads.
// It checks the kernels' logic (indexing, staging, barriers, shuffles, what gets written)
// on machines without a GPU; it says nothing about speed, and it is only as faithful as the
// semantics written here (float arithmetic on the host, ex2.approx as exp2f).
//
// Each launch also counts what its threads did (`Counts` below: exponentials, shuffles,
// barriers, atomics, each per thread that called it) and prints the counts after the grid
// has run, so that tests can hold the kernels to per-element budgets.
//
// Used by tests/test_cuda_emulated.py through emulate_scan.cpp; not part of the package.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// The emulated device's shared memory: as on an H100 / H200 by default (228 KB per
// multiprocessor, 227 KB per block with opt-in, 1 KB of each block's reserved), or as set by
// CUDA_EMU_SMEM_KB="PER_SM,PER_BLOCK" (tests emulate smaller devices with it). A launch
// asking for more than the default 48 KB must have opted in (cudaFuncSetAttribute) first.
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrReservedSharedMemoryPerBlock,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
namespace cuda_emu {
constexpr int kDefaultSmemBytes = 48 * 1024;
struct SmemLimits {
  int per_sm = 228 * 1024, per_block = 227 * 1024, reserved = 1024;
};
inline SmemLimits smem_limits() {
  SmemLimits limits;
  if (const char* kb = std::getenv("CUDA_EMU_SMEM_KB")) {
    int per_sm = 0, per_block = 0;
    if (std::sscanf(kb, "%d,%d", &per_sm, &per_block) != 2 || per_sm <= 0 || per_block <= 0) {
      std::fprintf(stderr, "cuda_emu: CUDA_EMU_SMEM_KB expected 'PER_SM,PER_BLOCK', got '%s'\n", kb);
      std::abort();
    }
    limits.per_sm = per_sm * 1024, limits.per_block = per_block * 1024;
  }
  return limits;
}
// Dynamic shared memory each kernel has opted in to (keyed by its address).
inline std::map<const void*, int>& opt_ins() {
  static std::map<const void*, int> sizes;
  return sizes;
}
}  // namespace cuda_emu
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const cuda_emu::SmemLimits limits = cuda_emu::smem_limits();
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin     ? limits.per_block
           : attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? limits.per_sm
                                                                 : limits.reserved;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
  if (bytes > cuda_emu::smem_limits().per_block) return cudaErrorInvalidValue;
  cuda_emu::opt_ins()[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "invalid value" : "no error"; }

using std::max;
using std::min;

namespace cuda_emu {

constexpr int kWarp = 32;

// What one launch's threads did, each call by each thread counted once: exponentials (the
// kernels' ex2.approx, exp2f here: exp2_approx in scan_cuda_common.cuh; the exact exp and
// expm1 of scan_math.h, once per modality, row and step in the backward's gate and
// softplus derivative, are not counted), warp shuffles, block barriers (__syncthreads) and
// atomic adds. Each thread counts its own and adds them to the launch's when it ends.
struct Counts {
  int64_t exponentials = 0, shuffles = 0, barriers = 0, atomics = 0;
};
inline thread_local Counts thread_counts;

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  uint64_t slots[kWarp] = {};
};

struct Block {
  Block(int threads, size_t smem_bytes) : barrier(threads) {
    for (int w = 0; w < (threads + kWarp - 1) / kWarp; ++w)
      warps.push_back(std::make_unique<Warp>(std::min(kWarp, threads - w * kWarp)));
    // Dynamic shared memory starts as NaN: a kernel reading what it did not stage gets NaN
    // into its outputs. Sized exactly, so that AddressSanitizer sees any overrun.
    const size_t words = (smem_bytes + 3) / 4;
    smem.reset(new float[words == 0 ? 1 : words]);
    for (size_t i = 0; i < words; ++i) smem[i] = std::nanf("");
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<float[]> smem;
};

inline thread_local Block* current_block = nullptr;

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current_block->smem.get());
}

}  // namespace cuda_emu

inline thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emu {
inline Warp& my_warp() { return *current_block->warps[threadIdx.x / kWarp]; }

// Every lane writes its value, waits for the warp, reads its source lane's, waits again (so
// that no lane overwrites a slot another has not read yet).
template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  ++thread_counts.shuffles;
  Warp& w = my_warp();
  const int lane = threadIdx.x % kWarp;
  std::memcpy(&w.slots[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &w.slots[src_lane], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}
}  // namespace cuda_emu

inline void __syncthreads() {
  ++cuda_emu::thread_counts.barriers;
  cuda_emu::current_block->barrier.arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emu::my_warp().barrier.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = threadIdx.x % cuda_emu::kWarp;
  const int src = lane ^ lane_mask;
  return cuda_emu::exchange(v, (src / width == lane / width) ? src : lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = threadIdx.x % cuda_emu::kWarp;
  const int src = (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return cuda_emu::exchange(v, src);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = threadIdx.x % cuda_emu::kWarp;
  const int src = (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return cuda_emu::exchange(v, src);
}

template <typename T>
T __ldg(const T* p) { return *p; }
inline int __ffs(int x) { return __builtin_ffs(x); }

namespace cuda_emu {
// Two switches for testing sums that must not depend on the order in which blocks run:
// CUDA_EMU_BLOCK_ORDER=reverse runs a grid's blocks last to first, and CUDA_EMU_ONE_ADD=1
// aborts when one launch's atomicAdd reaches an address a second time (an add onto zero is
// exact, so an address that receives one add holds the same bits in any order).
inline bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::string(set) == value;
}
struct AddedAddresses {
  std::mutex mutex;
  std::set<const void*> seen;
};
inline AddedAddresses& added_addresses() {
  static AddedAddresses added;
  return added;
}
}  // namespace cuda_emu

inline float atomicAdd(float* p, float v) {
  ++cuda_emu::thread_counts.atomics;
  static const bool one_add = cuda_emu::env_is("CUDA_EMU_ONE_ADD", "1");
  if (one_add) {
    cuda_emu::AddedAddresses& added = cuda_emu::added_addresses();
    const std::lock_guard<std::mutex> lock(added.mutex);
    if (!added.seen.insert(p).second) {
      std::fprintf(stderr, "cuda_emu: a second atomicAdd to address %p (CUDA_EMU_ONE_ADD=1)\n",
                   static_cast<void*>(p));
      std::abort();
    }
  }
  return std::atomic_ref<float>(*p).fetch_add(v);
}

namespace cuda_emu {
// Runs `kernel(args...)` on every thread of every block of the grid, blocks in turn (first
// to last, or last to first with CUDA_EMU_BLOCK_ORDER=reverse).
struct Launch {
  int64_t grid;
  int threads;
  size_t smem_bytes;
  template <typename Kernel>
  auto of(Kernel kernel) {
    return [=, *this](auto... args) {
      // What a real launch would refuse, refused loudly: more than 1024 threads, more
      // shared memory than the device gives a block, or more than 48 KB without opt-in.
      const auto opted = opt_ins().find(reinterpret_cast<const void*>(kernel));
      const size_t allowed = opted == opt_ins().end() ? kDefaultSmemBytes : opted->second;
      if (threads < 1 || threads > 1024 || smem_bytes > allowed ||
          smem_bytes > static_cast<size_t>(smem_limits().per_block)) {
        std::fprintf(stderr, "cuda_emu: launch of %d threads with %zu bytes of shared memory "
                     "(allowed: %zu)\n", threads, smem_bytes, allowed);
        std::abort();
      }
      // On stdout, for tests that check which plan ran.
      std::printf("launch: %lld blocks of %d threads, %zu bytes of shared memory\n",
                  static_cast<long long>(grid), threads, smem_bytes);
      std::fflush(stdout);
      added_addresses().seen.clear();
      Counts counts;
      std::mutex counts_mutex;
      const bool reverse = env_is("CUDA_EMU_BLOCK_ORDER", "reverse");
      for (int64_t i = 0; i < grid; ++i) {
        const int64_t bx = reverse ? grid - 1 - i : i;
        Block block(threads, smem_bytes);
        std::vector<std::thread> pool;
        for (int tx = 0; tx < threads; ++tx)
          pool.emplace_back([&, tx, bx] {
            current_block = &block;
            threadIdx = {static_cast<unsigned>(tx), 0, 0};
            blockIdx = {static_cast<unsigned>(bx), 0, 0};
            blockDim = {static_cast<unsigned>(threads), 1, 1};
            gridDim = {static_cast<unsigned>(grid), 1, 1};
            thread_counts = Counts{};
            kernel(args...);
            {
              const std::lock_guard<std::mutex> lock(counts_mutex);
              counts.exponentials += thread_counts.exponentials;
              counts.shuffles += thread_counts.shuffles;
              counts.barriers += thread_counts.barriers;
              counts.atomics += thread_counts.atomics;
            }
            // A finished thread no longer counts at the barriers of those still running.
            block.warps[tx / kWarp]->barrier.arrive_and_drop();
            block.barrier.arrive_and_drop();
          });
        for (auto& t : pool) t.join();
      }
      std::printf("counts: exponentials %lld shuffles %lld barriers %lld atomics %lld\n",
                  static_cast<long long>(counts.exponentials),
                  static_cast<long long>(counts.shuffles),
                  static_cast<long long>(counts.barriers), static_cast<long long>(counts.atomics));
      std::fflush(stdout);
    };
  }
};
}  // namespace cuda_emu

// The kernels' ex2.approx off the device (exp2_approx, scan_cuda_common.cuh) is exp2f:
// counted here. Defined after every standard header the kernels use has been included.
namespace cuda_emu {
inline float counted_exp2f(float x) {
  ++thread_counts.exponentials;
  return std::exp2(x);
}
}  // namespace cuda_emu
#define exp2f(x) ::cuda_emu::counted_exp2f(x)

#define CM_DYNAMIC_SMEM(type, name) type* name = ::cuda_emu::dynamic_smem<type>()
#define CM_LAUNCH(grid, block, smem_bytes, stream, ...) \
  ::cuda_emu::Launch{static_cast<int64_t>(grid), static_cast<int>(block), static_cast<size_t>(smem_bytes)}.of(__VA_ARGS__)
