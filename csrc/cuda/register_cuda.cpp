// CUDA implementations of the coupled_mamba operators: argument checks (shared with the CPU
// backend), launch on the current stream; an empty sequence needs no kernel.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../coupled_scan.h"
#include "coupled_scan_cuda.h"

namespace coupled_mamba {
namespace {

InputDtype input_dtype(const Tensor& u, const char* op) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": argument 'u' expected dtype float32, float16 or bfloat16 on CUDA (float64 is ",
              "supported on the CPU only), got ", dtype);
  return dtype == at::kFloat ? InputDtype::kFloat32
         : dtype == at::kHalf ? InputDtype::kFloat16
                              : InputDtype::kBFloat16;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The kernels' thread mapping (coupled_scan_cuda.h), from COUPLED_MAMBA_CUDA_KERNELS:
// "state_lanes" (the default; the backward falls back to time lanes where the state-lanes
// one does not fit) or "time_lanes". Read at every call, so that a test or a benchmark can
// compare them in one process; the lookup costs far less than a launch.
bool use_state_lanes(const char* op) {
  const char* value = std::getenv("COUPLED_MAMBA_CUDA_KERNELS");
  const std::string choice = value == nullptr || *value == '\0' ? "state_lanes" : value;
  TORCH_CHECK(choice == "state_lanes" || choice == "time_lanes", op,
              ": environment variable COUPLED_MAMBA_CUDA_KERNELS expected 'state_lanes' or ",
              "'time_lanes', got '", choice, "'");
  return choice == "state_lanes";
}

void launch_forward_cuda(const ScanFwdCall& call) {
  const c10::cuda::CUDAGuard guard(call.y.device());
  const char* op = "coupled_selective_scan";
  const InputDtype dtype = input_dtype(call.y, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_state_lanes(op))
    check_launch(coupled_scan_fwd_state_lanes_cuda(call.params, dtype, stream),
                 "coupled_scan_fwd_state_lanes_cuda");
  else
    check_launch(coupled_scan_fwd_time_lanes_cuda(call.params, dtype, stream),
                 "coupled_scan_fwd_time_lanes_cuda");
}

ScanFwdOutputs scan_cuda(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                         const Tensor& C, const OptTensor& D, const OptTensor& z,
                         const OptTensor& delta_bias, bool delta_softplus, const Tensor& coupling,
                         const OptTensor& initial_state) {
  ScanFwdCall call = prepare_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          coupling, initial_state, "coupled_selective_scan");
  if (call.params.shape.seqlen == 0) {  // no step: the final state is the initial one
    if (initial_state)
      call.final_state.copy_(*initial_state);
    else
      call.final_state.zero_();
    return call.outputs();
  }
  launch_forward_cuda(call);
  return call.outputs();
}

ScanBwdOutputs scan_backward_cuda(const Tensor& dy, const OptTensor& dfinal_state,
                                  const Tensor& u, const Tensor& delta, const Tensor& A,
                                  const Tensor& B, const Tensor& C, const OptTensor& D,
                                  const OptTensor& z, const OptTensor& delta_bias,
                                  bool delta_softplus, const Tensor& coupling,
                                  const OptTensor& initial_state, const Tensor& chunk_states,
                                  const Tensor& y_ungated) {
  ScanBwdCall call = prepare_scan_backward(dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias,
                                           delta_softplus, coupling, initial_state, chunk_states,
                                           y_ungated);
  const c10::cuda::CUDAGuard guard(u.device());
  if (call.params.shape.seqlen == 0) {  // no step: the initial state's gradient is the final one's
    if (dfinal_state)
      call.dinitial_state.copy_(*dfinal_state);
    else
      call.dinitial_state.zero_();
    return call.finish();
  }
  const char* op = "coupled_selective_scan backward";
  const InputDtype dtype = input_dtype(u, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_state_lanes(op) && coupled_scan_bwd_state_lanes_fits(call.params.shape))
    check_launch(coupled_scan_bwd_state_lanes_cuda(call.params, dtype, stream),
                 "coupled_scan_bwd_state_lanes_cuda");
  else
    check_launch(coupled_scan_bwd_time_lanes_cuda(call.params, dtype, stream),
                 "coupled_scan_bwd_time_lanes_cuda");
  return call.finish();
}

std::tuple<Tensor, Tensor> state_update_cuda(const Tensor& state, const Tensor& u,
                                             const Tensor& delta, const Tensor& A,
                                             const Tensor& B, const Tensor& C, const OptTensor& D,
                                             const OptTensor& z, const OptTensor& delta_bias,
                                             bool delta_softplus, const Tensor& coupling) {
  return state_update_via_scan(launch_forward_cuda, state, u, delta, A, B, C, D, z, delta_bias,
                               delta_softplus, coupling);
}

}  // namespace

TORCH_LIBRARY_IMPL(coupled_mamba, CUDA, m) {
  m.impl("scan", &scan_cuda);
  m.impl("scan_backward", &scan_backward_cuda);
  m.impl("state_update", &state_update_cuda);
}

}  // namespace coupled_mamba
