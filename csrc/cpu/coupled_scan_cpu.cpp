// CPU kernels: parallel over (batch, block of channels), a sequential loop over time inside
// each channel, vectorised over the state index n. The algorithm is the GPU kernels': time is
// cut into chunks of kChunkLen steps; forward saves the coupled state at each chunk start;
// backward walks the chunks last to first, recomputes the states inside one chunk from its
// saved start, then runs the reverse (adjoint) recurrence through it.
//
// Per channel and chunk the work is three passes, each made of loops that vectorise:
//   1. per (modality, step), vectorised over the chunk's steps: the step sizes (softplus),
//      Δ·u and, in backward, dℓ/dŷ and dℓ/dz through the gate;
//   2. the recurrence over the chunk's steps, vectorised over states in blocks of 16, the
//      decays exp(Δ·A) computed in it (backward's recomputation keeps them for the reverse
//      pass); the sums over states of each (modality, step) kept as 16 partial sums and
//      reduced together after the chunk where that is cheaper;
//   3. per (modality, step), vectorised over steps: y through the gate, or du, dδ and the
//      D and β gradients.
// Special functions are the vectorisable ones of vec_math.h, never a libm call per element;
// denormals are flushed while the kernels run (see FlushDenormals).
#include "coupled_scan_cpu.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "coupled_mamba/scan_math.h"
#include "vec_math.h"

namespace coupled_mamba {
namespace {

using cpu::exp2_vec;
using cpu::kLog2e;
using cpu::sigmoid_vec;
using cpu::softplus_vec;

// On x86-64 with gcc the vectorised loops are compiled three times, for AVX-512, for
// AVX2+FMA and for the baseline, and the loader picks one (ifunc): one build runs at full
// width where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CM_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CM_VECTOR_CLONES
#endif
// For helpers of the cloned functions: inlined, they are compiled for the calling clone's
// instruction set; called, they would run the baseline build.
#if defined(__GNUC__)
#define CM_INLINE_INTO_CLONES __attribute__((always_inline)) inline
#else
#define CM_INLINE_INTO_CLONES inline
#endif

// Channels one parallel task handles. They share a batch index, hence the B and C tiles.
constexpr int64_t kRowsPerTask = 16;
constexpr int64_t K = kChunkLen;
// States are processed in blocks of kLanes (one AVX-512 vector of floats, two AVX2 ones), a
// fixed trip count that compiles to whole vectors with no remainder loop. Buffers over states
// are padded to Np, a multiple of kLanes: a padded state has B = C = 0 and starts at 0, so
// it stays 0 and adds nothing to any output or gradient while Δ·u is finite. Its A is -1,
// not 0: with Δ = +inf its decay exp(Δ·A) is then 0, not exp(inf·0) = NaN, which backward
// would carry through dℓ/dG into the gradients of every earlier step, finite in the
// reference. (Where Δ·u is infinite, its Δ·u·B = inf·0 is NaN and enters y through C = 0:
// docs/api.md, "Non-finite inputs".)
constexpr int64_t kLanes = 16;
inline int64_t padded_states(int64_t N) { return (N + kLanes - 1) / kLanes * kLanes; }

// Calls f(Np) with the padded state count as a compile-time constant (a
// std::integral_constant) where it is at most 4·kLanes, as an int64_t above: with a constant
// count gcc unrolls the loops over state blocks completely, which leaves fewer instructions
// per (modality, step) in the forward and the recomputation. The backward's state loop,
// unrolled, counted more (its many live pointers and sums spill), so it takes Np as an
// int64_t.
template <typename F>
void with_state_count(int64_t Np, F&& f) {
  switch (Np) {
    case kLanes: return f(std::integral_constant<int64_t, kLanes>{});
    case 2 * kLanes: return f(std::integral_constant<int64_t, 2 * kLanes>{});
    case 3 * kLanes: return f(std::integral_constant<int64_t, 3 * kLanes>{});
    case 4 * kLanes: return f(std::integral_constant<int64_t, 4 * kLanes>{});
    default: return f(Np);
  }
}

// Tasks per thread, so that each thread gets at least ~2^18 (modality, step, state)
// elements: below that, waking the OpenMP team costs more than the work.
inline int64_t parallel_grain(const ScanShape& s) {
  const int64_t work_per_task =
      std::max<int64_t>(1, kRowsPerTask * s.seqlen * s.dstate * s.n_modalities);
  return std::max<int64_t>(1, (int64_t(1) << 18) / work_per_task);
}

// Σ of the kLanes partial sums of a blocked reduction. With clang or gcc >= 12 (which have
// __builtin_shufflevector): in 8-wide vectors (one AVX2 register, half of an AVX-512 one),
// the two halves added, then halved three times; omp simd's own reduction, or a loop,
// becomes a chain of scalar additions through memory, and a 16-wide vector type is
// assembled lane by lane from memory by gcc's AVX2 build. Otherwise: a tree the compiler may
// or may not turn into shuffles.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float lanes8 __attribute__((vector_size(32)));

// sum = parts[0 .. 8) + parts[8 .. 16). (Written out, not returned: a returned 32-byte
// vector has another ABI with and without AVX, which gcc warns about for the baseline build.)
CM_INLINE_INTO_CLONES void fold_lane_halves(const float* parts, lanes8& sum) {
  static_assert(kLanes == 16, "two 8-wide halves");
  lanes8 hi;
  __builtin_memcpy(&sum, parts, sizeof sum);
  __builtin_memcpy(&hi, parts + 8, sizeof hi);
  sum += hi;
}

CM_INLINE_INTO_CLONES float sum_lanes(const float (&part)[kLanes]) {
  lanes8 a;
  fold_lane_halves(part, a);
  lanes8 b = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3);
  b += __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5);
  b += __builtin_shufflevector(b, b, 1, 0, 3, 2, 5, 4, 7, 6);
  return b[0];
}

// sums[i] = Σ_j parts[i·kLanes + j] for 16 consecutive i: each vector's halves added, then
// the 16 vectors folded into each other pairwise (quarters, pairs, single lanes) and put in
// order: about 85 instructions for 16 sums on AVX2 instead of about 10 dependent ones per
// sum. The scans store each (modality, step)'s kLanes partial sums and reduce a whole
// chunk's at once with this.
CM_INLINE_INTO_CLONES void sum_16_lane_blocks(const float* __restrict parts,
                                              float* __restrict sums) {
  lanes8 a[16], b[8], c[4];  // in registers: every loop below is unrolled
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) fold_lane_halves(parts + i * kLanes, a[i]);
  // b[k] = [a[2k] folded to 4 lanes | a[2k+1] folded to 4]
