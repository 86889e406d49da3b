//! Every kernel path against plain f64 sums on odd shapes, and the parallel wrapper.

use super::*;

/// Deterministic pseudo-random bf16 in about [-2, 2], with a spread of exponents so that
/// rounding in the kernels is exercised; no external RNG crate needed.
fn rand_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            bf16::from_f32((u * 4.0 - 2.0) * if s & 1 == 0 { 1.0 } else { 0.01 })
        })
        .collect()
}

/// f64 reference and sum |x_i w_i| (the scale the error is judged against).
fn reference(x: &[bf16], m: usize, k: usize, w: &[bf16]) -> Vec<(f64, f64)> {
    let n = w.len() / k;
    let mut r = Vec::with_capacity(m * n);
    for t in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for i in 0..k {
                let p = f64::from(x[t * k + i].to_f32()) * f64::from(w[j * k + i].to_f32());
                s += p;
                a += p.abs();
            }
            r.push((s, a));
        }
    }
    r
}

fn tolerance(isa: Isa) -> f64 {
    match isa {
        // vdpbf16ps / tdpbf16ps flush denormals and round each pairwise sum their own way;
        // the widening paths are plain f32 FMA accumulation. Observed worst cases on the
        // test shapes are ~3e-8 for every path; these bounds (~ k/lanes * f32 epsilon for
        // the longest k) still catch any lost or doubled element (>= ~1/k ~ 5e-4).
        Isa::Avx512Bf16 | Isa::AmxBf16 => 2e-5,
        _ => 1e-5,
    }
}

const KS: [usize; 8] = [1, 7, 31, 32, 33, 100, 2048, 2049];
const NS: [usize; 6] = [1, 3, 5, 17, 64, 129];
// 16 and 33 add the AMX path's exact-tile and odd-group cases.
const MS: [usize; 9] = [1, 2, 3, 4, 5, 9, 16, 17, 33];

fn assert_close(isa: Isa, got: f32, want: (f64, f64), ctx: &str) {
    let (s, a) = want;
    let err = (f64::from(got) - s).abs();
    assert!(
        err <= tolerance(isa) * a + 1e-30,
        "{} {ctx}: got {got}, want {s} (err {err:e}, scale {a:e})",
        isa.name()
    );
}

