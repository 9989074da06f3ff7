// SmallDivisor (include/coupled_mamba/small_divisor.h, used by the CUDA kernels' index
// splits) against the integer division, on the host: every n < 2^20 for every divisor up
// to 512 (the kernels divide indices below 2^20 by at most kMaxDState = 256), then random
// n and d below 2^24 and the edges of that range. Prints the number of cases; exit status 1 on the first
// wrong quotient or remainder.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>

#include "coupled_mamba/small_divisor.h"

namespace {

bool check(int n, int d) {
  int r = -1;
  const int q = coupled_mamba::SmallDivisor(d).divide(n, r);
  if (q == n / d && r == n % d) return true;
  std::printf("FAIL: %d / %d gave %d remainder %d, expected %d remainder %d\n", n, d, q, r,
              n / d, n % d);
  return false;
}

}  // namespace

int main() {
  int64_t cases = 0;
  for (int d = 1; d <= 512; ++d) {
    const coupled_mamba::SmallDivisor divisor(d);
    for (int n = 0; n < (1 << 20); ++n, ++cases) {
      int r;
      const int q = divisor.divide(n, r);
      if (q != n / d || r != n % d) {
        check(n, d);
        return 1;
      }
    }
  }
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> any(0, (1 << 24) - 1);
  for (int i = 0; i < 10000000; ++i, ++cases)
    if (!check(any(rng), 1 + any(rng) % ((1 << 24) - 1))) return 1;
  const int top = (1 << 24) - 1;
  for (int d : {1, 2, 3, 255, 256, 257, 4095, 65537, top - 1, top})
    for (int n : {0, 1, d - 1, d, std::min(d + 1, top), top - 1, top}) {
      ++cases;
      if (!check(n, d)) return 1;
    }
  std::printf("ok: %lld quotients and remainders exact\n", static_cast<long long>(cases));
  return 0;
}
