// Runs the CUDA scan kernels of csrc/cuda on the CPU emulator (cuda_runtime.h here) for one
// problem and writes their outputs, for tests/test_cuda_emulated.py to compare with the
// float64 reference.
//
//   emulate_scan MODE MAPPING DTYPE M BATCH DIM L N FLAGS DIR
//
// MODE fwd (forward) or bwd (forward, then backward); MAPPING state_lanes or time_lanes (for
// both, the backward falling back to time lanes where state lanes do not fit, as in
// register_cuda.cpp, and printing which ran); DTYPE float32, float16 or bfloat16 (of u, delta, z, B, C, dy); FLAGS letters
// for what is present: D, z, b (delta_bias), s (softplus), i (initial state), f (gradient of
// the final state), t (B and C stored time-major: strides (.., .., 1, N)), d (deterministic
// sums, state-lanes backward only: a slot per block group, summed here in slot order, as
// register_cuda.cpp does under torch.use_deterministic_algorithms); "-" for none.
// `emulate_scan fastmath COUNT DIR` instead applies the staging's softplus_fast and
// sigmoid_fast (scan_cuda_common.cuh) to the COUNT values of DIR/x.f32.
// DIR holds the inputs as raw little-endian float32 files named after the arguments (u.f32,
// ...; the low-precision ones already exactly representable) and receives the outputs the
// same way (y.f32, chunk_states.f32, ..., du.f32, dA.f32, ...). Outputs the kernels must
// write in full start as NaN; accumulated ones start at zero.
#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "coupled_mamba/params.h"
#include "../../csrc/cuda/coupled_scan_cuda.h"
#include "../../csrc/cuda/scan_cuda_common.cuh"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace {
using namespace coupled_mamba;

std::string dir;

std::vector<float> read(const std::string& name, size_t count) {
  std::ifstream in(dir + "/" + name + ".f32", std::ios::binary);
  if (!in) throw std::runtime_error("missing input " + name + ".f32");
  std::vector<float> v(count);
  in.read(reinterpret_cast<char*>(v.data()), count * 4);
  if (static_cast<size_t>(in.gcount()) != count * 4)
    throw std::runtime_error("input " + name + ".f32: expected " + std::to_string(count) + " floats");
  return v;
}