#pragma GCC unroll 16
  for (int k = 0; k < 8; ++k)
    b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  // c[k] = [a[4k] to 2 | a[4k+2] to 2 | a[4k+1] to 2 | a[4k+3] to 2]
#pragma GCC unroll 16
  for (int k = 0; k < 4; ++k)
    c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  // Single lanes: [a[8k], a[8k+2], a[8k+4], a[8k+6], a[8k+1], a[8k+3], a[8k+5], a[8k+7]],
  // then put in order.
#pragma GCC unroll 16
  for (int k = 0; k < 2; ++k) {
    const lanes8 d = __builtin_shufflevector(c[2 * k], c[2 * k + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
                     __builtin_shufflevector(c[2 * k], c[2 * k + 1], 1, 3, 9, 11, 5, 7, 13, 15);
    const lanes8 ordered = __builtin_shufflevector(d, d, 0, 4, 1, 5, 2, 6, 3, 7);
    __builtin_memcpy(sums + 8 * k, &ordered, sizeof ordered);
  }
}
#define CM_HAVE_SHUFFLES 1
#endif
template <typename acc_t>
CM_INLINE_INTO_CLONES acc_t sum_lanes(const acc_t (&part)[kLanes]) {
  acc_t s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = part[j] + part[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// sums[i] = Σ_j parts[i·kLanes + j] for i < count.
template <typename acc_t>
CM_INLINE_INTO_CLONES void sum_lane_blocks(const acc_t* __restrict parts, int64_t count,
                                           acc_t* __restrict sums) {
  int64_t i = 0;
#ifdef CM_HAVE_SHUFFLES
  if constexpr (std::is_same_v<acc_t, float>)
    for (; i + 16 <= count; i += 16) sum_16_lane_blocks(parts + i * kLanes, sums + i);
#endif
  for (; i < count; ++i) {
    acc_t part[kLanes];
    std::copy(parts + i * kLanes, parts + (i + 1) * kLanes, part);
    sums[i] = sum_lanes(part);
  }
}

template <typename T>
inline const T* ptr4(const TensorArg& a, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return static_cast<const T*>(a.data) + i0 * a.stride[0] + i1 * a.stride[1] + i2 * a.stride[2] +
         i3 * a.stride[3];
}
template <typename T>
inline T at2(const TensorArg& a, int64_t i0, int64_t i1) {
  return static_cast<const T*>(a.data)[i0 * a.stride[0] + i1 * a.stride[1]];
}

// out[k] = x[m, b, e, t0 + k] for k < T, in the accumulation type.
template <typename input_t, typename acc_t>
inline void load_steps(const TensorArg& x, int64_t m, int64_t b, int64_t e, int64_t t0, int64_t T,
                       acc_t* __restrict out) {
  const input_t* src = ptr4<input_t>(x, m, b, e, t0);
  const int64_t stride = x.stride[3];
  if (stride == 1) {
    for (int64_t k = 0; k < T; ++k) out[k] = static_cast<acc_t>(src[k]);
  } else {
    for (int64_t k = 0; k < T; ++k) out[k] = static_cast<acc_t>(src[k * stride]);
  }
}

// Asks for x[m, b, e, t0 .. t0 + T) to be brought into the cache. A task visits its 16
// channels chunk by chunk: 3·M (forward) or 5·M (backward) interleaved streams per channel,
// too many for the hardware prefetcher; each channel asks for its next chunk's lines.
template <typename input_t>
inline void prefetch_steps(const TensorArg& x, int64_t m, int64_t b, int64_t e, int64_t t0,
                           int64_t T) {
#if defined(__GNUC__)
  if (!x.present() || x.stride[3] != 1) return;
  const char* first = reinterpret_cast<const char*>(ptr4<input_t>(x, m, b, e, t0));
  for (int64_t offset = 0; offset < T * int64_t(sizeof(input_t)); offset += 64)
    __builtin_prefetch(first + offset);
#endif
}

template <typename input_t, typename acc_t>
inline void store_steps(const acc_t* __restrict x, int64_t T, input_t* __restrict out) {
  for (int64_t k = 0; k < T; ++k) out[k] = static_cast<input_t>(x[k]);
}

#ifdef CM_HAVE_SHUFFLES
// tile[k·Np + n] = src[n·n_stride + k] (or += with kAdd) for n, k < 8, by 24 shuffles: one
// load and one store per 8 elements instead of one each per element.
template <bool kAdd>
CM_INLINE_INTO_CLONES void transpose_8x8(const float* __restrict src, int64_t n_stride,
                                         float* __restrict tile, int64_t Np) {
  lanes8 r[8], t[8], s[8];  // in registers: every loop below is unrolled
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) __builtin_memcpy(&r[i], src + i * n_stride, sizeof r[i]);
#pragma GCC unroll 8
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; i += 4)  // quadruples of rows: columns k, k + 4 in one vector
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      s[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      s[i + 2 * j + 1] =
          __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  // s[0..3] hold columns (0,4), (1,5), (2,6), (3,7) of rows 0-3; s[4..7] of rows 4-7.
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    lanes8 column[2] = {__builtin_shufflevector(s[k], s[k + 4], 0, 1, 2, 3, 8, 9, 10, 11),
                        __builtin_shufflevector(s[k], s[k + 4], 4, 5, 6, 7, 12, 13, 14, 15)};
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      float* out = tile + (k + 4 * half) * Np;
      if constexpr (kAdd) {
        lanes8 sum;
        __builtin_memcpy(&sum, out, sizeof sum);
        column[half] += sum;
      }
      __builtin_memcpy(out, &column[half], sizeof column[half]);
    }
  }
}
#endif

