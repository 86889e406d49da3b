//! Compute backends, one small interface per operation: callers (the model, the experts) ask for
//! `linear` or `matmul` and this module picks the kernel for the tensor's device and dtype.
//!
//! - bf16 on the CPU: [`cpu_bf16`], our own kernels that read bf16 weights as stored, once, at
//!   memory bandwidth (candle 0.9's CPU matmul has no bf16 kernel; widening a weight to f32 on
//!   every call costs more than the multiply). f32 accumulation, rounded once to bf16, as
//!   PyTorch's CPU bf16 matmul.
//! - bf16 on a GPU (`cuda` feature): [`cuda`], fused RMSNorm, q/k norm + RoPE and the fused MoE
//!   step; matmuls are candle's (cuBLAS).
//! - Everything else: candle's own ops (gemm on the CPU).
//!
//! [`sampling`] is the device side of choosing the next token (the coordinator's sampler asks).

pub mod cpu_bf16;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_absent.rs"]
pub mod cuda;
pub mod sampling;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;

/// Whether the GPU's per-head kernels (q/k norm + RoPE, decode attention) take heads of `d`
/// elements: one thread per element, in blocks of whole warps.
pub(crate) fn head_dim_fits_gpu_kernels(d: usize) -> bool {
    d.is_multiple_of(32) && d <= 1024
}

/// Runs `f` on the bf16 elements of a contiguous CPU tensor; `None` for any other tensor.
pub fn with_cpu_bf16<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Option<R> {
    if t.dtype() != DType::BF16 || !matches!(t.device(), Device::Cpu) || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::BF16(data)) => {
            let start = layout.start_offset();
            data.get(start..start + t.elem_count()).map(f)
        }
        _ => None,
    }
}

/// Rounds f32 results to bf16 (round to nearest even, as PyTorch's conversion).
pub fn round_to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// `a @ b` (candle semantics, batched over leading dimensions). Attention's small products.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::BF16 && matches!(a.device(), Device::Cpu) {
        let out = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
        return out.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

/// `xs @ weight^T` for a checkpoint weight stored `[out, in]`; `xs` is `[..., in]`.
pub fn linear(xs: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu_bf16_linear(xs, weight, None)? {
        return Ok(out);
    }
    if let Some(out) = cuda::gemv(xs, weight)? {
        return Ok(out);
    }
    matmul(xs, &weight.t()?)
}

/// `xs @ weight^T + bias` as torch's `nn.Linear` rounds it in bf16 on the CPU: the bias added to
/// the f32 sums, then one rounding (an add after the rounded product would round twice). Other
/// devices and dtypes add after [`linear`].
pub fn linear_bias(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu_bf16_linear(xs, weight, Some(bias))? {
        return Ok(out);
    }
    linear(xs, weight)?.broadcast_add(bias)
}

/// [`linear`] (with `bias` added before the rounding) by the CPU bf16 kernel; `None` for other
/// tensors.
fn cpu_bf16_linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let (n, k) = weight.dims2()?;
    if xs.dtype() != DType::BF16 || !matches!(xs.device(), Device::Cpu) || k == 0 {
        return Ok(None);
    }
    let xs = xs.contiguous()?;
    let m = xs.elem_count() / k;
    let out = with_cpu_bf16(&xs, |x| {
        with_cpu_bf16(weight, |w| cpu_bf16::matmul_bf16(x, m, k, w))
    })
    .flatten();
    let Some(mut out) = out else {
        return Ok(None);
    };
    if let Some(bias) = bias {
        if bias.dims() != [n] {
            candle_core::bail!("bias of shape {:?} for {n} outputs", bias.dims())
        }
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for row in out.chunks_mut(n.max(1)) {
            for (y, b) in row.iter_mut().zip(&bias) {
                *y += b;
            }
        }
    }
    let mut dims = xs.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Some(Tensor::from_vec(
        round_to_bf16(&out),
        dims,
        xs.device(),
    )?))
}
