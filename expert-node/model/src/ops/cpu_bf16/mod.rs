//! bf16 x bf16 -> f32 matrix multiply for CPU inference, `out = x · wᵀ`.
//!
//! Shapes follow a Hugging Face checkpoint: weights are `[n, k]` row-major (`[out, in]`),
//! activations `[m, k]`, so every output is a dot product of two contiguous k-long rows. The
//! weights are used as stored, never converted: at decode (m = 1) the cost is reading them
//! once from DRAM, and a bf16 copy is half the bytes of an f32 copy.
//!
//! Design:
//! - The instruction set is detected once at first use and cached ([`Isa::detect`], [`isa`]).
//!   On x86-64 the order of preference is:
//!   1. AMX-BF16 (`tdpbf16ps` on 16 x 32 tiles) for m >= [`AMX_MIN_M`]; below that the
//!      AVX-512F kernel (see [`Isa::AmxBf16`] for why not the BF16 one). Rust 1.95 has no
//!      stable AMX intrinsics, so detection is CPUID plus the Linux `arch_prctl` permission
//!      request and the tile instructions are inline asm.
//!   2. AVX-512 BF16 (`vdpbf16ps`: bf16 pair products accumulated in f32 lanes, 32 elements
//!      per instruction).
//!   3. AVX-512F (bf16 widened to f32 in registers by one shift and one mask, then FMA).
//!   4. AVX2 + FMA (the same with 8 lanes).
//!   5. Portable Rust.
//!
//!   Every path can be called explicitly ([`matmul_bf16_serial_with`], [`matmul_bf16_with`])
//!   so the tests exercise all of them on one machine.
//! - Register tiling: the vector kernels compute a tile of up to 4 weight rows x 4 tokens
//!   (4 x 2 on AVX2) with one accumulator per output, so each loaded vector feeds several
//!   multiply-adds. k is walked in vector steps; tails of k, n and m are handled inside the
//!   kernels (masked loads on AVX-512, padded copies on AVX2), so any shape works and nothing
//!   is read past a row.
//! - Cache blocking: rows are walked in L2-sized blocks and tokens in L2-sized blocks, so for
//!   large m a block of weights is reused from L2 by all tokens instead of coming from DRAM
//!   once per token tile.
//! - Decode (m = 1) is a pure stream over the weights: each weight is read once, and the
//!   kernel prefetches the next row tile because rows of 4 KiB are single pages, where the
//!   hardware streamer would otherwise restart at every row.
//! - Parallelism ([`matmul_bf16`]): rayon tasks over blocks of [`ROW_BLOCK`] weight rows; each
//!   task reads its contiguous weight block exactly once for all m tokens. At m = 1 the output
//!   chunks are disjoint slices of the result; for m > 1 each task fills its own column strip
//!   in a scratch buffer that is then interleaved into place (safe code, ~m*n copies).
//!
//! Memory: besides the returned Vec, calls with m > 1 use per-thread scratch buffers (packed
//! activations for AMX, output strips) that are kept between calls, up to 64 MiB each, to
//! avoid page faults on every call; the AMX kernel keeps up to 384 KiB per worker thread.
//!
//! Numerics: all paths accumulate in f32. The widening paths form exact products (a bf16
//! product fits in f32) and round only the sums. `vdpbf16ps` and `tdpbf16ps` flush denormal
//! inputs and outputs to zero and round each pairwise sum their own way, so they may differ
//! from the widening paths in the last bits; the tests bound every path by a small multiple
//! of f32 epsilon relative to sum |x_i w_i|.
//!
//! `unsafe` appears only in the ISA-specific kernels (module `x86`), behind
//! `#[target_feature]`, and at the call sites below, which first check the CPU features and
//! every slice length.

use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Weight rows per rayon task in [`matmul_bf16`]. 128 rows of k = 2048 are 512 KiB: large
/// enough that task overhead is negligible against reading them (~30 us at 17 GB/s), small
/// enough that the 1536-row expert matrices still split into 12 tasks for load balance, and
/// the block stays in L2 while tokens are swept for larger m.
pub const ROW_BLOCK: usize = 128;

