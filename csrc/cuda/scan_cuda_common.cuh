// Device helpers shared by the CUDA forward and backward kernels.
//
// Thread mapping (docs/kernels.md): one channel (b, e) is a "row", owned by a segment of S
// consecutive lanes of one warp (S a power of two, at most 32). The row's time axis is cut
// into tiles of S·kItems steps; in a tile, segment lane l owns the kItems consecutive steps
// starting at l·kItems and keeps everything per (modality, step) in registers. The state
// index n is walked sequentially: for each n the coupled recurrence
//   G[t] = P[t]·G[t-1] + U[t],   P = Σ_m w_m·a_m,  U = Σ_m w_m·Δ_m·B_m·u_m
// is one scan over time, done as a sequential scan of the lane's own steps followed by a
// shuffle scan across the segment. The tile's state carries to the next tile through
// shared memory. All rows of a block share the batch index b, so that backward can sum
// dB and dC over the block's channels before its global atomics.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "coupled_mamba/params.h"
#include "coupled_mamba/scan_math.h"
#include "coupled_mamba/small_divisor.h"

namespace coupled_mamba {

// Two constructs go through macros so that the CPU emulator of tests/cuda_emulator, which
// defines them first, can compile the kernels with a host compiler: the dynamic
// shared-memory array and the launch (`CM_LAUNCH(grid, block, smem, stream, kernel)(args)`).
#ifndef CM_LAUNCH
#define CM_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#define CM_LAUNCH(grid, block, smem_bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, smem_bytes, stream>>>
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;
// Dynamic shared memory a block uses at most: the default limit, so no opt-in is needed,
// and several blocks fit on a multiprocessor.
constexpr int kSmemBudgetBytes = 48 * 1024;

// Register tiling of the per-(modality, step) values: a thread holds kMaxM × kItems of each.
// Two instantiations keep compile time down: up to 4 modalities with 4 steps per lane (the
// common case), and up to kMaxModalities with 2 steps per lane (registers spill there; it
// is correct but slower). A full segment's tile (32·kItems steps) is a whole number of
// chunks, so backward can start every tile from a chunk state saved by forward.
template <int kMaxM_, int kItems_>
struct ScanTiling {
  static constexpr int kMaxM = kMaxM_;
  static constexpr int kItems = kItems_;
  static_assert((32 * kItems) % kChunkLen == 0, "a full tile must hold whole chunks");
};
using SmallTiling = ScanTiling<4, 4>;
using LargeTiling = ScanTiling<kMaxModalities, 2>;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A float32 argument: parameters, states.
__device__ __forceinline__ float load_param(const TensorArg& a, int64_t i0, int64_t i1 = 0,
                                            int64_t i2 = 0, int64_t i3 = 0) {
  return __ldg(static_cast<const float*>(a.data) + i0 * a.stride[0] + i1 * a.stride[1] +
               i2 * a.stride[2] + i3 * a.stride[3]);
}

// 2^x on the special-function unit (relative error about 2^-22). Off the device (the CPU
// emulator of tests/cuda_emulator) exp2f stands in.
__device__ __forceinline__ float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// log2(x) and 1/x on the special-function unit (lg2.approx: absolute error about 2^-22 near
// 1, relative elsewhere; rcp.approx: relative 2^-23). Off the device, log2f and a division.
__device__ __forceinline__ float log2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

__device__ __forceinline__ float rcp_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

// The per-(modality, row, step) functions of the state-lanes kernels' staging, Δ =
// softplus(δ + β) and (forward) the gate's silu, on the special-function unit. At small N the
// staging is a fair share of all the work (at N = 16 about a third of the forward's
// instructions), and the exact forms of scan_math.h (libdevice's expf and log1pf, a
// division's slow path) take about 40 instructions where these take about 10. Relative
// error: sigmoid about 2^-21; softplus at most about 3e-6 (just above e^x = 1/16, below).
// The tests hold them to the float64 reference like the exact forms.
__device__ __forceinline__ float sigmoid_fast(float x) {
  return rcp_approx(1.f + exp2_approx(-x * kLog2e));  // 1 + inf = inf → 0, as it should
}

// log(1 + e^x), x itself above 20 as the exact form. Below e^x = 1/16, log1p's series to
// the fifth power (relative error under 2e-7), since lg2.approx's absolute error near 1
// (2^-22.6 on [0.5, 2]) would be a large relative one there; above, log2(1 + e^x)·ln 2,
// whose relative error is largest at the switch: 2^-22.6 / log2(1.0625) ≈ 2e-6, plus the
// rounding of 1 + e^x.
__device__ __forceinline__ float softplus_fast(float x) {
  if (x > 20.f) return x;
  const float y = exp2_approx(x * kLog2e);
  if (y < 0.0625f)
    return y * (1.f + y * (-0.5f + y * (1.f / 3 + y * (-0.25f + y * 0.2f))));
  return log2_approx(1.f + y) * 0.6931471805599453f;
}

__device__ __forceinline__ float step_size_fast(float delta_raw, float bias, bool use_softplus) {
  const float x = delta_raw + bias;
  return use_softplus ? softplus_fast(x) : x;
}

__device__ __forceinline__ float silu_fast(float x) { return x * sigmoid_fast(x); }

// kItems consecutive elements of one input row, for the steps t_first, t_first+1, ...;
// steps at or past `seqlen` read as 0. The row is a[i0, i1, i2, :]. One vector load when
// the row is contiguous in time and the address is aligned, else one load per element.
template <typename T, int K>
struct alignas(sizeof(T) * K) Packed {
  T v[K];
};

template <typename T, int K>
__device__ __forceinline__ void load_items(const TensorArg& a, int64_t i0, int64_t i1, int64_t i2,
                                           int64_t t_first, int64_t seqlen, float (&out)[K]) {
  const T* row = static_cast<const T*>(a.data) + i0 * a.stride[0] + i1 * a.stride[1] +
                 i2 * a.stride[2];
  const T* first = row + t_first * a.stride[3];
  if (a.stride[3] == 1 && t_first + K <= seqlen &&
      reinterpret_cast<uintptr_t>(first) % sizeof(Packed<T, K>) == 0) {
    const Packed<T, K> packed = *reinterpret_cast<const Packed<T, K>*>(first);
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = to_float(packed.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      out[i] = t_first + i < seqlen ? to_float(__ldg(first + i * a.stride[3])) : 0.f;
  }
}

// K consecutive floats of a staged tile in shared memory (16- or 8-byte aligned: offsets
// are multiples of K).
template <int K>
__device__ __forceinline__ void load_staged(const float* from, float (&out)[K]) {
  const Packed<float, K> packed = *reinterpret_cast<const Packed<float, K>*>(from);
#pragma unroll
  for (int i = 0; i < K; ++i) out[i] = packed.v[i];
}

// Shared-memory staging of the per-state inputs for a group of `group` states n0, n0+1, ...
// All rows of a block share the batch index b, so B[m, b, n, tile] and C[m, b, n, tile] are
// read from global memory once per block, coalesced along t, converted to float; the hot
// loop then reads them with one aligned shared load per lane. A[m, e, n] is staged per row.
// Layout in floats: B [M][group][tile], C [M][group][tile], A [rows][M][group].
struct StateStage {
  int M, rows, tile, group;  // tile: a power of two
  CM_HOST_DEVICE int B_at(int m, int nn) const { return (m * group + nn) * tile; }
  CM_HOST_DEVICE int C_at(int m, int nn) const { return (M + m) * group * tile + nn * tile; }
  CM_HOST_DEVICE int A_at(int row, int m, int nn) const {
    return 2 * M * group * tile + (row * M + m) * group + nn;
  }
  CM_HOST_DEVICE int floats() const { return 2 * M * group * tile + rows * M * group; }
};

// Fills the stage for states n0 .. n0+count-1 (count <= group) of the tile starting at t0;
// steps past L and rows past dim read as 0. Every thread of the block calls it; the caller
// puts the barriers around it. Each thread issues kStageBatch loads before it stores any,
// so that their latencies overlap (one load, then its store, in turn would serialise them).
// The element indices are split by SmallDivisor: `count` and M are runtime values, and an
// integer division by them would cost more instructions than the load and store it serves.
// Its range holds: indices stay below 2·M·count·tile and rows·M·count (< 2^24, with
// N <= kMaxDState, M <= kMaxModalities, tile and rows at most the block size).
constexpr int kStageBatch = 8;

template <typename input_t>
__device__ void stage_states(const StateStage& st, float* smem, const TensorArg& B,
                             const TensorArg& C, const TensorArg& A, int64_t b, int64_t e_first,
                             int64_t dim, int64_t n0, int count, int64_t t0, int64_t L) {
  const int tile_shift = __ffs(st.tile) - 1;
  const int total = 2 * st.M * count * st.tile;
  const SmallDivisor by_count(count), by_M(st.M);
  for (int first = threadIdx.x; first < total; first += kStageBatch * blockDim.x) {
    float v[kStageBatch];
    int at[kStageBatch];
#pragma unroll
    for (int r = 0; r < kStageBatch; ++r) {
      const int j = first + r * blockDim.x;
      const int tt = j & (st.tile - 1), mn = j >> tile_shift;
      const bool is_C = mn >= st.M * count;
      int nn;
      const int m = by_count.divide(is_C ? mn - st.M * count : mn, nn);
      const TensorArg& x = is_C ? C : B;
      const int64_t t = t0 + tt;
      v[r] = 0.f;
      at[r] = -1;
      if (j < total) {
        at[r] = is_C ? st.C_at(m, nn) + tt : st.B_at(m, nn) + tt;
        if (t < L)
          v[r] = to_float(__ldg(static_cast<const input_t*>(x.data) + m * x.stride[0] +
                                b * x.stride[1] + (n0 + nn) * x.stride[2] + t * x.stride[3]));
      }
    }
#pragma unroll
    for (int r = 0; r < kStageBatch; ++r)
      if (at[r] >= 0) smem[at[r]] = v[r];
  }
  for (int j = threadIdx.x; j < st.rows * st.M * count; j += blockDim.x) {
    int nn, m;
    const int row = by_M.divide(by_count.divide(j, nn), m);
    const int64_t e = e_first + row;
    smem[st.A_at(row, m, nn)] = e < dim ? load_param(A, m, e, n0 + nn) : 0.f;
  }
}

// States per stage: as many as fit in `budget_floats` of shared memory with `extra_floats`
// already taken, at least 1, at most N.
inline int states_per_stage(int64_t N, int M, int rows, int tile, int per_state_extra,
                            int64_t budget_floats, int64_t extra_floats) {
  const int64_t per_state = 2LL * M * tile + static_cast<int64_t>(rows) * M + per_state_extra;
  int64_t group = (budget_floats - extra_floats) / per_state;
  if (group < 1) group = 1;
  if (group > N) group = N;
  return static_cast<int>(group);
}

// Where this thread sits: its row (channel) and its place in the row's segment.
struct RowMap {
  int S;          // lanes per row
  int seg_lane;   // index inside the row's segment
  int row;        // row inside the block
  int rows;       // rows in the block
  int64_t b, e;
  int64_t e_first;  // the channel of the block's first row
  bool active;    // e < dim (the last block of a batch index may run past dim)

  __device__ RowMap(const ScanShape& s, int S_) : S(S_) {
    rows = blockDim.x / S;
    const int64_t blocks_per_batch = (s.dim + rows - 1) / rows;
    row = threadIdx.x / S;
    seg_lane = threadIdx.x % S;
    b = blockIdx.x / blocks_per_batch;
    e_first = (blockIdx.x % blocks_per_batch) * rows;
    e = e_first + row;
    active = e < s.dim;
  }
};

// The affine maps x -> P·x + U of consecutive steps compose as
//   (then ∘ first) = (P_then·P_first, P_then·U_first + U_then).
// Exclusive scan of the segment's maps in lane order: on return (P, U) is the composition
// of the maps of the lanes before this one (identity on lane 0). Every lane of the warp
// must call it (full-mask shuffles; segments are aligned groups of S lanes).
__device__ __forceinline__ void exclusive_scan_forward(float& P, float& U, int seg_lane, int S) {
  for (int offset = 1; offset < S; offset <<= 1) {
    const float P_before = __shfl_up_sync(kFullMask, P, offset, S);
    const float U_before = __shfl_up_sync(kFullMask, U, offset, S);
    if (seg_lane >= offset) {
      U = P * U_before + U;
      P = P * P_before;
    }
  }
  const float P_excl = __shfl_up_sync(kFullMask, P, 1, S);
  const float U_excl = __shfl_up_sync(kFullMask, U, 1, S);
  P = seg_lane == 0 ? 1.f : P_excl;
  U = seg_lane == 0 ? 0.f : U_excl;
}

// The same in reverse lane order (for the adjoint recurrence, which runs back in time): on
// return (P, U) composes the maps of the lanes after this one, the last lane's applied
// first (identity on the segment's last lane).
__device__ __forceinline__ void exclusive_scan_reverse(float& P, float& U, int seg_lane, int S) {
  for (int offset = 1; offset < S; offset <<= 1) {
    const float P_after = __shfl_down_sync(kFullMask, P, offset, S);
    const float U_after = __shfl_down_sync(kFullMask, U, offset, S);
    if (seg_lane + offset < S) {
      U = P * U_after + U;
      P = P * P_after;
    }
  }
  const float P_excl = __shfl_down_sync(kFullMask, P, 1, S);
  const float U_excl = __shfl_down_sync(kFullMask, U, 1, S);
  P = seg_lane == S - 1 ? 1.f : P_excl;
  U = seg_lane == S - 1 ? 0.f : U_excl;
}

// Sum of v over the S lanes of the segment; every lane gets the total.
__device__ __forceinline__ float segment_sum(float v, int S) {
  for (int offset = S / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset, S);
  return v;
}

// Launch shape shared by forward and backward: the smallest segment whose tile covers the
// sequence, at most a warp; longer sequences take several tiles of 32·kItems steps.
struct RowShape {
  int S;            // lanes per row
  int64_t tile;     // steps per tile, S·kItems
  int64_t n_tiles;  // ceil(L / tile)
};
template <typename Tiling>
inline RowShape row_shape(int64_t seqlen) {
  int S = 1;
  while (S < 32 && static_cast<int64_t>(S) * Tiling::kItems < seqlen) S *= 2;
  const int64_t tile = static_cast<int64_t>(S) * Tiling::kItems;
  return {S, tile, seqlen == 0 ? 0 : (seqlen + tile - 1) / tile};
}

// Grid and shared memory of one launch. `accumulators`: floats per (modality, state, step)
// that the kernel keeps in shared memory beside the stage (backward's dB and dC: 2).
// blocks == 0 when there is nothing to launch.
struct LaunchPlan {
  int S;               // lanes per row
  int64_t blocks;
  StateStage stage;
  size_t smem_bytes;   // stage, accumulators, and the [rows][N] carry with several tiles
};
template <typename Tiling>
inline LaunchPlan plan_launch(const ScanShape& s, int threads, int accumulators) {
  const RowShape shape = row_shape<Tiling>(s.seqlen);
  const int rows = threads / shape.S, M = static_cast<int>(s.n_modalities);
  const int tile = static_cast<int>(shape.tile);
  LaunchPlan plan{shape.S, s.batch * ((s.dim + rows - 1) / rows), StateStage{M, rows, tile, 1}, 0};
  if (shape.n_tiles == 0) plan.blocks = 0;
  const int64_t carry_floats = shape.n_tiles > 1 ? rows * s.dstate : 0;
  plan.stage.group = states_per_stage(s.dstate, M, rows, tile, accumulators * M * tile,
                                      kSmemBudgetBytes / sizeof(float), carry_floats);
  plan.smem_bytes = (plan.stage.floats() + static_cast<int64_t>(accumulators) * M *
                     plan.stage.group * tile + carry_floats) * sizeof(float);
  return plan;
}

// Dispatch on the input dtype to a launcher templated on the CUDA type.
#define COUPLED_MAMBA_DISPATCH_INPUT(dtype, ...)                                           \
  [&] {                                                                                    \
    switch (dtype) {                                                                       \
      case InputDtype::kFloat32: { using input_t = float; return __VA_ARGS__(); }          \
      case InputDtype::kFloat16: { using input_t = __half; return __VA_ARGS__(); }         \
      case InputDtype::kBFloat16: { using input_t = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                                      \
    return cudaErrorInvalidValue;                                                          \
  }()

}  // namespace coupled_mamba
