// CPU kernels: parallel over (batch, block of channels), a sequential loop over time inside
// each channel, vectorised over the state index n. The algorithm is the GPU kernels': time is
// cut into chunks of kChunkLen steps; forward saves the coupled state at each chunk start;
// backward walks the chunks last to first, recomputes the states inside one chunk from its
// saved start, then runs the reverse (adjoint) recurrence through it.
#include "coupled_scan_cpu.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "coupled_mamba/scan_math.h"

namespace coupled_mamba {
namespace {

// On x86-64 with gcc the loops over states are compiled twice, for AVX2+FMA CPUs and for
// the baseline, and the loader picks one (ifunc): one build runs at full width where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CM_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CM_VECTOR_CLONES
#endif

// Channels one parallel task handles. They share a batch index, hence the B and C tiles.
constexpr int64_t kRowsPerTask = 16;

// Tasks per thread, so that each thread gets at least ~2^18 (modality, step, state)
// elements: below that, waking the OpenMP team costs more than the work.
inline int64_t parallel_grain(const ScanShape& s) {
  const int64_t work_per_task = std::max<int64_t>(1, kRowsPerTask * s.seqlen * s.dstate * s.n_modalities);
  return std::max<int64_t>(1, (int64_t(1) << 18) / work_per_task);
}

// exp for float that the compiler vectorises (glibc's expf is a call it cannot). Range
// reduction to 2^k · e^r with |r| <= ln2/2, then Cephes' degree-6 polynomial for e^r
// (relative error about 2e-7). The input is clamped to [-87, 88]: below, it returns ~1e-38
// instead of a denormal or 0, far below fp32's resolution of the sums it enters; above, it
// saturates at ~1.7e38. NaN propagates (std::max / std::min keep a NaN first argument).
inline float exp_vec(float x) {
  x = std::max(x, -87.0f);
  x = std::min(x, 88.0f);
  // Round to nearest by adding and subtracting 1.5·2^23 (vectorises; floorf does not).
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline double exp_vec(double x) { return std::exp(x); }

// Strided element access of a TensorArg (dimension order as documented in params.h).
template <typename T>
inline T at4(const TensorArg& a, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return static_cast<const T*>(a.data)[i0 * a.stride[0] + i1 * a.stride[1] + i2 * a.stride[2] +
                                       i3 * a.stride[3]];
}
template <typename T>
inline T at2(const TensorArg& a, int64_t i0, int64_t i1) {
  return static_cast<const T*>(a.data)[i0 * a.stride[0] + i1 * a.stride[1]];
}

// What one task reads once and keeps: per-channel parameters and the transposed B, C tiles
// of the current chunk, laid out [m][t - t0][n] so that the loop over n is contiguous.
template <typename input_t, typename acc_t>
struct TaskInputs {
  const ScanShape s;
  const int64_t b, e0, rows;
  std::vector<acc_t> A;         // [row][m][n]
  std::vector<acc_t> D, bias;   // [row][m]
  std::vector<acc_t> w;         // [m]
  std::vector<acc_t> B_tile, C_tile;  // [m][t - t0][n]

  template <typename P>
  TaskInputs(const P& p, int64_t b_, int64_t e0_, int64_t rows_)
      : s(p.shape), b(b_), e0(e0_), rows(rows_) {
    const int64_t M = s.n_modalities, N = s.dstate;
    A.resize(rows * M * N);
    D.assign(rows * M, acc_t(0));
    bias.assign(rows * M, acc_t(0));
    w.resize(M);
    for (int64_t m = 0; m < M; ++m) {
      w[m] = static_cast<const acc_t*>(p.coupling.data)[m * p.coupling.stride[0]];
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t n = 0; n < N; ++n)
          A[(r * M + m) * N + n] = at4<acc_t>(p.A, m, e0 + r, n, 0);
        if (p.D.present()) D[r * M + m] = at2<acc_t>(p.D, m, e0 + r);
        if (p.delta_bias.present()) bias[r * M + m] = at2<acc_t>(p.delta_bias, m, e0 + r);
      }
    }
    B_tile.resize(M * kChunkLen * N);
    C_tile.resize(M * kChunkLen * N);
  }

  template <typename P>
  void load_tiles(const P& p, int64_t t0, int64_t t1) {
    const int64_t M = s.n_modalities, N = s.dstate;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = (m * kChunkLen + (t - t0)) * N + n;
          B_tile[i] = static_cast<acc_t>(at4<input_t>(p.B, m, b, n, t));
          C_tile[i] = static_cast<acc_t>(at4<input_t>(p.C, m, b, n, t));
        }
  }
  const acc_t* A_row(int64_t r, int64_t m) const { return &A[(r * s.n_modalities + m) * s.dstate]; }
  const acc_t* B_at(int64_t m, int64_t dt) const { return &B_tile[(m * kChunkLen + dt) * s.dstate]; }
  const acc_t* C_at(int64_t m, int64_t dt) const { return &C_tile[(m * kChunkLen + dt) * s.dstate]; }
};

