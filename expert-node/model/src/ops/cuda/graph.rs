//! CUDA graphs for batch-1 decode: a step's ~600 launches captured once on the device's stream
//! and replayed with one `cuGraphLaunch`, so the GPU no longer waits for the host to issue each
//! kernel (the host's allocation, launch and free per candle operation cost about as long as
//! the kernels of a batch-1 layer; BENCHMARKS.md, issue 10). A graph replays the kernel
//! arguments it captured, so everything that changes between steps lives in device memory
//! written before each launch: the token's embedding, cos/sin ([`upload_into`]) and the decode
//! attention's table of cache buffers and lengths ([`DecodeTables`]). CUDA programming guide,
//! "CUDA Graphs" (stream capture, graph memory nodes).

use std::sync::Arc;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg, result, sys,
};
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor, bail};
use half::bf16;

use crate::ops::head_dim_fits_gpu_kernels;

use super::attention::{
    CacheBuffers, DECODE_ATTENTION_MAX_LEN, SplitScratch, decode_splits, with_decode_views,
};
use super::{MODULE, PTX, checked_u32, ipc, launch_config, wrap};

/// One sequence's decode-attention table for every layer, in device memory: per layer the key
/// and value buffers, the cached length and the capacity, as `decode_attention_indirect_bf16`
/// reads them. Rewritten before every step; the graph keeps only its address.
pub struct DecodeTables {
    dev: CudaDevice,
    buf: CudaSlice<u64>,
    layers: usize,
    /// Query heads.
    heads: usize,
    /// Every cache's `(kv_heads, head_dim)`.
    kv_shape: (usize, usize),
    written: bool,
    /// Blocks per head of the decode-attention launches
    /// ([`super::attention::decode_splits`]), chosen when written: a graph captures the
    /// launches of one split count.
    splits: usize,
}

impl DecodeTables {
    /// Tables for `layers` layers of caches `[kv_heads, capacity, head_dim]` on `device` (a GPU),
    /// attended by `heads` query heads.
    pub fn new(
        device: &Device,
        layers: usize,
        heads: usize,
        kv_shape: (usize, usize),
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("decode tables live on a GPU, not {device:?}")
        };
        Ok(Self {
            dev: dev.clone(),
            buf: dev
                .cuda_stream()
                .alloc_zeros::<u64>(4 * layers.max(1))
                .w()?,
            layers,
            heads,
            kv_shape,
            written: false,
            splits: 1,
        })
    }

    /// The split count the last [`DecodeTables::write`] chose (1 before any).
    pub fn splits(&self) -> usize {
        self.splits
    }

    /// Writes one entry per layer (`caches[l]`, bf16 `[kv_heads, capacity, d]` buffers with
    /// room for one more position). `false` (nothing written) when a cache does not fit the
    /// kernel ([`CacheBuffers::table_entry`]), e.g. longer than its shared memory holds.
    pub fn write(&mut self, caches: &[CacheBuffers<'_>]) -> Result<bool> {
        if caches.len() != self.layers {
            bail!(
                "decode tables for {} layers given {} caches",
                self.layers,
                caches.len()
            );
        }
        let mut host = Vec::with_capacity(4 * caches.len());
        let stream = self.dev.cuda_stream();
        for c in caches {
            match c.table_entry(self.kv_shape, &stream)? {
                Some(entry) => host.extend_from_slice(&entry),
                None => return Ok(false),
            }
        }
        stream.memcpy_htod(&host, &mut self.buf).w()?;
        self.written = true;
        let longest = caches.iter().map(|c| c.past + 1).max().unwrap_or(1);
        self.splits = decode_splits(1, self.heads, longest);
        Ok(true)
    }
}

