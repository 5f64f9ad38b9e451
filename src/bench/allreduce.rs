//! `plumb bench allreduce`: the bandwidth of c10d's all-reduce among `--nproc` ranks on
//! this machine (Gloo on CPU tensors, or `--device cuda`: NCCL on CUDA tensors, each rank on
//! a GPU of its own), for float32 tensors of `--min-mib` to `--max-mib` MiB (doubling), as
//! nccl-tests' `all_reduce_perf` reports it: the time of one all-reduce (here the median of
//! `--repeats`, each the slowest rank's), the algorithm bandwidth (bytes / time) and the bus
//! bandwidth (algorithm bandwidth × 2(n−1)/n, what each link of a ring carries, comparable
//! across world sizes).
//!
//! Without the launch variables the command starts its ranks itself, as `plumb run
//! --nproc` does (`crate::launch`); under torchrun, each rank runs it as it is.
use std::time::Instant;

use plumb_core::dist::{ProcessGroup, ReduceOp, Rendezvous};
use plumb_core::tch::{self, Device, Kind, Tensor};
use plumb_host::log::progress::Counter;

use super::table::{column, Column, Report, Unit};
use super::{median, synchronize};
use crate::Failure;

const MIB: usize = 1 << 20;

#[derive(clap::Args)]
pub struct AllreduceBench {
    /// Ranks to start on this machine (as `plumb run --nproc N`; default 2). Under
    /// torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) leave it out.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub nproc: Option<usize>,
    /// The port rank 0's store listens on (default: a free one).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// The smallest tensor, in MiB; the sizes double from it up to --max-mib.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub min_mib: usize,
    /// The largest tensor, in MiB.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_mib: usize,
    /// Timed all-reduces per size, after one untimed one; the median is reported.
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub repeats: usize,
    /// Where the tensors are: `cpu` (Gloo) or `cuda` (NCCL; rank r on cuda:LOCAL_RANK, so at
    /// most one rank per GPU).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device: BenchDevice,
}

/// The device `plumb bench allreduce` measures on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevice {
    /// CPU tensors, through Gloo.
    Cpu,
    /// CUDA tensors, through NCCL.
    Cuda,
}

/// The ranks to start on this machine, and the store's port, when this process is the
/// launcher (no launch variables set, or `--nproc` given: the launcher refuses it under
/// torchrun); `None` in a rank. The options are checked before any rank starts.
pub fn launch(args: &AllreduceBench) -> Result<Option<(usize, Option<u16>)>, Failure> {
    sizes(args)?;
    let launched = ["RANK", "WORLD_SIZE"].iter().any(|v| std::env::var_os(v).is_some());
    let ranks = match (args.nproc, launched) {
        (Some(nproc), _) => Some((nproc, args.master_port)),
        (None, false) => Some((2, args.master_port)),
        (None, true) => None,
    };
    if let (Some((nproc, _)), BenchDevice::Cuda) = (ranks, args.device) {
        let gpus = tch::Cuda::device_count().max(0) as usize;
        if gpus == 0 {
            return Err(Failure::User("--device cuda needs a GPU, but libtorch sees none".into()));
        }
        if nproc > gpus {
            return Err(Failure::User(format!(
                "--device cuda with {nproc} ranks needs {nproc} GPUs (NCCL takes one per rank), but libtorch sees {gpus}: \
                 pass --nproc {gpus} or fewer"
            )));
        }
    }
    Ok(ranks)
}

const COLUMNS: &[Column] = &[
    column("mib", "size (MiB)", Unit::Integer),
    column("bytes", "bytes", Unit::Integer),
    column("world_size", "ranks", Unit::Integer),
    column("repeats", "repeats", Unit::Integer),
    column("time_ms", "time (ms)", Unit::Decimals(3)),
    column("algbw_gb_s", "algbw (GB/s)", Unit::Decimals(3)),
    column("busbw_gb_s", "busbw (GB/s)", Unit::Decimals(3)),
];

/// The tensor sizes measured, in bytes: --min-mib doubling up to --max-mib.
fn sizes(args: &AllreduceBench) -> Result<Vec<usize>, Failure> {
    if args.min_mib == 0 || args.max_mib < args.min_mib || args.repeats == 0 {
        return Err(Failure::User(format!(
            "--min-mib {}, --max-mib {}, --repeats {}: expected 1 <= min <= max and at least 1 repeat",
            args.min_mib, args.max_mib, args.repeats
        )));
    }
    let mut sizes = Vec::new();
    let mut mib = args.min_mib;
    while mib <= args.max_mib {
        sizes.push(mib * MIB);
        mib *= 2;
    }
    Ok(sizes)
}

