//! `--device`, shared by the commands that compute (train, score, generate, eval translate,
//! bench).

use candle_core::Device;
use clap::Args;
use lmforge::device::{self, DeviceSpec};

#[derive(Args, Clone, Copy, Debug, Default)]
pub struct DeviceArg {
    /// Where to compute: cpu, cuda or cuda:N (default: the first GPU in a build with the `cuda`
    /// feature when one is present, else the CPU). A training run may change it on resume.
    #[arg(long = "device", value_name = "cpu|cuda[:N]")]
    pub spec: Option<DeviceSpec>,
}

impl DeviceArg {
    /// The device asked for (or the default), opened.
    pub fn open(self) -> anyhow::Result<Device> {
        Ok(device::resolve(self.spec)?)
    }
}
