//! Checkpoint directories: complete and valid, or ignored.
//!
//! ```text
//! RUN/checkpoints/
//!   step-000100/
//!     model.safetensors      weights under canonical names (also a plain lmforge model dir:
//!     config.json            the ModelConfig              `io::native::load_native_dir` reads it)
//!     optimizer.safetensors  AdamW moments: exp_avg.<param>, exp_avg_sq.<param>
//!     state.json             CheckpointState: step, tokens, schedule, optimizer counters,
//!                            sampler position, RNG streams, model config, tokenizer, extra
//!     tokenizer.json         optional copy of the tokenizer (with its tokenizer_config.json,
//!                            chat_template.jinja, generation_config.json where present)
//!     manifest.json          written LAST: magic, format version, size + SHA-256 of the above
//!   step-000200/ ...
//!   best.json                the checkpoint with the lowest validation loss so far
//!   .step-000300.tmp-4242/   a save in progress (or interrupted): never read, cleaned up later
//! ```
//!
//! A save writes everything into `.step-N.tmp-<pid>/`, fsyncs each file and the directory, and
//! only then renames it to `step-N/` (and fsyncs `checkpoints/`). The rename is atomic, so a
//! crash or a full disk at any point leaves either the new checkpoint complete or only a
//! temporary directory; the previous checkpoints are never touched. Loading verifies the
//! manifest and every file's size and hash before parsing anything, and refuses the whole
//! checkpoint on any mismatch; [`latest_valid`] walks back to the newest checkpoint that passes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::manifest::{entry_for_file, Manifest, FORMAT_VERSION, MAGIC, MANIFEST_FILE};
use super::optim::{AdamWMeta, AdamWState};
use super::rng::RngState;
use super::schedule::LrSchedule;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::tokenizer::TOKENIZER_COMPANIONS;
use crate::nn::params::check_weights;

/// Subdirectory of a run directory that holds the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const BEST_FILE: &str = "best.json";

/// Everything of a training run that is not a tensor: `state.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Optimizer steps completed; names the directory (`step-000123`).
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// The schedule's config; with `step` it fully determines the next learning rate.
    pub schedule: LrSchedule,
    /// AdamW settings and step counters (the moments are in `optimizer.safetensors`).
    pub optimizer: AdamWMeta,
    /// Where the data sampler is, in whatever form the sampler chooses.
    #[serde(default)]
    pub sampler: serde_json::Value,
    /// Named random streams (e.g. `data`, `dropout`), each restored exactly.
    pub rng: BTreeMap<String, RngState>,
    pub model: ModelConfig,
    /// Path or name of the tokenizer the run uses.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Validation loss at this step, if measured; drives "keep the best" retention. (JSON has no
    /// NaN: a NaN loss is stored as `null`.)
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// Anything else the loop wants back (metrics history, run id, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// What [`save`] writes.
pub struct CheckpointData<'a> {
    pub state: &'a CheckpointState,
    /// Canonical name → weight, exactly `state.model.param_specs()`.
    pub model: &'a HashMap<String, Tensor>,
    /// The moments from [`AdamWState::tensors`].
    pub optimizer: &'a HashMap<String, Tensor>,
    /// A `tokenizer.json` to copy into the checkpoint.
    pub tokenizer_file: Option<&'a Path>,
}

/// A loaded, verified checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub model: HashMap<String, Tensor>,
    /// Ready for [`AdamW::load_state`](super::AdamW::load_state).
    pub optimizer: AdamWState,
    /// The checkpoint's own `tokenizer.json`, when one was copied in.
    pub tokenizer_file: Option<PathBuf>,
}

/// A directory [`latest_valid`] passed over, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedCheckpoint {
    pub path: PathBuf,
    pub reason: String,
}

/// Result of [`latest_valid`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatestValid {
    /// The newest checkpoint that verifies, if any.
    pub latest: Option<PathBuf>,
    /// Newer checkpoints that failed verification and partial saves, with reasons.
    pub skipped: Vec<SkippedCheckpoint>,
}

/// `best.json`: the checkpoint with the lowest validation loss.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BestCheckpoint {
    pub step: u64,
    /// Directory name inside `checkpoints/`.
    pub dir: String,
    pub val_loss: f64,
}

/// `step-000123`: zero-padded so a directory listing sorts by step up to a million steps;
/// parsing never relies on that.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A temporary directory name of ours: `(kind, pid)` for `.step-N.<kind>-<pid>`.
fn parse_temp_dir(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix(".step-")?;
    let (_, suffix) = rest.split_once('.')?;
    let (kind, pid) = suffix.rsplit_once('-')?;
    matches!(kind, "tmp" | "replaced" | "deleting").then_some(())?;
    Some((kind, pid.parse().ok()?))
}

