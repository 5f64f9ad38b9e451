//! Devices and dtypes named on the command line.
use plumb_core::device::DeviceSpec;
use plumb_core::tch::{Device, Kind};

use crate::Failure;

/// `auto` (CUDA when libtorch sees a GPU), `cpu`, `cuda`, `cuda:N`.
pub fn resolve_device(text: &str) -> Result<Device, Failure> {
    text.parse::<DeviceSpec>().and_then(DeviceSpec::resolve).map_err(|e| Failure::User(format!("--device: {e}")))
}

/// `float32`, `bfloat16`, `float16` (or f32/bf16/f16); default fp32 on CPU, bf16 on CUDA.
pub fn parse_dtype(text: Option<&str>, device: Device) -> Result<Kind, Failure> {
    match text {
        None if device.is_cuda() => Ok(Kind::BFloat16),
        None => Ok(Kind::Float),
        Some("float32" | "f32" | "fp32") => Ok(Kind::Float),
        Some("bfloat16" | "bf16") => Ok(Kind::BFloat16),
        Some("float16" | "f16" | "fp16") => Ok(Kind::Half),
        Some(other) => {
            Err(Failure::User(format!("--dtype: unknown dtype `{other}`; expected float32, bfloat16 or float16")))
        }
    }
}
