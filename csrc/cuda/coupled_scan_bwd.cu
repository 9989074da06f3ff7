// Backward CUDA kernel of the coupled selective scan (docs/math.md §3).
//
// Same mapping and tiles as forward (scan_cuda_common.cuh), with the tiles walked from the
// last to the first. For each tile and state index n:
//  1. recompute the forward maps G -> P·G + U of the tile's steps (one exponential per
//     modality, step and state, kept in registers) and scan them from the chunk state that
//     forward saved at the tile's start: G[t-1] for every step;
//  2. scan the adjoint recurrence back in time, λ[t-1] = P[t]·λ[t] + Q[t] with
//     Q[t] = Σ_m a_m·dŷ_m·C_m, from the λ carried in from the next tile (at the end: the
//     final state's gradient): λ[t] = dℓ/dG[t] for every step;
//  3. form μ_m = dŷ_m·C_m + w_m·λ and every per-element gradient.
// So each exponential is computed once in backward (twice in forward + backward together).
//
// B, C and A of a group of states are staged in shared memory per block, as in forward.
// Sums over channels: dB and dC (over e) of the staged states and the tile are summed over
// the block's rows in shared memory and reach global memory with one atomic per block and
// element; dA (over b) with one atomic per row, tile and element after a segment sum; dD,
// dΔ-bias and the coupling's gradient are summed per thread and reduced once at the end.
#include "coupled_scan_cuda.h"
#include "scan_cuda_common.cuh"

namespace coupled_mamba {
namespace {

// Block size and the minimum number of resident blocks per multiprocessor (which caps the
// registers per thread) are build-time knobs for tuning on a card, e.g.
// NVCC_APPEND_FLAGS="-DCOUPLED_MAMBA_BWD_THREADS=128 -DCOUPLED_MAMBA_BWD_MIN_BLOCKS=3".
// More rows per block means fewer global atomics for dB and dC (they are summed over the
// block's rows first). Uncapped, a thread takes about 170 registers (one 256-thread block
// per multiprocessor); two blocks cap it at 128, with a few spilled.
#ifndef COUPLED_MAMBA_BWD_THREADS
#define COUPLED_MAMBA_BWD_THREADS 256
#endif
#ifndef COUPLED_MAMBA_BWD_MIN_BLOCKS
#define COUPLED_MAMBA_BWD_MIN_BLOCKS 2
#endif
constexpr int kBwdThreads = COUPLED_MAMBA_BWD_THREADS;
// Backward holds more per (modality, step) than forward (dΔ and du accumulators, B and C of
// the current state): two steps per lane keep it in registers for up to 4 modalities.
using BwdSmallTiling = ScanTiling<4, 2>;

template <typename input_t, typename Tiling>
__global__ void __launch_bounds__(kBwdThreads, COUPLED_MAMBA_BWD_MIN_BLOCKS)
    coupled_scan_bwd_kernel(const ScanBwdParams p, int S, StateStage stage) {
  constexpr int kMaxM = Tiling::kMaxM, kItems = Tiling::kItems;
  const ScanShape s = p.shape;
  const int M = static_cast<int>(s.n_modalities);
  const int64_t N = s.dstate, L = s.seqlen;
  const RowMap rm(s, S);
  const int64_t tile = static_cast<int64_t>(S) * kItems, n_tiles = (L + tile - 1) / tile;
  const bool carried = n_tiles > 1;  // then S == 32: the segment is the whole warp

  // Shared memory: the staged states (StateStage); the dB and dC sums of the staged states
  // over the block's rows, [2][M][group][tile]; with several tiles, λ carried from one
  // tile to the previous, [rows][N].
  CM_DYNAMIC_SMEM(float, smem);
  float* dBC_acc = smem + stage.floats();
  const int dBC_floats = 2 * M * stage.group * stage.tile;
  float* carry = dBC_acc + dBC_floats + rm.row * N;
  for (int j = threadIdx.x; j < dBC_floats; j += blockDim.x) dBC_acc[j] = 0.f;
  const auto dBC_at = [&](bool is_C, int m, int nn) {
    return dBC_acc + ((is_C ? M + m : m) * stage.group + nn) * stage.tile;
  };

  float w[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) w[m] = m < M ? load_param(p.coupling, m) : 0.f;
  const auto final_state_grad = [&](int64_t n) {
    return rm.active && p.dfinal_state.present() ? load_param(p.dfinal_state, rm.b, rm.e, n) : 0.f;
  };
  if (carried)
    for (int64_t n = rm.seg_lane; n < N; n += S) carry[n] = final_state_grad(n);
  __syncthreads();

  float* dA = static_cast<float*>(p.dA);
  float* dB = static_cast<float*>(p.dB);
  float* dC = static_cast<float*>(p.dC);
  float* dinitial_state = static_cast<float*>(p.dinitial_state) + (rm.b * s.dim + rm.e) * N;
  float dw_sum[kMaxM] = {}, dD_sum[kMaxM] = {}, dbias_sum[kMaxM] = {};

  for (int64_t k = n_tiles - 1; k >= 0; --k) {
    const int64_t t0 = k * tile, tile_len = min(tile, L - t0);
    const int64_t t_first = t0 + static_cast<int64_t>(rm.seg_lane) * kItems;
    bool valid[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) valid[i] = rm.active && t_first + i < L;

    // Per (modality, step): Δ, u, dŷ (and dz, written now); accumulators of dΔ and du.
    float step[kMaxM][kItems], u[kMaxM][kItems], dyhat[kMaxM][kItems];
    float d_step[kMaxM][kItems], d_u[kMaxM][kItems];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      float raw[kItems] = {}, u_m[kItems] = {}, dy[kItems] = {}, z[kItems] = {}, y_hat[kItems] = {};
      float bias = 0.f;
      if (m < M && rm.active) {
        load_items<input_t>(p.delta, m, rm.b, rm.e, t_first, L, raw);
        load_items<input_t>(p.u, m, rm.b, rm.e, t_first, L, u_m);
        load_items<input_t>(p.dy, m, rm.b, rm.e, t_first, L, dy);
        if (p.z.present()) {
          load_items<input_t>(p.z, m, rm.b, rm.e, t_first, L, z);
          load_items<input_t>(p.y_ungated, m, rm.b, rm.e, t_first, L, y_hat);
        }
        if (p.delta_bias.present()) bias = load_param(p.delta_bias, m, rm.e);
      }
      const int64_t out = ((m * s.batch + rm.b) * s.dim + rm.e) * L + t_first;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        step[m][i] = valid[i] ? step_size(raw[i], bias, p.delta_softplus) : 0.f;
        u[m][i] = valid[i] ? u_m[i] : 0.f;
        dyhat[m][i] = valid[i] ? dy[i] : 0.f;
        if (p.z.present() && m < M && valid[i]) {
          float dz;
          dyhat[m][i] = gate_backward(dy[i], y_hat[i], z[i], &dz);
          static_cast<input_t*>(p.dz)[out + i] = from_float<input_t>(dz);
        }
        d_step[m][i] = d_u[m][i] = 0.f;
      }
    }

