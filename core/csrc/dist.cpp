// PyTorch's distributed engine (c10d) as a small C API: TCPStore rendezvous, a Gloo process
// group and its collectives on the at::Tensor objects tch's Tensors wrap. Only pointers to gloo
// types cross (gloo's headers come from Debian's libgloo-dev; its code is libtorch's own).
//
// As torch.distributed's default "cuda:nccl,cpu:gloo" group does, a group can have an NCCL
// backend attached (plumb_dist_nccl_attach, in a build that found CUDA's headers: PLUMB_CUDA):
// from then on its collectives on CUDA tensors go through NCCL, those on CPU tensors through
// Gloo. NCCL work runs on NCCL's own stream; waiting for it makes the calling thread's current
// stream wait (the host does not block), so what is queued after it sees the result.
//
// As in shim.cpp, every function catches C++ exceptions (c10d's timeouts and network errors,
// gloo's I/O errors) and reports them as a non-zero return with the message in a thread-local
// buffer (plumb_dist_last_error), so no exception ever reaches Rust.
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#ifdef PLUMB_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {
thread_local std::string last_error;

template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    last_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

// An NCCL backend, shared by its group and the GradSyncs made from it. The last owner
// destroys it as torch.distributed's destroy_process_group does: shutdown() lets queued NCCL
// work finish before the communicators go; after a failed collective on it (a peer may never
// come) abort() ends them at once instead, since shutdown() could wait forever.
struct Nccl {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::atomic<bool> failed{false};
  explicit Nccl(c10::intrusive_ptr<c10d::Backend> backend) : backend(std::move(backend)) {}
  Nccl(const Nccl&) = delete;
  Nccl& operator=(const Nccl&) = delete;
  ~Nccl() {
    try {
      if (failed) {
        backend->abort();
      } else {
        backend->shutdown();
      }
    } catch (...) {
      // Nothing to report to at this point: the process goes on or ends without it.
    }
  }
};

// What Rust holds: the store (kept alive as long as the group), the group's Gloo backend and,
// once attached, its NCCL backend for CUDA tensors.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::shared_ptr<Nccl> nccl;
  std::string name;  // the group's key prefix: its name in NCCL's logs
  int rank;
  int size;
};

// The backend of a collective on tensors on `device`: NCCL for CUDA tensors when it is
// attached, else Gloo (which takes CPU tensors, and CUDA tensors through host copies).
c10d::Backend& backend_for(const c10::intrusive_ptr<c10d::Backend>& gloo, const std::shared_ptr<Nccl>& nccl,
                           const at::Device& device) {
  if (device.is_cuda() && nccl) return *nccl->backend;
  return *gloo;
}

c10d::Backend& backend_for(const Group& g, const at::Device& device) { return backend_for(g.backend, g.nccl, device); }

// The device of `reference` (`name` says which tensor it is), checked to be that of all of
// `list` too: a collective runs on one backend. `what` names the call.
at::Device common_device(const at::Tensor& reference, const char* name, const std::vector<at::Tensor>& list,
                         const char* what) {
  auto device = reference.device();
  for (const auto& t : list) {
    TORCH_CHECK(t.device() == device, what, " expected every tensor on ", device, " (the ", name, "'s device), found one on ",
                t.device());
  }
  return device;
}

at::Tensor& tensor(void* raw) { return *static_cast<at::Tensor*>(raw); }

std::vector<at::Tensor> tensors(void* const* raw, int n) {
  std::vector<at::Tensor> list;
  list.reserve(n);
  for (int i = 0; i < n; ++i) list.push_back(tensor(raw[i]));
  return list;
}

// plumb's reduction codes: 0 sum, 1 average (a sum divided by the world size: Gloo has no
// AVG), 2 max, 3 min.
c10d::ReduceOp reduce_op(int code) {
  switch (code) {
    case 0: case 1: return c10d::ReduceOp::SUM;
    case 2: return c10d::ReduceOp::MAX;
    case 3: return c10d::ReduceOp::MIN;
    default: TORCH_CHECK(false, "unknown reduction code ", code);
  }
}

