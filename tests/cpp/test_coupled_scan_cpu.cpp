// The chunked CPU kernels against a naive loop written straight from docs/math.md, in C++ alone
// (no Python, no torch tensors): the kernels take plain params structs over std::vector data.
//
// Forward: y, the final state and the saved chunk-start states, in float and double, with a
// strided (transposed) input among contiguous ones. Backward: every gradient of
// ℓ = Σ y·dy + Σ final·dfinal against central finite differences of the naive loop in
// double, and the float kernel against the double one. Exit status 0 when all checks pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "coupled_mamba/params.h"
#include "coupled_scan_cpu.h"

namespace cm = coupled_mamba;
using Vec = std::vector<double>;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

double rel_err(const Vec& a, const Vec& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

void check_close(const Vec& actual, const Vec& expected, double tol, const std::string& what) {
  const double err = rel_err(actual, expected);
  char buf[64];
  std::snprintf(buf, sizeof buf, ": relative error %.2e (tolerance %.0e)", err, tol);
  check(actual.size() == expected.size() && err <= tol, what + buf);
}

// One problem: sizes, options and the inputs in double, contiguous in the operator's layouts.
// An absent optional argument is an empty vector.
struct Problem {
  int64_t M, batch, dim, L, N;
  bool softplus;
  Vec u, delta, z, B, C;    // (M, batch, dim, L) and (M, batch, N, L)
  Vec A, D, bias, w, init;  // (M, dim, N), (M, dim), (M, dim), (M,), (batch, dim, N)
  Vec dy, dfinal;           // the loss's weights: (M, batch, dim, L), (batch, dim, N)

  int64_t x_at(int64_t m, int64_t b, int64_t e, int64_t t) const {
    return ((m * batch + b) * dim + e) * L + t;
  }
  int64_t bc_at(int64_t m, int64_t b, int64_t n, int64_t t) const {
    return ((m * batch + b) * N + n) * L + t;
  }
  int64_t n_chunks() const { return (L + cm::kChunkLen - 1) / cm::kChunkLen; }
};

Problem make_problem(int64_t M, int64_t batch, int64_t dim, int64_t L, int64_t N,
                     bool options, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  auto fill = [&](int64_t size, double scale, double shift) {
    Vec v(size);
    for (auto& x : v) x = normal(gen) * scale + shift;
    return v;
  };
  Problem p{M, batch, dim, L, N, options};
  const int64_t xs = M * batch * dim * L, bcs = M * batch * N * L;
  p.u = fill(xs, 1, 0);
  // Δ > 0 (a decaying state): softplus(δ + β) of δ around -1, or a positive δ without it.
  if (options) {
    p.delta = fill(xs, 0.5, -1.0);
  } else {
    p.delta.resize(xs);
    for (auto& x : p.delta) x = 0.05 + 0.4 * uniform(gen);
  }
  p.B = fill(bcs, 1, 0);
  p.C = fill(bcs, 1, 0);
  p.A.resize(M * dim * N);
  for (auto& x : p.A) x = -std::exp(0.5 * normal(gen));
  // The coupling: positive weights summing to one.
  p.w.resize(M);
  double total = 0;
  for (auto& x : p.w) total += (x = std::exp(normal(gen)));
  for (auto& x : p.w) x /= total;
  if (options) {
    p.z = fill(xs, 1, 0);
    p.D = fill(M * dim, 1, 0);
    p.bias = fill(M * dim, 0.25, 0);
    p.init = fill(batch * dim * N, 0.5, 0);
  }
  p.dy = fill(xs, 1, 0);
  p.dfinal = fill(batch * dim * N, 1, 0);
  return p;
}

double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }
double silu(double x) { return x / (1 + std::exp(-x)); }

struct NaiveOutputs {
  Vec y, final_state;
  Vec chunk_states;  // (batch, dim, n_chunks, N): G at the start of each chunk
};