    for (int64_t n0 = 0; n0 < N; n0 += stage.group) {
      const int count = static_cast<int>(min(static_cast<int64_t>(stage.group), N - n0));
      __syncthreads();  // the previous group's reads and flush are done
      stage_states<input_t>(stage, smem, p.B, p.C, p.A, rm.b, rm.e_first, s.dim, n0, count, t0, L);
      __syncthreads();
      for (int nn = 0; nn < count; ++nn) {
        const int64_t n = n0 + nn;
        float A[kMaxM], B[kMaxM][kItems], C[kMaxM][kItems], decay[kMaxM][kItems];
        float P[kItems], U[kItems], Q[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) P[i] = U[i] = Q[i] = 0.f;
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m >= M) continue;
          A[m] = smem[stage.A_at(rm.row, m, nn)];
          load_staged(smem + stage.B_at(m, nn) + rm.seg_lane * kItems, B[m]);
          load_staged(smem + stage.C_at(m, nn) + rm.seg_lane * kItems, C[m]);
          const float A_log2 = A[m] * kLog2e;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            decay[m][i] = exp2_approx(step[m][i] * A_log2);
            P[i] += w[m] * decay[m][i];
            U[i] += w[m] * step[m][i] * B[m][i] * u[m][i];
            Q[i] += decay[m][i] * dyhat[m][i] * C[m][i];
          }
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i)
          if (!valid[i]) P[i] = 1.f, U[i] = Q[i] = 0.f;

