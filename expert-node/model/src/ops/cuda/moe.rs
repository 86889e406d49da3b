//! The fused MoE step on the GPU: a layer's experts held as two stacked bf16 tensors, and one
//! launch each for gate+up+SiLU, for down with the router weight, and for the per-token sum;
//! experts with few tokens run as grouped GEMVs, those with many (prefill) on the tensor cores.
//! Slots are grouped by expert into one small table, on the host where the routing is there and
//! on the GPU where the router left it there (`plan.rs`), and launched by `launch.rs`; see
//! `kernels.cu` for its layout and the numerics.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, PushKernelArg};
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor};
use half::bf16;

use super::exchange::ImportedRouted;
use super::{
    DeviceRouting, MODULE, PTX, bf16_device, checked_i32, checked_u32, launch_config, upload,
    with_view, wrap,
};
use crate::experts::Assignment;

mod combine;
mod launch;
mod plan;

pub use combine::combine;
pub(super) use combine::launch_combine_at;
use launch::Out;
pub(super) use plan::PLAN_MAX_EXPERTS;
pub(super) use plan::{TopK, combine_plan};

/// Warps per block of the GEMV MoE kernels: one gate/up output row per warp.
const WARPS: usize = 8;
/// Down rows per warp of `moe_down_bf16`, and the 16-byte chunks of a row a lane holds at once
/// in it and in `moe_gate_up_bf16` (`DOWN_ROWS`, `DOWN_CHUNKS`, `GATE_UP_CHUNKS` in kernels.cu).
/// Both stage their input rows in shared memory, `MOE_TOKENS` rows of at most 32 such chunks a
/// lane.
const DOWN_ROWS: usize = 2;
const DOWN_CHUNKS: usize = 3;
const GATE_UP_CHUNKS: usize = 4;
const MOE_TOKENS: usize = 4;
/// Experts with at least this many tokens run on the tensor cores (`moe_*_mma_bf16`), the rest
/// as grouped GEMVs. The GEMVs read an expert's rows once per `MOE_TOKENS` (4) tokens, and at
/// 5-15 tokens those passes one after another cost more than a whole tile on the tensor cores
/// (measured with 32-slot tiles; prefill 512 on an H200: the ~7% of experts below 16 tokens
/// took 23% of the MoE time).
/// Depends only on the expert's own token count, so a node holding the expert makes the same
/// choice as a single process would.
const MMA_MIN_TOKENS: usize = 5;
/// Tiles of the tensor-core kernels: `MMA_M` slots by `*_N` outputs in K steps of `MMA_K`, a warp
/// per 32 x 32, and the stages of their shared-memory rings (`MMA_*`, `GU_*`, `DOWN_*` in
/// moe_mma.cuh).
const MMA_M: usize = 64;
const MMA_K: usize = 64;
const GU_N: usize = 64;
const GU_STAGES: usize = 3;
const DOWN_N: usize = 128;
const DOWN_STAGES: usize = 3;

/// Threads of a tensor-core block `n` outputs wide: a warp per 32 x 32.
const fn mma_threads(n: usize) -> u32 {
    (MMA_M / 32 * (n / 32) * 32) as u32
}

/// Dynamic shared memory of a tensor-core kernel (`TileShared` in moe_mma.cuh, which traps if
/// given less): a ring of stages, each `MMA_M` input rows and `weights` x `n` weight rows of
/// `MMA_K` bf16 padded by 8.
fn mma_shared_bytes(weights: usize, n: usize, stages: usize) -> u32 {
    (stages * (MMA_M + weights * n) * (MMA_K + 8) * 2) as u32
}

/// Dynamic shared memory of a GEMV MoE kernel whose input rows are `width` wide and whose lanes
/// hold `chunks` 16-byte chunks of a weight row at once: `MOE_TOKENS` input rows of at most one
/// pass (32 lanes' chunks) each.
fn staged_bytes(width: usize, chunks: usize) -> Result<u32> {
    checked_u32(
        "staged input rows",
        MOE_TOKENS * (width / 8).min(32 * chunks) * 16,
    )
}

/// One MoE layer's held experts, stacked on one GPU: `w13` `[held, 2I, H]` (each expert's gate
/// rows then its up rows), `w2` `[held, H, I]`.
pub struct StackedExperts {
    w13: Tensor,
    w2: Tensor,
    /// Stacked row of each expert id, `None` where the expert is not held.
    row_of: Vec<Option<u32>>,
    /// `row_of` on the GPU (`u32::MAX` where not held), for tables built there.
    row_of_device: Option<CudaSlice<u32>>,
    /// Every expert of the layer is held here (what [`StackedExperts::forward_routed`] needs).
    all_held: bool,
    hidden: usize,
    inter: usize,
}