/// [`super::decode_attention`] for one sequence whose table for `layer` is in `tables`: `q`
/// `[1, heads, d]`, `k_new`/`v_new` `[1, kv_heads, d]`; writes the new key and value into the
/// cache and returns `[1, heads * d]`. The same kernel body, so the same bits.
pub fn decode_attention_indirect(
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    tables: &DecodeTables,
    layer: usize,
) -> Result<Tensor> {
    let dev = &tables.dev;
    let (seqs, heads, d) = q.dims3()?;
    let (_, kv_heads, _) = k_new.dims3()?;
    if seqs != 1
        || k_new.dims() != [1, kv_heads, d]
        || v_new.dims() != [1, kv_heads, d]
        || !head_dim_fits_gpu_kernels(d)
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || (kv_heads, d) != tables.kv_shape
        || heads != tables.heads
        || layer >= tables.layers
        || !tables.written
    {
        bail!(
            "decode attention from a table: q {:?}, k {:?}, v {:?}, layer {layer} of {} (table written: {})",
            q.dims(),
            k_new.dims(),
            v_new.dims(),
            tables.layers,
            tables.written
        );
    }
    // SAFETY: the kernel writes every element (one thread per (head, dim)).
    let mut out = unsafe { dev.alloc::<bf16>(heads * d) }?;
    let table = tables.buf.slice(4 * layer..4 * layer + 4);
    with_decode_views(q, k_new, v_new, (heads, kv_heads, d), |views, s| {
        if tables.splits > 1 {
            // The table's address as the kernels' pointer argument: written on this stream
            // before every launch, like the view below.
            let stream = dev.cuda_stream();
            let (address, _sync) = table.device_ptr(&stream);
            let scratch = SplitScratch::new(dev, (1, heads, d), tables.splits)?;
            // Shared memory for the longest cache the kernels take, as below.
            return scratch.launch(
                dev,
                [
                    "decode_split_stats_indirect_bf16",
                    "decode_split_values_indirect_bf16",
                ],
                views,
                s,
                &address,
                None,
                (1, heads, d),
                DECODE_ATTENTION_MAX_LEN,
                &mut out,
            );
        }
        let func = dev.get_or_load_custom_func("decode_attention_indirect_bf16", MODULE, PTX)?;
        let [qv, kv, vv] = views;
        let mut b = func.builder();
        b.arg(qv).arg(kv).arg(vv).arg(&table).arg(&mut out);
        b.arg(&s.heads).arg(&s.kv_heads).arg(&s.scale);
        // Shared memory for the longest cache the kernel takes, whatever the cache's length
        // now: the launch stays as captured while caches grow and move.
        let shared = checked_u32("cache positions", DECODE_ATTENTION_MAX_LEN * 4)?;
        let cfg = launch_config((checked_u32("heads", heads)?, 1), d as u32, shared);
        // SAFETY: argument types and order match `decode_attention_indirect_bf16`; the table
        // names buffers with room for row `past` (checked when written), which the caller keeps
        // alive until this launch and the step's graph launch are queued (`Model::graph_step`
        // holds them).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok(wrap(dev, out, (1, heads * d)))
}

/// Copies `data` from the host into the contiguous device tensor `dst` (same element size and
/// count), on the device's stream: the inputs of a captured step, rewritten before each launch.
pub fn upload_into<T: DeviceRepr>(dst: &Tensor, data: &[T]) -> Result<()> {
    let Device::Cuda(dev) = dst.device() else {
        bail!("upload_into: {:?} is not a GPU", dst.device())
    };
    if !dst.is_contiguous()
        || dst.elem_count() != data.len()
        || dst.dtype().size_in_bytes() != std::mem::size_of::<T>()
    {
        bail!(
            "upload_into: {} host values of {} bytes into {:?} {:?}",
            data.len(),
            std::mem::size_of::<T>(),
            dst.dtype(),
            dst.dims()
        );
    }
    let stream = dev.cuda_stream();
    let (storage, layout) = dst.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("expected a CUDA tensor")
    };
    let bytes = dst.dtype().size_in_bytes();
    let start = layout.start_offset() * bytes;
    let (base, _sync) = match dst.dtype() {
        DType::U32 => s.as_cuda_slice::<u32>()?.device_ptr(&stream),
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(&stream),
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream),
        other => bail!("upload_into: {other:?} tensors are not supported"),
    };
    // SAFETY: `dst` is contiguous and holds exactly `data.len()` elements of this size from
    // `base + start`; pageable host memory is staged before the call returns.
    unsafe { result::memcpy_htod_async(base + start as u64, data, stream.cu_stream()) }.w()
}

/// A captured sequence of launches on one device's stream, replayed by [`Captured::launch`].
pub struct Captured {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

// SAFETY: a graph is used by one thread at a time (its owner holds it under a lock); CUDA graph
// objects need only external serialization, not a particular thread.
unsafe impl Send for Captured {}

impl Captured {
    /// Runs the captured launches again, on the stream they were captured on.
    pub fn launch(&self) -> Result<()> {
        self.stream.context().bind_to_thread().w()?;
        // SAFETY: `exec` is a live instantiated graph of this stream's context.
        ipc::check("cuGraphLaunch", unsafe {
            sys::cuGraphLaunch(self.exec, self.stream.cu_stream())
        })
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        // SAFETY: both handles are live and owned here; errors at teardown have no one to go to.
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
            let _ = sys::cuGraphDestroy(self.graph);
        }
    }
}

/// Whether `device` can capture graphs: a GPU whose candle stream is a stream of its own (the
/// legacy default stream cannot be captured; [`crate::DeviceSpec::open`] makes one).
/// Stream-ordered allocation (memory pools) is needed too: candle allocates every intermediate
/// tensor, which a capture records as graph memory nodes only when allocations are
/// stream-ordered.
pub fn can_capture(device: &Device) -> bool {
    let Device::Cuda(dev) = device else {
        return false;
    };
    let stream = dev.cuda_stream();
    let pools = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED);
    !stream.cu_stream().is_null() && matches!(pools, Ok(1))
}

fn graph_error(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(what.to_string())
}

