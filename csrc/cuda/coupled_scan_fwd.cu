// Forward CUDA kernel of the coupled selective scan. Each lane walks time sequentially with
// its states in registers (mapping in scan_cuda_common.cuh); the coupled state is saved at
// every chunk start for backward, and at the end.
#include "coupled_scan_cuda.h"
#include "scan_cuda_common.cuh"

namespace coupled_mamba {
namespace {

constexpr int kFwdThreads = 128;

template <typename input_t>
__global__ void __launch_bounds__(kFwdThreads)
    coupled_scan_fwd_kernel(const ScanFwdParams p, int R, int n_states) {
  const ScanShape s = p.shape;
  extern __shared__ float coupling_weights[];  // [M]
  for (int m = threadIdx.x; m < s.n_modalities; m += blockDim.x)
    coupling_weights[m] = load_param(p.coupling, m);
  __syncthreads();

  const LaneMap lm(s, R, n_states);
  if (!lm.active) return;  // no barrier below; shuffles use the segment's own mask

  float G[kMaxStatesPerLane], G_next[kMaxStatesPerLane];
#pragma unroll
  for (int j = 0; j < kMaxStatesPerLane; ++j)
    G[j] = lm.owns(j, s.dstate) && p.initial_state.present()
               ? load_param(p.initial_state, lm.b, lm.e, lm.state(j))
               : 0.f;

  float* chunk_states = static_cast<float*>(p.chunk_states);
  const int64_t row_offset = lm.b * s.dim + lm.e;
  for (int64_t t = 0; t < s.seqlen; ++t) {
    if (t % kChunkLen == 0) {
      float* saved = chunk_states + (row_offset * s.n_chunks + t / kChunkLen) * s.dstate;
#pragma unroll
      for (int j = 0; j < kMaxStatesPerLane; ++j)
        if (lm.owns(j, s.dstate)) saved[lm.state(j)] = G[j];
    }
    advance_states<input_t, true>(p, lm, t, coupling_weights, G, G_next);
#pragma unroll
    for (int j = 0; j < kMaxStatesPerLane; ++j) G[j] = G_next[j];
  }
  float* final_state = static_cast<float*>(p.final_state) + row_offset * s.dstate;
#pragma unroll
  for (int j = 0; j < kMaxStatesPerLane; ++j)
    if (lm.owns(j, s.dstate)) final_state[lm.state(j)] = G[j];
}

template <typename input_t>
cudaError_t launch_fwd(const ScanFwdParams& p, cudaStream_t stream) {
  const ScanShape& s = p.shape;
  const RowShape shape = row_shape(s.dstate);
  const int rows_per_block = kFwdThreads / shape.R;
  const int64_t blocks = s.batch * ((s.dim + rows_per_block - 1) / rows_per_block);
  if (blocks == 0) return cudaSuccess;
  const size_t smem = s.n_modalities * sizeof(float);
  coupled_scan_fwd_kernel<input_t><<<blocks, kFwdThreads, smem, stream>>>(p, shape.R, shape.n_states);
  return cudaGetLastError();
}

}  // namespace

cudaError_t coupled_scan_fwd_cuda(const ScanFwdParams& params, InputDtype dtype,
                                  cudaStream_t stream) {
  return COUPLED_MAMBA_DISPATCH_INPUT(dtype, [&] { return launch_fwd<input_t>(params, stream); });
}

}  // namespace coupled_mamba
