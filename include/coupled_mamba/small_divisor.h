// Quotient and remainder by a small divisor known only at run time, without an integer
// division. A GPU has no integer divide instruction: nvcc expands each `/` or `%` by a
// runtime value into some 20 instructions, too many per element for the CUDA kernels'
// shared-memory staging and backward's dB/dC flush, which split every element's index.
// Here one float multiply by the divisor's reciprocal (computed once) gives the quotient
// to within one, and one multiply-subtract and compare correct it.
#pragma once

#include "coupled_mamba/macros.h"

namespace coupled_mamba {

// Exact for 0 <= n < 2^24 and 1 <= d < 2^24 (tests/cpp/test_small_divisor.cpp checks it
// exhaustively on a range and at random beyond): float(n) is exact there, and
// float(n) * (1/d) is n/d with a relative error below 2^-23, so less than 1 away from it
// while n/d < 2^23; truncation is then at most one off the true quotient.
struct SmallDivisor {
  int d;
  float inverse;

  CM_HOST_DEVICE explicit SmallDivisor(int divisor)
      : d(divisor), inverse(1.0f / static_cast<float>(divisor)) {}

  // Returns n / d and sets remainder = n % d.
  CM_HOST_DEVICE int divide(int n, int& remainder) const {
    int q = static_cast<int>(static_cast<float>(n) * inverse);
    int r = n - q * d;
    if (r < 0) {
      --q;
      r += d;
    } else if (r >= d) {
      ++q;
      r -= d;
    }
    remainder = r;
    return q;
  }
};

}  // namespace coupled_mamba
