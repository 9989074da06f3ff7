// Plain parameter structs passed from the torch-facing C++ code to the CPU and CUDA kernels.
// No torch header here: the .cu files include this and compile with nvcc alone.
#pragma once
#include <cstdint>

#include "coupled_mamba/macros.h"

namespace coupled_mamba {

// Forward keeps the coupled state only at the start of every chunk of kChunkLen steps;
// backward recomputes the states inside one chunk at a time. The Python layer reads this
// value as _C.CHUNK_LEN.
constexpr int kChunkLen = 64;
// Largest supported state size N (registers / scratch are sized by it).
constexpr int kMaxDState = 256;
// Largest supported number of modalities M.
constexpr int kMaxModalities = 16;

// The dtype of u, delta, z, B, C (and of y, du, ddelta, dz) for the CUDA launchers, which
// take no torch types.
enum class InputDtype { kFloat32, kFloat16, kBFloat16 };

// A read-only tensor argument: its data and element strides (64-bit, any layout).
// data == nullptr when an optional argument is absent. Dimension order is the one the
// field's comment gives.
struct TensorArg {
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  CM_HOST_DEVICE bool present() const { return data != nullptr; }
};

struct ScanShape {
  int64_t n_modalities;  // M
  int64_t batch;
  int64_t dim;           // channels (E in the paper)
  int64_t seqlen;        // L
  int64_t dstate;        // N
  int64_t n_chunks;      // ceil(L / kChunkLen)
};

struct ScanFwdParams {
  ScanShape shape;
  bool delta_softplus;
  TensorArg u, delta, z;           // (M, batch, dim, L), input dtype
  TensorArg B, C;                  // (M, batch, N, L), input dtype
  TensorArg A;                     // (M, dim, N), accumulation dtype
  TensorArg D, delta_bias;         // (M, dim)
  TensorArg coupling;              // (M,)
  TensorArg initial_state;         // (batch, dim, N)
  // Outputs, contiguous.
  void* y;             // (M, batch, dim, L), input dtype
  void* y_ungated;     // (M, batch, dim, L), input dtype; only written when z is present
  void* chunk_states;  // (batch, dim, n_chunks, N), accumulation dtype: G at each chunk start
                       // (the op returns it as (batch, dim, n_chunks·N): coupled_scan.cpp)
  void* final_state;   // (batch, dim, N), accumulation dtype
};

struct ScanBwdParams {
  ScanShape shape;
  bool delta_softplus;
  TensorArg u, delta, z, B, C, A, D, delta_bias, coupling;  // as in ScanFwdParams
  TensorArg dy;              // (M, batch, dim, L), input dtype
  TensorArg dfinal_state;    // (batch, dim, N), optional
  TensorArg chunk_states;    // (batch, dim, n_chunks, N), from forward
  TensorArg y_ungated;       // (M, batch, dim, L), from forward when z is present
  // Outputs, contiguous. du, ddelta, dz are written once per element in the input dtype;
  // the others are accumulated (zero-initialised by the caller) in the accumulation dtype.
  void* du;
  void* ddelta;
  void* dz;
  void* dA;              // (M, dim, N)
  void* dB;              // (M, batch, N, L), element strides in dBC_stride
  void* dC;              // (M, batch, N, L), same layout as dB
  int64_t dBC_stride[4];
  void* dD;              // (M, dim), only when D is present
  void* ddelta_bias;     // (M, dim), only when delta_bias is present
  void* dcoupling;       // (M,)
  void* dinitial_state;  // (batch, dim, N), written (not accumulated)
  // Deterministic sums (state-lanes CUDA backward only; 0, the default, elsewhere). Nonzero:
  // each accumulated output above is the first slot of a zeroed buffer of slots this many
  // elements apart, and every block adds into its own slot, so that each address receives
  // one add and the caller sums the slots in a fixed order (docs/kernels.md, "Determinism").
  int64_t dBC_slot_stride;        // dB, dC: a slot per block of channels of a batch index
  int64_t dA_slot_stride;         // dA: a slot per batch index
  int64_t dD_slot_stride;         // dD, dΔ-bias: a slot per batch index
  int64_t dcoupling_slot_stride;  // a slot per warp of the grid
};

}  // namespace coupled_mamba
