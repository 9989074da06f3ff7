// CUDA implementations of the coupled_mamba operators: argument checks (shared with the CPU
// backend), launch on the current stream; an empty sequence needs no kernel.
#include <ATen/Context.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

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

// Under torch.use_deterministic_algorithms: the state-lanes backward adds each block's sums
// into a slot of its own (params.h), one add per address onto zero, and the slots are summed
// here by PyTorch's reductions, whose order is fixed. The slots cost memory: (blocks of
// channels per batch index) × the size of dB and dC, batch × that of dA, dD, dΔ-bias.
void backward_state_lanes_deterministic(ScanBwdCall& call, InputDtype dtype,
                                        cudaStream_t stream) {
  const BwdSlotCounts count = coupled_scan_bwd_state_lanes_slots(call.params.shape);
  const auto slots = [](const Tensor& sum, int64_t n) {
    std::vector<int64_t> sizes{n};
    sizes.insert(sizes.end(), sum.sizes().begin(), sum.sizes().end());
    return at::zeros(sizes, sum.options());
  };
  ScanBwdParams p = call.params;
  const Tensor dB = slots(call.dB, count.channel_blocks), dC = slots(call.dC, count.channel_blocks);
  const Tensor dA = slots(call.dA, count.batch_indices);
  const Tensor dcoupling = slots(call.dcoupling, count.warps);
  const Tensor dD = p.dD ? slots(call.dD, count.batch_indices) : Tensor();
  const Tensor ddelta_bias = p.ddelta_bias ? slots(call.ddelta_bias, count.batch_indices) : Tensor();
  p.dB = dB.data_ptr();
  p.dC = dC.data_ptr();
  for (int i = 0; i < 4; ++i) p.dBC_stride[i] = dB.stride(i + 1);
  p.dBC_slot_stride = dB.stride(0);
  p.dA = dA.data_ptr();
  p.dA_slot_stride = dA.stride(0);
  p.dcoupling = dcoupling.data_ptr();
  p.dcoupling_slot_stride = dcoupling.stride(0);
  if (p.dD) p.dD = dD.data_ptr();
  if (p.ddelta_bias) p.ddelta_bias = ddelta_bias.data_ptr();
  p.dD_slot_stride = p.shape.n_modalities * p.shape.dim;  // dD, dΔ-bias: (M, dim) each
  check_launch(coupled_scan_bwd_state_lanes_cuda(p, dtype, stream),
               "coupled_scan_bwd_state_lanes_cuda (deterministic)");
  // Into the gradients prepare_scan_backward allocated: no second tensor of each size.
  at::sum_out(call.dB, dB, 0);
  at::sum_out(call.dC, dC, 0);
  at::sum_out(call.dA, dA, 0);
  at::sum_out(call.dcoupling, dcoupling, 0);
  if (p.dD) at::sum_out(call.dD, dD, 0);
  if (p.ddelta_bias) at::sum_out(call.ddelta_bias, ddelta_bias, 0);
}

ScanFwdOutputs scan_cuda(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                         const Tensor& C, const OptTensor& D, const OptTensor& z,
                         const OptTensor& delta_bias, bool delta_softplus, const Tensor& coupling,
                         const OptTensor& initial_state) {
  ScanFwdCall call = prepare_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          coupling, initial_state, "coupled_selective_scan");
  if (!call.complete_without_kernel(initial_state)) launch_forward_cuda(call);
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
  if (call.complete_without_kernel(dfinal_state)) return call.finish();
  const char* op = "coupled_selective_scan backward";
  const InputDtype dtype = input_dtype(u, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_state_lanes(op) && coupled_scan_bwd_state_lanes_fits(call.params.shape)) {
    if (at::globalContext().deterministicAlgorithms())
      backward_state_lanes_deterministic(call, dtype, stream);
    else
      check_launch(coupled_scan_bwd_state_lanes_cuda(call.params, dtype, stream),
                   "coupled_scan_bwd_state_lanes_cuda");
  } else {
    // Raises under torch.use_deterministic_algorithms(True), warns with warn_only=True.
    at::globalContext().alertNotDeterministic(
        "coupled_selective_scan backward on CUDA with the time-lanes kernel (more than 4 "
        "modalities, M·N too large for the state-lanes kernel's shared memory, or "
        "COUPLED_MAMBA_CUDA_KERNELS=time_lanes)");
    check_launch(coupled_scan_bwd_time_lanes_cuda(call.params, dtype, stream),
                 "coupled_scan_bwd_time_lanes_cuda");
  }
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
