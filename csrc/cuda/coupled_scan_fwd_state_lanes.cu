// Forward CUDA kernel of the coupled selective scan (docs/math.md), "state lanes" mapping
// (state_lanes.cuh): a row's states spread over R lanes, each lane walking time step by step.
// Per step and modality a lane does, for each of its states,
//   a = exp(Δ·A),  h = a·G[t-1] + Δu·B,  ŷ += C·h,  G[t] += w·h
// (the coupled state G[t] = Σ_m w_m·h_m is built as the modalities go), then ŷ is summed
// over the row's lanes. The only dependency chain is each state's own recurrence, so a lane
// has M·kStates independent elements per step to overlap. Against the "time lanes" mapping
// (coupled_scan_fwd.cu: a shuffle scan over time per state) there is no scan, no composition
// of step maps and no padding of the sequence to a whole tile.
//
// Per tile of T steps the block stages B and C (state_lanes.cuh) and, per row and step,
// Δ = softplus(δ + β), Δ·u, D·u and silu(z), computed once there rather than once per lane;
// every global load of the tile is issued there, in batches. The lanes add the row sums of
// C·h to the staged D·u; at the end of the tile the results are gated and written, coalesced
// along t. The coupled state is saved at every chunk start for backward, and at the end.
// The tile is as long (up to a chunk) as the shared memory two blocks per multiprocessor
// may take on the device at hand allows.
#include "coupled_scan_cuda.h"
#include "state_lanes.cuh"

