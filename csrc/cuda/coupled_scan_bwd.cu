// Backward CUDA kernel of the coupled selective scan (SPEC §1, "Backward").
//
// Same thread mapping as forward. Time is walked from the last chunk to the first; inside
// one chunk of kChunkLen steps the states are recomputed from the saved chunk start in
// sub-chunks of kHistLen steps: one pass saves the state at each sub-chunk start, then for
// each sub-chunk (last first) the states G[t-1] of its steps go to shared memory and the
// adjoint recurrence λ[t-1] = Σ_m a_m·μ_m runs back through them. Exponentials are
// therefore computed about 2.75 times per element (the first pass stops at the last
// sub-chunk start; the second recomputes each sub-chunk; the reverse step needs a again).
//
// Gradients reduced over channels (dB, dC over e; dA over b; dD, dΔ-bias over b; dw over
// everything) are summed in shared memory or registers first and reach global memory with
// one atomic per block and element.
#include <algorithm>

#include "coupled_scan_cuda.h"
#include "scan_cuda_common.cuh"

namespace coupled_mamba {
namespace {

constexpr int kHistLen = 16;  // steps of recomputed states held in shared memory
constexpr int kSubChunks = kChunkLen / kHistLen;
static_assert(kChunkLen % kHistLen == 0, "sub-chunks must tile a chunk");

// Shared-memory layout of one block, in floats. Per-thread arrays are [slot][thread] so
// that a warp's accesses fall in distinct banks.
struct BwdSmem {
  int64_t threads, rows, M, n_states, padded_N;
  bool dBC_in_smem;  // accumulate dB, dC of a sub-chunk in shared memory (when they fit)