/// A kernel implementation, selectable explicitly for testing and benchmarking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AMX-BF16 tiles for m >= [`AMX_MIN_M`]; below that, and for rows that do not fill a
    /// pair of 16-row tiles, the AVX-512F widening kernel. Not the `vdpbf16ps` kernel: on the
    /// AMX CPU this was tuned on (Sapphire Rapids class), `vdpbf16ps` sustains only about
    /// one per two cycles and the widening kernel was ~20% faster whenever compute-bound, and
    /// equal when bandwidth-bound.
    AmxBf16,
    /// AVX-512F + AVX-512BW + AVX-512 BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// AVX-512F + AVX-512BW (BW for the 16-bit masked tail loads), widening to f32.
    Avx512F,
    /// AVX2 + FMA, widening to f32.
    Avx2,
    /// Plain Rust, auto-vectorised where the compiler can.
    Portable,
}

impl Isa {
    /// All paths, most preferred first.
    pub const ALL: [Isa; 5] = [
        Isa::AmxBf16,
        Isa::Avx512Bf16,
        Isa::Avx512F,
        Isa::Avx2,
        Isa::Portable,
    ];

    /// Short name for logs: "amx-bf16", "avx512bf16", "avx512f", "avx2" or "portable".
    pub fn name(self) -> &'static str {
        match self {
            Isa::AmxBf16 => "amx-bf16",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512F => "avx512f",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run the path (checked at run time, not compile time). For
    /// [`Isa::AmxBf16`] the first call also asks Linux for permission to use AMX state, which
    /// is process-wide; if the kernel refuses, the path is reported unavailable.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::AmxBf16 => Isa::Avx512F.is_available() && x86::amx_available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512F => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best available path, detected once and cached.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|isa| isa.is_available())
                .unwrap_or(Isa::Portable)
        })
    }
}

/// The instruction set chosen at run time: "amx-bf16", "avx512bf16", "avx512f", "avx2" or
/// "portable".
pub fn isa() -> &'static str {
    Isa::detect().name()
}

/// `out[t * out_stride + j] = sum_i x[t * k + i] * w[j * k + i]` (f32 accumulation)
/// for t in 0..m, j in 0..n where n = w.len() / k. Serial: runs on the calling thread.
///
/// x: m*k bf16 activations, row-major. w: n*k bf16 weights, row-major (`[out, in]` as in a
/// Hugging Face checkpoint). out: f32, at least (m-1)*out_stride + n long. Elements of `out`
/// between rows (from n to out_stride) are left untouched.
///
/// # Panics
/// If k == 0, w.len() is not a multiple of k, x is shorter than m*k, out is too short, or
/// out_stride < n with m > 1.
pub fn matmul_bf16_serial(
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    out: &mut [f32],
    out_stride: usize,
) {
    matmul_bf16_serial_with(Isa::detect(), x, m, k, w, out, out_stride);
}

/// [`matmul_bf16_serial`] on an explicitly chosen path.
///
/// # Panics
/// As [`matmul_bf16_serial`], and if `isa` is not available on this CPU
/// (see [`Isa::is_available`]).
pub fn matmul_bf16_serial_with(
    isa: Isa,
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        isa.is_available(),
        "bf16 matmul path {} is not supported by this CPU",
        isa.name()
    );
    let n = check_shapes(x, m, k, w);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        m == 1 || out_stride >= n,
        "out_stride {out_stride} < n {n}: output rows would overlap"
    );
    let need = (m - 1)
        .checked_mul(out_stride)
        .and_then(|v| v.checked_add(n));
    assert!(
        need.is_some_and(|need| out.len() >= need),
        "out has {} elements, needs (m-1)*out_stride + n = ({m}-1)*{out_stride} + {n}",
        out.len()
    );
    let x = &x[..m * k];
    with_call_scratch(|sc| {
        let packed = AmxPacked::new(isa, x, m, k, false, &mut sc.packed);
        run_kernel(isa, x, packed.as_ref(), m, k, w, n, out, out_stride);
    });
}