// tile[k·Np + n] = src[n·n_stride + k] for n < N, k < T, or += with kAdd: one modality's B or
// C of a chunk turned so that loops over states read it contiguously, and the backward's dB,
// dC turned back and added into their sums. For float, in 8×8 blocks (transpose_8x8); a copy
// covers its edges with a last block that overlaps the one before it (the overlap is written
// twice, the same), a sum one element at a time.
template <bool kAdd, typename acc_t>
CM_VECTOR_CLONES void transpose_to_states(const acc_t* __restrict src, int64_t n_stride,
                                          int64_t N, int64_t T, acc_t* __restrict tile,
                                          int64_t Np) {
  int64_t n_done = 0, k_done = 0;  // [0, n_done) x [0, k_done) is done in blocks
#ifdef CM_HAVE_SHUFFLES
  if constexpr (std::is_same_v<acc_t, float>) {
    if (N >= 8 && T >= 8) {
      n_done = kAdd ? N / 8 * 8 : N;
      k_done = kAdd ? T / 8 * 8 : T;
      for (int64_t n_block = 0; n_block < n_done; n_block += 8)
        for (int64_t k_block = 0; k_block < k_done; k_block += 8) {
          const int64_t n0 = std::min(n_block, N - 8), k0 = std::min(k_block, T - 8);
          transpose_8x8<kAdd>(src + n0 * n_stride + k0, n_stride, tile + k0 * Np + n0, Np);
        }
    }
  }
#endif
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = n < n_done ? k_done : 0; k < T; ++k)
      tile[k * Np + n] = (kAdd ? tile[k * Np + n] : acc_t(0)) + src[n * n_stride + k];
}

// ---- Passes 1 and 3: loops over the steps of one chunk.

template <typename acc_t>
CM_VECTOR_CLONES void softplus_steps(int64_t T, const acc_t* __restrict x, acc_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < T; ++k) out[k] = softplus_vec(x[k]);
}

// y *= silu(z).
template <typename acc_t>
CM_VECTOR_CLONES void gate_steps(int64_t T, const acc_t* __restrict z, acc_t* __restrict y) {
#pragma omp simd
  for (int64_t k = 0; k < T; ++k) y[k] *= z[k] * sigmoid_vec(z[k]);
}

// The gate's backward (gate_backward of scan_math.h): dy becomes dℓ/dŷ = dy·silu(z), and
// dz = dy·ŷ·silu'(z).
template <typename acc_t>
CM_VECTOR_CLONES void gate_backward_steps(int64_t T, const acc_t* __restrict z,
                                          const acc_t* __restrict y_ungated, acc_t* __restrict dy,
                                          acc_t* __restrict dz) {
#pragma omp simd
  for (int64_t k = 0; k < T; ++k) {
    const acc_t sig = sigmoid_vec(z[k]);
    dz[k] = dy[k] * y_ungated[k] * (sig * (acc_t(1) + z[k] * (acc_t(1) - sig)));
    dy[k] *= z[k] * sig;
  }
}

// d *= softplus'(x) = sigmoid(x).
template <typename acc_t>
CM_VECTOR_CLONES void softplus_grad_steps(int64_t T, const acc_t* __restrict x, acc_t* __restrict d) {
#pragma omp simd
  for (int64_t k = 0; k < T; ++k) d[k] *= sigmoid_vec(x[k]);
}

// What one thread keeps for its tasks, allocated once per at::parallel_for range:
//   per channel block: A [row][m][Np], D and β [row][m];
//   per chunk:         B and C transposed to [m][t - t0][Np], so that loops over states are
//                      contiguous;
//   per channel and chunk, over the chunk's steps, [m][t - t0]: the pre-activation δ + β,
//                      the step sizes Δ, u and Δ·u.
template <typename acc_t>
struct TaskScratch {
  const ScanShape s;
  const int64_t Np;
  int64_t b = 0, e0 = 0, rows = 0;
  std::vector<acc_t> A, D, bias, w;
  std::vector<acc_t> B_tile, C_tile;
  std::vector<acc_t> pre, step, u, drive;

  template <typename P>
  explicit TaskScratch(const P& p)
      : s(p.shape),
        Np(padded_states(s.dstate)),
        A(kRowsPerTask * s.n_modalities * Np, acc_t(-1)),
        D(kRowsPerTask * s.n_modalities),
        bias(kRowsPerTask * s.n_modalities),
        w(s.n_modalities),
        B_tile(s.n_modalities * K * Np, acc_t(0)),
        C_tile(s.n_modalities * K * Np, acc_t(0)),
        pre(s.n_modalities * K),
        step(s.n_modalities * K),
        u(s.n_modalities * K),
        drive(s.n_modalities * K) {
    for (int64_t m = 0; m < s.n_modalities; ++m)
      w[m] = static_cast<const acc_t*>(p.coupling.data)[m * p.coupling.stride[0]];
  }

  // Task = (batch index, block of kRowsPerTask channels).
  template <typename P>
  void start_task(const P& p, int64_t task) {
    const int64_t blocks_per_batch = (s.dim + kRowsPerTask - 1) / kRowsPerTask;
    const int64_t M = s.n_modalities, N = s.dstate;
    b = task / blocks_per_batch;
    e0 = (task % blocks_per_batch) * kRowsPerTask;
    rows = std::min(kRowsPerTask, s.dim - e0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* a = ptr4<acc_t>(p.A, m, e0 + r, 0, 0);
        for (int64_t n = 0; n < N; ++n) A[(r * M + m) * Np + n] = a[n * p.A.stride[2]];
        D[r * M + m] = p.D.present() ? at2<acc_t>(p.D, m, e0 + r) : acc_t(0);
        bias[r * M + m] = p.delta_bias.present() ? at2<acc_t>(p.delta_bias, m, e0 + r) : acc_t(0);
      }
  }

