//! Training the encoder–decoder end to end: the gradient of the whole model's loss (encoder,
//! cross-attention, tied scaled embeddings, padding) against f64 central finite differences,
//! and a tiny copy task that the model must learn, which needs the decoder to read the source.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model, Seq2SeqBatch};

fn config(settings: &[&str], vocab: usize) -> ModelConfig {
    let base = [
        "d_model=16",
        "layers=2",
        "layout.encoder_layers=2",
        "ffn.hidden=32",
        "attention.heads=2",
        "attention.kv_heads=2",
        "dropout.embeddings=0",
        "dropout.residual=0",
        "dropout.attention=0",
    ];
    let settings: Vec<String> = base.iter().chain(settings).map(|s| s.to_string()).collect();
    let mut config = apply_overrides(&presets::get("tiny-transformer").unwrap(), &settings).unwrap();
    config.vocab_size = vocab;
    config
}

fn pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![5, 6, 7, 8, 9, 10, 2], vec![11, 12, 13]),
        (vec![14, 15, 2], vec![16, 17, 18, 19, 5]),
        (vec![20, 21, 22, 2], vec![23]),
    ]
}

/// The loss of `batch` (f64, label smoothing 0.1) with `weights`.
fn loss(config: &ModelConfig, weights: &HashMap<String, Tensor>, batch: &Seq2SeqBatch) -> f64 {
    let model = Model::new(config, weights, Path::new("test")).unwrap();
    model.seq2seq_loss(batch, 0.1, None).unwrap().to_scalar::<f64>().unwrap()
}

