//! `--device` and `train.device` as a user meets them: a run on each available device resumes
//! bit-identically after a crash, a GPU run resumes on the CPU, and bad or unavailable devices
//! are errors naming the flag or field. The GPU cases run where `lmforge::device::test_devices`
//! finds a GPU (a `--features cuda` build on a machine with one; `LMFORGE_REQUIRE_CUDA=1` makes
//! its absence a failure).

use std::path::{Path, PathBuf};

use candle_core::Device;

mod command;
mod small_run;

use command::{command, fails, succeeds};
use small_run::{losses, write_config_with};

/// The small test run, with `device = spec` in its `[train]` section when given.
fn config(dir: &Path, run: &Path, steps: u64, device: Option<&str>) -> PathBuf {
    let path = write_config_with(dir, run, "tiny-llama", steps, &[]);
    if let Some(spec) = device {
        let text =
            std::fs::read_to_string(&path).unwrap().replace("[train]\n", &format!("[train]\ndevice = \"{spec}\"\n"));
        std::fs::write(&path, text).unwrap();
    }
    path
}

fn weights(checkpoint: &Path) -> Vec<(String, Vec<u32>)> {
    let mut tensors: Vec<_> = candle_core::safetensors::load(checkpoint.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    tensors.sort();
    tensors
}

fn checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:06}"))
}

fn specs() -> Vec<String> {
    lmforge::device::test_devices().iter().map(lmforge::device::describe).collect()
}

/// On each device: a run that names it in its config, and one that names it with `--device`,
/// crashes at step 11 and resumes from step 8, end with the same weights and losses bit for bit.
#[test]
fn a_run_on_each_device_resumes_bit_identically() {
    for spec in specs() {
        let tmp = tempfile::tempdir().unwrap();
        let (clean, crashed) = (tmp.path().join("clean"), tmp.path().join("crashed"));
        let out = succeeds(&[
            "train",
            "--config",
            config(tmp.path(), &clean, 16, Some(&spec)).to_str().unwrap(),
            "--no-supervisor",
        ]);
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("on {spec} for 16 steps")), "{spec}");

        let crashing = config(tmp.path(), &crashed, 16, None);
        let out = command()
            .args(["train", "--config", crashing.to_str().unwrap(), "--device", &spec, "--no-supervisor"])
            .args(["--inject", "crash@step=11"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "the injected crash did not happen on {spec}");
        assert!(!checkpoint(&crashed, 16).exists());
        succeeds(&["train", "--resume", crashed.to_str().unwrap(), "--device", &spec, "--no-supervisor"]);

        assert_eq!(weights(&checkpoint(&clean, 16)), weights(&checkpoint(&crashed, 16)), "weights differ on {spec}");
        assert_eq!(losses(&clean), losses(&crashed), "losses differ on {spec}");
    }
}

/// A run trained on the GPU continues on the CPU from the GPU's checkpoint: the checkpoint
/// loads there unchanged, and the CPU's steps follow the GPU's to rounding.
#[test]
fn a_gpu_run_resumes_on_the_cpu() {
    let Some(gpu) = specs().into_iter().find(|s| s != "cpu") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (on_gpu, moved) = (tmp.path().join("gpu"), tmp.path().join("moved"));
    succeeds(&["train", "--config", config(tmp.path(), &on_gpu, 16, Some(&gpu)).to_str().unwrap(), "--no-supervisor"]);
    let crashing = config(tmp.path(), &moved, 16, Some(&gpu));
    let out = command()
        .args(["train", "--config", crashing.to_str().unwrap(), "--no-supervisor", "--inject", "crash@step=11"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(weights(&checkpoint(&on_gpu, 8)), weights(&checkpoint(&moved, 8)), "the GPU is not deterministic");
    succeeds(&["train", "--resume", moved.to_str().unwrap(), "--device", "cpu", "--no-supervisor"]);
    for ((step, a), (_, b)) in losses(&on_gpu).iter().zip(&losses(&moved)).skip(8) {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!((a - b).abs() <= 1e-3 * a.abs(), "step {step}: {a} on {gpu}, {b} resumed on the CPU");
    }
}

#[test]
fn bad_and_unavailable_devices_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&["train", "--device", "tpu", "--no-supervisor"]);
    assert!(err.contains("--device") && err.contains("`tpu`") && err.contains("cpu, cuda or cuda:N"), "{err}");
    let err = fails(&["generate", "--model", "x", "--ids", "1", "--device", "cuda:x"]);
    assert!(err.contains("--device") && err.contains("`cuda:x`"), "{err}");

    let run_dir = tmp.path().join("bad");
    let bad = config(tmp.path(), &run_dir, 4, Some("cuda:x"));
    let err = fails(&["train", "--config", bad.to_str().unwrap(), "--no-supervisor"]);
    assert!(err.contains("device") && err.contains("`cuda:x`") && err.contains("number"), "{err}");

    // A GPU asked for where there is none (or no CUDA in this build): an error that says why.
    if specs().len() == 1 {
        let good = config(tmp.path(), &tmp.path().join("good"), 4, None);
        for args in [
            vec!["train", "--config", good.to_str().unwrap(), "--device", "cuda", "--no-supervisor"],
            vec![
                "score",
                "--model",
                "tests/fixtures/llama_gqa",
                "--ids",
                "1,2",
                "--out",
                "x.safetensors",
                "--device",
                "cuda:1",
            ],
        ] {
            let err = fails(&args);
            let why = match cfg!(feature = "cuda") {
                true => "no NVIDIA driver here",
                false => "without CUDA support",
            };
            assert!(err.contains("device cuda:") && err.contains(why) && err.contains("HINT"), "{err}");
        }
    }
}

/// `score` and greedy `generate` (KV caches full and rolling: the Mistral fixture has a sliding
/// window) on each device give the CPU's logits and tokens.
#[test]
fn score_and_generate_on_each_device() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = "1,5,9,23,7,64,2,31,17,8,44,3";
    let logits = |spec: &str| {
        let out = tmp.path().join(format!("{spec}.safetensors").replace(':', "-"));
        succeeds(&[
            "score",
            "--model",
            "tests/fixtures/mistral",
            "--ids",
            ids,
            "--out",
            out.to_str().unwrap(),
            "--device",
            spec,
        ]);
        let logits = candle_core::safetensors::load(&out, &Device::Cpu).unwrap().remove("logits").unwrap();
        logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let generated = |spec: &str, cache: &[&str]| {
        let mut args = vec!["generate", "--model", "tests/fixtures/mistral", "--ids", ids, "--greedy"];
        args.extend(["--max-new-tokens", "24", "--print-ids", "--device", spec]);
        args.extend(cache);
        String::from_utf8(succeeds(&args).stdout).unwrap()
    };
    let (cpu_logits, cpu_tokens) = (logits("cpu"), generated("cpu", &[]));
    assert_eq!(cpu_tokens, generated("cpu", &["--full-cache"]), "rolling and full caches differ on the CPU");
    for spec in specs().into_iter().filter(|s| s != "cpu") {
        for (a, b) in logits(&spec).iter().zip(&cpu_logits) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "logits on {spec}: {a} vs {b} on the CPU");
        }
        assert_eq!(generated(&spec, &[]), cpu_tokens, "rolling cache on {spec}");
        assert_eq!(generated(&spec, &["--full-cache"]), cpu_tokens, "full cache on {spec}");
    }
}
