//! The encoder–decoder model: parity with transformers' `MarianMTModel` on tiny random
//! checkpoints (made by `scripts/make_seq2seq_fixtures.py`), export back to Marian, cached
//! decoding against full recomputation, beam search against greedy decoding and exhaustive
//! search, and the training loss of padded batches.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::generate::{generate_seq2seq, generate_seq2seq_batch, Hypothesis, Search, Seq2SeqOptions};
use lmforge::io::hf::export_hf_dir;
use lmforge::io::load_model;
use lmforge::model::{init_weights, Model, Seq2SeqBatch};
use lmforge::train::rng::TrainRng;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn ids_of(tensor: &Tensor) -> Vec<u32> {
    tensor
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn options(max_new_tokens: usize) -> Seq2SeqOptions {
    Seq2SeqOptions { max_new_tokens, stop: vec![] }
}

/// Logits, padded-batch logits and 24 greedy tokens as transformers computes them, then an
/// export that reloads with the same logits.
fn check_marian(name: &str) {
    let dir = fixture(name);
    let want = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let loaded = load_model(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = loaded.build().unwrap_or_else(|e| panic!("{name}: {e}"));
    let source = ids_of(&want["source_ids"]);
    let decoder_input = ids_of(&want["decoder_input_ids"]);
    assert_eq!(Some(decoder_input[0]), model.decoder_start_token_id(), "{name}: start token from config.json");

    let encoded = model.encode(&row(&source), None).unwrap();
    let logits = model.decoder_logits(&encoded, &row(&decoder_input)).unwrap().squeeze(0).unwrap();
    let diff = max_diff(&logits, &want["logits"]);
    assert!(diff <= 1e-4, "{name}: max |logit difference| = {diff:e} > 1e-4");

    // A right-padded batch: the padding hidden from the encoder and the cross-attention.
    let lengths: Vec<usize> = ids_of(&want["batch_source_lengths"]).into_iter().map(|l| l as usize).collect();
    let sources = want["batch_source_ids"].to_dtype(DType::U32).unwrap();
    let encoded = model.encode(&sources, Some(&lengths)).unwrap();
    let batch_input = want["batch_decoder_input_ids"].to_dtype(DType::U32).unwrap();
    let batch_logits = model.decoder_logits(&encoded, &batch_input).unwrap();
    let diff = max_diff(&batch_logits, &want["batch_logits"]);
    assert!(diff <= 1e-4, "{name}: padded batch: max |logit difference| = {diff:e} > 1e-4");

    let greedy = ids_of(&want["greedy"]);
    let got = generate_seq2seq(&model, &source, &options(greedy.len()), Search::Greedy, |_| Ok(())).unwrap();
    assert_eq!(got.ids, greedy, "{name}: greedy continuation differs from transformers");
    let beam = Search::Beam { beams: 1, length_penalty: 1.0 };
    let one_beam = generate_seq2seq(&model, &source, &options(greedy.len()), beam, |_| Ok(())).unwrap();
    assert_eq!(one_beam.ids, greedy, "{name}: one beam is greedy decoding");

    let out = tempfile::tempdir().unwrap();
    let family = export_hf_dir(&loaded.config, &loaded.weights, None, out.path()).unwrap();
    assert_eq!(family, "marian");
    let reloaded = load_model(out.path(), &Device::Cpu).unwrap();
    assert_eq!(reloaded.config, loaded.config, "{name}: the config survives export");
    let reloaded = reloaded.build().unwrap();
    let encoded = reloaded.encode(&row(&source), None).unwrap();
    let again = reloaded.decoder_logits(&encoded, &row(&decoder_input)).unwrap().squeeze(0).unwrap();
    assert_eq!(max_diff(&again, &logits), 0.0, "{name}: exported model gives different logits");
}

#[test]
fn marian_matches_transformers() {
    check_marian("marian");
}

#[test]
fn marian_unscaled_relu_matches_transformers() {
    check_marian("marian_unscaled");
}

/// What transformers builds differently from lmforge's shared-embedding model is refused with
/// the field named, not loaded wrongly.
#[test]
fn marian_configs_lmforge_cannot_build_are_refused_by_name() {
    for (field, value) in [
        ("tie_word_embeddings", "false"),
        ("share_encoder_decoder_embeddings", "false"),
        ("decoder_vocab_size", "97"),
        ("decoder_attention_heads", "2"),
        ("decoder_ffn_dim", "64"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture("marian").join(file), dir.path().join(file)).unwrap();
        }
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&path, config.to_string()).unwrap();
        let err = load_model(dir.path(), &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{field} = {value} loaded"))
            .to_string();
        assert!(err.contains(field) && err.contains("config.json"), "{field}: {err}");
    }
}

/// A random encoder–decoder model with weights large enough that attention is far from
/// uniform (and with `settings` applied to `tiny-transformer`).
fn random_model(settings: &[String], vocab: usize, seed: u64) -> Model {
    let mut config: ModelConfig = apply_overrides(&presets::get("tiny-transformer").unwrap(), settings).unwrap();
    config.vocab_size = vocab;
    let weights = init_weights(&config, seed, &Device::Cpu).unwrap();
    // The projections larger than the training init (the scaled embeddings already have unit size).
    let scale =
        |name: &str, v: Tensor| if v.rank() == 2 && name != "tok_embeddings.weight" { (v * 8.0).unwrap() } else { v };
    let weights = weights
        .into_iter()
        .map(|(k, v)| {
            let v = scale(&k, v);
            (k, v)
        })
        .collect();
    Model::new(&config, &weights, Path::new("test")).unwrap()
}

/// `tiny-transformer` at test scale, then `extra` settings.
fn small(extra: &[&str]) -> Vec<String> {
    let base = [
        "d_model=32",
        "layers=2",
        "layout.encoder_layers=2",
        "ffn.hidden=64",
        "attention.heads=4",
        "attention.kv_heads=4",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

#[test]
fn cached_decoding_matches_full_recomputation() {
    for placement in ["norm_placement=post", "norm_placement=pre"] {
        for positions in ["positions=sinusoidal", "positions=learned"] {
            let model = random_model(&small(&[placement, positions, "attention.kv_heads=2"]), 50, 3);
            // Two sources of different lengths, decoded together.
            let sources = Tensor::new(&[[5u32, 9, 13, 2, 7, 7, 30], [8, 1, 44, 0, 0, 0, 0]], &Device::Cpu).unwrap();
            let encoded = model.encode(&sources, Some(&[7, 3])).unwrap();
            let targets: Vec<Vec<u32>> =
                vec![(0..12).map(|i| (i * 7 + 1) % 50).collect(), (0..12).map(|i| (i * 11 + 4) % 50).collect()];
            let inputs = Tensor::new(targets.clone(), &Device::Cpu).unwrap();
            let full = model.decoder_logits(&encoded, &inputs).unwrap(); // (2, 12, V)
            let mut cache = model.start_decoding(&encoded).unwrap();
            let steps: Vec<Tensor> = (0..12)
                .map(|t| {
                    let ids = inputs.narrow(1, t, 1).unwrap();
                    model.forward(&ids, Some(&mut cache)).unwrap()
                })
                .collect();
            let cached = Tensor::cat(&steps, 1).unwrap();
            let scale: f32 = full.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let diff = max_diff(&cached, &full);
            assert!(
                diff <= 2e-5 * scale.max(1.0),
                "{placement} {positions}: cached vs full: {diff:e} (max |logit| {scale})"
            );
            assert_eq!(cache.position(), 12);
        }
    }
}

/// `Σ log p` of `target` given `source`, from one teacher-forced forward (independent of the
/// search's own bookkeeping).
fn log_prob(model: &Model, source: &[u32], target: &[u32]) -> f64 {
    let start = model.decoder_start_token_id().unwrap();
    let input: Vec<u32> = std::iter::once(start).chain(target[..target.len() - 1].iter().copied()).collect();
    let encoded = model.encode(&row(source), None).unwrap();
    let logits = model.decoder_logits(&encoded, &row(&input)).unwrap().squeeze(0).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap().to_vec2::<f32>().unwrap();
    target.iter().enumerate().map(|(t, &id)| log_probs[t][id as usize] as f64).sum()
}

#[test]
fn beam_search_is_greedy_with_one_beam_and_never_worse_with_more() {
    let model = random_model(&small(&["layout.eos_token_id=3"]), 40, 11);
    let mut improved = 0;
    for seed in 0..6u32 {
        let source: Vec<u32> = (0..5 + seed).map(|i| (i * 13 + seed * 7 + 5) % 40).collect();
        let greedy = generate_seq2seq(&model, &source, &options(20), Search::Greedy, |_| Ok(())).unwrap();
        let one =
            generate_seq2seq(&model, &source, &options(20), Search::Beam { beams: 1, length_penalty: 1.0 }, |_| Ok(()))
                .unwrap();
        assert_eq!(one.ids, greedy.ids, "source {source:?}");
        for alpha in [0.0, 1.0] {
            let beam = generate_seq2seq(
                &model,
                &source,
                &options(20),
                Search::Beam { beams: 4, length_penalty: alpha },
                |_| Ok(()),
            )
            .unwrap();
            // The reported score is the model's, recomputed independently.
            let rescored = log_prob(&model, &source, &beam.ids);
            assert!((beam.log_prob - rescored).abs() < 1e-3, "{} vs {rescored}", beam.log_prob);
            let greedy_score =
                Hypothesis { ids: greedy.ids.clone(), log_prob: log_prob(&model, &source, &greedy.ids) }.score(alpha);
            assert!(
                beam.score(alpha) >= greedy_score - 1e-4,
                "α {alpha}: beam {:?} scores {} < greedy {:?} {greedy_score}",
                beam.ids,
                beam.score(alpha),
                greedy.ids
            );
            improved += (beam.score(alpha) > greedy_score + 1e-4) as usize;
        }
    }
    assert!(improved > 0, "beam search never found anything better than greedy: the test is too easy");
}

/// With as many beams as there are sequences, beam search is exhaustive: it must return the
/// best of all targets up to the length limit (ending in the end token, or cut at the limit).
#[test]
fn beam_search_with_enough_beams_finds_the_best_sequence() {
    let (vocab, eos, limit) = (5u32, 4u32, 3usize);
    let model = random_model(&small(&["layout.eos_token_id=4"]), vocab as usize, 5);
    let source = [1u32, 2, 3, 1];
    let mut all: Vec<Vec<u32>> = Vec::new();
    let mut frontier: Vec<Vec<u32>> = vec![vec![]];
    for len in 1..=limit {
        let mut next = Vec::new();
        for prefix in &frontier {
            for token in 0..vocab {
                let mut seq = prefix.clone();
                seq.push(token);
                if token == eos || len == limit {
                    all.push(seq);
                } else {
                    next.push(seq);
                }
            }
        }
        frontier = next;
    }
    for alpha in [0.0, 0.7, 2.0] {
        let best = all
            .iter()
            .map(|seq| Hypothesis { ids: seq.clone(), log_prob: log_prob(&model, &source, seq) })
            .max_by(|a, b| a.score(alpha).total_cmp(&b.score(alpha)))
            .unwrap();
        let beam = Search::Beam { beams: all.len(), length_penalty: alpha };
        let found = generate_seq2seq(&model, &source, &options(limit), beam, |_| Ok(())).unwrap();
        assert_eq!(found.ids, best.ids, "α {alpha}: beam {found:?} vs exhaustive {best:?}");
    }
}

#[test]
fn batched_generation_matches_one_source_at_a_time() {
    let model = random_model(&small(&["layout.eos_token_id=3"]), 40, 21);
    let sources: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9, 10, 11], vec![12, 1], vec![30, 31, 32, 33]];
    for search in [|| Search::Greedy, || Search::Beam { beams: 3, length_penalty: 1.0 }] {
        let batch = generate_seq2seq_batch(&model, &sources, &options(15), search(), |_| Ok(())).unwrap();
        for (source, got) in sources.iter().zip(&batch) {
            let alone = generate_seq2seq(&model, source, &options(15), search(), |_| Ok(())).unwrap();
            assert_eq!(got.ids, alone.ids, "source {source:?}");
            assert!((got.log_prob - alone.log_prob).abs() < 1e-3);
        }
    }
}

fn pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![5, 6, 7, 8, 9, 10, 11, 12], vec![13, 14, 15]),
        (vec![16, 17], vec![18, 19, 20, 21, 22, 23, 24]),
        (vec![25, 26, 27, 28], vec![29]),
    ]
}

