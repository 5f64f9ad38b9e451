//! A seeded random generator that lives on the device: generation draws its uniform
//! numbers where the logits are, so sampling never waits for the host. tch 0.24 binds no
//! generator objects (its `multinomial` and `rand` take none), so this goes through
//! plumb's C++ shim (`core/csrc/shim.cpp`): a clone of libtorch's default generator for
//! the device (mt19937 on a CPU, Philox on CUDA), seeded, owned by its caller, so draws
//! from it do not depend on anything else that runs in the process.
use std::os::raw::{c_int, c_void};

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::shim;

/// A generator of one device's kind, seeded once.
pub struct DeviceGenerator {
    raw: *mut c_void,
    device: Device,
}

impl DeviceGenerator {
    /// A generator for `device`, seeded with `seed`.
    pub fn new(device: Device, seed: u64) -> Result<Self> {
        let (code, index) = match device {
            Device::Cuda(n) => (1, n as c_int),
            _ => (0, 0),
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: plain values in, one pointer out; the shim catches every C++ exception.
        shim::check(unsafe { shim::plumb_generator_new(code, index, seed, &mut raw) }, "device generator")?;
        Ok(Self { raw, device })
    }

    /// `n` uniform numbers in [0, 1) of `kind`, on the generator's device.
    pub fn uniform(&mut self, n: i64, kind: Kind) -> Result<Tensor> {
        let mut out = Tensor::empty([n], (kind, self.device));
        // SAFETY: `raw` is a live at::Generator (freed only on drop) and `out` a live tensor.
        let code = unsafe { shim::plumb_generator_uniform(self.raw, out.as_mut_ptr() as *mut c_void) };
        shim::check(code, "device generator")?;
        Ok(out)
    }
}

impl Drop for DeviceGenerator {
    fn drop(&mut self) {
        // SAFETY: `raw` came from plumb_generator_new and is freed once.
        unsafe { shim::plumb_generator_free(self.raw) }
    }
}

/// Test weights that no other test can disturb: the tests running beside one draw from
/// tch's global generator too, so `manual_seed` then a model's `new` does not fix its
/// weights. Every matrix of `vs` (embeddings and projections; norm weights and biases keep
/// theirs) is drawn again, in name order, from a private generator seeded with `seed`:
/// uniform with HF's initial standard deviation, 0.02.
#[cfg(test)]
pub(crate) fn redraw_matrices(vs: &tch::nn::VarStore, seed: u64) {
    let mut generator = DeviceGenerator::new(vs.device(), seed).unwrap();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.dim() >= 2).collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let half_width = 0.02 * 3f64.sqrt();
    let _no_grad = tch::no_grad_guard();
    for (_, mut t) in variables {
        let uniform = generator.uniform(t.numel() as i64, t.kind()).unwrap().view(t.size().as_slice());
        t.copy_(&((uniform * 2.0 - 1.0) * half_width));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_uniform_numbers_whatever_the_global_generator_does() {
        let draw = |seed| {
            let mut generator = DeviceGenerator::new(Device::Cpu, seed).unwrap();
            let first = generator.uniform(1000, Kind::Double).unwrap();
            tch::manual_seed(99); // the global generator moves; ours does not care
            let _ = Tensor::rand([10], (Kind::Float, Device::Cpu));
            Tensor::cat(&[first, generator.uniform(3, Kind::Double).unwrap()], 0)
        };
        let (a, b, c) = (draw(7), draw(7), draw(8));
        assert_eq!(a.size(), [1003]);
        assert!(a.equal(&b), "same seed, same numbers");
        assert!(!a.equal(&c), "another seed, other numbers");
        let (min, max, mean) = (a.min().double_value(&[]), a.max().double_value(&[]), a.mean(Kind::Double));
        assert!(min >= 0.0 && max < 1.0, "{min} {max}");
        assert!((mean.double_value(&[]) - 0.5).abs() < 0.05);
        // Successive draws continue the stream rather than repeating it.
        assert!(!a.narrow(0, 0, 3).equal(&a.narrow(0, 1000, 3)));
    }
}
