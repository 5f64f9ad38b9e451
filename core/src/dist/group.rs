//! The run's TCPStore and Gloo process groups over it (`core/csrc/dist.cpp`): c10d's own
//! collectives on `tch` tensors, each a blocking call that returns once this rank's part is
//! done, or an error (a peer missing past the timeout, a closed connection, a bad tensor).
//!
//! A group can have NCCL attached for one CUDA device ([`ProcessGroup::attach_nccl`]), as
//! torch.distributed's default `cuda:nccl,cpu:gloo` group has: its collectives on CUDA
//! tensors then go through NCCL, those on CPU tensors still through Gloo. An NCCL collective
//! returns once it is queued on NCCL's stream with the current stream waiting for it: what is
//! queued on the device after it sees its result, and reading the result waits for it.
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::time::Duration;

use tch::{Device, Tensor};

use super::heartbeat::Heartbeat;
use super::{DistError, Rendezvous};

extern "C" {
    fn plumb_dist_last_error() -> *const c_char;
    fn plumb_dist_store_new(
        host: *const c_char,
        port: c_int,
        serve: bool,
        workers: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn plumb_dist_store_free(store: *mut c_void);
    fn plumb_dist_store_add(store: *mut c_void, key: *const c_char, delta: i64, out: *mut i64) -> c_int;
    fn plumb_dist_store_counters(store: *mut c_void, keys: *const *const c_char, n: c_int, out: *mut i64) -> c_int;
    fn plumb_dist_gloo_new(
        store: *mut c_void,
        prefix: *const c_char,
        master: *const c_char,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn plumb_dist_free(group: *mut c_void);
    fn plumb_dist_nccl_attach(group: *mut c_void, prefix: *const c_char, device: c_int, timeout_ms: i64) -> c_int;
    fn plumb_dist_uses_nccl(group: *mut c_void, tensor: *mut c_void) -> c_int;
    fn plumb_dist_all_reduce(group: *mut c_void, tensors: *const *mut c_void, n: c_int, op: c_int) -> c_int;
    fn plumb_dist_broadcast(group: *mut c_void, tensors: *const *mut c_void, n: c_int, root: c_int) -> c_int;
    fn plumb_dist_all_gather(group: *mut c_void, outputs: *const *mut c_void, input: *mut c_void) -> c_int;
    fn plumb_dist_reduce_scatter(
        group: *mut c_void,
        output: *mut c_void,
        inputs: *const *mut c_void,
        op: c_int,
    ) -> c_int;
    fn plumb_dist_barrier(group: *mut c_void) -> c_int;
    fn plumb_dist_grad_sync_new(
        group: *mut c_void,
        parameters: *const *mut c_void,
        n: c_int,
        bucket_of: *const c_int,
        buckets: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn plumb_dist_grad_sync_free(sync: *mut c_void);
    fn plumb_dist_grad_sync_arm(sync: *mut c_void) -> c_int;
    fn plumb_dist_grad_sync_finish(sync: *mut c_void, overlapped: *mut c_int) -> c_int;
}

/// The C++ message of the last failed `plumb_dist_*` call on this thread.
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    unsafe { CStr::from_ptr(plumb_dist_last_error()) }.to_string_lossy().into_owned()
}

fn c_string(text: &str, what: &str) -> Result<CString, DistError> {
    CString::new(text).map_err(|_| DistError::Invalid(format!("{what} {text:?} contains a NUL byte")))
}

fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

/// How a collective combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size (Gloo has no average of its own).
    Avg,
    Max,
    Min,
}

impl ReduceOp {
    fn code(self) -> c_int {
        match self {
            Self::Sum => 0,
            Self::Avg => 1,
            Self::Max => 2,
            Self::Min => 3,
        }
    }
}

/// A connection to the run's TCPStore, the key-value server on rank 0 that ranks meet through.
pub struct Store {
    raw: *mut c_void,
    address: String,
}

// SAFETY: c10d's TCPStore is used from several threads by PyTorch itself; the handle is
// freed once, by Drop.
unsafe impl Send for Store {}

impl Store {
    /// Rank 0 serves the store at the rendezvous address and waits until all ranks have
    /// connected; the others connect to it. Either fails after the rendezvous timeout.
    /// Under torchrun's agent store every rank connects to the store torchrun serves.
    pub fn rendezvous(rendezvous: &Rendezvous) -> Result<Self, DistError> {
        let serve = rendezvous.rank == 0 && rendezvous.agent_store.is_none();
        Self::open(rendezvous, serve, rendezvous.world_size)
    }

    /// Connects to a store another part of this run already serves (no waiting for the others).
    pub fn connect(rendezvous: &Rendezvous) -> Result<Self, DistError> {
        Self::open(rendezvous, false, 0)
    }

    fn open(rendezvous: &Rendezvous, serve: bool, workers: usize) -> Result<Self, DistError> {
        let host = c_string(&rendezvous.master_addr, "MASTER_ADDR")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `host` is NUL-terminated and outlives the call; `raw` receives a new handle.
        let code = unsafe {
            plumb_dist_store_new(
                host.as_ptr(),
                c_int::from(rendezvous.master_port),
                serve,
                workers as c_int,
                millis(rendezvous.timeout),
                &mut raw,
            )
        };
        if code != 0 {
            return Err(join_error(rendezvous, rendezvous.address()));
        }
        Ok(Self { raw, address: rendezvous.address() })
    }

    /// Adds `delta` to the counter at `key` (created at 0); its new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, DistError> {
        let name = c_string(key, "store key")?;
        let mut value = 0;
        // SAFETY: `raw` is a live store; `name` outlives the call; `value` receives the count.
        let code = unsafe { plumb_dist_store_add(self.raw, name.as_ptr(), delta, &mut value) };
        self.result(code, value)
    }

    /// The counters at `keys` (each made by [`add`](Self::add)), in one round trip.
    pub fn counters(&self, keys: &[String]) -> Result<Vec<i64>, DistError> {
        let names = keys.iter().map(|k| c_string(k, "store key")).collect::<Result<Vec<_>, _>>()?;
        let pointers: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let mut values = vec![0i64; keys.len()];
        // SAFETY: `raw` is a live store; the names outlive the call; `values` has a slot per key.
        let code =
            unsafe { plumb_dist_store_counters(self.raw, pointers.as_ptr(), keys.len() as c_int, values.as_mut_ptr()) };
        self.result(code, values)
    }

    fn result<T>(&self, code: c_int, value: T) -> Result<T, DistError> {
        if code == 0 {
            return Ok(value);
        }
        Err(DistError::Invalid(format!("the store at {}: {}", self.address, last_error())))
    }
}

