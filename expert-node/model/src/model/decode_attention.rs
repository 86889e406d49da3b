//! A fused single-query attention for decode steps on the CPU in f32: each sequence's one new
//! query attends to its own cache, read in place, one rayon task per sequence. It computes the
//! same math as `Attention::attend` (scores `q·k / sqrt(d)`, softmax in f32, weighted sum of
//! values; query head h reads KV head h / groups) without the dozen small tensor operations per
//! sequence that dominate a batched decode step of a small model. Other devices and dtypes use
//! the generic tensor path.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// `queries`: `[b, heads, d]`; `keys[i]`, `values[i]`: `[kv_heads, t_i, d]`, contiguous.
/// Returns `[b, heads * d]`, or `None` when this kernel does not apply (not CPU, not f32).
pub fn decode_attention(
    queries: &Tensor,
    keys: &[Tensor],
    values: &[Tensor],
    kv_heads: usize,
) -> candle_core::Result<Option<Tensor>> {
    let all_f32_cpu = std::iter::once(queries)
        .chain(keys)
        .chain(values)
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu) && t.is_contiguous());
    if !all_f32_cpu {
        return Ok(None);
    }
    let (b, heads, d) = queries.dims3()?;
    let groups = heads / kv_heads.max(1);
    let scale = (d as f32).powf(-0.5);
    let q = queries.flatten_all()?.to_vec1::<f32>()?;
    let guards: Vec<_> = keys
        .iter()
        .chain(values)
        .map(|t| t.storage_and_layout())
        .collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(guards.len());
    for (guard, layout) in &guards {
        match &**guard {
            Storage::Cpu(CpuStorage::F32(data)) => slices.push(
                &data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()],
            ),
            _ => return Ok(None),
        }
    }
    let (k_slices, v_slices) = slices.split_at(keys.len());
    let mut out = vec![0f32; b * heads * d];
    out.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(i, out_i)| {
            let t_len = k_slices[i].len() / (kv_heads * d);
            let mut scores = vec![0f32; t_len];
            for h in 0..heads {
                let kvh = h / groups;
                let qh = &q[(i * heads + h) * d..(i * heads + h + 1) * d];
                let kh = &k_slices[i][kvh * t_len * d..(kvh + 1) * t_len * d];
                let vh = &v_slices[i][kvh * t_len * d..(kvh + 1) * t_len * d];
                let mut max = f32::NEG_INFINITY;
                for (t, s) in scores.iter_mut().enumerate() {
                    let dot: f32 = qh
                        .iter()
                        .zip(&kh[t * d..(t + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                    *s = dot * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out_i[h * d..(h + 1) * d];
                for (t, s) in scores.iter().enumerate() {
                    let p = s / sum;
                    for (acc, v) in o.iter_mut().zip(&vh[t * d..(t + 1) * d]) {
                        *acc += p * v;
                    }
                }
            }
        });
    drop(guards);
    Ok(Some(Tensor::from_vec(
        out,
        (b, heads * d),
        queries.device(),
    )?))
}
