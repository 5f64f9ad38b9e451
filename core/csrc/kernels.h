// What the shim's hand-written CPU kernels (rows.cpp, attention.cpp, fused.cpp) share: their
// convention for a case they decline, whether this CPU runs their AVX2 code, the sum of an
// AVX2 register's lanes, and e^x for x <= 0.
#pragma once

#include <ATen/ATen.h>

namespace plumb {

// The C entry of a kernel that may decline a case: 0 when `takes()` is false (the caller
// runs libtorch's way; nothing was allocated), 1 with `*out` a new at::Tensor from
// `compute()` that the caller owns, 2 on a C++ exception.
template <typename Takes, typename Compute>
int taken(void** out, Takes takes, Compute compute) {
  try {
    if (!takes()) return 0;
    *out = new at::Tensor(compute());
    return 1;
  } catch (...) {
    return 2;
  }
}

}  // namespace plumb

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

// e^x for x <= 0 (attention scores less their maximum, or -|x| for a sigmoid): 2^n · p(r) with x = n·ln2 + r, |r| <= ln2/2,
// p the degree-6 Taylor polynomial (relative error below 2e-7); x below -87 gives 0, as a
// masked score's -inf does.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.0f);
  const __m256 underflow = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n·ln2, with ln2 in two parts for precision.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

}  // namespace plumb
#else
namespace plumb {
// Other CPUs leave every case to libtorch.
inline bool cpu_has_avx2_fma() { return false; }
}  // namespace plumb
#endif
