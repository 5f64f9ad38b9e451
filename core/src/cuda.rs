//! What CUDA offers that tch 0.24 does not bind, through core's shim: graphs
//! (`at::cuda::CUDAGraph`) and the caching allocator's memory statistics
//! (`torch.cuda.max_memory_allocated`). Both need a build that found CUDA's headers
//! ([`built`]); on any other build, and on a CPU, each call is a clear error.
use std::os::raw::{c_int, c_void};

use tch::Device;

use crate::error::{Error, Result};
use crate::shim::{self, *};

/// Whether this build has the CUDA half of the shim.
pub fn built() -> bool {
    // SAFETY: returns a constant.
    unsafe { plumb_cuda_built() }
}

fn cuda_index(device: Device, what: &str) -> Result<c_int> {
    match device {
        Device::Cuda(index) => Ok(index as c_int),
        other => Err(Error::Other(format!("{what} needs a CUDA device, not {other:?}"))),
    }
}

/// A CUDA graph: the kernels one piece of work launches, captured once and replayed with a
/// single launch. A replay reads and writes the same memory as the capture did, so inputs
/// are updated in place (`copy_`) before [`CudaGraph::replay`] and outputs read after it;
/// tensors allocated during the capture live in the graph's private pool for as long as it
/// does. The captured work must not read anything back to the host.
pub struct CudaGraph {
    raw: *mut c_void,
}

impl CudaGraph {
    /// Captures what `work` launches on `device` (its result is typically the outputs the
    /// replays overwrite). Run `work` once eagerly before, so that lazily made handles
    /// (cuBLAS's) exist before the capture.
    pub fn capture<T>(device: Device, work: impl FnOnce() -> Result<T>) -> Result<(Self, T)> {
        let index = cuda_index(device, "a CUDA graph")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives a new graph, freed once by Drop.
        shim::check(unsafe { plumb_cuda_graph_new(&mut raw) }, "creating a CUDA graph")?;
        let graph = Self { raw };
        // SAFETY: a live graph; the capture ends below on every path.
        shim::check(unsafe { plumb_cuda_graph_capture_begin(graph.raw, index) }, "beginning a CUDA graph capture")?;
        let result = work();
        // SAFETY: as above; ends the capture that began.
        let ended = shim::check(unsafe { plumb_cuda_graph_capture_end(graph.raw) }, "ending a CUDA graph capture");
        let value = result?;
        ended?;
        Ok((graph, value))
    }

    /// Launches the captured work again.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: a live, captured graph.
        shim::check(unsafe { plumb_cuda_graph_replay(self.raw) }, "replaying a CUDA graph")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from plumb_cuda_graph_new and is freed once.
        unsafe { plumb_cuda_graph_free(self.raw) }
    }
}

/// The CUDA caching allocator's figures for a device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by tensors now.
    pub allocated: i64,
    /// The most held at once since the last [`reset_peak_memory`] (or the start).
    pub peak: i64,
    /// Reserved from the driver by the allocator (allocated plus its cache).
    pub reserved: i64,
}

/// [`MemoryStats`] of a CUDA device.
pub fn memory_stats(device: Device) -> Result<MemoryStats> {
    let index = cuda_index(device, "CUDA memory statistics")?;
    let (mut allocated, mut peak, mut reserved) = (0, 0, 0);
    // SAFETY: plain values out.
    shim::check(
        unsafe { plumb_cuda_memory(index, &mut allocated, &mut peak, &mut reserved) },
        "reading CUDA memory statistics",
    )?;
    Ok(MemoryStats { allocated, peak, reserved })
}

/// Starts the peak of [`memory_stats`] over from what is allocated now.
pub fn reset_peak_memory(device: Device) -> Result<()> {
    let index = cuda_index(device, "CUDA memory statistics")?;
    // SAFETY: a plain value in.
    shim::check(unsafe { plumb_cuda_reset_peak_memory(index) }, "resetting CUDA peak memory")
}

/// CUDA device 0 for a test that checks CUDA, or None (with a line saying the test did
/// not run) on a machine without one.
#[cfg(test)]
pub(crate) fn device_for_test() -> Option<Device> {
    if tch::Cuda::device_count() == 0 {
        eprintln!("no CUDA device: this CUDA check did not run");
        return None;
    }
    assert!(built(), "libtorch sees a CUDA device but this build has no CUDA half (CUDA's headers were missing)");
    Some(Device::Cuda(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// A captured chain of small ops, replayed after its input changed in place, gives
    /// what running it eagerly on the new input gives.
    #[test]
    fn a_replayed_graph_computes_on_its_updated_input() {
        let Some(device) = device_for_test() else { return };
        let mut input = Tensor::randn([64, 64], (Kind::Float, device));
        let chain =
            |x: &Tensor| -> Tensor { (0..20).fold(x.shallow_clone(), |y, i| (y.sin() * 1.01 + i as f64).tanh()) };
        let _ = chain(&input); // warm-up, outside the capture
        let (graph, output) = CudaGraph::capture(device, || Ok(chain(&input))).unwrap();
        for _ in 0..3 {
            input.copy_(&Tensor::randn([64, 64], (Kind::Float, device)));
            graph.replay().unwrap();
            let expected = chain(&input);
            let diff = (&output - &expected).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "replay vs eager: {diff}");
        }
    }

    /// The allocator's figures follow a 64 MiB tensor: allocated grows by it, the peak
    /// keeps it after it is freed, and a reset brings the peak down.
    #[test]
    fn memory_statistics_follow_allocations() {
        let Some(device) = device_for_test() else { return };
        tch::Cuda::synchronize(0);
        let before = memory_stats(device).unwrap();
        let big = Tensor::zeros([16 << 20], (Kind::Float, device));
        let during = memory_stats(device).unwrap();
        assert!(during.allocated - before.allocated >= 64 << 20, "{before:?} → {during:?}");
        assert!(during.peak >= during.allocated && during.reserved >= during.allocated, "{during:?}");
        drop(big);
        let after = memory_stats(device).unwrap();
        assert!(after.allocated < during.allocated && after.peak >= during.allocated, "{during:?} → {after:?}");
        reset_peak_memory(device).unwrap();
        let reset = memory_stats(device).unwrap();
        assert!(reset.peak < during.allocated, "{reset:?}");
    }

    #[test]
    fn a_cpu_has_no_cuda_graphs_or_statistics() {
        let err = CudaGraph::capture(Device::Cpu, || Ok(())).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("a CUDA graph needs a CUDA device, not Cpu"));
        assert!(memory_stats(Device::Cpu).unwrap_err().to_string().contains("needs a CUDA device"));
    }
}
