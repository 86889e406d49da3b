//! Prefill's causal attention of one sequence in one launch (`prefill_attention.cuh`): scores,
//! mask, softmax and probs @ v with the reference's roundings (transformers 4.57.3
//! `eager_attention_forward` in bf16) in FlashAttention-2's layout (arXiv 2307.08691), the output
//! written as `[s, heads * d]`. Head sizes it is not built for take the unfused path
//! (`Attention::attend_gpu`).

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
use candle_core::{Result, Storage, Tensor, bail};
use half::bf16;

use super::{
    MODULE, PTX, allow_dynamic_shared, bf16_device, checked_i32, checked_u32, launch_config,
    with_view, wrap,
};

/// Head sizes the kernel is built for (`PREFILL_ATTENTION(D)` in prefill_attention.cuh).
const HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Query rows a block, keys a tile (`PA_ROWS`, `PA_KEYS`).
const ROWS: usize = 64;
const KEYS: usize = 64;
const _: () = assert!(ROWS == KEYS, "the query rows pass through a key tile");

/// The dynamic shared memory of a launch at head size `d`: `PrefillAttentionShared<d>`, two
/// stages of a key and a value tile, each row padded by 8 bf16 (the block's `ROWS` query rows
/// pass through the first key tile).
fn shared_bytes(d: usize) -> usize {
    2 * 2 * KEYS * (d + 8) * 2
}

/// Causal attention of one sequence's queries `q` `[heads, s, d]` (query `i` at position
/// `past + i`) over keys and values `[kv_heads, >= past + s, d]` — the cache's own buffers, rows
/// contiguous, heads any multiple of 8 elements apart — with `scale` applied to the bf16 scores.
/// Returns `[s, heads * d]`; `None` (nothing launched) with no queries or heads, off a GPU or in
/// f32, at head sizes the kernel is not built for, for layouts it does not read, or on a GPU
/// whose blocks cannot have its shared memory.
pub fn prefill_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: usize,
    scale: f32,
) -> Result<Option<Tensor>> {
    let Some(dev) = bf16_device(q) else {
        return Ok(None);
    };
    let (heads, s, d) = q.dims3()?;
    let (kv_heads, rows, _) = k.dims3()?;
    let total = past + s;
    if s == 0 || heads == 0 {
        return Ok(None);
    }
    if rows < total {
        bail!(
            "prefill attention: {s} queries after {past} cached positions need {total} keys, not {rows}"
        );
    }
    // Rows of d elements, d apart and contiguous, heads a 16-byte multiple apart, from a 16-byte
    // boundary.
    let head_stride = k.stride()[0];
    let reads = |t: &Tensor| {
        bf16_device(t).is_some()
            && t.dims() == [kv_heads, rows, d]
            && t.stride() == [head_stride, d, 1]
            && t.layout().start_offset().is_multiple_of(8)
    };
    let fits = HEAD_DIMS.contains(&d)
        && kv_heads > 0
        && heads % kv_heads == 0
        && head_stride.is_multiple_of(8)
        && reads(k)
        && reads(v);
    if !fits {
        return Ok(None);
    }
    let shared = shared_bytes(d);
    let most = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    if shared > usize::try_from(most).unwrap_or(0) {
        return Ok(None);
    }
    let func = dev.get_or_load_custom_func(&format!("prefill_attention_d{d}_bf16"), MODULE, PTX)?;
    let shared = checked_u32("shared memory", shared)?;
    allow_dynamic_shared(&func, shared)?;
    let ints = [
        checked_i32("heads", heads)?,
        checked_i32("KV heads", kv_heads)?,
        checked_i32("queries", s)?,
        checked_i32("cached positions", past)?,
    ];
    let kv_stride = i64::try_from(head_stride).map_err(|_| {
        candle_core::Error::Msg(format!("KV head stride {head_stride} exceeds i64"))
    })?;
    // SAFETY: the blocks write every element of every query row.
    let mut out = unsafe { dev.alloc::<bf16>(s * heads * d) }?;
    with_view(q, |qv| {
        with_strided(k, |kv| {
            with_strided(v, |vv| {
                let mut b = func.builder();
                b.arg(qv).arg(kv).arg(vv).arg(&mut out);
                for x in &ints {
                    b.arg(x);
                }
                b.arg(&kv_stride).arg(&scale);
                let grid = (
                    checked_u32("query tiles", s.div_ceil(ROWS))?,
                    checked_u32("heads", heads)?,
                );
                // SAFETY: argument types and order match `prefill_attention_d{d}_bf16`; k and v
                // hold kv_heads heads of `total` rows each at the strides checked above.
                unsafe { b.launch(launch_config(grid, 128, shared)) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(Some(wrap(dev, out, (s, heads * d))))
}

/// The device memory a strided bf16 tensor's elements lie in, from its first element to its last.
fn with_strided<R>(t: &Tensor, f: impl FnOnce(&CudaView<'_, bf16>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(st) = &*storage else {
        bail!("expected a CUDA tensor, got {:?}", t.device())
    };
    let start = layout.start_offset();
    let span = t
        .dims()
        .iter()
        .zip(t.stride())
        .map(|(&n, &stride)| n.saturating_sub(1) * stride)
        .sum::<usize>()
        + 1;
    f(&st.as_cuda_slice::<bf16>()?.slice(start..start + span))
}
