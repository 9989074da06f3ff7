// Operator schemas and the argument checks and output allocation both backends share.
#include "coupled_scan.h"

#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

// ATen's per-operator headers rather than <torch/extension.h>: the whole of torch's C++ API
// and pybind11 made this file take a minute to compile on 2 cores, these about 20 s.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace coupled_mamba {
namespace {

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

// Checks one tensor argument against the shape, dtype and device it must have. Every
// message names the operator, the argument, what was expected and what was received.
struct ArgChecker {
  const char* op;
  at::Device device;

  void operator()(const Tensor& t, const char* name, const std::vector<int64_t>& shape,
                  const char* layout, at::ScalarType dtype, const char* dtype_why) const {
    TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), op, ": argument '", name,
                "' expected ", shape.size(), " dims ", layout, ", got ", t.dim(),
                " dims with shape ", shape_str(t.sizes()));
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": argument '", name,
                "' expected shape ", shape_str(shape), " ", layout, ", got ",
                shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == dtype, op, ": argument '", name, "' expected dtype ",
                dtype, " (", dtype_why, "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, op, ": argument '", name, "' expected device ", device,
                " (the device of u), got ", t.device());
  }
};

at::ScalarType accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

const char* accumulation_why(at::ScalarType acc) {
  return acc == at::kDouble ? "float64 with float64 inputs" : "always float32";
}

// The dtype of u (and of delta, z, B, C) must be one the kernels take.
void check_input_dtype(const Tensor& u, const char* op) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              op, ": argument 'u' expected dtype float32, float16, bfloat16 or float64, got ",
              dtype);
}

TensorArg arg(const Tensor& t) {
  TensorArg a;
  a.data = t.data_ptr();
  for (int64_t i = 0; i < t.dim(); ++i) a.stride[i] = t.stride(i);
  return a;
}

TensorArg arg(const OptTensor& t) { return t.has_value() ? arg(*t) : TensorArg{}; }

// Checks every forward argument (docs/contract.md, "Bad input") and returns the problem's shape.
ScanShape check_scan_arguments(const Tensor& u, const Tensor& delta, const Tensor& A,
                               const Tensor& B, const Tensor& C, const OptTensor& D,
                               const OptTensor& z, const OptTensor& delta_bias,
                               const Tensor& coupling, const OptTensor& initial_state,
                               const char* op) {
  TORCH_CHECK(u.dim() == 4, op, ": argument 'u' expected 4 dims (M, batch, dim, L), got ",
              u.dim(), " dims with shape ", shape_str(u.sizes()));
  check_input_dtype(u, op);
  const auto dtype = u.scalar_type();
  const auto acc = accumulation_dtype(dtype);
  const char* acc_why = accumulation_why(acc);
  const int64_t M = u.size(0), batch = u.size(1), dim = u.size(2), L = u.size(3);
  TORCH_CHECK(M >= 1 && M <= kMaxModalities, op, ": argument 'u' expected 1 to ",
              kMaxModalities, " modalities along dim 0, got ", M);
  ArgChecker check{op, u.device()};
  check(delta, "delta", {M, batch, dim, L}, "(M, batch, dim, L), same as u", dtype, "same as u");
  TORCH_CHECK(A.dim() == 3, op, ": argument 'A' expected 3 dims (M, dim, N), got ", A.dim(),
              " dims with shape ", shape_str(A.sizes()));
  const int64_t N = A.size(2);
  TORCH_CHECK(N >= 1 && N <= kMaxDState, op, ": argument 'A' expected a state size N from 1 to ",
              kMaxDState, " (last dim), got ", N);
  check(A, "A", {M, dim, N}, "(M, dim, N)", acc, acc_why);
  check(B, "B", {M, batch, N, L}, "(M, batch, N, L)", dtype, "same as u");
  check(C, "C", {M, batch, N, L}, "(M, batch, N, L)", dtype, "same as u");
  if (D) check(*D, "D", {M, dim}, "(M, dim)", acc, acc_why);
  if (z) check(*z, "z", {M, batch, dim, L}, "(M, batch, dim, L), same as u", dtype, "same as u");
  if (delta_bias) check(*delta_bias, "delta_bias", {M, dim}, "(M, dim)", acc, acc_why);
  check(coupling, "coupling", {M}, "(M,)", acc, acc_why);
  if (initial_state)
    check(*initial_state, "initial_state", {batch, dim, N}, "(batch, dim, N)", acc, acc_why);

  return {M, batch, dim, L, N, (L + kChunkLen - 1) / kChunkLen};
}

