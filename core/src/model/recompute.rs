//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
//! Cost", arXiv:1604.06174): a transformer block's forward pass runs without recording its
//! intermediate activations, keeping only its input; the backward pass runs the block again
//! (with gradients) and back-propagates through that. Memory for activations falls from
//! everything each block makes (attention scores, the MLP's wide hidden layer, norms) to
//! one (B, T, C) tensor per block, for about one more forward pass of compute.
//!
//! tch has no custom autograd function, so the autograd node lives in plumb's C++ shim
//! (`core/csrc/checkpoint.cpp`, torch.utils.checkpoint's reentrant variant); it calls the
//! block back here, through [`checkpoint`]. A model's forward loop stays one loop:
//!
//! ```ignore
//! for layer in &self.layers {                    // layers: Vec<recompute::Shared<Block>>
//!     x = if recompute::wanted() {
//!         let (layer, mask) = (layer.clone(), mask.shallow_clone());
//!         recompute::checkpoint(&[&x], move |x| layer.forward(&x[0], &mask))?
//!     } else {
//!         layer.forward(&x, &mask)?
//!     };
//! }
//! ```
//!
//! The switch is per thread, like autocast: [`enable`] turns it on for as long as its guard
//! lives (a stage's [`crate::train::Trainer`] does, when the recipe says
//! `activation_checkpointing: true`), and it only acts while autograd records gradients,
//! never in evaluation, rollouts or generation.
//!
//! The recomputation must compute what the forward pass computed. The shim replays
//! libtorch's random generator and autocast state; LoRA's dropout, which draws from a
//! counter of its own, goes through [`draw`]: the forward pass records the draws, the
//! recomputation gets the same ones back. The model must not change between the two
//! (no weight updates, no adapters switched off) — which a training step never does.
use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::mem::ManuallyDrop;
use std::os::raw::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tch::Tensor;

use crate::error::{Error, Result};

type BlockFn = unsafe extern "C" fn(
    block: *mut c_void,
    phase: c_int,
    inputs: *const *mut c_void,
    n: c_int,
    output: *mut *mut c_void,
    message: *mut c_char,
    capacity: usize,
) -> c_int;
type FreeFn = unsafe extern "C" fn(block: *mut c_void);

extern "C" {
    fn plumb_checkpoint(
        inputs: *const *mut c_void,
        n: c_int,
        context: *mut c_void,
        run: BlockFn,
        free: FreeFn,
        output: *mut *mut c_void,
    ) -> c_int;
    fn plumb_checkpoint_last_error() -> *const c_char;
}

thread_local! {
    /// The switch: on while an [`Enabled`] guard says so.
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// The checkpointed block running on this thread, if any.
    static SEGMENT: RefCell<Option<Segment>> = const { RefCell::new(None) };
}

/// Recomputations run so far, in every thread (see [`recomputed_blocks`]).
static RECOMPUTED: AtomicU64 = AtomicU64::new(0);

/// How many checkpointed blocks this process has recomputed in backward passes.
pub fn recomputed_blocks() -> u64 {
    RECOMPUTED.load(Ordering::Relaxed)
}

/// A checkpointed block at work on this thread: its forward pass, recording the random
/// draws it makes, or its recomputation, handing them back.
enum Segment {
    Record(Vec<u64>),
    Replay { draws: Vec<u64>, next: usize, diverged: bool },
}

/// Activation checkpointing on (or off) for this thread while this lives; the previous
/// setting comes back on drop.
#[must_use = "activation checkpointing is switched back when this is dropped"]
pub struct Enabled {
    was: bool,
}

impl Drop for Enabled {
    fn drop(&mut self) {
        ENABLED.set(self.was);
    }
}

/// Turns activation checkpointing `on` (or off) for this thread until the guard drops.
pub fn enable(on: bool) -> Enabled {
    Enabled { was: ENABLED.replace(on) }
}

/// Whether the switch is on for this thread.
pub fn enabled() -> bool {
    ENABLED.get()
}

