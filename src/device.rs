//! Devices and dtypes named on the command line.
use plumb_core::device::DeviceSpec;
use plumb_core::tch::{Device, Kind};

use crate::Failure;

/// `auto` (CUDA when libtorch sees a GPU), `cpu`, `cuda`, `cuda:N`.
pub fn resolve_device(text: &str) -> Result<Device, Failure> {
    text.parse::<DeviceSpec>().and_then(DeviceSpec::resolve).map_err(|e| Failure::User(format!("--device: {e}")))
}

/// `float32`, `bfloat16`, `float16` (or fp32/bf16/fp16); default float32 on CPU, bfloat16
/// on CUDA. Written back with [`plumb_core::device::dtype_name`].
pub fn parse_dtype(text: Option<&str>, device: Device) -> Result<Kind, Failure> {
    match text {
        None if device.is_cuda() => Ok(Kind::BFloat16),
        None => Ok(Kind::Float),
        Some(text) => plumb_core::device::parse_dtype(text).map_err(|e| Failure::User(format!("--dtype: {e}"))),
    }
}
