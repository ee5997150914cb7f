//! Data-parallel training over MPI as a user runs it: two ranks over loopback train like one
//! process with the whole batch, a killed or crashed or hung rank restarts the job bit for bit,
//! a NaN on one rank rolls both back, and bad launches fail with clear errors.
//!
//! The tests that start ranks need a build with `--features mpi` and OpenMPI's `mpirun` (CI:
//! `.ci/run` installs it and runs `cargo test --release --features mpi --test data_parallel`).

use std::path::{Path, PathBuf};
mod command;
mod small_run;

use command::command;

/// The tests' small run (tests/small_run): 2 layers of width 64, global batch 4, checkpoints
/// every 8 steps.
fn write_config(dir: &Path, run: &Path, steps: u64) -> PathBuf {
    small_run::write_config_with(dir, run, "tiny-llama", steps, &[])
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use super::small_run::{events, losses, metrics};
    use super::*;

    fn succeed(mut command: Command) -> Output {
        let out = command.output().unwrap();
        assert!(out.status.success(), "{command:?}:\n{}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// Train in one process, without the supervisor.
    fn train_alone(config: &Path, extra: &[&str]) {
        let mut command = command();
        command.args(["train", "--config", config.to_str().unwrap(), "--no-supervisor"]).args(extra);
        succeed(command);
    }

    fn checkpoint(run: &Path, step: u64) -> PathBuf {
        run.join(format!("checkpoints/step-{step:06}"))
    }

    fn same_bytes(a: &Path, b: &Path, file: &str) -> bool {
        std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap()
    }

    /// Each step's loss (and gradient norm) of `got` within `rel` of `want`'s, step for step.
    fn assert_curves_match(want: &Path, got: &Path, rel: f64) {
        let steps = |run: &Path| -> Vec<(u64, f64, f64)> {
            metrics(run)
                .iter()
                .filter(|v| v.get("loss").is_some())
                .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap()))
                .collect()
        };
        let (want, got) = (steps(want), steps(got));
        assert_eq!(want.len(), got.len(), "steps logged");
        for ((step, a, na), (s, b, nb)) in want.iter().zip(&got) {
            assert_eq!(step, s);
            assert!((a - b).abs() <= rel * a.abs(), "step {step}: loss {b} vs {a} in one process");
            assert!((na - nb).abs() <= 10.0 * rel * na.abs(), "step {step}: grad norm {nb} vs {na} in one process");
        }
    }

    /// `mpirun` as the tests run it: over loopback on a machine with fewer cores than ranks,
    /// maybe as root in a container.
    fn set_mpi_env(command: &mut Command) {
        command
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }

    /// `mpirun -np 2 lmforge train --data-parallel ARGS`: two ranks, no supervisor.
    fn mpirun(args: &[&str]) -> Command {
        let mut command = Command::new("mpirun");
        set_mpi_env(&mut command);
        command.args(["-np", "2", env!("CARGO_BIN_EXE_lmforge"), "train", "--data-parallel"]).args(args);
        command
    }

    /// `lmforge train --ranks 2 ARGS`: two ranks under the supervisor.
    fn supervised(args: &[&str]) -> Command {
        let mut command = command();
        set_mpi_env(&mut command);
        command.args(["train", "--ranks", "2"]).args(args);
        command
    }

    /// The Bar: two ranks with two rows each follow one process with the whole batch of four,
    /// step for step, to float reassociation.
    #[test]
    fn two_ranks_train_like_one_process_with_the_whole_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let (alone, ranks) = (tmp.path().join("alone"), tmp.path().join("ranks"));
        train_alone(&write_config(tmp.path(), &alone, 16), &[]);
        let out = succeed(mpirun(&["--config", write_config(tmp.path(), &ranks, 16).to_str().unwrap()]));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("data-parallel over 2 ranks: each trains on 2 of the 4 windows"), "{log}");
        assert_curves_match(&alone, &ranks, 1e-5);
        let comm: Vec<f64> = metrics(&ranks).iter().filter_map(|v| v["comm_s"].as_f64()).collect();
        assert_eq!(comm.len(), 16, "every step reports its communication time");
        // The checkpoint records the world size; its data position is the one process's.
        let state = |run: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(checkpoint(run, 16).join("state.json")).unwrap()).unwrap()
        };
        assert_eq!(state(&ranks)["extra"]["world_size"], 2);
        assert_eq!(state(&ranks)["sampler"], state(&alone)["sampler"]);
        // Rank 0 alone logs: one line per step.
        assert_eq!(losses(&ranks).len(), 16);
    }

    /// The pid of rank `rank` of the job training `config`.
    fn rank_pid(config: &Path, rank: usize) -> Option<i32> {
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let has = |bytes: &[u8], text: &str| bytes.split(|&b| b == 0).any(|s| s == text.as_bytes());
            (has(&cmdline, config.to_str()?) && has(&environ, &wanted) && has(&cmdline, "--worker")).then_some(pid)
        })
    }

    /// SIGKILL of rank 1 after the checkpoint of step 8: mpirun ends the job, the supervisor
    /// restarts it from that checkpoint, and it finishes as the uninterrupted run did, bit for
    /// bit.
    #[test]
    fn killing_one_rank_restarts_the_job_and_resumes_bit_identically() {
        let tmp = tempfile::tempdir().unwrap();
        let (clean, killed) = (tmp.path().join("clean"), tmp.path().join("killed"));
        succeed(supervised(&["--config", write_config(tmp.path(), &clean, 24).to_str().unwrap()]));

        let config = write_config(tmp.path(), &killed, 24);
        let mut job = supervised(&["--config", config.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        while !checkpoint(&killed, 8).join("manifest.json").exists() {
            assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint at step 8");
            assert!(job.try_wait().unwrap().is_none(), "the job ended before step 8");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = rank_pid(&config, 1).expect("rank 1 is running");
        // SAFETY: kill(2) on a pid this test started (through the supervisor and mpirun).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        assert!(job.wait().unwrap().success(), "the supervisor did not finish the job");
        assert!(events(&killed, "restart") >= 1, "no restart recorded");

        for file in ["model.safetensors", "optimizer.safetensors"] {
            assert!(same_bytes(&checkpoint(&clean, 24), &checkpoint(&killed, 24), file), "{file} differs");
        }
        assert_eq!(losses(&clean), losses(&killed), "loss lines differ");
    }

    /// An injected crash (abort) on rank 1: the job restarts once and ends bit-identical.
    #[test]
    fn a_crash_on_rank_1_restarts_the_job_identically() {
        let tmp = tempfile::tempdir().unwrap();
        let (clean, crashed) = (tmp.path().join("clean"), tmp.path().join("crashed"));
        succeed(supervised(&["--config", write_config(tmp.path(), &clean, 24).to_str().unwrap()]));
        let config = write_config(tmp.path(), &crashed, 24);
        succeed(supervised(&["--config", config.to_str().unwrap(), "--inject", "crash@step=13,rank=1"]));
        assert_eq!(events(&crashed, "restart"), 1);
        assert!(same_bytes(&checkpoint(&clean, 24), &checkpoint(&crashed, 24), "model.safetensors"));
        assert_eq!(losses(&clean), losses(&crashed), "loss lines differ");
    }

    /// A rank that hangs (never reaches the step's all-reduce) does not hang the job: rank 0's
    /// collective times out, the job is ended and restarted, and finishes like a clean one.
    #[test]
    fn a_hung_rank_times_out_and_the_job_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let (clean, hung) = (tmp.path().join("clean"), tmp.path().join("hung"));
        succeed(supervised(&["--config", write_config(tmp.path(), &clean, 16).to_str().unwrap()]));
        let config = write_config(tmp.path(), &hung, 16);
        let out = succeed(supervised(&[
            "--config",
            config.to_str().unwrap(),
            "--inject",
            "hang@step=11,rank=1",
            "--collective-timeout",
            "3",
        ]));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("waited") && log.contains("a rank is lost or hung"), "{log}");
        assert_eq!(events(&hung, "restart"), 1);
        assert!(same_bytes(&checkpoint(&clean, 16), &checkpoint(&hung, 16), "model.safetensors"));
    }

    /// A NaN loss on rank 1 alone makes both ranks roll back together (the decision is taken
    /// from the all-reduced loss) and skip the same batch, exactly as one process with the
    /// whole batch does.
    #[test]
    fn a_nan_on_rank_1_rolls_back_both_ranks_like_one_process() {
        let tmp = tempfile::tempdir().unwrap();
        let (alone, ranks) = (tmp.path().join("alone"), tmp.path().join("ranks"));
        train_alone(&write_config(tmp.path(), &alone, 24), &["--inject", "nan@step=11"]);
        let config = write_config(tmp.path(), &ranks, 24);
        succeed(mpirun(&["--config", config.to_str().unwrap(), "--inject", "nan@step=11,rank=1"]));
        assert_eq!(events(&alone, "rollback"), 1);
        assert_eq!(events(&ranks, "rollback"), 1, "rank 0 logs the rollback rank 1's NaN caused");
        assert!(ranks.join("injections.rank-1.json").exists(), "the NaN fired on rank 1");
        assert!(!ranks.join("injections.json").exists(), "and not on rank 0");
        assert_curves_match(&alone, &ranks, 1e-5);
    }

    /// Resuming a two-rank run in one process continues with the same global batches: the
    /// curve goes on as an uninterrupted one-process run's, to rounding.
    #[test]
    fn a_run_resumes_with_another_number_of_ranks() {
        let tmp = tempfile::tempdir().unwrap();
        let (alone, ranks) = (tmp.path().join("alone"), tmp.path().join("ranks"));
        train_alone(&write_config(tmp.path(), &alone, 16), &[]);
        succeed(mpirun(&["--config", write_config(tmp.path(), &ranks, 16).to_str().unwrap()]));
        // Back to step 8 (the schedule is the 16-step run's), then on in one process.
        std::fs::remove_dir_all(checkpoint(&ranks, 16)).unwrap();
        let mut resume = command();
        resume.args(["train", "--resume", ranks.to_str().unwrap(), "--no-supervisor"]);
        let log = String::from_utf8_lossy(&succeed(resume).stderr).to_string();
        assert!(log.contains("saved by 2 rank(s), this job has 1"), "{log}");
        assert_curves_match(&alone, &ranks, 1e-5);
    }

    #[test]
    fn bad_launches_fail_with_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let config = write_config(tmp.path(), &run, 8);

        let out = mpirun(&["--config", config.to_str().unwrap(), "--batch-size", "5"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("batch_size 5 is not divisible by the 2 ranks"), "{err}");
        assert!(!run.join("checkpoints").exists(), "nothing trained");

        // Two ranks given different learning rates (MPMD launch: one command line per rank).
        let mut command = Command::new("mpirun");
        set_mpi_env(&mut command);
        let exe = env!("CARGO_BIN_EXE_lmforge");
        let rank = |lr: &'static str| {
            ["-np", "1", exe, "train", "--data-parallel", "--config", config.to_str().unwrap(), "--lr", lr]
                .map(String::from)
        };
        command.args(rank("0.003")).arg(":").args(rank("0.001"));
        let out = command.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("rank(s) 1 disagree with rank 0 on the run config"), "{err}");

        let out = supervised(&["--config", config.to_str().unwrap(), "--no-supervisor"]).output().unwrap();
        assert!(!out.status.success(), "--ranks with --no-supervisor");
    }
}

/// `--data-parallel` outside an MPI launcher, and `--ranks` without one installed, are refused,
/// whether or not the build has MPI.
#[test]
fn data_parallel_without_a_launcher_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = write_config(tmp.path(), &run, 8);
    let out = command().args(["train", "--data-parallel", "--config", config.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--data-parallel needs an MPI launcher") && err.contains("HINT"), "{err}");
    assert!(!run.exists(), "nothing written");

    // `--ranks` with no launcher installed.
    let out = command()
        .args(["train", "--ranks", "2", "--config", config.to_str().unwrap()])
        .env("LMFORGE_MPIRUN", "/nonexistent/mpirun")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("starting the training job with `/nonexistent/mpirun`") && err.contains("HINT"), "{err}");
}