/// Whether a model should checkpoint its blocks now: the switch is on, autograd records
/// gradients, and no checkpointed block is running already (segments do not nest).
pub fn wanted() -> bool {
    enabled() && grad_enabled() && SEGMENT.with_borrow(Option::is_none)
}

/// Whether this pass trains: autograd records gradients, or this is the forward pass of a
/// checkpointed block (run without recording; its recomputation will record). Layers that
/// act only in training (LoRA's dropout) ask this rather than the grad mode.
pub fn records_gradients() -> bool {
    grad_enabled() || SEGMENT.with_borrow(|s| matches!(s, Some(Segment::Record(_))))
}

/// Whether libtorch records gradients now (false under `no_grad`). tch does not expose
/// the query, so the mode is set and put back as it was.
pub fn grad_enabled() -> bool {
    // SAFETY: at_grad_set_enabled sets the thread's grad mode and returns the previous
    // one; setting it back at once leaves it unchanged.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// A random draw (`next()` makes one: a dropout mask's number) that the recomputation of
/// a checkpointed block sees again: recorded in the block's forward pass, handed back in
/// its recomputation; outside checkpointed blocks, simply `next()`.
pub fn draw(next: impl FnOnce() -> u64) -> u64 {
    SEGMENT.with_borrow_mut(|segment| match segment {
        None => next(),
        Some(Segment::Record(draws)) => {
            let value = next();
            draws.push(value);
            value
        }
        Some(Segment::Replay { draws, next: i, diverged }) => match draws.get(*i) {
            Some(&value) => {
                *i += 1;
                value
            }
            None => {
                *diverged = true;
                next()
            }
        },
    })
}

/// A model part (a transformer block) shared between the model and the closures of its
/// checkpointed calls, which live in the autograd graph until backward: an [`Arc`] that is
/// [`Send`] when the part is.
///
/// `Arc<T>` is `Send` only when `T` is also `Sync`, and tch's `Tensor` is not declared
/// `Sync`, though libtorch's tensors are safe to read from several threads (their
/// reference counts are atomic; PyTorch runs one module from many threads). A block only
/// reads its weights in a forward pass, so sharing one between a model moved to another
/// thread and a graph left behind is sound.
#[derive(Debug)]
pub struct Shared<T>(Arc<T>);

// SAFETY: see above: the only access a clone gives is `&T`, used to read weights.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(part: T) -> Self {
        Self(Arc::new(part))
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A checkpointed block: its inputs to its output.
type Block = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// What the shim calls back: the block and the draws of its forward pass.
struct Context {
    block: Box<Block>,
    draws: Mutex<Vec<u64>>,
}

/// Runs `block` on `inputs` as a checkpointed segment: its output now, its activations
/// recomputed in backward. `inputs` are every tensor the block reads that may need a
/// gradient and is not a parameter (the hidden states; an encoder's output for cross
/// attention); the block may capture its parameters and tensors that need no gradient
/// (masks, rotary tables). Parameters get their gradients (accumulated into `.grad`) when
/// the backward pass reaches the block, which is why it suits `backward()` and not
/// `run_backward` with chosen inputs.
///
/// The block must compute the same function when called again: it is called once now
/// (without gradients) and once per backward pass through its output.
pub fn checkpoint<F>(inputs: &[&Tensor], block: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + 'static,
{
    let context = Box::new(Context { block: Box::new(block), draws: Mutex::new(Vec::new()) });
    let pointers: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut output = std::ptr::null_mut();
    // SAFETY: the input pointers are alive for the call; the shim takes `context` in every
    // case and frees it through `free_block` once (when the autograd node goes, or at once);
    // on success it hands back a new at::Tensor for us to own.
    let code = unsafe {
        plumb_checkpoint(
            pointers.as_ptr(),
            pointers.len() as c_int,
            Box::into_raw(context) as *mut c_void,
            run_block,
            free_block,
            &mut output,
        )
    };
    if code != 0 {
        // SAFETY: the shim's thread-local, NUL-terminated message.
        let message = unsafe { CStr::from_ptr(plumb_checkpoint_last_error()) }.to_string_lossy().into_owned();
        return Err(Error::Other(message));
    }
    // SAFETY: a new at::Tensor from the shim, ours to own.
    Ok(unsafe { Tensor::from_ptr(output as *mut torch_sys::C_tensor) })
}

/// Puts the previous segment back when the block is done (or panicked).
struct SegmentGuard(Option<Option<Segment>>);

impl Drop for SegmentGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            SEGMENT.set(previous);
        }
    }
}