impl StackedExperts {
    /// Whether the kernels serve these sizes (16-byte rows).
    pub fn supports(hidden: usize, inter: usize) -> bool {
        hidden.is_multiple_of(8) && inter.is_multiple_of(8) && hidden > 0 && inter > 0
    }

    /// Stacks `experts` (expert id, then gate `[I, H]`, up `[I, H]`, down `[H, I]`, bf16 on the
    /// host) of a layer with `num_experts` experts onto `device`, one copy per tensor.
    pub fn new(
        num_experts: usize,
        experts: &[(usize, [Tensor; 3])],
        device: &Device,
    ) -> Result<Self> {
        let Some((_, [gate, _, _])) = experts.first() else {
            candle_core::bail!("no experts to stack");
        };
        let (inter, hidden) = gate.dims2()?;
        let mut row_of = vec![None; num_experts];
        let mut w13 = Vec::with_capacity(experts.len() * 2);
        let mut w2 = Vec::with_capacity(experts.len());
        for (row, (expert, [gate, up, down])) in experts.iter().enumerate() {
            let slot = row_of
                .get_mut(*expert)
                .ok_or_else(|| candle_core::Error::Msg(format!("expert {expert} out of range")))?;
            *slot = Some(checked_u32("expert row", row)?);
            w13.push(gate.clone());
            w13.push(up.clone());
            w2.push(down.clone());
        }
        let held = experts.len();
        let w13 = Tensor::cat(&w13, 0)?
            .reshape((held, 2 * inter, hidden))?
            .to_device(device)?;
        let w2 = Tensor::stack(&w2, 0)?.to_device(device)?;
        let all_held = row_of.iter().all(Option::is_some);
        let row_of_device = match device {
            Device::Cuda(dev) => {
                let rows: Vec<u32> = row_of.iter().map(|r| r.unwrap_or(u32::MAX)).collect();
                Some(upload(dev, &rows)?)
            }
            _ => None,
        };
        Ok(Self {
            w13,
            w2,
            row_of,
            row_of_device,
            all_held,
            hidden,
            inter,
        })
    }

    pub fn holds(&self, expert: usize) -> bool {
        matches!(self.row_of.get(expert), Some(Some(_)))
    }

    pub fn size_in_bytes(&self) -> usize {
        (self.w13.elem_count() + self.w2.elem_count()) * 2
    }

    /// `weight * expert(xs[token])` for every assignment, rows in assignment order:
    /// `[assignments.len(), H]`. `groups` lists each expert's assignment indices; every
    /// assignment must be in exactly one group of a held expert (the caller validated that).
    /// `planned` is called once the launch tables are on the device, before the first launch
    /// (the node times its host's planning apart from its launches).
    pub fn outputs(
        &self,
        xs: &Tensor,
        assignments: &[Assignment],
        groups: &[(usize, Vec<u32>)],
        planned: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        self.run(xs, assignments, groups, None, planned)
    }