/// The error of a failed join of `rendezvous` at `address`, with the shim's message.
fn join_error(rendezvous: &Rendezvous, address: String) -> DistError {
    DistError::Join {
        rank: rendezvous.rank,
        world_size: rendezvous.world_size,
        address,
        timeout: rendezvous.timeout,
        message: last_error(),
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `raw` came from plumb_dist_store_new and is freed once.
        unsafe { plumb_dist_store_free(self.raw) }
    }
}

/// The c10d backend a collective runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors, and CUDA tensors (through host copies) in a group without NCCL.
    Gloo,
    /// CUDA tensors in a group with NCCL attached.
    Nccl,
}

impl Backend {
    /// `gloo` or `nccl`, as torch.distributed names them.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gloo => "gloo",
            Self::Nccl => "nccl",
        }
    }
}

/// A process group: the ranks of a run, and the collectives among them, on Gloo and, once
/// attached ([`attach_nccl`](Self::attach_nccl)), on NCCL for CUDA tensors. Every rank must
/// call the same collectives in the same order with tensors of the same shapes, dtypes and
/// kinds of device; tensors must be dense and contiguous.
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world_size: usize,
    /// How long a collective waits for a peer (NCCL's watchdog timeout too).
    timeout: Duration,
    /// The CUDA device NCCL is attached for.
    nccl: Option<Device>,
    /// Names the rank that stopped when a collective fails (none in a world of one).
    heartbeat: Option<Heartbeat>,
}

