// Backward CUDA kernel of the coupled selective scan (docs/math.md §3), "state lanes"
// mapping (state_lanes.cuh): a row's states spread over R lanes, each lane walking time.
//
// The adjoint recurrence runs back in time, λ[t-1] = Σ_m μ_m·a_m with μ_m = dŷ_m·C_m + w_m·λ[t],
// and every gradient at step t needs G[t-1]. Forward saved G only at chunk starts (every 64
// steps), so each chunk, last to first, is done in two passes over segments of kSeg steps
// (kSeg·kStates = 32 floats of history per lane, held in registers):
//  1. from the chunk's saved state, run forward through the chunk and keep G at the start
//     of every segment (checkpoints, in shared memory, each lane its own);
//  2. for each segment, last to first: recompute G[t-1] of its steps from its checkpoint,
//     then walk them back, forming μ and every per-element gradient (scan_math.h's
//     modality_state_grad_factored) and λ[t-1].
// So each exponential is computed about three times in backward (checkpoints, recompute,
// gradients) and never stored; nothing of size (…, N, L) exists.
//
// Placement (state_lanes.cuh): the block's warps split the states, each warp holding all of
// the block's rows for its share (LaneGeometry with Ws > 1). Sums over channels: dB and dC
// per (modality, step, state) are summed over the warp's rows with a transposing shuffle
// reduction (each round halves the values a lane carries), then added into shared memory
// with plain stores, since no other warp holds those states: no shared-memory atomics (a
// float atomic add to shared memory compiles to a compare-and-swap loop, ATOMS.CAST.SPIN; the
// first version of this kernel added dB and dC that way and was 1.5x slower). Then one
// global atomic per element and block. Sums over states,
// (Σ_n A·μ·a·G, Σ_n μ·B) per (modality, step, row), go through shuffles inside a warp and
// shared memory across warps; the segment's epilogue forms dΔ, du, dδ from them (dz is
// written while staging). dA per lane over all steps, one atomic per
// element at the end; dD and dΔ-bias per (modality, row) in shared memory, the coupling's
// gradient per lane, each one atomic per block or warp at the end.
//
// Those global atomics add in whatever order blocks finish: the sums' rounding differs from
// run to run. Under torch.use_deterministic_algorithms the caller gives each block a slot of
// its own instead (params.h: dB, dC per block of channels, dA, dD, dΔ-bias per batch index,
// the coupling's gradient per warp), so that every address receives one add, and sums the
// slots itself in a fixed order.
#include "coupled_scan_cuda.h"
#include "state_lanes.cuh"