  template <typename input_t, typename P>
  void load_tiles(const P& p, int64_t t0, int64_t T) {
    const int64_t M = s.n_modalities, N = s.dstate;
    if constexpr (std::is_same_v<input_t, acc_t>) {
      if (p.B.stride[3] == 1 && p.C.stride[3] == 1) {
        for (int64_t m = 0; m < M; ++m) {
          transpose_to_states<false>(ptr4<acc_t>(p.B, m, b, 0, t0), p.B.stride[2], N, T,
                                     &B_tile[m * K * Np], Np);
          transpose_to_states<false>(ptr4<acc_t>(p.C, m, b, 0, t0), p.C.stride[2], N, T,
                                     &C_tile[m * K * Np], Np);
        }
        return;
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const input_t* Bp = ptr4<input_t>(p.B, m, b, n, t0);
        const input_t* Cp = ptr4<input_t>(p.C, m, b, n, t0);
        for (int64_t k = 0; k < T; ++k) {
          B_tile[(m * K + k) * Np + n] = static_cast<acc_t>(Bp[k * p.B.stride[3]]);
          C_tile[(m * K + k) * Np + n] = static_cast<acc_t>(Cp[k * p.C.stride[3]]);
        }
      }
  }

  // Pass 1 for channel e0 + r: pre = δ + β, step = Δ, u, drive = Δ·u over the chunk's steps.
  template <typename input_t, typename P>
  void load_steps_of_row(const P& p, int64_t r, int64_t t0, int64_t T) {
    const int64_t M = s.n_modalities;
    for (int64_t m = 0; m < M; ++m) {
      acc_t* __restrict pre_m = &pre[m * K];
      acc_t* __restrict step_m = &step[m * K];
      acc_t* __restrict u_m = &u[m * K];
      acc_t* __restrict drive_m = &drive[m * K];
      load_steps<input_t>(p.delta, m, b, e0 + r, t0, T, pre_m);
      load_steps<input_t>(p.u, m, b, e0 + r, t0, T, u_m);
      const acc_t bias_m = bias[r * M + m];
      for (int64_t k = 0; k < T; ++k) pre_m[k] += bias_m;
      if (p.delta_softplus) {
        softplus_steps(T, pre_m, step_m);
      } else {
        std::copy(pre_m, pre_m + T, step_m);
      }
      for (int64_t k = 0; k < T; ++k) drive_m[k] = step_m[k] * u_m[k];
    }
  }

  const acc_t* A_row(int64_t r) const { return &A[r * s.n_modalities * Np]; }
};

// ---- Pass 2: the recurrences of one channel through one chunk of T steps.
// step, drive, u, dyhat, yhat, d_step, d_u: [m][t] (row length K); A: [m][Np];
// B, C, decays, dB, dC: [m][t][Np]; history: [t][Np].
//
// Each (modality, step) is one call of a *_modality_step helper (inlined) over the Np states
// in blocks of kLanes. The first modality of a step writes the next coupled state (or λ)
// where the others add to it: each pass compiles it apart (kFirst), so that every pointer
// of a state loop can be restrict and nothing is read for the first modality. Sums over
// states are kept in
// kLanes lanes, written out per (modality, step) and reduced after the chunk, 16 at a time
// (sum_lane_blocks): a reduction per (modality, step) cost more than the state loop's own
// work at N = 64.

// Forward, states [n0, n0 + kLanes) of one (m, t): h = a·G_prev + Δu·B per state,
// G_next += w·h (G_next = w·h for the first modality, kFirst), and C·h added into the lanes
// part_out (written by the first block, kFirstBlock). dt_log2 = Δ/ln2:
// the decay a = exp(Δ·A) is exp2_vec((Δ/ln2)·A).
template <bool kFirst, bool kFirstBlock, typename acc_t>
CM_INLINE_INTO_CLONES void forward_state_block(
    int64_t n0, acc_t dt_log2, acc_t dr, acc_t wm, const acc_t* __restrict A,
    const acc_t* __restrict B, const acc_t* __restrict C, const acc_t* __restrict G_prev,
    acc_t* __restrict G_next, acc_t* __restrict part_out, const cpu::ExpClamp& clamp) {
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    const int64_t n = n0 + j;
    const acc_t h = modality_state(exp2_vec(dt_log2 * A[n], clamp), G_prev[n], dr, B[n]);
    part_out[j] = (kFirstBlock ? acc_t(0) : part_out[j]) + C[n] * h;
    G_next[n] = kFirst ? wm * h : G_next[n] + wm * h;
  }
}

// Forward, one (m, t), over the Np states: the lanes of Σ_n C·h into part_out.
template <bool kFirst, typename acc_t, typename States>
CM_INLINE_INTO_CLONES void forward_modality_step(
    States Np, acc_t dt_log2, acc_t dr, acc_t wm, const acc_t* __restrict A,
    const acc_t* __restrict B, const acc_t* __restrict C, const acc_t* __restrict G_prev,
    acc_t* __restrict G_next, acc_t* __restrict part_out, const cpu::ExpClamp& clamp) {
  // The lanes accumulate in part_out itself, which gcc holds in registers through the loop
  // over blocks (and stores in each block); the first block writes them instead of zeroing
  // them first (a local array instead is zeroed on the stack and copied out 16 bytes at a
  // time by gcc).
  forward_state_block<kFirst, true>(0, dt_log2, dr, wm, A, B, C, G_prev, G_next, part_out,
                                    clamp);
  for (int64_t n0 = kLanes; n0 < Np; n0 += kLanes)
    forward_state_block<kFirst, false>(n0, dt_log2, dr, wm, A, B, C, G_prev, G_next, part_out,
                                       clamp);
}

// Forward. G holds the coupled state at the chunk start on entry, at its end on return;
// spare is Np values of scratch; parts is M·K·kLanes values of scratch.
// yhat[m][t] = Σ_n C·h_m (without the D·u term). The decays exp(Δ·A) are computed in the
// loop, not read from a buffer: a chunk's decays do not fit in L1 next to its B and C.
template <typename acc_t, typename States>
CM_VECTOR_CLONES void scan_chunk_forward(int64_t M, States Np, int64_t T,
                                         const acc_t* __restrict step,
                                         const acc_t* __restrict drive,
                                         const acc_t* __restrict w, const acc_t* __restrict A,
                                         const acc_t* __restrict B, const acc_t* __restrict C,
                                         acc_t* G, acc_t* spare, acc_t* __restrict parts,
                                         acc_t* __restrict yhat) {
  const cpu::ExpClamp clamp = cpu::opaque(cpu::kExp2Range);
  acc_t* G_prev = G;
  acc_t* G_next = spare;
  for (int64_t t = 0; t < T; ++t) {
    forward_modality_step<true>(Np, step[t] * kLog2e<acc_t>, drive[t], w[0], A, B + t * Np,
                                C + t * Np, G_prev, G_next, parts + t * kLanes, clamp);
    for (int64_t m = 1; m < M; ++m) {
      const int64_t mt = m * K + t;
      forward_modality_step<false>(Np, step[mt] * kLog2e<acc_t>, drive[mt], w[m], A + m * Np,
                                   B + mt * Np, C + mt * Np, G_prev, G_next, parts + mt * kLanes,
                                   clamp);
    }
    std::swap(G_prev, G_next);
  }
  if (G_prev != G) std::copy(G_prev, G_prev + Np, G);
  for (int64_t m = 0; m < M; ++m) sum_lane_blocks(parts + m * K * kLanes, T, yhat + m * K);
}