namespace coupled_mamba {
namespace {

// Threads per block, a build-time knob like the one below (256, or 128 to spread few rows
// over more blocks: at case (c), 192 blocks of 256 leave 72 of 132 multiprocessors with
// one block and 60 with two; 384 of 128 at most three per multiprocessor, of 32 rows each;
// not yet measured).
#ifndef COUPLED_MAMBA_FWD_LANE_THREADS
#define COUPLED_MAMBA_FWD_LANE_THREADS 256
#endif
constexpr int kFwdLaneThreads = COUPLED_MAMBA_FWD_LANE_THREADS;
static_assert(kFwdLaneThreads % 32 == 0 && kFwdLaneThreads <= 1024, "whole warps per block");
// Minimum resident blocks per multiprocessor, a build-time knob (NVCC_APPEND_FLAGS=
// "-DCOUPLED_MAMBA_FWD_LANE_MIN_BLOCKS=3"; bench/gpu_check.sh times it): 2 caps a thread at
// 128 registers (it takes all of them; no spill with 4 states per lane, 4 bytes with 8),
// 3 at 80 (4 and 88 bytes stored by spills; not yet measured). The tile's shared memory is sized to
// let as many blocks share a multiprocessor.
#ifndef COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS
#define COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS 2
#endif
// Registers a thread may take under those bounds (a multiprocessor has 64 K).
constexpr int kFwdLaneRegisters = 65536 / (kFwdLaneThreads * COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS);

struct FwdLanePlan {
  LaneGeometry g;
  int dd_stride;  // floats per step of the (Δ, Δu) stage: 2·M·rows + 2
  int y_stride;   // floats per step of the ŷ and gate stages: M·rows, made odd
  bool gated;     // z present: a gate stage (silu(z)) follows the ŷ stage
  size_t smem_bytes;
};

// Fills, for (modality m, row, step t) of the tile starting at t0:
//   stage_dd[t·dd_stride + 2·(m·rows + row) + {0, 1}] = (Δ, Δ·u),
//   stage_y[t·y_stride + m·rows + row] = D·u (the lanes add Σ_n C·h to it),
//   stage_gate[t·y_stride + m·rows + row] = silu(z) when gated.
// Rows past dim and steps past L stage zeros: Δ = 0 leaves a state unchanged (a = 1, b = 0).
template <typename input_t>
__device__ void stage_steps(const FwdLanePlan& pl, float* stage_dd, float* stage_y,
                            float* stage_gate, const ScanFwdParams& p, int M, int64_t b,
                            int64_t e_first, int64_t t0) {
  // Three loads each (δ, u, z): 24 in flight per thread with 128 registers (no spill), 12
  // with fewer (at the 80 of 3 blocks of 256, 8 spilled 112 to 228 bytes).
  constexpr int kBatch = kFwdLaneRegisters >= 128 ? 8 : 4;
  const LaneGeometry& g = pl.g;
  const int64_t dim = p.shape.dim, L = p.shape.seqlen;
  const int total = M * g.rows * g.T;
  for (int first = threadIdx.x; first < total; first += kBatch * blockDim.x) {
    float raw[kBatch], u[kBatch], z[kBatch], bias[kBatch], D[kBatch];
    bool real[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int j = first + i * blockDim.x;
      const int t = j & (g.T - 1), mr = j >> g.log2_T;
      const int m = mr >> g.log2_rows;
      const int64_t e = e_first + (mr & (g.rows - 1));
      raw[i] = u[i] = z[i] = bias[i] = D[i] = 0.f;
      real[i] = j < total && e < dim && t0 + t < L;
      if (real[i]) {
        raw[i] = load_input<input_t>(p.delta, m, b, e, t0 + t);
        u[i] = load_input<input_t>(p.u, m, b, e, t0 + t);
        if (pl.gated) z[i] = load_input<input_t>(p.z, m, b, e, t0 + t);
        if (p.delta_bias.present()) bias[i] = load_param(p.delta_bias, m, e);
        if (p.D.present()) D[i] = load_param(p.D, m, e);
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int j = first + i * blockDim.x;
      if (j >= total) continue;
      const int t = j & (g.T - 1), mr = j >> g.log2_T;
      const float step = real[i] ? step_size_fast(raw[i], bias[i], p.delta_softplus) : 0.f;
      *reinterpret_cast<float2*>(stage_dd + t * pl.dd_stride + 2 * mr) =
          make_float2(step, step * u[i]);
      stage_y[t * pl.y_stride + mr] = D[i] * u[i];
      if (pl.gated) stage_gate[t * pl.y_stride + mr] = real[i] ? silu_fast(z[i]) : 0.f;
    }
  }
}

template <typename input_t, int kMaxM, int kStates>
__global__ void __launch_bounds__(kFwdLaneThreads, COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS)
    coupled_scan_fwd_state_lanes_kernel(const ScanFwdParams p, const FwdLanePlan pl) {
  static_assert(kStates % 4 == 0, "a lane's states come in 16-byte groups of 4");
  const LaneGeometry& g = pl.g;
  const ScanShape s = p.shape;
  const int M = static_cast<int>(s.n_modalities);
  const int64_t N = s.dstate, L = s.seqlen;
  const LanePlace at(g, s.dim);

  // Shared memory: [T][bc_stride] B and C, [T][dd_stride] (Δ, Δu), [T][y_stride] ŷ (D·u
  // plus the row sums), [T][y_stride] silu(z) when gated.
  CM_DYNAMIC_SMEM(float4, smem_f4);  // float4: the 16-byte loads need that alignment
  float* stage_BC = reinterpret_cast<float*>(smem_f4);
  float* stage_dd = stage_BC + g.T * g.bc_stride;
  float* stage_y = stage_dd + g.T * pl.dd_stride;
  float* stage_gate = stage_y + g.T * pl.y_stride;

  float w[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) w[m] = m < M ? load_param(p.coupling, m) : 0.f;
  DecayRates<kMaxM, kStates> A2;
  A2.load(p.A, g, at, M, N);

  const int64_t row_offset = at.b * s.dim + at.e;
  float G[kStates];
#pragma unroll
  for (int k = 0; k < kStates; ++k) {
    const int n = at.state(g, k);
    G[k] = at.active && n < N && p.initial_state.present()
               ? load_param(p.initial_state, at.b, at.e, n) : 0.f;
  }
  float* chunk_states = static_cast<float*>(p.chunk_states) + row_offset * s.n_chunks * N;

  for (int64_t t0 = 0; t0 < L; t0 += g.T) {
    const int steps = static_cast<int>(min(static_cast<int64_t>(g.T), L - t0));
    __syncthreads();  // the previous tile's stages are read
    stage_bc<input_t, 16>(g, stage_BC, p.B, p.C, M, at.b, N, t0, L);
    stage_steps<input_t>(pl, stage_dd, stage_y, stage_gate, p, M, at.b, at.e_first, t0);
    __syncthreads();

    for (int t = 0; t < steps; ++t) {
      const int64_t step = t0 + t;
      if ((step & (kChunkLen - 1)) == 0 && at.active) {  // G[step - 1] starts a chunk
        float* to = chunk_states + (step / kChunkLen) * N;
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          const int n = at.state(g, k);
          if (n < N) to[n] = G[k];
        }
      }
      const float* bc = stage_BC + t * g.bc_stride + 4 * at.r;
      const float* dd = stage_dd + t * pl.dd_stride + 2 * at.row;
      float G_next[kStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) G_next[k] = 0.f;
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m >= M) break;
        const float2 step_drive = *reinterpret_cast<const float2*>(dd + 2 * m * g.rows);
        float y_part = 0.f;
        for_each_state<kStates>(bc, g, m, [&](int k, float B, float C) {
          const float a = exp2_approx(step_drive.x * A2.get(p.A, g, at, m, k, N));
          const float h = modality_state(a, G[k], step_drive.y, B);
          y_part += C * h;
          G_next[k] += w[m] * h;
        });
        y_part = row_sum(y_part, g.Rw);  // Rw == R: a row is inside one warp
        if (at.r == 0) stage_y[t * pl.y_stride + m * g.rows + at.row] += y_part;
      }
#pragma unroll
      for (int k = 0; k < kStates; ++k) G[k] = G_next[k];
    }
    __syncthreads();  // the tile's ŷ are complete in stage_y