namespace coupled_mamba {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
// Up to 4 modalities (A, w and the dA sums in registers); with more, the time-lanes
// backward runs (coupled_scan_bwd.cu). Instantiating this kernel for 16 modalities took
// minutes to compile and spilled 3 KB per thread.
constexpr int kBwdLaneMaxM = 4;

// Up to 8 state warps (256 threads); segments of kSeg steps, kSeg·kStates = 32 floats of
// history per lane. At most 128 registers a thread (two blocks per multiprocessor).
constexpr int kBwdMaxStateWarps = 8;
template <int kStates>
struct BwdLaneConfig {
  static constexpr int kSeg = 32 / kStates;  // steps per segment (and per staged tile)
  static constexpr int kCheckpoints = kChunkLen / kSeg;
};

struct BwdLanePlan {
  LaneGeometry g;   // g.T == kSeg
  int st_stride;    // floats per step of the {Δ, Δu, dŷ, u} stage: 4·M·rows + 4
  int sum_stride;   // floats per step of the sums over states {Σ A·log2e·x, Σ μ·B} per
                    // (modality, row, state warp): 2·M·rows·Ws + 2
  size_t smem_bytes;
  // Offsets in floats of each part of shared memory.
  int at_dBC, at_st, at_sums, at_checkpoints, at_dD;
};

template <int kStates>
BwdLanePlan plan_bwd_lanes(const ScanShape& s) {
  using Config = BwdLaneConfig<kStates>;
  BwdLanePlan pl{};
  const int M = static_cast<int>(s.n_modalities);
  // As many state warps as the row has lanes to spread (at most 8), one warp's worth of rows.
  int R = 1;
  while (R < 32 && static_cast<int64_t>(R) * kStates < s.dstate) R *= 2;
  const int state_warps = R < kBwdMaxStateWarps ? R : kBwdMaxStateWarps;
  pl.g = lane_geometry(s, kStates, 32 * state_warps, Config::kSeg, state_warps);
  pl.st_stride = 4 * M * pl.g.rows + 4;
  pl.sum_stride = 2 * M * pl.g.rows * pl.g.Ws + 2;
  const int T = Config::kSeg;
  pl.at_dBC = T * pl.g.bc_stride;
  pl.at_st = pl.at_dBC + T * pl.g.bc_stride;
  pl.at_sums = pl.at_st + T * pl.st_stride;
  pl.at_checkpoints = pl.at_sums + T * pl.sum_stride;
  pl.at_dD = pl.at_checkpoints + Config::kCheckpoints * kStates * pl.g.threads;
  pl.smem_bytes = (pl.at_dD + 2 * M * pl.g.rows) * sizeof(float);
  return pl;
}

// Fills the per-(modality, row, step) stage: {Δ, Δ·u, dŷ, u} at st[t·st_stride + 4·(m·rows
// + row)]. With `grads`, dŷ = dy·silu(z) and dz is written here (else dŷ = 0: the
// checkpoint pass needs only Δ and Δ·u). Rows past dim and steps past L stage zeros.
template <typename input_t>
__device__ void stage_bwd_steps(const BwdLanePlan& pl, float* stage, const ScanBwdParams& p,
                                int M, int64_t b, int64_t e_first, int64_t t0, bool grads) {
  constexpr int kBatch = 4;  // five loads each: 20 in flight per thread
  const LaneGeometry& g = pl.g;
  const ScanShape& s = p.shape;
  const int total = M * g.rows * g.T;
  for (int first = threadIdx.x; first < total; first += kBatch * blockDim.x) {
    float raw[kBatch], u[kBatch], dy[kBatch], z[kBatch], y_hat[kBatch], bias[kBatch];
    bool real[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int j = first + i * blockDim.x;
      const int t = j & (g.T - 1), mr = j >> g.log2_T;
      const int m = mr >> g.log2_rows;
      const int64_t e = e_first + (mr & (g.rows - 1));
      raw[i] = u[i] = dy[i] = z[i] = y_hat[i] = bias[i] = 0.f;
      real[i] = j < total && e < s.dim && t0 + t < s.seqlen;
      if (real[i]) {
        raw[i] = load_input<input_t>(p.delta, m, b, e, t0 + t);
        u[i] = load_input<input_t>(p.u, m, b, e, t0 + t);
        if (p.delta_bias.present()) bias[i] = load_param(p.delta_bias, m, e);
        if (grads) {
          dy[i] = load_input<input_t>(p.dy, m, b, e, t0 + t);
          if (p.z.present()) {
            z[i] = load_input<input_t>(p.z, m, b, e, t0 + t);
            y_hat[i] = load_input<input_t>(p.y_ungated, m, b, e, t0 + t);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int j = first + i * blockDim.x;
      if (j >= total) continue;
      const int t = j & (g.T - 1), mr = j >> g.log2_T;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (real[i]) {
        v.x = step_size_fast(raw[i], bias[i], p.delta_softplus);
        v.y = v.x * u[i];
        v.z = dy[i];
        v.w = u[i];
        if (grads && p.z.present()) {
          const int m = mr >> g.log2_rows;
          const int64_t e = e_first + (mr & (g.rows - 1));
          float dz;
          v.z = gate_backward(dy[i], y_hat[i], z[i], &dz);  // exact: a fast one spilled more
          static_cast<input_t*>(p.dz)[((m * s.batch + b) * s.dim + e) * s.seqlen + t0 + t] =
              from_float<input_t>(dz);
        }
      }
      *reinterpret_cast<float4*>(stage + t * pl.st_stride + 4 * mr) = v;
    }
  }
}

// Adds this step's dB and dC contributions of the warp's rows into the shared accumulator
// `acc` (one modality of one step, laid out as the B/C stage: bc_at). v holds this lane's
// (its row's) values: dB of its kStates states, then dC. The lanes holding the same states
// of the warp's other rows are lane ^ o for o = Rw, 2·Rw, ..., 16. Each round pairs such
// lanes: one keeps the lower half of the values, the other the upper half, and adds the
// partner's half it keeps; once a lane carries one value the rounds left are plain
// butterflies. Then every sum is held by one lane (or several equal copies, of which one
// writes), and no other warp holds these states: a plain read-add-write, no atomics. All
// lanes of the warp call it with Rw = g.Rw, a compile-time constant where the kernel is
// compiled for one (kRw below): the rounds and the values left then fold away.
template <int kStates>
__device__ __forceinline__ void add_over_rows(float (&v)[2 * kStates], float* acc, int Rw,
                                              const LaneGeometry& g, const LanePlace& at) {
  constexpr int V = 2 * kStates;
  const int lane = threadIdx.x & 31;
  int first = 0;        // index in the original v of v[0] after the rounds
  bool writer = true;   // false on the copies that a plain round made
  int count = V;        // values this lane carries after the rounds
#pragma unroll
  for (int round = 0; round < 5; ++round) {
    const int o = Rw << round;
    if (o >= 32) break;
    const bool upper = (lane & o) != 0;
    constexpr int kMax = V;  // sizes below are compile-time once the loop is unrolled
    const int size = (kMax >> round) > 0 ? (kMax >> round) : 1;
    if (size >= 2) {
      const int half = size / 2;
#pragma unroll
      for (int i = 0; i < kMax / 2; ++i) {
        if (i >= half) break;
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
      }
      if (upper) first += half;
      count = half;
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], o);
      writer = writer && !upper;
    }
  }
  if (!writer) return;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (j >= count) break;
    const int x = first + j;
    const bool is_C = x >= kStates;
    const int n = at.state(g, is_C ? x - kStates : x);
    acc[bc_at(g, 0, is_C) + n] += v[j];  // acc starts at the modality's B
  }
}

// kRw > 0: compiled for Rw = kRw (g.Rw), which folds add_over_rows' rounds and writes and
// row_sum's rounds. With Rw read at run time every round and every value written kept a
// branch and its index arithmetic (at N = 64 the segment's walk ran about a third more
// instructions, by our estimate from the SASS). kRw = 0 reads g.Rw: kept for 8 states per
// lane, where the compile-time form spilled far more in the walk (648 spill loads in its
// SASS against 180).
template <typename input_t, int kMaxM, int kStates, int kRw>
__global__ void __launch_bounds__(32 * kBwdMaxStateWarps, 2)
    coupled_scan_bwd_state_lanes_kernel(const ScanBwdParams p, const BwdLanePlan pl) {
  using Config = BwdLaneConfig<kStates>;
  constexpr int kSeg = Config::kSeg, kQuads = kStates / 4;
  const LaneGeometry& g = pl.g;
  const int Rw = kRw > 0 ? kRw : g.Rw;  // a row's lanes in one warp
  const ScanShape s = p.shape;
  const int M = static_cast<int>(s.n_modalities);
  const int64_t N = s.dstate, L = s.seqlen;
  const LanePlace at(g, s.dim);
  const int state_warp = at.warp & (g.Ws - 1);

  CM_DYNAMIC_SMEM(float4, smem_f4);  // float4: the 16-byte loads need that alignment
  float* smem = reinterpret_cast<float*>(smem_f4);
  float* stage_BC = smem;               // [kSeg][bc_stride]: B, C
  float* acc_dBC = smem + pl.at_dBC;    // [kSeg][bc_stride]: dB, dC summed over the rows
  float* stage_st = smem + pl.at_st;    // [kSeg][st_stride]: {Δ, Δu, dŷ, u}
  float* sums = smem + pl.at_sums;      // [kSeg][sum_stride]: sums over states
  float* checkpoints = smem + pl.at_checkpoints;  // [kCheckpoints][kStates][threads]
  float* acc_dD = smem + pl.at_dD;      // [2][M·rows]: dD, dΔ-bias per (modality, row)
  for (int j = threadIdx.x; j < kSeg * g.bc_stride; j += blockDim.x) acc_dBC[j] = 0.f;
  for (int j = threadIdx.x; j < 2 * M * g.rows; j += blockDim.x) acc_dD[j] = 0.f;
  const auto checkpoint = [&](int segment, int k) -> float& {
    return checkpoints[(segment * kStates + k) * g.threads + threadIdx.x];
  };

  float w[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) w[m] = m < M ? load_param(p.coupling, m) : 0.f;
  DecayRates<kMaxM, kStates> A2;
  A2.load(p.A, g, at, M, N);

  // λ = dℓ/dG[t], from the final state's gradient.
  float lambda[kStates];
#pragma unroll
  for (int k = 0; k < kStates; ++k) {
    const int n = at.state(g, k);
    lambda[k] = at.active && n < N && p.dfinal_state.present()
                    ? load_param(p.dfinal_state, at.b, at.e, n) : 0.f;
  }
  float dA_sum[kMaxM][kStates] = {}, dw_sum[kMaxM] = {};

  // G ↦ G after step t of the staged tile (t < kSeg).
  const auto advance = [&](float (&G)[kStates], int t) {
    const float* bc = stage_BC + t * opaque(g.bc_stride) + 4 * at.r;
    const float* st = stage_st + t * opaque(pl.st_stride) + 4 * at.row;
    float G_next[kStates] = {};
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m >= M) break;
      const float4 v = *reinterpret_cast<const float4*>(st + 4 * m * g.rows);
#pragma unroll
      for (int q = 0; q < kQuads; ++q) {
        float Bq[4];
        load_quad(bc, g, m, false, q, Bq);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int k = 4 * q + i;
          const float a = exp2_approx(v.x * A2.get(p.A, g, at, m, k, N));
          G_next[k] += w[m] * modality_state(a, G[k], v.y, Bq[i]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kStates; ++k) G[k] = G_next[k];
  };

  for (int64_t chunk = s.n_chunks - 1; chunk >= 0; --chunk) {
    const int64_t c0 = chunk * kChunkLen;
    const int segments = static_cast<int>((min(static_cast<int64_t>(kChunkLen), L - c0) + kSeg - 1) / kSeg);

    // 1. The state at the start of every segment of the chunk.
    float G[kStates];
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const int n = at.state(g, k);
      G[k] = at.active && n < N ? load_param(p.chunk_states, at.b, at.e, chunk, n) : 0.f;
    }
    for (int segment = 0; segment < segments; ++segment) {
#pragma unroll
      for (int k = 0; k < kStates; ++k) checkpoint(segment, k) = G[k];
      if (segment == segments - 1) break;
      __syncthreads();  // the stages' previous contents are read
      stage_bc<input_t>(g, stage_BC, p.B, p.C, M, at.b, N, c0 + segment * kSeg, L,
                        /*with_C=*/false);
      stage_bwd_steps<input_t>(pl, stage_st, p, M, at.b, at.e_first, c0 + segment * kSeg, false);
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kSeg; ++t) advance(G, t);  // a segment before the last is full
    }

