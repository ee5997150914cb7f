//! Mixture of experts end to end: model-level gradients of the router and the experts against
//! finite differences, a tiny mixture that trains and stays balanced, sparse upcycling from a
//! dense model (exact at noise 0, on SmolLM2 too) that `train --init-from` continues, export to
//! Hugging Face Mixtral checked by `transformers`, and clear errors on bad input.

mod command;
mod fetched;
mod small_run;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model};
use lmforge::train::TrainRng;

use command::{fails, lmforge, ok_stderr, reference_python};
use fetched::smollm2;
use small_run::{corpus, metrics};

fn f64_weights(config: &ModelConfig, scale: f64) -> HashMap<String, Tensor> {
    init_weights(config, 5, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            // Routers at unit scale: logits of order one, far from ties in the top k.
            let s = if name.ends_with("router.weight") { 50.0 } else { scale };
            (name, (t.to_dtype(DType::F64).unwrap() * s).unwrap())
        })
        .collect()
}

/// The training objective (language-model loss + weighted balance and z losses) of a
/// two-layer mixture, differentiated through the router, the dispatch and the experts, against
/// central differences in f64; and the language-model part is exactly what `loss` (validation,
/// `score`) computes.
#[test]
fn moe_gradients_match_finite_differences() {
    for gating in ["renormalized", "softmax"] {
        let settings: Vec<String> = [
            "layers=2",
            "d_model=8",
            "attention.heads=2",
            "attention.kv_heads=1",
            "vocab_size=13",
            "context_length=16",
            "ffn.expert.hidden=6",
            "ffn.router.balance_loss_coef=0.3",
            "ffn.router.z_loss_coef=0.05",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("ffn.router.gating={gating}")])
        .collect();
        let config = apply_overrides(&presets::get("tiny-mixtral").unwrap(), &settings).unwrap();
        let weights = f64_weights(&config, 5.0);
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 11, 3, 9], [4, 4, 12, 0, 6, 8, 10]], &Device::Cpu).unwrap();
        let (inputs, targets) = (ids.narrow(1, 0, 6).unwrap(), ids.narrow(1, 1, 6).unwrap());
        let objective = |weights: &HashMap<String, Tensor>| -> (Tensor, f64) {
            let model = Model::new(&config, weights, Path::new("test")).unwrap();
            let loss = model.training_loss(&inputs, &targets, &mut TrainRng::seed_from(0)).unwrap();
            let lm = loss.lm.to_scalar::<f64>().unwrap();
            let validation = model.loss(&inputs, &targets).unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(lm, validation, "the LM part is the validation loss");
            let objective = loss.objective().unwrap();
            assert!(objective.to_scalar::<f64>().unwrap() > lm + 0.1, "the router losses are in the objective");
            (objective, lm)
        };

        let vars: HashMap<String, Var> =
            weights.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
        let tracked = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let grads = objective(&tracked).0.backward().unwrap();
        let checked = [
            "layers.0.ffn.router.weight",
            "layers.1.ffn.router.weight",
            "layers.0.ffn.experts.1.gate.weight",
            "layers.1.ffn.experts.2.up.weight",
            "layers.1.ffn.experts.3.down.weight",
            "layers.0.attn.q.weight",
        ];
        for name in checked {
            let analytic: Vec<f64> =
                grads.get(vars[name].as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(analytic.iter().any(|g| g.abs() > 1e-6), "{gating} {name}: no gradient");
            let base: Vec<f64> = weights[name].flatten_all().unwrap().to_vec1().unwrap();
            for e in (0..base.len()).step_by(3) {
                let at = |delta: f64| {
                    let mut w = weights.clone();
                    let mut values = base.clone();
                    values[e] += delta;
                    w.insert(name.to_string(), Tensor::from_vec(values, weights[name].shape(), &Device::Cpu).unwrap());
                    objective(&w).0.to_scalar::<f64>().unwrap()
                };
                let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
                let err = (numeric - analytic[e]).abs();
                assert!(
                    err <= 1e-5 * (1.0 + numeric.abs()),
                    "{gating} {name}[{e}]: autograd {} vs finite difference {numeric}",
                    analytic[e]
                );
            }
        }
    }
}