    /// The per-token sums of [`StackedExperts::outputs`] (what [`combine`] makes of them), in
    /// the same launch sequence with a single upload of every table: `[n_tokens, H]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        assignments: &[Assignment],
        groups: &[(usize, Vec<u32>)],
        n_tokens: usize,
    ) -> Result<Tensor> {
        self.run(xs, assignments, groups, Some(n_tokens), &mut || {})
    }

    /// Whether [`StackedExperts::forward_routed`] serves this layer: every expert held here, and
    /// few enough for `moe_plan`'s one block (larger layers take the host's routing).
    pub fn takes_device_routing(&self) -> bool {
        self.all_held && self.row_of_device.is_some() && self.row_of.len() <= PLAN_MAX_EXPERTS
    }

    /// The per-token sums for the rows of `xs` `[n, H]` routed by a router's top-k left on the
    /// GPU, with no host round trip; the chosen experts are added to `usage` (u32 per expert of
    /// this layer). Batch 1 takes two launches that read the top-k where it is; larger batches
    /// build the tables on the GPU (`moe_plan`) and take [`StackedExperts::forward`]'s launches.
    /// Either way the arithmetic, summation order and bits of [`StackedExperts::forward`].
    pub fn forward_routed(
        &self,
        xs: &Tensor,
        routing: &DeviceRouting,
        usage: &Tensor,
    ) -> Result<Tensor> {
        let dev = bf16_device(xs)
            .ok_or_else(|| candle_core::Error::Msg("fused MoE needs bf16 CUDA input".into()))?;
        let Some(row_of) = self.row_of_device.as_ref().filter(|_| self.all_held) else {
            candle_core::bail!("device routing needs every expert of the layer held here")
        };
        if xs.dims() != [routing.tokens, self.hidden] || routing.tokens == 0 {
            candle_core::bail!(
                "device routing of {} tokens for input {:?} (hidden size {})",
                routing.tokens,
                xs.dims(),
                self.hidden
            );
        }
        with_counts(usage, self.row_of.len(), |counts| {
            if routing.tokens == 1 {
                return self.forward_one(dev, xs, routing, counts, row_of);
            }
            let stream = dev.cuda_stream();
            let (at, _in_use) = routing.buf.device_ptr(&stream);
            let top_k = TopK {
                at,
                tokens: routing.tokens,
                k: routing.k,
            };
            let plan = self.device_plan(dev, top_k, Some(counts), row_of)?;
            self.launch(dev, xs, &plan, Out::Sums(routing.tokens))
        })
    }

    /// A routed call's slots that chose an expert held here (`call`: the coordinator's whole
    /// top-k and output rows, mapped here, and its hidden states copied in), each written to row
    /// `slot` of the coordinator's `[n * k, H]` bf16 rows; the other rows are left alone. Ids
    /// past the layer's experts count as not held. The arithmetic and bits of
    /// [`StackedExperts::forward`]'s outputs: the slots of an expert are the same wherever the
    /// rest of the layer is.
    pub fn outputs_routed_into(&self, call: &ImportedRouted) -> Result<()> {
        let xs = &call.xs;
        let dev = bf16_device(xs)
            .ok_or_else(|| candle_core::Error::Msg("fused MoE needs bf16 CUDA input".into()))?;
        let Some(row_of) = &self.row_of_device else {
            candle_core::bail!("the experts are not on a GPU")
        };
        if xs.dims() != [call.top_k.tokens, self.hidden] || call.top_k.tokens == 0 {
            candle_core::bail!(
                "device routing of {} tokens for input {:?} (hidden size {})",
                call.top_k.tokens,
                xs.dims(),
                self.hidden
            );
        }
        if call.top_k.tokens == 1 && call.top_k.k <= ROUTED1_MAX_K {
            return self.outputs_one_into(dev, call, row_of);
        }
        // The node keeps no usage counts (the coordinator does).
        let plan = self.device_plan(dev, call.top_k, None, row_of)?;
        self.launch(dev, xs, &plan, Out::Into(call.output))
            .map(|_| ())
    }

    /// Batch-1 [`StackedExperts::outputs_routed_into`]: gate+up and down reading the top-k as
    /// copied in, for the experts held here, no plan launch (it is on a batch-1 layer's path
    /// between the two GPUs).
    fn outputs_one_into(
        &self,
        dev: &CudaDevice,
        call: &ImportedRouted,
        row_of: &CudaSlice<u32>,
    ) -> Result<()> {
        let k = call.top_k.k;
        let (h, i) = (self.hidden, self.inter);
        let (k_i, e_i, h_i, i_i) = (
            checked_i32("top-k", k)?,
            checked_i32("experts", self.row_of.len())?,
            checked_i32("hidden", h)?,
            checked_i32("intermediate", i)?,
        );
        // SAFETY: gate/up writes the rows of the held experts, the only ones down reads.
        let mut act = unsafe { dev.alloc::<bf16>(k * i) }?;
        let rows = |n: usize| n.div_ceil(WARPS) as u32;
        let block = (WARPS * 32) as u32;
        let routed = call.top_k.at;
        with_view(&call.xs, |xv| {
            with_view(&self.w13, |wv| {
                let func = dev.get_or_load_custom_func("moe_gate_up1_held_bf16", MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(xv)
                    .arg(wv)
                    .arg(&routed)
                    .arg(row_of)
                    .arg(&e_i)
                    .arg(&h_i)
                    .arg(&i_i)
                    .arg(&mut act);
                let grid = (rows(i), checked_u32("top-k", k)?);
                // SAFETY: argument types and order match `moe_gate_up1_held_bf16`; `routed`
                // holds the call's 2k words (checked on import).
                unsafe { b.launch(launch_config(grid, block, 0)) }.w()?;
                Ok(())
            })
        })?;
        with_view(&self.w2, |wv| {
            let func = dev.get_or_load_custom_func("moe_down1_rows_held_bf16", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&act)
                .arg(wv)
                .arg(&routed)
                .arg(&k_i)
                .arg(row_of)
                .arg(&e_i)
                .arg(&h_i)
                .arg(&i_i)
                .arg(&call.output);
            // SAFETY: argument types and order match `moe_down1_rows_held_bf16`; the output
            // rows `[k, H]` lie in the mapped buffer (checked on import).
            unsafe { b.launch(launch_config((rows(h), 1), block, 0)) }.w()?;
            Ok(())
        })
    }

    /// Batch-1 decode of [`StackedExperts::forward_routed`]: gate+up (which also counts the
    /// chosen experts) and the fused down+sum, both reading the router's top-k where it is.
    fn forward_one(
        &self,
        dev: &CudaDevice,
        xs: &Tensor,
        routing: &DeviceRouting,
        counts: &CudaView<'_, u32>,
        row_of: &CudaSlice<u32>,
    ) -> Result<Tensor> {
        let k = routing.k;
        if k > ROUTED1_MAX_K {
            candle_core::bail!(
                "batch-1 device routing takes at most {ROUTED1_MAX_K} experts a token, not {k}"
            );
        }
        let (h, i) = (self.hidden, self.inter);
        let (k_i, h_i, i_i) = (
            checked_i32("top-k", k)?,
            checked_i32("hidden", h)?,
            checked_i32("intermediate", i)?,
        );
        // SAFETY: gate/up writes every row of `act` (one per chosen expert), the fused down every
        // element of the token's sum.
        let mut act = unsafe { dev.alloc::<bf16>(k * i) }?;
        let mut sums = unsafe { dev.alloc::<bf16>(h) }?;
        let rows = |n: usize| n.div_ceil(WARPS) as u32;
        let block = (WARPS * 32) as u32;
        // Both kernels read the top-k as the router left it: gate/up one expert per block row,
        // in the router's order; the fused down adds them in ascending id, as the table does.
        with_view(xs, |xv| {
            with_view(&self.w13, |wv| {
                let func = dev.get_or_load_custom_func("moe_gate_up1_bf16", MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(xv)
                    .arg(wv)
                    .arg(&routing.buf)
                    .arg(row_of)
                    .arg(counts)
                    .arg(&h_i)
                    .arg(&i_i)
                    .arg(&mut act);
                let grid = (rows(i), checked_u32("top-k", k)?);
                // SAFETY: argument types and order match `moe_gate_up1_bf16` (kernels.cu).
                unsafe { b.launch(launch_config(grid, block, 0)) }.w()?;
                Ok(())
            })
        })?;
        with_view(&self.w2, |wv| {
            let func = dev.get_or_load_custom_func("moe_down_combine1_routed_bf16", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&act)
                .arg(wv)
                .arg(&routing.buf)
                .arg(&k_i)
                .arg(row_of)
                .arg(&h_i)
                .arg(&i_i)
                .arg(&mut sums);
            // SAFETY: argument types and order match `moe_down_combine1_routed_bf16`.
            unsafe { b.launch(launch_config((rows(h), 1), block, 0)) }.w()?;
            Ok(())
        })?;
        Ok(wrap(dev, sums, (1, h)))
    }

    /// The outputs, or with `sum_tokens` their per-token sums.
    fn run(
        &self,
        xs: &Tensor,
        assignments: &[Assignment],
        groups: &[(usize, Vec<u32>)],
        sum_tokens: Option<usize>,
        planned: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        let dev = bf16_device(xs)
            .ok_or_else(|| candle_core::Error::Msg("fused MoE needs bf16 CUDA input".into()))?;
        if assignments.is_empty() {
            return Tensor::zeros(
                (sum_tokens.unwrap_or(0), self.hidden),
                xs.dtype(),
                xs.device(),
            );
        }
        let plan = self.host_plan(dev, assignments, groups, sum_tokens)?;
        planned();
        let out = match sum_tokens {
            Some(n) => Out::Sums(n),
            None => Out::Rows,
        };
        self.launch(dev, xs, &plan, out)
    }

    /// Whether experts with many tokens take the tensor-core kernels (their K steps need sizes
    /// that are multiples of `MMA_K`).
    fn tiles_apply(&self) -> bool {
        self.hidden.is_multiple_of(MMA_K) && self.inter.is_multiple_of(MMA_K)
    }
}

/// The most experts a token may choose for batch-1 [`StackedExperts::forward_routed`]
/// (`ROUTED1_MAX_K` in kernels.cu: the fused down keeps one expert per lane of a warp).
const ROUTED1_MAX_K: usize = 32;

/// Runs `f` on a layer's usage counts (u32, one per expert of the layer, on the GPU).
pub(super) fn with_counts<R>(
    usage: &Tensor,
    experts: usize,
    f: impl FnOnce(&CudaView<'_, u32>) -> Result<R>,
) -> Result<R> {
    if usage.dtype() != DType::U32 || usage.dims() != [experts] {
        candle_core::bail!("usage counts must be u32, one per expert of the layer");
    }
    let (counts, layout) = usage.storage_and_layout();
    let Storage::Cuda(counts) = &*counts else {
        candle_core::bail!("the usage counts are not on the GPU")
    };
    let start = layout.start_offset();
    f(&counts.as_cuda_slice::<u32>()?.slice(start..start + experts))
}
