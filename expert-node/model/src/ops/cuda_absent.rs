//! The CUDA backend's interface in builds without the `cuda` feature: no tensor is ever on a GPU
//! there, so every kernel answers `None` ("not mine", the caller runs candle's ops) and no
//! [`StackedExperts`] can exist.

use candle_core::{Device, Result, Tensor};

use crate::experts::Assignment;
use crate::ops::sampling::{DeviceDraw, RowSampling};

pub enum StackedExperts {}

/// A router's top-k left on a GPU: never made here.
pub enum DeviceRouting {}

impl DeviceRouting {
    pub fn to_routing(&self, _device: &Device) -> Result<crate::experts::Routing> {
        match *self {}
    }
}

pub fn router_topk_on_device(
    _logits: &Tensor,
    _masked: &Tensor,
    _k: usize,
    _norm: bool,
) -> Result<Option<DeviceRouting>> {
    Ok(None)
}

impl StackedExperts {
    pub fn takes_device_routing(&self) -> bool {
        match *self {}
    }

    pub fn forward_routed(
        &self,
        _xs: &Tensor,
        _routing: &DeviceRouting,
        _usage: &Tensor,
    ) -> Result<Tensor> {
        match *self {}
    }

    pub fn outputs_routed_into(&self, _call: &ImportedRouted) -> Result<()> {
        match *self {}
    }

    pub fn supports(_hidden: usize, _inter: usize) -> bool {
        false
    }

    pub fn new(
        _num_experts: usize,
        _experts: &[(usize, [Tensor; 3])],
        _device: &Device,
    ) -> Result<Self> {
        candle_core::bail!("stacked experts live on a GPU: build with the `cuda` feature")
    }

    pub fn holds(&self, _expert: usize) -> bool {
        match *self {}
    }

    pub fn size_in_bytes(&self) -> usize {
        match *self {}
    }

    pub fn outputs(
        &self,
        _xs: &Tensor,
        _assignments: &[Assignment],
        _groups: &[(usize, Vec<u32>)],
        _planned: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        match *self {}
    }

    pub fn forward(
        &self,
        _xs: &Tensor,
        _assignments: &[Assignment],
        _groups: &[(usize, Vec<u32>)],
        _n_tokens: usize,
    ) -> Result<Tensor> {
        match *self {}
    }
}

pub fn rms_norm(_x: &Tensor, _weight: &Tensor, _eps: f64) -> Result<Option<Tensor>> {
    Ok(None)
}

