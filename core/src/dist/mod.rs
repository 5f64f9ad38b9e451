//! Data-parallel runs on PyTorch's own distributed engine, c10d: a TCPStore rendezvous and
//! process groups on Gloo, with NCCL attached for CUDA tensors on a GPU
//! (`core/csrc/dist.cpp`), launched the way `torchrun` launches PyTorch scripts (the `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` environment variables;
//! [`Rendezvous::from_env`]), each rank on a GPU of its own ([`Rendezvous::rank_device`]).
pub mod data_parallel;
mod group;
mod heartbeat;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use group::{Backend, GradientSync, ProcessGroup, ReduceOp, Store};

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launch variable is set to something unusable.
    #[error("{var}={value:?}: expected {expected}")]
    Env { var: &'static str, value: String, expected: String },

    /// Some launch variables are set and a needed one is not.
    #[error("{var} is not set, but {present} is: a distributed launch sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun or `plumb run --nproc N` do)")]
    MissingEnv { var: &'static str, present: &'static str },

    /// The rendezvous failed: the store did not answer, or not every rank arrived in time.
    #[error("rank {rank} of {world_size} could not join the group at {address} within {}s: {message}", timeout.as_secs_f64())]
    Join { rank: usize, world_size: usize, address: String, timeout: Duration, message: String },

    /// A collective failed on this rank (a peer died or timed out, or a tensor was unusable).
    #[error("rank {rank} of {world_size}: {op} failed: {message}")]
    Collective { rank: usize, world_size: usize, op: &'static str, message: String },

    #[error("{0}")]
    Invalid(String),
}

/// Where and as whom this process meets the others of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rendezvous {
    /// This process's rank, 0..world_size; rank 0 serves the store, logs and saves.
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this machine (which GPU it uses).
    pub local_rank: usize,
    /// The host rank 0 runs on (its TCPStore listens there).
    pub master_addr: String,
    pub master_port: u16,
    /// How long a rank waits for the others, at the rendezvous and in every collective.
    pub timeout: Duration,
    /// Under torchrun, its agent serves the store (`TORCHELASTIC_USE_AGENT_STORE`): every
    /// rank connects to it, and keeps its keys under this restart attempt's prefix
    /// (`TORCHELASTIC_RESTART_COUNT`), as `torch.distributed` does.
    #[serde(default)]
    pub agent_store: Option<u32>,
}

impl Rendezvous {
    /// PyTorch's default for Gloo groups: 30 minutes.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
    /// The variable that overrides [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT), in seconds.
    pub const TIMEOUT_VAR: &'static str = "PLUMB_DIST_TIMEOUT";