/// Autograd's gradient of the whole encoder–decoder loss equals central finite differences in
/// f64 for entries of every kind of parameter: the shared, scaled, tied embedding (reached from
/// the encoder, the decoder and the head), encoder attention and FFN, decoder self- and
/// cross-attention, and the norms. A wrong backward anywhere between the source and the loss
/// (a cross-attention key or value gradient, a padding mask, the embedding scale) fails here.
#[test]
fn encoder_decoder_gradients_match_finite_differences() {
    for placement in ["norm_placement=post", "norm_placement=pre"] {
        let config = config(&[placement], 30);
        let weights: HashMap<String, Tensor> = init_weights(&config, 3, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let t = t.to_dtype(DType::F64).unwrap();
                // Projections well above the training init, so attention is far from uniform.
                let t = if t.rank() == 2 && name != "tok_embeddings.weight" { (t * 10.0).unwrap() } else { t };
                (name, t)
            })
            .collect();
        let batch = Seq2SeqBatch::from_pairs(&pairs(), 1, 2, 0, &Device::Cpu).unwrap();
        let vars: HashMap<String, Var> =
            weights.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
        let tracked = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let model = Model::new(&config, &tracked, Path::new("test")).unwrap();
        let grads = model.seq2seq_loss(&batch, 0.1, None).unwrap().backward().unwrap();
        let checked = [
            ("tok_embeddings.weight", &[5usize, 3][..]),
            ("tok_embeddings.weight", &[11, 0]),
            ("tok_embeddings.weight", &[1, 7]),
            ("encoder.layers.0.attn.q.weight", &[3, 4]),
            ("encoder.layers.0.attn.k.weight", &[2, 9]),
            ("encoder.layers.0.attn.v.weight", &[7, 1]),
            ("encoder.layers.1.ffn.up.weight", &[5, 2]),
            ("encoder.layers.0.attn_norm.weight", &[6]),
            ("layers.0.cross_attn.k.weight", &[1, 5]),
            ("layers.1.cross_attn.v.weight", &[4, 4]),
            ("layers.1.cross_attn.q.weight", &[0, 3]),
            ("layers.0.attn.v.weight", &[8, 8]),
            ("layers.1.ffn.down.weight", &[2, 30]),
        ];
        for (name, index) in checked {
            let name = name.to_string();
            let var = vars.get(&name).unwrap_or_else(|| panic!("{placement}: no parameter {name}"));
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{placement}: no gradient for {name}"));
            let flat_index = index.iter().zip(grad.dims()).fold(0, |acc, (&i, &d)| acc * d + i);
            let analytic = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap()[flat_index];
            let h = 1e-5;
            let shifted = |delta: f64| {
                let mut values = weights[&name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                values[flat_index] += delta;
                let mut w = weights.clone();
                w.insert(name.clone(), Tensor::from_vec(values, weights[&name].dims(), &Device::Cpu).unwrap());
                loss(&config, &w, &batch)
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
            assert!(
                (analytic - numeric).abs() <= tol,
                "{placement}: d loss / d {name}{index:?}: autograd {analytic:e}, finite differences {numeric:e}"
            );
        }
    }
}

/// An encoder–decoder with mixture-of-experts blocks trains its routers as a language model
/// does: the training loss carries the balance and z losses of every expert layer, encoder and
/// decoder, and evaluation reports their routing.
#[test]
fn mixture_of_experts_seq2seq_training_collects_router_losses() {
    let moe = r#"ffn={"kind":"moe","experts":4,"top_k":2,"expert":{"kind":"mlp","hidden":32,"act":"relu"}}"#;
    let config = config(&[moe], 30);
    let weights = init_weights(&config, 5, &Device::Cpu).unwrap();
    let model = Model::new(&config, &weights, Path::new("test")).unwrap();
    let batch = Seq2SeqBatch::from_pairs(&pairs(), 1, 2, 0, &Device::Cpu).unwrap();
    let mut rng = lmforge::train::rng::TrainRng::seed_from(3);
    let loss = model.seq2seq_training_loss(&batch, 0.1, &mut rng).unwrap();
    let layers = config.layers + config.layout.encoder_layers();
    assert_eq!(loss.routing.len(), layers, "one routing report per expert layer, encoder and decoder");
    let router = loss.router.as_ref().expect("router losses in the objective");
    let balance: f32 = router.balance.to_scalar().unwrap();
    assert!(balance.is_finite() && balance > 0.0, "balance loss {balance}");
    let lm: f32 = loss.lm.to_scalar().unwrap();
    let objective: f32 = loss.objective().unwrap().to_scalar().unwrap();
    assert!(objective > lm, "the objective adds the router terms: {objective} vs {lm}");
    let (eval, routing) = model.seq2seq_loss_and_routing(&batch).unwrap();
    assert_eq!(routing.len(), layers);
    let plain: f32 = model.seq2seq_loss(&batch, 0.0, None).unwrap().to_scalar().unwrap();
    assert_eq!(eval.to_scalar::<f32>().unwrap().to_bits(), plain.to_bits());
}

/// Random sequences over 10 content tokens, and the task of writing them back. Ids: 0 padding,
/// 1 decoder start, 2 end; the source carries its end token.
fn copy_pairs(count: usize, seed: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut state = seed;
    let mut next = move |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    (0..count)
        .map(|_| {
            let len = 3 + next(6) as usize;
            let text: Vec<u32> = (0..len).map(|_| 3 + next(10) as u32).collect();
            (text.iter().copied().chain([2]).collect(), text)
        })
        .collect()
}

/// The copy task as training sees it (padded batches, post-LN, scaled tied embeddings,
/// sinusoids, the training step's optimizer) drives the loss far below what a decoder that
/// ignores its source can reach: predicting random tokens blind costs ln 10 ≈ 2.3 nats each.
/// A cross-attention that sees nothing (a wrong padding mask, a broken key or value gradient,
/// an unscaled embedding that drowns in the positions) stays near that floor.
///
/// Copying sequences of 3–8 tokens needs position-to-position alignment, which this model
/// finds only after a plateau: at 300 steps it is still at the blind floor (2.27), with
/// pre-norm or learned positions alike, while sequences of one or two tokens are copied by
/// then; 1,000 steps clear it. The same plateau, longer, is what a translator's first
/// thousands of steps look like.
#[test]
fn encoder_decoder_learns_to_copy() {
    use lmforge::train::optim::{AdamW, AdamWConfig};
    let config = config(&["d_model=32", "ffn.hidden=64", "layers=1", "layout.encoder_layers=1"], 13);
    let vars: HashMap<String, Var> = init_weights(&config, 7, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Var::from_tensor(&t).unwrap()))
        .collect();
    let weights = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = Model::new(&config, &weights, Path::new("test")).unwrap();
    let adam = AdamWConfig { beta2: 0.98, weight_decay: 0.0, ..AdamWConfig::default() };
    let mut optimizer = AdamW::for_model(adam, &config, &vars).unwrap();
    let batch = |seed| Seq2SeqBatch::from_pairs(&copy_pairs(16, seed), 1, 2, 0, &Device::Cpu).unwrap();
    let held_out = batch(u64::MAX);
    let loss_of = |b: &Seq2SeqBatch| model.seq2seq_loss(b, 0.0, None).unwrap().to_scalar::<f32>().unwrap();
    let before = loss_of(&held_out);
    for step in 0..1000u64 {
        let lr = 3e-3 * ((step + 1) as f64 / 30.0).min(1.0);
        let grads = model.seq2seq_loss(&batch(step), 0.0, None).unwrap().backward().unwrap();
        optimizer.step(&grads, lr).unwrap();
    }
    let after = loss_of(&held_out);
    assert!(after < 0.5, "copy task: held-out loss {before:.3} → {after:.3}, expected < 0.5 (blind: 2.3)");
}
