//! The mean gradient of the global batch, from every rank's gradient of its slice, and the
//! weight checksum that proves the ranks still hold the same model.
//!
//! Why the all-reduce runs after backward, not overlapped with it: candle's `backward` walks
//! the whole graph and returns every gradient at once in a `GradStore`, with no hook that fires
//! when one parameter's gradient is final. Overlap (as PyTorch DDP does, reducing a bucket
//! while backward computes the earlier layers) needs such a hook in the autograd; until then
//! the buckets are reduced one after another once backward is done.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::Collectives;
use crate::error::Result;

/// Gradient elements per all-reduce: large enough that the per-call latency is amortised,
/// small enough that the f64 staging buffer of the MPI transport stays at 32 MB.
pub const GRADIENT_BUCKET: usize = 4 << 20;

/// Replace `grads` by their mean over all ranks, for `vars` in the same order on every rank
/// (sorted by name). A variable without a gradient on some ranks (an expert no token of that
/// slice chose) counts as zero there; one without a gradient on every rank keeps none, exactly
/// as in one process that saw the whole batch.
pub fn average_gradients(collectives: &dyn Collectives, vars: &[&Var], grads: &mut GradStore) -> Result<()> {
    let ranks = collectives.ranks();
    if ranks == 1 {
        return Ok(());
    }
    let mut present: Vec<f64> =
        vars.iter().map(|v| if grads.get(v.as_tensor()).is_some() { 1.0 } else { 0.0 }).collect();
    collectives.sum_f64(&mut present)?;
    let scale = 1.0 / ranks as f32;
    let mut bucket: Vec<f32> = Vec::new();
    let mut members: Vec<&Var> = Vec::new();
    let flush = |bucket: &mut Vec<f32>, members: &mut Vec<&Var>, grads: &mut GradStore| -> Result<()> {
        collectives.all_reduce_sum(bucket)?;
        let mut offset = 0;
        for var in members.drain(..) {
            let n = var.elem_count();
            let mean: Vec<f32> = bucket[offset..offset + n].iter().map(|g| g * scale).collect();
            let mean = Tensor::from_vec(mean, var.shape(), var.device())?.to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), mean);
            offset += n;
        }
        bucket.clear();
        Ok(())
    };
    for (var, present) in vars.iter().zip(&present) {
        if *present == 0.0 {
            continue;
        }
        if !bucket.is_empty() && bucket.len() + var.elem_count() > GRADIENT_BUCKET {
            flush(&mut bucket, &mut members, grads)?;
        }
        match grads.get(var.as_tensor()) {
            Some(g) => bucket.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => bucket.resize(bucket.len() + var.elem_count(), 0.0),
        }
        members.push(var);
    }
    if !members.is_empty() {
        flush(&mut bucket, &mut members, grads)?;
    }
    Ok(())
}

/// A checksum of every bit of the weights of `vars` (in the given order): equal on two ranks
/// exactly when their models are bit-identical (barring a 2⁻⁶⁴ collision).
pub fn weights_checksum(vars: &[&Var]) -> Result<u64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for var in vars {
        let values = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for value in values {
            hash = (hash ^ value.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::distributed::SingleProcess;

    #[test]
    fn one_rank_keeps_its_gradients() {
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let loss = (w.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        average_gradients(&SingleProcess, &[&w], &mut grads).unwrap();
        assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), [2.0, 2.0, 2.0]);
    }

    #[test]
    fn the_checksum_sees_a_single_bit() {
        let a = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f32, f32::from_bits(2.0f32.to_bits() ^ 1)], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(weights_checksum(&[&a]).unwrap(), weights_checksum(&[&a]).unwrap());
        assert_ne!(weights_checksum(&[&a]).unwrap(), weights_checksum(&[&b]).unwrap());
    }
}
