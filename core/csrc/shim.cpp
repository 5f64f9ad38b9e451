// plumb's one C++ shim: the libtorch calls tch 0.24 does not bind (DESIGN.md, "What tch does
// not reach"), as a small C API. Every function catches C++ exceptions and reports them as a
// non-zero return with the message in a thread-local buffer (plumb_shim_last_error).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/DeviceType.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef PLUMB_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#endif

#include <algorithm>
#include <cmath>
#include <mutex>

#include <exception>
#include <string>
#include <vector>

namespace {
thread_local std::string last_error;

// plumb's device codes: 0 CPU, 1 CUDA.
bool device_type(int code, c10::DeviceType* out) {
  switch (code) {
    case 0: *out = c10::DeviceType::CPU; return true;
    case 1: *out = c10::DeviceType::CUDA; return true;
    default: last_error = "unknown device code " + std::to_string(code); return false;
  }
}

template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}
// The logits of `hidden` (n, C) under the LM head `weight` (V, C), times `scale`, in fp32:
// the matmul runs in `compute` (the hidden states' dtype, or autocast's), as the model's own
// head would run it.
at::Tensor head_logits(const at::Tensor& hidden, const at::Tensor& weight, c10::ScalarType compute, double scale) {
  auto logits = at::matmul(hidden.to(compute), weight.to(compute).t()).to(at::kFloat);
  if (scale != 1.0) logits.mul_(scale);
  return logits;
}

