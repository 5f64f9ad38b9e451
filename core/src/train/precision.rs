//! Mixed precision: `precision: bf16` runs the forward pass under libtorch's autocast in
//! bfloat16 while the weights, their gradients and the optimizer state stay fp32 (the
//! "master weights"), as `torch.autocast(device_type, dtype=torch.bfloat16)` does. tch 0.24
//! can toggle autocast but not choose its dtype (CUDA's default is fp16), so the switch goes
//! through plumb's C++ shim (`core/csrc/shim.cpp`).
use std::os::raw::c_int;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::shim::{self, plumb_autocast_get, plumb_autocast_set};

/// The numeric precision of the forward pass (`precision:` in a stage's recipe section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    Fp32,
    /// Forward under bf16 autocast; fp32 master weights, gradients and optimizer state.
    Bf16,
}

impl Precision {
    /// Runs `forward` (a forward pass and the loss; call `backward` outside) in this precision.
    pub fn forward<T>(self, device: Device, forward: impl FnOnce() -> T) -> Result<T> {
        match self {
            Precision::Fp32 => Ok(forward()),
            Precision::Bf16 => {
                let _autocast = Autocast::enable(device, Kind::BFloat16)?;
                Ok(forward())
            }
        }
    }
}

/// Autocast switched on for a device; the previous state comes back on drop.
pub struct Autocast {
    device: c_int,
    previous: (bool, c_int),
}

/// c10::ScalarType codes (c10/core/ScalarType.h).
fn scalar_type(kind: Kind) -> Result<c_int> {
    match kind {
        Kind::Half => Ok(5),
        Kind::BFloat16 => Ok(15),
        other => Err(Error::Other(format!("autocast computes in bf16 or fp16, not {other:?}"))),
    }
}

fn device_code(device: Device) -> c_int {
    match device {
        Device::Cuda(_) => 1,
        _ => 0,
    }
}

fn check(code: c_int) -> Result<()> {
    shim::check(code, "autocast")
}

impl Autocast {
    /// Turns on autocast in `kind` for `device`'s type until the guard drops.
    pub fn enable(device: Device, kind: Kind) -> Result<Self> {
        let code = device_code(device);
        let dtype = scalar_type(kind)?;
        let (mut enabled, mut previous_dtype) = (false, 0);
        // SAFETY: plain values in and out; the shim catches every C++ exception.
        check(unsafe { plumb_autocast_get(code, &mut enabled, &mut previous_dtype) })?;
        check(unsafe { plumb_autocast_set(code, true, dtype) })?;
        Ok(Self { device: code, previous: (enabled, previous_dtype) })
    }

    /// Whether autocast is on for `device`'s type, and in which kind.
    pub fn state(device: Device) -> Result<(bool, Kind)> {
        let (mut enabled, mut dtype) = (false, 0);
        // SAFETY: as above.
        check(unsafe { plumb_autocast_get(device_code(device), &mut enabled, &mut dtype) })?;
        let kind = match dtype {
            5 => Kind::Half,
            15 => Kind::BFloat16,
            _ => Kind::Float,
        };
        Ok((enabled, kind))
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        let (enabled, dtype) = self.previous;
        // SAFETY: as above. A failure here cannot be reported from drop; the set that
        // succeeded in `enable` makes one unlikely.
        let _ = unsafe { plumb_autocast_set(self.device, enabled, dtype) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// Autocast on `device`: a matmul comes out bf16, close to the fp32 product (rounding,
    /// not garbage), and the previous state is back afterwards.
    fn bf16_autocast_on(device: Device) {
        let a = Tensor::randn([4, 8], (Kind::Float, device));
        let b = Tensor::randn([8, 3], (Kind::Float, device));
        let before = Autocast::state(device).unwrap();
        assert!(!before.0);
        let inside = Precision::Bf16.forward(device, || (a.matmul(&b), Autocast::state(device).unwrap())).unwrap();
        assert_eq!(inside.0.kind(), Kind::BFloat16, "the matmul ran in bf16");
        assert_eq!(inside.1, (true, Kind::BFloat16));
        assert_eq!(Autocast::state(device).unwrap(), before, "the previous state is back");
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        let exact = a.matmul(&b);
        let diff = (inside.0.to_kind(Kind::Float) - exact).abs().max().double_value(&[]);
        assert!(diff > 0.0 && diff < 0.1, "bf16 rounding, not garbage: {diff}");
        assert_eq!(Precision::Fp32.forward(device, || a.matmul(&b).kind()).unwrap(), Kind::Float);
    }

    #[test]
    fn bf16_autocast_computes_matmuls_in_bf16_and_restores_the_state() {
        bf16_autocast_on(Device::Cpu);
    }

    #[test]
    fn bf16_autocast_on_cuda_computes_matmuls_in_bf16_and_restores_the_state() {
        if let Some(device) = crate::cuda::device_for_test() {
            bf16_autocast_on(device);
        }
    }
}
