//! Attention's own kernels (`attention.cuh`): one decode step of many sequences over their KV
//! cache buffers (a long cache split over several blocks per head: flash-decoding), and
//! prefill's scale + causal mask + softmax in one launch. Both round as the
//! reference's eager attention in bf16 (transformers 4.57.3 `eager_attention_forward`).

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, Result, Storage, Tensor, bail};
use half::bf16;

use crate::ops::head_dim_fits_gpu_kernels;

use super::{MODULE, PTX, bf16_device, checked_i32, checked_u32, launch_config, with_view, wrap};

/// Longest cache the decode-attention kernel takes: its scores live in shared memory, one f32
/// per position, under the 48 KiB a launch gets without opting in, less 1 KiB for the static
/// shared memory of its reductions.
pub(super) const DECODE_ATTENTION_MAX_LEN: usize = 47 * 256;
/// Sequences per decode-attention launch: its table is a kernel parameter (`DECODE_SEQS` in
/// attention.cuh, which says why this many).
const DECODE_SEQS: usize = 128;
/// Flash-decoding: positions per split below which a head's cache is not split further.
const SPLIT_POSITIONS: usize = 256;
/// The most blocks one head's cache is split over.
const MAX_SPLITS: usize = 16;
/// Blocks per pass past which splitting a batch's heads further gains nothing (the whole GPU
/// is busy with whole heads already).
const SPLIT_BLOCKS: usize = 2048;

/// Over how many blocks decode attention splits each head's cache (a power of two, 1 = one block
/// walks the whole cache, `decode_attention_bf16`): by the longest of `seqs` caches of `longest`
/// positions (the new one included), so that short caches keep the one-block kernel and a graph
/// captured for a split count serves a range of lengths.
pub(super) fn decode_splits(seqs: usize, heads: usize, longest: usize) -> usize {
    let by_length = (longest / SPLIT_POSITIONS).min(MAX_SPLITS);
    let by_blocks = SPLIT_BLOCKS / (seqs * heads).max(1);
    match by_length.min(by_blocks) {
        0 | 1 => 1,
        n => 1 << n.ilog2(),
    }
}

/// Flash-decoding's scratch for one decode-attention call: each split's softmax max and sum,
/// its part of probs @ v (f32), and a counter per (sequence, head) that the last split to finish
/// takes (zero before the launch).
pub(super) struct SplitScratch {
    stats: CudaSlice<f32>,
    parts: CudaSlice<f32>,
    tickets: CudaSlice<u32>,
    splits: usize,
}

impl SplitScratch {
    pub(super) fn new(
        dev: &CudaDevice,
        (seqs, heads, d): (usize, usize, usize),
        splits: usize,
    ) -> Result<Self> {
        let rows = seqs * heads;
        Ok(Self {
            // SAFETY: pass 1 writes every split's stats before pass 2 reads them; pass 2 every
            // part before the last split reads them.
            stats: unsafe { dev.alloc::<f32>(2 * rows * splits) }?,
            parts: unsafe { dev.alloc::<f32>(rows * splits * d) }?,
            tickets: dev.alloc_zeros::<u32>(rows)?,
            splits,
        })
    }

