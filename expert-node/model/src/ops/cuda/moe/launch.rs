//! The expert launches of one fused MoE step (`moe.rs`): the GEMV kernels for experts with few
//! tokens on the main stream, the tensor-core tiles for those with many beside them on a second
//! stream, then the down projections, each kernel writing its slots' rows into this process's
//! memory or, for a routed call, straight into the coordinator's (`routed.rs`).

use std::sync::Arc;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, CudaView, PushKernelArg};
use candle_core::{CudaDevice, DType, Result, Tensor};
use half::bf16;

use super::super::{
    MODULE, PTX, aligned, allow_dynamic_shared, checked_i32, launch_config, side, with_view, wrap,
};
use super::combine::launch_combine;
use super::plan::{Plan, PlanLayout};
use super::{
    DOWN_CHUNKS, DOWN_N, DOWN_ROWS, DOWN_STAGES, GATE_UP_CHUNKS, GU_N, GU_STAGES, StackedExperts,
    WARPS, mma_shared_bytes, mma_threads, staged_bytes,
};

impl StackedExperts {
    /// The expert launches of `plan` on `xs`: per-slot outputs, their per-token sums, or the
    /// per-slot rows written elsewhere (then the tensor returned is empty).
    pub(super) fn launch(
        &self,
        dev: &CudaDevice,
        xs: &Tensor,
        plan: &Plan,
        to: Out,
    ) -> Result<Tensor> {
        let sum_tokens = match to {
            Out::Sums(n) => Some(n),
            Out::Rows | Out::Into(_) => None,
        };
        let (h, i) = (self.hidden, self.inter);
        let PlanLayout { g, s, .. } = plan.layout;
        let tab = &plan.buf;
        let tiles = tab.slice(plan.layout.tiles_at..plan.layout.live_at);
        let live = tab.slice(plan.layout.live_at..plan.layout.live_at + 2);
        let sizes = [
            checked_i32("groups", g)?,
            checked_i32("slots", s)?,
            checked_i32("hidden", h)?,
            checked_i32("intermediate", i)?,
        ];
        // SAFETY: every row of `act` belongs to one slot of one group and is written by one of
        // the gate/up kernels; likewise every row of `out` by one of the down kernels.
        let mut act = unsafe { dev.alloc::<bf16>(s * i) }?;
        let mut out = match to {
            Out::Into(ptr) => Rows::At(ptr),
            Out::Rows | Out::Sums(_) => Rows::Owned(unsafe { dev.alloc::<bf16>(s * h) }?),
        };
        // Read in place by kernels on two streams, so no copy may be made (and freed) inside.
        let xs = aligned(xs)?;
        // `tile_threads`: the block of a tensor-core kernel, which takes the tile list too; `None`
        // for a GEMV kernel.
        let launch = |stream: &Arc<CudaStream>,
                      name: &str,
                      input: &CudaView<'_, bf16>,
                      weights: &CudaView<'_, bf16>,
                      out: Dest<'_>,
                      grid: (u32, u32),
                      tile_threads: Option<u32>,
                      shared: u32|
         -> Result<()> {
            if grid.1 == 0 {
                return Ok(());
            }
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            allow_dynamic_shared(&func, shared)?;
            let raw;
            let mut b = stream.launch_builder(&func);
            b.arg(input).arg(weights).arg(tab);
            for size in &sizes {
                b.arg(size);
            }
            if tile_threads.is_some() {
                b.arg(&tiles);
            }
            b.arg(&live);
            match out {
                Dest::Slice(out) => b.arg(out),
                Dest::Raw(ptr) => {
                    raw = ptr;
                    b.arg(&raw)
                }
            };
            let block = tile_threads.unwrap_or((WARPS * 32) as u32);
            // SAFETY: argument types and order match the kernel `name` (kernels.cu).
            unsafe { b.launch(launch_config(grid, block, shared)) }.w()?;
            Ok(())
        };
        let rows = |n: usize, per: usize| n.div_ceil(per) as u32;
        let main = dev.cuda_stream();
        // The GEMV groups on the main stream, the tiles beside them when there are both: each
        // writes its own slots' rows of `act` and `out`, so the two chains are independent.
        let beside = match (plan.gemv_groups, plan.tile_rows) {
            (0, _) | (_, 0) => None,
            _ => Some(side::fork(dev)?),
        };
        let tile_stream = beside.as_ref().map_or(&main, |b| b.stream());
        with_view(&xs, |xv| {
            with_view(&self.w13, |wv| {
                let tiled = (rows(i, GU_N), plan.tile_rows);
                launch(
                    tile_stream,
                    "moe_gate_up_mma_bf16",
                    xv,
                    wv,
                    Dest::Slice(&mut act),
                    tiled,
                    Some(mma_threads(GU_N)),
                    mma_shared_bytes(2, GU_N, GU_STAGES),
                )?;
                let gemv = (rows(i, WARPS), plan.gemv_groups);
                let staged = staged_bytes(h, GATE_UP_CHUNKS)?;
                launch(
                    &main,
                    "moe_gate_up_bf16",
                    xv,
                    wv,
                    Dest::Slice(&mut act),
                    gemv,
                    None,
                    staged,
                )
            })
        })?;
        let act_view = act.slice(..);
        if sum_tokens == Some(1) && plan.all_gemv {
            // Batch-1 decode (no tiles, so nothing beside): down, weight and sum in one launch
            // (the same bits).
            // SAFETY: the kernel writes every element of the one token's row.
            let mut sums = unsafe { dev.alloc::<bf16>(h) }?;
            with_view(&self.w2, |wv| {
                let func = dev.get_or_load_custom_func("moe_down_combine1_bf16", MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&act_view).arg(wv).arg(tab);
                for size in &sizes {
                    b.arg(size);
                }
                b.arg(&mut sums);
                // SAFETY: argument types and order match `moe_down_combine1_bf16`.
                unsafe { b.launch(launch_config((rows(h, WARPS), 1), (WARPS * 32) as u32, 0)) }
                    .w()?;
                Ok(())
            })?;
            return Ok(wrap(dev, sums, (1, h)));
        }
        with_view(&self.w2, |wv| {
            let tiled = (rows(h, DOWN_N), plan.tile_rows);
            launch(
                tile_stream,
                "moe_down_mma_bf16",
                &act_view,
                wv,
                out.dest(),
                tiled,
                Some(mma_threads(DOWN_N)),
                mma_shared_bytes(1, DOWN_N, DOWN_STAGES),
            )?;
            let gemv = (rows(h, WARPS * DOWN_ROWS), plan.gemv_groups);
            let staged = staged_bytes(i, DOWN_CHUNKS)?;
            launch(
                &main,
                "moe_down_bf16",
                &act_view,
                wv,
                out.dest(),
                gemv,
                None,
                staged,
            )
        })?;
        if let Some(beside) = beside {
            beside.join()?;
        }
        let Rows::Owned(out) = out else {
            return Tensor::zeros((0, h), DType::BF16, xs.device());
        };
        match sum_tokens {
            None => Ok(wrap(dev, out, (s, h))),
            Some(n) => {
                let at = plan.layout.combine_at;
                let (offsets, idx) = (tab.slice(at..at + n + 1), tab.slice(at + n + 1..));
                let sums = launch_combine(dev, &out.slice(..), &offsets, &idx, n, h)?;
                Ok(wrap(dev, sums, (n, h)))
            }
        }
    }
}

/// What [`StackedExperts::launch`] makes of the per-slot rows.
#[derive(Clone, Copy)]
pub(super) enum Out {
    /// The rows, `[slots, H]`.
    Rows,
    /// Their per-token sums, `[n, H]`.
    Sums(usize),
    /// Written at this device address (another process's memory, mapped here).
    Into(u64),
}

/// Where a kernel writes its rows.
enum Dest<'a> {
    Slice(&'a mut CudaSlice<bf16>),
    Raw(u64),
}

/// A launch's per-slot rows: its own, or at another process's memory mapped here.
enum Rows {
    Owned(CudaSlice<bf16>),
    At(u64),
}

impl Rows {
    fn dest(&mut self) -> Dest<'_> {
        match self {
            Rows::Owned(slice) => Dest::Slice(slice),
            Rows::At(ptr) => Dest::Raw(*ptr),
        }
    }
}
