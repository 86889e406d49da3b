//! AMX-BF16 kernel of the x86-64 backend (see the parent module for the shared layout of the
//! work and the AVX-512F kernel that takes the rows AMX tiles do not fill).

use core::arch::x86_64::*;

use super::*;

// ---------------------------------------------------------------------------------------
// AMX-BF16
//
// Rust 1.95 has no stable AMX intrinsics (nor `is_x86_feature_detected!("amx-bf16")`), so
// detection is CPUID + the Linux permission syscall, and the tile instructions are inline asm.
// The assembler knows the mnemonics; no target feature is needed to emit them.
//
// Orientation: one `tdpbf16ps` computes C[16 x 16 f32] += A[16 x 32 bf16] * B[16 pairs x 16 x 2].
// A is 16 weight rows as stored (row-major, only copied into a contiguous buffer per k block,
// see `matmul_amx`); B must be pair-interleaved ("VNNI" layout), which `AmxPacked::new` in the
// parent module does to the activations once per call (m*k elements, cheap next to m*n*k).
// Putting the weights in A is what spares any weight transposition. C therefore holds
// [weight row][token] and is transposed on the way out.
// ---------------------------------------------------------------------------------------

/// bf16 per tile row (64 bytes).
pub(crate) const AMX_K: usize = 32;
/// Rows per tile: 16 weight rows in A, 16 tokens in B's (pair) columns and in C.
pub(crate) const AMX_ROWS: usize = 16;
/// bf16 pairs (u32) in one packed 1 KiB tile.
pub(crate) const AMX_TILE_PAIRS: usize = AMX_ROWS * AMX_K / 2;

/// Whether the CPU has AMX-TILE + AMX-BF16 and the OS let this process use tile data.
/// The permission request is process-wide and only needs to succeed once.
#[cfg(target_os = "linux")]
pub(crate) fn amx_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7 subleaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
        let id = __cpuid_count(7, 0);
        if (id.edx >> 22) & 1 == 0 || (id.edx >> 24) & 1 == 0 {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
        const XFEATURE_XTILEDATA: u64 = 18;
        let ret: i64;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only changes this process's permission to
        // use the AMX register state; it touches no memory of ours. The syscall instruction
        // clobbers rcx and r11, declared here.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    })
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn amx_available() -> bool {
    false
}

/// Palette 1, tiles 0..8 all 16 rows x 64 bytes: 0..4 accumulators, 4..6 weights, 6..8 tokens.
fn amx_config() -> [u8; 64] {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t] = 64;
        cfg[48 + t] = AMX_ROWS as u8;
    }
    cfg
}

/// One 64-byte tile row of bf16, aligned so that tile loads never split cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct BfLine([u16; AMX_K]);

/// One 64-byte tile row of f32 accumulators.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct F32Line([f32; AMX_ROWS]);

/// Per-thread buffers of the AMX kernel: repacked weights and parked accumulators.
#[derive(Default)]
struct AmxScratch {
    a: Vec<BfLine>,
    c: Vec<F32Line>,
}

thread_local! {
    static AMX_SCRATCH: std::cell::RefCell<AmxScratch> =
        std::cell::RefCell::new(AmxScratch::default());
}

/// k chunks (of 32) per k block: the repacked weights of one row pair for one block are
/// 2 tiles x 16 chunks x 1 KiB = 32 KiB, and so are the activations of one token pair.
const AMX_KB: usize = 16;

/// Row pairs (of 32 rows) handled together per k block. Their repacked weights (4 x 32 KiB)
/// stay in L2, and each token pair's activation block (32 KiB) is loaded into L1 once and
/// used by all of them. With one row pair at a time the activations of every token pair
/// (2 MiB at m = 512, k = 2048) were re-streamed for each 32 rows, mostly from L3.
const AMX_RG: usize = 4;

/// Token pairs (of 32 tokens) per token block: bounds the parked accumulators of a row group
/// at 4 x 16 x 4 KiB = 256 KiB, so they stay in L2 however large m is; the weights are
/// repacked once per token block (a copy of k*n, small next to 512*k*n multiply-adds).
const AMX_TPB: usize = 16;