  CM_HOST_DEVICE int64_t coupling() const { return 0; }                                      // [M]
  CM_HOST_DEVICE int64_t history() const { return coupling() + M; }                          // [kHistLen][n_states][threads]
  CM_HOST_DEVICE int64_t sub_starts() const { return history() + kHistLen * n_states * threads; }  // [kSubChunks][n_states][threads]
  CM_HOST_DEVICE int64_t dA() const { return sub_starts() + kSubChunks * n_states * threads; }    // [M][n_states][threads]
  CM_HOST_DEVICE int64_t dw() const { return dA() + M * n_states * threads; }                     // [M][threads]
  CM_HOST_DEVICE int64_t dD() const { return dw() + M * threads; }                                // [M][rows]
  CM_HOST_DEVICE int64_t dbias() const { return dD() + M * rows; }                                // [M][rows]
  CM_HOST_DEVICE int64_t dBC() const { return dbias() + M * rows; }                               // [2][M][kHistLen][padded_N]
  CM_HOST_DEVICE int64_t dBC_size() const { return 2 * M * kHistLen * padded_N; }
  CM_HOST_DEVICE int64_t total() const { return dBC() + (dBC_in_smem ? dBC_size() : 0); }
  CM_HOST_DEVICE size_t bytes() const { return total() * sizeof(float); }
};

template <typename input_t>
__global__ void coupled_scan_bwd_kernel(const ScanBwdParams p, int R, int n_states, BwdSmem layout) {
  const ScanShape s = p.shape;
  const int64_t M = s.n_modalities, N = s.dstate, T = blockDim.x, tid = threadIdx.x;
  extern __shared__ float smem[];
  float* w = smem + layout.coupling();
  float* history = smem + layout.history();
  float* sub_starts = smem + layout.sub_starts();
  float* dA_acc = smem + layout.dA();
  float* dw_acc = smem + layout.dw();
  float* dD_acc = smem + layout.dD();
  float* dbias_acc = smem + layout.dbias();
  float* dBC_acc = smem + layout.dBC();
  for (int64_t i = tid; i < layout.total(); i += T) smem[i] = 0.f;
  __syncthreads();
  for (int64_t m = tid; m < M; m += T) w[m] = load_param(p.coupling, m);

  const LaneMap lm(s, R, n_states);
  const int64_t rows = layout.rows;
  auto slot = [&](float* base, int64_t k, int j) -> float& { return base[(k * n_states + j) * T + tid]; };
  float* dB_global = static_cast<float*>(p.dB);
  float* dC_global = static_cast<float*>(p.dC);
  auto dBC_index = [&](int64_t m, int64_t n, int64_t t) {
    return m * p.dBC_stride[0] + lm.b * p.dBC_stride[1] + n * p.dBC_stride[2] + t * p.dBC_stride[3];
  };

  // λ = dℓ/dG[t], starting from the final state's gradient.
  float lambda[kMaxStatesPerLane];
#pragma unroll
  for (int j = 0; j < kMaxStatesPerLane; ++j)
    lambda[j] = lm.active && lm.owns(j, N) && p.dfinal_state.present()
                    ? load_param(p.dfinal_state, lm.b, lm.e, lm.state(j))
                    : 0.f;
  __syncthreads();

  float G[kMaxStatesPerLane], G_next[kMaxStatesPerLane];
  for (int64_t c = s.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunkLen, t1 = min(s.seqlen, t0 + kChunkLen);
    const int64_t n_sub = (t1 - t0 + kHistLen - 1) / kHistLen;
    // Pass 1: the state at each sub-chunk start, from the chunk start saved by forward.
    if (lm.active) {
#pragma unroll
      for (int j = 0; j < kMaxStatesPerLane; ++j)
        G[j] = lm.owns(j, N) ? load_param(p.chunk_states, lm.b, lm.e, c, lm.state(j)) : 0.f;
      const int64_t last_start = t0 + (n_sub - 1) * kHistLen;
      for (int64_t t = t0; t <= last_start; ++t) {
        if ((t - t0) % kHistLen == 0) {
#pragma unroll
          for (int j = 0; j < kMaxStatesPerLane; ++j)
            if (j < n_states) slot(sub_starts, (t - t0) / kHistLen, j) = G[j];
        }
        if (t < last_start) {
          advance_states<input_t, false>(p, lm, t, w, G, G_next);
#pragma unroll
          for (int j = 0; j < kMaxStatesPerLane; ++j) G[j] = G_next[j];
        }
      }
    }
    for (int64_t sc = n_sub - 1; sc >= 0; --sc) {
      const int64_t ts0 = t0 + sc * kHistLen, ts1 = min(t1, ts0 + kHistLen);
      if (lm.active) {
        // Pass 2: G[t-1] for every step of the sub-chunk.
#pragma unroll
        for (int j = 0; j < kMaxStatesPerLane; ++j) G[j] = j < n_states ? slot(sub_starts, sc, j) : 0.f;
        for (int64_t t = ts0; t < ts1; ++t) {
#pragma unroll
          for (int j = 0; j < kMaxStatesPerLane; ++j)
            if (j < n_states) slot(history, t - ts0, j) = G[j];
          if (t + 1 < ts1) {
            advance_states<input_t, false>(p, lm, t, w, G, G_next);
#pragma unroll
            for (int j = 0; j < kMaxStatesPerLane; ++j) G[j] = G_next[j];
          }
        }
        // Pass 3: the reverse (adjoint) steps.
        for (int64_t t = ts1 - 1; t >= ts0; --t) {
          float G_prev[kMaxStatesPerLane], lambda_prev[kMaxStatesPerLane];
#pragma unroll
          for (int j = 0; j < kMaxStatesPerLane; ++j) {
            G_prev[j] = j < n_states ? slot(history, t - ts0, j) : 0.f;
            lambda_prev[j] = 0.f;
          }
          for (int64_t m = 0; m < M; ++m) {
            const float raw = load4<input_t>(p.delta, m, lm.b, lm.e, t);
            const float bias = p.delta_bias.present() ? load_param(p.delta_bias, m, lm.e) : 0.f;
            const float step = step_size(raw, bias, p.delta_softplus);
            const float u = load4<input_t>(p.u, m, lm.b, lm.e, t);
            const float dy = load4<input_t>(p.dy, m, lm.b, lm.e, t);
            const int64_t i = ((m * s.batch + lm.b) * s.dim + lm.e) * s.seqlen + t;
            float dyhat = dy, dz = 0.f;
            if (p.z.present())
              dyhat = gate_backward(dy, load4<input_t>(p.y_ungated, m, lm.b, lm.e, t),
                                    load4<input_t>(p.z, m, lm.b, lm.e, t), &dz);
            const float drive = step * u, step_log2 = step * kLog2e, w_m = w[m];
            float d_step = 0.f, d_u = 0.f, d_w = 0.f;
#pragma unroll
            for (int j = 0; j < kMaxStatesPerLane; ++j) {
              if (!lm.owns(j, N)) continue;
              const int64_t n = lm.state(j);
              const float A = load_param(p.A, m, lm.e, n);
              const float B = load4<input_t>(p.B, m, lm.b, n, t);
              const float C = load4<input_t>(p.C, m, lm.b, n, t);
              const float decay = exp2_approx(step_log2 * A);
              const float h = modality_state(decay, G_prev[j], drive, B);
              const float mu = dyhat * C + w_m * lambda[j];  // dℓ/dh
              const ModalityStateGrad<float> g = modality_state_grad(mu, decay, G_prev[j], step, A, B, u);
              d_step += g.d_step;
              d_u += g.d_u;
              d_w += lambda[j] * h;
              slot(dA_acc, m, j) += g.d_A;
              lambda_prev[j] += g.d_coupled_prev;
              if (layout.dBC_in_smem) {
                float* dB_tile = dBC_acc + (m * kHistLen + (t - ts0)) * layout.padded_N;
                float* dC_tile = dB_tile + M * kHistLen * layout.padded_N;
                atomicAdd(dB_tile + n, g.d_B);
                atomicAdd(dC_tile + n, dyhat * h);
              } else {
                atomicAdd(dB_global + dBC_index(m, n, t), g.d_B);
                atomicAdd(dC_global + dBC_index(m, n, t), dyhat * h);
              }
            }
            d_step = segment_sum(d_step, lm);
            d_u = segment_sum(d_u, lm);
            dw_acc[m * T + tid] += d_w;
            if (lm.lane == 0) {
              const float D = p.D.present() ? load_param(p.D, m, lm.e) : 0.f;
              const float d_raw = step_size_grad(d_step, raw, bias, p.delta_softplus);
              static_cast<input_t*>(p.du)[i] = from_float<input_t>(d_u + dyhat * D);
              static_cast<input_t*>(p.ddelta)[i] = from_float<input_t>(d_raw);
              if (p.z.present()) static_cast<input_t*>(p.dz)[i] = from_float<input_t>(dz);
              dD_acc[m * rows + lm.row] += dyhat * u;
              dbias_acc[m * rows + lm.row] += d_raw;
            }
          }
#pragma unroll
          for (int j = 0; j < kMaxStatesPerLane; ++j) lambda[j] = lambda_prev[j];
        }
      }
      if (layout.dBC_in_smem) {
        // Flush the sub-chunk's dB, dC sums: one global atomic per element and block.
        __syncthreads();
        const int64_t steps = ts1 - ts0;
        for (int64_t k = tid; k < 2 * M * N * steps; k += T) {
          const int64_t dt = k % steps, n = (k / steps) % N, m = (k / (steps * N)) % M;
          const bool is_C = k >= M * N * steps;
          float* acc = dBC_acc + ((is_C ? M : 0) + m) * kHistLen * layout.padded_N + dt * layout.padded_N + n;
          if (*acc != 0.f) atomicAdd((is_C ? dC_global : dB_global) + dBC_index(m, n, ts0 + dt), *acc);
          *acc = 0.f;
        }
        __syncthreads();
      }
    }
  }

  // Per-block sums to global memory.
  if (lm.active) {
    float* dinitial = static_cast<float*>(p.dinitial_state) + (lm.b * s.dim + lm.e) * N;
#pragma unroll
    for (int j = 0; j < kMaxStatesPerLane; ++j) {
      if (!lm.owns(j, N)) continue;
      dinitial[lm.state(j)] = lambda[j];
      for (int64_t m = 0; m < M; ++m)
        atomicAdd(static_cast<float*>(p.dA) + (m * s.dim + lm.e) * N + lm.state(j), slot(dA_acc, m, j));
    }
    if (lm.lane == 0)
      for (int64_t m = 0; m < M; ++m) {
        if (p.dD) atomicAdd(static_cast<float*>(p.dD) + m * s.dim + lm.e, dD_acc[m * rows + lm.row]);
        if (p.ddelta_bias)
          atomicAdd(static_cast<float*>(p.ddelta_bias) + m * s.dim + lm.e, dbias_acc[m * rows + lm.row]);
      }
  }
  __syncthreads();
  for (int64_t m = tid / 32; m < M; m += T / 32) {  // one warp per modality
    float sum = 0.f;
    for (int64_t k = tid % 32; k < T; k += 32) sum += dw_acc[m * T + k];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (tid % 32 == 0) atomicAdd(static_cast<float*>(p.dcoupling) + m, sum);
  }
}

// The largest block (of 256, 128, 64, 32 threads) whose shared memory fits, preferring to
// keep the dB, dC sums in shared memory.
BwdSmem choose_layout(const ScanShape& s, RowShape shape, size_t smem_limit) {
  BwdSmem layout{};
  layout.M = s.n_modalities;
  layout.n_states = shape.n_states;
  layout.padded_N = s.dstate | 1;  // odd row stride: a warp's column accesses hit distinct banks
  for (bool dBC_in_smem : {true, false})
    for (int threads : {256, 128, 64, 32}) {
      layout.threads = threads;
      layout.rows = threads / shape.R;
      layout.dBC_in_smem = dBC_in_smem;
      if (layout.bytes() <= smem_limit) return layout;
    }
  layout.threads = 0;  // cannot happen within kMaxDState and kMaxModalities; checked by caller
  return layout;
}

template <typename input_t>
cudaError_t launch_bwd(const ScanBwdParams& p, cudaStream_t stream) {
  const ScanShape& s = p.shape;
  if (s.batch * s.dim == 0) return cudaSuccess;
  int device = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // Leave room for two blocks per multiprocessor.
  const size_t smem_limit = std::min<size_t>(smem_optin, 100 * 1024);
  const RowShape shape = row_shape(s.dstate);
  const BwdSmem layout = choose_layout(s, shape, smem_limit);
  if (layout.threads == 0) return cudaErrorInvalidConfiguration;
  const int rows_per_block = layout.threads / shape.R;
  const int64_t blocks = s.batch * ((s.dim + rows_per_block - 1) / rows_per_block);
  cudaError_t err = cudaFuncSetAttribute(coupled_scan_bwd_kernel<input_t>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(layout.bytes()));
  if (err != cudaSuccess) return err;
  coupled_scan_bwd_kernel<input_t><<<blocks, layout.threads, layout.bytes(), stream>>>(
      p, shape.R, shape.n_states, layout);
  return cudaGetLastError();
}

}  // namespace

cudaError_t coupled_scan_bwd_cuda(const ScanBwdParams& params, InputDtype dtype,
                                  cudaStream_t stream) {
  return COUPLED_MAMBA_DISPATCH_INPUT(dtype, [&] { return launch_bwd<input_t>(params, stream); });
}

}  // namespace coupled_mamba