/// The loss of a padded batch is the token-weighted mean of each pair's loss alone: padding
/// neither reaches the loss nor changes what the real tokens see.
#[test]
fn padded_batch_loss_is_the_mean_over_real_tokens() {
    let model = random_model(&small(&[]), 40, 8);
    let batch = Seq2SeqBatch::from_pairs(&pairs(), 1, 2, 0, &Device::Cpu).unwrap();
    let loss: f32 = model.seq2seq_loss(&batch, 0.0, None).unwrap().to_scalar().unwrap();
    let (mut sum, mut tokens) = (0.0, 0);
    for pair in pairs() {
        let alone = Seq2SeqBatch::from_pairs(std::slice::from_ref(&pair), 1, 2, 0, &Device::Cpu).unwrap();
        let n = alone.target_tokens();
        sum += model.seq2seq_loss(&alone, 0.0, None).unwrap().to_scalar::<f32>().unwrap() as f64 * n as f64;
        tokens += n;
    }
    let want = sum / tokens as f64;
    assert!((loss as f64 - want).abs() < 1e-5, "batch {loss} vs per-pair mean {want}");
}

/// Label smoothing as PyTorch defines it, `(1 − ε)·CE + ε·mean_j(−log p_j)`, over real tokens.
#[test]
fn label_smoothing_follows_the_pytorch_definition() {
    let model = random_model(&small(&[]), 40, 9);
    let batch = Seq2SeqBatch::from_pairs(&pairs(), 1, 2, 0, &Device::Cpu).unwrap();
    let smoothed: f32 = model.seq2seq_loss(&batch, 0.1, None).unwrap().to_scalar().unwrap();
    // By hand from the logits.
    let mut want = 0.0;
    let mut tokens = 0;
    for pair in pairs() {
        let alone = Seq2SeqBatch::from_pairs(std::slice::from_ref(&pair), 1, 2, 0, &Device::Cpu).unwrap();
        let encoded = model.encode(&alone.source, None).unwrap();
        let logits = model.decoder_logits(&encoded, &alone.decoder_input).unwrap().squeeze(0).unwrap();
        let log_probs =
            candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).unwrap(), 1).unwrap().to_vec2::<f64>().unwrap();
        for (t, &target) in ids_of(&alone.targets).iter().enumerate() {
            let uniform = -log_probs[t].iter().sum::<f64>() / log_probs[t].len() as f64;
            want += 0.9 * -log_probs[t][target as usize] + 0.1 * uniform;
            tokens += 1;
        }
    }
    want /= tokens as f64;
    assert!((smoothed as f64 - want).abs() < 1e-5, "{smoothed} vs {want}");
    assert!(model.seq2seq_loss(&batch, 1.0, None).is_err());
}