/// One rank of the benchmark: joins the group, all-reduces each size, and (rank 0) prints.
pub fn run(args: &AllreduceBench, json: bool) -> Result<(), Failure> {
    let sizes = sizes(args)?;
    let user = |e: plumb_core::dist::DistError| Failure::User(e.to_string());
    let rendezvous = Rendezvous::from_env()
        .map_err(user)?
        .ok_or_else(|| Failure::Internal("a rank of bench allreduce started without RANK and WORLD_SIZE".into()))?;
    let mut group = ProcessGroup::join(&rendezvous).map_err(user)?;
    let device = match args.device {
        BenchDevice::Cpu => Device::Cpu,
        BenchDevice::Cuda => {
            let device = rendezvous.rank_device(Device::Cuda(0)).map_err(user)?;
            group.attach_nccl(device).map_err(user)?;
            device
        }
    };
    let (world, main) = (group.world_size(), group.rank() == 0);
    // What the group measured: the backend it takes for tensors on this device.
    let backend = group.backend_for(&Tensor::zeros([1], (Kind::Float, device))).name();
    let device_name = plumb_core::device::device_name(device);
    let mut report = Report::new(json, COLUMNS);
    if main {
        report.note(&serde_json::json!({
            "case": "allreduce-setup", "backend": backend, "device": device_name, "world_size": world,
            "dtype": "float32", "op": "sum", "repeats": args.repeats,
        }));
    }
    let progress = main.then(|| Counter::new("bench allreduce", sizes.len() as u64));
    for &bytes in &sizes {
        if let Some(p) = &progress {
            p.doing(&format!("{} MiB", bytes / MIB));
        }
        let numel = (bytes / Kind::Float.elt_size_in_bytes()) as i64;
        // Untimed first, on ones: every element must come back as the world size.
        let mut tensor = Tensor::ones([numel], (Kind::Float, device));
        group.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Sum).map_err(user)?;
        let (low, high) = (tensor.min().double_value(&[]), tensor.max().double_value(&[]));
        if low != world as f64 || high != world as f64 {
            return Err(Failure::Internal(format!(
                "all-reduce of {bytes} bytes of ones among {world} ranks gave values in [{low}, {high}], not {world}"
            )));
        }
        // Timed on zeros, which stay zeros however often they are summed.
        let _ = tensor.zero_();
        let mut seconds = Vec::with_capacity(args.repeats);
        for _ in 0..args.repeats {
            // The clock is read on the host, and an NCCL collective returns once it is queued:
            // wait for the work queued on the GPU on both sides.
            synchronize(device);
            group.barrier().map_err(user)?;
            let start = Instant::now();
            group.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Sum).map_err(user)?;
            synchronize(device);
            seconds.push(start.elapsed().as_secs_f64());
        }
        // An all-reduce is done when the slowest rank is: each repeat's time is its maximum.
        let times = Tensor::from_slice(&seconds);
        group.all_reduce(std::slice::from_ref(&times), ReduceOp::Max).map_err(user)?;
        let seconds = median(Vec::<f64>::try_from(&times).map_err(|e| Failure::Internal(e.to_string()))?);
        let algbw = bytes as f64 / seconds;
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        if let Some(p) = &progress {
            let line = serde_json::json!({
                "case": "allreduce", "backend": backend, "device": device_name, "dtype": "float32", "op": "sum",
                "bytes": bytes, "mib": bytes / MIB, "world_size": world, "repeats": args.repeats, "time_ms": seconds * 1e3,
                "algbw_gb_s": algbw / 1e9, "busbw_gb_s": busbw / 1e9,
            });
            p.suspend(|| report.add(&line));
            p.step();
        }
    }
    drop(progress);
    if main {
        report.print();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(min_mib: usize, max_mib: usize) -> AllreduceBench {
        AllreduceBench { nproc: None, master_port: None, min_mib, max_mib, repeats: 1, device: BenchDevice::Cpu }
    }

    #[test]
    fn sizes_double_from_the_smallest_to_the_largest() {
        assert_eq!(sizes(&args(1, 256)).unwrap().len(), 9);
        assert_eq!(sizes(&args(1, 6)).unwrap(), [MIB, 2 * MIB, 4 * MIB]);
        assert_eq!(sizes(&args(4, 4)).unwrap(), [4 * MIB]);
        for bad in [args(0, 4), args(8, 4)] {
            let Err(Failure::User(message)) = sizes(&bad) else { panic!("accepted") };
            assert!(message.contains("expected 1 <= min <= max"), "{message}");
        }
    }
}