/// Same math as [`matmul_bf16_serial`], parallel over blocks of [`ROW_BLOCK`] weight rows on
/// the current rayon pool; returns the m*n f32 result, row-major.
///
/// # Panics
/// If k == 0, w.len() is not a multiple of k, or x is shorter than m*k.
pub fn matmul_bf16(x: &[bf16], m: usize, k: usize, w: &[bf16]) -> Vec<f32> {
    matmul_bf16_with(Isa::detect(), x, m, k, w)
}

/// [`matmul_bf16`] on an explicitly chosen path.
///
/// # Panics
/// As [`matmul_bf16`], and if `isa` is not available on this CPU.
pub fn matmul_bf16_with(isa: Isa, x: &[bf16], m: usize, k: usize, w: &[bf16]) -> Vec<f32> {
    assert!(
        isa.is_available(),
        "bf16 matmul path {} is not supported by this CPU",
        isa.name()
    );
    let n = check_shapes(x, m, k, w);
    let x = &x[..m * k];
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let wblocks = w.par_chunks(ROW_BLOCK * k);
    if m == 1 {
        // One token: each block's outputs are a contiguous slice of the result.
        out.par_chunks_mut(ROW_BLOCK)
            .zip(wblocks)
            .for_each(|(o, wb)| run_kernel(isa, x, None, 1, k, wb, o.len(), o, o.len()));
        return out;
    }
    with_call_scratch(|sc| {
        // Packed once here, shared read-only by all tasks.
        let packed = AmxPacked::new(isa, x, m, k, true, &mut sc.packed);
        // Several tokens: a block's outputs are a column strip of the [m, n] result, not a
        // slice. Each task writes its strip as its own [m, nb] matrix into a disjoint chunk of
        // a scratch buffer (every element is written, so stale contents do not matter), then
        // the strips are interleaved into place. The copy is m*n floats against 2*m*n*k
        // flops, negligible for any real k, and keeps the parallel part free of unsafe.
        sc.strips.resize(m * n, 0.0);
        let strips = &mut sc.strips[..m * n];
        strips
            .par_chunks_mut(ROW_BLOCK * m)
            .zip(wblocks)
            .for_each(|(s, wb)| {
                let nb = s.len() / m;
                run_kernel(isa, x, packed.as_ref(), m, k, wb, nb, s, nb);
            });
        out.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
            for (dst, strip) in row.chunks_mut(ROW_BLOCK).zip(strips.chunks(ROW_BLOCK * m)) {
                let nb = dst.len();
                dst.copy_from_slice(&strip[t * nb..(t + 1) * nb]);
            }
        });
    });
    out
}

/// Validates the shared shape contract and returns n.
fn check_shapes(x: &[bf16], m: usize, k: usize, w: &[bf16]) -> usize {
    assert!(k > 0, "k must be positive");
    assert!(
        w.len().is_multiple_of(k),
        "w has {} elements, not a multiple of k = {k}",
        w.len()
    );
    assert!(
        m.checked_mul(k).is_some_and(|mk| x.len() >= mk),
        "x has {} elements, needs m*k = {m}*{k}",
        x.len()
    );
    w.len() / k
}