fn loss_and_grads(settings: &[&str], batch: &Seq2SeqBatch, rng: Option<u64>) -> (f32, Vec<(String, Tensor)>) {
    let settings = small(settings);
    let mut config = apply_overrides(&presets::get("tiny-transformer").unwrap(), &settings).unwrap();
    config.vocab_size = 40;
    let vars: Vec<(String, Var)> = init_weights(&config, 4, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, Var::from_tensor(&(t * 5.0).unwrap()).unwrap()))
        .collect();
    let weights = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = Model::new(&config, &weights, Path::new("test")).unwrap();
    let mut stream = rng.map(TrainRng::seed_from);
    let loss = model.seq2seq_loss(batch, 0.1, stream.as_mut().map(|r| r as &mut dyn rand::RngCore)).unwrap();
    let grads = loss.backward().unwrap();
    let mut out: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}")).clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.to_scalar().unwrap(), out)
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f32, what: &str) {
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let scale: f32 = y.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let diff = max_diff(x, y);
        // The floor is for gradients that are zero in exact arithmetic (a key bias shifts every
        // score of a row alike, which softmax ignores): both sides are then rounding noise.
        assert!(diff <= tol * scale + 1e-6, "{what}: {name} differs by {diff:e} (max |grad| {scale:e})");
    }
}

