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
// kExpRange = [-88, 89], the range where k + 127 lies in [0, 255]: at the ends
// the scale's bits are those of 0 (k = -127) and of +inf (k = 128), so e^x is 0 for
// x <= -87.7 (where it is below fp32's normal range; denormals are flushed anyway) and +inf
// for x >= 88.4 (from 2.4e38, near fp32's largest 3.4e38). Hence exp(-inf) = 0 and
// exp(+inf) = inf, as in the float64 reference: a decay exp(Δ·A) with Δ = +inf is 0, not a
// small number whose product with an infinite state would stay infinite instead of NaN.
// NaN propagates (each clamp is written so that its comparison is false for NaN and keeps x).
//
// exp2_vec(y) = 2^y is the same function of y = x / ln2 (bounds [-127, 128], the same k):
// its reduced argument y - k is exact, and the polynomial takes it with ln2's powers folded
// into the coefficients. A caller that multiplies by a factor anyway (the decays
// exp(Δ·A) = 2^((Δ/ln2)·A), Δ/ln2 once per step) saves two of the reduction's instructions
// per vector. Relative error: that of the polynomial, plus the rounding of Δ/ln2 times |y|.
struct ExpClamp {
  float lo, hi;
};
constexpr ExpClamp kExpRange{-88.0f, 89.0f};
constexpr ExpClamp kExp2Range{-127.0f, 128.0f};

// The same bounds, read from memory that the compiler cannot see through. With constant
// bounds gcc folds exp(bound) and turns each clamp into compares and blends after the
// polynomial: six vector instructions instead of one max and one min, a quarter of the
// exponential. The hot loops (the decays exp(Δ·A), the largest item of the scan's profile)
// take their bounds from here, read once per call.
inline ExpClamp opaque(ExpClamp range) {
  const volatile float lo = range.lo, hi = range.hi;
  return ExpClamp{lo, hi};
}

constexpr double kLn2 = 0.693147180559945309;
// 1/ln2 in the accumulation type: the factor that turns Δ into the decays' exponent base 2.
template <typename T>
constexpr T kLog2e = T(1.44269504088896340736);

// e^r ≈ Σ_i kExpPoly[i]·r^i on |r| <= ln2/2; kExp2Poly[i] = kExpPoly[i]·ln2^i, so that
// Σ_i kExp2Poly[i]·f^i ≈ 2^f on |f| <= 1/2.
constexpr float kExpPoly[6] = {1.0f, 1.0f, 4.999923110e-1f, 1.666711420e-1f, 4.189011455e-2f,
                               8.312525228e-3f};
constexpr float kExp2Poly[6] = {
    kExpPoly[0], float(kExpPoly[1] * kLn2), float(kExpPoly[2] * kLn2 * kLn2),
    float(kExpPoly[3] * kLn2 * kLn2 * kLn2), float(kExpPoly[4] * kLn2 * kLn2 * kLn2 * kLn2),
    float(kExpPoly[5] * kLn2 * kLn2 * kLn2 * kLn2 * kLn2)};

// p(r)·2^k, where shifted holds k + 127 in its low mantissa bits.
inline float scaled_poly(const float (&c)[6], float r, float shifted) {
  float p = c[5];
  p = p * r + c[4];
  p = p * r + c[3];
  p = p * r + c[2];
  p = p * r + c[1];
  p = p * r + c[0];
  const int32_t scale_bits = __builtin_bit_cast(int32_t, shifted) << 23;
  return p * __builtin_bit_cast(float, scale_bits);
}

constexpr float kShifter = 12582912.0f + 127.0f;  // 1.5·2^23 + the exponent bias

inline float exp_vec(float x) {
  x = kExpRange.lo > x ? kExpRange.lo : x;
  x = kExpRange.hi < x ? kExpRange.hi : x;
  const float shifted = x * kLog2e<float> + kShifter;
  const float k = shifted - kShifter;
  // r = x - k·ln2, with ln2 split in two so that k·ln2's leading part is exact.
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  return scaled_poly(kExpPoly, r, shifted);
}
inline double exp_vec(double x) { return std::exp(x); }

inline float exp2_vec(float y, const ExpClamp& clamp) {
  y = clamp.lo > y ? clamp.lo : y;
  y = clamp.hi < y ? clamp.hi : y;
  const float shifted = y + kShifter;
  const float k = shifted - kShifter;
  return scaled_poly(kExp2Poly, y - k, shifted);
}
inline double exp2_vec(double y, const ExpClamp&) { return std::exp2(y); }

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