// Backward's recomputation, one (m, t): the forward's state update, keeping the decays
// (dt_log2 = Δ/ln2, as in forward_modality_step).
template <bool kFirst, typename acc_t, typename States>
CM_INLINE_INTO_CLONES void recompute_modality_step(
    States Np, acc_t dt_log2, acc_t dr, acc_t wm, const acc_t* __restrict A,
    const acc_t* __restrict B, const acc_t* __restrict G_prev, acc_t* __restrict G_next,
    acc_t* __restrict decay_out, const cpu::ExpClamp& clamp) {
  for (int64_t n0 = 0; n0 < Np; n0 += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t n = n0 + j;
      const acc_t decay = exp2_vec(dt_log2 * A[n], clamp);
      decay_out[n] = decay;
      const acc_t h = modality_state(decay, G_prev[n], dr, B[n]);
      G_next[n] = kFirst ? wm * h : G_next[n] + wm * h;
    }
  }
}

// Backward's recomputation of one chunk from its saved start: history[t] = G[t - 1] for t in
// [0, T] (history[0] holds the chunk start on entry; history[T], the next chunk's saved
// start, is a by-product), and decays[m][t] = exp(Δ[m,t]·A[m]), which the backward pass
// reads.
template <typename acc_t, typename States>
CM_VECTOR_CLONES void scan_chunk_recompute(int64_t M, States Np, int64_t T,
                                           const acc_t* __restrict step,
                                           const acc_t* __restrict drive,
                                           const acc_t* __restrict w, const acc_t* __restrict A,
                                           const acc_t* __restrict B, acc_t* __restrict history,
                                           acc_t* __restrict decays) {
  const cpu::ExpClamp clamp = cpu::opaque(cpu::kExp2Range);
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* G_prev = history + t * Np;
    acc_t* G_next = history + (t + 1) * Np;
    recompute_modality_step<true>(Np, step[t] * kLog2e<acc_t>, drive[t], w[0], A, B + t * Np,
                                  G_prev, G_next, decays + t * Np, clamp);
    for (int64_t m = 1; m < M; ++m) {
      const int64_t mt = m * K + t;
      recompute_modality_step<false>(Np, step[mt] * kLog2e<acc_t>, drive[mt], w[m],
                                     A + m * Np, B + mt * Np, G_prev, G_next, decays + mt * Np,
                                     clamp);
    }
  }
}

// Backward, states [n0, n0 + kLanes) of one (m, t), given λ = dℓ/dG[t] (lam): mu = dℓ/dh =
// dŷ·C + w·λ per state (modality_state_grad_factored: the factors that do not depend on n
// are applied after the sums over states). Adds into dA, dB, dC and λ_prev = dℓ/dG[t - 1]
// (written by kFirst, the first modality), adds A·mu·a·G_prev and mu·B into the lanes
// part_A_mu_decayed and part_mu_B (written by kFirstBlock, the first block), and λ·h into
// the lanes part_w.
template <bool kFirst, bool kFirstBlock, typename acc_t>
CM_INLINE_INTO_CLONES void backward_state_block(
    int64_t n0, acc_t dt, acc_t dr, acc_t dy, acc_t wm, const acc_t* __restrict A,
    const acc_t* __restrict B, const acc_t* __restrict C, const acc_t* __restrict decay,
    const acc_t* __restrict G_prev, const acc_t* __restrict lam, acc_t* __restrict lam_prev,
    acc_t* __restrict dA, acc_t* __restrict dB, acc_t* __restrict dC,
    acc_t* __restrict part_A_mu_decayed, acc_t* __restrict part_mu_B,
    acc_t* __restrict part_w) {
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    const int64_t n = n0 + j;
    const acc_t h = modality_state(decay[n], G_prev[n], dr, B[n]);
    const acc_t mu = dy * C[n] + wm * lam[n];
    const FactoredStateGrad<acc_t> g =
        modality_state_grad_factored(mu, decay[n], G_prev[n], dr, B[n]);
    part_A_mu_decayed[j] = (kFirstBlock ? acc_t(0) : part_A_mu_decayed[j]) + A[n] * g.mu_decayed;
    part_mu_B[j] = (kFirstBlock ? acc_t(0) : part_mu_B[j]) + g.mu_B;
    part_w[j] += lam[n] * h;
    dA[n] += dt * g.mu_decayed;
    dB[n] += g.d_B;
    dC[n] += dy * h;
    lam_prev[n] = kFirst ? g.d_coupled_prev : lam_prev[n] + g.d_coupled_prev;
  }
}

// Backward, one (m, t), over the Np states (backward_state_block): the lanes of
// Σ_n A·mu·a·G_prev and Σ_n mu·B into the two part_* outputs.
template <bool kFirst, typename acc_t>
CM_INLINE_INTO_CLONES void backward_modality_step(
    int64_t Np, acc_t dt, acc_t dr, acc_t dy, acc_t wm, const acc_t* __restrict A,
    const acc_t* __restrict B, const acc_t* __restrict C, const acc_t* __restrict decay,
    const acc_t* __restrict G_prev, const acc_t* __restrict lam, acc_t* __restrict lam_prev,
    acc_t* __restrict dA, acc_t* __restrict dB, acc_t* __restrict dC,
    acc_t* __restrict part_A_mu_decayed_out, acc_t* __restrict part_mu_B_out,
    acc_t* __restrict part_w) {
  // As in forward_modality_step, the lanes accumulate in the outputs themselves.
  backward_state_block<kFirst, true>(0, dt, dr, dy, wm, A, B, C, decay, G_prev, lam, lam_prev,
                                     dA, dB, dC, part_A_mu_decayed_out, part_mu_B_out, part_w);
  for (int64_t n0 = kLanes; n0 < Np; n0 += kLanes)
    backward_state_block<kFirst, false>(n0, dt, dr, dy, wm, A, B, C, decay, G_prev, lam,
                                        lam_prev, dA, dB, dC, part_A_mu_decayed_out,
                                        part_mu_B_out, part_w);
}

