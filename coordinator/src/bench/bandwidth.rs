//! The machine's memory read bandwidth, measured in the same run as the model so that
//! `fraction_of_bandwidth_bound` compares like with like on a shared, noisy machine.
//!
//! The reader walks memory as the bf16 decode kernel does (tiles of 4 rows of 4 KiB, one cache
//! line of each row in turn, the next tile hinted into L2): one plain sequential stream per
//! thread reads noticeably slower on these machines, which would flatter the fraction.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

const ROW_WORDS: usize = 4096 / 8;
const LINE_WORDS: usize = 64 / 8;

fn sum_row_tiles(c: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    let tiles = c.chunks_exact(4 * ROW_WORDS);
    let tail = tiles.remainder();
    for (ti, tile) in tiles.enumerate() {
        for i in (0..ROW_WORDS).step_by(LINE_WORDS) {
            #[cfg(target_arch = "x86_64")]
            for r in 0..4 {
                let next = c
                    .as_ptr()
                    .wrapping_add((ti + 1) * 4 * ROW_WORDS + r * ROW_WORDS + i);
                // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
                unsafe {
                    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
                    _mm_prefetch::<_MM_HINT_T1>(next.cast());
                }
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let start = r * ROW_WORDS + i;
                *a = tile[start..start + LINE_WORDS]
                    .iter()
                    .fold(*a, |s, &v| s.wrapping_add(v));
            }
        }
    }
    let t = tail.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    acc.iter().fold(t, |s, &v| s.wrapping_add(v))
}

/// Read bandwidth in bytes per second on the current rayon pool: the median of `passes` passes
/// over a buffer of `bytes` (make it far larger than the last-level cache).
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let words = bytes / 8;
    // Distinct values so that no page is shared or compressed.
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut secs: Vec<f64> = (0..passes.max(1))
        .map(|_| {
            let started = Instant::now();
            let s: u64 = buf
                .par_chunks(1 << 19)
                .map(sum_row_tiles)
                .reduce(|| 0, u64::wrapping_add);
            black_box(s);
            started.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    (words * 8) as f64 / secs[secs.len() / 2]
}