/// The shim's callback: runs the block of `context` on `n` inputs, in `phase` 0 (forward,
/// recording draws) or 1 (recomputation, replaying them). Never unwinds: a panic or an
/// error becomes a message and a non-zero return.
///
/// On CUDA, libtorch's engine runs backward (so the recomputation) on a device thread of
/// its own while the thread that called `backward` waits: the block never runs on two
/// threads at once.
unsafe extern "C" fn run_block(
    context: *mut c_void,
    phase: c_int,
    inputs: *const *mut c_void,
    n: c_int,
    output: *mut *mut c_void,
    message: *mut c_char,
    capacity: usize,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Tensor> {
        // SAFETY: `context` is the Box made in `checkpoint`, alive until `free_block`;
        // each input is a new at::Tensor the shim hands over.
        let context = unsafe { &*(context as *const Context) };
        let inputs: Vec<Tensor> =
            (0..n as usize).map(|i| unsafe { Tensor::from_ptr(*inputs.add(i) as *mut torch_sys::C_tensor) }).collect();
        let draws = |c: &Context| c.draws.lock().map(|d| d.clone()).unwrap_or_default();
        let segment = match phase {
            0 => Segment::Record(Vec::new()),
            _ => {
                RECOMPUTED.fetch_add(1, Ordering::Relaxed);
                Segment::Replay { draws: draws(context), next: 0, diverged: false }
            }
        };
        let mut guard = SegmentGuard(Some(SEGMENT.replace(Some(segment))));
        let result = (context.block)(&inputs);
        let finished = SEGMENT.replace(guard.0.take().unwrap_or_default());
        match finished {
            Some(Segment::Record(recorded)) => {
                if let Ok(mut d) = context.draws.lock() {
                    *d = recorded;
                }
            }
            Some(Segment::Replay { draws, next, diverged }) if diverged || next != draws.len() => {
                return Err(Error::Other(format!(
                    "the recomputed block did not draw the {} random numbers its forward pass drew: the model \
                     changed between the forward and the backward pass",
                    draws.len()
                )))
            }
            _ => {}
        }
        result
    }));
    let error = match result {
        Ok(Ok(tensor)) => {
            // SAFETY: `output` is the shim's slot; it takes the at::Tensor we leave undropped.
            unsafe { *output = ManuallyDrop::new(tensor).as_mut_ptr() as *mut c_void };
            return 0;
        }
        Ok(Err(e)) => e.to_string(),
        Err(panic) => match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
            (Some(s), _) => format!("panic: {s}"),
            (_, Some(s)) => format!("panic: {s}"),
            _ => "panic".to_string(),
        },
    };
    if capacity > 0 {
        let bytes = error.as_bytes();
        let len = bytes.len().min(capacity - 1);
        // SAFETY: `message` has room for `capacity` bytes; we write `len` + 1 of them.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), message as *mut u8, len);
            *message.add(len) = 0;
        }
    }
    1
}

