// CUDA launchers of the coupled selective scan. Plain C++ (no torch): the torch-facing
// register_cuda.cpp checks arguments, fills the params and calls these on the current
// stream. Each returns the launch's error code.
#pragma once
#include <cuda_runtime.h>

#include "coupled_mamba/params.h"

namespace coupled_mamba {

cudaError_t coupled_scan_fwd_cuda(const ScanFwdParams& params, InputDtype dtype,
                                  cudaStream_t stream);

cudaError_t coupled_scan_bwd_cuda(const ScanBwdParams& params, InputDtype dtype,
                                  cudaStream_t stream);

}  // namespace coupled_mamba
