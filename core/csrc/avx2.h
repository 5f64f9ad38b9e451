// What the shim's hand-written CPU kernels (rows.cpp, attention.cpp) share: whether this CPU
// runs them, and the sum of an AVX2 register's lanes.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

namespace plumb {

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

}  // namespace plumb
#else
namespace plumb {
// Other CPUs leave every case to libtorch.
inline bool cpu_has_avx2_fma() { return false; }
}  // namespace plumb
#endif