/// A run config for a tiny mixture on Austen; `extra` are more `--set`s, `train_extra` more
/// lines of its `[train]` table.
fn write_run_config(dir: &Path, run: &Path, steps: u64, extra: &[&str], train_extra: &str) -> PathBuf {
    let set: Vec<String> = [
        "layers=2",
        "d_model=64",
        "attention.heads=4",
        "attention.kv_heads=2",
        "context_length=64",
        "vocab_size=512",
        "ffn.expert.hidden=96",
    ]
    .iter()
    .chain(extra)
    .map(|s| format!("{s:?}"))
    .collect();
    let text = format!(
        r#"
run_dir = "{run}"
[model]
arch = "tiny-mixtral"
set = [{set}]
[data]
train_files = ["{corpus}"]
val_fraction = 0.1
[train]
steps = {steps}
batch_size = 8
seq_len = 32
warmup_steps = 5
lr = 0.003
eval_every = 20
eval_batches = 4
sample_every = 0
checkpoint_every = 40
log_every = 100
{train_extra}
"#,
        run = run.display(),
        set = set.join(", "),
        corpus = corpus().display(),
    );
    let path = dir.join(format!("{}.toml", run.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Trained with the balancing loss, a tiny mixture lowers its validation loss and no expert
/// takes more than twice its uniform share; each step logs the router losses (and with a
/// capacity limit, the dropped share), each evaluation the expert load, and `plot` draws it.
#[test]
fn a_tiny_mixture_trains_with_balanced_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("moe");
    let config = write_run_config(tmp.path(), &run, 80, &["ffn.router.capacity_factor=1.5"], "");
    let stderr = ok_stderr(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    assert!(!stderr.contains("warning:"), "{stderr}");
    let lines = metrics(&run);
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("val_loss").is_some()).collect();
    let (first, last) = (evals[0], evals.last().unwrap());
    let (v0, v1) = (first["val_loss"].as_f64().unwrap(), last["val_loss"].as_f64().unwrap());
    assert!(v1 < v0 - 1.0, "validation loss {v0} -> {v1}");
    assert_eq!(last["step"], 80);
    for eval in &evals {
        let load: Vec<Vec<f64>> = serde_json::from_value(eval["expert_load"].clone()).unwrap();
        assert_eq!((load.len(), load[0].len()), (2, 4));
        for layer in &load {
            assert!((layer.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{layer:?}");
            assert!(layer.iter().all(|&s| s <= 2.0 / 4.0), "step {}: {load:?}", eval["step"]);
        }
    }
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 80);
    for step in &steps {
        let balance = step["balance_loss"].as_f64().unwrap();
        assert!((0.95..1.5).contains(&balance), "balance loss {balance}: 1 is perfectly balanced");
        assert!(step["z_loss"].as_f64().unwrap() > 0.0);
        assert!((0.0..0.5).contains(&step["dropped"].as_f64().unwrap()));
    }
    let png = tmp.path().join("loss.png");
    ok_stderr(&["plot", run.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 800, "the expert-load panel is drawn");

    // With a limit just above the uniform share, some expert exceeds it: a warning, logged too.
    let strict = tmp.path().join("strict");
    let config = write_run_config(tmp.path(), &strict, 6, &[], "max_expert_share = 0.26");
    let stderr = ok_stderr(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    assert!(stderr.contains("warning: step 0: layer") && stderr.contains("limit 0.26"), "{stderr}");
    assert!(stderr.contains("HINT: a larger ffn.router.balance_loss_coef (now 0.01)"), "{stderr}");
    assert!(metrics(&strict).iter().any(|l| l.get("expert_warning").is_some()));
}

/// A tiny dense model upcycled from the command line: the same logits at noise 0, a model
/// directory that `train --init-from` continues, and errors for what cannot be upcycled.
#[test]
fn upcycle_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let settings =
        ["--set", "layers=2", "--set", "d_model=64", "--set", "attention.heads=4", "--set", "vocab_size=512"];
    ok_stderr(&[&["init", "tiny-llama", "--out", &path("dense")][..], &settings].concat());
    let stderr = ok_stderr(&[
        "upcycle",
        "--model",
        &path("dense"),
        "--experts",
        "4",
        "--top-k",
        "2",
        "--router-init",
        "normal:0.5",
        "--out",
        &path("moe"),
    ]);
    assert!(stderr.contains("4 experts, top-2"), "{stderr}");
    let ids = "5,17,91,3,44,2,60,7,8,9";
    let logits = |model: &str| {
        ok_stderr(&["score", "--model", &path(model), "--ids", ids, "--out", &path(&format!("{model}.safetensors"))]);
        candle_core::safetensors::load(path(&format!("{model}.safetensors")), &Device::Cpu).unwrap()["logits"].clone()
    };
    let diff: f32 = (logits("moe") - logits("dense")).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff <= 1e-5, "upcycled logits differ by {diff}");
    // From a Hugging Face directory too (transformers' tiny Llama fixture, 2 experts, top-1).
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let hf = hf.to_str().unwrap();
    ok_stderr(&["upcycle", "--model", hf, "--experts", "2", "--top-k", "1", "--out", &path("hf-moe")]);
    let ids = "5,17,91,3,44,2,60,7";
    ok_stderr(&["score", "--model", hf, "--ids", ids, "--out", &path("hf.safetensors")]);
    ok_stderr(&["score", "--model", &path("hf-moe"), "--ids", ids, "--out", &path("hf-moe.safetensors")]);
    let load = |name: &str| candle_core::safetensors::load(path(name), &Device::Cpu).unwrap()["logits"].clone();
    let diff: f32 = (load("hf-moe.safetensors") - load("hf.safetensors"))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff <= 1e-5, "upcycled HF fixture's logits differ by {diff}");

    // Continued training from the upcycled directory, with a router setting changed.
    let run = path("run");
    ok_stderr(&[
        "train",
        "--run",
        &run,
        "--init-from",
        &path("moe"),
        "--set",
        "ffn.router.jitter=0.01",
        "--train-file",
        corpus().to_str().unwrap(),
        "--steps",
        "6",
        "--warmup-steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "3",
        "--sample-every",
        "0",
        "--no-supervisor",
    ]);
    let evals: Vec<serde_json::Value> =
        metrics(Path::new(&run)).into_iter().filter(|l| l.get("expert_load").is_some()).collect();
    assert_eq!(evals.len(), 3, "evaluations at steps 0, 3 and 6 log the expert load");

    let err = fails(&["upcycle", "--model", &path("moe"), "--experts", "4", "--top-k", "2", "--out", &path("x")]);
    assert!(err.contains("already a mixture of experts"), "{err}");
    let err = fails(&["upcycle", "--model", &path("dense"), "--experts", "2", "--top-k", "3", "--out", &path("x")]);
    assert!(err.contains("ffn.top_k = 3, expected 1..=2"), "{err}");
    let err = fails(&["upcycle", "--model", &path("dense"), "--experts", "0", "--top-k", "1", "--out", &path("x")]);
    assert!(err.contains("ffn.experts = 0"), "{err}");
    let err = fails(&[
        "upcycle",
        "--model",
        &path("dense"),
        "--experts",
        "2",
        "--top-k",
        "1",
        "--router-init",
        "uniform",
        "--out",
        &path("x"),
    ]);
    assert!(err.contains("expected `zeros` or `normal:SIGMA`"), "{err}");
    assert!(!Path::new(&path("x")).exists(), "nothing written on error");
}

/// Bad router settings and impossible mixtures are errors naming the field, never panics;
/// `ffn=gated` on a mixture takes the expert's settings.
#[test]
fn bad_mixtures_are_clear_errors() {
    for (setting, expect) in [
        ("ffn.top_k=5", "ffn.top_k = 5, expected 1..=4"),
        ("ffn.experts=0", "ffn.experts = 0, expected a positive number"),
        ("ffn.router.capacity_factor=0", "ffn.router.capacity_factor = 0"),
        ("ffn.router.capacity_factor=-1.5", "ffn.router.capacity_factor = -1.5"),
        ("ffn.router.jitter=1", "ffn.router.jitter = 1"),
        ("ffn.router.gating=top1", "unknown variant `top1`"),
    ] {
        let err = fails(&["show", "tiny-mixtral", "--set", setting]);
        assert!(err.contains(expect), "{setting}: {err}");
    }
    let err = fails(&["show", "tiny-llama", "--set", "ffn=moe"]);
    assert!(err.contains("HINT: give the whole value, e.g. --set 'ffn={\"kind\":\"moe\","), "{err}");
    let out = lmforge(&["show", "tiny-mixtral", "--set", "ffn=gated", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["config"]["ffn"], serde_json::json!({"kind": "gated", "hidden": 256, "act": "silu"}));
}

/// The upcycling invariant on real pretrained weights: SmolLM2-135M as 4 experts, top-2, has
/// SmolLM2's logits.
#[test]
fn smollm2_upcycled_keeps_its_logits() {
    let Some(path) = smollm2() else { return };
    let dense = lmforge::io::load_model(&path, &Device::Cpu).unwrap();
    let how = lmforge::model::upcycle::Upcycle {
        experts: 4,
        top_k: 2,
        router_init: lmforge::model::upcycle::RouterInit::Normal(0.02),
        expert_noise: 0.0,
        seed: 0,
    };
    let ids = Tensor::new(&[[1u32, 504, 3250, 282, 4649, 314, 2, 28, 1489, 42]], &Device::Cpu).unwrap();
    let max_diff = |dtype: DType| -> (f64, f64) {
        let dense_weights: HashMap<String, Tensor> =
            dense.weights.iter().map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap())).collect();
        let (config, weights) = lmforge::model::upcycle::upcycle(&dense.config, &dense_weights, &how).unwrap();
        let want = Model::new(&dense.config, &dense_weights, &path).unwrap().forward(&ids, None).unwrap();
        let got = Model::new(&config, &weights, &path).unwrap().forward(&ids, None).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap();
        let value = |t: Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        (value(diff), value(scale))
    };
    // The same function: equal to 1e-5 in f64 arithmetic.
    let (diff, _) = max_diff(DType::F64);
    assert!(diff <= 1e-5, "upcycled SmolLM2's f64 logits differ by {diff}");
    // In f32 the two sum in different orders (each token's two expert outputs, weighted, versus
    // one block's), and 30 layers carry the rounding to the logits: equal to 1e-5 relative.
    let (diff, scale) = max_diff(DType::F32);
    assert!(diff <= 1e-5 * scale, "upcycled SmolLM2's f32 logits differ by {diff} (largest logit {scale})");
    eprintln!("f32 logits: max difference {diff:e}, largest magnitude {scale}");
}

/// A trained mixture exports as Hugging Face Mixtral, and `transformers` loads it with the same
/// logits (scripts/check_export.py). Needs a Python with torch and transformers in
/// `LMFORGE_PYTHON` ([`reference_python`]).
#[test]
fn trained_mixture_exports_to_mixtral_with_the_same_logits() {
    let Some(python) = reference_python("trained_mixture_exports_to_mixtral_with_the_same_logits") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    // Tied embeddings and an upcycled start (SmolLM2's shape), then a few steps so the experts
    // and the router differ from their copies.
    let settings = [
        "--set",
        "layers=2",
        "--set",
        "d_model=64",
        "--set",
        "attention.heads=4",
        "--set",
        "vocab_size=512",
        "--set",
        "tie_embeddings=true",
    ];
    ok_stderr(&[&["init", "tiny-llama", "--out", &path("dense")][..], &settings].concat());
    ok_stderr(&["upcycle", "--model", &path("dense"), "--experts", "4", "--top-k", "2", "--out", &path("moe")]);
    ok_stderr(&[
        "train",
        "--run",
        &path("run"),
        "--init-from",
        &path("moe"),
        "--train-file",
        corpus().to_str().unwrap(),
        "--steps",
        "4",
        "--warmup-steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--no-supervisor",
    ]);
    let stderr = ok_stderr(&["export", "--model", &path("run"), "--to", "hf", "--out", &path("hf")]);
    assert!(stderr.contains("`mixtral`"), "{stderr}");
    let ids = "5,17,91,3,44,2,60,7,8,9";
    ok_stderr(&["score", "--model", &path("run"), "--ids", ids, "--out", &path("logits.safetensors")]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_export.py");
    let out = Command::new(python).arg(script).args([&path("hf"), ids, &path("logits.safetensors")]).output().unwrap();
    assert!(
        out.status.success(),
        "transformers disagrees with lmforge:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