// SAFETY: c10d's process groups are thread-safe (PyTorch calls them from any thread); the
// handle is freed once, by Drop. Not Sync: collectives issued from two threads at once could
// reach the ranks in different orders.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group the rendezvous describes: its store (rank 0 serves it) and a Gloo
    /// group over it. What a process that owns the whole run calls once.
    pub fn join(rendezvous: &Rendezvous) -> Result<Self, DistError> {
        let store = Store::rendezvous(rendezvous)?;
        Self::gloo(&store, "default", rendezvous)
    }

    /// A Gloo group of the rendezvous's ranks over `store`, its keys under `prefix`: every
    /// rank passes the same prefix, and each group of a run has a prefix of its own. Each
    /// rank's heartbeat ([`Heartbeat`]) runs over a connection of its own.
    pub fn gloo(store: &Store, prefix: &str, rendezvous: &Rendezvous) -> Result<Self, DistError> {
        let (rank, world_size) = (rendezvous.rank, rendezvous.world_size);
        let keys = format!("{}{prefix}/", rendezvous.key_prefix());
        let beating = if world_size > 1 {
            let connection = Store::connect(rendezvous)?;
            Heartbeat::first_beat(&connection, &keys, rank)?;
            Some(connection)
        } else {
            None
        };
        let prefix = c_string(&keys, "group prefix")?;
        let master = c_string(&rendezvous.master_addr, "MASTER_ADDR")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `store.raw` is a live store (the group takes
        // its own reference); `raw` receives a new handle.
        let code = unsafe {
            plumb_dist_gloo_new(
                store.raw,
                prefix.as_ptr(),
                master.as_ptr(),
                rank as c_int,
                world_size as c_int,
                millis(rendezvous.timeout),
                &mut raw,
            )
        };
        if code != 0 {
            return Err(join_error(rendezvous, store.address.clone()));
        }
        // Every rank has beaten once: the group's rendezvous needed them all.
        let store_owner = if rendezvous.agent_store.is_some() { "torchrun's agent" } else { "rank 0" };
        let heartbeat = beating.map(|c| Heartbeat::watch(c, &keys, rank, world_size, store_owner));
        Ok(Self { raw, rank, world_size, timeout: rendezvous.timeout, nccl: None, heartbeat })
    }

    /// Attaches NCCL for this rank's CUDA `device`: from then on the group's collectives on
    /// CUDA tensors (and [`GradientSync`]s made after) go through NCCL, those on CPU tensors
    /// through Gloo; [`barrier`](Self::barrier) stays on Gloo. Every rank attaches at the same
    /// point among its collectives, each with a GPU of its own (NCCL refuses two ranks on one
    /// GPU). NCCL connects here, so a failure shows here; afterwards NCCL's watchdog ends the
    /// process when a peer does not join a collective within the group's timeout (as in
    /// PyTorch: an NCCL collective does not return an error for a missing peer).
    ///
    /// Errors: `device` is not CUDA, libtorch does not see it, NCCL is already attached, plumb
    /// was built without CUDA's headers, or NCCL could not connect.
    pub fn attach_nccl(&mut self, device: Device) -> Result<(), DistError> {
        const OP: &str = "attaching NCCL";
        let index = match device {
            Device::Cuda(index) => index,
            other => {
                let message = format!("NCCL needs a CUDA device, not {}", crate::device::device_name(other));
                return Err(DistError::Collective { rank: self.rank, world_size: self.world_size, op: OP, message });
            }
        };
        let prefix = c_string("cuda", "NCCL prefix")?;
        // SAFETY: `raw` is a live group; `prefix` outlives the call.
        let code = unsafe { plumb_dist_nccl_attach(self.raw, prefix.as_ptr(), index as c_int, millis(self.timeout)) };
        self.check(code, OP)?;
        self.nccl = Some(device);
        Ok(())
    }

    /// The CUDA device NCCL is attached for, if it is.
    pub fn nccl_device(&self) -> Option<Device> {
        self.nccl
    }

    /// The backend this group's collectives on `tensor` (and tensors on its device) use.
    pub fn backend_for(&self, tensor: &Tensor) -> Backend {
        // SAFETY: `raw` is a live group; the tensor is live for the call.
        match unsafe { plumb_dist_uses_nccl(self.raw, tensor.as_ptr() as *mut c_void) } {
            0 => Backend::Gloo,
            _ => Backend::Nccl,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn check(&self, code: c_int, op: &'static str) -> Result<(), DistError> {
        if code == 0 {
            return Ok(());
        }
        let mut message = last_error();
        if let Some(heartbeat) = &self.heartbeat {
            message.push_str(&heartbeat.diagnosis());
        }
        Err(DistError::Collective { rank: self.rank, world_size: self.world_size, op, message })
    }

    fn expect_world(&self, op: &'static str, count: usize, what: &str) -> Result<(), DistError> {
        if count == self.world_size {
            return Ok(());
        }
        Err(DistError::Collective {
            rank: self.rank,
            world_size: self.world_size,
            op,
            message: format!("{count} {what} for a world of {}", self.world_size),
        })
    }

    /// Reduces each tensor in place across the ranks: afterwards every rank holds the result.
    pub fn all_reduce(&self, tensors: &[Tensor], op: ReduceOp) -> Result<(), DistError> {
        let raw = pointers(tensors);
        // SAFETY: `raw` points at live tensors for the duration of the call.
        self.check(
            unsafe { plumb_dist_all_reduce(self.raw, raw.as_ptr(), raw.len() as c_int, op.code()) },
            "all-reduce",
        )
    }

    /// Overwrites each tensor with rank `root`'s.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        let raw = pointers(tensors);
        // SAFETY: `raw` points at live tensors for the duration of the call.
        self.check(
            unsafe { plumb_dist_broadcast(self.raw, raw.as_ptr(), raw.len() as c_int, root as c_int) },
            "broadcast",
        )
    }

    /// `outputs[r]` receives rank r's `input`: one tensor per rank, shaped like `input`, on
    /// its device.
    pub fn all_gather_into(&self, outputs: &[Tensor], input: &Tensor) -> Result<(), DistError> {
        self.expect_world("all-gather", outputs.len(), "output tensors")?;
        let raw = pointers(outputs);
        // SAFETY: the tensors are live for the duration of the call; there are world-size outputs.
        self.check(
            unsafe { plumb_dist_all_gather(self.raw, raw.as_ptr(), input.as_ptr() as *mut c_void) },
            "all-gather",
        )
    }

    /// Every rank's `input`, in rank order.
    pub fn all_gather(&self, input: &Tensor) -> Result<Vec<Tensor>, DistError> {
        let outputs: Vec<Tensor> = (0..self.world_size).map(|_| input.empty_like()).collect();
        self.all_gather_into(&outputs, input)?;
        Ok(outputs)
    }

    /// `output` receives the reduction over the ranks of each rank's `inputs[my rank]`:
    /// `inputs` has one tensor per rank, each shaped like `output`, on its device.
    pub fn reduce_scatter(&self, output: &Tensor, inputs: &[Tensor], op: ReduceOp) -> Result<(), DistError> {
        self.expect_world("reduce-scatter", inputs.len(), "input tensors")?;
        let raw = pointers(inputs);
        // SAFETY: the tensors are live for the duration of the call; there are world-size inputs.
        self.check(
            unsafe { plumb_dist_reduce_scatter(self.raw, output.as_ptr() as *mut c_void, raw.as_ptr(), op.code()) },
            "reduce-scatter",
        )
    }

    /// Returns once every rank has reached it (on Gloo, with or without NCCL: it orders the
    /// ranks' host code, not NCCL work queued on a GPU).
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: `raw` is a live group.
        self.check(unsafe { plumb_dist_barrier(self.raw) }, "barrier")
    }
}

