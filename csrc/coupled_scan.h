// Torch-facing front of the coupled selective scan, shared by the CPU and CUDA backends:
// argument checks, output allocation and filling of the plain params structs. Each backend
// (csrc/cpu, csrc/cuda) registers its kernels for the schemas defined in coupled_scan.cpp.
#pragma once
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "coupled_mamba/params.h"

namespace coupled_mamba {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Outputs of the forward op: y, final_state, chunk_states, y_ungated.
using ScanFwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
// Outputs of the backward op, in argument order: du, ddelta, dA, dB, dC, dD, dz,
// ddelta_bias, dcoupling, dinitial_state (empty tensors for absent optional arguments).
using ScanBwdOutputs =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Checked arguments and allocated outputs of a forward call, ready for a kernel.
struct ScanFwdCall {
  ScanFwdParams params;
  Tensor y, final_state, chunk_states, y_ungated;
  ScanFwdOutputs outputs() const { return {y, final_state, chunk_states, y_ungated}; }
  // A call with no row (batch or dim 0) or no step (L = 0) has nothing for a kernel to do,
  // and is answered here for both backends (the CPU backward once divided by zero with
  // dim = 0): fills what the outputs still hold (the final state is the initial one) and
  // returns true; returns false otherwise.
  bool complete_without_kernel(const OptTensor& initial_state);
};

struct ScanBwdCall {
  ScanBwdParams params;
  // Accumulators are in the accumulation dtype; finish() casts dB and dC to B's dtype.
  Tensor du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dcoupling, dinitial_state;
  bool has_initial_state = false;
  ScanBwdOutputs finish() const;
  // The backward's counterpart of ScanFwdCall::complete_without_kernel: with no row or no
  // step every gradient is empty or zero but the initial state's, which is the final one's.
  bool complete_without_kernel(const OptTensor& dfinal_state);
};

ScanFwdCall prepare_scan_forward(const Tensor& u, const Tensor& delta, const Tensor& A,
                                 const Tensor& B, const Tensor& C, const OptTensor& D,
                                 const OptTensor& z, const OptTensor& delta_bias,
                                 bool delta_softplus, const Tensor& coupling,
                                 const OptTensor& initial_state, const char* op_name);

ScanBwdCall prepare_scan_backward(const Tensor& dy, const OptTensor& dfinal_state,
                                  const Tensor& u, const Tensor& delta, const Tensor& A,
                                  const Tensor& B, const Tensor& C, const OptTensor& D,
                                  const OptTensor& z, const OptTensor& delta_bias,
                                  bool delta_softplus, const Tensor& coupling,
                                  const OptTensor& initial_state, const Tensor& chunk_states,
                                  const Tensor& y_ungated);

// The single-step update is the scan over one time step starting from `state`: both
// backends serve it with their forward kernel, passed in as `launch_forward`.
using LaunchForwardFn = void (*)(const ScanFwdCall&);
std::tuple<Tensor, Tensor> state_update_via_scan(
    LaunchForwardFn launch_forward, const Tensor& state, const Tensor& u, const Tensor& delta,
    const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
    const OptTensor& delta_bias, bool delta_softplus, const Tensor& coupling);

}  // namespace coupled_mamba