    // y = ŷ·silu(z) for (m, row, t) of the tile, t fastest (coalesced); shared memory only.
    const int total = M * g.rows * g.T;
    for (int j = threadIdx.x; j < total; j += blockDim.x) {
      const int t = j & (g.T - 1), mr = j >> g.log2_T;
      const int m = mr >> g.log2_rows;
      const int64_t e = at.e_first + (mr & (g.rows - 1)), step = t0 + t;
      if (t >= steps || e >= s.dim) continue;
      const float y = stage_y[t * pl.y_stride + mr];
      const int64_t out = ((m * s.batch + at.b) * s.dim + e) * L + step;
      if (pl.gated) {
        static_cast<input_t*>(p.y_ungated)[out] = from_float<input_t>(y);
        static_cast<input_t*>(p.y)[out] = from_float<input_t>(y * stage_gate[t * pl.y_stride + mr]);
      } else {
        static_cast<input_t*>(p.y)[out] = from_float<input_t>(y);
      }
    }
  }

  if (at.active) {
    float* final_state = static_cast<float*>(p.final_state) + row_offset * N;
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const int n = at.state(g, k);
      if (n < N) final_state[n] = G[k];
    }
  }
}

// States per lane: 8 when a row needs them (N > 128) or when there are rows enough to fill
// the card with 8 (about 2^20 threads: 4 waves of 2048 on 132 multiprocessors); else 4,
// which doubles the lanes (and warps) of a short batch at the cost of one more shuffle
// round per (modality, step).
inline int fwd_states_per_lane(const ScanShape& s) {
  if (s.dstate > 32 * 4) return 8;
  const int64_t lanes_with_8 = s.batch * s.dim * ((s.dstate + 7) / 8);
  return lanes_with_8 >= (int64_t{1} << 20) ? 8 : 4;
}

// The longest tile (a power of two, at most a chunk and no longer than the sequence needs)
// whose stages fit in `smem_budget` bytes; at least one step (with M = 16 and N = 256 a
// step takes 34 KB, gated).
inline FwdLanePlan plan_fwd_lanes(const ScanShape& s, int k_states, bool gated, int smem_budget) {
  FwdLanePlan pl{};
  const int M = static_cast<int>(s.n_modalities);
  pl.g = lane_geometry(s, k_states, kFwdLaneThreads, 1, /*state_warps=*/1);
  pl.dd_stride = 2 * M * pl.g.rows + 2;
  pl.y_stride = (M * pl.g.rows) | 1;
  pl.gated = gated;
  const int64_t per_step =
      (pl.g.bc_stride + pl.dd_stride + pl.y_stride * (gated ? 2 : 1)) * sizeof(float);
  int T = kChunkLen;
  while (T > 1 && T * per_step > smem_budget) T /= 2;
  while (T > 1 && T / 2 >= s.seqlen) T /= 2;  // no longer than the sequence (a step update: 1)
  pl.g.T = T;
  pl.g.log2_T = log2_of(T);
  pl.smem_bytes = T * per_step;
  return pl;
}

template <typename input_t, int kMaxM, int kStates>
cudaError_t launch_fwd_lanes(const ScanFwdParams& p, cudaStream_t stream) {
  const int budget =
      smem_budget_per_block(device_smem_limits(), COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS);
  const FwdLanePlan pl = plan_fwd_lanes(p.shape, kStates, p.z.present(), budget);
  if (pl.g.blocks == 0) return cudaSuccess;
  const auto kernel = coupled_scan_fwd_state_lanes_kernel<input_t, kMaxM, kStates>;
  if (pl.smem_bytes > static_cast<size_t>(kSmemBudgetBytes)) {  // past the default: opt in
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(pl.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  CM_LAUNCH(pl.g.blocks, kFwdLaneThreads, pl.smem_bytes, stream, kernel)(p, pl);
  return cudaGetLastError();
}

}  // namespace

cudaError_t coupled_scan_fwd_state_lanes_cuda(const ScanFwdParams& params, InputDtype dtype,
                                              cudaStream_t stream) {
  const bool few_modalities = params.shape.n_modalities <= 4;
  const bool eight = fwd_states_per_lane(params.shape) == 8;
  return COUPLED_MAMBA_DISPATCH_INPUT(dtype, [&] {
    if (few_modalities)
      return eight ? launch_fwd_lanes<input_t, 4, 8>(params, stream)
                   : launch_fwd_lanes<input_t, 4, 4>(params, stream);
    return eight ? launch_fwd_lanes<input_t, kMaxModalities, 8>(params, stream)
                 : launch_fwd_lanes<input_t, kMaxModalities, 4>(params, stream);
  });
}

}  // namespace coupled_mamba