        // 1. G[t-1] of this lane's steps, from the chunk state at the tile's start.
        float P_lane = 1.f, U_lane = 0.f;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          U_lane = P[i] * U_lane + U[i];
          P_lane = P[i] * P_lane;
        }
        exclusive_scan_forward(P_lane, U_lane, rm.seg_lane, S);
        const float G_start =
            rm.active ? load_param(p.chunk_states, rm.b, rm.e, t0 / kChunkLen, n) : 0.f;
        float G_prev[kItems];
        float G = P_lane * G_start + U_lane;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          G_prev[i] = G;
          G = P[i] * G + U[i];
        }

        // 2. λ after this lane's last step, from the λ after the tile.
        float P_rev = 1.f, Q_rev = 0.f;
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          Q_rev = P[i] * Q_rev + Q[i];
          P_rev = P[i] * P_rev;
        }
        exclusive_scan_reverse(P_rev, Q_rev, rm.seg_lane, S);
        float lambda = P_rev * (carried ? carry[n] : final_state_grad(n)) + Q_rev;

        // 3. Gradients, walking this lane's steps back: lambda = dℓ/dG[t].
        float dA_part[kMaxM] = {};
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          if (valid[i]) {
            const int t_tile = static_cast<int>(t_first + i - t0);
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) {
              if (m >= M) continue;
              const float mu = dyhat[m][i] * C[m][i] + w[m] * lambda;  // dℓ/dh
              const ModalityStateGrad<float> g = modality_state_grad(
                  mu, decay[m][i], G_prev[i], step[m][i], A[m], B[m][i], u[m][i]);
              const float h = modality_state(decay[m][i], G_prev[i], step[m][i] * u[m][i], B[m][i]);
              d_step[m][i] += g.d_step;
              d_u[m][i] += g.d_u;
              dA_part[m] += g.d_A;
              dw_sum[m] += lambda * h;
              atomicAdd(dBC_at(false, m, nn) + t_tile, g.d_B);
              atomicAdd(dBC_at(true, m, nn) + t_tile, dyhat[m][i] * h);
            }
          }
          lambda = P[i] * lambda + Q[i];
        }
        // The segment's first lane now holds λ[t0 - 1]: carried to the previous tile, and at
        // the first tile the gradient of the initial state.
        if (carried) {
          __syncwarp();  // every lane has read carry[n]
          if (rm.seg_lane == 0) carry[n] = lambda;
        }
        if (k == 0 && rm.seg_lane == 0 && rm.active) dinitial_state[n] = lambda;
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m >= M) continue;
          const float v = segment_sum(dA_part[m], S);
          if (rm.seg_lane == 0 && rm.active) atomicAdd(dA + (m * s.dim + rm.e) * N + n, v);
        }
      }

      // dB, dC of the staged states over the tile, summed over the block's rows: to global
      // memory, one atomic per element.
      __syncthreads();
      const int steps = static_cast<int>(tile_len);
      const SmallDivisor by_steps(steps), by_count(count);  // as in stage_states
      for (int j = threadIdx.x; j < 2 * M * count * steps; j += blockDim.x) {
        int dt, nn;
        const int which_m = by_count.divide(by_steps.divide(j, dt), nn);
        const bool is_C = which_m >= M;
        const int m = is_C ? which_m - M : which_m;
        float* acc = dBC_at(is_C, m, nn) + dt;
        const float v = *acc;
        *acc = 0.f;
        if (v != 0.f)
          atomicAdd((is_C ? dC : dB) + m * p.dBC_stride[0] + rm.b * p.dBC_stride[1] +
                        (n0 + nn) * p.dBC_stride[2] + (t0 + dt) * p.dBC_stride[3],
                    v);
      }
    }

    // The tile's per-step gradients.
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m >= M || !rm.active) continue;
      float raw[kItems] = {};
      load_items<input_t>(p.delta, m, rm.b, rm.e, t_first, L, raw);
      const float bias = p.delta_bias.present() ? load_param(p.delta_bias, m, rm.e) : 0.f;
      const float D = p.D.present() ? load_param(p.D, m, rm.e) : 0.f;
      const int64_t out = ((m * s.batch + rm.b) * s.dim + rm.e) * L + t_first;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (!valid[i]) continue;
        const float d_raw = step_size_grad(d_step[m][i], raw[i], bias, p.delta_softplus);
        static_cast<input_t*>(p.ddelta)[out + i] = from_float<input_t>(d_raw);
        static_cast<input_t*>(p.du)[out + i] = from_float<input_t>(d_u[m][i] + dyhat[m][i] * D);
        dD_sum[m] += dyhat[m][i] * u[m][i];
        dbias_sum[m] += d_raw;
      }
    }
  }

  // Per-row sums of dD and dΔ-bias; per-warp sums of the coupling's gradient.
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m >= M) continue;
    const float dD_row = segment_sum(dD_sum[m], S), dbias_row = segment_sum(dbias_sum[m], S);
    const float dw_warp = segment_sum(dw_sum[m], 32);
    if (rm.seg_lane == 0 && rm.active) {
      if (p.dD) atomicAdd(static_cast<float*>(p.dD) + m * s.dim + rm.e, dD_row);
      if (p.ddelta_bias) atomicAdd(static_cast<float*>(p.ddelta_bias) + m * s.dim + rm.e, dbias_row);
    }
    if (threadIdx.x % 32 == 0) atomicAdd(static_cast<float*>(p.dcoupling) + m, dw_warp);
  }
}

template <typename input_t, typename Tiling>
cudaError_t launch_bwd(const ScanBwdParams& p, cudaStream_t stream) {
  // dB and dC: two accumulators per (modality, state, step) in shared memory.
  const LaunchPlan plan = plan_launch<Tiling>(p.shape, kBwdThreads, 2);
  if (plan.blocks == 0) return cudaSuccess;
  CM_LAUNCH(plan.blocks, kBwdThreads, plan.smem_bytes, stream,
            coupled_scan_bwd_kernel<input_t, Tiling>)(p, plan.S, plan.stage);
  return cudaGetLastError();
}

}  // namespace

cudaError_t coupled_scan_bwd_time_lanes_cuda(const ScanBwdParams& params, InputDtype dtype,
                                             cudaStream_t stream) {
  return COUPLED_MAMBA_DISPATCH_INPUT(dtype, [&] {
    return params.shape.n_modalities <= BwdSmallTiling::kMaxM
               ? launch_bwd<input_t, BwdSmallTiling>(params, stream)
               : launch_bwd<input_t, LargeTiling>(params, stream);
  });
}

}  // namespace coupled_mamba
