//! Where a plan's hours are spent: this machine (measured), or a named accelerator (data).

use serde::Serialize;

use crate::error::{Error, Result};

/// The device a time budget runs on.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlanDevice {
    /// The CPU lmforge runs on now: throughput and memory come from rehearsing each plan's
    /// training step here.
    ThisCpu,
    /// An accelerator known only by its datasheet: time is training FLOPs over
    /// `peak_flops · mfu`.
    Accelerator { spec: AcceleratorSpec, mfu: f64 },
}

/// A datasheet entry.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AcceleratorSpec {
    pub name: &'static str,
    pub description: &'static str,
    /// Dense bf16 tensor-core peak, FLOP/s (no structured sparsity).
    pub peak_flops: f64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// The name that selects the measured CPU.
pub const THIS_CPU: &str = "this-cpu";

/// Model FLOPs utilisation assumed on accelerators: the share of peak a tuned mixed-precision
/// trainer sustains on dense transformers. Published large runs report 38–46% (PaLM 46.2%,
/// Chowdhery et al. 2022; Llama 3 405B 38–43%, Dubey et al. 2024); 0.40 sits in that range.
pub const DEFAULT_MFU: f64 = 0.40;

/// NVIDIA datasheets (SXM parts).
pub const ACCELERATORS: [AcceleratorSpec; 3] = [
    AcceleratorSpec {
        name: "a100",
        description: "NVIDIA A100 SXM 80GB (312 TFLOP/s dense bf16)",
        peak_flops: 312e12,
        memory_bytes: 80_000_000_000,
    },
    AcceleratorSpec {
        name: "h100",
        description: "NVIDIA H100 SXM 80GB (989 TFLOP/s dense bf16)",
        peak_flops: 989.4e12,
        memory_bytes: 80_000_000_000,
    },
    AcceleratorSpec {
        name: "h200",
        description: "NVIDIA H200 SXM 141GB (989 TFLOP/s dense bf16)",
        peak_flops: 989.4e12,
        memory_bytes: 141_000_000_000,
    },
];

impl PlanDevice {
    /// `this-cpu` or an accelerator name (case-insensitive), with `mfu` for accelerators.
    pub fn parse(name: &str, mfu: f64) -> Result<Self> {
        if !(mfu > 0.0 && mfu <= 1.0) {
            return Err(Error::Input(format!("--mfu {mfu}: expected a share of peak, 0 < mfu <= 1")));
        }
        let lower = name.to_ascii_lowercase();
        if lower == THIS_CPU {
            return Ok(PlanDevice::ThisCpu);
        }
        match ACCELERATORS.iter().find(|a| a.name == lower) {
            Some(spec) => Ok(PlanDevice::Accelerator { spec: *spec, mfu }),
            None => Err(Error::Input(format!(
                "unknown device `{name}`; known devices: {}\nHINT: `{THIS_CPU}` measures this machine",
                known_devices().join(", ")
            ))),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            PlanDevice::ThisCpu => THIS_CPU,
            PlanDevice::Accelerator { spec, .. } => spec.name,
        }
    }

    /// A line for the report.
    pub fn describe(&self) -> String {
        match self {
            PlanDevice::ThisCpu => format!(
                "{THIS_CPU} ({} threads, {}; times measured by rehearsing each plan)",
                crate::nn::ops::parallel::threads(),
                crate::nn::ops::gemm::backend()
            ),
            PlanDevice::Accelerator { spec, mfu } => {
                format!("{} at an assumed {:.0}% model FLOPs utilisation", spec.description, mfu * 100.0)
            }
        }
    }

    /// The device's own memory, where the datasheet gives it; this machine's total RAM otherwise.
    pub fn memory_bytes(&self) -> Option<u64> {
        match self {
            PlanDevice::ThisCpu => meminfo_bytes("MemTotal:"),
            PlanDevice::Accelerator { spec, .. } => Some(spec.memory_bytes),
        }
    }
}

/// Every name `--device` accepts.
pub fn known_devices() -> Vec<&'static str> {
    std::iter::once(THIS_CPU).chain(ACCELERATORS.iter().map(|a| a.name)).collect()
}

/// A `/proc/meminfo` field in bytes (Linux).
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_ones_list_the_known() {
        assert_eq!(PlanDevice::parse("this-cpu", DEFAULT_MFU).unwrap(), PlanDevice::ThisCpu);
        match PlanDevice::parse("H100", 0.5).unwrap() {
            PlanDevice::Accelerator { spec, mfu } => assert_eq!((spec.name, mfu), ("h100", 0.5)),
            other => panic!("{other:?}"),
        }
        let err = PlanDevice::parse("tpu-v9", DEFAULT_MFU).unwrap_err().to_string();
        assert!(err.contains("tpu-v9") && err.contains("this-cpu, a100, h100, h200"), "{err}");
        assert!(PlanDevice::parse("h100", 0.0).is_err());
    }
}
