//! The tables of one fused MoE launch (layout in `kernels.cu`): built on the host from the
//! assignments grouped by expert, or on the GPU from a router's top-k left there (`moe_plan`,
//! `moe_plan.cuh`), into one u32 buffer whose parts [`PlanLayout`] locates.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, PushKernelArg};
use candle_core::{CudaDevice, Result};

use super::super::{MODULE, PTX, checked_i32, checked_u32, launch_config, upload};
use super::combine::combine_table;
use super::{MMA_M, MMA_MIN_TOKENS, StackedExperts};
use crate::experts::Assignment;

impl StackedExperts {
    /// The launch's tables built on the host from `groups` (each expert's assignment indices).
    pub(super) fn host_plan(
        &self,
        dev: &CudaDevice,
        assignments: &[Assignment],
        groups: &[(usize, Vec<u32>)],
        sum_tokens: Option<usize>,
    ) -> Result<Plan> {
        let s = assignments.len();
        let g = groups.len();
        // Small groups first (the GEMV kernels take groups 0..small), then the tensor-core ones.
        let mma = self.tiles_apply();
        let is_big = |slots: &[u32]| mma && slots.len() >= MMA_MIN_TOKENS;
        let (big, small): (Vec<_>, Vec<_>) = groups.iter().partition(|(_, slots)| is_big(slots));
        let n_small = small.len();
        let mut tab = vec![0u32; 3 * g + 3 * s];
        let mut tiles = Vec::new();
        let mut next = 0u32;
        for (gi, (expert, slots)) in small.into_iter().chain(big).enumerate() {
            tab[gi] = self.row_of.get(*expert).copied().flatten().ok_or_else(|| {
                candle_core::Error::Msg(format!("expert {expert} is not held here"))
            })?;
            tab[g + gi] = next;
            tab[2 * g + gi] = checked_u32("slots", slots.len())?;
            if gi >= n_small {
                for m0 in (0..slots.len()).step_by(MMA_M) {
                    tiles.extend([checked_u32("group", gi)?, checked_u32("tile", m0)?]);
                }
            }
            for &slot in slots {
                let a = &assignments[slot as usize];
                let k = next as usize;
                tab[3 * g + k] = a.token;
                tab[3 * g + s + k] = slot;
                tab[3 * g + 2 * s + k] = a.weight.to_bits();
                next += 1;
            }
        }
        if next as usize != s {
            candle_core::bail!("{next} grouped slots for {s} assignments");
        }
        let n_tiles = tiles.len() / 2;
        let layout = PlanLayout::new(g, s, n_tiles, sum_tokens.unwrap_or(0))?;
        tab.extend(tiles);
        tab.extend([
            checked_u32("groups", n_small)?,
            checked_u32("tiles", n_tiles)?,
        ]);
        if let Some(n) = sum_tokens {
            tab.extend(combine_table(n, assignments)?);
        }
        Ok(Plan {
            buf: upload(dev, &tab)?,
            layout,
            gemv_groups: checked_u32("groups", n_small)?,
            tile_rows: checked_u32("tiles", n_tiles)?,
            all_gemv: n_small == g,
        })
    }

    /// The launch's tables built on the GPU from a router's top-k left there (`moe_plan`), which
    /// also adds the chosen experts to `usage` (when given); slots of experts `row_of` does not
    /// hold get no group.
    pub(super) fn device_plan(
        &self,
        dev: &CudaDevice,
        top_k: TopK,
        usage: Option<&CudaView<'_, u32>>,
        row_of: &CudaSlice<u32>,
    ) -> Result<Plan> {
        let experts = self.row_of.len();
        let (n, s) = (top_k.tokens, top_k.tokens * top_k.k);
        let min_tokens = if self.tiles_apply() {
            MMA_MIN_TOKENS
        } else {
            0
        };
        // The most groups and tiles the routing can make: every expert with a token, and a tile
        // per MMA_M tokens of each expert with at least `min_tokens`. A token's top-k names k
        // distinct experts, so an expert has at most `n` slots: below `min_tokens` tokens
        // (decode of 2-4 sequences) no tile can be live, and the tile launches (with the side
        // stream's fork and join) are left out altogether.
        let n_tiles = match min_tokens {
            0 => 0,
            m if n < m => 0,
            m => s.div_ceil(MMA_M) + experts.min(s / m),
        };
        let (buf, layout) =
            plan_on_device(dev, top_k, row_of, usage, experts, min_tokens, n_tiles)?;
        Ok(Plan {
            buf,
            layout,
            gemv_groups: checked_u32("groups", layout.g)?,
            tile_rows: checked_u32("tiles", n_tiles)?,
            all_gemv: false,
        })
    }
}

/// Where a router's top-k lies: `tokens * k` expert ids then as many f32 weights' bits (u32),
/// at a device address of this GPU (its own memory, or a peer's mapped here).
#[derive(Clone, Copy)]
pub(in super::super) struct TopK {
    pub(in super::super) at: u64,
    pub(in super::super) tokens: usize,
    pub(in super::super) k: usize,
}

