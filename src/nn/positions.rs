//! Position information: rotary embeddings (with their context-extending scalings), ALiBi
//! slopes, sinusoidal tables.

use std::f64::consts::PI;

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::{RopeScaling, SinusoidLayout};

/// Rotary position embedding in the Hugging Face layout ("rotate half": dim `i` pairs with
/// `i + rot/2`), applied to the first `rot` dims of each head and leaving the rest untouched
/// (Phi-2 rotates 32 of 80).
///
/// A [`RopeScaling`] changes only the tables: it rescales the frequencies and, for YaRN,
/// multiplies cos and sin by an attention factor. The fused rope kernels take the tables as
/// they are, so every scaling runs on them unchanged.
pub struct Rope {
    /// The angle per position of each rotated pair: `1 / theta^(2i / rot)` for `i in
    /// 0..rot/2`, rescaled by the scaling if any.
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    table_scale: f32,
    /// cos and sin `(P, rot)` of positions `0..P`, computed once: a decoding step slices its row
    /// instead of building a table per token. Positions past `P` are computed when asked.
    cached: Option<(Tensor, Tensor)>,
}

/// The most positions whose tables a model keeps: 4,096 × 128 dims × cos and sin is 4 MiB in
/// f32, where a 128k-context model's whole table would be 128 MiB for tokens it rarely reaches.
pub const CACHED_ROPE_POSITIONS: usize = 4096;

impl Rope {
    pub fn new(theta: f64, rotary_dims: usize, scaling: Option<&RopeScaling>) -> Self {
        let rot = rotary_dims as f64;
        let plain: Vec<f64> = (0..rotary_dims / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / rot)).collect();
        let (inv_freq, table_scale) = match scaling {
            None => (plain, 1.0),
            Some(scaling) => scaled_frequencies(&plain, theta, rotary_dims, scaling),
        };
        Rope { inv_freq: inv_freq.iter().map(|&f| f as f32).collect(), table_scale: table_scale as f32, cached: None }
    }

    /// This rope with the tables of positions `0..positions` computed now, on `device`. The
    /// cached rows are the very values [`tables`](Self::tables) would compute.
    pub fn with_cached_tables(mut self, positions: usize, device: &Device) -> Result<Self> {
        self.cached = Some(self.compute_tables(0, positions, device)?);
        Ok(self)
    }

    fn dims(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `(cos, sin)`, each `(T, rot)`, for absolute positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        match &self.cached {
            Some((cos, sin)) if start + len <= cos.dim(0)? && cos.device().same_device(device) => {
                Ok((cos.narrow(0, start, len)?, sin.narrow(0, start, len)?))
            }
            _ => self.compute_tables(start, len, device),
        }
    }

    fn compute_tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(len * half * 2);
        for pos in start..start + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (len, 2 * half), device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        if self.table_scale == 1.0 {
            return Ok((cos, sin));
        }
        let scale = f64::from(self.table_scale);
        Ok(((cos * scale)?, (sin * scale)?))
    }

    /// Rotate `x` `(B, heads, T, head_dim)` with tables from [`tables`](Self::tables).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rot, head_dim) = (self.dims(), x.dim(D::Minus1)?);
        let dtype = x.dtype();
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let x_rot = x.narrow(D::Minus1, 0, rot)?;
        let half = rot / 2;
        let rotated_half = Tensor::cat(
            &[&x_rot.narrow(D::Minus1, half, half)?.neg()?, &x_rot.narrow(D::Minus1, 0, half)?],
            D::Minus1,
        )?;
        let out = (x_rot.broadcast_mul(&cos)? + rotated_half.broadcast_mul(&sin)?)?;
        if rot == head_dim {
            Ok(out)
        } else {
            Tensor::cat(&[&out, &x.narrow(D::Minus1, rot, head_dim - rot)?], D::Minus1)
        }
    }
}

