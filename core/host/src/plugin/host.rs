//! The services the host offers a running plugin, as a C table ([`HostApi`]).
//!
//! Every callback catches panics on the host side too: a panic must not unwind
//! through the plugin's frames.
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::registry::RewardInstance;
use crate::log::progress::Progress;
use crate::log::tensorboard::{HParamValue, TbWriter};
use plumb_core::plugin::abi::{self, ByteSink, HostApi, ProgressUpdate, Status, StrRef};

/// The host's state behind one stage's [`HostApi`]. `Sync`: a plugin may call the
/// services from several threads at once (e.g. score two rewards concurrently).
pub struct HostServices<'a> {
    /// The plugin's name, for its log lines.
    pub plugin: String,
    /// `None` on the ranks of a distributed run other than 0: only rank 0 logs, and their
    /// progress and info lines are dropped too (warnings and errors still show).
    pub tensorboard: Option<&'a TbWriter>,
    pub progress: Mutex<Progress>,
    pub stop: Arc<AtomicBool>,
    /// Rewards named in the recipe, live inside their plugins.
    pub rewards: &'a BTreeMap<String, Mutex<RewardInstance>>,
}

// The services are reached through a shared reference from any thread.
const _: fn() = || {
    fn shared<T: Sync>() {}
    shared::<HostServices<'static>>();
};

impl HostServices<'_> {
    /// The C table pointing back at `self`; valid while `self` is.
    pub fn api(&self) -> HostApi {
        HostApi {
            abi_version: abi::ABI_VERSION,
            state: self as *const Self as *mut c_void,
            log_scalar,
            log_text,
            log_hparams,
            progress,
            log,
            should_stop,
            score,
            restart_at,
        }
    }
}

/// Runs a callback body on the host's state, swallowing (and logging) a panic.
fn with_state<R>(state: *mut c_void, fallback: R, body: impl FnOnce(&HostServices) -> R) -> R {
    // SAFETY: `state` is the `HostServices` that built this table, alive for the call.
    let Some(services) = (unsafe { (state as *const HostServices).as_ref() }) else {
        return fallback;
    };
    match catch_unwind(AssertUnwindSafe(|| body(services))) {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("a host service panicked while serving plugin `{}`", services.plugin);
            fallback
        }
    }
}

fn text(s: StrRef) -> String {
    // SAFETY: the plugin passes a valid slice for the duration of the call.
    unsafe { s.to_string_lossy() }
}

extern "C" fn log_scalar(state: *mut c_void, tag: StrRef, step: i64, value: f64) {
    with_state(state, (), |s| {
        if let Some(tb) = s.tensorboard {
            tb.scalar(&text(tag), step, value)
        }
    });
}

extern "C" fn log_text(state: *mut c_void, tag: StrRef, step: i64, body: StrRef) {
    with_state(state, (), |s| {
        if let Some(tb) = s.tensorboard {
            tb.text(&text(tag), step, &text(body))
        }
    });
}

extern "C" fn log_hparams(state: *mut c_void, json: StrRef) {
    with_state(state, (), |s| {
        let Some(tensorboard) = s.tensorboard else { return };
        #[derive(serde::Deserialize)]
        struct Request {
            hparams: serde_json::Map<String, serde_json::Value>,
            metrics: Vec<String>,
        }
        match serde_json::from_str::<Request>(&text(json)) {
            Ok(request) => {
                let hparams: Vec<(String, HParamValue)> = request
                    .hparams
                    .into_iter()
                    .map(|(k, v)| {
                        let value = match v {
                            serde_json::Value::Bool(b) => HParamValue::Bool(b),
                            serde_json::Value::Number(n) => HParamValue::Number(n.as_f64().unwrap_or(f64::NAN)),
                            serde_json::Value::String(t) => HParamValue::Text(t),
                            other => HParamValue::Text(other.to_string()),
                        };
                        (k, value)
                    })
                    .collect();
                tensorboard.hparams(&hparams, &request.metrics);
            }
            Err(e) => tracing::warn!("plugin `{}` sent malformed hparams: {e}", s.plugin),
        }
    });
}

extern "C" fn progress(state: *mut c_void, update: *const ProgressUpdate) {
    with_state(state, (), |s| {
        if s.tensorboard.is_none() {
            return;
        }
        // SAFETY: the plugin passes a valid pointer for the duration of the call.
        if let (Some(update), Ok(mut bar)) = (unsafe { update.as_ref() }, s.progress.lock()) {
            bar.update(update);
        }
    });
}

extern "C" fn log(state: *mut c_void, level: u32, message: StrRef) {
    with_state(state, (), |s| {
        if s.tensorboard.is_none() && level > abi::LOG_WARN {
            return;
        }
        let message = text(message);
        let plugin = &s.plugin;
        let bar = s.progress.lock().ok();
        let emit = || match level {
            abi::LOG_ERROR => tracing::error!(plugin = %plugin, "{message}"),
            abi::LOG_WARN => tracing::warn!(plugin = %plugin, "{message}"),
            abi::LOG_INFO => tracing::info!(plugin = %plugin, "{message}"),
            _ => tracing::debug!(plugin = %plugin, "{message}"),
        };
        // Keep the progress bar intact while a line is printed above it.
        match bar {
            Some(bar) => bar.suspend(emit),
            None => emit(),
        }
    });
}

extern "C" fn restart_at(state: *mut c_void, step: i64) {
    with_state(state, (), |s| {
        if let Some(tb) = s.tensorboard {
            tb.restart_at(step)
        }
    });
}

extern "C" fn should_stop(state: *mut c_void) -> u8 {
    with_state(state, 0, |s| u8::from(s.stop.load(Ordering::SeqCst)))
}

extern "C" fn score(state: *mut c_void, reward: StrRef, request: StrRef, out: ByteSink) -> i32 {
    with_state(state, Status::Failed as i32, |s| {
        let name = text(reward);
        // The plugin side prefixes "reward `<name>`: " to what is sent back.
        let Some(instance) = s.rewards.get(&name) else {
            let known: Vec<&str> = s.rewards.keys().map(String::as_str).collect();
            let defined = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
            out.send(format!("not defined in the recipe's `rewards:` (defined: {defined})").as_bytes());
            return Status::Failed as i32;
        };
        let Ok(mut instance) = instance.lock() else {
            out.send(b"the reward is unusable after an earlier panic");
            return Status::Failed as i32;
        };
        match instance.score_json(&text(request)) {
            Ok(bytes) => {
                out.send(&bytes);
                Status::Ok as i32
            }
            Err(e) => {
                out.send(e.to_string().as_bytes());
                Status::Failed as i32
            }
        }
    })
}
