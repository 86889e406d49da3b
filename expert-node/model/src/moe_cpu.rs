//! The routed experts of one MoE layer in bf16 on the CPU, at memory bandwidth.
//!
//! Decode reads every selected expert's weights once per step (8 experts × 3 × 768 × 2048 bf16
//! = 75 MB a layer for Qwen3-Omni), so the work is a stream over weights, not arithmetic. Two
//! things make it one: weights re-laid out at load so each task reads one contiguous block
//! ([`PackedExpert`]: gate and up rows interleaved in blocks, so one task produces finished
//! `silu(gate) * up` values), and all of a layer's experts split into (expert, row block) tasks
//! on the one rayon pool in two phases (gate+up, then down), so both cores stream weights with no
//! per-expert synchronisation (KTransformers' and SGLang's CPU MoE do the same).
//!
//! Numerics are those of `Qwen3OmniMoeThinkerTextSparseMoeBlock` in bf16 (transformers 4.57.3):
//! every projection accumulates in f32 and is rounded to bf16; `silu` of the rounded gate is
//! rounded, times the rounded up projection, rounded; the down projection is rounded, then
//! multiplied by the routing weight cast to bf16, rounded.

use half::bf16;
use rayon::prelude::*;

use crate::ops::cpu_bf16::matmul_bf16_serial;

/// Gate/up rows (of each) per task: 64 + 64 rows × 2048 × 2 bytes = 512 KiB of weights.
const GATE_UP_ROWS: usize = 64;
/// Down-projection rows per task: 128 × 768 × 2 bytes = 192 KiB.
const DOWN_ROWS: usize = 128;

/// One expert's SwiGLU weights re-laid out for the CPU kernels.
pub struct PackedExpert {
    /// Blocks of `GATE_UP_ROWS` gate rows followed by the same up rows: `[2 * inter, hidden]`.
    gate_up: Vec<bf16>,
    /// `[hidden, inter]`, as in the checkpoint.
    down: Vec<bf16>,
    hidden: usize,
    inter: usize,
}

impl PackedExpert {
    /// From the checkpoint's `gate_proj` and `up_proj` (`[inter, hidden]`) and `down_proj`
    /// (`[hidden, inter]`), row-major bf16.
    pub fn new(gate: &[bf16], up: &[bf16], down: Vec<bf16>, hidden: usize, inter: usize) -> Self {
        let mut gate_up = Vec::with_capacity(2 * inter * hidden);
        for start in (0..inter).step_by(GATE_UP_ROWS) {
            let rows = GATE_UP_ROWS.min(inter - start);
            let span = start * hidden..(start + rows) * hidden;
            gate_up.extend_from_slice(&gate[span.clone()]);
            gate_up.extend_from_slice(&up[span]);
        }
        Self {
            gate_up,
            down,
            hidden,
            inter,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        (self.gate_up.len() + self.down.len()) * 2
    }

    /// The dense-MLP form: `down(silu(gate(x)) * up(x))` for `xs` `[m, hidden]`, no routing
    /// weight. Used by `mlp_only_layers` in bf16 on the CPU.
    pub fn forward(&self, xs: &[bf16], m: usize) -> Vec<bf16> {
        let job = ExpertJob {
            expert: self,
            xs: xs.to_vec(),
            weights: vec![bf16::ONE; m],
            m,
        };
        let mut out = vec![bf16::ZERO; m * self.hidden];
        run(&[job], &mut out);
        out
    }
}

/// One expert's share of a layer: its tokens' hidden states gathered, and their weights.
pub struct ExpertJob<'a> {
    pub expert: &'a PackedExpert,
    /// `[m, hidden]` bf16, row-major.
    pub xs: Vec<bf16>,
    /// The routing weight of each of the m rows, already in bf16.
    pub weights: Vec<bf16>,
    pub m: usize,
}