/// Training through the flash kernel (padding masks, dropout on the probabilities) gives the
/// loss and every parameter gradient of the composed reference path with the same masks.
#[test]
fn flash_and_naive_attention_train_alike_with_padding_and_dropout() {
    let batch = Seq2SeqBatch::from_pairs(&pairs(), 1, 2, 0, &Device::Cpu).unwrap();
    for rng in [None, Some(17)] {
        let (flash_loss, flash) = loss_and_grads(&[], &batch, rng);
        let (naive_loss, naive) = loss_and_grads(&["attention.implementation=naive"], &batch, rng);
        assert!((flash_loss - naive_loss).abs() < 1e-4 * naive_loss.abs(), "{flash_loss} vs {naive_loss}");
        assert_same(&flash, &naive, 1e-4, &format!("dropout stream {rng:?}"));
    }
}

/// Dropout draws from the given stream only: the same stream state gives bit-identical loss
/// and gradients (what makes resume exact), another state other masks, and no stream is the
/// deterministic evaluation forward.
#[test]
fn dropout_follows_the_stream_it_is_given() {
    let batch = Seq2SeqBatch::from_pairs(&pairs(), 1, 2, 0, &Device::Cpu).unwrap();
    let (a, grads_a) = loss_and_grads(&[], &batch, Some(5));
    let (b, grads_b) = loss_and_grads(&[], &batch, Some(5));
    assert_eq!(a.to_bits(), b.to_bits());
    assert_same(&grads_a, &grads_b, 0.0, "same stream");
    let (c, _) = loss_and_grads(&[], &batch, Some(6));
    let (eval, _) = loss_and_grads(&[], &batch, None);
    let (eval_again, _) = loss_and_grads(&[], &batch, None);
    assert_ne!(a, c, "another stream, other masks");
    assert_ne!(a, eval, "dropout is on in training");
    assert_eq!(eval.to_bits(), eval_again.to_bits());
    // Without dropout rates a stream changes nothing.
    let off = ["dropout.embeddings=0", "dropout.residual=0", "dropout.attention=0"];
    let (with_stream, _) = loss_and_grads(&off, &batch, Some(5));
    let (without, _) = loss_and_grads(&off, &batch, None);
    assert_eq!(with_stream.to_bits(), without.to_bits());
}