/// `moe_plan` over a router's top-k of a layer of `experts` experts: the launch's tables with up
/// to `n_tiles` tiles (groups of at least `min_tokens` tokens; 0: none), each chosen expert that
/// `row_of` holds added to `usage` (when given), and the combine table of every slot.
pub(super) fn plan_on_device(
    dev: &CudaDevice,
    top_k: TopK,
    row_of: &CudaSlice<u32>,
    usage: Option<&CudaView<'_, u32>>,
    experts: usize,
    min_tokens: usize,
    n_tiles: usize,
) -> Result<(CudaSlice<u32>, PlanLayout)> {
    let (n, k) = (top_k.tokens, top_k.k);
    let s = n * k;
    if experts > PLAN_MAX_EXPERTS {
        candle_core::bail!(
            "planning on the GPU takes at most {PLAN_MAX_EXPERTS} experts a layer, not {experts}"
        );
    }
    let g = experts.min(s);
    let layout = PlanLayout::new(g, s, n_tiles, n)?;
    // SAFETY: `moe_plan` writes every word the kernels read: groups below `live[0]`, tiles
    // below `live[1]`, every slot and the whole combine table.
    let mut buf = unsafe { dev.alloc::<u32>(layout.len) }?;
    {
        let mut all = buf.slice_mut(..);
        let (mut tab, mut rest) = all.split_at_mut(layout.tiles_at);
        let (mut tiles, mut rest) = rest.split_at_mut(layout.live_at - layout.tiles_at);
        let (mut live, mut comb) = rest.split_at_mut(2);
        // A thread per expert at least, and up to a block's 1,024 threads for the slots: the
        // plan is one block whose time is latency, its loops over the slots taking
        // `s / block` rounds each (16 at 256 threads for a 512-token prefill's 4,096).
        let threads = experts
            .next_multiple_of(32)
            .max(s.next_multiple_of(32).clamp(256, 1024));
        let block = checked_u32("experts", threads)?;
        let ints = [
            checked_i32("tokens", n)?,
            checked_i32("top-k", k)?,
            checked_i32("experts", experts)?,
            checked_i32("groups", g)?,
            checked_i32("tokens", min_tokens)?,
            checked_i32("tile", MMA_M)?,
        ];
        let func = dev.get_or_load_custom_func("moe_plan", MODULE, PTX)?;
        let stream = dev.cuda_stream();
        // A null address: nothing is counted.
        let (counts, _in_use) = match usage {
            Some(view) => {
                let (at, in_use) = view.device_ptr(&stream);
                (at, Some(in_use))
            }
            None => (0, None),
        };
        let mut b = func.builder();
        b.arg(&top_k.at).arg(row_of).arg(&counts);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&mut tab)
            .arg(&mut tiles)
            .arg(&mut live)
            .arg(&mut comb);
        let shared = checked_u32("experts", 2 * experts * 4)?;
        // SAFETY: argument types and order match `moe_plan` (moe_plan.cuh).
        unsafe { b.launch(launch_config((1, 1), block, shared)) }.w()?;
    }
    Ok((buf, layout))
}

/// The combine table of a router's whole top-k (`n + 1` offsets, then each token's slots in
/// ascending expert id) at the returned word of the buffer, every chosen expert added to
/// `usage`: the coordinator's part of a layer whose experts run elsewhere. `identity` holds every
/// expert id (`row_of` with all held).
pub(in super::super) fn combine_plan(
    dev: &CudaDevice,
    top_k: TopK,
    identity: &CudaSlice<u32>,
    usage: &CudaView<'_, u32>,
    experts: usize,
) -> Result<(CudaSlice<u32>, usize)> {
    let (buf, layout) = plan_on_device(dev, top_k, identity, Some(usage), experts, 0, 0)?;
    Ok((buf, layout.combine_at))
}

/// The most experts a layer may have for [`StackedExperts::forward_routed`] (`moe_plan` takes
/// one thread per expert in one block).
pub(in super::super) const PLAN_MAX_EXPERTS: usize = 1024;

/// Where the parts of a launch's tables lie in its one u32 buffer (see kernels.cu): the table
/// of `g` groups and `s` slots, the tiles, `live` (2 words), then the combine table of the
/// per-token sums (empty without them).
#[derive(Clone, Copy)]
pub(super) struct PlanLayout {
    pub(super) g: usize,
    pub(super) s: usize,
    pub(super) tiles_at: usize,
    pub(super) live_at: usize,
    pub(super) combine_at: usize,
    pub(super) len: usize,
}

impl PlanLayout {
    fn new(g: usize, s: usize, tiles: usize, sum_tokens: usize) -> Result<Self> {
        let tiles_at = 3 * g + 3 * s;
        let live_at = tiles_at + 2 * tiles;
        let combine_at = live_at + 2;
        let len = combine_at
            + if sum_tokens > 0 {
                sum_tokens + 1 + s
            } else {
                0
            };
        checked_u32("table words", len)?;
        Ok(Self {
            g,
            s,
            tiles_at,
            live_at,
            combine_at,
            len,
        })
    }
}

/// A launch's tables in device memory and the grids that cover them.
pub(super) struct Plan {
    pub(super) buf: CudaSlice<u32>,
    pub(super) layout: PlanLayout,
    /// Block rows of the GEMV kernels (groups; those past `live[0]` return at once).
    pub(super) gemv_groups: u32,
    /// Block rows of the tensor-core kernels (tiles; those past `live[1]` return at once).
    pub(super) tile_rows: u32,
    /// Every group on the GEMVs, known on the host: batch-1's fused down applies.
    pub(super) all_gemv: bool,
}
