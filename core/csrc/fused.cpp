// Three of a decoder block's elementwise pieces on a CPU as one kernel forward and one kernel
// backward, each in an autograd node of its own: RMSNorm, the rotary embedding and SwiGLU.
//
// On a CPU libtorch runs `_fused_rms_norm` as its composite formula, about ten kernels
// forward and fifteen backward, and the rotary embedding as three forward and five backward.
// A small model's training step is mostly such launches: at 4 x 48 tokens of width 128 a
// norm's forward and backward took 177 us in libtorch and a rotation 98 us, where the work is
// a few dozen microseconds. SwiGLU's silu(gate)·up is two kernels forward and three backward,
// each a pass over the MLP's widest activations. Here each is one pass over its rows.
//
// Only fp32 CPU tensors are taken, without autocast (SwiGLU: on a CPU with AVX2 and FMA, for
// its vectorised exponential); anything else is left to the formula
// (the caller's fallback). The weight gradient of RMSNorm sums fixed blocks of rows in a
// fixed order, so it does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace {

// Compiled twice on x86: for AVX2 with FMA and for the baseline, the loader picking one.
#if defined(__x86_64__)
#define PLUMB_VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PLUMB_VECTORIZED
#endif

constexpr int64_t kLanes = 8;
// Rows per block of RMSNorm's weight gradient.
constexpr int64_t kBlockRows = 32;

// Σ a[i]·b[i] in kLanes partial sums (a vector register's lanes), added in a fixed order.
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y = weight · (x · rstd) for rows [begin, end) of width c, rstd = 1/√(mean(x²) + eps) per row.
PLUMB_VECTORIZED void rms_norm_rows(const float* x, const float* weight, float* y, float* rstd, int64_t c,
                                    float eps, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * c;
    float* yr = y + row * c;
    const float r = 1.0f / std::sqrt(dot(xr, xr, c) / static_cast<float>(c) + eps);
    rstd[row] = r;
    for (int64_t i = 0; i < c; ++i) yr[i] = weight[i] * (xr[i] * r);
  }
}

// For rows [begin, end): dx = r·(g·w) − x·r³·mean(g·w·x), and (when `dw_block`) the rows'
// share of dw = Σ g·x·r written to `dw_block`.
PLUMB_VECTORIZED void rms_norm_backward_rows(const float* g, const float* x, const float* weight, const float* rstd,
                                             float* dx, float* dw_block, float* scratch, int64_t c, int64_t begin,
                                             int64_t end) {
  if (dw_block)
    for (int64_t i = 0; i < c; ++i) dw_block[i] = 0.f;
  for (int64_t row = begin; row < end; ++row) {
    const float *gr = g + row * c, *xr = x + row * c;
    float* dxr = dx + row * c;
    const float r = rstd[row];
    for (int64_t i = 0; i < c; ++i) scratch[i] = gr[i] * weight[i];
    const float k = r * r * r * dot(scratch, xr, c) / static_cast<float>(c);
    for (int64_t i = 0; i < c; ++i) dxr[i] = r * scratch[i] - xr[i] * k;
    if (dw_block)
      for (int64_t i = 0; i < c; ++i) dw_block[i] += gr[i] * (xr[i] * r);
  }
}

bool plain_float(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided;
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            double eps) {
    const auto x = input.contiguous();
    const auto w = weight.contiguous();
    const int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
    auto y = at::empty_like(x);
    auto rstd = at::empty({rows}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, c));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      rms_norm_rows(xp, wp, yp, rp, c, static_cast<float>(eps), begin, end);
    });
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    const auto g = grads[0].contiguous();
    const bool weight_grad = ctx->needs_input_grad(1);
    const int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
    const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
    auto dx = at::empty_like(x);
    auto partial = weight_grad ? at::empty({blocks, c}, x.options()) : at::Tensor();
    const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    const float* rp = rstd.data_ptr<float>();
    float* dxp = dx.data_ptr<float>();
    float* pp = weight_grad ? partial.data_ptr<float>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(c);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t first = block * kBlockRows, last = std::min(rows, first + kBlockRows);
        rms_norm_backward_rows(gp, xp, wp, rp, dxp, pp ? pp + block * c : nullptr, scratch.data(), c, first, last);
      }
    });
    at::Tensor dw;
    if (weight_grad) {
      dw = at::zeros({c}, x.options());
      float* dwp = dw.data_ptr<float>();
      for (int64_t block = 0; block < blocks; ++block)
        for (int64_t i = 0; i < c; ++i) dwp[i] += pp[block * c + i];
      dw = dw.view(w.sizes());
    }
    return {dx, dw, at::Tensor()};
  }
};