    // 2. The segments, last first.
    for (int segment = segments - 1; segment >= 0; --segment) {
      const int64_t t0 = c0 + segment * kSeg;
      const int steps = static_cast<int>(min(static_cast<int64_t>(kSeg), L - t0));
      __syncthreads();  // the stages and sums of the segment before are read
      stage_bc<input_t>(g, stage_BC, p.B, p.C, M, at.b, N, t0, L);
      stage_bwd_steps<input_t>(pl, stage_st, p, M, at.b, at.e_first, t0, true);
      __syncthreads();

      // G[t-1] of the segment's steps.
      float history[kSeg][kStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) G[k] = checkpoint(segment, k);
#pragma unroll
      for (int t = 0; t < kSeg; ++t) {
        if (t >= steps) break;
#pragma unroll
        for (int k = 0; k < kStates; ++k) history[t][k] = G[k];
        if (t + 1 < steps) advance(G, t);
      }

      // Back through the steps: λ holds dℓ/dG[t] on entry to step t.
#pragma unroll
      for (int t = kSeg - 1; t >= 0; --t) {
        if (t >= steps) continue;
        const int bc_stride = opaque(g.bc_stride), sum_stride = opaque(pl.sum_stride);
        const float* bc = stage_BC + t * bc_stride + 4 * at.r;
        const float* st = stage_st + t * opaque(pl.st_stride) + 4 * at.row;
        float lambda_prev[kStates] = {};
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m >= M) break;
          const float4 v = *reinterpret_cast<const float4*>(st + 4 * m * g.rows);
          const float step = v.x, drive = v.y, dy_hat = v.z;
          float sum_A_x = 0.f, sum_mu_B = 0.f;  // over this lane's states
          float dBC[2 * kStates];               // dB then dC of this lane's states
          for_each_state<kStates>(bc, g, m, [&](int k, float B, float C) {
            const float A_log2 = A2.get(p.A, g, at, m, k, N);
            const float a = exp2_approx(step * A_log2);
            const float h = modality_state(a, history[t][k], drive, B);
            const float mu = dy_hat * C + w[m] * lambda[k];  // dℓ/dh
            const FactoredStateGrad<float> d =
                modality_state_grad_factored(mu, a, history[t][k], drive, B);
            dBC[k] = d.d_B;
            dBC[kStates + k] = dy_hat * h;
            sum_A_x += A_log2 * d.mu_decayed;
            sum_mu_B += d.mu_B;
            dA_sum[m][k] += step * d.mu_decayed;
            lambda_prev[k] += d.d_coupled_prev;
            dw_sum[m] += lambda[k] * h;
          });
          add_over_rows<kStates>(dBC, acc_dBC + t * bc_stride + bc_at(g, m, false), Rw, g, at);
          sum_A_x = row_sum(sum_A_x, Rw);
          sum_mu_B = row_sum(sum_mu_B, Rw);
          if ((at.r & (Rw - 1)) == 0)
            *reinterpret_cast<float2*>(sums + t * sum_stride +
                                       2 * ((m * g.rows + at.row) * g.Ws + state_warp)) =
                make_float2(sum_A_x, sum_mu_B);
        }
#pragma unroll
        for (int k = 0; k < kStates; ++k) lambda[k] = lambda_prev[k];
      }
      __syncthreads();  // sums and dB, dC of the segment are complete

      // dΔ = Σ A·μ·a·G + u·Σ μ·B, du = Δ·Σ μ·B + dŷ·D, dδ, per (modality, row), t in turn;
      // dD and dΔ-bias summed per (modality, row), each pair always the same thread's. Only
      // shared memory is read: dΔ/dδ comes from Δ itself. (dδ, du) replace (Δ, Δu) in the
      // step stage, to be written out along t below.
      for (int pair = threadIdx.x; pair < M * g.rows; pair += blockDim.x) {
        const int m = pair >> g.log2_rows;
        const int64_t e = at.e_first + (pair & (g.rows - 1));
        if (e >= s.dim) continue;
        const float D = p.D.present() ? load_param(p.D, m, e) : 0.f;
        float dD = 0.f, dbias = 0.f;
        for (int t = 0; t < steps; ++t) {
          float* slot = stage_st + t * pl.st_stride + 4 * pair;
          const float4 v = *reinterpret_cast<const float4*>(slot);
          float2 sum = make_float2(0.f, 0.f);
          for (int sw = 0; sw < g.Ws; ++sw) {
            const float2 part =
                *reinterpret_cast<const float2*>(sums + t * pl.sum_stride + 2 * (pair * g.Ws + sw));
            sum.x += part.x, sum.y += part.y;
          }
          const float d_step = kLn2 * sum.x + v.w * sum.y;
          const float d_raw = step_size_grad_from_step(d_step, v.x, p.delta_softplus);
          *reinterpret_cast<float2*>(slot) = make_float2(d_raw, v.x * sum.y + v.z * D);
          dD += v.z * v.w;
          dbias += d_raw;
        }
        acc_dD[pair] += dD;
        acc_dD[M * g.rows + pair] += dbias;
      }

      // dB, dC of the segment, summed over the block's rows: one global atomic per element
      // (deterministic sums: into the slot of the block's channels, params.h).
      const int64_t dBC_slot = (at.e_first >> g.log2_rows) * p.dBC_slot_stride;
      float* dB = static_cast<float*>(p.dB) + dBC_slot;
      float* dC = static_cast<float*>(p.dC) + dBC_slot;
      for (int j = threadIdx.x; j < 2 * M * g.Np * kSeg; j += blockDim.x) {
        const int t = j & (kSeg - 1), rest = j >> g.log2_T;
        const int n = rest & (g.Np - 1), mb = rest >> g.log2_Np;
        float* acc = acc_dBC + t * g.bc_stride + bc_at(g, mb >> 1, mb & 1) + n;
        const float v = *acc;
        *acc = 0.f;
        if (v != 0.f && n < N && t < steps)
          atomicAdd(((mb & 1) ? dC : dB) + (mb >> 1) * p.dBC_stride[0] +
                        at.b * p.dBC_stride[1] + n * p.dBC_stride[2] + (t0 + t) * p.dBC_stride[3],
                    v);
      }
      __syncthreads();  // (dδ, du) of the segment are in the step stage

      // dδ and du of the segment, t fastest: consecutive threads write consecutive steps.
      for (int j = threadIdx.x; j < M * g.rows * kSeg; j += blockDim.x) {
        const int t = j & (kSeg - 1), pair = j >> g.log2_T;
        const int m = pair >> g.log2_rows;
        const int64_t e = at.e_first + (pair & (g.rows - 1));
        if (t >= steps || e >= s.dim) continue;
        const float2 d = *reinterpret_cast<const float2*>(stage_st + t * pl.st_stride + 4 * pair);
        const int64_t out = ((m * s.batch + at.b) * s.dim + e) * L + t0 + t;
        static_cast<input_t*>(p.ddelta)[out] = from_float<input_t>(d.x);
        static_cast<input_t*>(p.du)[out] = from_float<input_t>(d.y);
      }
    }
  }

  if (at.active) {
    float* dinitial_state = static_cast<float*>(p.dinitial_state) + (at.b * s.dim + at.e) * N;
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const int n = at.state(g, k);
      if (n < N) dinitial_state[n] = lambda[k];
    }
  }
  // Deterministic sums (params.h): dA, dD and dΔ-bias into the slot of the batch index, the
  // coupling's gradient into the warp's.
  float* dA = static_cast<float*>(p.dA) + at.b * p.dA_slot_stride;
  float* dcoupling = static_cast<float*>(p.dcoupling) +
                     (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + at.warp) *
                         p.dcoupling_slot_stride;
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m >= M) break;
    if (at.active)
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        const int n = at.state(g, k);
        if (n < N) atomicAdd(dA + (m * s.dim + at.e) * N + n, dA_sum[m][k]);
      }
    const float dw_warp = row_sum(dw_sum[m], 32);
    if (threadIdx.x % 32 == 0) atomicAdd(dcoupling + m, dw_warp);
  }
  __syncthreads();  // acc_dD is complete
  const int64_t dD_slot = at.b * p.dD_slot_stride;
  for (int pair = threadIdx.x; pair < M * g.rows; pair += blockDim.x) {
    const int m = pair >> g.log2_rows;
    const int64_t e = at.e_first + (pair & (g.rows - 1));
    if (e >= s.dim) continue;
    if (p.dD) atomicAdd(static_cast<float*>(p.dD) + dD_slot + m * s.dim + e, acc_dD[pair]);
    if (p.ddelta_bias)
      atomicAdd(static_cast<float*>(p.ddelta_bias) + dD_slot + m * s.dim + e,
                acc_dD[M * g.rows + pair]);
  }
}

