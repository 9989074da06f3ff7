// Device helpers shared by the CUDA forward and backward kernels.
//
// Thread mapping (docs/kernels.md): one channel (b, e) is a "row", owned by a segment of R
// lanes of one warp, R = min(32, next power of two >= N). Lane l of the segment owns the
// states n = l, l + R, l + 2R, ... (at most kMaxStatesPerLane of them) and walks time
// sequentially, keeping its states in registers. Sums over n (the output ŷ, and dΔ, du in
// backward) are butterfly reductions inside the segment. All rows of a block share the
// batch index b.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "coupled_mamba/params.h"
#include "coupled_mamba/scan_math.h"

namespace coupled_mamba {

constexpr int kMaxStatesPerLane = kMaxDState / 32;
constexpr float kLog2e = 1.4426950408889634f;

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

template <typename T>
__device__ __forceinline__ float load4(const TensorArg& a, int64_t i0, int64_t i1, int64_t i2,
                                       int64_t i3) {
  const T* ptr = static_cast<const T*>(a.data) + i0 * a.stride[0] + i1 * a.stride[1] +
                 i2 * a.stride[2] + i3 * a.stride[3];
  return to_float(__ldg(ptr));
}

// A float32 argument: parameters, states.
__device__ __forceinline__ float load_param(const TensorArg& a, int64_t i0, int64_t i1 = 0,
                                            int64_t i2 = 0, int64_t i3 = 0) {
  return __ldg(static_cast<const float*>(a.data) + i0 * a.stride[0] + i1 * a.stride[1] +
               i2 * a.stride[2] + i3 * a.stride[3]);
}

// 2^x on the special-function unit (relative error about 2^-22).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Where this thread sits: which row (channel) and which states it owns.
struct LaneMap {
  int R;          // lanes per row
  int n_states;   // states per lane (ceil(N / R))
  int lane;       // index inside the row's segment
  int row;        // row inside the block
  unsigned mask;  // the segment's lanes, for the shuffles
  int64_t b, e;
  bool active;    // e < dim (the last block of a batch index may run past dim)

  __device__ LaneMap(const ScanShape& s, int R_, int n_states_) : R(R_), n_states(n_states_) {
    const int rows_per_block = blockDim.x / R;
    const int64_t blocks_per_batch = (s.dim + rows_per_block - 1) / rows_per_block;
    row = threadIdx.x / R;
    lane = threadIdx.x % R;
    b = blockIdx.x / blocks_per_batch;
    e = (blockIdx.x % blocks_per_batch) * rows_per_block + row;
    active = e < s.dim;
    const int first_lane = (threadIdx.x % 32) / R * R;
    mask = R == 32 ? 0xffffffffu : ((1u << R) - 1u) << first_lane;
  }
  // Whether slot j of this lane holds a state, and which one.
  __device__ bool owns(int j, int64_t N) const { return j < n_states && lane + R * j < N; }
  __device__ int64_t state(int j) const { return lane + static_cast<int64_t>(R) * j; }
};

// Sum of v over the R lanes of the segment; every lane gets the total.
__device__ __forceinline__ float segment_sum(float v, const LaneMap& lm) {
  for (int offset = lm.R / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(lm.mask, v, offset);
  return v;
}

// Launch shape shared by forward and backward: lanes per row and states per lane.
struct RowShape {
  int R, n_states;
};
inline RowShape row_shape(int64_t N) {
  int R = 1;
  while (R < N && R < 32) R *= 2;
  return {R, static_cast<int>((N + R - 1) / R)};
}

// One time step of this lane's states: G_next[j] = Σ_m w_m · h_m[j] from G_prev, where
// h_m = exp(Δ_m·A_m)·G_prev + Δ_m·B_m·u_m. With kWriteOutput (forward) also forms
// ŷ_m = Σ_n C·h_m + D·u_m over the segment and writes y (and ŷ when there is a gate).
template <typename input_t, bool kWriteOutput, typename Params>
__device__ __forceinline__ void advance_states(const Params& p, const LaneMap& lm, int64_t t,
                                               const float* w, const float (&G_prev)[kMaxStatesPerLane],
                                               float (&G_next)[kMaxStatesPerLane]) {
  const ScanShape& s = p.shape;
#pragma unroll
  for (int j = 0; j < kMaxStatesPerLane; ++j) G_next[j] = 0.f;
  for (int64_t m = 0; m < s.n_modalities; ++m) {
    const float raw = load4<input_t>(p.delta, m, lm.b, lm.e, t);
    const float bias = p.delta_bias.present() ? load_param(p.delta_bias, m, lm.e) : 0.f;
    const float step = step_size(raw, bias, p.delta_softplus);
    const float u = load4<input_t>(p.u, m, lm.b, lm.e, t);
    const float drive = step * u, step_log2 = step * kLog2e, w_m = w[m];
    float y_part = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxStatesPerLane; ++j) {
      if (!lm.owns(j, s.dstate)) continue;
      const int64_t n = lm.state(j);
      const float decay = exp2_approx(step_log2 * load_param(p.A, m, lm.e, n));
      const float h = modality_state(decay, G_prev[j], drive, load4<input_t>(p.B, m, lm.b, n, t));
      G_next[j] += w_m * h;
      if (kWriteOutput) y_part += load4<input_t>(p.C, m, lm.b, n, t) * h;
    }
    if constexpr (kWriteOutput) {
      const float y_hat = segment_sum(y_part, lm) + (p.D.present() ? load_param(p.D, m, lm.e) * u : 0.f);
      if (lm.lane == 0) {
        const int64_t i = ((m * s.batch + lm.b) * s.dim + lm.e) * s.seqlen + t;
        if (p.z.present()) {
          const float z = load4<input_t>(p.z, m, lm.b, lm.e, t);
          static_cast<input_t*>(p.y_ungated)[i] = from_float<input_t>(y_hat);
          static_cast<input_t*>(p.y)[i] = from_float<input_t>(y_hat * silu(z));
        } else {
          static_cast<input_t*>(p.y)[i] = from_float<input_t>(y_hat);
        }
      }
    }
  }
}

// Dispatch on the input dtype to a launcher templated on the CUDA type.
#define COUPLED_MAMBA_DISPATCH_INPUT(dtype, ...)                       \
  [&] {                                                                \
    switch (dtype) {                                                   \
      case InputDtype::kFloat32: { using input_t = float; return __VA_ARGS__(); }          \
      case InputDtype::kFloat16: { using input_t = __half; return __VA_ARGS__(); }         \
      case InputDtype::kBFloat16: { using input_t = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                  \
    return cudaErrorInvalidValue;                                      \
  }()

}  // namespace coupled_mamba