// y = x·cos + roll(x, D/2)·signed_sin over the last dimension D, for rows [begin, end) of
// (B, H, T) positions; `x` by strides (its last one 1), cos and sin (B', 1, T, D) with B' 1 or
// B, contiguous but for the batch stride (a narrowed view's), y contiguous. With `transpose`, the backward: y = x·cos + roll(x·sin, D/2).
struct RopeLayout {
  int64_t heads, positions, dim;
  int64_t x_batch, x_head, x_position;
  int64_t angle_batch;
};

PLUMB_VECTORIZED void rotate_rows(const float* x, const float* cos, const float* sin, float* y, RopeLayout l,
                                  bool transpose, int64_t begin, int64_t end) {
  const int64_t half = l.dim / 2;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / (l.heads * l.positions), h = row / l.positions % l.heads, t = row % l.positions;
    const float* xr = x + b * l.x_batch + h * l.x_head + t * l.x_position;
    const int64_t angle = b * l.angle_batch + t * l.dim;
    const float *cr = cos + angle, *sr = sin + angle;
    float* yr = y + row * l.dim;
    if (!transpose) {
      for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * cr[i] + xr[i + half] * sr[i];
      for (int64_t i = half; i < l.dim; ++i) yr[i] = xr[i] * cr[i] + xr[i - half] * sr[i];
    } else {
      for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * cr[i] + xr[i + half] * sr[i + half];
      for (int64_t i = half; i < l.dim; ++i) yr[i] = xr[i] * cr[i] + xr[i - half] * sr[i - half];
    }
  }
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  const int64_t b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
  auto y = at::empty({b, h, t, d}, x.options());
  const RopeLayout layout{h, t, d, x.stride(0), x.stride(1), x.stride(2), cos.size(0) == 1 ? 0 : cos.stride(0)};
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, d));
  at::parallel_for(0, b * h * t, grain, [&](int64_t begin, int64_t end) {
    rotate_rows(xp, cp, sp, yp, layout, transpose, begin, end);
  });
  return y;
}

struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rotate(x, cos, sin, false);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto g = grads[0];
    if (g.stride(3) != 1) g = g.contiguous();
    return {rotate(g, saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};

// SwiGLU's product y = silu(g)·u = g·σ(g)·u, and its backward: du = dy·g·σ(g) and
// dg = dy·u·σ(g)·(1 + g·(1 − σ(g))), over elements [begin, end).
#if defined(__x86_64__)
using plumb::exp_nonpositive;

// σ(x) = 1/(1 + e^−x), through e^−|x| (which cannot overflow): σ(|x|) = 1/(1 + e^−|x|), and
// σ(x) = 1 − σ(|x|) = e^−|x|·σ(|x|) for x < 0.
__attribute__((target("avx2,fma"))) inline __m256 sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp_nonpositive(_mm256_or_ps(x, _mm256_set1_ps(-0.f)));
  const __m256 positive = _mm256_div_ps(one, _mm256_add_ps(one, e));
  return _mm256_blendv_ps(positive, _mm256_mul_ps(e, positive), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

__attribute__((target("avx2,fma"))) void swiglu_range(const float* g, const float* u, float* y, int64_t begin,
                                                      int64_t end) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid(gv)), _mm256_loadu_ps(u + i)));
  }
  for (; i < end; ++i) y[i] = g[i] * sigmoid(g[i]) * u[i];
}