void write(const std::string& name, const std::vector<float>& v) {
  std::ofstream out(dir + "/" + name + ".f32", std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

float to_f(float x) { return x; }
float to_f(__half x) { return __half2float(x); }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f(float x);
template <> float from_f<float>(float x) { return x; }
template <> __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_f<T>(v[i]);
  return out;
}
template <typename T>
std::vector<float> back(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_f(v[i]);
  return out;
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();

using Strides = std::array<int64_t, 4>;

TensorArg arg(const void* data, Strides strides) {
  TensorArg a;
  a.data = data;
  for (int i = 0; i < 4; ++i) a.stride[i] = strides[i];
  return a;
}

// The sum over `slots` consecutive slots of v, each of v.size() / slots values, in slot order.
std::vector<float> sum_slots(const std::vector<float>& v, int64_t slots) {
  std::vector<float> sum(v.size() / slots, 0.f);
  for (int64_t slot = 0; slot < slots; ++slot)
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += v[slot * sum.size() + i];
  return sum;
}

template <typename T>
int run(const std::string& mode, const std::string& mapping, InputDtype dtype, int64_t M,
        int64_t batch, int64_t dim, int64_t L, int64_t N, const std::string& flags) {
  const auto has = [&](char c) { return flags.find(c) != std::string::npos; };
  const size_t seq = M * batch * dim * L, bc = M * batch * N * L;
  const int64_t n_chunks = (L + kChunkLen - 1) / kChunkLen;
  // Inputs in the input dtype (u, delta, z, B, C, dy) or float32 (the rest).
  const auto u = convert<T>(read("u", seq)), delta = convert<T>(read("delta", seq));
  const auto B = convert<T>(read("B", bc)), C = convert<T>(read("C", bc));
  const auto z = has('z') ? convert<T>(read("z", seq)) : std::vector<T>();
  const auto A = read("A", M * dim * N), coupling = read("coupling", M);
  const auto D = has('D') ? read("D", M * dim) : std::vector<float>();
  const auto bias = has('b') ? read("delta_bias", M * dim) : std::vector<float>();
  const auto init = has('i') ? read("initial_state", batch * dim * N) : std::vector<float>();

  ScanFwdParams p{};
  p.shape = {M, batch, dim, L, N, n_chunks};
  p.delta_softplus = has('s');
  const Strides seq_strides = {batch * dim * L, dim * L, L, 1};
  p.u = arg(u.data(), seq_strides);
  p.delta = arg(delta.data(), seq_strides);
  if (has('z')) p.z = arg(z.data(), seq_strides);
  // B, C: logical (M, batch, N, L); stored (M, batch, L, N) with 't'.
  const Strides bc_strides = has('t') ? Strides{batch * N * L, N * L, 1, N}
                                      : Strides{batch * N * L, N * L, L, 1};
  std::vector<T> B_store = B, C_store = C;
  if (has('t'))
    for (int64_t mb = 0; mb < M * batch; ++mb)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < L; ++t) {
          B_store[(mb * L + t) * N + n] = B[(mb * N + n) * L + t];
          C_store[(mb * L + t) * N + n] = C[(mb * N + n) * L + t];
        }
  p.B = arg(B_store.data(), bc_strides);
  p.C = arg(C_store.data(), bc_strides);
  p.A = arg(A.data(), {dim * N, N, 1});
  if (has('D')) p.D = arg(D.data(), {dim, 1});
  if (has('b')) p.delta_bias = arg(bias.data(), {dim, 1});
  p.coupling = arg(coupling.data(), {1});
  if (has('i')) p.initial_state = arg(init.data(), {dim * N, N, 1});

  std::vector<T> y(seq, from_f<T>(kNaN)), y_ungated(has('z') ? seq : 0, from_f<T>(kNaN));
  std::vector<float> chunk_states(batch * dim * n_chunks * N, kNaN), final_state(batch * dim * N, kNaN);
  p.y = y.data();
  p.y_ungated = has('z') ? y_ungated.data() : nullptr;
  p.chunk_states = chunk_states.data();
  p.final_state = final_state.data();
  const cudaError_t err = mapping == "state_lanes" ? coupled_scan_fwd_state_lanes_cuda(p, dtype, nullptr)
                                                   : coupled_scan_fwd_time_lanes_cuda(p, dtype, nullptr);
  if (err != cudaSuccess) return 3;
  write("y", back(y));
  if (has('z')) write("y_ungated", back(y_ungated));
  write("chunk_states", chunk_states);
  write("final_state", final_state);
  if (mode == "fwd") return 0;

  const auto dy = convert<T>(read("dy", seq));
  const auto dfinal = has('f') ? read("dfinal_state", batch * dim * N) : std::vector<float>();
  ScanBwdParams g{};
  g.shape = p.shape;
  g.delta_softplus = p.delta_softplus;
  g.u = p.u, g.delta = p.delta, g.z = p.z, g.B = p.B, g.C = p.C, g.A = p.A, g.D = p.D;
  g.delta_bias = p.delta_bias, g.coupling = p.coupling;
  g.dy = arg(dy.data(), seq_strides);
  if (has('f')) g.dfinal_state = arg(dfinal.data(), {dim * N, N, 1});
  g.chunk_states = arg(chunk_states.data(), {dim * n_chunks * N, n_chunks * N, N, 1});
  if (has('z')) g.y_ungated = arg(y_ungated.data(), seq_strides);
  // As register_cuda.cpp chooses: state lanes where they fit, else time lanes.
  const bool state_lanes = mapping == "state_lanes" && coupled_scan_bwd_state_lanes_fits(g.shape);
  if (has('d') && !state_lanes) {
    std::fprintf(stderr, "emulate_scan: flag d needs the state-lanes backward\n");
    return 2;
  }
  const BwdSlotCounts slots = has('d') ? coupled_scan_bwd_state_lanes_slots(g.shape)
                                       : BwdSlotCounts{1, 1, 1};
  std::vector<T> du(seq, from_f<T>(kNaN)), ddelta(seq, from_f<T>(kNaN)), dz(has('z') ? seq : 0, from_f<T>(kNaN));
  std::vector<float> dA(slots.batch_indices * M * dim * N, 0.f), dB(slots.channel_blocks * bc, 0.f),
      dC(slots.channel_blocks * bc, 0.f), dD(slots.batch_indices * M * dim, 0.f),
      dbias(slots.batch_indices * M * dim, 0.f), dcoupling(slots.warps * M, 0.f),
      dinit(batch * dim * N, kNaN);
  if (has('d')) {
    g.dBC_slot_stride = bc;
    g.dA_slot_stride = M * dim * N;
    g.dD_slot_stride = M * dim;
    g.dcoupling_slot_stride = M;
  }
  g.du = du.data(), g.ddelta = ddelta.data(), g.dz = has('z') ? dz.data() : nullptr;
  g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data();
  const int64_t dbc_strides[4] = {batch * N * L, N * L, L, 1};
  for (int i = 0; i < 4; ++i) g.dBC_stride[i] = dbc_strides[i];
  g.dD = has('D') ? dD.data() : nullptr;
  g.ddelta_bias = has('b') ? dbias.data() : nullptr;
  g.dcoupling = dcoupling.data();
  g.dinitial_state = dinit.data();
  if ((state_lanes ? coupled_scan_bwd_state_lanes_cuda(g, dtype, nullptr)
                   : coupled_scan_bwd_time_lanes_cuda(g, dtype, nullptr)) != cudaSuccess)
    return 3;
  std::printf("backward: %s\n", state_lanes ? "state_lanes" : "time_lanes");
  write("du", back(du));
  write("ddelta", back(ddelta));
  if (has('z')) write("dz", back(dz));
  write("dA", sum_slots(dA, slots.batch_indices));
  write("dB", sum_slots(dB, slots.channel_blocks));
  write("dC", sum_slots(dC, slots.channel_blocks));
  if (has('D')) write("dD", sum_slots(dD, slots.batch_indices));
  if (has('b')) write("ddelta_bias", sum_slots(dbias, slots.batch_indices));
  write("dcoupling", sum_slots(dcoupling, slots.warps));
  write("dinitial_state", dinit);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "fastmath") {  // emulate_scan fastmath COUNT DIR
    dir = argv[3];
    const std::vector<float> x = read("x", std::atoll(argv[2]));
    std::vector<float> softplus(x.size()), sigmoid(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      softplus[i] = coupled_mamba::softplus_fast(x[i]);
      sigmoid[i] = coupled_mamba::sigmoid_fast(x[i]);
    }
    write("softplus_fast", softplus);
    write("sigmoid_fast", sigmoid);
    return 0;
  }
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s MODE MAPPING DTYPE M BATCH DIM L N FLAGS DIR\n"
                 "       %s fastmath COUNT DIR\n", argv[0], argv[0]);
    return 2;
  }
  const std::string mode = argv[1], mapping = argv[2], dtype = argv[3];
  const int64_t M = std::atoll(argv[4]), batch = std::atoll(argv[5]), dim = std::atoll(argv[6]),
                L = std::atoll(argv[7]), N = std::atoll(argv[8]);
  dir = argv[10];
  try {
    if (dtype == "float32") return run<float>(mode, mapping, InputDtype::kFloat32, M, batch, dim, L, N, argv[9]);
    if (dtype == "float16") return run<__half>(mode, mapping, InputDtype::kFloat16, M, batch, dim, L, N, argv[9]);
    if (dtype == "bfloat16")
      return run<__nv_bfloat16>(mode, mapping, InputDtype::kBFloat16, M, batch, dim, L, N, argv[9]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_scan: %s\n", e.what());
    return 2;
  }
  std::fprintf(stderr, "emulate_scan: unknown dtype %s\n", dtype.c_str());
  return 2;
}