/// Every problem of an encoder–decoder config is reported with its field path; configs written
/// before the new fields existed still parse, with the old behaviour.
#[test]
fn encoder_decoder_configs_are_validated_and_old_configs_still_parse() {
    let base = presets::get("tiny-transformer").unwrap();
    let problems = |settings: &[&str]| -> String {
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        apply_overrides(&base, &settings).unwrap_err().to_string()
    };
    for (setting, expect) in [
        ("positions=rope", "positions: rope and alibi are not supported with layout = encoder_decoder"),
        ("attention.window=8", "attention.window: sliding windows are not supported"),
        ("dropout.attention=1.0", "dropout.attention = 1, expected a probability 0 <= p < 1"),
        ("dropout.residual=-0.1", "dropout.residual = -0.1"),
        ("layout.decoder_start_token_id=8000", "layout.decoder_start_token_id = 8000 is outside the vocabulary"),
        ("layout.eos_token_id=9000", "layout.eos_token_id = 9000 is outside the vocabulary"),
        ("layout.encoder_layers=0", "layout.encoder_layers = 0"),
    ] {
        let err = problems(&[setting]);
        assert!(err.contains(expect), "{setting}: {err}");
    }
    // A config file from before: a unit-like sinusoidal variant, no dropout, no scaling, an
    // encoder-decoder layout without special tokens.
    let old = r#"{"name": "old", "layout": {"kind": "encoder_decoder", "encoder_layers": 2}, "vocab_size": 50,
        "d_model": 16, "layers": 2, "context_length": 32, "norm": {"kind": "layer_norm"}, "norm_placement": "post",
        "norm_eps": 1e-5, "positions": {"kind": "sinusoidal"}, "attention": {"heads": 2, "kv_heads": 2},
        "ffn": {"kind": "mlp", "hidden": 32, "act": "relu"}, "bias": true, "tie_embeddings": true}"#;
    let config = ModelConfig::from_text(old, "old.json").unwrap();
    assert_eq!(config.positions, lmforge::config::Positions::Sinusoidal { layout: Default::default() });
    assert!(config.dropout.is_off() && !config.scale_embeddings);
    assert_eq!(config.layout, lmforge::config::Layout::encoder_decoder(2));
    // And it serialises back without the new fields.
    let text = serde_json::to_string(&config).unwrap();
    assert!(
        !text.contains("dropout") && !text.contains("scale_embeddings") && !text.contains("eos_token_id"),
        "{text}"
    );
}