/// Records what `f` launches on `device`'s stream (nothing runs) and instantiates it. Every
/// device allocation `f` makes must be freed before it returns, and it must not wait for the
/// device. The capture is ended on every path, errors and panics of `f` included. A capture
/// holding a copy from or to host memory is refused: the graph would copy with that address
/// again at every launch, long after the buffer is gone (candle uploads the shapes of some
/// operations that way, e.g. every `index_select`).
pub fn capture<E: From<candle_core::Error>>(
    device: &Device,
    f: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<Captured, E> {
    let Device::Cuda(dev) = device else {
        return Err(graph_error(&format!("capture needs a GPU, not {device:?}")).into());
    };
    if !can_capture(device) {
        return Err(graph_error(
            "the device's stream is the legacy default stream, which cannot be captured",
        )
        .into());
    }
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    // SAFETY: a live stream of the current context.
    ipc::check("cuStreamBeginCapture", unsafe {
        sys::cuStreamBeginCapture_v2(
            stream.cu_stream(),
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
    })?;
    let mut capturing = Capturing(Some(stream.clone()));
    let ran = f();
    let (graph, ended) = capturing.end();
    let owned = OwnedGraph(graph);
    if ran.is_err() || ended.is_err() {
        // Frees queued while the capture was invalid failed and were recorded by cudarc; they
        // belong to this capture, not to the next operation on the stream.
        let _ = stream.context().check_err();
    }
    ran?;
    ended?;
    if graph.is_null() {
        return Err(graph_error("the capture recorded nothing").into());
    }
    if let Some(node) = host_copy(graph)? {
        return Err(graph_error(&format!(
            "the captured step touches host memory ({node}); it cannot be replayed"
        ))
        .into());
    }
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    // No flags: in particular no auto-free, so an allocation of `f` left unfreed makes a second
    // launch fail instead of freeing memory a tensor still points at.
    // SAFETY: `graph` is the live graph just captured.
    ipc::check("cuGraphInstantiate", unsafe {
        sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0)
    })?;
    std::mem::forget(owned);
    Ok(Captured {
        graph,
        exec,
        stream,
    })
}

/// A capture in progress on a stream, ended by [`Capturing::end`] or, if `f` panics, on drop:
/// a stream left capturing would take every later launch into a graph no one launches.
struct Capturing(Option<Arc<CudaStream>>);

impl Capturing {
    /// Ends the capture: the graph recorded (null if none) and whether ending succeeded.
    fn end(&mut self) -> (sys::CUgraph, Result<()>) {
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        let Some(stream) = self.0.take() else {
            return (graph, Err(graph_error("the capture was already ended")));
        };
        // SAFETY: ends the capture begun on this stream by `capture`.
        let ended = ipc::check("cuStreamEndCapture", unsafe {
            sys::cuStreamEndCapture(stream.cu_stream(), &mut graph)
        });
        (graph, ended)
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        if self.0.is_some() {
            let (graph, _) = self.end();
            drop(OwnedGraph(graph));
        }
    }
}

/// Destroys a captured graph not (yet) handed to a [`Captured`].
struct OwnedGraph(sys::CUgraph);

impl Drop for OwnedGraph {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a live graph owned here.
            let _ = unsafe { sys::cuGraphDestroy(self.0) };
        }
    }
}

/// The first node of `graph` that touches host memory (a host function, a copy to or from the
/// host), described, if any.
fn host_copy(graph: sys::CUgraph) -> Result<Option<String>> {
    let mut count = 0usize;
    // SAFETY: a null node array asks for the count only.
    ipc::check("cuGraphGetNodes", unsafe {
        sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count)
    })?;
    let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
    // SAFETY: `nodes` has room for `count` handles.
    ipc::check("cuGraphGetNodes", unsafe {
        sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count)
    })?;
    for (i, &node) in nodes.iter().take(count).enumerate() {
        // Driver enums read as the integers they are: a value these bindings do not know
        // must not become a Rust enum.
        let mut kind = 0u32;
        // SAFETY: a node of `graph`; the call writes its type, a C enum (32 bits).
        ipc::check("cuGraphNodeGetType", unsafe {
            sys::cuGraphNodeGetType(node, (&raw mut kind).cast())
        })?;
        if kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_HOST as u32 {
            return Ok(Some(format!("node {i}: a host function")));
        }
        if kind != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY as u32 {
            continue;
        }
        let mut params = std::mem::MaybeUninit::<sys::CUDA_MEMCPY3D>::uninit();
        // SAFETY: a memcpy node; the call writes all of its parameters.
        ipc::check("cuGraphMemcpyNodeGetParams", unsafe {
            sys::cuGraphMemcpyNodeGetParams(node, params.as_mut_ptr())
        })?;
        let p = params.as_ptr();
        // SAFETY: written by the successful call above; each field read as its bits.
        let (src, dst, bytes) = unsafe {
            (
                (&raw const (*p).srcMemoryType).cast::<u32>().read(),
                (&raw const (*p).dstMemoryType).cast::<u32>().read(),
                (&raw const (*p).WidthInBytes).read(),
            )
        };
        let host = |t: u32| {
            t == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32
                || t == sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32
        };
        if host(src) || host(dst) {
            return Ok(Some(format!(
                "node {i}: a copy of {bytes} bytes to or from host memory"
            )));
        }
    }
    Ok(None)
}