void finish(const c10::intrusive_ptr<c10d::Work>& work) {
  // Gloo's own timeout (the group's option) bounds the wait: a peer that never arrives
  // makes it throw. NCCL's wait makes the current stream wait for NCCL's and returns; its
  // watchdog ends a collective a peer never joins after the group's timeout.
  work->wait();
}

// Runs `collective` on `backend` and waits for it. A failure on either backend marks the
// group's NCCL failed: a peer may be gone, so NCCL work queued for it may never finish, and
// its destruction must abort rather than wait.
template <typename F>
void run_on(const Group& g, c10d::Backend& backend, F collective) {
  try {
    finish(collective(backend));
  } catch (...) {
    if (g.nccl) g.nccl->failed = true;
    throw;
  }
}

// The network device Gloo binds: the interface GLOO_SOCKET_IFNAME names (as in PyTorch);
// else the loopback address when the master is on this machine's loopback (one-machine runs
// need no resolvable host name); else the address this host's name resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& master) {
  if (const char* name = std::getenv("GLOO_SOCKET_IFNAME"); name != nullptr && *name != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForInterface(name);
  }
  if (master == "localhost" || master.rfind("127.", 0) == 0) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}
}  // namespace

extern "C" {

// The message of the last failed call on this thread (valid until the next call).
const char* plumb_dist_last_error() { return last_error.c_str(); }

// Opens the run's TCPStore at host:port. The server (`serve`, rank 0) waits until `workers`
// stores in all have connected (its own included); a client (`workers` 0) connects, retrying
// until `timeout_ms`. Free with plumb_dist_store_free.
int plumb_dist_store_new(const char* host, int port, bool serve, int workers, int64_t timeout_ms, void** out) {
  return guarded([&] {
    TORCH_CHECK(port > 0 && port < 65536, "port ", port, " is outside 1..65535");
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = serve;
    if (workers > 0) options.numWorkers = workers;
    options.waitWorkers = workers > 0;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(host, options);
    *out = new c10::intrusive_ptr<c10d::Store>(std::move(store));
  });
}

void plumb_dist_store_free(void* store) { delete static_cast<c10::intrusive_ptr<c10d::Store>*>(store); }

// Adds `delta` to the counter at `key` (created at 0) and writes its new value to `out`: a
// heartbeat with 1, a read with 0.
int plumb_dist_store_add(void* store, const char* key, int64_t delta, int64_t* out) {
  return guarded([&] { *out = (*static_cast<c10::intrusive_ptr<c10d::Store>*>(store))->add(key, delta); });
}

// Reads the `n` counters at `keys` (each made by plumb_dist_store_add) in one round trip.
int plumb_dist_store_counters(void* store, const char* const* keys, int n, int64_t* out) {
  return guarded([&] {
    std::vector<std::string> names(keys, keys + n);
    auto values = (*static_cast<c10::intrusive_ptr<c10d::Store>*>(store))->multiGet(names);
    for (int i = 0; i < n; ++i) {
      out[i] = std::stoll(std::string(values[i].begin(), values[i].end()));
    }
  });
}

// A Gloo process group of `size` ranks, this one `rank`, meeting through `store` under the
// key prefix `prefix` (each group of a run its own, as torch.distributed's PrefixStore). Its
// rendezvous, and every collective after, fail after `timeout_ms` when a peer does not take
// part. `master` is the store's host (it picks Gloo's network device). The group keeps the
// store alive.
int plumb_dist_gloo_new(void* store, const char* prefix, const char* master, int rank, int size,
                        int64_t timeout_ms, void** out) {
  return guarded([&] {
    TORCH_CHECK(size > 0 && rank >= 0 && rank < size, "rank ", rank, " is outside a world of ", size);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
        prefix, *static_cast<c10::intrusive_ptr<c10d::Store>*>(store));
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    options->devices.push_back(gloo_device(master));
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
    *out = new Group{prefixed, backend, nullptr, prefix, rank, size};
  });
}

void plumb_dist_free(void* group) { delete static_cast<Group*>(group); }

