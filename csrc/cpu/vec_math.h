// Special functions for the CPU kernels, written so that gcc and clang vectorise the loops
// that call them (glibc's expf / log1pf are calls a compiler cannot vectorise). The float
// versions are accurate to a few ulp, well inside the contract's 1e-5; the double versions (the
// gradcheck build) are the scalar functions of include/coupled_mamba/scan_math.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cmath>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "coupled_mamba/scan_math.h"

namespace coupled_mamba {
namespace cpu {

// exp: e^x = 2^k · e^r with k = round(x / ln2) and |r| <= ln2/2, e^r by a degree-5
// polynomial (coefficients fitted here for minimal relative error on that interval; relative
// error of the whole function at most 1.8e-7, about 1.5 ulp). Rounding by adding
// 1.5·2^23 + 127 leaves k + 127 in the sum's low mantissa bits, so the scale 2^k is that
// sum's bits shifted left by 23: no float-to-int conversion. The input is clamped to
// [clamp.lo, clamp.hi] = [-88, 89], the range where k + 127 lies in [0, 255]: at the ends
// the scale's bits are those of 0 (k = -127) and of +inf (k = 128), so e^x is 0 for
// x <= -87.7 (where it is below fp32's normal range; denormals are flushed anyway) and +inf
// for x >= 88.4 (from 2.4e38, near fp32's largest 3.4e38). Hence exp(-inf) = 0 and
// exp(+inf) = inf, as in the float64 reference: a decay exp(Δ·A) with Δ = +inf is 0, not a
// small number whose product with an infinite state would stay infinite instead of NaN.
// NaN propagates (each clamp is written so that its comparison is false for NaN and keeps x).
struct ExpClamp {
  float lo = -88.0f, hi = 89.0f;

  // The same bounds, read from memory that the compiler cannot see through. With constant
  // bounds gcc folds exp(bound) and turns each clamp into compares and blends after the
  // polynomial: six vector instructions instead of one max and one min, a quarter of the
  // exponential. The hot loops (the decays exp(Δ·A), the largest item of the scan's
  // profile) take their bounds from here, read once per call.
  static ExpClamp opaque() {
    static volatile float lo = ExpClamp{}.lo, hi = ExpClamp{}.hi;
    return ExpClamp{lo, hi};
  }
};

inline float exp_vec(float x, const ExpClamp& clamp) {
  x = clamp.lo > x ? clamp.lo : x;
  x = clamp.hi < x ? clamp.hi : x;
  constexpr float kShifter = 12582912.0f + 127.0f;  // 1.5·2^23 + the exponent bias
  const float shifted = x * 1.44269504088896341f + kShifter;
  const float k = shifted - kShifter;
  // r = x - k·ln2, with ln2 split in two so that k·ln2's leading part is exact.
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 8.312525228e-3f;
  p = p * r + 4.189011455e-2f;
  p = p * r + 1.666711420e-1f;
  p = p * r + 4.999923110e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t scale_bits = __builtin_bit_cast(int32_t, shifted) << 23;
  return p * __builtin_bit_cast(float, scale_bits);
}
inline float exp_vec(float x) { return exp_vec(x, ExpClamp{}); }
inline double exp_vec(double x, const ExpClamp&) { return std::exp(x); }
inline double exp_vec(double x) { return std::exp(x); }

// log1p(x) for x in [0, 1]: 2·atanh(s) with s = x / (2 + x) in [0, 1/3], its odd series to
// s^15 (truncation below 2e-9 relative). No cancellation near 0, a division that vectorises.
inline float log1p_unit_vec(float x) {
  const float s = x / (2.0f + x);
  const float s2 = s * s;
  float q = 1.0f / 15;
  q = q * s2 + 1.0f / 13;
  q = q * s2 + 1.0f / 11;
  q = q * s2 + 1.0f / 9;
  q = q * s2 + 1.0f / 7;
  q = q * s2 + 1.0f / 5;
  q = q * s2 + 1.0f / 3;
  const float s_twice = 2.0f * s;
  return s_twice + s_twice * s2 * q;
}

// softplus(x) = max(x, 0) + log1p(e^-|x|): no overflow, and equal to x in fp32 above 20
// (torch's threshold) since e^-20 is below half an ulp of 20.
inline float softplus_vec(float x) {
  return std::max(x, 0.0f) + log1p_unit_vec(exp_vec(-std::fabs(x)));
}
inline double softplus_vec(double x) { return softplus(x); }

inline float sigmoid_vec(float x) { return 1.0f / (1.0f + exp_vec(-x)); }
inline double sigmoid_vec(double x) { return sigmoid(x); }

// Flushes denormal results and operands to zero (MXCSR's FTZ and DAZ, as
// torch.set_flush_denormal does) in the calling thread while it lives, and restores the
// previous mode after. The scan makes denormals routinely: exp(Δ·A) is ~1e-38 when Δ·A is
// near -87 (the end of exp_vec's range) and its product with a state is then denormal; and with
// constant clamp bounds gcc evaluates both sides of exp_vec's clamps in every lane and
// blends, so the clamped side's products are computed even for ordinary inputs. Each
// denormal costs a microcode assist (~100 cycles on Intel cores): without this the forward
// pass ran several times slower.
// Values below 1.2e-38 are far under fp32's resolution of the sums they enter.
class FlushDenormals {
 public:
#if defined(__SSE__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

}  // namespace cpu
}  // namespace coupled_mamba