    /// Flash-decoding's two passes (`names`: the stats then the values kernel) for `seqs`
    /// sequences of `heads` heads, `table` pushing the kernels' table argument (the parameter
    /// table or the device table's address), `seq_base` the first sequence of a parameter
    /// table's launch (`None` for the device table's kernels, which take none), `longest` the
    /// positions the launch must cover (sizes the shared memory).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        names: [&str; 2],
        [qv, kv, vv]: [&CudaView<'_, bf16>; 3],
        s: &DecodeScalars,
        table: &T,
        seq_base: Option<i32>,
        (seqs, heads, d): (usize, usize, usize),
        longest: usize,
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let per_split = longest.div_ceil(self.splits);
        let cfg = LaunchConfig {
            grid_dim: (
                checked_u32("heads", heads)?,
                checked_u32("sequences", seqs)?,
                checked_u32("splits", self.splits)?,
            ),
            block_dim: (checked_u32("head size", d)?, 1, 1),
            shared_mem_bytes: checked_u32("cache positions", per_split * 4)?,
        };
        let stats = dev.get_or_load_custom_func(names[0], MODULE, PTX)?;
        let mut b = stats.builder();
        b.arg(qv).arg(kv).arg(vv).arg(table).arg(&self.stats);
        b.arg(&s.heads).arg(&s.kv_heads).arg(&s.scale);
        if let Some(base) = &seq_base {
            b.arg(base);
        }
        // SAFETY: argument types and order match the stats kernel `names[0]` (attention.cuh);
        // the table names live buffers with room for row `past`.
        unsafe { b.launch(cfg) }.w()?;
        let values = dev.get_or_load_custom_func(names[1], MODULE, PTX)?;
        let mut b = values.builder();
        b.arg(qv).arg(kv).arg(vv).arg(table).arg(&self.stats);
        b.arg(&self.parts).arg(&self.tickets).arg(out);
        b.arg(&s.heads).arg(&s.kv_heads).arg(&s.scale);
        if let Some(base) = &seq_base {
            b.arg(base);
        }
        // SAFETY: argument types and order match the values kernel `names[1]`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// One sequence's KV cache buffers for [`decode_attention`]: keys and values `[kv_heads,
/// capacity, d]` (contiguous, capacity above `past`) and the number of positions cached.
pub struct CacheBuffers<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub past: usize,
}

impl CacheBuffers<'_> {
    /// This cache's entry of a decode-attention table (`DecodeTable` in attention.cuh): key
    /// buffer, value buffer, cached length, capacity. `None` when the kernel cannot take it:
    /// buffers not bf16 `[kv_heads, capacity, d]` on a GPU, contiguous and 16-byte aligned, with
    /// room for one more position, or a cache longer than [`DECODE_ATTENTION_MAX_LEN`].
    pub(super) fn table_entry(
        &self,
        (kv_heads, d): (usize, usize),
        stream: &CudaStream,
    ) -> Result<Option<[u64; 4]>> {
        let dims = self.k.dims();
        let fits = dims.len() == 3
            && dims[0] == kv_heads
            && dims[1] > self.past
            && dims[2] == d
            && self.v.dims() == dims
            && self.past < DECODE_ATTENTION_MAX_LEN
            && self.k.is_contiguous()
            && self.v.is_contiguous()
            // The kernel reads key rows 16 bytes at a time.
            && self.k.layout().start_offset().is_multiple_of(8)
            && self.v.layout().start_offset().is_multiple_of(8)
            && bf16_device(self.k).is_some()
            && bf16_device(self.v).is_some();
        if !fits {
            return Ok(None);
        }
        let address = |t: &Tensor| -> Result<u64> {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                bail!("expected a CUDA tensor")
            };
            let slice = s.as_cuda_slice::<bf16>()?;
            let view = slice.slice(layout.start_offset()..);
            let (ptr, _sync) = view.device_ptr(stream);
            Ok(ptr)
        };
        Ok(Some([
            address(self.k)?,
            address(self.v)?,
            self.past as u64,
            dims[1] as u64,
        ]))
    }
}

/// The scalars both decode-attention kernels take after their buffers, typed as they take them.
pub(super) struct DecodeScalars {
    pub heads: i32,
    pub kv_heads: i32,
    /// `1/sqrt(d)` in f32.
    pub scale: f32,
}

