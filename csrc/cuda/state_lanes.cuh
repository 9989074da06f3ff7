// The "state lanes" thread mapping shared by coupled_scan_fwd_state_lanes.cu and
// coupled_scan_bwd_state_lanes.cu (docs/kernels.md).
//
// One channel (b, e), a *row*, is owned by R lanes (R a power of two, at most 32; how they
// sit in warps: LaneGeometry); each lane holds kStates of the row's states in registers and
// walks time step by step. The states are independent recurrences (the coupling sums over
// modalities, not states), so no step waits on another lane; only sums cross lanes: over
// states (ŷ forward, dΔ and du backward) and, in backward, over rows (dB, dC).
//
// Lane r of a row holds the states n = 4·(q·R + r) + i, q < kStates/4, i < 4: for each q the
// row's lanes read consecutive 16-byte pieces of a staged step (conflict-free shared loads).
// States from N up to Np = R·kStates are padding with A = B = C = 0 and stay 0.
//
// All rows of a block share the batch index b, so B[m, b, :, t] and C[m, b, :, t] are staged
// once per block and tile of T steps, coalesced along t, in shared memory laid out
// [t][m][B|C][n] (bc_stride floats per step).
#pragma once
#include "scan_cuda_common.cuh"

namespace coupled_mamba {

static_assert((kChunkLen & (kChunkLen - 1)) == 0, "chunk starts are found with a mask");

CM_HOST_DEVICE int log2_of(int power_of_two) {
  int k = 0;
  while ((1 << k) < power_of_two) ++k;
  return k;
}

// Where rows, states and steps go; chosen on the host and passed to the kernel.
//
// A row's R lanes sit in Ws warps ("state warps"), Rw = R / Ws lanes in each; a warp holds
// 32 / Rw rows. Forward uses Ws = 1 (a row inside one warp, different warps different rows:
// ŷ is summed with shuffles alone). Backward uses Ws > 1 (every warp holds all the block's
// rows, for its own share of the states): dB and dC, summed over rows, are then reduced
// inside each warp and no two warps touch the same state.
struct LaneGeometry {
  int threads;          // per block
  int R;                // lanes per row, R = Ws·Rw
  int Rw, log2_Rw;      // lanes of a row in one warp
  int Ws, log2_Ws;      // warps sharing a row's states
  int rows, log2_rows;  // rows per block
  int Np, log2_Np;      // states covered by a row's lanes, R·kStates >= N
  int T, log2_T;        // steps per staged tile, a power of two
  int bc_stride;        // floats per step of the B/C stage: 2·M·Np, + 4 against bank conflicts
  int64_t blocks_per_batch;
  int64_t blocks;       // 0 when there is nothing to launch
};

// The smallest R (a power of two, at most 32) with R·k_states >= N; then `threads` (a
// multiple of 32·Ws) and Ws state warps (at most R).
inline LaneGeometry lane_geometry(const ScanShape& s, int k_states, int threads, int T,
                                  int state_warps) {
  LaneGeometry g{};
  g.R = 1;
  while (g.R < 32 && static_cast<int64_t>(g.R) * k_states < s.dstate) g.R *= 2;
  g.Ws = state_warps < g.R ? state_warps : g.R;
  g.log2_Ws = log2_of(g.Ws);
  g.Rw = g.R / g.Ws;
  g.log2_Rw = log2_of(g.Rw);
  g.threads = threads;
  g.rows = (threads / 32 / g.Ws) * (32 / g.Rw);
  g.log2_rows = log2_of(g.rows);
  g.Np = g.R * k_states;
  g.log2_Np = log2_of(g.Np);
  g.T = T;
  g.log2_T = log2_of(T);
  g.bc_stride = 2 * static_cast<int>(s.n_modalities) * g.Np + 4;
  g.blocks_per_batch = (s.dim + g.rows - 1) / g.rows;
  g.blocks = s.seqlen == 0 ? 0 : s.batch * g.blocks_per_batch;
  return g;
}

// Shared memory of the current device, for sizing the kernels' stages at launch.
struct SmemLimits {
  int per_block;  // dynamic shared memory one block may opt in to
  int per_sm;     // a multiprocessor's, of which each resident block also takes `reserved`
  int reserved;
};

// Without an answer from the runtime: blocks of the default 48 KB (what a block gets without
// opting in), however many share a multiprocessor.
inline SmemLimits device_smem_limits() {
  int device = 0;
  SmemLimits l{};
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l.per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&l.per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&l.reserved, cudaDevAttrReservedSharedMemoryPerBlock, device) !=
          cudaSuccess)
    return SmemLimits{kSmemBudgetBytes, 1 << 30, 0};
  return l;
}

