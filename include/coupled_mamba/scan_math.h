// Per-step math of the coupled selective scan (docs/math.md), shared by the CPU and CUDA kernels.
// Everything here is a scalar function of one (modality, time step, state) element, so a
// kernel only decides how elements map to threads and lanes.
#pragma once
#include <cmath>

#include "coupled_mamba/macros.h"

namespace coupled_mamba {

// `using std::exp` picks the float overload for float arguments on the host (an unqualified
// exp(float) would call the double one there); nvcc provides both for the device.
template <typename T>
CM_HOST_DEVICE T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

// softplus(x) = log(1 + e^x); above 20 it equals x to fp32 precision (as in torch).
template <typename T>
CM_HOST_DEVICE T softplus(T x) {
  using std::exp;
  using std::log1p;
  return x > T(20) ? x : log1p(exp(x));
}

// Δ = softplus(δ + β) or δ + β.
template <typename T>
CM_HOST_DEVICE T step_size(T delta_raw, T bias, bool use_softplus) {
  const T x = delta_raw + bias;
  return use_softplus ? softplus(x) : x;
}

// dℓ/dδ from dℓ/dΔ: the softplus derivative is sigmoid(δ + β).
template <typename T>
CM_HOST_DEVICE T step_size_grad(T d_step, T delta_raw, T bias, bool use_softplus) {
  return use_softplus ? d_step * sigmoid(delta_raw + bias) : d_step;
}

// The same from Δ itself instead of δ + β: for Δ = softplus(x), σ(x) = 1 − e^(−Δ), formed as
// −expm1(−Δ) to keep its precision where Δ is tiny. (Above softplus' threshold Δ = x > 20
// and this is 1 in fp32, as torch's derivative there.) Lets a kernel that has staged Δ form
// dδ without reading δ again.
template <typename T>
CM_HOST_DEVICE T step_size_grad_from_step(T d_step, T step, bool use_softplus) {
  using std::expm1;
  return use_softplus ? -d_step * expm1(-step) : d_step;
}

template <typename T>
CM_HOST_DEVICE T silu(T x) {
  return x * sigmoid(x);
}

template <typename T>
CM_HOST_DEVICE T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// One modality's state at step t starts from the coupled state of step t-1:
//   h = a · G_prev + Δ·B·u,   a = exp(Δ·A).
// `decay` is a; `drive` is Δ·u (shared by every state index), so b = drive · B.
template <typename T>
CM_HOST_DEVICE T modality_state(T decay, T coupled_prev, T drive, T B) {
  return decay * coupled_prev + drive * B;
}

// Gradients of h = exp(Δ·A)·G_prev + Δ·B·u for one element, given mu = dℓ/dh.
template <typename T>
struct ModalityStateGrad {
  T d_step;         // dℓ/dΔ contribution
  T d_A;            // dℓ/dA contribution
  T d_B;            // dℓ/dB contribution
  T d_u;            // dℓ/du contribution
  T d_coupled_prev; // dℓ/dG_prev contribution
};

template <typename T>
CM_HOST_DEVICE ModalityStateGrad<T> modality_state_grad(T mu, T decay, T coupled_prev, T step,
                                                        T A, T B, T u) {
  ModalityStateGrad<T> g;
  const T decayed = decay * coupled_prev;  // a · G_prev
  g.d_step = mu * (A * decayed + B * u);
  g.d_A = mu * step * decayed;
  g.d_B = mu * step * u;
  g.d_u = mu * step * B;
  g.d_coupled_prev = mu * decay;
  return g;
}

// The same gradients with the factors that do not depend on the state index n left out, for
// a kernel that sums over n before multiplying (fewer operations per element):
//   dℓ/dΔ = Σ_n A·mu_decayed + u·Σ_n mu_B,   dℓ/du = Δ·Σ_n mu_B,
//   dℓ/dA = Δ·mu_decayed,   dℓ/dB = d_B,   dℓ/dG_prev = d_coupled_prev.
template <typename T>
struct FactoredStateGrad {
  T mu_decayed;      // μ·a·G_prev
  T mu_B;            // μ·B
  T d_B;             // μ·Δ·u
  T d_coupled_prev;  // μ·a
};

template <typename T>
CM_HOST_DEVICE FactoredStateGrad<T> modality_state_grad_factored(T mu, T decay, T coupled_prev,
                                                                 T drive, T B) {
  FactoredStateGrad<T> g;
  g.mu_decayed = mu * (decay * coupled_prev);
  g.mu_B = mu * B;
  g.d_B = mu * drive;
  g.d_coupled_prev = mu * decay;
  return g;
}

// The output gate: y = ŷ · silu(z). Returns dℓ/dŷ and writes dℓ/dz.
template <typename T>
CM_HOST_DEVICE T gate_backward(T dy, T y_ungated, T z, T* dz) {
  *dz = dy * y_ungated * silu_grad(z);
  return dy * silu(z);
}

}  // namespace coupled_mamba