/// Runs `f` on the device memory of `q`, `k_new` and `v_new` (bf16, 16-byte aligned: copied
/// first where not) and the scalars of `(heads, kv_heads, d)`: what both decode-attention
/// launches (the parameter table here, the device table in `graph.rs`) share.
pub(super) fn with_decode_views<R>(
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    (heads, kv_heads, d): (usize, usize, usize),
    f: impl FnOnce([&CudaView<'_, bf16>; 3], &DecodeScalars) -> Result<R>,
) -> Result<R> {
    let scalars = DecodeScalars {
        heads: checked_i32("heads", heads)?,
        kv_heads: checked_i32("kv heads", kv_heads)?,
        scale: (d as f32).powf(-0.5),
    };
    with_view(q, |qv| {
        with_view(k_new, |kv| with_view(v_new, |vv| f([qv, kv, vv], &scalars)))
    })
}

/// One decode step of several sequences at once: `q` `[seqs, heads, d]` and the new keys and
/// values `k_new`/`v_new` `[seqs, kv_heads, d]`; each sequence attends to its cache plus its new
/// row, which the kernel also writes into the cache at `past`. Returns `[seqs, heads * d]`;
/// `None` when the inputs are not bf16 on a GPU or a cache is too long for the kernel (nothing
/// has been written then; the caller runs candle's ops).
pub fn decode_attention(
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    caches: &[CacheBuffers<'_>],
) -> Result<Option<Tensor>> {
    let Some(dev) = bf16_device(q) else {
        return Ok(None);
    };
    let (seqs, heads, d) = q.dims3()?;
    let (_, kv_heads, _) = k_new.dims3()?;
    let shapes_fit = seqs == caches.len()
        && seqs > 0
        && k_new.dims() == [seqs, kv_heads, d]
        && v_new.dims() == [seqs, kv_heads, d]
        && head_dim_fits_gpu_kernels(d)
        && kv_heads > 0
        && heads % kv_heads == 0
        && bf16_device(k_new).is_some()
        && bf16_device(v_new).is_some();
    if !shapes_fit {
        return Ok(None);
    }
    let stream = dev.cuda_stream();
    let mut entries = Vec::with_capacity(caches.len());
    for c in caches {
        match c.table_entry((kv_heads, d), &stream)? {
            Some(entry) => entries.push(entry),
            None => return Ok(None),
        }
    }
    let longest = entries.iter().map(|e| e[2] as usize + 1).max().unwrap_or(1);
    let splits = decode_splits(seqs, heads, longest);
    let scratch = match splits {
        1 => None,
        n => Some(SplitScratch::new(dev, (seqs, heads, d), n)?),
    };
    let func = dev.get_or_load_custom_func("decode_attention_bf16", MODULE, PTX)?;
    // SAFETY: the kernel writes every element (one thread per (sequence, head, dim)).
    let mut out = unsafe { dev.alloc::<bf16>(seqs * heads * d) }?;
    with_decode_views(q, k_new, v_new, (heads, kv_heads, d), |views, s| {
        // The table travels as a kernel parameter, DECODE_SEQS sequences per launch.
        for (chunk, group) in entries.chunks(DECODE_SEQS).enumerate() {
            let mut table = [0u64; 4 * DECODE_SEQS];
            for (i, entry) in group.iter().enumerate() {
                table[4 * i..4 * i + 4].copy_from_slice(entry);
            }
            let longest = group.iter().map(|e| e[2] as usize + 1).max().unwrap_or(1);
            let seq_base = checked_i32("sequence", chunk * DECODE_SEQS)?;
            if let Some(scratch) = &scratch {
                scratch.launch(
                    dev,
                    ["decode_split_stats_bf16", "decode_split_values_bf16"],
                    views,
                    s,
                    &table,
                    Some(seq_base),
                    (group.len(), heads, d),
                    longest,
                    &mut out,
                )?;
                continue;
            }
            let [qv, kv, vv] = views;
            let mut b = func.builder();
            b.arg(qv).arg(kv).arg(vv).arg(&table).arg(&mut out);
            b.arg(&s.heads)
                .arg(&s.kv_heads)
                .arg(&s.scale)
                .arg(&seq_base);
            let shared = checked_u32("cache length", longest * 4)?;
            let grid = (checked_u32("heads", heads)?, group.len() as u32);
            let cfg = launch_config(grid, d as u32, shared);
            // SAFETY: argument types and order match `decode_attention_bf16` (the table is its
            // `DecodeTable`); every cache pointer names a live buffer with room for row `past`.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(())
    })?;
    Ok(Some(wrap(dev, out, (seqs, heads * d))))
}

/// Threads per row of [`causal_softmax`].
const SOFTMAX_THREADS: u32 = 256;

/// Prefill's probabilities from cuBLAS's bf16 scores `[heads, s, total]` (query `i` of a row
/// block at absolute position `past + i`): each score rounded to bf16 after `* scale`, keys past
/// the query masked, softmax in f32, the probabilities cast to bf16 (masked ones exactly 0), in
/// one launch. `None` when the scores are not bf16 on a GPU.
pub fn causal_softmax(scores: &Tensor, scale: f32, past: usize) -> Result<Option<Tensor>> {
    let Some(dev) = bf16_device(scores) else {
        return Ok(None);
    };
    let (heads, s, total) = scores.dims3()?;
    if s == 0 || total < past + s {
        bail!(
            "causal softmax: {s} queries after {past} cached positions need {} keys, the scores have {total}",
            past + s
        );
    }
    let rows = checked_u32("attention rows", heads * s)?;
    let (s_i, total_i, past_i) = (
        checked_i32("queries", s)?,
        checked_i32("keys", total)?,
        checked_i32("cached positions", past)?,
    );
    let func = dev.get_or_load_custom_func("causal_softmax_bf16", MODULE, PTX)?;
    // SAFETY: one block per row writes every element of its row.
    let mut out = unsafe { dev.alloc::<bf16>(heads * s * total) }?;
    with_view(scores, |sv| {
        let mut b = func.builder();
        b.arg(sv)
            .arg(&mut out)
            .arg(&s_i)
            .arg(&total_i)
            .arg(&past_i)
            .arg(&scale);
        // SAFETY: argument types and order match `causal_softmax_bf16` (attention.cuh).
        unsafe { b.launch(launch_config((rows, 1), SOFTMAX_THREADS, 0)) }.w()?;
        Ok(())
    })?;
    Ok(Some(wrap(dev, out, (heads, s, total))))
}
