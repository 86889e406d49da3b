//! Where each patch is, for `Qwen3OmniMoeVisionEncoder` (transformers 4.57.3): the learned position
//! embeddings bilinearly interpolated to the patch grid (`fast_pos_embed_interpolate`) and the 2-D
//! rotary angles (`rot_pos_emb`), both listed in the order the processor lays patches out: frame
//! pair, merge window (row-major), then position inside the window.

/// Row and column of every patch of a `t × h × w` grid, in `pixel_values` order.
pub(crate) fn patch_coords(
    [t, h, w]: [usize; 3],
    merge: usize,
) -> impl Iterator<Item = (usize, usize)> {
    (0..t).flat_map(move |_| {
        (0..h / merge).flat_map(move |bh| {
            (0..w / merge).flat_map(move |bw| {
                (0..merge).flat_map(move |mh| {
                    (0..merge).map(move |mw| (bh * merge + mh, bw * merge + mw))
                })
            })
        })
    })
}

/// `torch.linspace(0, end, steps)` in f32 as PyTorch's CPU kernel computes it element by element
/// (`start + step * i` in the first half, `end - step * (steps - 1 - i)` in the second). Runs of
/// 16 or more may be filled by the vectorised kernel, which can round the last bit differently:
/// an interpolation weight moves by ~1e-7 of the grid side, far below any tolerance.
pub(crate) fn linspace(end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![0.0];
    }
    let step = end / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// For every patch (in `pixel_values` order), the four position-embedding rows around it and
/// their bilinear weights: `corner k` of patch `n` is `indices[k][n]`, weighted `weights[k][n]`
/// (corners: floor/floor, floor/ceil, ceil/floor, ceil/ceil of row/column), computed in f32 as
/// the reference does.
pub(crate) struct Bilinear {
    pub indices: [Vec<u32>; 4],
    pub weights: [Vec<f32>; 4],
}

pub(crate) fn interpolation(grids: &[[usize; 3]], side: usize, merge: usize) -> Bilinear {
    let mut indices: [Vec<u32>; 4] = Default::default();
    let mut weights: [Vec<f32>; 4] = Default::default();
    let last = side - 1;
    for &grid in grids {
        let [_, h, w] = grid;
        // Per axis: floor index, ceil index, fraction (all as the reference's tensors).
        let axis = |n: usize| -> Vec<(usize, usize, f32)> {
            linspace(last as f32, n)
                .into_iter()
                .map(|x| {
                    let lo = x as usize; // `.int()` truncates; x >= 0
                    (lo, (lo + 1).min(last), x - lo as f32)
                })
                .collect()
        };
        let (rows, cols) = (axis(h), axis(w));
        for (r, c) in patch_coords(grid, merge) {
            let (r0, r1, dh) = rows[r];
            let (c0, c1, dw) = cols[c];
            let corners = [
                (r0, c0, (1.0 - dh) * (1.0 - dw)),
                (r0, c1, (1.0 - dh) * dw),
                (r1, c0, dh * (1.0 - dw)),
                (r1, c1, dh * dw),
            ];
            for (k, (rr, cc, wt)) in corners.into_iter().enumerate() {
                indices[k].push((rr * side + cc) as u32);
                weights[k].push(wt);
            }
        }
    }
    Bilinear { indices, weights }
}

/// The rotary angles of every patch, `[patches, head_dim / 2]` row-major: the row's angles then
/// the column's, each `position × inv_freq` with `inv_freq = 1 / 10000^(2i / (head_dim / 2))`
/// (`Qwen3OmniMoeVisionRotaryEmbedding(head_dim // 2)`), in f32.
pub(crate) fn rotary_angles(grids: &[[usize; 3]], head_dim: usize, merge: usize) -> Vec<f32> {
    let dim = head_dim / 2;
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / 10000f32.powf(i as f32 / dim as f32))
        .collect();
    let mut out = Vec::new();
    for &grid in grids {
        for (r, c) in patch_coords(grid, merge) {
            out.extend(inv_freq.iter().map(|f| r as f32 * f));
            out.extend(inv_freq.iter().map(|f| c as f32 * f));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coords_follow_merge_windows() {
        let coords: Vec<_> = patch_coords([1, 2, 4], 2).collect();
        assert_eq!(
            coords,
            [
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
        assert_eq!(patch_coords([3, 2, 2], 2).count(), 12);
    }

    #[test]
    fn linspace_hits_both_ends() {
        let l = linspace(3.0, 14);
        assert_eq!((l[0], l[13]), (0.0, 3.0));
        assert!(l.windows(2).all(|p| p[1] > p[0]));
        assert_eq!(linspace(47.0, 2), [0.0, 47.0]);
    }

    #[test]
    fn bilinear_weights_sum_to_one() {
        let b = interpolation(&[[1, 6, 10]], 4, 2);
        for n in 0..60 {
            let s: f32 = (0..4).map(|k| b.weights[k][n]).sum();
            assert!((s - 1.0).abs() < 1e-6);
            assert!((0..4).all(|k| b.indices[k][n] < 16));
        }
        // The first patch sits on embedding 0, the last grid corner on embedding 15.
        assert_eq!((b.indices[0][0], b.weights[0][0]), (0, 1.0));
    }
}
