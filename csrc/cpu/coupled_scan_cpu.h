// C++ CPU kernels of the coupled selective scan. No Python needed: the CMake build links
// them into a C++ test (tests/cpp).
#pragma once
#include <type_traits>

#include "coupled_mamba/params.h"

namespace coupled_mamba {

// Accumulation type: double for double inputs (gradcheck), float for every other input.
template <typename input_t>
using cpu_acc_t = std::conditional_t<std::is_same_v<input_t, double>, double, float>;

// input_t is the dtype of u, delta, z, B, C (float, double, c10::Half or c10::BFloat16);
// A, D, delta_bias, coupling, states and parameter gradients are cpu_acc_t<input_t>.
template <typename input_t>
void coupled_scan_fwd_cpu(const ScanFwdParams& params);

template <typename input_t>
void coupled_scan_bwd_cpu(const ScanBwdParams& params);

}  // namespace coupled_mamba
