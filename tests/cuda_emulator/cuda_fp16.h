// CPU stand-in for cuda_fp16.h (see cuda_runtime.h here): IEEE half precision, conversions
// rounding to nearest even.
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {  // subnormal half: a normal float
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man · 2^-24
    std::memcpy(&out, &f, 4);
    out |= sign;
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0))};
  if (abs >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (abs < 0x33000001u) return {sign};                                     // below half of 2^-24
  int exp = static_cast<int>(abs >> 23) - 112;
  uint32_t man = (abs & 0x7fffffu) | 0x800000u;
  int shift = 13;
  if (exp <= 0) {  // subnormal result
    shift += 1 - exp;
    exp = 0;
  }
  uint32_t half_man = man >> shift;
  const uint32_t rest = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (half_man & 1))) ++half_man;
  // A normal result's half_man holds the implicit bit (0x400); a carry out of the rounding
  // moves into the exponent, as it should.
  const uint32_t bits = exp == 0 ? half_man : (static_cast<uint32_t>(exp) << 10) + half_man - 0x400u;
  return {static_cast<uint16_t>(sign | bits)};
}