/// Save a checkpoint as `run_dir/checkpoints/step-N/` (see the module doc for the protocol) and
/// update `best.json` when `state.val_loss` is a new best. Returns the checkpoint directory.
/// An existing `step-N` (e.g. a damaged one being redone) is replaced only once the new one is
/// complete. On any error the temporary directory is removed and the error names the path.
pub fn save(run_dir: &Path, data: &CheckpointData) -> Result<PathBuf> {
    save_with(run_dir, data, &mut |_| Ok(()))
}

/// [`save`] with a hook called before each file is written: the seam through which tests
/// inject I/O errors (a full disk) at any point of the protocol.
fn save_with(
    run_dir: &Path,
    data: &CheckpointData,
    before_write: &mut dyn FnMut(&Path) -> std::io::Result<()>,
) -> Result<PathBuf> {
    let state = data.state;
    let name = step_dir_name(state.step);
    state.model.validate()?;
    check_weights(&state.model, data.model, &run_dir.join(CHECKPOINTS_DIR).join(&name).join(MODEL_FILE))?;
    check_optimizer_tensors(state, data.optimizer)?;

    let root = run_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    // Leftovers of interrupted saves would otherwise pile up; failing to remove one is harmless.
    let _ = cleanup_partial(run_dir);

    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write_contents(&tmp, data, before_write) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(save_failed(e));
    }

    let target = root.join(&name);
    let aside = root.join(format!(".{name}.replaced-{}", std::process::id()));
    let replacing = target.exists();
    if replacing {
        if let Err(e) = std::fs::rename(&target, &aside) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(&target, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, &target) {
        if replacing {
            let _ = std::fs::rename(&aside, &target);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(&target, e));
    }
    fsync_dir(&root)?;
    if replacing {
        let _ = std::fs::remove_dir_all(&aside);
    }
    update_best(run_dir, state)?;
    Ok(target)
}

/// Adds what the user needs to know after a failed write: nothing older was harmed.
fn save_failed(e: Error) -> Error {
    const HINT: &str =
        "HINT: the previous checkpoints are untouched; free disk space (or keep fewer checkpoints) and save again";
    match e {
        Error::Io { path, source } => Error::checkpoint(path, format!("cannot write the checkpoint: {source}\n{HINT}")),
        Error::Checkpoint { path, reason } => Error::checkpoint(path, format!("{reason}\n{HINT}")),
        other => other,
    }
}

fn check_optimizer_tensors(state: &CheckpointState, tensors: &HashMap<String, Tensor>) -> Result<()> {
    for param in state.optimizer.param_steps.keys() {
        for key in [format!("exp_avg.{param}"), format!("exp_avg_sq.{param}")] {
            if !tensors.contains_key(&key) {
                return Err(Error::Input(format!(
                    "checkpoint: optimizer tensor `{key}` is missing although state.optimizer counts steps for `{param}`\nHINT: pass AdamW::state().tensors together with its meta"
                )));
            }
        }
    }
    Ok(())
}

/// Host copies of `tensors` (the same tensors when they are on the CPU already): a checkpoint
/// is written from the host, one copy per tensor, whatever device the run computes on, and
/// [`load`] puts it on the device asked for, so a run resumes on another device.
fn on_host(tensors: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    tensors.iter().map(|(name, t)| Ok((name.clone(), t.to_device(&Device::Cpu)?))).collect()
}