/// AMX path: rows in pairs of 16-row tiles, tokens in pairs of 16-token tiles, 2 x 2
/// accumulator tiles per step (4 of the 8 tile registers), the other 4 for operands. Rows that
/// do not fill a pair of tiles go to the AVX-512F kernel (see `Isa::AmxBf16` for why not BF16).
///
/// Weights are not tile-loaded straight from `w`: with k = 2048 the 16 rows of a tile are
/// exactly 4 KiB apart, all map to one L1 set (12 ways) and evict each other and the
/// activations (measured: ~35% slower than k = 2080). Instead, for each group of row pairs and
/// each k block, the weights are copied into a contiguous, zero-padded buffer, and the
/// accumulators are parked in memory between k blocks.
///
/// # Safety
/// [`amx_available`] must have returned true and the CPU must support AVX-512F and BW.
/// `x`, `w`, `out` as for the other drivers; `packed` must hold the output of `AmxPacked::new`
/// for the same x, m, k: `groups` (even, >= ceil(m/16)) token groups of ceil(k/32) tiles.
#[allow(clippy::too_many_arguments)] // the shared driver arguments plus the packed activations
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn matmul_amx(
    x: *const u16,
    packed: *const u32,
    groups: usize,
    m: usize,
    k: usize,
    w: *const u16,
    n: usize,
    out: *mut f32,
    out_stride: usize,
) {
    const PAIR: usize = 2 * AMX_ROWS;
    const CTILES: usize = 4 * AMX_ROWS;
    let rows_amx = n - n % PAIR;
    let chunks = k.div_ceil(AMX_K);
    let pairs = groups / 2;
    let line = 64usize;
    if rows_amx > 0 {
        AMX_SCRATCH.with(|cell| {
            // Reused per thread: fresh buffers of this size per task cost page faults (they are
            // above malloc's mmap threshold), measured at ~15% of the m = 512 time. A nested call
            // on the same thread (cannot happen today: nothing below calls back into rayon) would
            // find the cell borrowed and allocate instead.
            let mut fresh = AmxScratch::default();
            let mut guard = cell.try_borrow_mut();
            let scratch = match guard.as_deref_mut() {
                Ok(s) => s,
                Err(_) => &mut fresh,
            };
            // [row pair in group][chunk in block][tile 0/1][row] lines of weights; every line
            // read is first written by the repack below.
            let abuf = &mut scratch.a;
            abuf.resize(AMX_RG * AMX_KB * PAIR, BfLine([0; AMX_K]));
            // [row pair in group][token pair][C tile 0..4][row] lines of accumulators; zeroed by
            // `tilezero` on the first k block, not here.
            let cacc = &mut scratch.c;
            let tpb = AMX_TPB.min(pairs);
            cacc.resize(AMX_RG * tpb * CTILES, F32Line([0.0; AMX_ROWS]));
            let cfg = amx_config();
            // SAFETY: AMX permission granted per the contract; cfg is a valid palette-1 config.
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly))
            };
            for tp0 in (0..pairs).step_by(tpb) {
                let ntp = tpb.min(pairs - tp0);
                for g0 in (0..rows_amx).step_by(AMX_RG * PAIR) {
                    let nrp = AMX_RG.min((rows_amx - g0) / PAIR);
                    for c0 in (0..chunks).step_by(AMX_KB) {
                        let nc = AMX_KB.min(chunks - c0);
                        // Repack this k block of the group's rows; the k tail is zero-filled.
                        for (p, pblock) in
                            abuf.chunks_exact_mut(AMX_KB * PAIR).take(nrp).enumerate()
                        {
                            for (ci, lines) in pblock.chunks_exact_mut(PAIR).take(nc).enumerate() {
                                let start = (c0 + ci) * AMX_K;
                                let len = AMX_K.min(k - start);
                                for (r, dst) in lines.iter_mut().enumerate() {
                                    let row = g0 + p * PAIR + r;
                                    // SAFETY: row < rows_amx <= n; elements start..start+len <= k.
                                    let src = unsafe { w.add(row * k + start) };
                                    if len == AMX_K {
                                        // Fixed size: one 64-byte move instead of a memcpy call.
                                        // SAFETY: as above, 32 elements in bounds; unaligned read.
                                        dst.0 =
                                            unsafe { src.cast::<[u16; AMX_K]>().read_unaligned() };
                                    } else {
                                        dst.0 = [0; AMX_K];
                                        // SAFETY: as above.
                                        unsafe {
                                            core::ptr::copy_nonoverlapping(
                                                src,
                                                dst.0.as_mut_ptr(),
                                                len,
                                            )
                                        };
                                    }
                                }
                            }
                        }
                        for tp in tp0..tp0 + ntp {
                            let b0 = packed.wrapping_add(2 * tp * chunks * AMX_TILE_PAIRS);
                            let b1 = packed.wrapping_add((2 * tp + 1) * chunks * AMX_TILE_PAIRS);
                            for (p, pblock) in
                                abuf.chunks_exact(AMX_KB * PAIR).take(nrp).enumerate()
                            {
                                let cp = cacc[(p * ntp + tp - tp0) * CTILES..].as_mut_ptr();
                                // SAFETY: cp starts 4 whole tiles (64 lines) inside cacc.
                                unsafe { amx_load_or_zero_c(cp, c0 == 0) };
                                for (ci, lines) in pblock.chunks_exact(PAIR).take(nc).enumerate() {
                                    let c = c0 + ci;
                                    // SAFETY: `lines` is 32 contiguous 64-byte rows (two A tiles);
                                    // b0/b1 + c tiles are whole 1 KiB tiles inside `packed`
                                    // (c < chunks, token group < groups).
                                    unsafe {
                                        std::arch::asm!(
                                            "tileloadd tmm4, [{a0} + {s}*1]",
                                            "tileloadd tmm5, [{a1} + {s}*1]",
                                            "tileloadd tmm6, [{b0} + {s}*1]",
                                            "tileloadd tmm7, [{b1} + {s}*1]",
                                            "tdpbf16ps tmm0, tmm4, tmm6",
                                            "tdpbf16ps tmm1, tmm4, tmm7",
                                            "tdpbf16ps tmm2, tmm5, tmm6",
                                            "tdpbf16ps tmm3, tmm5, tmm7",
                                            a0 = in(reg) lines.as_ptr(),
                                            a1 = in(reg) lines.as_ptr().add(AMX_ROWS),
                                            b0 = in(reg) b0.add(c * AMX_TILE_PAIRS),
                                            b1 = in(reg) b1.add(c * AMX_TILE_PAIRS),
                                            s = in(reg) line,
                                            options(nostack, readonly),
                                        )
                                    };
                                }
                                // SAFETY: as for the load above.
                                unsafe { amx_store_c(cp) };
                            }
                        }
                    }
                    // C tile (i, j) of (row pair p, token pair tp): weight rows g0 + 32p + 16i..,
                    // tokens (2tp + j)*16..; C is [row][token], out is [token][row].
                    for (pt, tiles) in cacc.chunks_exact(CTILES).take(nrp * ntp).enumerate() {
                        let (p, tp) = (pt / ntp, tp0 + pt % ntp);
                        for (idx, tile) in tiles.chunks_exact(AMX_ROWS).enumerate() {
                            let (ri, ti) = (idx / 2, idx % 2);
                            let t0 = (2 * tp + ti) * AMX_ROWS;
                            for (r, crow) in tile.iter().enumerate() {
                                let row = g0 + p * PAIR + ri * AMX_ROWS + r;
                                for (t, &v) in crow.0.iter().enumerate().take(m.saturating_sub(t0))
                                {
                                    // SAFETY: token t0 + t < m and row < n.
                                    unsafe { *out.add((t0 + t) * out_stride + row) = v };
                                }
                            }
                        }
                    }
                }
            }
            // SAFETY: returns the tile state to init so the OS need not save it at context switch.
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        });
    }
    if rows_amx < n {
        // SAFETY: the remaining rows, same contract.
        unsafe {
            matmul_avx512f(
                x,
                m,
                k,
                w.add(rows_amx * k),
                n - rows_amx,
                out.add(rows_amx),
                out_stride,
            )
        };
    }
}

/// Starts the 4 accumulator tiles: zero on the first k block, else reload the parked values.
///
/// # Safety
/// AMX configured as by [`amx_config`]; `cp` points at 4 tiles of 16 lines of 64 bytes.
#[inline]
unsafe fn amx_load_or_zero_c(cp: *mut F32Line, zero: bool) {
    // SAFETY: per the contract.
    unsafe {
        if zero {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            std::arch::asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) cp,
                c1 = in(reg) cp.add(AMX_ROWS),
                c2 = in(reg) cp.add(2 * AMX_ROWS),
                c3 = in(reg) cp.add(3 * AMX_ROWS),
                s = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
}

/// Parks the 4 accumulator tiles.
///
/// # Safety
/// As for [`amx_load_or_zero_c`].
#[inline]
unsafe fn amx_store_c(cp: *mut F32Line) {
    // SAFETY: per the contract.
    unsafe {
        std::arch::asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(AMX_ROWS),
            c2 = in(reg) cp.add(2 * AMX_ROWS),
            c3 = in(reg) cp.add(3 * AMX_ROWS),
            s = in(reg) 64usize,
            options(nostack),
        )
    };
}