// Attaches an NCCL backend to `group` for its collectives on CUDA tensors (those on CPU
// tensors stay on Gloo), as torch.distributed's "cuda:nccl,cpu:gloo" groups do. Every rank
// attaches, at the same point among its collectives, each its own CUDA device `device` (NCCL
// refuses two ranks on one GPU). It meets through the group's store under `prefix` (keys of
// its own, apart from Gloo's), binds the device and connects at once, so a failure shows
// here; its watchdog fails a collective that a peer does not join within `timeout_ms`.
int plumb_dist_nccl_attach(void* group, const char* prefix, int device, int64_t timeout_ms) {
#ifdef PLUMB_CUDA
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    TORCH_CHECK(!g.nccl, "NCCL is already attached to this group");
    int devices = c10::cuda::device_count();
    TORCH_CHECK(devices > 0, "NCCL needs a CUDA device, but libtorch sees none");
    TORCH_CHECK(device >= 0 && device < devices, "cuda:", device, " asked for, but libtorch sees ", devices,
                " CUDA device(s)");
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, g.store);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    options->group_name = g.name;
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, g.rank, g.size, options);
    auto nccl = std::make_shared<Nccl>(backend);
    at::Device bound(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    backend->setBoundDeviceId(bound);
    try {
      backend->eagerConnectSingleDevice(bound);
    } catch (...) {
      nccl->failed = true;
      throw;
    }
    g.nccl = std::move(nccl);
  });
#else
  last_error =
      "plumb was built without CUDA's headers, so it has no NCCL (CUDA tensors go through Gloo); "
      "rebuild with `./dev build`, which installs them";
  return 1;
#endif
}

// Which backend the group's collectives on a tensor like `raw` use: 1 NCCL, 0 Gloo.
int plumb_dist_uses_nccl(void* group, void* raw) {
  auto& g = *static_cast<Group*>(group);
  const auto& t = tensor(raw);
  return t.defined() && &backend_for(g, t.device()) != g.backend.get() ? 1 : 0;
}

// Reduces each of the `n` tensors in place across ranks (reduction codes above).
int plumb_dist_all_reduce(void* group, void* const* raw, int n, int op) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    c10d::AllreduceOptions options;
    options.reduceOp = reduce_op(op);
    // One call per tensor: c10d reads a list as copies of one tensor (one per local device)
    // and reduces them together. Callers flatten many small tensors into one bucket first.
    for (auto& t : tensors(raw, n)) {
      std::vector<at::Tensor> one{t};
      run_on(g, backend_for(g, t.device()), [&](c10d::Backend& b) { return b.allreduce(one, options); });
      // On a CUDA tensor the division is queued after NCCL's sum on the current stream.
      if (op == 1) t.div_(g.size);
    }
  });
}

// Overwrites each of the `n` tensors with rank `root`'s.
int plumb_dist_broadcast(void* group, void* const* raw, int n, int root) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    TORCH_CHECK(root >= 0 && root < g.size, "broadcast root ", root, " is outside a world of ", g.size);
    auto list = tensors(raw, n);
    c10d::BroadcastOptions options;
    options.rootRank = root;
    // One call per tensor, as in all-reduce.
    for (auto& t : list) {
      std::vector<at::Tensor> one{t};
      run_on(g, backend_for(g, t.device()), [&](c10d::Backend& b) { return b.broadcast(one, options); });
    }
  });
}

// outputs[r] (world-size tensors shaped like `input`, on its device) receives rank r's `input`.
int plumb_dist_all_gather(void* group, void* const* outputs, void* input) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> in{tensor(input)};
    std::vector<std::vector<at::Tensor>> out{tensors(outputs, g.size)};
    auto device = common_device(in[0], "input", out[0], "all-gather");
    run_on(g, backend_for(g, device), [&](c10d::Backend& b) { return b.allgather(out, in); });
  });
}