// 4 states per lane, 8 where a row needs them (N > 128).
inline int bwd_states_per_lane(const ScanShape& s) { return s.dstate > 32 * 4 ? 8 : 4; }

// kRw: a row's lanes in one warp (the plan's g.Rw), or 0 to read it at run time. With 4
// states per lane Rw is 1 (N <= 32), 2 (N <= 64) or 4, each compiled for; with 8 (N > 128)
// it is always 4, but is read at run time (add_over_rows says why).
template <typename input_t, int kMaxM, int kStates>
cudaError_t launch_bwd_lanes(const ScanBwdParams& p, cudaStream_t stream) {
  const BwdLanePlan pl = plan_bwd_lanes<kStates>(p.shape);
  if (pl.g.blocks == 0) return cudaSuccess;
  void (*kernel)(const ScanBwdParams, const BwdLanePlan) = nullptr;
  if constexpr (kStates == 4) {
    if (pl.g.Rw == 1) kernel = coupled_scan_bwd_state_lanes_kernel<input_t, kMaxM, 4, 1>;
    if (pl.g.Rw == 2) kernel = coupled_scan_bwd_state_lanes_kernel<input_t, kMaxM, 4, 2>;
    if (pl.g.Rw == 4) kernel = coupled_scan_bwd_state_lanes_kernel<input_t, kMaxM, 4, 4>;
  } else {
    kernel = coupled_scan_bwd_state_lanes_kernel<input_t, kMaxM, kStates, 0>;
  }
  if (kernel == nullptr) return cudaErrorInvalidValue;  // a plan with no instantiation here
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(pl.smem_bytes));
  if (err != cudaSuccess) return err;
  CM_LAUNCH(pl.g.blocks, pl.g.threads, pl.smem_bytes, stream, kernel)(p, pl);
  return cudaGetLastError();
}

}  // namespace