/// The shim's destructor of a checkpointed block's context.
unsafe extern "C" fn free_block(context: *mut c_void) {
    // SAFETY: the Box made in `checkpoint`, freed once, by the shim.
    drop(unsafe { Box::from_raw(context as *mut Context) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bert::BertForMaskedLm;
    use crate::model::gpt2::Gpt2ForCausalLm;
    use crate::model::llama::LlamaForCausalLm;
    use crate::model::lora::{LoraConfig, Request, TargetModules, ALL_LINEAR};
    use crate::model::t5::T5ForConditionalGeneration;
    use crate::model::{self, Policy};
    use serde_json::json;
    use tch::{nn, Device, Kind};

    /// Two rows, the second left-padded: the mask reaches every block.
    fn batch() -> (Tensor, Tensor) {
        let ids = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 0, 0, 5, 3, 5, 8, 9, 7]).view([2, 8]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1]).view([2, 8]);
        (ids, mask)
    }

    /// A loss that weighs every logit differently, so no gradient is zero by symmetry.
    fn loss_of(logits: &Tensor) -> Tensor {
        let weights =
            Tensor::arange(logits.numel() as i64, (Kind::Float, Device::Cpu)).view(logits.size().as_slice()).sin();
        (logits.log_softmax(-1, Kind::Float) * weights).sum(Kind::Float)
    }

    /// The loss and the gradient of every variable of `vs` after `forward` and backward,
    /// checkpointed (`on`) or not; with `on`, checks that each of `blocks` blocks was recomputed.
    fn pass(vs: &nn::VarStore, on: bool, blocks: u64, forward: impl Fn() -> Tensor) -> (f64, Vec<(String, Tensor)>) {
        let _switch = enable(on);
        let before = recomputed_blocks();
        for mut var in vs.trainable_variables() {
            var.zero_grad();
        }
        let loss = loss_of(&forward());
        loss.backward();
        if on {
            assert!(recomputed_blocks() - before >= blocks, "every block was recomputed");
        }
        let mut grads: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).map(|(n, v)| (n, v.grad().copy())).collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (loss.double_value(&[]), grads)
    }

    /// Same loss, and every gradient defined in both or neither and equal to fp32 tolerance.
    fn assert_same(off: &(f64, Vec<(String, Tensor)>), on: &(f64, Vec<(String, Tensor)>)) {
        assert_eq!(off.0, on.0, "the loss");
        assert_eq!(off.1.len(), on.1.len());
        assert!(!off.1.is_empty());
        for ((name, a), (_, b)) in off.1.iter().zip(&on.1) {
            assert_eq!(a.defined(), b.defined(), "{name}");
            assert!(a.defined(), "{name} has a gradient");
            let scale = a.abs().max().double_value(&[]).max(1e-6);
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * scale, "{name}: gradients differ by {diff} (scale {scale})");
            // (A key bias gets none: softmax ignores a constant added to every score.)
            assert!(scale > 1e-6 || name.ends_with("key.bias"), "{name}: a gradient of zeros proves nothing");
        }
    }

    fn tiny_llama() -> LlamaForCausalLm {
        tch::manual_seed(0);
        let hf = serde_json::from_value(json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32
        }))
        .unwrap();
        LlamaForCausalLm::new(hf, Device::Cpu).unwrap()
    }

    #[test]
    fn llama_gradients_are_the_same_with_checkpointing() {
        let (ids, mask) = batch();
        let model = tiny_llama();
        let forward = || model.logits(&ids, Some(&mask)).unwrap();
        let off = pass(model.var_store(), false, 0, forward);
        let on = pass(model.var_store(), true, 3, forward);
        assert_same(&off, &on);
        // Evaluation (no gradients) never checkpoints: the switch changes nothing there.
        let _switch = enable(true);
        assert!(!tch::no_grad(wanted));
    }

    #[test]
    fn gpt2_gradients_are_the_same_with_checkpointing() {
        let (ids, mask) = batch();
        tch::manual_seed(0);
        let hf = serde_json::from_value(
            json!({"vocab_size": 40, "n_embd": 16, "n_layer": 3, "n_head": 4, "n_positions": 32}),
        )
        .unwrap();
        let model = Gpt2ForCausalLm::new(hf, Device::Cpu).unwrap();
        let forward = || model.logits(&ids, Some(&mask)).unwrap();
        let off = pass(model.var_store(), false, 0, forward);
        let on = pass(model.var_store(), true, 3, forward);
        assert_same(&off, &on);
    }

    #[test]
    fn bert_and_t5_gradients_are_the_same_with_checkpointing() {
        let (ids, mask) = batch();
        tch::manual_seed(0);
        let hf = serde_json::from_value(json!({
            "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 24, "max_position_embeddings": 32
        }))
        .unwrap();
        let bert = BertForMaskedLm::new(hf, Device::Cpu).unwrap();
        let forward = || bert.forward(&ids, Some(&mask)).unwrap();
        assert_same(&pass(bert.var_store(), false, 0, forward), &pass(bert.var_store(), true, 2, forward));

        tch::manual_seed(0);
        let hf = serde_json::from_value(json!({
            "vocab_size": 40, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_decoder_layers": 3,
            "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
            "feed_forward_proj": "gated-gelu"
        }))
        .unwrap();
        let t5 = T5ForConditionalGeneration::new(hf, Device::Cpu).unwrap();
        let target = ids.narrow(1, 0, 5);
        // The decoder's blocks take the encoder's output and the position bias as inputs:
        // their gradients flow back through the checkpointed blocks into the encoder.
        let forward = || t5.forward(&ids, Some(&mask), &target, None).unwrap();
        assert_same(&pass(t5.var_store(), false, 0, forward), &pass(t5.var_store(), true, 5, forward));
    }

    /// LoRA adapters on every linear layer, with dropout: the recomputation draws the
    /// forward pass's masks again, and the dropout counter advances as without
    /// checkpointing (a second pass gets the same new masks both ways).
    #[test]
    fn lora_gradients_with_dropout_are_the_same_with_checkpointing() {
        let dir = tempfile::tempdir().unwrap();
        tiny_llama().save(dir.path()).unwrap();
        let config =
            LoraConfig { rank: 4, alpha: 8.0, dropout: 0.3, target_modules: TargetModules::Keyword(ALL_LINEAR.into()) };
        let load = || {
            let request = Request::New { config: &config, seed: 7 };
            model::load_with(dir.path(), Device::Cpu, Kind::Float, Some(&request)).unwrap()
        };
        let (plain, checkpointed) = (load(), load());
        // The same adapters in both, copied rather than drawn twice from libtorch's global
        // generator (tests in other threads draw from it too); B nonzero so A gets gradients.
        tch::no_grad(|| {
            let copies = checkpointed.trainable().variables();
            for (name, mut var) in plain.trainable().variables() {
                if name.ends_with("lora_B.weight") {
                    let n = var.numel() as i64;
                    let values = Tensor::arange(n, (Kind::Float, Device::Cpu)).sin().view(var.size().as_slice()) * 0.5;
                    var.copy_(&values);
                }
                copies[&name].shallow_clone().copy_(&var);
            }
        });
        let (ids, mask) = batch();
        for _ in 0..2 {
            let off = pass(plain.trainable(), false, 0, || plain.logits(&ids, Some(&mask)).unwrap());
            let on = pass(checkpointed.trainable(), true, 3, || checkpointed.logits(&ids, Some(&mask)).unwrap());
            assert_same(&off, &on);
        }
        // The base model is frozen: the first block's input needs no gradient, and its
        // adapters still get theirs (checked above); the base gets none.
        assert!(checkpointed.var_store().variables().values().all(|v| !v.requires_grad() && !v.grad().defined()));
    }

    #[test]
    fn a_block_that_fails_is_an_error_not_a_crash() {
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let message = checkpoint(&[&x], |_| Err(Error::Other("the block said no".into()))).err().unwrap().to_string();
        assert!(message.ends_with("the block said no"), "{message}");
        let message = checkpoint(&[&x], |_| panic!("a panicking block")).err().unwrap().to_string();
        assert!(message.contains("panic: a panicking block"), "{message}");
        let y = checkpoint(&[&x], |x| Ok(&x[0] * 2.0)).unwrap();
        y.sum(Kind::Float).backward();
        assert_eq!(x.grad(), Tensor::full([2, 3], 2.0, (Kind::Float, Device::Cpu)));
    }
}
