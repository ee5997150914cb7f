//! Position information: rotary embeddings, ALiBi slopes, sinusoidal tables.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::SinusoidLayout;

/// Rotary position embedding in the Hugging Face layout ("rotate half": dim `i` pairs with
/// `i + rot/2`), applied to the first `rot` dims of each head and leaving the rest untouched
/// (Phi-2 rotates 32 of 80).
pub struct Rope {
    /// `1 / theta^(2i / rot)` for `i in 0..rot/2`.
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(theta: f64, rotary_dims: usize) -> Self {
        let inv_freq =
            (0..rotary_dims / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / rotary_dims as f64)) as f32).collect();
        Rope { inv_freq }
    }

    fn dims(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `(cos, sin)`, each `(T, rot)`, for absolute positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(len * half * 2);
        for pos in start..start + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (len, 2 * half), device)?;
        Ok((angles.cos()?, angles.sin()?))
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