// docs/math.md §1, one (batch, channel) at a time, one step at a time.
NaiveOutputs naive_scan(const Problem& p) {
  const int64_t M = p.M, N = p.N, L = p.L;
  NaiveOutputs out{Vec(M * p.batch * p.dim * L), Vec(p.batch * p.dim * N),
                   Vec(p.batch * p.dim * p.n_chunks() * N)};
  Vec G(N), G_next(N);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t e = 0; e < p.dim; ++e) {
      for (int64_t n = 0; n < N; ++n) G[n] = p.init.empty() ? 0.0 : p.init[(b * p.dim + e) * N + n];
      for (int64_t t = 0; t < L; ++t) {
        if (t % cm::kChunkLen == 0)
          for (int64_t n = 0; n < N; ++n)
            out.chunk_states[((b * p.dim + e) * p.n_chunks() + t / cm::kChunkLen) * N + n] = G[n];
        std::fill(G_next.begin(), G_next.end(), 0.0);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t i = p.x_at(m, b, e, t);
          double step = p.delta[i] + (p.bias.empty() ? 0.0 : p.bias[m * p.dim + e]);
          if (p.softplus) step = softplus(step);
          double y = 0;
          for (int64_t n = 0; n < N; ++n) {
            const double a = std::exp(step * p.A[(m * p.dim + e) * N + n]);
            const double h = a * G[n] + step * p.B[p.bc_at(m, b, n, t)] * p.u[i];
            y += p.C[p.bc_at(m, b, n, t)] * h;
            G_next[n] += p.w[m] * h;
          }
          if (!p.D.empty()) y += p.D[m * p.dim + e] * p.u[i];
          if (!p.z.empty()) y *= silu(p.z[i]);
          out.y[i] = y;
        }
        G = G_next;
      }
      for (int64_t n = 0; n < N; ++n) out.final_state[(b * p.dim + e) * N + n] = G[n];
    }
  return out;
}

double naive_loss(const Problem& p) {
  const NaiveOutputs out = naive_scan(p);
  double loss = 0;
  for (size_t i = 0; i < out.y.size(); ++i) loss += out.y[i] * p.dy[i];
  for (size_t i = 0; i < out.final_state.size(); ++i) loss += out.final_state[i] * p.dfinal[i];
  return loss;
}

// ------------------------------------------------------------------------ calling the kernels
template <typename T>
std::vector<T> cast(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
Vec to_double(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}

// The inputs in the kernel's type T, with u stored transposed, as (M, batch, L, dim), to
// exercise the kernels' strided access.
template <typename T>
struct KernelInputs {
  std::vector<T> u_transposed, delta, z, B, C, A, D, bias, w, init, dy, dfinal;

  explicit KernelInputs(const Problem& p)
      : u_transposed(p.u.size()), delta(cast<T>(p.delta)), z(cast<T>(p.z)), B(cast<T>(p.B)),
        C(cast<T>(p.C)), A(cast<T>(p.A)), D(cast<T>(p.D)), bias(cast<T>(p.bias)),
        w(cast<T>(p.w)), init(cast<T>(p.init)), dy(cast<T>(p.dy)), dfinal(cast<T>(p.dfinal)) {
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t e = 0; e < p.dim; ++e)
          for (int64_t t = 0; t < p.L; ++t)
            u_transposed[((m * p.batch + b) * p.L + t) * p.dim + e] = T(p.u[p.x_at(m, b, e, t)]);
  }
};

cm::TensorArg arg(const void* data, std::vector<int64_t> strides) {
  cm::TensorArg a;
  a.data = data;
  std::copy(strides.begin(), strides.end(), a.stride);
  return a;
}

// An optional argument: absent (data == nullptr) when the vector is empty.
template <typename T>
cm::TensorArg optional_arg(const std::vector<T>& v, std::vector<int64_t> strides) {
  return v.empty() ? cm::TensorArg{} : arg(v.data(), strides);
}

template <typename T>
struct KernelForward {
  std::vector<T> y, y_ungated, chunk_states, final_state;
};

