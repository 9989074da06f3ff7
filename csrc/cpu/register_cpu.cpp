// CPU implementations of the coupled_mamba operators.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../coupled_scan.h"
#include "coupled_scan_cpu.h"

namespace coupled_mamba {
namespace {

void launch_forward_cpu(const ScanFwdCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.y.scalar_type(), "coupled_scan_fwd_cpu",
                                  [&] { coupled_scan_fwd_cpu<scalar_t>(call.params); });
}

ScanFwdOutputs scan_cpu(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                        const Tensor& C, const OptTensor& D, const OptTensor& z,
                        const OptTensor& delta_bias, bool delta_softplus, const Tensor& coupling,
                        const OptTensor& initial_state) {
  ScanFwdCall call = prepare_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          coupling, initial_state, "coupled_selective_scan");
  if (!call.complete_without_kernel(initial_state)) launch_forward_cpu(call);
  return call.outputs();
}

ScanBwdOutputs scan_backward_cpu(const Tensor& dy, const OptTensor& dfinal_state, const Tensor& u,
                                 const Tensor& delta, const Tensor& A, const Tensor& B,
                                 const Tensor& C, const OptTensor& D, const OptTensor& z,
                                 const OptTensor& delta_bias, bool delta_softplus,
                                 const Tensor& coupling, const OptTensor& initial_state,
                                 const Tensor& chunk_states, const Tensor& y_ungated) {
  ScanBwdCall call = prepare_scan_backward(dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias,
                                           delta_softplus, coupling, initial_state, chunk_states,
                                           y_ungated);
  if (call.complete_without_kernel(dfinal_state)) return call.finish();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "coupled_scan_bwd_cpu",
                                  [&] { coupled_scan_bwd_cpu<scalar_t>(call.params); });
  return call.finish();
}

std::tuple<Tensor, Tensor> state_update_cpu(const Tensor& state, const Tensor& u,
                                            const Tensor& delta, const Tensor& A, const Tensor& B,
                                            const Tensor& C, const OptTensor& D, const OptTensor& z,
                                            const OptTensor& delta_bias, bool delta_softplus,
                                            const Tensor& coupling) {
  return state_update_via_scan(launch_forward_cpu, state, u, delta, A, B, C, D, z, delta_bias,
                               delta_softplus, coupling);
}

}  // namespace

TORCH_LIBRARY_IMPL(coupled_mamba, CPU, m) {
  m.impl("scan", &scan_cpu);
  m.impl("scan_backward", &scan_backward_cpu);
  m.impl("state_update", &state_update_cpu);
}

}  // namespace coupled_mamba