    /// The launch described by this process's environment, as torchrun sets it; `None`
    /// when neither `RANK` nor `WORLD_SIZE` is set (a single-process run).
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let present = match (var("RANK"), var("WORLD_SIZE")) {
            (None, None) => return Ok(None),
            (Some(_), _) => "RANK",
            (None, Some(_)) => "WORLD_SIZE",
        };
        let required = |name: &'static str| var(name).ok_or(DistError::MissingEnv { var: name, present });
        let number = |name: &'static str, value: String| {
            value.trim().parse::<usize>().map_err(|_| DistError::Env {
                var: name,
                value,
                expected: "a whole number".into(),
            })
        };
        let world_size = number("WORLD_SIZE", required("WORLD_SIZE")?)?;
        let rank = number("RANK", required("RANK")?)?;
        if world_size == 0 {
            return Err(DistError::Env { var: "WORLD_SIZE", value: "0".into(), expected: "at least 1".into() });
        }
        if rank >= world_size {
            return Err(DistError::Env {
                var: "RANK",
                value: rank.to_string(),
                expected: format!("a rank below WORLD_SIZE={world_size}"),
            });
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(value) => number("LOCAL_RANK", value)?,
            None => rank,
        };
        let master_addr = required("MASTER_ADDR")?;
        if master_addr.trim().is_empty() {
            return Err(DistError::Env {
                var: "MASTER_ADDR",
                value: master_addr,
                expected: "a host name or address".into(),
            });
        }
        let port = required("MASTER_PORT")?;
        let master_port = port.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| DistError::Env {
            var: "MASTER_PORT",
            value: port.clone(),
            expected: "a port number in 1..65535".into(),
        })?;
        let timeout = match var(Self::TIMEOUT_VAR) {
            None => Self::DEFAULT_TIMEOUT,
            Some(value) => value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or(DistError::Env {
                    var: Self::TIMEOUT_VAR,
                    value,
                    expected: "a positive number of seconds".into(),
                })?,
        };
        let agent_store = match var("TORCHELASTIC_USE_AGENT_STORE") {
            Some(flag) if flag.trim().eq_ignore_ascii_case("true") || flag.trim() == "1" => {
                Some(match var("TORCHELASTIC_RESTART_COUNT") {
                    None => 0,
                    Some(value) => value.trim().parse::<u32>().map_err(|_| DistError::Env {
                        var: "TORCHELASTIC_RESTART_COUNT",
                        value,
                        expected: "a whole number".into(),
                    })?,
                })
            }
            _ => None,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_owned(),
            master_port,
            timeout,
            agent_store,
        }))
    }

    /// This rank's device in a run on `device`: the CPU is shared, but on CUDA each rank of
    /// a machine takes a GPU of its own, as torchrun's scripts take `cuda:LOCAL_RANK`: with
    /// `cuda:N`, the rank of local rank L takes `cuda:N+L` (NCCL refuses two ranks on one GPU).
    /// An error when libtorch does not see that device.
    pub fn rank_device(&self, device: tch::Device) -> Result<tch::Device, DistError> {
        let tch::Device::Cuda(first) = device else { return Ok(device) };
        let index = first + self.local_rank;
        let seen = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        if index < seen {
            return Ok(tch::Device::Cuda(index));
        }
        Err(DistError::Invalid(format!(
            "rank {} (local rank {}) of a run on cuda:{first} needs cuda:{index}, but libtorch sees {seen} CUDA \
             device(s): start at most {} rank(s) on this machine, one per GPU",
            self.rank,
            self.local_rank,
            seen.saturating_sub(first)
        )))
    }

    /// `host:port` of the store.
    pub fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// What this run's keys in the store start with: nothing in a store of its own; under
    /// torchrun's agent store, the restart attempt's `/worker/attempt_N/` (as
    /// `torch.distributed` keeps them), so a restarted attempt never reads the last one's.
    pub fn key_prefix(&self) -> String {
        self.agent_store.map(|attempt| format!("/worker/attempt_{attempt}/")).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn no_launch_variables_is_a_single_process_run() {
        assert_eq!(Rendezvous::from_vars(vars(&[("MASTER_PORT", "1")])).unwrap(), None);
    }

    #[test]
    fn reads_torchrun_variables() {
        let r = Rendezvous::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29500"),
            ("PLUMB_DIST_TIMEOUT", "2.5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world_size, r.local_rank, r.master_port), (3, 8, 1, 29500));
        assert_eq!(r.address(), "10.0.0.2:29500");
        assert_eq!(r.timeout, Duration::from_millis(2500));
        assert_eq!((r.agent_store, r.key_prefix()), (None, String::new()));
    }

    #[test]
    fn under_torchrun_the_agent_serves_the_store() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
        let with = |extra: &[(&str, &str)]| {
            let pairs: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
            Rendezvous::from_vars(vars(&pairs))
        };
        let r =
            with(&[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "2")]).unwrap().unwrap();
        assert_eq!((r.agent_store, r.key_prefix().as_str()), (Some(2), "/worker/attempt_2/"));
        let r = with(&[("TORCHELASTIC_USE_AGENT_STORE", "False")]).unwrap().unwrap();
        assert_eq!(r.agent_store, None);
        let err = with(&[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "x")]).unwrap_err();
        assert!(err.to_string().starts_with("TORCHELASTIC_RESTART_COUNT=\"x\""), "{err}");
    }

    #[test]
    fn each_rank_takes_a_gpu_of_its_own() {
        let rank = |local_rank| Rendezvous {
            rank: local_rank,
            world_size: 8,
            local_rank,
            master_addr: "h".into(),
            master_port: 1,
            timeout: Duration::from_secs(1),
            agent_store: None,
        };
        assert_eq!(rank(3).rank_device(tch::Device::Cpu).unwrap(), tch::Device::Cpu);
        // One past the GPUs libtorch sees, whether this machine has any or not.
        let seen = tch::Cuda::device_count() as usize;
        let err = rank(seen).rank_device(tch::Device::Cuda(0)).unwrap_err().to_string();
        let expected = format!("rank {seen} (local rank {seen}) of a run on cuda:0 needs cuda:{seen}, but libtorch sees {seen} CUDA device(s)");
        assert!(err.starts_with(&expected), "{err}");
        if seen > 0 {
            assert_eq!(rank(seen - 1).rank_device(tch::Device::Cuda(0)).unwrap(), tch::Device::Cuda(seen - 1));
        }
    }

    #[test]
    fn bad_launch_variables_name_the_variable() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
        let with = |key: &str, value: &str| {
            let mut pairs: Vec<(&str, &str)> = base.iter().copied().filter(|(k, _)| *k != key).collect();
            if !value.is_empty() {
                pairs.push((key, value));
            }
            Rendezvous::from_vars(vars(&pairs)).unwrap_err().to_string()
        };
        assert!(with("RANK", "2").contains("RANK=\"2\": expected a rank below WORLD_SIZE=2"), "{}", with("RANK", "2"));
        assert!(with("WORLD_SIZE", "two").starts_with("WORLD_SIZE=\"two\""));
        assert!(with("MASTER_PORT", "70000").contains("a port number"));
        assert!(with("MASTER_ADDR", "").starts_with("MASTER_ADDR is not set, but RANK is"));
        assert!(with("PLUMB_DIST_TIMEOUT", "-1").starts_with("PLUMB_DIST_TIMEOUT=\"-1\""));
    }
}