/// Every file into `dir`, each fsynced, then the manifest, then the directory itself.
fn write_contents(
    dir: &Path,
    data: &CheckpointData,
    before_write: &mut dyn FnMut(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let mut hook = |path: &Path| before_write(path).map_err(|e| Error::io(path, e));
    let mut written = Vec::new();

    for (file, tensors) in [(MODEL_FILE, data.model), (OPTIMIZER_FILE, data.optimizer)] {
        let path = dir.join(file);
        hook(&path)?;
        candle_core::safetensors::save(&on_host(tensors)?, &path)
            .map_err(|e| Error::checkpoint(&path, format!("cannot write: {e}")))?;
        fsync_file(&path)?;
        written.push(file);
    }
    let state_json = serde_json::to_vec_pretty(data.state)
        .map_err(|e| Error::Input(format!("checkpoint: state cannot be written as JSON: {e}")))?;
    let config_json = serde_json::to_vec_pretty(&data.state.model)
        .map_err(|e| Error::Input(format!("checkpoint: model config cannot be written as JSON: {e}")))?;
    for (file, bytes) in [(STATE_FILE, &state_json), (CONFIG_FILE, &config_json)] {
        let path = dir.join(file);
        hook(&path)?;
        write_synced(&path, bytes)?;
        written.push(file);
    }
    if let Some(source) = data.tokenizer_file {
        // The tokenizer and the companions that carry its chat template and special tokens
        // (without them a checkpoint of an instruct model could not be chatted with).
        let source_dir = source.parent().unwrap_or(Path::new("."));
        let companions = TOKENIZER_COMPANIONS.iter().map(|name| (source_dir.join(name), *name));
        for (from, file) in std::iter::once((source.to_path_buf(), TOKENIZER_FILE)).chain(companions) {
            if file != TOKENIZER_FILE && !from.is_file() {
                continue;
            }
            let path = dir.join(file);
            hook(&path)?;
            std::fs::copy(&from, &path).map_err(|e| Error::io(&from, e))?;
            fsync_file(&path)?;
            written.push(file);
        }
    }

    let mut files = BTreeMap::new();
    for file in written {
        files.insert(file.to_string(), entry_for_file(&dir.join(file))?);
    }
    let manifest = Manifest { magic: MAGIC.into(), format_version: FORMAT_VERSION, step: data.state.step, files };
    let path = dir.join(MANIFEST_FILE);
    hook(&path)?;
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Input(format!("manifest: {e}")))?;
    write_synced(&path, &bytes)?;
    fsync_dir(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

fn fsync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Make a directory's entries (creations, renames) durable. A no-op where directories cannot
/// be opened (Windows).
fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fsync_file(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Check a checkpoint without loading its tensors: manifest, every listed file's size and
/// SHA-256, and that `state.json` parses. Cheap on memory (files are streamed).
pub fn verify(dir: &Path) -> Result<()> {
    let manifest = Manifest::read(dir)?;
    for required in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE] {
        manifest.entry(dir, required)?;
    }
    for name in manifest.files.keys() {
        manifest.verify_file(dir, name)?;
    }
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state = parse_state(&state_path, &text)?;
    check_step(dir, &manifest, &state)
}

fn parse_state(path: &Path, bytes: &[u8]) -> Result<CheckpointState> {
    serde_json::from_slice(bytes).map_err(|e| Error::checkpoint(path, format!("not a valid checkpoint state: {e}")))
}

fn check_step(dir: &Path, manifest: &Manifest, state: &CheckpointState) -> Result<()> {
    if manifest.step != state.step {
        return Err(Error::checkpoint(
            dir,
            format!("manifest says step {}, state.json says step {}", manifest.step, state.step),
        ));
    }
    Ok(())
}

/// Load a checkpoint, tensors onto `device`. Every file is read once and checked against the
/// manifest before any of it is parsed; a checkpoint that fails is refused as a whole. The
/// files are held in memory while loading (about the checkpoint's size, on top of the tensors).
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let manifest = Manifest::read(dir)?;
    let mut bytes = HashMap::new();
    for name in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE] {
        bytes.insert(name, manifest.read_verified(dir, name)?);
    }
    let has_tokenizer = manifest.files.contains_key(TOKENIZER_FILE);
    for file in std::iter::once(TOKENIZER_FILE).chain(TOKENIZER_COMPANIONS) {
        if manifest.files.contains_key(file) {
            manifest.verify_file(dir, file)?;
        }
    }

    // Everything below reads bytes that passed their checksum.
    let state = parse_state(&dir.join(STATE_FILE), &bytes[STATE_FILE])?;
    check_step(dir, &manifest, &state)?;
    let config_path = dir.join(CONFIG_FILE);
    let config_text = std::str::from_utf8(&bytes[CONFIG_FILE])
        .map_err(|e| Error::checkpoint(&config_path, format!("not UTF-8: {e}")))?;
    let config = ModelConfig::from_text(config_text, &config_path.display().to_string())?;
    if config != state.model {
        return Err(Error::checkpoint(&config_path, "differs from the model config in state.json"));
    }
    let model_path = dir.join(MODEL_FILE);
    let model = candle_core::safetensors::load_buffer(&bytes[MODEL_FILE], device)
        .map_err(|e| Error::checkpoint(&model_path, format!("not a valid safetensors file: {e}")))?;
    check_weights(&state.model, &model, &model_path)?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let tensors = candle_core::safetensors::load_buffer(&bytes[OPTIMIZER_FILE], device)
        .map_err(|e| Error::checkpoint(&optimizer_path, format!("not a valid safetensors file: {e}")))?;
    let optimizer = AdamWState { meta: state.optimizer.clone(), tensors };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        model,
        optimizer,
        tokenizer_file: has_tokenizer.then(|| dir.join(TOKENIZER_FILE)),
    })
}