// Dynamic shared memory a block may take so that `blocks_per_sm` of them fit on one
// multiprocessor: 113 KB for 2 on an H100 / H200 (228 KB each), 81 KB on an A100 (164 KB).
inline int smem_budget_per_block(const SmemLimits& l, int blocks_per_sm) {
  const int share = l.per_sm / blocks_per_sm - l.reserved;
  return share < l.per_block ? share : l.per_block;
}

// This thread's row and lane.
struct LanePlace {
  int r;        // lane within the row, 0 .. R-1
  int row;      // row within the block
  int warp;     // warp within the block
  int64_t b, e_first, e;
  bool active;  // e < dim (the last block of a batch index may run past dim)

  __device__ LanePlace(const LaneGeometry& g, int64_t dim) {
    warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int state_warp = warp & (g.Ws - 1), row_warp = warp >> g.log2_Ws;
    r = (state_warp << g.log2_Rw) + (lane & (g.Rw - 1));
    row = (row_warp << (5 - g.log2_Rw)) + (lane >> g.log2_Rw);
    b = blockIdx.x / g.blocks_per_batch;
    e_first = (blockIdx.x % g.blocks_per_batch) * g.rows;
    e = e_first + row;
    active = e < dim;
  }
  // n of the lane's k-th state.
  __device__ int state(const LaneGeometry& g, int k) const {
    return 4 * ((k >> 2) * g.R + r) + (k & 3);  // k >= 0: shifts, not signed division
  }
};

// v, but opaque to the optimizer: an address computed from it inside a loop is computed
// there, not hoisted out of the loop and kept (the backward's unrolled segment otherwise
// had nvcc precompute the shared-memory address of every (step, modality) before the
// chunk loop and spill them to local memory).
__device__ __forceinline__ int opaque(int v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

// The four 16-byte-aligned floats at `at` in shared memory, as an array.
__device__ __forceinline__ void load4(const float* at, float (&out)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(at);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}

// Where modality m's B (is_C false) or C values start within one staged step of the B/C
// stage ([m][B|C][n]; stage_bc fills it, the dB/dC accumulator has the same layout).
__device__ __forceinline__ int bc_at(const LaneGeometry& g, int m, bool is_C) {
  return (2 * m + (is_C ? 1 : 0)) * g.Np;
}

// A lane's q-th group of 4 states (n = 4·(q·R + r) + i) of modality m's B or C in the staged
// step `step` (the step's start, already offset by the lane's 4·r).
__device__ __forceinline__ void load_quad(const float* step, const LaneGeometry& g, int m,
                                          bool is_C, int q, float (&out)[4]) {
  load4(step + bc_at(g, m, is_C) + 4 * q * g.R, out);
}

// Calls f(k, B, C) for each of the lane's kStates states (k its index in the lane) of
// modality m, with that state's B and C from the staged step `step` (offset by 4·r).
template <int kStates, typename F>
__device__ __forceinline__ void for_each_state(const float* step, const LaneGeometry& g, int m,
                                               F&& f) {
#pragma unroll
  for (int q = 0; q < kStates / 4; ++q) {
    float Bq[4], Cq[4];
    load_quad(step, g, m, false, q, Bq);
    load_quad(step, g, m, true, q, Cq);
#pragma unroll
    for (int i = 0; i < 4; ++i) f(4 * q + i, Bq[i], Cq[i]);
  }
}

// A·log2(e) for the lane's states: in registers for up to 4 modalities; with more, read
// from global memory (L1) where used, since 16·kStates registers would spill.
template <int kMaxM, int kStates>
struct DecayRates {
  static constexpr bool kInRegisters = kMaxM <= 4;
  float v[kInRegisters ? kMaxM : 1][kStates];

  __device__ void load(const TensorArg& A, const LaneGeometry& g, const LanePlace& at, int M,
                       int64_t N) {
    if constexpr (kInRegisters) {
#pragma unroll
      for (int m = 0; m < kMaxM; ++m)
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          const int n = at.state(g, k);
          v[m][k] = at.active && m < M && n < N ? load_param(A, m, at.e, n) * kLog2e : 0.f;
        }
    }
  }
  __device__ float get(const TensorArg& A, const LaneGeometry& g, const LanePlace& at, int m,
                       int k, int64_t N) const {
    if constexpr (kInRegisters) {
      return v[m][k];
    } else {
      const int n = at.state(g, k);
      return at.active && n < N ? load_param(A, m, at.e, n) * kLog2e : 0.f;
    }
  }
};