template <typename T>
cm::ScanFwdParams forward_params(const Problem& p, const KernelInputs<T>& in,
                                 KernelForward<T>& out) {
  const int64_t M = p.M, batch = p.batch, dim = p.dim, L = p.L, N = p.N;
  out.y.assign(M * batch * dim * L, T(0));
  out.y_ungated.assign(p.z.empty() ? 0 : M * batch * dim * L, T(0));
  out.chunk_states.assign(batch * dim * p.n_chunks() * N, T(0));
  out.final_state.assign(batch * dim * N, T(0));
  const std::vector<int64_t> x_strides = {batch * dim * L, dim * L, L, 1};
  const std::vector<int64_t> bc_strides = {batch * N * L, N * L, L, 1};
  cm::ScanFwdParams params{};
  params.shape = {M, batch, dim, L, N, p.n_chunks()};
  params.delta_softplus = p.softplus;
  params.u = arg(in.u_transposed.data(), {batch * L * dim, L * dim, 1, dim});
  params.delta = arg(in.delta.data(), x_strides);
  params.z = optional_arg(in.z, x_strides);
  params.B = arg(in.B.data(), bc_strides);
  params.C = arg(in.C.data(), bc_strides);
  params.A = arg(in.A.data(), {dim * N, N, 1});
  params.D = optional_arg(in.D, {dim, 1});
  params.delta_bias = optional_arg(in.bias, {dim, 1});
  params.coupling = arg(in.w.data(), {1});
  params.initial_state = optional_arg(in.init, {dim * N, N, 1});
  params.y = out.y.data();
  params.y_ungated = p.z.empty() ? nullptr : out.y_ungated.data();
  params.chunk_states = out.chunk_states.data();
  params.final_state = out.final_state.data();
  return params;
}

template <typename T>
KernelForward<T> kernel_forward(const Problem& p, const KernelInputs<T>& in) {
  KernelForward<T> out;
  cm::coupled_scan_fwd_cpu<T>(forward_params(p, in, out));
  return out;
}

// Gradients of every argument, in double, in the order of Problem's fields.
struct Gradients {
  Vec du, ddelta, dz, dB, dC, dA, dD, dbias, dw, dinit;
};

template <typename T>
Gradients kernel_backward(const Problem& p) {
  const KernelInputs<T> in(p);
  KernelForward<T> fwd;
  const cm::ScanFwdParams f = forward_params(p, in, fwd);
  cm::coupled_scan_fwd_cpu<T>(f);

  const int64_t M = p.M, batch = p.batch, dim = p.dim, L = p.L, N = p.N;
  const int64_t xs = M * batch * dim * L, bcs = M * batch * N * L;
  // du, ddelta, dz, dinitial_state are written; the others are accumulated from zero.
  std::vector<T> du(xs), ddelta(xs), dz(p.z.empty() ? 0 : xs), dB(bcs, T(0)), dC(bcs, T(0)),
      dA(M * dim * N, T(0)), dD(p.D.empty() ? 0 : M * dim, T(0)),
      dbias(p.bias.empty() ? 0 : M * dim, T(0)), dw(M, T(0)), dinit(batch * dim * N);
  cm::ScanBwdParams params{};
  params.shape = f.shape;
  params.delta_softplus = f.delta_softplus;
  params.u = f.u;
  params.delta = f.delta;
  params.z = f.z;
  params.B = f.B;
  params.C = f.C;
  params.A = f.A;
  params.D = f.D;
  params.delta_bias = f.delta_bias;
  params.coupling = f.coupling;
  params.dy = arg(in.dy.data(), {batch * dim * L, dim * L, L, 1});
  params.dfinal_state = arg(in.dfinal.data(), {dim * N, N, 1});
  params.chunk_states = arg(fwd.chunk_states.data(), {dim * p.n_chunks() * N, p.n_chunks() * N, N, 1});
  params.y_ungated = p.z.empty() ? cm::TensorArg{}
                                 : arg(fwd.y_ungated.data(), {batch * dim * L, dim * L, L, 1});
  params.du = du.data();
  params.ddelta = ddelta.data();
  params.dz = p.z.empty() ? nullptr : dz.data();
  params.dA = dA.data();
  params.dB = dB.data();
  params.dC = dC.data();
  const int64_t dBC_strides[4] = {batch * N * L, N * L, L, 1};  // contiguous
  std::copy(dBC_strides, dBC_strides + 4, params.dBC_stride);
  params.dD = p.D.empty() ? nullptr : dD.data();
  params.ddelta_bias = p.bias.empty() ? nullptr : dbias.data();
  params.dcoupling = dw.data();
  params.dinitial_state = dinit.data();
  cm::coupled_scan_bwd_cpu<T>(params);
  return {to_double(du), to_double(ddelta), to_double(dz), to_double(dB), to_double(dC),
          to_double(dA), to_double(dD), to_double(dbias), to_double(dw), to_double(dinit)};
}

