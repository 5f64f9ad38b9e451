//! The Rust side of plumb's C++ shim (`core/csrc/shim.cpp`): the libtorch calls tch 0.24
//! does not bind. Safe wrappers live with their users (`train::precision`, `optim::adamw`,
//! [`crate::cuda`]).
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};

use tch::Tensor;

use crate::error::{Error, Result};

extern "C" {
    fn plumb_shim_last_error() -> *const c_char;
    pub(crate) fn plumb_autocast_get(device: c_int, enabled: *mut bool, dtype: *mut c_int) -> c_int;
    pub(crate) fn plumb_autocast_set(device: c_int, enabled: bool, dtype: c_int) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plumb_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;
    pub(crate) fn plumb_clip_grad_norm(grads: *const *mut c_void, n: c_int, max_norm: f64, norm: *mut f64) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plumb_linear_cross_entropy(
        hidden: *mut c_void,
        weight: *mut c_void,
        targets: *mut c_void,
        chunk: i64,
        scale: f64,
        ignore_index: i64,
        with_entropy: bool,
        nll: *mut *mut c_void,
        entropy: *mut *mut c_void,
    ) -> c_int;
    #[cfg(test)]
    pub(crate) fn plumb_shim_parallel_threads(n: i64) -> c_int;
    pub(crate) fn plumb_rows_linear(
        x: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        out: *mut *mut c_void,
    ) -> c_int;
    pub(crate) fn plumb_decode_attention(
        query: *mut c_void,
        key: *mut c_void,
        value: *mut c_void,
        mask: *mut c_void,
        scale_or_zero: f64,
        out: *mut *mut c_void,
    ) -> c_int;
    pub(crate) fn plumb_rms_norm(x: *mut c_void, weight: *mut c_void, eps: f64, out: *mut *mut c_void) -> c_int;
    pub(crate) fn plumb_rope(x: *mut c_void, cos: *mut c_void, signed_sin: *mut c_void, out: *mut *mut c_void)
        -> c_int;
    pub(crate) fn plumb_swiglu(gate: *mut c_void, up: *mut c_void, out: *mut *mut c_void) -> c_int;
    pub(crate) fn plumb_inference_mode_enter() -> *mut c_void;
    pub(crate) fn plumb_inference_mode_exit(guard: *mut c_void);
    pub(crate) fn plumb_generator_new(device: c_int, index: c_int, seed: u64, out: *mut *mut c_void) -> c_int;
    pub(crate) fn plumb_generator_free(generator: *mut c_void);
    pub(crate) fn plumb_generator_uniform(generator: *mut c_void, tensor: *mut c_void) -> c_int;
    pub(crate) fn plumb_cuda_built() -> bool;
    pub(crate) fn plumb_cuda_graph_new(out: *mut *mut c_void) -> c_int;
    pub(crate) fn plumb_cuda_graph_free(graph: *mut c_void);
    pub(crate) fn plumb_cuda_graph_capture_begin(graph: *mut c_void, index: c_int) -> c_int;
    pub(crate) fn plumb_cuda_graph_capture_end(graph: *mut c_void) -> c_int;
    pub(crate) fn plumb_cuda_graph_replay(graph: *mut c_void) -> c_int;
    pub(crate) fn plumb_cuda_memory(index: c_int, allocated: *mut i64, peak: *mut i64, reserved: *mut i64) -> c_int;
    pub(crate) fn plumb_cuda_reset_peak_memory(index: c_int) -> c_int;
}

/// A shim call's status as a Result: on failure, the C++ exception's message after `what`.
pub(crate) fn check(code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    let message = unsafe { CStr::from_ptr(plumb_shim_last_error()) }.to_string_lossy().into_owned();
    Err(Error::Other(format!("{what}: {message}")))
}

/// The at::Tensor behind `t`, as a shim call borrows it for the call's length.
pub(crate) fn raw(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// The tensor a shim kernel made, when it took the case: on 1 the shim hands back a new
/// at::Tensor through the out pointer, which the Tensor returned owns (and frees);
/// otherwise it allocated nothing and the caller runs its fallback.
pub(crate) fn taken(call: impl FnOnce(*mut *mut c_void) -> c_int) -> Option<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: on 1, `out` was just allocated by the shim for us.
    (call(&mut out) == 1).then(|| unsafe { Tensor::from_ptr(out as _) })
}

/// Inference mode (`torch.inference_mode`) on this thread until dropped: autograd off and
/// cheaper dispatch than `no_grad`. Tensors made under it cannot enter autograd later, so
/// only code that hands back host values (generation) uses it. Not `Send`: it must end on
/// the thread it began on.
pub(crate) struct InferenceMode {
    raw: *mut c_void,
}

impl InferenceMode {
    pub(crate) fn enter() -> Self {
        // SAFETY: allocates a guard object; nothing can throw.
        Self { raw: unsafe { plumb_inference_mode_enter() } }
    }
}

impl Drop for InferenceMode {
    fn drop(&mut self) {
        // SAFETY: `raw` came from plumb_inference_mode_enter on this thread (the type is
        // not Send) and is freed once; guards drop innermost first.
        unsafe { plumb_inference_mode_exit(self.raw) }
    }
}