/// `step-N` directories of a run, sorted by step.
fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut dirs = Vec::new();
    for (name, path) in list_dir(root)? {
        if let Some(step) = parse_step_dir(&name) {
            if path.is_dir() {
                dirs.push((step, path));
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// `(name, path)` of every entry; empty if the directory does not exist.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push((name.to_string(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint of `run_dir` that passes [`verify`], walking back past damaged or
/// incomplete ones; reports each directory passed over (and any partial saves) with the reason.
/// Only the checkpoints newer than the one returned are verified.
pub fn latest_valid(run_dir: &Path) -> Result<LatestValid> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let mut result = LatestValid::default();
    for (name, path) in list_dir(&root)? {
        if let Some((kind, pid)) = parse_temp_dir(&name) {
            result.skipped.push(SkippedCheckpoint {
                path,
                reason: format!("temporary directory of an unfinished save or removal ({kind}, process {pid})"),
            });
        }
    }
    for (_, path) in step_dirs(&root)?.into_iter().rev() {
        match verify(&path) {
            Ok(()) => {
                result.latest = Some(path);
                break;
            }
            Err(e) => result.skipped.push(SkippedCheckpoint { path, reason: e.to_string() }),
        }
    }
    Ok(result)
}

/// The best checkpoint recorded in `best.json`, if any.
pub fn best(run_dir: &Path) -> Result<Option<BestCheckpoint>> {
    let path = run_dir.join(CHECKPOINTS_DIR).join(BEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| Error::checkpoint(&path, format!("not valid: {e}")))
}

/// Record `state` in `best.json` if its validation loss beats the recorded one (or the recorded
/// entry is this very step, which was just rewritten).
fn update_best(run_dir: &Path, state: &CheckpointState) -> Result<()> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let path = root.join(BEST_FILE);
    // An unreadable best.json is replaced rather than blocking the save.
    let current = best(run_dir).unwrap_or(None).filter(|b| root.join(&b.dir).is_dir());
    let loss = state.val_loss.filter(|l| l.is_finite());
    let same_step = current.as_ref().is_some_and(|b| b.step == state.step);
    let new = match (loss, &current) {
        (Some(l), Some(b)) if l < b.val_loss || same_step => Some(l),
        (Some(l), None) => Some(l),
        (None, _) if same_step => {
            // The recorded best was overwritten by a checkpoint without a loss.
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            return Ok(());
        }
        _ => None,
    };
    if let Some(val_loss) = new {
        let best = BestCheckpoint { step: state.step, dir: step_dir_name(state.step), val_loss };
        let tmp = root.join(format!(".{BEST_FILE}.tmp-{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(&best).map_err(|e| Error::Input(format!("best.json: {e}")))?;
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        fsync_dir(&root)?;
    }
    Ok(())
}

/// Remove temporary directories left by saves or removals whose process is gone (or is this
/// one: a process runs one save at a time). Returns what was removed.
pub fn cleanup_partial(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let mut removed = Vec::new();
    for (name, path) in list_dir(&root)? {
        let Some((_, pid)) = parse_temp_dir(&name) else { continue };
        if pid != std::process::id() && process_alive(pid) {
            continue; // another trainer may be writing it right now
        }
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Whether process `pid` may still write. A zombie may not: it has exited and only waits to be
/// reaped, which in a container without an init may never happen, so its partial saves are
/// stale. Where this cannot be known (not Linux), assume it may, so a concurrent save is never
/// deleted (stale directories then stay until removed by hand).
fn process_alive(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    // `/proc/PID/stat` is "PID (COMMAND) STATE …"; COMMAND may hold spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

/// Retention: keep the `keep_last` newest checkpoints up to and including the latest valid one,
/// plus the best one from `best.json`; remove the older rest and stale partial saves. Damaged
/// checkpoints newer than the latest valid one are left for inspection (a save of the same
/// step replaces them), and nothing is removed when no checkpoint is valid. The latest valid
/// checkpoint is always kept, even with `keep_last = 0`. Returns the removed directories.
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    let mut removed = cleanup_partial(run_dir)?;
    let Some(latest) = latest_valid(run_dir)?.latest else { return Ok(removed) };
    let root = run_dir.join(CHECKPOINTS_DIR);
    let best_dir = best(run_dir).unwrap_or(None).map(|b| root.join(b.dir));
    let dirs = step_dirs(&root)?;
    let latest_step = dirs.iter().find(|(_, p)| *p == latest).map_or(0, |(s, _)| *s);
    let older: Vec<&(u64, PathBuf)> = dirs.iter().filter(|(s, _)| *s <= latest_step).collect();
    let keep = keep_last.max(1);
    for (step, path) in older.iter().rev().skip(keep) {
        if Some(path) == best_dir.as_ref() {
            continue;
        }
        // Rename first, so an interrupted removal never leaves a half-deleted `step-N`.
        let doomed = root.join(format!(".{}.deleting-{}", step_dir_name(*step), std::process::id()));
        std::fs::rename(path, &doomed).map_err(|e| Error::io(path, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        removed.push(path.clone());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{AdamW, AdamWConfig};
    use crate::train::rng::TrainRng;
    use crate::train::schedule::Decay;
    use candle_core::backprop::GradStore;
    use candle_core::Var;

    /// A fresh directory under the system temp dir, removed on drop.
    use crate::test_util::TempDir;

    fn toy_model() -> ModelConfig {
        let mut c = crate::config::presets::get("tiny-llama").unwrap();
        c.vocab_size = 32;
        c.d_model = 16;
        c.attention.heads = 2;
        c.attention.kv_heads = 1;
        c.layers = 2;
        c.context_length = 8;
        c.ffn = crate::config::Ffn::Gated { hidden: 24, act: crate::config::Activation::Silu };
        c
    }

    /// A model after `steps` optimizer steps, with its optimizer and a state at that step.
    struct Run {
        vars: HashMap<String, Var>,
        opt: AdamW,
        state: CheckpointState,
    }

    fn trained(steps: u64, val_loss: Option<f64>) -> Run {
        let config = toy_model();
        let vars: HashMap<String, Var> = crate::model::init_weights(&config, 7, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, Var::from_tensor(&t).unwrap()))
            .collect();
        let mut opt = AdamW::for_model(AdamWConfig::default(), &config, &vars).unwrap();
        let mut rng = TrainRng::seed_from(11);
        let mut names: Vec<String> = vars.keys().cloned().collect();
        names.sort();
        for _ in 0..steps {
            let mut grads = GradStore::default();
            for name in &names {
                let var = &vars[name];
                let g: Vec<f32> = (0..var.elem_count()).map(|_| rng.next_f32() - 0.5).collect();
                grads.insert(var.as_tensor(), Tensor::from_vec(g, var.shape(), &Device::Cpu).unwrap());
            }
            opt.step(&grads, 1e-2).unwrap();
        }
        let state = CheckpointState {
            step: steps,
            tokens_seen: steps * 1024,
            schedule: LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup_steps: 2, total_steps: 100, decay: Decay::Cosine },
            optimizer: opt.state().unwrap().meta,
            sampler: serde_json::json!({ "epoch": 1, "offset": steps * 4 }),
            rng: [("data".to_string(), rng.state())].into_iter().collect(),
            model: config,
            tokenizer: Some("tokenizers/bpe-32.json".into()),
            val_loss,
            extra: serde_json::json!({ "train_loss": [3.2, 3.1] }),
        };
        Run { vars, opt, state }
    }

    fn weights(run: &Run) -> HashMap<String, Tensor> {
        run.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect()
    }

    fn save_run(run_dir: &Path, run: &Run) -> PathBuf {
        let model = weights(run);
        let optimizer = run.opt.state().unwrap().tensors;
        save(run_dir, &CheckpointData { state: &run.state, model: &model, optimizer: &optimizer, tokenizer_file: None })
            .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    fn same_bits(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
        assert_eq!(a.len(), b.len());
        for (name, t) in a {
            assert_eq!(t.dims(), b[name].dims(), "{name}");
            assert_eq!(bits(t), bits(&b[name]), "{name} differs");
        }
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let tmp = TempDir::new("roundtrip");
        let run = trained(3, Some(2.5));
        let tok = tmp.0.join("tok.json");
        std::fs::write(&tok, "{\"model\": {}}").unwrap();
        // A companion with the chat template travels with the tokenizer.
        std::fs::write(tmp.0.join("tokenizer_config.json"), "{\"chat_template\": \"{{ x }}\"}").unwrap();
        let model = weights(&run);
        let opt_state = run.opt.state().unwrap();
        let dir = save(
            &tmp.0,
            &CheckpointData {
                state: &run.state,
                model: &model,
                optimizer: &opt_state.tensors,
                tokenizer_file: Some(&tok),
            },
        )
        .unwrap();
        assert_eq!(dir, tmp.0.join("checkpoints/step-000003"));

        let ck = load(&dir, &Device::Cpu).unwrap();
        assert_eq!(ck.state, run.state);
        same_bits(&ck.model, &model);
        same_bits(&ck.optimizer.tensors, &opt_state.tensors);
        assert_eq!(ck.optimizer.meta, opt_state.meta);
        assert_eq!(ck.tokenizer_file, Some(dir.join(TOKENIZER_FILE)));
        assert_eq!(std::fs::read_to_string(dir.join(TOKENIZER_FILE)).unwrap(), "{\"model\": {}}");
        let companion = dir.join("tokenizer_config.json");
        assert_eq!(std::fs::read_to_string(&companion).unwrap(), "{\"chat_template\": \"{{ x }}\"}");
        assert!(!dir.join("chat_template.jinja").exists(), "only companions that exist are copied");
        // It is under the manifest's checksums like every other file.
        std::fs::write(&companion, "{\"chat_template\": \"{{ y }}\"}").unwrap();
        assert!(load(&dir, &Device::Cpu).is_err(), "a tampered tokenizer_config.json must not load");
        std::fs::write(&companion, "{\"chat_template\": \"{{ x }}\"}").unwrap();

        // The RNG continues exactly.
        let mut a = TrainRng::from_state(run.state.rng["data"]).unwrap();
        let mut b = TrainRng::from_state(ck.state.rng["data"]).unwrap();
        assert_eq!(
            (0..10).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..10).map(|_| b.next_u64()).collect::<Vec<_>>()
        );

        // Resuming from the checkpoint gives the same next step as continuing in memory.
        let fresh: HashMap<String, Var> =
            ck.model.iter().map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap())).collect();
        let mut resumed = AdamW::for_model(AdamWConfig::default(), &ck.state.model, &fresh).unwrap();
        resumed.load_state(&ck.optimizer).unwrap();
        let mut original = run.opt;
        let mut g1 = GradStore::default();
        let mut g2 = GradStore::default();
        for (name, var) in &run.vars {
            let g = var.as_tensor().affine(0.3, 0.01).unwrap();
            g1.insert(var.as_tensor(), g.clone());
            g2.insert(fresh[name].as_tensor(), g);
        }
        original.step(&g1, 1e-2).unwrap();
        resumed.step(&g2, 1e-2).unwrap();
        for (name, var) in &run.vars {
            assert_eq!(bits(var.as_tensor()), bits(fresh[name].as_tensor()), "{name} after resume");
        }
    }

    #[test]
    fn checkpoint_dir_is_a_plain_model_dir() {
        let tmp = TempDir::new("native");
        let run = trained(1, None);
        let dir = save_run(&tmp.0, &run);
        let loaded = crate::io::native::load_native_dir(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.config, run.state.model);
        same_bits(&loaded.weights, &weights(&run));
        loaded.build().unwrap();
    }

    #[test]
    fn corrupted_byte_is_rejected_everywhere() {
        let tmp = TempDir::new("corrupt");
        let good = save_run(&tmp.0, &trained(1, None));
        let bad = save_run(&tmp.0, &trained(2, None));
        let path = bad.join(OPTIMIZER_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() - 5;
        bytes[i] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();

        let err = load(&bad, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("optimizer.safetensors") && err.contains("SHA-256") && err.contains("HINT"), "{err}");
        assert!(verify(&bad).is_err());
        let scan = latest_valid(&tmp.0).unwrap();
        assert_eq!(scan.latest, Some(good));
        assert_eq!(scan.skipped.len(), 1);
        assert_eq!(scan.skipped[0].path, bad);
        assert!(scan.skipped[0].reason.contains("SHA-256"), "{:?}", scan.skipped);
    }

    #[test]
    fn truncated_file_is_rejected() {
        let tmp = TempDir::new("truncate");
        let dir = save_run(&tmp.0, &trained(1, None));
        let path = dir.join(MODEL_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        let err = load(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
        assert_eq!(latest_valid(&tmp.0).unwrap().latest, None);
    }

    #[test]
    fn missing_manifest_or_file_is_skipped() {
        let tmp = TempDir::new("nomanifest");
        let good = save_run(&tmp.0, &trained(1, None));
        let no_manifest = save_run(&tmp.0, &trained(2, None));
        std::fs::remove_file(no_manifest.join(MANIFEST_FILE)).unwrap();
        let no_state = save_run(&tmp.0, &trained(3, None));
        std::fs::remove_file(no_state.join(STATE_FILE)).unwrap();

        let scan = latest_valid(&tmp.0).unwrap();
        assert_eq!(scan.latest, Some(good));
        let reasons: Vec<(&Path, &str)> = scan.skipped.iter().map(|s| (s.path.as_path(), s.reason.as_str())).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert_eq!(reasons[0].0, no_state);
        assert!(reasons[0].1.contains("missing"), "{reasons:?}");
        assert_eq!(reasons[1].0, no_manifest);
        assert!(reasons[1].1.contains("manifest.json"), "{reasons:?}");
        assert!(load(&no_manifest, &Device::Cpu).is_err());
    }

    #[test]
    fn wrong_magic_or_version_is_refused() {
        let tmp = TempDir::new("magic");
        let dir = save_run(&tmp.0, &trained(1, None));
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"format_version\": 1", "\"format_version\": 99")).unwrap();
        let err = load(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("version 99"), "{err}");
        std::fs::write(&path, text.replace(MAGIC, "something-else")).unwrap();
        assert!(load(&dir, &Device::Cpu).err().unwrap().to_string().contains("magic"));
        std::fs::write(&path, "{ not json").unwrap();
        assert!(load(&dir, &Device::Cpu).is_err());
    }

    #[test]
    fn partial_tmp_dir_is_ignored_and_cleaned_up() {
        let tmp = TempDir::new("partial");
        let good = save_run(&tmp.0, &trained(1, None));
        // An interrupted save by a process that no longer exists: data but no manifest.
        let dead_pid = 999_999_999u32;
        let partial = tmp.0.join(CHECKPOINTS_DIR).join(format!(".step-000002.tmp-{dead_pid}"));
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::copy(good.join(MODEL_FILE), partial.join(MODEL_FILE)).unwrap();

        let scan = latest_valid(&tmp.0).unwrap();
        assert_eq!(scan.latest, Some(good.clone()));
        assert_eq!(scan.skipped.len(), 1);
        assert_eq!(scan.skipped[0].path, partial);
        assert!(scan.skipped[0].reason.contains("unfinished save"), "{:?}", scan.skipped);

        assert_eq!(cleanup_partial(&tmp.0).unwrap(), vec![partial.clone()]);
        assert!(!partial.exists());
        // The next save cleans them up too.
        std::fs::create_dir_all(&partial).unwrap();
        save_run(&tmp.0, &trained(2, None));
        assert!(!partial.exists());
        assert!(latest_valid(&tmp.0).unwrap().skipped.is_empty());
    }

    /// A worker killed mid-save stays a zombie until reaped, which may be never: its partial
    /// save and half-removed checkpoint are stale all the same.
    #[test]
    fn partial_saves_of_a_zombie_are_cleaned_up() {
        let tmp = TempDir::new("zombie");
        save_run(&tmp.0, &trained(1, None));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let stat = format!("/proc/{pid}/stat");
        let is_zombie = || std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z "));
        for _ in 0..500 {
            if is_zombie() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(is_zombie(), "the unreaped child should be a zombie");
        let root = tmp.0.join(CHECKPOINTS_DIR);
        let leftovers =
            [root.join(format!(".step-000002.tmp-{pid}")), root.join(format!(".step-000001.deleting-{pid}"))];
        for dir in &leftovers {
            std::fs::create_dir_all(dir).unwrap();
        }
        let mut removed = cleanup_partial(&tmp.0).unwrap();
        removed.sort();
        let mut expected = leftovers.to_vec();
        expected.sort();
        assert_eq!(removed, expected);

        // A live writer's partial save is left alone.
        let mut live = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let busy = root.join(format!(".step-000003.tmp-{}", live.id()));
        std::fs::create_dir_all(&busy).unwrap();
        assert!(cleanup_partial(&tmp.0).unwrap().is_empty());
        assert!(busy.exists());
        live.kill().unwrap();
        live.wait().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn io_error_during_save_keeps_previous_checkpoint() {
        let tmp = TempDir::new("diskfull");
        let first = save_run(&tmp.0, &trained(1, None));
        let before = std::fs::read(first.join(MODEL_FILE)).unwrap();
        let run = trained(2, None);
        let model = weights(&run);
        let optimizer = run.opt.state().unwrap().tensors;
        let data = CheckpointData { state: &run.state, model: &model, optimizer: &optimizer, tokenizer_file: None };
        for failing in [OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE] {
            let mut inject = |path: &Path| {
                if path.file_name().is_some_and(|n| n == failing) {
                    Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
                } else {
                    Ok(())
                }
            };
            let err = save_with(&tmp.0, &data, &mut inject).err().unwrap().to_string();
            assert!(err.contains(failing) && err.contains(".step-000002.tmp-"), "error names the path: {err}");
            assert!(err.contains("No space left") && err.contains("HINT"), "{err}");
            // Nothing of the failed save remains; the previous checkpoint is untouched.
            let entries: Vec<String> =
                list_dir(&tmp.0.join(CHECKPOINTS_DIR)).unwrap().into_iter().map(|(n, _)| n).collect();
            assert_eq!(entries, vec!["step-000001".to_string()], "after failing on {failing}");
            assert_eq!(std::fs::read(first.join(MODEL_FILE)).unwrap(), before);
            assert_eq!(latest_valid(&tmp.0).unwrap().latest, Some(first.clone()));
        }
    }

    /// A real full disk: `LMFORGE_FULL_DISK_DIR` must be an empty directory on a small
    /// filesystem with room for one checkpoint but not two, e.g. as root:
    /// `mount -t tmpfs -o size=200k tmpfs /tmp/tinyfs`, then
    /// `LMFORGE_FULL_DISK_DIR=/tmp/tinyfs cargo test --release -- --ignored real_full_disk`.
    #[test]
    #[ignore = "needs a small filesystem"]
    fn real_full_disk_keeps_previous_checkpoint() {
        let run_dir = PathBuf::from(std::env::var("LMFORGE_FULL_DISK_DIR").expect("set LMFORGE_FULL_DISK_DIR"));
        let first = save_run(&run_dir, &trained(1, None));
        let err = (2..10).find_map(|step| {
            let run = trained(step, None);
            let model = weights(&run);
            let optimizer = run.opt.state().unwrap().tensors;
            save(
                &run_dir,
                &CheckpointData { state: &run.state, model: &model, optimizer: &optimizer, tokenizer_file: None },
            )
            .err()
        });
        let err = err.expect("the filesystem never filled up").to_string();
        println!("{err}");
        assert!(err.contains(".tmp-"), "error names the path: {err}");
        assert_eq!(latest_valid(&run_dir).unwrap().skipped, vec![]);
        load(&first, &Device::Cpu).unwrap();
        std::fs::remove_dir_all(run_dir.join(CHECKPOINTS_DIR)).unwrap();
    }

    #[test]
    fn resaving_a_damaged_step_replaces_it() {
        let tmp = TempDir::new("replace");
        let dir = save_run(&tmp.0, &trained(2, None));
        std::fs::write(dir.join(STATE_FILE), "garbage").unwrap();
        assert!(verify(&dir).is_err());
        let again = save_run(&tmp.0, &trained(2, None));
        assert_eq!(again, dir);
        verify(&dir).unwrap();
        let names: Vec<String> = list_dir(&tmp.0.join(CHECKPOINTS_DIR)).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["step-000002".to_string()]);
    }

    #[test]
    fn retention_keeps_last_k_and_best() {
        let tmp = TempDir::new("retain");
        let losses = [Some(3.0), Some(2.0), Some(2.5), None, Some(2.2), Some(f64::NAN)];
        let dirs: Vec<PathBuf> =
            losses.iter().enumerate().map(|(i, l)| save_run(&tmp.0, &trained(i as u64 + 1, *l))).collect();
        let best_now = best(&tmp.0).unwrap().unwrap();
        assert_eq!((best_now.step, best_now.val_loss), (2, 2.0));

        let removed = prune(&tmp.0, 2).unwrap();
        assert_eq!(removed, vec![dirs[3].clone(), dirs[2].clone(), dirs[0].clone()]);
        let names: Vec<String> = list_dir(&tmp.0.join(CHECKPOINTS_DIR)).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["best.json", "step-000002", "step-000005", "step-000006"]);
        load(&dirs[1], &Device::Cpu).unwrap();
        assert!(prune(&tmp.0, 2).unwrap().is_empty(), "idempotent");
    }

    #[test]
    fn retention_never_removes_the_latest_valid_checkpoint() {
        let tmp = TempDir::new("retain-valid");
        let dirs: Vec<PathBuf> = (1..=3).map(|i| save_run(&tmp.0, &trained(i, None))).collect();
        std::fs::remove_file(dirs[2].join(MANIFEST_FILE)).unwrap(); // newest is damaged
        let removed = prune(&tmp.0, 1).unwrap();
        assert_eq!(removed, vec![dirs[0].clone()]);
        assert!(dirs[1].exists() && dirs[2].exists());
        assert_eq!(latest_valid(&tmp.0).unwrap().latest, Some(dirs[1].clone()));

        let empty = TempDir::new("retain-none");
        assert!(prune(&empty.0, 3).unwrap().is_empty());
        assert_eq!(latest_valid(&empty.0).unwrap(), LatestValid::default());
    }

    #[test]
    fn bad_inputs_are_errors_before_anything_is_written() {
        let tmp = TempDir::new("badinput");
        let run = trained(1, None);
        let mut model = weights(&run);
        model.remove("final_norm.weight");
        let optimizer = run.opt.state().unwrap().tensors;
        let err = save(
            &tmp.0,
            &CheckpointData { state: &run.state, model: &model, optimizer: &optimizer, tokenizer_file: None },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("final_norm.weight"), "{err}");
        let model = weights(&run);
        let empty = HashMap::new();
        assert!(save(
            &tmp.0,
            &CheckpointData { state: &run.state, model: &model, optimizer: &empty, tokenizer_file: None }
        )
        .is_err());
        assert!(!tmp.0.join(CHECKPOINTS_DIR).exists());
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(step_dir_name(123), "step-000123");
        assert_eq!(step_dir_name(12_345_678), "step-12345678");
        assert_eq!(parse_step_dir("step-000123"), Some(123));
        assert_eq!(parse_step_dir("step-12345678"), Some(12_345_678));
        for bad in ["step-", "step-12a", "step--1", "Step-1", ".step-000001.tmp-5"] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
        assert_eq!(parse_temp_dir(".step-000001.tmp-42"), Some(("tmp", 42)));
        assert_eq!(parse_temp_dir(".step-000001.other-42"), None);
        assert_eq!(parse_temp_dir("step-000001"), None);
    }
}
