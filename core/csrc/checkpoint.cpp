// Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
// Cost"), as torch.utils.checkpoint's reentrant variant does it: a custom autograd Function
// whose forward runs a block (a Rust closure, called back through a C function pointer)
// with gradients off, keeping only the block's inputs; its backward runs the block again
// with gradients on, from the same random state and under the same autocast, and
// back-propagates through that recomputation (a nested backward, which accumulates into
// the parameters' .grad and returns the inputs' gradients). Part of plumb's C++ shim
// (see shim.cpp): errors come back as a non-zero return and plumb_shim_last_error.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// Runs the block on `n` inputs (pointers to new at::Tensor objects the callee takes),
// `phase` 0 for the forward pass, 1 for the recomputation in backward. On success stores a
// new at::Tensor (the caller takes it) in `*output` and returns 0; on failure writes a
// NUL-terminated message of at most `capacity` bytes into `message` and returns non-zero.
typedef int (*plumb_block_fn)(void* block, int phase, void* const* inputs, int n, void** output, char* message,
                              size_t capacity);
// Frees the block's context (the Rust closure).
typedef void (*plumb_block_free_fn)(void* block);
}

namespace {
// The Rust side of one checkpointed call: its closure and how to run and free it. Lives
// as long as the autograd node (in its saved_data, as a capsule), so backward can call it.
struct RustBlock : torch::CustomClassHolder {
  void* context;
  plumb_block_fn run;
  plumb_block_free_fn free;

  RustBlock(void* context, plumb_block_fn run, plumb_block_free_fn free) : context(context), run(run), free(free) {}
  ~RustBlock() override { free(context); }

  at::Tensor call(int phase, const std::vector<at::Tensor>& inputs) const {
    std::vector<void*> owned;
    owned.reserve(inputs.size());
    for (const auto& x : inputs) owned.push_back(new at::Tensor(x));
    void* output = nullptr;
    char message[1024] = {0};
    const int code = run(context, phase, owned.data(), static_cast<int>(owned.size()), &output, message,
                         sizeof(message));
    if (code != 0) throw std::runtime_error(std::string("activation checkpointing: ") + message);
    auto* tensor = static_cast<at::Tensor*>(output);
    at::Tensor result = *tensor;
    delete tensor;
    return result;
  }
};

// The state a recomputation must see again: libtorch's default generator of the inputs'
// device (for random ops such as dropout) and autocast's switch and dtype there.
struct Replayed {
  c10::Device device;
  at::Tensor rng_state;
  bool autocast;
  at::ScalarType autocast_dtype;

  static Replayed capture(const c10::Device& device) {
    auto generator = at::globalContext().defaultGenerator(device);
    at::Tensor state;
    {
      std::lock_guard<std::mutex> lock(generator.mutex());
      state = generator.get_state();
    }
    const auto type = device.type();
    return {device, state, at::autocast::is_autocast_enabled(type), at::autocast::get_autocast_dtype(type)};
  }
};

// Puts the state of `replayed` in place until destroyed, then what was there before.
struct ReplayGuard {
  Replayed previous;

  explicit ReplayGuard(const Replayed& replayed) : previous(Replayed::capture(replayed.device)) {
    set(replayed);
  }
  ~ReplayGuard() {
    const bool was_on = at::autocast::is_autocast_enabled(previous.device.type());
    set(previous);
    // Leaving an autocast region drops its cached casts, as torch.autocast's __exit__ does.
    if (was_on && !previous.autocast) at::autocast::clear_cache();
  }

  static void set(const Replayed& state) {
    auto generator = at::globalContext().defaultGenerator(state.device);
    {
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(state.rng_state);
    }
    at::autocast::set_autocast_dtype(state.device.type(), state.autocast_dtype);
    at::autocast::set_autocast_enabled(state.device.type(), state.autocast);
  }
};

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  // `anchor` is an empty tensor that requires grad: it makes the output require grad
  // whenever gradients are recorded, so backward reaches the block even when its inputs
  // need no gradient (a frozen embedding under LoRA) but its parameters do.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs, at::Tensor anchor,
                            c10::intrusive_ptr<RustBlock> block) {
    std::vector<at::Tensor> xs(inputs.begin(), inputs.end());
    auto replayed = Replayed::capture(xs.front().device());
    // Autocast caches casts of weights; made here, without gradients, they would be
    // reused by the recomputation and cut the weights off from their gradients.
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    at::Tensor output;
    try {
      output = block->call(0, xs);
    } catch (...) {
      at::autocast::set_autocast_cache_enabled(cache);
      throw;
    }
    at::autocast::set_autocast_cache_enabled(cache);
    ctx->save_for_backward(xs);
    ctx->saved_data["block"] = c10::IValue::make_capsule(c10::intrusive_ptr<torch::CustomClassHolder>(block));
    ctx->saved_data["rng_state"] = replayed.rng_state;
    ctx->saved_data["autocast"] = replayed.autocast;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(replayed.autocast_dtype);
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto block = ctx->saved_data["block"].toCapsule();
    auto* rust = static_cast<RustBlock*>(block.get());
    std::vector<at::Tensor> detached;
    detached.reserve(saved.size());
    for (const auto& x : saved) detached.push_back(x.detach().requires_grad_(x.requires_grad()));
    Replayed replayed{detached.front().device(), ctx->saved_data["rng_state"].toTensor(),
                      ctx->saved_data["autocast"].toBool(),
                      static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt())};
    at::Tensor output;
    {
      ReplayGuard restore(replayed);
      at::AutoGradMode grad(true);
      output = rust->call(1, detached);
    }
    if (output.requires_grad() && grads[0].defined()) {
      torch::autograd::backward({output}, {grads[0]}, /*retain_graph=*/false, /*create_graph=*/false);
    }
    torch::autograd::variable_list result;
    result.reserve(detached.size() + 2);
    for (const auto& x : detached) result.push_back(x.requires_grad() ? x.grad() : at::Tensor());
    result.push_back(at::Tensor());  // anchor
    result.push_back(at::Tensor());  // block
    return result;
  }
};

thread_local std::string checkpoint_error;
}  // namespace

extern "C" {

// The message of the last failed plumb_checkpoint on this thread.
const char* plumb_checkpoint_last_error() { return checkpoint_error.c_str(); }

// Runs `block` on the `n` tensors `inputs` (pointers to at::Tensor) as a checkpointed
// segment (Checkpoint above) and stores its output, a new at::Tensor the caller owns, in
// `*output`. Takes `context` in every case: `free` is called on it once the segment's
// autograd node is gone (at once when nothing records gradients or on failure).
int plumb_checkpoint(void* const* inputs, int n, void* context, plumb_block_fn run, plumb_block_free_fn free,
                     void** output) {
  auto block = c10::make_intrusive<RustBlock>(context, run, free);
  try {
    if (n < 1) throw std::invalid_argument("a checkpointed block needs at least one input");
    std::vector<at::Tensor> xs;
    xs.reserve(n);
    for (int i = 0; i < n; ++i) xs.push_back(*static_cast<at::Tensor*>(inputs[i]));
    auto anchor = at::empty({0}, xs.front().options().dtype(at::kFloat)).requires_grad_(true);
    auto y = Checkpoint::apply(at::TensorList(xs), anchor, std::move(block));
    *output = new at::Tensor(y);
    return 0;
  } catch (const std::exception& e) {
    checkpoint_error = e.what();
  } catch (...) {
    checkpoint_error = "unknown C++ exception";
  }
  return 1;
}

}  // extern "C"