// Backward. lambda holds dℓ/dG at the chunk's last step on entry and dℓ/dG just before the
// chunk on return; spare is Np values of scratch; parts_A_mu_decayed and parts_mu_B
// (M·K·kLanes each) and parts_w (M·kLanes) hold the lane sums. The per-state
// gradients go to dA [m][Np], dB and dC, the sums over states of dℓ/dw to dw [m] and of
// dℓ/dΔ and dℓ/du to d_step, d_u.
template <typename acc_t>
CM_VECTOR_CLONES void scan_chunk_backward(
    int64_t M, int64_t Np, int64_t T, const acc_t* __restrict step, const acc_t* __restrict u,
    const acc_t* __restrict drive, const acc_t* __restrict w, const acc_t* __restrict dyhat,
    const acc_t* __restrict A, const acc_t* __restrict B, const acc_t* __restrict C,
    const acc_t* __restrict history, const acc_t* __restrict decays, acc_t* lambda, acc_t* spare,
    acc_t* __restrict parts_A_mu_decayed, acc_t* __restrict parts_mu_B,
    acc_t* __restrict parts_w, acc_t* __restrict dA, acc_t* __restrict dB, acc_t* __restrict dC,
    acc_t* __restrict dw, acc_t* __restrict d_step, acc_t* __restrict d_u) {
  std::fill(parts_w, parts_w + M * kLanes, acc_t(0));
  acc_t* lam = lambda;
  acc_t* lam_prev = spare;
  for (int64_t t = T - 1; t >= 0; --t) {
    const acc_t* G_prev = history + t * Np;
    backward_modality_step<true>(Np, step[t], drive[t], dyhat[t], w[0], A, B + t * Np,
                                 C + t * Np, decays + t * Np, G_prev, lam, lam_prev, dA,
                                 dB + t * Np, dC + t * Np, parts_A_mu_decayed + t * kLanes,
                                 parts_mu_B + t * kLanes, parts_w);
    for (int64_t m = 1; m < M; ++m) {
      const int64_t mt = m * K + t;
      backward_modality_step<false>(Np, step[mt], drive[mt], dyhat[mt], w[m], A + m * Np,
                                    B + mt * Np, C + mt * Np, decays + mt * Np, G_prev, lam,
                                    lam_prev, dA + m * Np, dB + mt * Np, dC + mt * Np,
                                    parts_A_mu_decayed + mt * kLanes, parts_mu_B + mt * kLanes,
                                    parts_w + m * kLanes);
    }
    std::swap(lam, lam_prev);
  }
  if (lam != lambda) std::copy(lam, lam + Np, lambda);
  // dℓ/dΔ = Σ_n A·mu·a·G_prev + u·Σ_n mu·B, dℓ/du = Δ·Σ_n mu·B.
  for (int64_t m = 0; m < M; ++m) {
    sum_lane_blocks(parts_A_mu_decayed + m * K * kLanes, T, d_step + m * K);
    sum_lane_blocks(parts_mu_B + m * K * kLanes, T, d_u + m * K);
    for (int64_t k = m * K; k < m * K + T; ++k) {
      d_step[k] += u[k] * d_u[k];
      d_u[k] *= step[k];
    }
    acc_t part[kLanes];
    std::copy(parts_w + m * kLanes, parts_w + (m + 1) * kLanes, part);
    dw[m] += sum_lanes(part);
  }
}

}  // namespace

template <typename input_t>
void coupled_scan_fwd_cpu(const ScanFwdParams& p) {
  using acc_t = cpu_acc_t<input_t>;
  const ScanShape s = p.shape;
  const int64_t M = s.n_modalities, N = s.dstate, L = s.seqlen, Np = padded_states(N);
  const int64_t blocks_per_batch = (s.dim + kRowsPerTask - 1) / kRowsPerTask;
  auto* y_out = static_cast<input_t*>(p.y);
  auto* y_ungated_out = static_cast<input_t*>(p.y_ungated);
  auto* chunk_states = static_cast<acc_t*>(p.chunk_states);
  auto* final_state = static_cast<acc_t*>(p.final_state);

  const int64_t n_tasks = s.batch * blocks_per_batch;
  // at::parallel_for decides how many threads work (by the grain); the tasks themselves are
  // handed out one at a time from this counter rather than in its equal static ranges: on
  // a machine shared with other jobs, a thread that loses its core takes fewer tasks
  // instead of holding the others up.
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, n_tasks, parallel_grain(s), [&](int64_t, int64_t) {
    const cpu::FlushDenormals flush_denormals;
    TaskScratch<acc_t> in(p);
    // G[row][Np]: the coupled state of each channel (padded states stay 0).
    std::vector<acc_t> G(kRowsPerTask * Np), spare(Np), yhat(M * K), z(K), parts(M * K * kLanes);
    for (int64_t task; (task = next_task.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) {
      in.start_task(p, task);
      const int64_t b = in.b, e0 = in.e0, rows = in.rows;
      // Padded states are reset too: a non-finite channel leaves non-finite padded states.
      std::fill(G.begin(), G.end(), acc_t(0));
      if (p.initial_state.present())
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t n = 0; n < N; ++n)
            G[r * Np + n] = ptr4<acc_t>(p.initial_state, b, e0 + r, n, 0)[0];

      for (int64_t c = 0; c < s.n_chunks; ++c) {
        const int64_t t0 = c * K, T = std::min(L - t0, K);
        in.template load_tiles<input_t>(p, t0, T);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = e0 + r;
          acc_t* state = &G[r * Np];
          std::copy(state, state + N, &chunk_states[((b * s.dim + e) * s.n_chunks + c) * N]);
          in.template load_steps_of_row<input_t>(p, r, t0, T);
          with_state_count(Np, [&](auto states) {
            scan_chunk_forward(M, states, T, in.step.data(), in.drive.data(), in.w.data(),
                               in.A_row(r), in.B_tile.data(), in.C_tile.data(), state,
                               spare.data(), parts.data(), yhat.data());
          });
          // Pass 3: ŷ = Σ_n C·h + D·u, y = ŷ·silu(z).
          for (int64_t m = 0; m < M; ++m) {
            const int64_t out = ((m * s.batch + b) * s.dim + e) * L + t0;
            const acc_t D = in.D[r * M + m];
            const acc_t* __restrict u_m = &in.u[m * K];
            acc_t* __restrict yhat_m = &yhat[m * K];
            for (int64_t k = 0; k < T; ++k) yhat_m[k] += D * u_m[k];
            if (p.z.present()) {
              store_steps(yhat_m, T, &y_ungated_out[out]);
              load_steps<input_t>(p.z, m, b, e, t0, T, z.data());
              gate_steps(T, z.data(), yhat_m);
            }
            store_steps(yhat_m, T, &y_out[out]);
          }
          if (c + 1 < s.n_chunks)
            for (int64_t m = 0; m < M; ++m)
              for (const TensorArg* x : {&p.delta, &p.u, &p.z})
                prefetch_steps<input_t>(*x, m, b, e, t0 + K, std::min(L - t0 - K, K));
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        std::copy(&G[r * Np], &G[r * Np] + N, &final_state[(b * s.dim + e0 + r) * N]);
    }
  });
}

