//! Devices and dtypes named on the command line.
use plumb_core::tch::{Cuda, Device, Kind};

use crate::Failure;

/// `auto` (CUDA when libtorch sees a GPU), `cpu`, `cuda`, `cuda:N`.
pub fn resolve_device(text: &str) -> Result<Device, Failure> {
    let cuda = Cuda::device_count();
    let device = match text {
        "auto" if cuda > 0 => Device::Cuda(0),
        "auto" | "cpu" => Device::Cpu,
        other => plumb_core::context::parse_device(other).map_err(|e| Failure::User(format!("--device: {e}")))?,
    };
    if let Device::Cuda(n) = device {
        if n as i64 >= cuda {
            return Err(Failure::User(format!("--device asks for cuda:{n}, but libtorch sees {cuda} CUDA device(s)")));
        }
    }
    Ok(device)
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