pub fn add_rms_norm(
    _x: &Tensor,
    _r: &Tensor,
    _weight: &Tensor,
    _eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

pub fn norm_rope(
    _x: &Tensor,
    _start: usize,
    _q: (usize, &Tensor),
    _k: (usize, &Tensor),
    _eps: f64,
    _cos_sin: (&Tensor, &Tensor),
    _heads_first: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

pub fn combine(
    _n_tokens: usize,
    _assignments: &[Assignment],
    _ys: &Tensor,
) -> Result<Option<Tensor>> {
    Ok(None)
}

pub struct CacheBuffers<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub past: usize,
}

pub fn decode_attention(
    _q: &Tensor,
    _k_new: &Tensor,
    _v_new: &Tensor,
    _caches: &[CacheBuffers<'_>],
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// No GPU, no decode tables: [`DecodeTables::new`] always fails, so no other method is reached.
pub enum DecodeTables {}

impl DecodeTables {
    pub fn new(
        device: &Device,
        _layers: usize,
        _heads: usize,
        _kv_shape: (usize, usize),
    ) -> Result<Self> {
        candle_core::bail!("decode tables live on a GPU; {device:?} in a build without CUDA")
    }

    pub fn write(&mut self, _caches: &[CacheBuffers<'_>]) -> Result<bool> {
        match *self {}
    }

    pub fn splits(&self) -> usize {
        match *self {}
    }
}

pub fn decode_attention_indirect(
    _q: &Tensor,
    _k_new: &Tensor,
    _v_new: &Tensor,
    tables: &DecodeTables,
    _layer: usize,
) -> Result<Tensor> {
    match *tables {}
}

pub fn upload_into<T>(dst: &Tensor, _data: &[T]) -> Result<()> {
    candle_core::bail!("upload_into: {:?} is not a GPU", dst.device())
}

pub enum Captured {}

impl Captured {
    pub fn launch(&self) -> Result<()> {
        match *self {}
    }
}

pub fn can_capture(_device: &Device) -> bool {
    false
}

pub fn capture<E: From<candle_core::Error>>(
    device: &Device,
    _f: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<Captured, E> {
    Err(candle_core::Error::Msg(format!("capture needs a GPU, not {device:?}")).into())
}

pub fn causal_softmax(_scores: &Tensor, _scale: f32, _past: usize) -> Result<Option<Tensor>> {
    Ok(None)
}

pub fn prefill_attention(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _past: usize,
    _scale: f32,
) -> Result<Option<Tensor>> {
    Ok(None)
}

pub fn bf16_device(_t: &Tensor) -> Option<&candle_core::CudaDevice> {
    None
}

pub fn router_topk(
    _logits: &Tensor,
    _masked: &Tensor,
    _k: usize,
    _norm: bool,
) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
    Ok(None)
}

/// A router's counter for the one-launch top-k: never made here.
pub enum RouterTicket {}

impl RouterTicket {
    pub fn new(_device: &Device) -> Result<Option<Self>> {
        Ok(None)
    }
}

pub fn router_gate_topk1(
    _x: &Tensor,
    _gate: &Tensor,
    _masked: &Tensor,
    ticket: &RouterTicket,
    _k: usize,
    _norm: bool,
) -> Result<Option<DeviceRouting>> {
    match *ticket {}
}

pub fn sample_row(_logits: &Tensor, _req: &RowSampling<'_>) -> Result<Option<DeviceDraw>> {
    Ok(None)
}

pub fn sample_rows(_rows: &[(&Tensor, RowSampling<'_>)]) -> Result<Option<Vec<DeviceDraw>>> {
    Ok(None)
}

pub const GEMV_MAX_ROWS: usize = 4;

pub fn gemv(_x: &Tensor, _w: &Tensor) -> Result<Option<Tensor>> {
    Ok(None)
}

/// CUDA IPC answers: no GPU memory to lend here.
pub enum IpcExporter {}

impl IpcExporter {
    pub fn new(_device: &Device) -> Option<Self> {
        None
    }

    pub fn release(&self, _client: u64, _keep_from: u64) {
        match *self {}
    }

    pub fn export(
        &self,
        _ask: &crate::lending::IpcAsk<'_>,
        _ys: &Tensor,
    ) -> Result<Option<omnishard_proto::v1::DeviceTensor>> {
        match *self {}
    }
}

/// Never asked for here: the coordinator asks for IPC answers only from a GPU.
#[derive(Default)]
pub struct IpcImporter;

impl IpcImporter {
    pub fn new() -> Self {
        Self
    }

    pub fn lent(
        &self,
        _device: &Device,
        _out: &omnishard_proto::v1::DeviceTensor,
        _lease: impl Send + 'static,
    ) -> Result<Lent<'_>> {
        candle_core::bail!(
            "GPU memory of another process is read only in a build with the `cuda` feature"
        )
    }

    pub fn copy(
        &self,
        device: &Device,
        out: &omnishard_proto::v1::DeviceTensor,
        lease: impl Send + 'static,
    ) -> Result<Tensor> {
        gather(device, vec![self.lent(device, out, lease)?])
    }

    pub fn prune(&self) {}

    pub fn wait_event(&self, _device: &Device, _handle: &[u8]) -> Result<()> {
        candle_core::bail!("interprocess events are waited for only with the `cuda` feature")
    }
}

/// The most experts a layer may have for routed calls (as with the `cuda` feature).
pub const ROUTED_MAX_EXPERTS: usize = 1024;

/// No GPU here.
pub fn gpu_uuid(_device: &Device) -> Option<[u8; 16]> {
    None
}

/// Routed calls (`routed.rs`): the coordinator's exchange cannot be made without a GPU.
pub enum RoutedExchange {}

impl RoutedExchange {
    pub fn new(device: &Device) -> Result<Self> {
        candle_core::bail!("routed calls need a GPU; {device:?} in a build without CUDA")
    }

    pub fn stage(
        &self,
        _xs: &Tensor,
        _routing: &DeviceRouting,
        _usage: &Tensor,
    ) -> Result<RoutedStage<'_>> {
        match *self {}
    }
}

/// One layer's routed call staged: never here.
pub struct RoutedStage<'a>(std::convert::Infallible, std::marker::PhantomData<&'a ()>);

impl RoutedStage<'_> {
    pub fn request(&self) -> &omnishard_proto::v1::DeviceRouted {
        match self.0 {}
    }

    pub fn sums(self) -> Result<Tensor> {
        match self.0 {}
    }

    pub fn abandon(self) {
        match self.0 {}
    }
}

/// An interprocess event: never made here.
pub enum SharedEvent {}

impl SharedEvent {
    pub fn new(device: &Device) -> Result<Self> {
        candle_core::bail!("interprocess events need a GPU; {device:?} in a build without CUDA")
    }

    pub fn handle(&self) -> &[u8] {
        match *self {}
    }

    pub fn record(&self, _device: &Device) -> Result<()> {
        match *self {}
    }
}

/// A routed call's inputs on the node's GPU: never here.
pub enum ImportedRouted {}

pub fn import_routed(
    _importer: &IpcImporter,
    device: &Device,
    _req: &omnishard_proto::v1::DeviceRouted,
    _max_k: usize,
    _hidden: usize,
) -> Result<ImportedRouted> {
    candle_core::bail!(
        "routed calls are for nodes on a GPU; this build has no CUDA and computes on {device:?}"
    )
}

/// A tensor of another process's GPU memory: never here.
pub struct Lent<'a>(std::convert::Infallible, std::marker::PhantomData<&'a ()>);

impl Lent<'_> {
    pub fn dims(&self) -> &[usize] {
        match self.0 {}
    }

    pub fn dtype(&self) -> candle_core::DType {
        match self.0 {}
    }
}