fn round(v: f32) -> bf16 {
    bf16::from_f32(v)
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// (job, first row) of every block of `block` rows of each job's `extent`: one task each.
fn block_tasks(
    jobs: &[ExpertJob<'_>],
    extent: impl Fn(&ExpertJob<'_>) -> usize,
    block: usize,
) -> Vec<(usize, usize)> {
    jobs.iter()
        .enumerate()
        .flat_map(|(j, job)| (0..extent(job)).step_by(block).map(move |r| (j, r)))
        .collect()
}

/// Computes every job and writes `weight * expert(x)` for each job's rows, job after job, into
/// `out` (`[sum of m, hidden]`, bf16).
pub fn run(jobs: &[ExpertJob<'_>], out: &mut [bf16]) {
    let total: usize = jobs.iter().map(|j| j.m).sum();
    let Some(hidden) = jobs.first().map(|j| j.expert.hidden) else {
        return;
    };
    assert_eq!(out.len(), total * hidden, "output buffer size");
    // Phase 1: silu(gate) * up for every (expert, block of intermediate columns).
    let tasks = block_tasks(jobs, |job| job.expert.inter, GATE_UP_ROWS);
    let pieces: Vec<Vec<bf16>> = tasks
        .par_iter()
        .map(|&(j, start)| {
            let job = &jobs[j];
            let e = job.expert;
            let rows = GATE_UP_ROWS.min(e.inter - start);
            let w = &e.gate_up[2 * start * e.hidden..2 * (start + rows) * e.hidden];
            let mut gu = vec![0f32; job.m * 2 * rows];
            matmul_bf16_serial(&job.xs, job.m, e.hidden, w, &mut gu, 2 * rows);
            let mut h = Vec::with_capacity(job.m * rows);
            for t in 0..job.m {
                let row = &gu[t * 2 * rows..(t + 1) * 2 * rows];
                let (g, u) = row.split_at(rows);
                h.extend(g.iter().zip(u).map(|(&g, &u)| {
                    let act = round(silu(round(g).to_f32()));
                    round(act.to_f32() * round(u).to_f32())
                }));
            }
            h
        })
        .collect();
    // Assemble each job's [m, inter] activations from its column blocks.
    let mut hs: Vec<Vec<bf16>> = jobs
        .iter()
        .map(|job| vec![bf16::ZERO; job.m * job.expert.inter])
        .collect();
    for (&(j, start), piece) in tasks.iter().zip(&pieces) {
        let (m, inter) = (jobs[j].m, jobs[j].expert.inter);
        let rows = piece.len() / m.max(1);
        for t in 0..m {
            hs[j][t * inter + start..t * inter + start + rows]
                .copy_from_slice(&piece[t * rows..(t + 1) * rows]);
        }
    }
    // Phase 2: down projection, rounded, times the routing weight, for every (expert, block of
    // hidden rows).
    let tasks = block_tasks(jobs, |job| job.expert.hidden, DOWN_ROWS);
    let pieces: Vec<Vec<bf16>> = tasks
        .par_iter()
        .map(|&(j, start)| {
            let job = &jobs[j];
            let e = job.expert;
            let rows = DOWN_ROWS.min(hidden - start);
            let w = &e.down[start * e.inter..(start + rows) * e.inter];
            let mut y = vec![0f32; job.m * rows];
            matmul_bf16_serial(&hs[j], job.m, e.inter, w, &mut y, rows);
            y.chunks(rows)
                .zip(&job.weights)
                .flat_map(|(row, &wt)| {
                    row.iter()
                        .map(move |&v| round(round(v).to_f32() * wt.to_f32()))
                })
                .collect()
        })
        .collect();
    let mut first_row = Vec::with_capacity(jobs.len());
    let mut next = 0;
    for job in jobs {
        first_row.push(next);
        next += job.m;
    }
    for (&(j, start), piece) in tasks.iter().zip(&pieces) {
        let m = jobs[j].m;
        let rows = piece.len() / m.max(1);
        for t in 0..m {
            let o = (first_row[j] + t) * hidden + start;
            out[o..o + rows].copy_from_slice(&piece[t * rows..(t + 1) * rows]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<bf16> {
        (0..n)
            .map(|i| {
                let v = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32;
                bf16::from_f32((v / (1u32 << 24) as f32 - 0.5) * 0.2)
            })
            .collect()
    }

    /// The same math with plain f32 loops and the same rounding points.
    fn reference(
        gate: &[bf16],
        up: &[bf16],
        down: &[bf16],
        x: &[bf16],
        weight: bf16,
        hidden: usize,
        inter: usize,
    ) -> Vec<f32> {
        let dot = |w: &[bf16], r: usize, xs: &[bf16], k: usize| -> f32 {
            (0..k).map(|i| w[r * k + i].to_f32() * xs[i].to_f32()).sum()
        };
        let h: Vec<bf16> = (0..inter)
            .map(|r| {
                let g = round(dot(gate, r, x, hidden));
                let u = round(dot(up, r, x, hidden));
                round(round(silu(g.to_f32())).to_f32() * u.to_f32())
            })
            .collect();
        (0..hidden)
            .map(|r| round(round(dot(down, r, &h, inter)).to_f32() * weight.to_f32()).to_f32())
            .collect()
    }

    #[test]
    fn matches_plain_loops_on_odd_shapes() {
        // Odd sizes: intermediate not a multiple of the block, hidden not of the vector width.
        for &(hidden, inter, ms) in &[(67, 100, [1, 3]), (130, 64, [2, 5]), (33, 129, [1, 1])] {
            let experts: Vec<(Vec<bf16>, Vec<bf16>, Vec<bf16>)> = (0..2)
                .map(|e| {
                    (
                        values(inter * hidden, 1 + e),
                        values(inter * hidden, 7 + e),
                        values(hidden * inter, 13 + e),
                    )
                })
                .collect();
            let packed: Vec<PackedExpert> = experts
                .iter()
                .map(|(g, u, d)| PackedExpert::new(g, u, d.clone(), hidden, inter))
                .collect();
            let jobs: Vec<ExpertJob> = packed
                .iter()
                .zip(ms)
                .enumerate()
                .map(|(e, (p, m))| ExpertJob {
                    expert: p,
                    xs: values(m * hidden, 100 + e as u32),
                    weights: (0..m)
                        .map(|t| bf16::from_f32(0.1 + 0.2 * t as f32))
                        .collect(),
                    m,
                })
                .collect();
            let total: usize = ms.iter().sum();
            let mut out = vec![bf16::ZERO; total * hidden];
            run(&jobs, &mut out);
            let mut row = 0;
            for (job, (g, u, d)) in jobs.iter().zip(&experts) {
                for t in 0..job.m {
                    let want = reference(
                        g,
                        u,
                        d,
                        &job.xs[t * hidden..(t + 1) * hidden],
                        job.weights[t],
                        hidden,
                        inter,
                    );
                    let got = &out[row * hidden..(row + 1) * hidden];
                    let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
                    for (w, g) in want.iter().zip(got) {
                        // Summation order differs from the plain loop: allow a bf16 ulp or so.
                        assert!((w - g.to_f32()).abs() <= 0.02 * scale, "{w} vs {g}");
                    }
                    row += 1;
                }
            }
        }
    }
}
