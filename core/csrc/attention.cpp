// Attention of a decoding step on a CPU: one query per row and head against the KV cache.
// libtorch's SDPA runs its flash kernel there, built for long query blocks: for a single
// query it pays a block's setup and two of MKL's matrix-vector products (generic code on the
// AMD EPYC machines plumb is measured on) per row and head. A small model's batched decoding
// step spent about a seventh of its time so; here each (row, head) is a few dozen AVX2 FMAs.
//
// Only the case it was written for is taken: fp32, one query position, a head size that is a
// multiple of 8, keys and values whose last dimension is contiguous (the cache's views are),
// an optional additive mask broadcast over heads and the query, no autograd, no autocast, a
// CPU with AVX2 and FMA. Anything else is left to SDPA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace {

struct Strides {
  int64_t batch, head, position;
};

#if defined(__x86_64__)
using plumb::exp_nonpositive;
using plumb::horizontal_sum;

__attribute__((target("avx2,fma"))) inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// out[d] for one row and head: softmax(q·k_j · scale + mask_j) over positions j < len,
// then the weighted sum of v_j. `scores` holds len + 8 floats.
__attribute__((target("avx2,fma"))) void attend_one(const float* q, const float* k, const float* v, const float* mask,
                                                    int64_t mask_stride, Strides kv, int64_t len, int64_t dim,
                                                    float scale, float* scores, float* out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float max = neg_inf;
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = k + j * kv.position;
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kj + i), a);
    float s = horizontal_sum(a) * scale;
    if (mask) s += mask[j * mask_stride];
    scores[j] = s;
    max = s > max ? s : max;
  }
  for (int64_t i = 0; i < dim; ++i) out[i] = 0.f;
  if (max == neg_inf) return;  // nothing visible (never so in a decoding step: a row sees itself)
  for (int64_t j = len; j < len + 8; ++j) scores[j] = neg_inf;  // the last block's spare lanes
  const __m256 m = _mm256_set1_ps(max);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m));
    _mm256_storeu_ps(scores + j, e);
    total = _mm256_add_ps(total, e);
  }
  const float inverse = 1.0f / horizontal_sum(total);
  for (int64_t j = 0; j < len; ++j) {
    const float p = scores[j];
    if (p == 0.f) continue;
    const __m256 w = _mm256_set1_ps(p * inverse);
    const float* vj = v + j * kv.position;
    for (int64_t i = 0; i < dim; i += 8)
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(out + i)));
  }
}

#else
// Other CPUs leave every case to SDPA.
void attend_one(const float*, const float*, const float*, const float*, int64_t, Strides, int64_t, int64_t, float,
                float*, float*) {}
#endif

bool plain_float(const at::Tensor& t, bool grad) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
         !(grad && t.requires_grad());
}

// q (B, H, 1, D), k and v (B, Hkv, L, D) with Hkv dividing H, mask (B or 1, 1, 1, L).
bool takes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask) {
  if (!plumb::cpu_has_avx2_fma() || at::autocast::is_autocast_enabled(at::kCPU)) return false;
  const bool grad = at::GradMode::is_enabled();
  if (!plain_float(q, grad) || !plain_float(k, grad) || !plain_float(v, grad)) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.size(2) != 1) return false;
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3), hkv = k.size(1), len = k.size(2);
  if (d == 0 || d % 8 != 0 || len == 0 || hkv == 0 || h % hkv != 0) return false;
  if (k.size(0) != b || k.size(3) != d || !v.sizes().equals(k.sizes())) return false;
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1 || k.strides() != v.strides()) return false;
  if (!mask) return true;
  if (!plain_float(*mask, grad) || mask->dim() != 4 || mask->size(1) != 1 || mask->size(2) != 1) return false;
  return (mask->size(0) == b || mask->size(0) == 1) && mask->size(3) == len;
}
}  // namespace

extern "C" {

// Scaled dot-product attention of one query position, as SDPA computes it for `q` (B, H, 1,
// D), `k` and `v` (B, Hkv, L, D) (grouped heads when Hkv < H) and an optional additive `mask`
// (B or 1, 1, 1, L), scaled by `scale_or_zero` (0: 1/sqrt(D)), to fp32 rounding. Returns 1 with `*out` a new (B, H, 1, D) at::Tensor
// the caller owns; 0 when the case is not one this takes (nothing was allocated); 2 on a C++
// exception.
int plumb_decode_attention(void* query, void* key, void* value, void* attention_mask, double scale_or_zero,
                           void** out) {
  const auto& q = *static_cast<at::Tensor*>(query);
  const auto& k = *static_cast<at::Tensor*>(key);
  const auto& v = *static_cast<at::Tensor*>(value);
  const auto* mask = static_cast<at::Tensor*>(attention_mask);
  return plumb::taken(out, [&] { return takes(q, k, v, mask); }, [&] {
    const int64_t b = q.size(0), h = q.size(1), d = q.size(3), hkv = k.size(1), len = k.size(2);
    const int64_t group = h / hkv;
    const float scale = scale_or_zero > 0 ? static_cast<float>(scale_or_zero) : 1.0f / std::sqrt(static_cast<float>(d));
    auto y = at::empty({b, h, 1, d}, q.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const float* mp = mask ? mask->data_ptr<float>() : nullptr;
    const int64_t mask_batch = mask && mask->size(0) == b ? mask->stride(0) : 0;
    const int64_t mask_stride = mask ? mask->stride(3) : 0;
    const Strides kv{k.stride(0), k.stride(1), k.stride(2)};
    float* yp = y.data_ptr<float>();
    // (row, head) pairs across the intra-op threads, a few dozen positions' work each at least.
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, len * d));
    at::parallel_for(0, b * h, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(len + 8);
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t row = pair / h, head = pair % h, kv_head = head / group;
        const float* qrow = qp + row * q.stride(0) + head * q.stride(1);
        const int64_t at = row * kv.batch + kv_head * kv.head;
        attend_one(qrow, kp + at, vp + at, mp ? mp + row * mask_batch : nullptr, mask_stride, kv, len, d, scale,
                   scores.data(), yp + pair * d);
      }
    });
    return y;
  });
}

}  // extern "C"