pub fn gather(_device: &Device, _parts: Vec<Lent<'_>>) -> Result<Tensor> {
    candle_core::bail!(
        "GPU memory of another process is read only in a build with the `cuda` feature"
    )
}

/// Rows staged in GPU memory: never here.
pub struct StagedRows<'a> {
    pub parts: Vec<omnishard_proto::v1::DeviceTensor>,
    _staging: &'a IpcStaging,
}

#[derive(Default)]
pub struct IpcStaging;

impl IpcStaging {
    pub fn new() -> Self {
        Self
    }

    pub fn stage(&self, _xs: &Tensor, _parts: &[&[u32]]) -> Result<StagedRows<'_>> {
        candle_core::bail!("rows are staged in GPU memory only with the `cuda` feature")
    }
}

/// Nodes one routed pass can order (as with the `cuda` feature).
pub const PASS_MAX_NODES: usize = 64;

/// A coordinator's pass buffer (`pass.rs`): never made without a GPU.
pub enum PassExchange {}

impl PassExchange {
    pub fn new(
        device: &Device,
        _layers: usize,
        _tokens: usize,
        _k: usize,
        _hidden: usize,
        _experts: usize,
        _generation: u64,
    ) -> Result<Self> {
        candle_core::bail!("routed passes need a GPU; {device:?} in a build without CUDA")
    }

    pub fn fits(&self, _layers: usize, _tokens: usize, _k: usize, _hidden: usize) -> bool {
        match *self {}
    }

    pub fn generation(&self) -> u64 {
        match *self {}
    }

    pub fn order(
        &self,
        _node: usize,
        _layers: Vec<omnishard_proto::v1::LayerExperts>,
        _deadline: std::time::Duration,
    ) -> omnishard_proto::v1::DevicePass {
        match *self {}
    }

    pub fn layer(
        &self,
        _layer: usize,
        _xs: &Tensor,
        _routing: &DeviceRouting,
        _usage: &Tensor,
        _nodes: &[usize],
    ) -> Result<Tensor> {
        match *self {}
    }

    pub fn fail(&self, _pairs: &[(usize, usize)]) -> Result<()> {
        match *self {}
    }
}

/// Pass buffers mapped on a node: none without a GPU.
#[derive(Default)]
pub struct PassMappings(());

/// A pass queued on a node's GPU: never here.
pub enum QueuedPass {}

impl QueuedPass {
    pub fn wait(&self, _deadline: std::time::Instant) -> Result<bool> {
        match *self {}
    }
}

/// Without a GPU a pass is refused by [`queue_pass`] whatever it says.
pub fn check_pass(
    _req: &omnishard_proto::v1::DevicePass,
    _max_k: usize,
    _hidden: usize,
) -> Result<usize> {
    Ok(0)
}

pub fn queue_pass(
    _mappings: &PassMappings,
    device: &Device,
    _req: &omnishard_proto::v1::DevicePass,
    _max_k: usize,
    _hidden: usize,
    _compute: &mut dyn FnMut(usize, &ImportedRouted) -> Result<()>,
) -> Result<QueuedPass> {
    candle_core::bail!(
        "routed passes are for nodes on a GPU; this build has no CUDA and computes on {device:?}"
    )
}
