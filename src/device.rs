//! Where tensors live and compute: the one place that turns `--device` / `train.device` into a
//! candle [`Device`].
//!
//! A [`DeviceSpec`] is what the user wrote (`cpu`, `cuda`, `cuda:N`); [`open`] turns it into a
//! device, or into an error that says why not (a build without the `cuda` feature, no driver,
//! no such GPU). No spec means the default: the first GPU when this build has the `cuda`
//! feature and a GPU answers, otherwise the CPU.
//!
//! Everything else takes its device from what was opened here, through the tensors: the
//! model's parameters carry it, and the model, its caches, the data batches and the optimizer
//! moments are made on the device of the parameters. Host-side data stays on the CPU on
//! purpose: token ids before upload, GGUF's quantized blocks, and checkpoint files (written from
//! host copies and read onto the chosen device, so a run resumes on another device).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The HINT of every "no CUDA in this build" error.
pub const CUDA_BUILD_HINT: &str =
    "HINT: build with `cargo build --release --features cuda` (`eval \"$(scripts/setup_cuda.sh)\"` first installs the CUDA compiler), or use --device cpu";

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    /// The NVIDIA GPU of this ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let spec = s.trim().to_ascii_lowercase();
        match spec.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceSpec::Cuda(ordinal)),
                Some(Err(_)) => {
                    Err(format!("unknown device `{s}`: the GPU ordinal after `cuda:` must be a number, e.g. cuda:1"))
                }
                None => Err(format!("unknown device `{s}`; expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// The default device: the first GPU when this build can use one and one answers, else the
    /// CPU.
    pub fn default_for_this_machine() -> DeviceSpec {
        match cfg!(feature = "cuda") && open(DeviceSpec::Cuda(0)).is_ok() {
            true => DeviceSpec::Cuda(0),
            false => DeviceSpec::Cpu,
        }
    }

    /// The spec given, or the default.
    pub fn or_default(spec: Option<DeviceSpec>) -> DeviceSpec {
        spec.unwrap_or_else(DeviceSpec::default_for_this_machine)
    }
}

/// Open `spec`, or the default device when it is `None`.
pub fn resolve(spec: Option<DeviceSpec>) -> Result<Device> {
    open(DeviceSpec::or_default(spec))
}

/// The candle device of `spec`, or an error naming the device and what is missing.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Unsupported(format!(
        "device cuda:{ordinal}: this lmforge was built without CUDA support (the `cuda` feature)\n{CUDA_BUILD_HINT}"
    )))
}

/// candle opens the GPU through cudarc, which loads the driver (`libcuda`) and cuBLAS when first
/// used and panics if it cannot: the driver is looked for first, so that a machine without one
/// gets an error, and the rest is opened under `catch_unwind` with the panic's message kept.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    if let Some(missing) = missing_driver() {
        return Err(Error::Unsupported(format!(
            "device cuda:{ordinal}: no NVIDIA driver here ({missing} not found)\nHINT: run on a machine with an NVIDIA GPU and its driver, or use --device cpu"
        )));
    }
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(Error::Unsupported(format!(
            "device cuda:{ordinal}: {}\nHINT: `nvidia-smi` lists the GPUs; use --device cuda:N with one of them, or --device cpu",
            crate::error::without_backtrace(e)
        ))),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA libraries could not be opened".into());
            Err(Error::Unsupported(format!(
                "device cuda:{ordinal}: {reason}\nHINT: cuBLAS and cuRAND of the CUDA version this lmforge was built with must be on LD_LIBRARY_PATH"
            )))
        }
    }
}

/// The driver library's name when it cannot be loaded, `None` when it can.
#[cfg(feature = "cuda")]
fn missing_driver() -> Option<&'static str> {
    const DRIVER: &std::ffi::CStr = c"libcuda.so.1";
    // SAFETY: dlopen with a valid C string; the handle is closed again at once.
    let handle = unsafe { libc::dlopen(DRIVER.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Some("libcuda.so.1");
    }
    // SAFETY: a handle dlopen returned.
    unsafe { libc::dlclose(handle) };
    None
}

/// A short name of `device` for messages and logs: `cpu`, `cuda:0`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The devices this build and machine can test on: the CPU always, and the first GPU when the
/// build has the `cuda` feature and one answers (opened once per process, so the tests share
/// one CUDA stream and cuBLAS handle). With `LMFORGE_REQUIRE_CUDA` set, a missing GPU is a
/// panic (a test failure) instead of a skip; otherwise the reason it is skipped is printed.
#[doc(hidden)]
pub fn test_devices() -> Vec<Device> {
    static GPU: std::sync::OnceLock<std::result::Result<Device, String>> = std::sync::OnceLock::new();
    let mut devices = vec![Device::Cpu];
    match GPU.get_or_init(|| open(DeviceSpec::Cuda(0)).map_err(|e| e.to_string())) {
        Ok(gpu) => devices.push(gpu.clone()),
        Err(why) if std::env::var_os(REQUIRE_CUDA_ENV).is_some() => {
            panic!("{REQUIRE_CUDA_ENV} is set but the GPU cannot be used: {why}")
        }
        Err(why) => eprintln!("testing on the CPU only: {}", why.lines().next().unwrap_or_default()),
    }
    devices
}

/// Set (to anything) to make [`test_devices`] fail without a usable GPU.
pub const REQUIRE_CUDA_ENV: &str = "LMFORGE_REQUIRE_CUDA";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec), "{text}");
            assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
        }
    }

    #[test]
    fn bad_specs_say_what_is_expected() {
        let err = "tpu".parse::<DeviceSpec>().unwrap_err();
        assert!(err.contains("`tpu`") && err.contains("cpu, cuda or cuda:N"), "{err}");
        let err = "cuda:x".parse::<DeviceSpec>().unwrap_err();
        assert!(err.contains("`cuda:x`") && err.contains("number"), "{err}");
        assert!("cuda:-1".parse::<DeviceSpec>().is_err());
        assert!("".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn specs_round_trip_through_toml() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Holder {
            device: DeviceSpec,
        }
        let text = toml::to_string(&Holder { device: DeviceSpec::Cuda(1) }).unwrap();
        assert_eq!(text.trim(), "device = \"cuda:1\"");
        assert_eq!(toml::from_str::<Holder>(&text).unwrap(), Holder { device: DeviceSpec::Cuda(1) });
        let err = toml::from_str::<Holder>("device = \"tpu\"").unwrap_err().to_string();
        assert!(err.contains("device") && err.contains("expected cpu, cuda or cuda:N"), "{err}");
    }

    #[test]
    fn the_cpu_always_opens() {
        assert!(open(DeviceSpec::Cpu).unwrap().is_cpu());
        assert!(test_devices()[0].is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error_with_a_hint() {
        let err = open(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("cuda:0") && err.contains("without CUDA support"), "{err}");
        assert!(err.contains("HINT") && err.contains("--features cuda"), "{err}");
        assert_eq!(DeviceSpec::default_for_this_machine(), DeviceSpec::Cpu);
        assert!(resolve(None).unwrap().is_cpu());
    }
}