// The loop over the state index n for one modality at one step: h = a·G_prev + drive·B,
// G_next += w·h; returns Σ_n C·h. Out of line with restrict pointers, so that the
// compiler vectorises it in every instantiation.
template <typename acc_t>
CM_VECTOR_CLONES acc_t modality_step(int64_t N, acc_t step, acc_t drive, acc_t w,
                                              const acc_t* __restrict A, const acc_t* __restrict B,
                                              const acc_t* __restrict C,
                                              const acc_t* __restrict G_prev,
                                              acc_t* __restrict G_next) {
  acc_t y = 0;
#pragma omp simd reduction(+ : y)
  for (int64_t n = 0; n < N; ++n) {
    const acc_t h = modality_state(exp_vec(step * A[n]), G_prev[n], drive, B[n]);
    y += C[n] * h;
    G_next[n] += w * h;
  }
  return y;
}

template <typename acc_t>
struct StepGradSums {
  acc_t d_step, d_u, d_w;  // Σ over n of the modality-state gradients (see modality_step_backward)
};

// Backward of modality_step for one modality at one step. Given dyhat = dℓ/dŷ and lambda =
// dℓ/dG at this step, forms mu = dℓ/dh = dyhat·C + w·lambda per state and accumulates the
// per-state gradients (dA, dB, dC, and dℓ/dG_prev into lambda_prev); returns the sums over
// n of dℓ/dΔ, dℓ/du and dℓ/dw.
template <typename acc_t>
CM_VECTOR_CLONES StepGradSums<acc_t> modality_step_backward(
    int64_t N, acc_t step, acc_t u, acc_t w, acc_t dyhat, const acc_t* __restrict A,
    const acc_t* __restrict B, const acc_t* __restrict C, const acc_t* __restrict G_prev,
    const acc_t* __restrict lambda, acc_t* __restrict dA, acc_t* __restrict dB,
    acc_t* __restrict dC, acc_t* __restrict lambda_prev) {
  const acc_t drive = step * u;
  acc_t d_step = 0, d_u = 0, d_w = 0;
#pragma omp simd reduction(+ : d_step, d_u, d_w)
  for (int64_t n = 0; n < N; ++n) {
    const acc_t decay = exp_vec(step * A[n]);
    const acc_t h = modality_state(decay, G_prev[n], drive, B[n]);
    const acc_t mu = dyhat * C[n] + w * lambda[n];
    const ModalityStateGrad<acc_t> g = modality_state_grad(mu, decay, G_prev[n], step, A[n], B[n], u);
    d_step += g.d_step;
    d_u += g.d_u;
    d_w += lambda[n] * h;
    dA[n] += g.d_A;
    dB[n] += g.d_B;
    dC[n] += dyhat * h;
    lambda_prev[n] += g.d_coupled_prev;
  }
  return {d_step, d_u, d_w};
}

// One time step of one channel: from the coupled state G_prev to G_next = Σ_m w_m h_m.
// When yhat is given, also yhat[m] = Σ_n C·h_m + D·u (the output before the gate).
template <typename input_t, typename acc_t, typename P>
inline void advance_row(const P& p, const TaskInputs<input_t, acc_t>& in, int64_t r, int64_t t,
                        int64_t t0, const acc_t* G_prev, acc_t* G_next, acc_t* yhat) {
  const int64_t M = in.s.n_modalities, N = in.s.dstate, e = in.e0 + r;
  std::fill(G_next, G_next + N, acc_t(0));
  for (int64_t m = 0; m < M; ++m) {
    const acc_t raw = static_cast<acc_t>(at4<input_t>(p.delta, m, in.b, e, t));
    const acc_t step = step_size(raw, in.bias[r * M + m], p.delta_softplus);
    const acc_t u = static_cast<acc_t>(at4<input_t>(p.u, m, in.b, e, t));
    const acc_t y = modality_step(N, step, step * u, in.w[m], in.A_row(r, m), in.B_at(m, t - t0),
                                  in.C_at(m, t - t0), G_prev, G_next);
    if (yhat) yhat[m] = y + in.D[r * M + m] * u;
  }
}

}  // namespace