// `output` receives the reduction over ranks of each rank's inputs[my rank] (world-size
// tensors shaped like `output`, on its device).
int plumb_dist_reduce_scatter(void* group, void* output, void* const* inputs, int op) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> out{tensor(output)};
    std::vector<std::vector<at::Tensor>> in{tensors(inputs, g.size)};
    auto device = common_device(out[0], "output", in[0], "reduce-scatter");
    c10d::ReduceScatterOptions options;
    options.reduceOp = reduce_op(op);
    run_on(g, backend_for(g, device), [&](c10d::Backend& b) { return b.reduce_scatter(out, in, options); });
    if (op == 1) out[0].div_(g.size);
  });
}

// Returns once every rank has called it: Gloo's barrier, with or without NCCL attached. It
// synchronises the processes (their host code), which is what its callers need (rank 0 has
// written a file the others read); it does not wait for NCCL work queued on the GPU (NCCL's
// barrier would, by a device-wide synchronisation, and needs NCCL on every group).
int plumb_dist_barrier(void* group) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    finish(g.backend->barrier());
  });
}

// Gradient averaging overlapped with backward, as DistributedDataParallel does it: the
// parameters are split into buckets in reverse order (the order backward reaches them),
// and once every parameter of a bucket has its gradient accumulated (a post-accumulate-grad
// hook on each), the bucket is flattened and its all-reduce starts on Gloo's threads while
// backward goes on. Buckets start strictly in order, so every rank issues the same
// collectives in the same order. Only an armed backward (the last of a step's accumulation)
// starts them; `finish` starts what backward did not reach (parameters without a
// gradient take part with zeros), waits, and writes the averages back into the gradients.
}  // extern "C"

namespace {
struct GradSync {
  c10::intrusive_ptr<c10d::Backend> backend;  // Gloo
  std::shared_ptr<Nccl> nccl;                 // for CUDA buckets, when the group had it attached
  int size;
  std::vector<at::Tensor> params;
  std::vector<std::vector<int>> buckets;  // indices into params, in launch order
  std::vector<int> bucket_of;             // param -> bucket
  std::vector<int> waiting;               // per bucket: parameters still without a gradient
  std::vector<bool> counted;              // per parameter: its gradient arrived in this backward
  bool twice = false;                     // a gradient arrived twice: the early starts are void
  std::vector<at::Tensor> flat;           // per bucket, once started
  std::vector<c10::intrusive_ptr<c10d::Work>> work;
  size_t next = 0;  // the next bucket to start
  bool armed = false;
  std::string error;
  std::mutex mutex;

  void start(size_t b) {
    std::vector<at::Tensor> parts;
    for (int i : buckets[b]) {
      const auto& g = params[i].grad();
      parts.push_back(g.defined() ? g.reshape({-1}) : at::zeros({params[i].numel()}, params[i].options()));
    }
    flat[b] = at::cat(parts);
    std::vector<at::Tensor> one{flat[b]};
    // A bucket holds one device's parameters (data_parallel's buckets); NCCL takes it when it
    // is on CUDA and attached. From a hook, NCCL's stream first waits for autograd's current
    // stream, where the gradients were accumulated.
    work[b] = backend_for(backend, nccl, flat[b].device()).allreduce(one, c10d::AllreduceOptions{});
  }

  // Starts the buckets, in order, whose parameters are all ready.
  void start_ready() {
    while (next < buckets.size() && waiting[next] == 0) start(next++);
  }

  void ready(int index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed) return;
    if (counted[index]) {
      // Accumulated twice in one backward (a parameter shared across checkpointed
      // blocks, say): a bucket may have started with a partial gradient. `finish` redoes all.
      twice = true;
      return;
    }
    counted[index] = true;
    try {
      if (--waiting[bucket_of[index]] == 0 && !twice) start_ready();
    } catch (const std::exception& e) {
      if (error.empty()) error = e.what();
    }
  }
};

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  GradSync* sync;
  int index;
  ReadyHook(GradSync* sync, int index) : sync(sync), index(index) {}
  void operator()(const torch::autograd::Variable&) override { sync->ready(index); }
};
}  // namespace

