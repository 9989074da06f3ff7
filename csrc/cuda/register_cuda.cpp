// CUDA implementations of the coupled_mamba operators: argument checks (shared with the CPU
// backend), B and C laid out with the state index contiguous, launch on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

// A lane reads B[m, b, n, t] and C[...] for its own states n at one step t: with n
// contiguous, a warp's loads coalesce. Returns a (M, batch, L, N)-contiguous copy seen
// through (M, batch, N, L) strides, or `x` itself when n is contiguous already (or when x
// is not 4-D: the argument checks then report it).
Tensor states_contiguous(const Tensor& x) {
  if (x.dim() != 4 || x.stride(2) == 1) return x;
  return x.transpose(2, 3).contiguous().transpose(2, 3);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void launch_forward_cuda(const ScanFwdCall& call) {
  const c10::cuda::CUDAGuard guard(call.y.device());
  check_launch(coupled_scan_fwd_cuda(call.params, input_dtype(call.y, "coupled_selective_scan"),
                                     c10::cuda::getCurrentCUDAStream()),
               "coupled_scan_fwd_cuda");
}

ScanFwdOutputs scan_cuda(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                         const Tensor& C, const OptTensor& D, const OptTensor& z,
                         const OptTensor& delta_bias, bool delta_softplus, const Tensor& coupling,
                         const OptTensor& initial_state) {
  // Named, not temporaries: the params point into them until the kernel has been queued.
  const Tensor B_states = states_contiguous(B), C_states = states_contiguous(C);
  ScanFwdCall call = prepare_scan_forward(u, delta, A, B_states, C_states, D, z, delta_bias,
                                          delta_softplus, coupling, initial_state,
                                          "coupled_selective_scan");
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
  // Named, not temporaries: the params point into them until the kernel has been queued
  // (a temporary's memory could be reused by the allocations below before the launch).
  const Tensor B_states = states_contiguous(B), C_states = states_contiguous(C);
  ScanBwdCall call = prepare_scan_backward(dy, dfinal_state, u, delta, A, B_states, C_states, D,
                                           z, delta_bias, delta_softplus, coupling, initial_state,
                                           chunk_states, y_ungated);
  // The dB, dC accumulators get the same state-contiguous layout as B and C.
  call.dB = states_contiguous(call.dB);
  call.dC = states_contiguous(call.dC);
  call.params.dB = call.dB.data_ptr();
  call.params.dC = call.dC.data_ptr();
  for (int i = 0; i < 4; ++i) call.params.dBC_stride[i] = call.dB.stride(i);
  const c10::cuda::CUDAGuard guard(u.device());
  check_launch(coupled_scan_bwd_cuda(call.params, input_dtype(u, "coupled_selective_scan backward"),
                                     c10::cuda::getCurrentCUDAStream()),
               "coupled_scan_bwd_cuda");
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