// The read-only arguments that forward and backward share.
template <typename Params>
void fill_scan_inputs(Params& p, const ScanShape& shape, bool delta_softplus, const Tensor& u,
                      const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                      const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                      const Tensor& coupling) {
  p.shape = shape;
  p.delta_softplus = delta_softplus;
  p.u = arg(u);
  p.delta = arg(delta);
  p.z = arg(z);
  p.B = arg(B);
  p.C = arg(C);
  p.A = arg(A);
  p.D = arg(D);
  p.delta_bias = arg(delta_bias);
  p.coupling = arg(coupling);
}

// An output that every kernel must write in full. With COUPLED_MAMBA_POISON_OUTPUTS=1 in the
// environment it starts as NaN instead of uninitialised memory (which may still hold a
// right answer from an earlier call), so that a test sees any element a kernel missed.
Tensor output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* flag = std::getenv("COUPLED_MAMBA_POISON_OUTPUTS");
    return flag != nullptr && std::string(flag) == "1";
  }();
  Tensor t = at::empty(sizes, options);
  if (poison && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace

ScanFwdCall prepare_scan_forward(const Tensor& u, const Tensor& delta, const Tensor& A,
                                 const Tensor& B, const Tensor& C, const OptTensor& D,
                                 const OptTensor& z, const OptTensor& delta_bias,
                                 bool delta_softplus, const Tensor& coupling,
                                 const OptTensor& initial_state, const char* op) {
  const ScanShape shape = check_scan_arguments(u, delta, A, B, C, D, z, delta_bias, coupling,
                                               initial_state, op);
  const int64_t M = shape.n_modalities, batch = shape.batch, dim = shape.dim, L = shape.seqlen;
  const auto acc = accumulation_dtype(u.scalar_type());
  ScanFwdCall call;
  call.y = output({M, batch, dim, L}, u.options());
  call.y_ungated = z ? output({M, batch, dim, L}, u.options()) : at::empty({0}, u.options());
  // (batch, dim, n_chunks·N): the chunk axis folded into the state axis, so that a
  // sequence of one chunk (L <= 64) has no axis of size 1, whose contiguity check made
  // torch.export specialise the traced length to L <= 64 (tests/test_scan_registration.py).
  call.chunk_states =
      output({batch, dim, shape.n_chunks * shape.dstate}, u.options().dtype(acc));
  call.final_state = output({batch, dim, shape.dstate}, u.options().dtype(acc));

  ScanFwdParams& p = call.params;
  fill_scan_inputs(p, shape, delta_softplus, u, delta, A, B, C, D, z, delta_bias, coupling);
  p.initial_state = arg(initial_state);
  p.y = call.y.data_ptr();
  p.y_ungated = z ? call.y_ungated.data_ptr() : nullptr;
  p.chunk_states = call.chunk_states.data_ptr();
  p.final_state = call.final_state.data_ptr();
  return call;
}

ScanBwdCall prepare_scan_backward(const Tensor& dy, const OptTensor& dfinal_state,
                                  const Tensor& u, const Tensor& delta, const Tensor& A,
                                  const Tensor& B, const Tensor& C, const OptTensor& D,
                                  const OptTensor& z, const OptTensor& delta_bias,
                                  bool delta_softplus, const Tensor& coupling,
                                  const OptTensor& initial_state, const Tensor& chunk_states,
                                  const Tensor& y_ungated) {
  const char* op = "coupled_selective_scan backward";
  // The forward arguments were checked when the forward ran; re-check them here because
  // the backward op is public too, then the tensors that only backward takes.
  const ScanShape s = check_scan_arguments(u, delta, A, B, C, D, z, delta_bias, coupling,
                                           initial_state, op);
  const auto dtype = u.scalar_type();
  const auto acc = accumulation_dtype(dtype);
  ArgChecker check{op, u.device()};
  check(dy, "dy", {s.n_modalities, s.batch, s.dim, s.seqlen}, "(M, batch, dim, L)", dtype,
        "same as u");
  if (dfinal_state)
    check(*dfinal_state, "dfinal_state", {s.batch, s.dim, s.dstate}, "(batch, dim, N)", acc,
          "accumulation dtype");
  check(chunk_states, "chunk_states", {s.batch, s.dim, s.n_chunks * s.dstate},
        "(batch, dim, n_chunks·N), from forward", acc, "accumulation dtype");
  if (z)
    check(y_ungated, "y_ungated", {s.n_modalities, s.batch, s.dim, s.seqlen},
          "(M, batch, dim, L), from forward", dtype, "same as u");
  else  // unused, but an argument on another device is a mistake all the same
    TORCH_CHECK(y_ungated.device() == u.device(), op, ": argument 'y_ungated' expected device ",
                u.device(), " (the device of u), got ", y_ungated.device());

  ScanBwdCall call;
  const auto acc_opts = u.options().dtype(acc);
  // A distinct empty tensor for each absent gradient: outputs must not alias (opcheck).
  const auto none = [&] { return at::empty({0}, acc_opts); };
  call.du = output(u.sizes(), u.options());
  call.ddelta = output(u.sizes(), u.options());
  call.dz = z ? output(u.sizes(), u.options()) : none();
  call.dA = at::zeros(A.sizes(), acc_opts);
  call.dB = at::zeros(B.sizes(), acc_opts);
  call.dC = at::zeros(C.sizes(), acc_opts);
  call.dD = D ? at::zeros({s.n_modalities, s.dim}, acc_opts) : none();
  call.ddelta_bias = delta_bias ? at::zeros({s.n_modalities, s.dim}, acc_opts) : none();
  call.dcoupling = at::zeros({s.n_modalities}, acc_opts);
  call.dinitial_state = output({s.batch, s.dim, s.dstate}, acc_opts);
  call.has_initial_state = initial_state.has_value();

  ScanBwdParams& p = call.params;
  fill_scan_inputs(p, s, delta_softplus, u, delta, A, B, C, D, z, delta_bias, coupling);
  p.dy = arg(dy);
  p.dfinal_state = arg(dfinal_state);
  // The kernels index (batch, dim, n_chunks, N): the chunk axis unfolded, for any strides.
  p.chunk_states = arg(chunk_states);
  p.chunk_states.stride[2] = s.dstate * chunk_states.stride(2);
  p.chunk_states.stride[3] = chunk_states.stride(2);
  p.y_ungated = z ? arg(y_ungated) : TensorArg{};
  p.du = call.du.data_ptr();
  p.ddelta = call.ddelta.data_ptr();
  p.dz = z ? call.dz.data_ptr() : nullptr;
  p.dA = call.dA.data_ptr();
  p.dB = call.dB.data_ptr();
  p.dC = call.dC.data_ptr();
  for (int i = 0; i < 4; ++i) p.dBC_stride[i] = call.dB.stride(i);
  p.dD = D ? call.dD.data_ptr() : nullptr;
  p.ddelta_bias = delta_bias ? call.ddelta_bias.data_ptr() : nullptr;
  p.dcoupling = call.dcoupling.data_ptr();
  p.dinitial_state = call.dinitial_state.data_ptr();
  return call;
}

namespace {
bool has_no_work(const ScanShape& s) { return s.batch == 0 || s.dim == 0 || s.seqlen == 0; }

void copy_or_zero(Tensor& out, const OptTensor& from) {
  if (from)
    out.copy_(*from);
  else
    out.zero_();
}
}  // namespace

bool ScanFwdCall::complete_without_kernel(const OptTensor& initial_state) {
  if (!has_no_work(params.shape)) return false;
  copy_or_zero(final_state, initial_state);
  return true;  // y, y_ungated and chunk_states have no element (L = 0 or no row)
}

bool ScanBwdCall::complete_without_kernel(const OptTensor& dfinal_state) {
  if (!has_no_work(params.shape)) return false;
  copy_or_zero(dinitial_state, dfinal_state);
  return true;  // du, ddelta, dz have no element; dA, dB, ... were allocated as zeros
}

ScanBwdOutputs ScanBwdCall::finish() const {
  const auto input_dtype = du.scalar_type();
  const Tensor dinit = has_initial_state ? dinitial_state : at::empty({0}, dA.options());
  return {du, ddelta, dA, dB.to(input_dtype), dC.to(input_dtype),
          dD, dz, ddelta_bias, dcoupling, dinit};
}

std::tuple<Tensor, Tensor> state_update_via_scan(
    LaunchForwardFn launch_forward, const Tensor& state, const Tensor& u, const Tensor& delta,
    const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
    const OptTensor& delta_bias, bool delta_softplus, const Tensor& coupling) {
  const char* op = "coupled_selective_state_update";
  // The step's own arguments are checked in the step's terms (no L axis, `state`); the
  // scan's checks below then cover A, D, delta_bias and coupling.
  TORCH_CHECK(u.dim() == 3, op, ": argument 'u' expected 3 dims (M, batch, dim), got ", u.dim(),
              " dims with shape ", shape_str(u.sizes()));
  check_input_dtype(u, op);
  TORCH_CHECK(A.dim() == 3, op, ": argument 'A' expected 3 dims (M, dim, N), got ", A.dim(),
              " dims with shape ", shape_str(A.sizes()));
  TORCH_CHECK(B.dim() == 3, op, ": argument 'B' expected 3 dims (M, batch, N), got ", B.dim(),
              " dims with shape ", shape_str(B.sizes()));
  TORCH_CHECK(C.dim() == 3, op, ": argument 'C' expected 3 dims (M, batch, N), got ", C.dim(),
              " dims with shape ", shape_str(C.sizes()));
  const int64_t M = u.size(0), batch = u.size(1), dim = u.size(2), N = A.size(2);
  const auto dtype = u.scalar_type();
  const auto acc = accumulation_dtype(dtype);
  const ArgChecker check{op, u.device()};
  check(delta, "delta", {M, batch, dim}, "(M, batch, dim), same as u", dtype, "same as u");
  if (z) check(*z, "z", {M, batch, dim}, "(M, batch, dim), same as u", dtype, "same as u");
  check(B, "B", {M, batch, N}, "(M, batch, N)", dtype, "same as u");
  check(C, "C", {M, batch, N}, "(M, batch, N)", dtype, "same as u");
  check(state, "state", {batch, dim, N}, "(batch, dim, N)", acc, accumulation_why(acc));
  const auto one_step = [](const Tensor& t) { return t.unsqueeze(-1); };
  const OptTensor z_step = z ? OptTensor(one_step(*z)) : std::nullopt;
  ScanFwdCall call =
      prepare_scan_forward(one_step(u), one_step(delta), A, one_step(B), one_step(C), D, z_step,
                           delta_bias, delta_softplus, coupling, state, op);
  if (!call.complete_without_kernel(state)) launch_forward(call);
  return {call.y.squeeze(-1), call.final_state};
}

TORCH_LIBRARY(coupled_mamba, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor coupling, Tensor? initial_state) "
      "-> (Tensor y, Tensor final_state, Tensor chunk_states, Tensor y_ungated)",
      tags);
  m.def(
      "scan_backward(Tensor dy, Tensor? dfinal_state, Tensor u, Tensor delta, Tensor A, "
      "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, "
      "Tensor coupling, Tensor? initial_state, Tensor chunk_states, Tensor y_ungated) "
      "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
      "Tensor ddelta_bias, Tensor dcoupling, Tensor dinitial_state)",
      tags);
  m.def(
      "state_update(Tensor state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor coupling) "
      "-> (Tensor y, Tensor new_state)",
      tags);
}

}  // namespace coupled_mamba