// ------------------------------------------------------------------------------ the checks
template <typename T>
void check_forward(const Problem& p, const NaiveOutputs& naive, double tol, const char* type,
                   const std::string& name) {
  const KernelForward<T> out = kernel_forward<T>(p, KernelInputs<T>(p));
  check_close(to_double(out.y), naive.y, tol, name + " " + type + " y");
  check_close(to_double(out.final_state), naive.final_state, tol, name + " " + type + " final state");
  check_close(to_double(out.chunk_states), naive.chunk_states, tol,
              name + " " + type + " chunk-start states");
}

void check_forward_all(const Problem& p, const std::string& name) {
  const NaiveOutputs naive = naive_scan(p);
  check_forward<double>(p, naive, 1e-12, "double", name);
  check_forward<float>(p, naive, 1e-5, "float", name);
}

// Central differences of the naive loss for every element of `field` (every `stride`-th
// for the large ones), against the kernel's gradient `grad`.
void check_finite_differences(Problem p, Vec Problem::*field, const Vec& grad, int64_t stride,
                              const std::string& what) {
  Vec& x = p.*field;
  const double h = 1e-5;
  double worst = 0;
  int64_t checked = 0;
  for (size_t i = 0; i < x.size(); i += stride, ++checked) {
    const double saved = x[i];
    x[i] = saved + h;
    const double plus = naive_loss(p);
    x[i] = saved - h;
    const double minus = naive_loss(p);
    x[i] = saved;
    const double fd = (plus - minus) / (2 * h);
    worst = std::max(worst, std::abs(fd - grad[i]) / (1.0 + std::abs(fd)));
  }
  char buf[96];
  std::snprintf(buf, sizeof buf, " (%lld elements): worst error %.2e (tolerance 1e-6)",
                static_cast<long long>(checked), worst);
  check(grad.size() == x.size() && worst <= 1e-6, what + " vs finite differences" + buf);
}

void check_backward(const Problem& p, const std::string& name) {
  const Gradients g = kernel_backward<double>(p);
  const Gradients gf = kernel_backward<float>(p);
  struct Field {
    const char* name;
    Vec Problem::*input;
    Vec Gradients::*grad;
    int64_t stride;  // finite differences on every stride-th element of the large inputs
  };
  const Field fields[] = {
      {"u", &Problem::u, &Gradients::du, 5},          {"delta", &Problem::delta, &Gradients::ddelta, 5},
      {"z", &Problem::z, &Gradients::dz, 5},          {"B", &Problem::B, &Gradients::dB, 5},
      {"C", &Problem::C, &Gradients::dC, 5},          {"A", &Problem::A, &Gradients::dA, 1},
      {"D", &Problem::D, &Gradients::dD, 1},          {"delta_bias", &Problem::bias, &Gradients::dbias, 1},
      {"coupling", &Problem::w, &Gradients::dw, 1},   {"initial_state", &Problem::init, &Gradients::dinit, 1},
  };
  for (const Field& f : fields) {
    if ((p.*f.input).empty()) continue;
    check_finite_differences(p, f.input, g.*f.grad, f.stride, name + " double d" + f.name);
    check_close(gf.*f.grad, g.*f.grad, 1e-4, name + " float d" + f.name + " vs double");
  }
}

}  // namespace

int main() {
  // L = 70 crosses the 64-step chunk; dim = 17 spans two of the kernels' channel blocks.
  const Problem full = make_problem(3, 2, 17, 70, 5, /*options=*/true, 1);
  const Problem plain = make_problem(2, 1, 3, 130, 8, /*options=*/false, 2);
  check_forward_all(full, "M=3 L=70 all options");
  check_forward_all(plain, "M=2 L=130 no options");
  check_forward_all(make_problem(1, 1, 1, 1, 1, true, 3), "all sizes 1");
  check_forward_all(make_problem(3, 2, 4, 0, 4, true, 4), "L=0");
  check_backward(full, "M=3 L=70 all options");
  check_backward(plain, "M=2 L=130 no options");
  std::printf("%s: %d failed check(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