// dst[m, n, t] += src[m, n, t] for m < M, n < N, t < T; strides (m, n) of each, t contiguous.
template <typename acc_t>
CM_VECTOR_CLONES void add_planes(int64_t M, int64_t N, int64_t T, const acc_t* src,
                                 const std::array<int64_t, 2>& src_stride, acc_t* dst,
                                 const std::array<int64_t, 2>& dst_stride) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* __restrict s = src + m * src_stride[0] + n * src_stride[1];
      acc_t* __restrict d = dst + m * dst_stride[0] + n * dst_stride[1];
      for (int64_t t = 0; t < T; ++t) d[t] += s[t];
    }
}

// Parts the backward's tasks are cut into, at most: enough for the threads of most machines
// to balance their load (a part is also at least parallel_grain's work), few enough that
// the parts' own sums (below) stay small; fixed, so that the sums' order does not depend on
// the number of threads.
constexpr int64_t kMaxBackwardParts = 16;

// What one part of the backward's tasks sums over channels that other parts' tasks sum too,
// kept apart and added to the outputs in part order after all parts are done.
template <typename acc_t>
struct PartSums {
  std::vector<acc_t> dA, dD, dbias, dw;  // [m][e][n], [m][e], [m][e], [m]
  // dB and dC [m][n][t] of the part's first batch index when an earlier part has tasks of
  // it too (first_b >= 0); the part's other batch indices are its alone and written directly.
  int64_t first_b = -1;
  std::vector<acc_t> dB_first, dC_first;
};