#[test]
fn serial_all_paths_odd_shapes() {
    for isa in Isa::ALL {
        if !isa.is_available() {
            eprintln!("skipping {}: not supported by this CPU", isa.name());
            continue;
        }
        for &k in &KS {
            for &n in &NS {
                let w = rand_bf16(n * k, (k * 1000 + n) as u64);
                let mmax = *MS.iter().max().unwrap_or(&1);
                let x = rand_bf16(mmax * k, (k * 7 + n * 13 + 5) as u64);
                for &m in &MS {
                    let refr = reference(&x, m, k, &w);
                    // Row padding that must stay untouched.
                    let stride = n + 3;
                    let mut out = vec![f32::NAN; (m - 1) * stride + n + 2];
                    matmul_bf16_serial_with(isa, &x, m, k, &w, &mut out, stride);
                    for t in 0..m {
                        for j in 0..n {
                            let ctx = format!("m={m} k={k} n={n} t={t} j={j}");
                            assert_close(isa, out[t * stride + j], refr[t * n + j], &ctx);
                        }
                        for pad in n..stride.min(out.len() - t * stride) {
                            assert!(
                                out[t * stride + pad].is_nan(),
                                "{} wrote padding at t={t} col={pad} (m={m} k={k} n={n})",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn parallel_all_paths_odd_shapes() {
    // n values straddling ROW_BLOCK so that several blocks and a short last block occur.
    let ns = [
        1,
        17,
        ROW_BLOCK - 1,
        ROW_BLOCK,
        ROW_BLOCK + 1,
        3 * ROW_BLOCK + 5,
    ];
    for isa in Isa::ALL {
        if !isa.is_available() {
            eprintln!("skipping {}: not supported by this CPU", isa.name());
            continue;
        }
        for &k in &[1usize, 33, 2049] {
            for &n in &ns {
                let w = rand_bf16(n * k, (k * 31 + n) as u64);
                for &m in &[1usize, 2, 5, 17] {
                    let x = rand_bf16(m * k, (m * 3 + k) as u64);
                    let refr = reference(&x, m, k, &w);
                    let got = matmul_bf16_with(isa, &x, m, k, &w);
                    assert_eq!(got.len(), m * n);
                    for (idx, (&g, &r)) in got.iter().zip(&refr).enumerate() {
                        let ctx = format!("parallel m={m} k={k} n={n} idx={idx}");
                        assert_close(isa, g, r, &ctx);
                    }
                }
            }
        }
    }
}

#[test]
fn large_m_uses_token_blocking_correctly() {
    // Large enough that the kernels' blocking takes effect: several L2 token blocks and
    // row blocks for the vector kernels (first shape), and for AMX several row groups,
    // k blocks, and token blocks of 512 with a ragged k (second shape).
    for (m, k, n) in [(150, 2048, 300), (530, 600, 140)] {
        let x = rand_bf16(m * k, 11);
        let w = rand_bf16(n * k, 12);
        let refr = reference(&x, m, k, &w);
        for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
            let mut out = vec![0.0f32; m * n];
            matmul_bf16_serial_with(isa, &x, m, k, &w, &mut out, n);
            for (idx, (&g, &r)) in out.iter().zip(&refr).enumerate() {
                assert_close(isa, g, r, &format!("large m={m} k={k} n={n} idx={idx}"));
            }
            let par = matmul_bf16_with(isa, &x, m, k, &w);
            assert_eq!(par, out, "{}: parallel differs from serial", isa.name());
        }
    }
}

#[test]
fn reused_scratch_does_not_leak_between_calls() {
    // Per-thread scratch (packed activations, output strips) is reused. Before each checked
    // call, a larger call full of infinities leaves them in the scratch; padding positions
    // of the checked call (missing tokens, k past a ragged end) must not pick them up,
    // since 0 * inf would turn results into NaN.
    let poison = vec![bf16::INFINITY; 64 * 128];
    let w_poison = vec![bf16::ONE; 70 * 128];
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
        for (m, k) in [(17, 64), (20, 40), (33, 63), (48, 100)] {
            let x = rand_bf16(m * k, (m * k) as u64);
            let w = rand_bf16(70 * k, 5);
            let refr = reference(&x, m, k, &w);
            let _ = matmul_bf16_with(isa, &poison, 64, 128, &w_poison);
            let par = matmul_bf16_with(isa, &x, m, k, &w);
            let mut ser = vec![0.0f32; m * 70];
            let mut poisoned = vec![0.0f32; 64 * 70];
            matmul_bf16_serial_with(isa, &poison, 64, 128, &w_poison, &mut poisoned, 70);
            matmul_bf16_serial_with(isa, &x, m, k, &w, &mut ser, 70);
            for (idx, ((&p, &q), &r)) in par.iter().zip(&ser).zip(&refr).enumerate() {
                let ctx = format!("reuse m={m} k={k} idx={idx}");
                assert_close(isa, p, r, &ctx);
                assert_close(isa, q, r, &ctx);
            }
        }
    }
}

#[test]
fn default_entry_points_and_detection() {
    let detected = isa();
    assert!(Isa::ALL.iter().any(|i| i.name() == detected));
    assert!(Isa::detect().is_available());
    let (m, k) = (3, 65);
    let x = rand_bf16(m * k, 1);
    let w = rand_bf16(10 * k, 2);
    let mut out = vec![0.0; 3 * 10];
    matmul_bf16_serial(&x, m, k, &w, &mut out, 10);
    assert_eq!(matmul_bf16(&x, m, k, &w), out);
}

#[test]
fn empty_and_extra_input() {
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
        // m = 0 and n = 0 are no-ops.
        assert!(matmul_bf16_with(isa, &[], 0, 4, &rand_bf16(8, 1)).is_empty());
        assert!(matmul_bf16_with(isa, &rand_bf16(4, 1), 1, 4, &[]).is_empty());
        // x longer than m*k: the extra is ignored.
        let x = rand_bf16(40, 3);
        let w = rand_bf16(3 * 20, 4);
        let a = matmul_bf16_with(isa, &x, 1, 20, &w);
        let b = matmul_bf16_with(isa, &x[..20], 1, 20, &w);
        assert_eq!(a, b);
    }
}

#[test]
fn special_values_propagate() {
    // Inf and NaN in the weights must reach the output on every path (no silent masking).
    let k = 40;
    let x = vec![bf16::ONE; k];
    let mut w = vec![bf16::ZERO; 2 * k];
    w[5] = bf16::INFINITY;
    w[k + 37] = bf16::NAN; // in the k tail
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
        let got = matmul_bf16_with(isa, &x, 1, k, &w);
        assert!(
            got[0].is_infinite() && got[0] > 0.0,
            "{}: {got:?}",
            isa.name()
        );
        assert!(got[1].is_nan(), "{}: {got:?}", isa.name());
    }
}

#[test]
#[should_panic(expected = "out has")]
fn short_output_panics() {
    let x = rand_bf16(8, 1);
    let w = rand_bf16(16, 2);
    let mut out = vec![0.0; 3];
    matmul_bf16_serial(&x, 2, 4, &w, &mut out, 4);
}

#[test]
#[should_panic(expected = "not a multiple")]
fn ragged_weights_panic() {
    matmul_bf16(&rand_bf16(4, 1), 1, 4, &rand_bf16(7, 2));
}