bool coupled_scan_bwd_state_lanes_fits(const ScanShape& shape) {
  if (shape.n_modalities > kBwdLaneMaxM) return false;
  const size_t bytes = bwd_states_per_lane(shape) == 8 ? plan_bwd_lanes<8>(shape).smem_bytes
                                                       : plan_bwd_lanes<4>(shape).smem_bytes;
  return bytes <= static_cast<size_t>(device_smem_limits().per_block);
}

BwdSlotCounts coupled_scan_bwd_state_lanes_slots(const ScanShape& shape) {
  const LaneGeometry g = bwd_states_per_lane(shape) == 8 ? plan_bwd_lanes<8>(shape).g
                                                          : plan_bwd_lanes<4>(shape).g;
  return {g.blocks_per_batch, shape.batch, g.blocks * (g.threads / 32)};
}

cudaError_t coupled_scan_bwd_state_lanes_cuda(const ScanBwdParams& params, InputDtype dtype,
                                              cudaStream_t stream) {
  if (params.shape.n_modalities > kBwdLaneMaxM) return cudaErrorInvalidValue;
  const bool eight = bwd_states_per_lane(params.shape) == 8;
  return COUPLED_MAMBA_DISPATCH_INPUT(dtype, [&] {
    return eight ? launch_bwd_lanes<input_t, kBwdLaneMaxM, 8>(params, stream)
                 : launch_bwd_lanes<input_t, kBwdLaneMaxM, 4>(params, stream);
  });
}

}  // namespace coupled_mamba
