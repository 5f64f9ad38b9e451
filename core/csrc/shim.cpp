// plumb's one C++ shim: the libtorch calls tch 0.24 does not bind (DESIGN.md, "What tch does
// not reach"), as a small C API. Every function catches C++ exceptions and reports them as a
// non-zero return with the message in a thread-local buffer (plumb_shim_last_error).
#include <ATen/autocast_mode.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

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

}  // extern "C"