/// Gradients averaged over the ranks while backward runs (as DistributedDataParallel does):
/// hooks on the parameters start each bucket's all-reduce as soon as backward has
/// accumulated all of its gradients, so communication overlaps the rest of backward. Buckets
/// are formed in reverse parameter order (the order backward reaches them) and start
/// strictly in order, so every rank issues the same collectives.
///
/// [`arm`](Self::arm) before the backward that ends the accumulation (the earlier ones only
/// accumulate), then [`finish`](Self::finish) after it: it starts what backward did not
/// reach (parameters without a gradient take part with zeros and keep none), waits, and
/// leaves each gradient its mean over the ranks. Buckets of CUDA parameters go through NCCL
/// when the group had it attached when the sync was made.
pub struct GradientSync {
    raw: *mut c_void,
    armed: bool,
    buckets: usize,
}

// SAFETY: the C++ object guards its state with a mutex (its hooks run on autograd's thread);
// the handle is freed once, by Drop.
unsafe impl Send for GradientSync {}

impl ProcessGroup {
    /// A [`GradientSync`] over `parameters` (leaves that require grad) in the buckets
    /// [`data_parallel`](super::data_parallel) makes of them in reverse order, of at most
    /// `bucket_bytes` each. The parameters keep its hooks until it is dropped.
    pub fn gradient_sync(&self, parameters: &[&Tensor], bucket_bytes: usize) -> Result<GradientSync, DistError> {
        let reversed: Vec<&Tensor> = parameters.iter().rev().copied().collect();
        let sizes: Vec<usize> = super::data_parallel::buckets(&reversed, bucket_bytes).iter().map(Vec::len).collect();
        // Parameter i is the (n - 1 - i)-th of the reversed order.
        let mut bucket_of: Vec<c_int> =
            sizes.iter().enumerate().flat_map(|(b, &len)| std::iter::repeat_n(b as c_int, len)).collect();
        bucket_of.reverse();
        let raw = parameters.iter().map(|t| t.as_ptr() as *mut c_void).collect::<Vec<_>>();
        let mut sync = std::ptr::null_mut();
        // SAFETY: `raw` points at live tensors for the call (the C++ side keeps its own
        // references), `bucket_of` holds a bucket below `sizes.len()` for each; `sync`
        // receives a new handle.
        let code = unsafe {
            plumb_dist_grad_sync_new(
                self.raw,
                raw.as_ptr(),
                raw.len() as c_int,
                bucket_of.as_ptr(),
                sizes.len() as c_int,
                &mut sync,
            )
        };
        self.check(code, "gradient sync")?;
        Ok(GradientSync { raw: sync, armed: false, buckets: sizes.len() })
    }
}

