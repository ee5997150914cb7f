//! `--device`, shared by the commands that compute (score, generate, bench).

use candle_core::Device;
use clap::Args;
use lmforge::device::{self, DeviceSpec};

#[derive(Args, Clone, Copy, Debug, Default)]
pub struct DeviceArg {
    /// Where to compute: cpu, cuda or cuda:N (default: the first GPU in a build with the `cuda`
    /// feature when one is present, else the CPU).
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<DeviceSpec>,
}

impl DeviceArg {
    /// The device asked for (or the default), opened.
    pub fn open(self) -> anyhow::Result<Device> {
        Ok(device::resolve(self.device)?)
    }
}
