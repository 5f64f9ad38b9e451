//! Devices as recipes, the command line and the host write them: `auto`, `cpu`, `cuda`
//! (= `cuda:0`) or `cuda:N`; parsed, resolved and printed here only. Likewise dtypes:
//! `float32`, `bfloat16`, `float16` ([`dtype_name`], [`parse_dtype`]).
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

/// A string: `auto`, `cpu`, `cuda` or `cuda:N`.
impl schemars::JsonSchema for DeviceSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Device".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^(auto|cpu|cuda(:[0-9]+)?)$" })
    }
}

/// How plumb writes a tensor dtype everywhere (command output, reports, logs, the
/// `torch_dtype` of `config.json`): PyTorch's name without `torch.` (`float32`,
/// `bfloat16`, `float16`, `int64`, ...), never tch's `Float` or `Half`.
pub fn dtype_name(kind: tch::Kind) -> &'static str {
    use tch::Kind;
    match kind {
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Half => "float16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        Kind::Bool => "bool",
        Kind::QInt8 => "qint8",
        Kind::QUInt8 => "quint8",
        Kind::QInt32 => "qint32",
        Kind::BFloat16 => "bfloat16",
        Kind::Float8e5m2 => "float8_e5m2",
        Kind::Float8e4m3fn => "float8_e4m3fn",
        Kind::Float8e5m2fnuz => "float8_e5m2fnuz",
        Kind::Float8e4m3fnuz => "float8_e4m3fnuz",
    }
}

/// A floating-point dtype a model can be loaded in, by its [`dtype_name`] or a short
/// form (`fp32`/`f32`, `bf16`, `fp16`/`f16`).
pub fn parse_dtype(text: &str) -> Result<tch::Kind, String> {
    match text {
        "float32" | "f32" | "fp32" => Ok(tch::Kind::Float),
        "bfloat16" | "bf16" => Ok(tch::Kind::BFloat16),
        "float16" | "f16" | "fp16" => Ok(tch::Kind::Half),
        other => {
            let hint = did_you_mean(other, ["float32", "bfloat16", "float16"]);
            Err(format!("unknown dtype `{other}`; expected float32, bfloat16 or float16{hint}"))
        }
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

    #[test]
    fn dtypes_are_spelled_as_pytorch_spells_them_and_parse_back() {
        use tch::Kind;
        for (kind, name) in [(Kind::Float, "float32"), (Kind::BFloat16, "bfloat16"), (Kind::Half, "float16")] {
            assert_eq!(dtype_name(kind), name);
            assert_eq!(parse_dtype(name), Ok(kind));
        }
        assert_eq!(
            (dtype_name(Kind::Int64), dtype_name(Kind::Double), dtype_name(Kind::Bool)),
            ("int64", "float64", "bool")
        );
        assert_eq!((parse_dtype("bf16"), parse_dtype("fp32")), (Ok(Kind::BFloat16), Ok(Kind::Float)));
        assert_eq!(
            parse_dtype("bfloat17"),
            Err("unknown dtype `bfloat17`; expected float32, bfloat16 or float16; did you mean `bfloat16`?".into())
        );
        // A tensor's dtype, as a model reports it, reads the same way.
        assert_eq!(dtype_name(tch::Tensor::zeros([1], (Kind::BFloat16, tch::Device::Cpu)).kind()), "bfloat16");
    }
}