// Sum over the `lanes` lanes of a row inside one warp (Rw); every one of them gets it. All
// lanes of the warp call it. Unrolled over the five possible rounds, each taken where
// `lanes` (the same in the whole warp) needs it: a loop over a run-time count spent more
// instructions on its own control than on the shuffles (forward, N = 64: the sum took 24
// instructions per modality and step, now 13, against 35 for the states).
__device__ __forceinline__ float row_sum(float v, int lanes) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    if (offset < lanes) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Fills the B/C stage of the tile starting at t0: stage[t·bc_stride + (2m + is_C)·Np + n];
// B alone without `with_C` (the backward's checkpoint pass needs no C). Steps past L and
// states past N read as 0. The flat index runs fastest along t (coalesced global reads);
// each thread issues kBatch loads before it stores any, so that their latencies overlap
// (the forward takes 16: at case (a) half the rounds of 8, and no spill; the backward 8,
// as 16 spilled there).
template <typename input_t, int kBatch = kStageBatch>
__device__ void stage_bc(const LaneGeometry& g, float* stage, const TensorArg& B,
                         const TensorArg& C, int M, int64_t b, int64_t N, int64_t t0,
                         int64_t L, bool with_C = true) {
  const int total = (with_C ? 2 : 1) * M * g.Np * g.T;
  for (int first = threadIdx.x; first < total; first += kBatch * blockDim.x) {
    float v[kBatch];
    int at[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int j = first + i * blockDim.x;
      const int t = j & (g.T - 1), rest = j >> g.log2_T;
      const int n = rest & (g.Np - 1);
      const int mb = (rest >> g.log2_Np) << (with_C ? 0 : 1);  // 2m + is_C
      const int m = mb >> 1;
      const TensorArg& x = (mb & 1) ? C : B;
      v[i] = 0.f;
      at[i] = -1;
      if (j < total) {
        at[i] = t * g.bc_stride + bc_at(g, m, mb & 1) + n;
        if (n < N && t0 + t < L)
          v[i] = to_float(__ldg(static_cast<const input_t*>(x.data) + m * x.stride[0] +
                                b * x.stride[1] + n * x.stride[2] + (t0 + t) * x.stride[3]));
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
      if (at[i] >= 0) stage[at[i]] = v[i];
  }
}

// One element of an input row: x[m, b, e, t] in float.
template <typename input_t>
__device__ __forceinline__ float load_input(const TensorArg& x, int m, int64_t b, int64_t e,
                                            int64_t t) {
  return to_float(__ldg(static_cast<const input_t*>(x.data) + m * x.stride[0] +
                        b * x.stride[1] + e * x.stride[2] + t * x.stride[3]));
}

}  // namespace coupled_mamba
