// A linear layer over a few rows on a CPU: a decoding step's tokens (batch 1 to 4) through a
// projection. libtorch hands such a product to MKL's sgemv, which on the CPUs plumb was
// measured on (AMD EPYC, MKL 2024.2 inside torch 2.11) takes its generic code path: about
// 9 GFLOP/s on one core for a 352 x 128 weight, where AVX2 FMA row dot products reach over
// 40. A small model's decoding step is mostly such products, so they are done here.
//
// Only the case it was written for is taken: fp32, contiguous, a CPU with AVX2 and FMA, at
// most kMaxRows rows, no autograd and no autocast. Anything else is left to at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>

#include <atomic>
#include <vector>

#include "kernels.h"

namespace {
constexpr int64_t kMaxRows = 4;
// Weight rows per block: each block's rows are read once, while every input row passes
// over them from L1.
constexpr int64_t kBlock = 4;

#if defined(__x86_64__)

using plumb::horizontal_sum;

// y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for n in [begin, end), every m < rows.
__attribute__((target("avx2,fma"))) void rows_times_weight(const float* x, int64_t rows, const float* w,
                                                           const float* bias, float* y, int64_t k, int64_t n,
                                                           int64_t begin, int64_t end) {
  const int64_t vector_end = k - k % 8;
  int64_t row = begin;
  for (; row + kBlock <= end; row += kBlock) {
    const float* w0 = w + row * k;
    const float *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t i = 0; i < vector_end; i += 8) {
        const __m256 xv = _mm256_loadu_ps(xm + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
      }
      float s0 = horizontal_sum(a0), s1 = horizontal_sum(a1), s2 = horizontal_sum(a2), s3 = horizontal_sum(a3);
      for (int64_t i = vector_end; i < k; ++i) {
        s0 += w0[i] * xm[i];
        s1 += w1[i] * xm[i];
        s2 += w2[i] * xm[i];
        s3 += w3[i] * xm[i];
      }
      float* ym = y + m * n + row;
      ym[0] = s0 + (bias ? bias[row] : 0.f);
      ym[1] = s1 + (bias ? bias[row + 1] : 0.f);
      ym[2] = s2 + (bias ? bias[row + 2] : 0.f);
      ym[3] = s3 + (bias ? bias[row + 3] : 0.f);
    }
  }
  for (; row < end; ++row) {  // the last rows of a weight whose row count is not a multiple of kBlock
    const float* wr = w + row * k;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k;
      __m256 a = _mm256_setzero_ps();
      for (int64_t i = 0; i < vector_end; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(xm + i), a);
      float s = horizontal_sum(a);
      for (int64_t i = vector_end; i < k; ++i) s += wr[i] * xm[i];
      y[m * n + row] = s + (bias ? bias[row] : 0.f);
    }
  }
}

#else
// Other CPUs leave every case to at::linear.
void rows_times_weight(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t) {}
#endif

bool takes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias) {
  if (!plumb::cpu_has_avx2_fma() || at::autocast::is_autocast_enabled(at::kCPU)) return false;
  const bool grad = at::GradMode::is_enabled();
  auto plain = [grad](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided && t.is_contiguous() &&
           !(grad && t.requires_grad());
  };
  if (!plain(x) || !plain(weight) || weight.dim() != 2 || x.dim() < 1) return false;
  const int64_t k = weight.size(1);
  if (x.size(-1) != k || k == 0 || x.numel() / k > kMaxRows || x.numel() == 0) return false;
  return !bias || (plain(*bias) && bias->dim() == 1 && bias->size(0) == weight.size(0));
}
}  // namespace

extern "C" {

// y = x weight^T (+ bias) for `x` (..., K) of at most kMaxRows rows and `weight` (N, K), as
// at::linear computes it (to fp32 rounding: the sums run in another order). Returns 1 with
// `*out` a new at::Tensor the caller owns; 0 when the case is not one this takes (the caller
// runs at::linear; nothing was allocated); 2 on a C++ exception.
int plumb_rows_linear(void* x, void* weight, void* bias, void** out) {
  const auto& input = *static_cast<at::Tensor*>(x);
  const auto& w = *static_cast<at::Tensor*>(weight);
  const auto* b = static_cast<at::Tensor*>(bias);
  return plumb::taken(out, [&] { return takes(input, w, b); }, [&] {
    const int64_t k = w.size(1), n = w.size(0), rows = input.numel() / k;
    auto sizes = input.sizes().vec();
    sizes.back() = n;
    auto y = at::empty(sizes, input.options());
    const float *xp = input.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b ? b->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    // Blocks of weight rows across the intra-op threads, each worth at least libtorch's grain
    // of work, so that a small projection runs inline.
    const int64_t grain = std::max<int64_t>(kBlock, at::internal::GRAIN_SIZE / std::max<int64_t>(1, k * rows));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      rows_times_weight(xp, rows, wp, bp, yp, k, n, begin, end);
    });
    return y;
  });
}

// How many of libtorch's intra-op threads a parallel_for of the shim's, over `n` items
// (grain 1), ran on: 1 when the shim was built without libtorch's OpenMP, whatever the
// thread count. For the test that keeps the build honest.
int plumb_shim_parallel_threads(int64_t n) {
  std::vector<std::atomic<int>> seen(std::max(1, at::get_num_threads()));
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int thread = at::get_thread_num();
    if (thread >= 0 && thread < static_cast<int>(seen.size())) seen[thread] = 1;
  });
  int count = 0;
  for (const auto& s : seen) count += s.load();
  return count;
}

}  // extern "C"
