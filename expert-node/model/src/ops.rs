//! Tensor operations whose candle implementation falls short on some backend, in one place.
//!
//! candle 0.9's CPU matmul has no bf16 kernel. For bf16 on the CPU we multiply in f32 and round
//! the result once to bf16, which is also how PyTorch's CPU bf16 matmul behaves (f32
//! accumulation), so bf16 results track the reference. A bandwidth-bound bf16 kernel can replace
//! this function without touching its callers.

use candle_core::{DType, Device, Tensor};

/// `a @ b` (candle semantics, batched over leading dimensions).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::BF16 && matches!(a.device(), Device::Cpu) {
        let out = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
        return out.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

/// `xs @ weight^T` for a checkpoint weight stored `[out, in]`.
pub fn linear(xs: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    matmul(xs, &weight.t()?)
}
