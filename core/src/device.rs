//! Devices as recipes, the command line and the host write them: `auto`, `cpu`, `cuda`
//! (= `cuda:0`) or `cuda:N`; parsed, resolved and printed here only.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::recipe::suggest::did_you_mean;

/// A device as a user names it, before `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA device 0 when libtorch sees a GPU, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The libtorch device, or why there is none: `auto` picks CUDA device 0 when
    /// libtorch sees a GPU; a CUDA index libtorch does not see is an error.
    pub fn resolve(self) -> Result<tch::Device, String> {
        let cuda = tch::Cuda::device_count();
        match self {
            DeviceSpec::Auto if cuda > 0 => Ok(tch::Device::Cuda(0)),
            DeviceSpec::Auto | DeviceSpec::Cpu => Ok(tch::Device::Cpu),
            DeviceSpec::Cuda(n) if (n as i64) < cuda => Ok(tch::Device::Cuda(n)),
            DeviceSpec::Cuda(n) => Err(format!("cuda:{n} asked for, but libtorch sees {cuda} CUDA device(s)")),
        }
    }
}

/// `cpu` or `cuda:N`: how plumb writes a libtorch device everywhere (logs, reports, the
/// host's run requests).
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        tch::Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => return Ok(DeviceSpec::Auto),
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" => return Ok(DeviceSpec::Cuda(0)),
            _ => {}
        }
        if let Some(index) = text.strip_prefix("cuda:") {
            return index
                .parse()
                .map(DeviceSpec::Cuda)
                .map_err(|_| format!("bad device `{text}`; expected `cuda:N` with N a GPU index, e.g. `cuda:0`"));
        }
        let hint = did_you_mean(text, ["auto", "cpu", "cuda"]);
        Err(format!("unknown device `{text}`; expected `auto`, `cpu`, `cuda` or `cuda:N`{hint}"))
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(device: DeviceSpec) -> String {
        device.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_resolve_and_print_one_way() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!(
            "cdua".parse::<DeviceSpec>(),
            Err("unknown device `cdua`; expected `auto`, `cpu`, `cuda` or `cuda:N`; did you mean `cuda`?".to_string())
        );
        assert!("cuda:-1".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cpu.resolve(), Ok(tch::Device::Cpu));
        let past = tch::Cuda::device_count() as usize;
        assert!(DeviceSpec::Cuda(past).resolve().unwrap_err().contains("CUDA device(s)"));
        assert_eq!(device_name(tch::Device::Cpu), "cpu");
        assert_eq!(device_name(tch::Device::Cuda(1)), "cuda:1");
    }
}