__attribute__((target("avx2,fma"))) void swiglu_backward_range(const float* dy, const float* g, const float* u,
                                                               float* dg, float* du, int64_t begin, int64_t end) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const __m256 gv = _mm256_loadu_ps(g + i), dyv = _mm256_loadu_ps(dy + i);
    const __m256 s = sigmoid(gv);
    _mm256_storeu_ps(du + i, _mm256_mul_ps(dyv, _mm256_mul_ps(gv, s)));
    const __m256 slope = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(dyv, _mm256_loadu_ps(u + i)), slope));
  }
  for (; i < end; ++i) {
    const float s = sigmoid(g[i]);
    du[i] = dy[i] * (g[i] * s);
    dg[i] = dy[i] * u[i] * (s * (1.f + g[i] * (1.f - s)));
  }
}
#else
// Other CPUs leave SwiGLU to the formula.
void swiglu_range(const float*, const float*, float*, int64_t, int64_t) {}
void swiglu_backward_range(const float*, const float*, const float*, float*, float*, int64_t, int64_t) {}
#endif

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    auto y = at::empty_like(gate);
    const float *gp = gate.data_ptr<float>(), *up_ = up.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, gate.numel(), at::internal::GRAIN_SIZE,
                     [&](int64_t begin, int64_t end) { swiglu_range(gp, up_, yp, begin, end); });
    ctx->save_for_backward({gate, up});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &gate = saved[0], &up = saved[1];
    const auto dy = grads[0].contiguous();
    auto dg = at::empty_like(gate), du = at::empty_like(up);
    const float *dyp = dy.data_ptr<float>(), *gp = gate.data_ptr<float>(), *up_ = up.data_ptr<float>();
    float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
    at::parallel_for(0, gate.numel(), at::internal::GRAIN_SIZE,
                     [&](int64_t begin, int64_t end) { swiglu_backward_range(dyp, gp, up_, dgp, dup, begin, end); });
    return {dg, du};
  }
};

bool no_autocast() { return !at::autocast::is_autocast_enabled(at::kCPU); }

bool rms_norm_takes(const at::Tensor& x, const at::Tensor& w) {
  return no_autocast() && plain_float(x) && plain_float(w) && x.dim() >= 1 && w.dim() == 1 &&
         w.size(0) == x.size(-1) && x.size(-1) > 0;
}

bool rope_takes(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!no_autocast() || !plain_float(x) || !plain_float(cos) || !plain_float(sin)) return false;
  if (cos.requires_grad() || sin.requires_grad() || x.dim() != 4 || cos.dim() != 4) return false;
  const int64_t d = x.size(3);
  if (d == 0 || d % 2 != 0 || x.stride(3) != 1 || cos.stride(3) != 1 || cos.stride(2) != d) return false;
  if (!cos.strides().equals(sin.strides())) return false;
  if (!cos.sizes().equals(sin.sizes()) || cos.size(1) != 1 || cos.size(2) != x.size(2) || cos.size(3) != d) return false;
  return cos.size(0) == 1 || cos.size(0) == x.size(0);
}

bool swiglu_takes(const at::Tensor& gate, const at::Tensor& up) {
  return plumb::cpu_has_avx2_fma() && no_autocast() && plain_float(gate) && plain_float(up) && gate.is_contiguous() &&
         up.is_contiguous() && gate.sizes().equals(up.sizes());
}
}  // namespace

extern "C" {

// RMSNorm of `x` (..., C) with `weight` (C): weight · x / √(mean(x²) + eps), in one autograd
// node (gradients for x and the weight). Returns 1 with `*out` a new at::Tensor the caller
// owns, 0 when the case is not taken, 2 on a C++ exception.
int plumb_rms_norm(void* x, void* weight, double eps, void** out) {
  const auto& input = *static_cast<at::Tensor*>(x);
  const auto& w = *static_cast<at::Tensor*>(weight);
  return plumb::taken(
      out, [&] { return rms_norm_takes(input, w); }, [&] { return RmsNorm::apply(input, w, eps); });
}

// The rotary embedding of `x` (B, H, T, D): x·cos + roll(x, D/2)·signed_sin with `cos` and
// `signed_sin` (B or 1, 1, T, D) (rope.rs's layout), in one autograd node. Returns as
// plumb_rms_norm.
int plumb_rope(void* x, void* cos, void* signed_sin, void** out) {
  const auto& input = *static_cast<at::Tensor*>(x);
  const auto& c = *static_cast<at::Tensor*>(cos);
  const auto& s = *static_cast<at::Tensor*>(signed_sin);
  return plumb::taken(
      out, [&] { return rope_takes(input, c, s); }, [&] { return Rope::apply(input, c, s); });
}

// SwiGLU's silu(gate)·up for `gate` and `up` of one shape, in one autograd node. Returns as
// plumb_rms_norm.
int plumb_swiglu(void* gate, void* up, void** out) {
  const auto& g = *static_cast<at::Tensor*>(gate);
  const auto& u = *static_cast<at::Tensor*>(up);
  return plumb::taken(
      out, [&] { return swiglu_takes(g, u); }, [&] { return SwiGlu::apply(g, u); });
}

}  // extern "C"