// Per-token negative log-likelihood (and, on request, entropy) of `targets` under the LM
// head, computed `chunk` rows at a time so that no more than one chunk's logits exist at
// once, in the forward pass or the backward: what is kept for backward is the hidden
// states, the weight, the targets and one logsumexp per row; backward recomputes each
// chunk's logits (one more matmul of the head) and turns them straight into gradients.
// Logits that are one chunk and at most kKeptLogits numbers (a small model's, or few rows)
// are kept instead, as their softmax: backward then skips the recomputation.
// Rows whose target is `ignore_index` score 0 and get no gradient.
constexpr int64_t kKeptLogits = 1 << 20;

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::Tensor hidden,
                                                at::Tensor weight, at::Tensor targets, int64_t chunk, double scale,
                                                int64_t ignore_index, bool with_entropy) {
    const auto device = hidden.device().type();
    const auto compute =
        at::autocast::is_autocast_enabled(device) ? at::autocast::get_autocast_dtype(device) : hidden.scalar_type();
    const int64_t n = hidden.size(0);
    auto float_options = hidden.options().dtype(at::kFloat);
    auto nll = at::zeros({n}, float_options);
    auto lse = at::empty({n}, float_options);
    auto entropy = with_entropy ? at::zeros({n}, float_options) : at::zeros({0}, float_options);
    const bool keep = n <= chunk && n * weight.size(0) <= kKeptLogits;
    at::Tensor kept;  // softmax of every row's logits, when kept
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      auto logits = head_logits(hidden.narrow(0, start, len), weight, compute, scale);  // (len, V)
      auto row_lse = at::logsumexp(logits, {1});                                       // (len)
      auto t = targets.narrow(0, start, len);
      auto valid = t.ne(ignore_index);
      auto picked = logits.gather(1, t.masked_fill(valid.logical_not(), 0).unsqueeze(1)).squeeze(1);
      nll.narrow(0, start, len).copy_((row_lse - picked) * valid);
      lse.narrow(0, start, len).copy_(row_lse);
      if (with_entropy || keep) {
        auto probs = (logits - row_lse.unsqueeze(1)).exp_();
        // H = logsumexp(z) - sum softmax(z) z
        if (with_entropy) entropy.narrow(0, start, len).copy_(row_lse - (probs * logits).sum(1));
        if (keep) kept = probs;
      }
    }
    ctx->save_for_backward({hidden, weight, targets, lse, kept});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["compute"] = static_cast<int64_t>(compute);
    ctx->mark_non_differentiable({entropy});
    return {nll, entropy};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &hidden = saved[0], &weight = saved[1], &targets = saved[2], &lse = saved[3], &kept = saved[4];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const auto compute = static_cast<c10::ScalarType>(ctx->saved_data["compute"].toInt());
    const bool want_hidden = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    const int64_t n = hidden.size(0);
    auto grad_nll = grads[0].defined() ? grads[0] : at::zeros({n}, hidden.options().dtype(at::kFloat));
    at::Tensor grad_hidden = want_hidden ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_weight = want_weight ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
    auto weight_c = weight.to(compute);
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      auto h = hidden.narrow(0, start, len);
      auto t = targets.narrow(0, start, len);
      auto valid = t.ne(ignore_index);
      auto g = (grad_nll.narrow(0, start, len) * valid).unsqueeze(1);  // (len, 1)
      // d nll / d z = softmax(z) - onehot(target); z = scale * h W^T.
      auto dlogits = kept.defined() ? kept * g
                                    : (head_logits(h, weight, compute, scale) - lse.narrow(0, start, len).unsqueeze(1))
                                          .exp_()
                                          .mul_(g);
      dlogits.scatter_add_(1, t.masked_fill(valid.logical_not(), 0).unsqueeze(1), -g);
      if (scale != 1.0) dlogits.mul_(scale);
      auto dlogits_c = dlogits.to(compute);
      if (want_hidden) grad_hidden.narrow(0, start, len).copy_(at::matmul(dlogits_c, weight_c));
      if (want_weight) grad_weight.add_(at::matmul(dlogits_c.t(), h.to(compute)).to(at::kFloat));
    }
    if (want_weight) grad_weight = grad_weight.to(weight.scalar_type());
    return {grad_hidden, grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" {

// The message of the last failed call on this thread (valid until the next call).
const char* plumb_shim_last_error() { return last_error.c_str(); }

// Reads whether autocast is on for the device and its dtype (a c10::ScalarType code).
int plumb_autocast_get(int device, bool* enabled, int* dtype) {
  c10::DeviceType type;
  if (!device_type(device, &type)) return 1;
  return guarded([&] {
    *enabled = at::autocast::is_autocast_enabled(type);
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
  });
}

// Turns autocast on or off for the device, computing in `dtype` (a c10::ScalarType code:
// 15 is BFloat16, 5 Half) where autocast lowers precision. Leaving an autocast region clears
// the cast-weight cache, as torch.autocast's __exit__ does.
int plumb_autocast_set(int device, bool enabled, int dtype) {
  c10::DeviceType type;
  if (!device_type(device, &type)) return 1;
  return guarded([&] {
    at::autocast::set_autocast_dtype(type, static_cast<c10::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(type, enabled);
    if (!enabled) at::autocast::clear_cache();
  });
}

// AdamW over `n` parameters in one fused kernel (torch.optim.AdamW(fused=True)): each array
// holds pointers to the at::Tensor objects tch's Tensors wrap. `steps` are float scalars on
// the parameters' device holding the step number, already incremented by the caller.
int plumb_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs, void* const* exp_avg_sqs,
                      void* const* steps, int n, double lr, double beta1, double beta2, double weight_decay,
                      double eps) {
  return guarded([&] {
    auto list = [n](void* const* pointers) {
      std::vector<at::Tensor> tensors;
      tensors.reserve(n);
      for (int i = 0; i < n; ++i) tensors.push_back(*static_cast<at::Tensor*>(pointers[i]));
      return tensors;
    };
    at::_fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), {}, list(steps), lr, beta1,
                      beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The global L2 norm of the `n` gradients into `*norm` (as torch.nn.utils.clip_grad_norm_
// computes it: the norm of the per-tensor norms, in fp32), and, when `max_norm` > 0 and the
// norm is finite and above it, the gradients scaled in place by max_norm / (norm + 1e-6):
// two foreach kernels (three with the scaling) instead of three a tensor.
int plumb_clip_grad_norm(void* const* grads, int n, double max_norm, double* norm) {
  return guarded([&] {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (int i = 0; i < n; ++i) list.push_back(*static_cast<at::Tensor*>(grads[i]));
    at::NoGradGuard no_grad;
    auto norms = at::_foreach_norm(list, 2, at::kFloat);
    *norm = at::linalg_vector_norm(at::stack(norms), 2).item<double>();
    if (max_norm > 0.0 && std::isfinite(*norm) && *norm > max_norm) {
      at::_foreach_mul_(list, at::Scalar(max_norm / (*norm + 1e-6)));
    }
  });
}

// Per-token negative log-likelihood (N) of `targets` (N, int64) under logits
// scale * hidden (N, C) @ weight (V, C)^T, differentiable in `hidden` and `weight`, never holding
// more than `chunk` rows of logits (LinearCrossEntropy above). With `with_entropy`, `*entropy`
// receives each row's entropy (no gradient), else an empty tensor. The results are new
// at::Tensor objects the caller owns (tch's Tensor::from_ptr takes them).
int plumb_linear_cross_entropy(void* hidden, void* weight, void* targets, int64_t chunk, double scale,
                               int64_t ignore_index, bool with_entropy, void** nll, void** entropy) {
  return guarded([&] {
    auto outputs = LinearCrossEntropy::apply(*static_cast<at::Tensor*>(hidden), *static_cast<at::Tensor*>(weight),
                                             *static_cast<at::Tensor*>(targets), std::max<int64_t>(chunk, 1), scale,
                                             ignore_index, with_entropy);
    *nll = new at::Tensor(outputs[0]);
    *entropy = new at::Tensor(outputs[1]);
  });
}

// A random generator of its own for `device` (0 CPU, 1 CUDA) number `index`, of the kind
// libtorch's default generator there is (mt19937 on a CPU, Philox on CUDA), seeded with
// `seed`: draws from it do not touch the global generator, and its state lives where the
// tensors it fills live. Free it with plumb_generator_free.
int plumb_generator_new(int device, int index, uint64_t seed, void** out) {
  c10::DeviceType type;
  if (!device_type(device, &type)) return 1;
  return guarded([&] {
    auto fresh = at::globalContext().defaultGenerator(c10::Device(type, static_cast<c10::DeviceIndex>(index))).clone();
    {
      std::lock_guard<std::mutex> lock(fresh.mutex());
      fresh.set_current_seed(seed);
    }
    *out = new at::Generator(std::move(fresh));
  });
}

void plumb_generator_free(void* generator) { delete static_cast<at::Generator*>(generator); }

// Fills `tensor` in place with uniform numbers in [0, 1) drawn from `generator`.
int plumb_generator_uniform(void* generator, void* tensor) {
  return guarded([&] {
    auto& gen = *static_cast<at::Generator*>(generator);
    static_cast<at::Tensor*>(tensor)->uniform_(0.0, 1.0, gen);
  });
}

// Enters inference mode (c10::InferenceMode, torch.inference_mode) on this thread: no
// autograd and no version counters, so each op costs less to dispatch than under no_grad.
// Tensors made inside are inference tensors. Leave with plumb_inference_mode_exit, on the
// same thread, innermost first.
void* plumb_inference_mode_enter() { return new c10::InferenceMode(); }

void plumb_inference_mode_exit(void* guard) { delete static_cast<c10::InferenceMode*>(guard); }

// Whether this build has the CUDA half (graphs, memory statistics): CUDA's headers were
// there when it was compiled.
bool plumb_cuda_built() {
#ifdef PLUMB_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef PLUMB_CUDA
namespace {
// A CUDA graph and, while it is being captured, the side stream the capture runs on
// (capture is not allowed on the default stream).
struct Graph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStreamGuard> capturing;
};
}  // namespace
#endif

#define PLUMB_NO_CUDA                                                                            \
  last_error = "plumb was built without CUDA's headers, so it has no CUDA graphs or CUDA memory " \
               "statistics; rebuild with `./dev build`, which installs them";                   \
  return 1;

// A CUDA graph, empty until captured. Free it with plumb_cuda_graph_free.
int plumb_cuda_graph_new(void** out) {
#ifdef PLUMB_CUDA
  return guarded([&] { *out = new Graph(); });
#else
  PLUMB_NO_CUDA
#endif
}

void plumb_cuda_graph_free(void* graph) {
#ifdef PLUMB_CUDA
  delete static_cast<Graph*>(graph);
#endif
}

// Starts capturing the kernels that this thread launches on CUDA device `index` into
// `graph`, on a side stream from libtorch's pool (tensors allocated meanwhile come from the
// graph's private memory pool and stay valid for its replays). Work already queued on the
// current stream finishes first.
int plumb_cuda_graph_capture_begin(void* graph, int index) {
#ifdef PLUMB_CUDA
  return guarded([&] {
    auto& g = *static_cast<Graph*>(graph);
    auto device = static_cast<c10::DeviceIndex>(index);
    c10::cuda::getCurrentCUDAStream(device).synchronize();
    g.capturing.emplace(c10::cuda::getStreamFromPool(false, device));
    try {
      g.graph.capture_begin();
    } catch (...) {
      g.capturing.reset();
      throw;
    }
  });
#else
  PLUMB_NO_CUDA
#endif
}

// Ends the capture begun by plumb_cuda_graph_capture_begin and goes back to the stream
// that was current before it.
int plumb_cuda_graph_capture_end(void* graph) {
#ifdef PLUMB_CUDA
  return guarded([&] {
    auto& g = *static_cast<Graph*>(graph);
    try {
      g.graph.capture_end();
    } catch (...) {
      g.capturing.reset();
      throw;
    }
    g.capturing.reset();
  });
#else
  PLUMB_NO_CUDA
#endif
}

// Launches the captured kernels again, on the current stream, reading and writing the
// same memory as when they were captured.
int plumb_cuda_graph_replay(void* graph) {
#ifdef PLUMB_CUDA
  return guarded([&] { static_cast<Graph*>(graph)->graph.replay(); });
#else
  PLUMB_NO_CUDA
#endif
}

// The caching allocator's figures for CUDA device `index`, in bytes: memory held by
// tensors now, the most held at once since the last reset (torch.cuda.max_memory_allocated),
// and what the allocator has reserved from the driver.
int plumb_cuda_memory(int index, int64_t* allocated, int64_t* peak, int64_t* reserved) {
#ifdef PLUMB_CUDA
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
    auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *peak = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].current;
  });
#else
  PLUMB_NO_CUDA
#endif
}

// Starts the peak of plumb_cuda_memory over from what is allocated now.
int plumb_cuda_reset_peak_memory(int index) {
#ifdef PLUMB_CUDA
  return guarded([&] { c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(index)); });
#else
  PLUMB_NO_CUDA
#endif
}

}  // extern "C"