impl GradientSync {
    /// The next backward's gradients start their all-reduce as backward accumulates them.
    pub fn arm(&mut self) -> Result<(), DistError> {
        if self.armed {
            return Ok(());
        }
        // SAFETY: `raw` is a live GradientSync.
        if unsafe { plumb_dist_grad_sync_arm(self.raw) } != 0 {
            return Err(DistError::Invalid(format!("arming the gradient all-reduce: {}", last_error())));
        }
        self.armed = true;
        Ok(())
    }

    /// Ends the armed backward's all-reduce (arming first if nothing did: then every bucket
    /// starts here) and averages the gradients. Returns how many of the buckets started
    /// during backward.
    pub fn finish(&mut self, group: &ProcessGroup) -> Result<usize, DistError> {
        self.arm()?;
        self.armed = false;
        let mut overlapped: c_int = 0;
        // SAFETY: `raw` is a live, armed GradientSync; `overlapped` receives a count.
        let code = unsafe { plumb_dist_grad_sync_finish(self.raw, &mut overlapped) };
        group.check(code, "all-reduce")?;
        Ok(overlapped.max(0) as usize)
    }

    /// How many buckets the gradients are reduced in.
    pub fn buckets(&self) -> usize {
        self.buckets
    }
}

impl Drop for GradientSync {
    fn drop(&mut self) {
        // SAFETY: `raw` came from plumb_dist_grad_sync_new and is freed once (it removes its hooks).
        unsafe { plumb_dist_grad_sync_free(self.raw) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.heartbeat = None;
        // SAFETY: `raw` came from plumb_dist_gloo_new and is freed once.
        unsafe { plumb_dist_free(self.raw) }
    }
}

/// The `at::Tensor` objects behind tch's tensors, as the shim takes them.
fn pointers(tensors: &[Tensor]) -> Vec<*mut c_void> {
    tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}