/// Runs one path on already validated shapes: x.len() >= m*k, w.len() == n*k, out covers
/// (m-1)*out_stride + n, out_stride >= n when m > 1, k > 0, m > 0, n > 0.
#[allow(clippy::too_many_arguments)] // Mirrors the BLAS-style shape arguments; private.
fn run_kernel(
    isa: Isa,
    x: &[bf16],
    packed: Option<&AmxPacked>,
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    debug_assert!(isa.is_available());
    debug_assert!(k > 0 && x.len() >= m * k && w.len() == n * k);
    debug_assert!(m > 0 && out.len() >= (m - 1) * out_stride + n);
    // `bf16` is `repr(transparent)` over u16, so the kernels read the raw bit patterns.
    #[cfg(target_arch = "x86_64")]
    let (xp, wp, op) = (
        x.as_ptr().cast::<u16>(),
        w.as_ptr().cast::<u16>(),
        out.as_mut_ptr(),
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::AmxBf16 => match packed {
            // SAFETY: AmxBf16 available implies AMX permission and AVX-512F + BW; `p` was
            // packed from this x, m, k (AmxPacked::new), so its tiles cover every token
            // group and k chunk the kernel visits; other pointers as below.
            Some(p) => unsafe {
                x86::matmul_amx(xp, p.data.as_ptr(), p.groups, m, k, wp, n, op, out_stride)
            },
            // Too few tokens to fill a tile: the vector kernel is faster.
            // SAFETY: as for Avx512F below, which AmxBf16 implies.
            None => unsafe { x86::matmul_avx512f(xp, m, k, wp, n, op, out_stride) },
        },
        // SAFETY: `isa` was checked available by the public caller, so the CPU has the
        // features the kernel enables; the shape preconditions above are exactly the
        // kernel's pointer-range contract.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => unsafe { x86::matmul_avx512bf16(xp, m, k, wp, n, op, out_stride) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512F => unsafe { x86::matmul_avx512f(xp, m, k, wp, n, op, out_stride) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::matmul_avx2(xp, m, k, wp, n, op, out_stride) },
        _ => matmul_portable(x, m, k, w, out, out_stride),
    }
}

/// Smallest m for which the AMX path packs activations and uses tiles: below one full
/// 16-token tile most of each tile multiply would be padding.
pub const AMX_MIN_M: usize = 16;

/// Activations rearranged for AMX's B operand: for token group g (16 tokens, zero-padded,
/// group count rounded up to even) and k chunk c (32 values, zero-padded), a 1 KiB tile whose
/// row kp holds, for each token t, the u32 pair x[t][32c + 2kp], x[t][32c + 2kp + 1].
struct AmxPacked<'a> {
    data: &'a [u32],
    groups: usize,
}

impl<'a> AmxPacked<'a> {
    /// Packs x into `buf` when `isa` is the AMX path and m is large enough to use it, on the
    /// rayon pool if `parallel` (the serial API must stay on the calling thread).
    fn new(
        isa: Isa,
        x: &[bf16],
        m: usize,
        k: usize,
        parallel: bool,
        buf: &'a mut Vec<u32>,
    ) -> Option<AmxPacked<'a>> {
        #[cfg(target_arch = "x86_64")]
        {
            use x86::{AMX_K, AMX_ROWS, AMX_TILE_PAIRS};
            if isa != Isa::AmxBf16 || m < AMX_MIN_M {
                return None;
            }
            let groups = m.div_ceil(AMX_ROWS).next_multiple_of(2);
            let chunks = k.div_ceil(AMX_K);
            let gsize = chunks * AMX_TILE_PAIRS;
            buf.resize(groups * gsize, 0);
            let data = &mut buf[..groups * gsize];
            // The buffer is reused, so padding must be re-zeroed: past a ragged end of k the
            // weights are zero-padded, and a stale inf or NaN there would make 0 * inf = NaN.
            // (Columns of missing tokens are discarded anyway; they are zeroed along with
            // their group.) Full groups with whole chunks are entirely overwritten.
            let pack_group = |(g, gdst): (usize, &mut [u32])| {
                let t0 = (g * AMX_ROWS).min(m);
                let t1 = ((g + 1) * AMX_ROWS).min(m);
                if t1 - t0 < AMX_ROWS || !k.is_multiple_of(AMX_K) {
                    gdst.fill(0);
                }
                pack_amx_group(gdst, &x[t0 * k..t1 * k], k);
            };
            if parallel {
                data.par_chunks_mut(gsize).enumerate().for_each(pack_group);
            } else {
                data.chunks_mut(gsize).enumerate().for_each(pack_group);
            }
            Some(AmxPacked { data, groups })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, x, m, k, parallel, buf);
            None
        }
    }
}

/// Per-thread buffers reused across calls for the activations packed for AMX and the output
/// strips of [`matmul_bf16`]. Allocating them fresh each call cost page faults (they are
/// above malloc's mmap threshold and get unmapped on free): ~15% at m = 512.
#[derive(Default)]
struct CallScratch {
    packed: Vec<u32>,
    strips: Vec<f32>,
}