/// Frequencies `plain` (`1 / theta^(2i / rot)`) under `scaling`, and the factor for cos and
/// sin, as transformers computes them (`modeling_rope_utils.py`:
/// `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
/// `_compute_yarn_parameters`).
fn scaled_frequencies(plain: &[f64], theta: f64, rotary_dims: usize, scaling: &RopeScaling) -> (Vec<f64>, f64) {
    match *scaling {
        RopeScaling::Linear { factor } => (plain.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context_length } => {
            let original = original_context_length as f64;
            let scaled = plain.iter().map(|&f| {
                let wavelength = 2.0 * PI / f;
                if wavelength < original / high_freq_factor {
                    f // resolves nearby tokens: kept
                } else if wavelength > original / low_freq_factor {
                    f / factor // longer than the pretraining context: interpolated
                } else {
                    let smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            });
            (scaled.collect(), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_context_length,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            // The (fractional) dim whose pair turns `rotations` times over the original context.
            let rot = rotary_dims as f64;
            let dim_turning = |rotations: f64| {
                rot * (original_context_length as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (dim_turning(beta_fast), dim_turning(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(rot - 1.0));
            if low == high {
                high += 0.001; // transformers' guard against a zero-width ramp
            }
            // 0 below `low` (fast dims: kept), 1 above `high` (slow dims: interpolated).
            let ramp = |i: usize| ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let scaled = plain.iter().enumerate().map(|(i, &f)| f / factor * ramp(i) + f * (1.0 - ramp(i)));
            let attention = attention_factor.unwrap_or_else(|| yarn_attention_factor(factor, mscale, mscale_all_dim));
            (scaled.collect(), attention)
        }
    }
}

/// YaRN's default attention factor: `0.1 ln(factor) + 1`, or with both `mscale` and
/// `mscale_all_dim` set (DeepSeek), the ratio of that formula scaled by each.
fn yarn_attention_factor(factor: f64, mscale: Option<f64>, mscale_all_dim: Option<f64>) -> f64 {
    let scale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
    match (mscale, mscale_all_dim) {
        // transformers tests their truthiness: a zero counts as unset.
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => scale(m) / scale(all),
        _ => scale(1.0),
    }
}

/// ALiBi slopes as in MPT (`build_mpt_alibi_tensor`) and BLOOM: for `n` a power of two,
/// `slope_h = 2^(-max_bias * (h + 1) / n)`. Otherwise the slopes of the next power of two are
/// interleaved (odd positions first, then even) and cut to `n`, which keeps them spread out.
pub fn alibi_slopes(heads: usize, max_bias: f64) -> Vec<f32> {
    let n2 = heads.next_power_of_two();
    let all: Vec<f32> = (1..=n2).map(|i| (2f64.powf(-(i as f64) * max_bias / n2 as f64)) as f32).collect();
    if n2 == heads {
        return all;
    }
    all.iter().skip(1).step_by(2).chain(all.iter().step_by(2)).take(heads).copied().collect()
}

/// The fixed sine/cosine table of Vaswani et al. (2017) for positions `start..start + len`,
/// `(len, d_model)`, with angles `pos / 10000^(2i/d)` for `i < d/2` (computed in f64, as
/// Marian's numpy table is). `Interleaved`: dim `2i` holds the sine and `2i + 1` the cosine;
/// `Halves`: the sines fill the first half and the cosines the second.
pub fn sinusoidal_table(
    start: usize,
    len: usize,
    d_model: usize,
    layout: SinusoidLayout,
    device: &Device,
) -> Result<Tensor> {
    let half = d_model / 2;
    let mut table = vec![0f32; len * d_model];
    for (row, pos) in table.chunks_exact_mut(d_model).zip(start..) {
        for i in 0..half {
            let angle = pos as f64 / 10_000f64.powf(2.0 * i as f64 / d_model as f64);
            let (sin_dim, cos_dim) = match layout {
                SinusoidLayout::Interleaved => (2 * i, 2 * i + 1),
                SinusoidLayout::Halves => (i, half + i),
            };
            row[sin_dim] = angle.sin() as f32;
            row[cos_dim] = angle.cos() as f32;
        }
    }
    Tensor::from_vec(table, (len, d_model), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frequencies and cos/sin factor for head_dim 16, theta 10 000, against transformers
    /// 5.24's `ROPE_INIT_FUNCTIONS` on a `LlamaConfig(hidden_size=64, num_attention_heads=4)`
    /// (an independent reference: the values below were printed by it, not by lmforge).
    fn assert_matches_transformers(scaling: RopeScaling, want_freq: [f64; 8], want_scale: f64) {
        let rope = Rope::new(10_000.0, 16, Some(&scaling));
        for (i, (&got, want)) in rope.inv_freq.iter().zip(want_freq).enumerate() {
            assert!((f64::from(got) - want).abs() <= 1e-6 * want, "{scaling:?}: frequency {i}: {got} vs {want}");
        }
        assert!((f64::from(rope.table_scale) - want_scale).abs() < 1e-6, "{scaling:?}: {}", rope.table_scale);
    }

    #[test]
    fn cached_tables_are_the_computed_ones_and_positions_past_them_are_computed() {
        let scaling = RopeScaling::Linear { factor: 2.5 };
        let plain = Rope::new(10_000.0, 16, Some(&scaling));
        let cached = Rope::new(10_000.0, 16, Some(&scaling)).with_cached_tables(10, &Device::Cpu).unwrap();
        // Inside the cache (a decoding step, a chunk), across its end, and past it.
        for (start, len) in [(0, 10), (7, 1), (3, 5), (8, 4), (12, 3)] {
            let want = plain.tables(start, len, &Device::Cpu).unwrap();
            let got = cached.tables(start, len, &Device::Cpu).unwrap();
            for (g, w) in [(&got.0, &want.0), (&got.1, &want.1)] {
                assert_eq!(g.dims(), [len, 16]);
                assert_eq!(g.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap(), "positions {start}..+{len}");
            }
        }
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let want = [0.4, 0.126491100, 0.04, 0.0126491115, 0.004, 0.00126491115, 0.0004, 0.000126491112];
        assert_matches_transformers(RopeScaling::Linear { factor: 2.5 }, want, 1.0);
    }

    #[test]
    fn llama3_scaling_keeps_fast_stretches_slow_and_blends_between() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context_length: 64,
        };
        // Dim 0 kept (wavelength 6.3 < 64 / 4), dim 1 blended, the rest divided by 8.
        let want = [1.0, 0.244384587, 0.0130422562, 0.00395284733, 0.00125, 0.000395284733, 0.000125, 0.0000395284733];
        assert_matches_transformers(scaling, want, 1.0);
    }

    #[test]
    fn yarn_scaling_ramps_between_kept_and_interpolated_dims_and_scales_the_tables() {
        let yarn = |beta_fast, beta_slow, mscale, mscale_all_dim, truncate| RopeScaling::Yarn {
            factor: 4.0,
            original_context_length: 64,
            beta_fast,
            beta_slow,
            attention_factor: None,
            mscale,
            mscale_all_dim,
            truncate,
        };
        let want = [1.0, 0.237170815, 0.0499999970, 0.00790569466, 0.0025, 0.000790569466, 0.00025, 0.0000790569466];
        assert_matches_transformers(yarn(32.0, 1.0, None, None, true), want, 1.138629436111989);
        let want = [1.0, 0.160589159, 0.025, 0.00790569466, 0.0025, 0.000790569466, 0.00025, 0.0000790569466];
        assert_matches_transformers(yarn(8.0, 2.0, Some(0.7), Some(0.5), false), want, 1.0259286501478284);

        // An explicit attention factor wins, and it scales cos and sin alike.
        let mut explicit = yarn(32.0, 1.0, None, None, true);
        if let RopeScaling::Yarn { attention_factor, .. } = &mut explicit {
            *attention_factor = Some(0.5);
        }
        let (cos, sin) = Rope::new(10_000.0, 16, Some(&explicit)).tables(0, 3, &Device::Cpu).unwrap();
        let (plain_cos, _) = Rope::new(10_000.0, 16, None).tables(0, 3, &Device::Cpu).unwrap();
        let row0: Vec<f32> = cos.get(0).unwrap().to_vec1().unwrap();
        assert!(row0.iter().all(|&c| c == 0.5), "position 0: cos = 0.5 everywhere, got {row0:?}");
        let sin0: Vec<f32> = sin.get(0).unwrap().to_vec1().unwrap();
        assert!(sin0.iter().all(|&s| s == 0.0));
        assert_eq!(plain_cos.get(0).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 16]);
    }

    #[test]
    fn alibi_slopes_power_of_two_and_not() {
        let s8 = alibi_slopes(8, 8.0);
        assert_eq!(s8[0], 0.5);
        assert!((s8[7] - 1.0 / 256.0).abs() < 1e-9);
        // 6 heads: slopes of 8 heads at odd indices (1,3,5,7), then even (0,2).
        let s6 = alibi_slopes(6, 8.0);
        assert_eq!(s6, vec![s8[1], s8[3], s8[5], s8[7], s8[0], s8[2]]);
    }

    #[test]
    fn sinusoid_layouts_hold_the_same_values_in_different_dims() {
        let dev = Device::Cpu;
        let paper = sinusoidal_table(3, 2, 8, SinusoidLayout::Interleaved, &dev).unwrap().to_vec2::<f32>().unwrap();
        let marian = sinusoidal_table(3, 2, 8, SinusoidLayout::Halves, &dev).unwrap().to_vec2::<f32>().unwrap();
        // Position 4, frequency index 1: angle 4 / 10000^(2/8) = 0.4.
        assert!((paper[1][2] - 0.4f32.sin()).abs() < 1e-7 && (paper[1][3] - 0.4f32.cos()).abs() < 1e-7);
        assert_eq!((marian[1][1], marian[1][5]), (paper[1][2], paper[1][3]));
        // Position 3 at frequency 0: sin 3, cos 3.
        assert_eq!((paper[0][0], paper[0][1]), (3f64.sin() as f32, 3f64.cos() as f32));
    }
}
