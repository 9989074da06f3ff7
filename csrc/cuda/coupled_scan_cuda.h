// CUDA launchers of the coupled selective scan. Plain C++ (no torch): the torch-facing
// register_cuda.cpp checks arguments, fills the params and calls these on the current
// stream. Each returns the launch's error code.
#pragma once
#include <cuda_runtime.h>

#include "coupled_mamba/params.h"

namespace coupled_mamba {

// Two thread mappings (docs/kernels.md): "state lanes" (the default: a row's states spread
// over lanes, each lane walking time) and "time lanes" (a row's steps spread over lanes, one
// shuffle scan over time per state). Both forwards write the same outputs, chunk states
// included, so either pairs with either backward.
cudaError_t coupled_scan_fwd_state_lanes_cuda(const ScanFwdParams& params, InputDtype dtype,
                                              cudaStream_t stream);
cudaError_t coupled_scan_fwd_time_lanes_cuda(const ScanFwdParams& params, InputDtype dtype,
                                             cudaStream_t stream);

// The state-lanes backward covers up to 4 modalities and needs more shared memory than the
// default 48 KB (89 KB at M = 3, N = 64): where it does not fit (the shape, the current
// device), the time-lanes backward runs.
bool coupled_scan_bwd_state_lanes_fits(const ScanShape& shape);
cudaError_t coupled_scan_bwd_state_lanes_cuda(const ScanBwdParams& params, InputDtype dtype,
                                              cudaStream_t stream);
// Its deterministic sums (ScanBwdParams' slot strides) need this many slots: blocks of
// channels per batch index (dB, dC), batch indices (dA, dD, dΔ-bias), warps (coupling).
struct BwdSlotCounts {
  int64_t channel_blocks, batch_indices, warps;
};
BwdSlotCounts coupled_scan_bwd_state_lanes_slots(const ScanShape& shape);
// The time-lanes backward ignores the slot strides: its sums over rows go through
// shared-memory atomics as well, so it has no deterministic form.
cudaError_t coupled_scan_bwd_time_lanes_cuda(const ScanBwdParams& params, InputDtype dtype,
                                             cudaStream_t stream);

}  // namespace coupled_mamba