/// Buffers above this many bytes are not kept between calls (an lm_head prefill would
/// otherwise pin hundreds of MB per thread); their page-fault cost is small next to the
/// matmul that needs them.
const SCRATCH_KEEP_BYTES: usize = 64 << 20;

thread_local! {
    static CALL_SCRATCH: std::cell::RefCell<CallScratch> =
        std::cell::RefCell::new(CallScratch::default());
}

/// Runs `f` with this thread's scratch, or with fresh buffers if it is in use (a call made
/// from a rayon task that this thread picked up while waiting inside another call), then
/// drops buffers that grew too large.
fn with_call_scratch<R>(f: impl FnOnce(&mut CallScratch) -> R) -> R {
    CALL_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            let r = f(&mut s);
            if s.packed.capacity() * 4 > SCRATCH_KEEP_BYTES {
                s.packed = Vec::new();
            }
            if s.strips.capacity() * 4 > SCRATCH_KEEP_BYTES {
                s.strips = Vec::new();
            }
            r
        }
        Err(_) => f(&mut CallScratch::default()),
    })
}

/// Packs one group of up to 16 tokens (rows of `gx`, each k long) into its row of 1 KiB
/// tiles `gdst` (u32 = one bf16 pair, low half first as in memory); positions of missing
/// tokens and of k beyond the end stay zero. Tile-outer, token-inner: each destination tile
/// is finished while it sits in L1 instead of being revisited once per token.
#[cfg(target_arch = "x86_64")]
fn pack_amx_group(gdst: &mut [u32], gx: &[bf16], k: usize) {
    use x86::{AMX_K, AMX_ROWS, AMX_TILE_PAIRS};
    let pair = |lo: bf16, hi: bf16| u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16);
    let tiles = gdst.as_chunks_mut::<AMX_TILE_PAIRS>().0;
    for (c, tile) in tiles.iter_mut().enumerate() {
        let start = c * AMX_K;
        for (t, row) in gx.chunks_exact(k).enumerate() {
            // `% AMX_ROWS` is a no-op (a group has at most 16 tokens) that lets the compiler
            // prove every index below is inside the tile, so the stores carry no bounds checks.
            let t = t % AMX_ROWS;
            let src = &row[start.min(k)..(start + AMX_K).min(k)];
            if let Ok(full) = <&[bf16; AMX_K]>::try_from(src) {
                for kp in 0..AMX_K / 2 {
                    tile[kp * AMX_ROWS + t] = pair(full[2 * kp], full[2 * kp + 1]);
                }
            } else {
                for (kp, xp) in src.chunks(2).enumerate() {
                    let hi = xp.get(1).copied().unwrap_or(bf16::ZERO);
                    tile[(kp * AMX_ROWS + t) % AMX_TILE_PAIRS] = pair(xp[0], hi);
                }
            }
        }
    }
}

/// Exact bf16 -> f32: bf16 is the top half of an f32.
#[inline]
fn widen(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// Lanes of independent partial sums in the portable dot product: wide enough for the
/// compiler to map onto whatever vector registers the baseline target has, and to break the
/// add dependency chain.
const PORTABLE_LANES: usize = 16;

fn dot_portable(a: &[bf16], b: &[bf16]) -> f32 {
    let mut acc = [0.0f32; PORTABLE_LANES];
    let (ca, cb) = (
        a.chunks_exact(PORTABLE_LANES),
        b.chunks_exact(PORTABLE_LANES),
    );
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&p, &q)| widen(p) * widen(q))
        .sum();
    for (pa, pb) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(pa).zip(pb) {
            *s += widen(p) * widen(q);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Portable path: row-outer so each weight row is read once from memory and reused from L1
/// for all tokens.
fn matmul_portable(x: &[bf16], m: usize, k: usize, w: &[bf16], out: &mut [f32], out_stride: usize) {
    for (j, wr) in w.chunks_exact(k).enumerate() {
        for (t, xr) in x.chunks_exact(k).take(m).enumerate() {
            out[t * out_stride + j] = dot_portable(xr, wr);
        }
    }
}

#[cfg(test)]
mod tests;