template <typename input_t>
void coupled_scan_fwd_cpu(const ScanFwdParams& p) {
  using acc_t = cpu_acc_t<input_t>;
  const ScanShape s = p.shape;
  const int64_t M = s.n_modalities, N = s.dstate, L = s.seqlen;
  const int64_t blocks_per_batch = (s.dim + kRowsPerTask - 1) / kRowsPerTask;
  auto* y_out = static_cast<input_t*>(p.y);
  auto* y_ungated_out = static_cast<input_t*>(p.y_ungated);
  auto* chunk_states = static_cast<acc_t*>(p.chunk_states);
  auto* final_state = static_cast<acc_t*>(p.final_state);

  at::parallel_for(0, s.batch * blocks_per_batch, parallel_grain(s), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> next(N), yhat(M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      const int64_t e0 = (task % blocks_per_batch) * kRowsPerTask;
      const int64_t rows = std::min(kRowsPerTask, s.dim - e0);
      TaskInputs<input_t, acc_t> in(p, b, e0, rows);
      std::vector<acc_t> G(rows * N, acc_t(0));  // [row][n], the coupled state of each channel
      if (p.initial_state.present())
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t n = 0; n < N; ++n) G[r * N + n] = at4<acc_t>(p.initial_state, b, e0 + r, n, 0);

      for (int64_t c = 0; c < s.n_chunks; ++c) {
        const int64_t t0 = c * kChunkLen, t1 = std::min(L, t0 + kChunkLen);
        in.load_tiles(p, t0, t1);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = e0 + r;
          acc_t* state = &G[r * N];
          std::copy(state, state + N, &chunk_states[((b * s.dim + e) * s.n_chunks + c) * N]);
          for (int64_t t = t0; t < t1; ++t) {
            advance_row(p, in, r, t, t0, state, next.data(), yhat.data());
            std::copy(next.begin(), next.end(), state);
            for (int64_t m = 0; m < M; ++m) {
              const int64_t i = ((m * s.batch + b) * s.dim + e) * L + t;
              if (p.z.present()) {
                const acc_t z = static_cast<acc_t>(at4<input_t>(p.z, m, b, e, t));
                y_ungated_out[i] = static_cast<input_t>(yhat[m]);
                y_out[i] = static_cast<input_t>(yhat[m] * silu(z));
              } else {
                y_out[i] = static_cast<input_t>(yhat[m]);
              }
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        std::copy(&G[r * N], &G[r * N] + N, &final_state[(b * s.dim + e0 + r) * N]);
    }
  });
}

template <typename input_t>
void coupled_scan_bwd_cpu(const ScanBwdParams& p) {
  using acc_t = cpu_acc_t<input_t>;
  const ScanShape s = p.shape;
  const int64_t M = s.n_modalities, N = s.dstate, L = s.seqlen;
  const int64_t blocks_per_batch = (s.dim + kRowsPerTask - 1) / kRowsPerTask;
  auto* du_out = static_cast<input_t*>(p.du);
  auto* ddelta_out = static_cast<input_t*>(p.ddelta);
  auto* dz_out = static_cast<input_t*>(p.dz);
  auto* dA_out = static_cast<acc_t*>(p.dA);
  auto* dB_out = static_cast<acc_t*>(p.dB);
  auto* dC_out = static_cast<acc_t*>(p.dC);
  auto* dD_out = static_cast<acc_t*>(p.dD);
  auto* dbias_out = static_cast<acc_t*>(p.ddelta_bias);
  auto* dw_out = static_cast<acc_t*>(p.dcoupling);
  auto* dinit_out = static_cast<acc_t*>(p.dinitial_state);
  // Tasks of one batch index share dB, dC; tasks of one channel block share dA, dD, ...:
  // each task accumulates privately and adds its sums under this lock.
  std::mutex flush_lock;

  at::parallel_for(0, s.batch * blocks_per_batch, parallel_grain(s), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> history(kChunkLen * N);  // G[t-1] for every t of the chunk
    std::vector<acc_t> lambda_prev(N), next(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      const int64_t e0 = (task % blocks_per_batch) * kRowsPerTask;
      const int64_t rows = std::min(kRowsPerTask, s.dim - e0);
      TaskInputs<input_t, acc_t> in(p, b, e0, rows);
      // lambda = dℓ/dG[t] per channel, starting from the final state's gradient.
      std::vector<acc_t> lambda(rows * N, acc_t(0));
      if (p.dfinal_state.present())
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t n = 0; n < N; ++n)
            lambda[r * N + n] = at4<acc_t>(p.dfinal_state, b, e0 + r, n, 0);
      std::vector<acc_t> dA(rows * M * N, acc_t(0)), dD(rows * M, acc_t(0)),
          dbias(rows * M, acc_t(0)), dw(M, acc_t(0));
      std::vector<acc_t> dB_tile(M * kChunkLen * N), dC_tile(M * kChunkLen * N);

      for (int64_t c = s.n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunkLen, t1 = std::min(L, t0 + kChunkLen);
        in.load_tiles(p, t0, t1);
        std::fill(dB_tile.begin(), dB_tile.end(), acc_t(0));
        std::fill(dC_tile.begin(), dC_tile.end(), acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = e0 + r;
          // Recompute G[t-1] for the chunk from its saved start.
          for (int64_t n = 0; n < N; ++n) history[n] = at4<acc_t>(p.chunk_states, b, e, c, n);
          for (int64_t t = t0; t + 1 < t1; ++t)
            advance_row<input_t, acc_t>(p, in, r, t, t0, &history[(t - t0) * N],
                                        &history[(t + 1 - t0) * N], nullptr);
          acc_t* lam = &lambda[r * N];
          for (int64_t t = t1 - 1; t >= t0; --t) {
            const acc_t* __restrict G_prev = &history[(t - t0) * N];
            std::fill(lambda_prev.begin(), lambda_prev.end(), acc_t(0));
            for (int64_t m = 0; m < M; ++m) {
              const acc_t raw = static_cast<acc_t>(at4<input_t>(p.delta, m, b, e, t));
              const acc_t bias = in.bias[r * M + m];
              const acc_t step = step_size(raw, bias, p.delta_softplus);
              const acc_t u = static_cast<acc_t>(at4<input_t>(p.u, m, b, e, t));
              const acc_t dy = static_cast<acc_t>(at4<input_t>(p.dy, m, b, e, t));
              const int64_t i = ((m * s.batch + b) * s.dim + e) * L + t;
              acc_t dyhat = dy;
              if (p.z.present()) {
                acc_t dz;
                dyhat = gate_backward(dy, static_cast<acc_t>(at4<input_t>(p.y_ungated, m, b, e, t)),
                                      static_cast<acc_t>(at4<input_t>(p.z, m, b, e, t)), &dz);
                dz_out[i] = static_cast<input_t>(dz);
              }
              const StepGradSums<acc_t> sums = modality_step_backward(
                  N, step, u, in.w[m], dyhat, in.A_row(r, m), in.B_at(m, t - t0),
                  in.C_at(m, t - t0), G_prev, lam, &dA[(r * M + m) * N],
                  &dB_tile[(m * kChunkLen + (t - t0)) * N], &dC_tile[(m * kChunkLen + (t - t0)) * N],
                  lambda_prev.data());
              dw[m] += sums.d_w;
              dD[r * M + m] += dyhat * u;
              du_out[i] = static_cast<input_t>(sums.d_u + dyhat * in.D[r * M + m]);
              const acc_t d_raw = step_size_grad(sums.d_step, raw, bias, p.delta_softplus);
              ddelta_out[i] = static_cast<input_t>(d_raw);
              dbias[r * M + m] += d_raw;
            }
            std::copy(lambda_prev.begin(), lambda_prev.end(), lam);
          }
        }
        std::lock_guard<std::mutex> guard(flush_lock);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t tile = (m * kChunkLen + (t - t0)) * N + n;
              const int64_t out = m * p.dBC_stride[0] + b * p.dBC_stride[1] +
                                  n * p.dBC_stride[2] + t * p.dBC_stride[3];
              dB_out[out] += dB_tile[tile];
              dC_out[out] += dC_tile[tile];
            }
      }
      std::lock_guard<std::mutex> guard(flush_lock);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t e = e0 + r;
        std::copy(&lambda[r * N], &lambda[r * N] + N, &dinit_out[(b * s.dim + e) * N]);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) dA_out[(m * s.dim + e) * N + n] += dA[(r * M + m) * N + n];
          if (dD_out) dD_out[m * s.dim + e] += dD[r * M + m];
          if (dbias_out) dbias_out[m * s.dim + e] += dbias[r * M + m];
        }
      }
      for (int64_t m = 0; m < M; ++m) dw_out[m] += dw[m];
    }
  });
}

#define COUPLED_MAMBA_INSTANTIATE_CPU(T)                         \
  template void coupled_scan_fwd_cpu<T>(const ScanFwdParams&); \
  template void coupled_scan_bwd_cpu<T>(const ScanBwdParams&);
COUPLED_MAMBA_INSTANTIATE_CPU(float)
COUPLED_MAMBA_INSTANTIATE_CPU(double)
COUPLED_MAMBA_INSTANTIATE_CPU(c10::Half)
COUPLED_MAMBA_INSTANTIATE_CPU(c10::BFloat16)
#undef COUPLED_MAMBA_INSTANTIATE_CPU

}  // namespace coupled_mamba