template <typename input_t>
void coupled_scan_bwd_cpu(const ScanBwdParams& p) {
  using acc_t = cpu_acc_t<input_t>;
  const ScanShape s = p.shape;
  const int64_t M = s.n_modalities, N = s.dstate, L = s.seqlen, Np = padded_states(N);
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

  // The tasks, batch index major, are cut into n_parts contiguous ranges, a number fixed by
  // the shape alone; the threads take the parts one at a time from a counter, so a thread
  // that loses its core to another job takes fewer (the forward's hand-out of single tasks
  // would make the order in which tasks add into dB, dC, dA, ... depend on timing). Every
  // sum over channels is taken in a fixed order: within a part in task order, across parts
  // in part order. So the gradients are the same from run to run and for any number of
  // threads.
  const int64_t n_tasks = s.batch * blocks_per_batch;
  const int64_t n_parts = std::clamp<int64_t>(
      (n_tasks + parallel_grain(s) - 1) / parallel_grain(s), 1, kMaxBackwardParts);
  std::vector<PartSums<acc_t>> part_sums(n_parts);
  // Strides over (m, n) of dB, dC (M, batch, N, L) and of a part's dB_first, dC_first; t is
  // contiguous in both (prepare_scan_backward allocates dB, dC contiguous).
  const std::array<int64_t, 2> out_stride = {p.dBC_stride[0], p.dBC_stride[2]};
  const std::array<int64_t, 2> first_stride = {N * L, L};
  std::atomic<int64_t> next_part{0};
  at::parallel_for(0, n_parts, 1, [&](int64_t, int64_t) {
    const cpu::FlushDenormals flush_denormals;
    TaskScratch<acc_t> in(p);
    // history[0]'s padded states stay 0 (only the first N are written from the saved states).
    std::vector<acc_t> history((K + 1) * Np, acc_t(0)), decays(M * K * Np), spare(Np),
        parts_A_mu_decayed(M * K * kLanes), parts_mu_B(M * K * kLanes), parts_w(M * kLanes);
    std::vector<acc_t> dyhat(M * K), d_step(M * K), d_u(M * K), z(K), y_ungated(K), dz(K);
    std::vector<acc_t> lambda(kRowsPerTask * Np), dA(kRowsPerTask * M * Np),
        dD(kRowsPerTask * M), dbias(kRowsPerTask * M), dB_tile(M * K * Np), dC_tile(M * K * Np);
    for (int64_t part; (part = next_part.fetch_add(1, std::memory_order_relaxed)) < n_parts;) {
      PartSums<acc_t>& sums = part_sums[part];
      sums.dA.assign(M * s.dim * N, acc_t(0));
      sums.dD.assign(M * s.dim, acc_t(0));
      sums.dbias.assign(M * s.dim, acc_t(0));
      sums.dw.assign(M, acc_t(0));
      const int64_t task_begin = part * n_tasks / n_parts;
      const int64_t task_end = (part + 1) * n_tasks / n_parts;
      if (task_begin % blocks_per_batch != 0) {  // the previous part has this batch index too
        sums.first_b = task_begin / blocks_per_batch;
        sums.dB_first.assign(M * N * L, acc_t(0));
        sums.dC_first.assign(M * N * L, acc_t(0));
      }
      for (int64_t task = task_begin; task < task_end; ++task) {
        in.start_task(p, task);
        const int64_t b = in.b, e0 = in.e0, rows = in.rows;
        // lambda = dℓ/dG[t] per channel, starting from the final state's gradient.
        std::fill(lambda.begin(), lambda.end(), acc_t(0));  // padded states too, as in forward
        if (p.dfinal_state.present())
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t n = 0; n < N; ++n)
              lambda[r * Np + n] = ptr4<acc_t>(p.dfinal_state, b, e0 + r, n, 0)[0];
        std::fill(dA.begin(), dA.end(), acc_t(0));
        std::fill(dD.begin(), dD.end(), acc_t(0));
        std::fill(dbias.begin(), dbias.end(), acc_t(0));

        for (int64_t c = s.n_chunks - 1; c >= 0; --c) {
          const int64_t t0 = c * K, T = std::min(L - t0, K);
          in.template load_tiles<input_t>(p, t0, T);
          std::fill(dB_tile.begin(), dB_tile.end(), acc_t(0));
          std::fill(dC_tile.begin(), dC_tile.end(), acc_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t e = e0 + r;
            in.template load_steps_of_row<input_t>(p, r, t0, T);
            // Pass 1, the gate: dŷ = dy·silu(z), dz = dy·ŷ·silu'(z).
            for (int64_t m = 0; m < M; ++m) {
              acc_t* dyhat_m = &dyhat[m * K];
              load_steps<input_t>(p.dy, m, b, e, t0, T, dyhat_m);
              if (!p.z.present()) continue;
              load_steps<input_t>(p.z, m, b, e, t0, T, z.data());
              load_steps<input_t>(p.y_ungated, m, b, e, t0, T, y_ungated.data());
              gate_backward_steps(T, z.data(), y_ungated.data(), dyhat_m, dz.data());
              store_steps(dz.data(), T, &dz_out[((m * s.batch + b) * s.dim + e) * L + t0]);
            }
            // Pass 2: recompute the chunk from its saved start, then walk it backwards.
            for (int64_t n = 0; n < N; ++n) history[n] = ptr4<acc_t>(p.chunk_states, b, e, c, n)[0];
            with_state_count(Np, [&](auto states) {
              scan_chunk_recompute(M, states, T, in.step.data(), in.drive.data(), in.w.data(),
                                   in.A_row(r), in.B_tile.data(), history.data(), decays.data());
            });
            scan_chunk_backward(M, Np, T, in.step.data(), in.u.data(), in.drive.data(),
                                in.w.data(), dyhat.data(), in.A_row(r), in.B_tile.data(),
                                in.C_tile.data(), history.data(), decays.data(), &lambda[r * Np],
                                spare.data(), parts_A_mu_decayed.data(), parts_mu_B.data(),
                                parts_w.data(), &dA[r * M * Np], dB_tile.data(),
                                dC_tile.data(), sums.dw.data(), d_step.data(), d_u.data());
            // Pass 3: du = Σ_n dℓ/du + dŷ·D, dδ = dℓ/dΔ · softplus'(δ + β); D and β gradients.
            for (int64_t m = 0; m < M; ++m) {
              const int64_t out = ((m * s.batch + b) * s.dim + e) * L + t0;
              const acc_t D = in.D[r * M + m];
              const acc_t* __restrict dyhat_m = &dyhat[m * K];
              const acc_t* __restrict u_m = &in.u[m * K];
              acc_t* __restrict d_step_m = &d_step[m * K];
              acc_t* __restrict d_u_m = &d_u[m * K];
              if (p.delta_softplus) softplus_grad_steps(T, &in.pre[m * K], d_step_m);
              acc_t sum_dD = 0, sum_dbias = 0;
              for (int64_t k = 0; k < T; ++k) {
                d_u_m[k] += dyhat_m[k] * D;
                sum_dD += dyhat_m[k] * u_m[k];
                sum_dbias += d_step_m[k];
              }
              dD[r * M + m] += sum_dD;
              dbias[r * M + m] += sum_dbias;
              store_steps(d_u_m, T, &du_out[out]);
              store_steps(d_step_m, T, &ddelta_out[out]);
            }
            if (c > 0)
              for (int64_t m = 0; m < M; ++m)
                for (const TensorArg* x : {&p.delta, &p.u, &p.dy, &p.z, &p.y_ungated})
                  prefetch_steps<input_t>(*x, m, b, e, t0 - K, K);
          }
          // This chunk's dB, dC, summed over the task's channels, turned back to [m][n][t] and
          // added into the outputs, or into the part's own sums for a batch index the
          // previous part has tasks of too.
          for (auto [tile, out, first] : {std::tuple{&dB_tile, dB_out, &sums.dB_first},
                                          std::tuple{&dC_tile, dC_out, &sums.dC_first}}) {
            const bool into_first = b == sums.first_b;
            acc_t* at = into_first ? first->data() + t0 : out + b * p.dBC_stride[1] + t0;
            const std::array<int64_t, 2>& stride = into_first ? first_stride : out_stride;
            for (int64_t m = 0; m < M; ++m)
              transpose_to_states<true>(&(*tile)[m * K * Np], Np, T, N, at + m * stride[0],
                                        stride[1]);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = e0 + r;
          std::copy(&lambda[r * Np], &lambda[r * Np] + N, &dinit_out[(b * s.dim + e) * N]);
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t n = 0; n < N; ++n)
              sums.dA[(m * s.dim + e) * N + n] += dA[(r * M + m) * Np + n];
            sums.dD[m * s.dim + e] += dD[r * M + m];
            sums.dbias[m * s.dim + e] += dbias[r * M + m];
          }
        }
      }
    }
  });

  for (const PartSums<acc_t>& sums : part_sums) {
    for (int64_t i = 0; i < M * s.dim * N; ++i) dA_out[i] += sums.dA[i];
    for (int64_t i = 0; i < M * s.dim; ++i) {
      if (dD_out) dD_out[i] += sums.dD[i];
      if (dbias_out) dbias_out[i] += sums.dbias[i];
    }
    for (int64_t m = 0; m < M; ++m) dw_out[m] += sums.dw[m];
    if (sums.first_b < 0) continue;
    const int64_t at = sums.first_b * p.dBC_stride[1];
    add_planes(M, N, L, sums.dB_first.data(), first_stride, dB_out + at, out_stride);
    add_planes(M, N, L, sums.dC_first.data(), first_stride, dC_out + at, out_stride);
  }
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