extern "C" {

// A GradSync over the `n` parameters (leaf tensors that require grad): parameter i goes
// into bucket bucket_of[i] (of `buckets`), buckets filled in reverse parameter order (the
// order backward reaches them). The buckets are plumb_core::dist::data_parallel's.
int plumb_dist_grad_sync_new(void* group, void* const* raw, int n, const int* bucket_of, int buckets, void** out) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    auto sync = std::make_unique<GradSync>();
    sync->backend = g.backend;
    sync->nccl = g.nccl;
    sync->size = g.size;
    sync->params = tensors(raw, n);
    sync->bucket_of.assign(bucket_of, bucket_of + n);
    sync->buckets.resize(buckets);
    for (int i = n - 1; i >= 0; --i) {
      const auto& p = sync->params[i];
      TORCH_CHECK(p.is_leaf() && p.requires_grad(), "parameter ", i, " is not a leaf that requires grad");
      TORCH_CHECK(bucket_of[i] >= 0 && bucket_of[i] < buckets, "parameter ", i, " has no bucket");
      sync->buckets[bucket_of[i]].push_back(i);
    }
    sync->flat.resize(sync->buckets.size());
    sync->work.resize(sync->buckets.size());
    sync->waiting.assign(sync->buckets.size(), 0);
    for (int i = 0; i < n; ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(sync->params[i], std::make_unique<ReadyHook>(sync.get(), i));
    }
    *out = sync.release();
  });
}

// Removes the hooks and frees the GradSync.
void plumb_dist_grad_sync_free(void* raw) {
  auto* sync = static_cast<GradSync*>(raw);
  for (auto& p : sync->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  delete sync;
}

// Arms the next backward: its accumulated gradients are all-reduced as they are ready.
int plumb_dist_grad_sync_arm(void* raw) {
  return guarded([&] {
    auto& sync = *static_cast<GradSync*>(raw);
    std::lock_guard<std::mutex> lock(sync.mutex);
    TORCH_CHECK(!sync.armed, "gradient sync armed twice without finishing");
    for (size_t b = 0; b < sync.buckets.size(); ++b) {
      sync.waiting[b] = static_cast<int>(sync.buckets[b].size());
      sync.flat[b] = at::Tensor();
      sync.work[b].reset();
    }
    sync.counted.assign(sync.params.size(), false);
    sync.twice = false;
    sync.next = 0;
    sync.error.clear();
    sync.armed = true;
  });
}

// After the armed backward: starts the buckets it did not reach, waits for all, and
// replaces each gradient with its average over the ranks (a parameter without a gradient
// on this rank keeps none). `overlapped` receives how many buckets started during backward.
int plumb_dist_grad_sync_finish(void* raw, int* overlapped) {
  auto& sync = *static_cast<GradSync*>(raw);
  int code = guarded([&] {
    std::lock_guard<std::mutex> lock(sync.mutex);
    TORCH_CHECK(sync.armed, "gradient sync finished without being armed");
    sync.armed = false;
    TORCH_CHECK(sync.error.empty(), sync.error);
    *overlapped = static_cast<int>(sync.next);
    if (sync.twice) {
      // Let the early starts complete (every rank issued them), then start again from the
      // whole gradients.
      for (size_t b = 0; b < sync.next; ++b) finish(sync.work[b]);
      sync.next = 0;
      *overlapped = 0;
    }
    while (sync.next < sync.buckets.size()) sync.start(sync.next++);
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < sync.buckets.size(); ++b) {
      finish(sync.work[b]);
      sync.flat[b].div_(sync.size);
      int64_t offset = 0;
      for (int i : sync.buckets[b]) {
        auto& p = sync.params[i];
        auto g = p.mutable_grad();
        if (g.defined()) g.copy_(sync.flat[b].narrow(0, offset, p.numel()).view_as(g));
        offset += p.numel();
      }
      sync.flat[b] = at::Tensor();
      sync.work[b].reset();
    }
  });
  // As in run_on: after a failure, NCCL work queued for a peer may never finish.
  if (code != 0 && sync.nccl) sync.nccl->failed = true;
  return code;
}

}  // extern "C"
