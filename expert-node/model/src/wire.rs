//! Conversions between candle tensors and the wire's raw little-endian payloads
//! (`omnishard.v1.Tensor`), and between routing triples and their wire lists.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use omnishard_proto::v1;
use omnishard_proto::wire::PayloadError;

use crate::experts::Assignment;

/// The wire dtype of a compute dtype (only f32 and bf16 travel).
pub fn wire_dtype(dtype: DType) -> Option<v1::Dtype> {
    match dtype {
        DType::F32 => Some(v1::Dtype::F32),
        DType::BF16 => Some(v1::Dtype::Bf16),
        _ => None,
    }
}

pub fn candle_dtype(dtype: v1::Dtype) -> Option<DType> {
    match dtype {
        v1::Dtype::F32 => Some(DType::F32),
        v1::Dtype::Bf16 => Some(DType::BF16),
        v1::Dtype::Unspecified => None,
    }
}

/// Encodes an f32 or bf16 tensor of any shape (what travels today is `[tokens, hidden]`).
pub fn encode(t: &Tensor) -> candle_core::Result<v1::Tensor> {
    let dtype = wire_dtype(t.dtype())
        .ok_or_else(|| candle_core::Error::Msg(format!("{:?} tensors do not travel", t.dtype())))?;
    let flat = t.flatten_all()?;
    // Sized once and filled in place: a prefill's answer is tens of MiB per layer.
    let data: Vec<u8> = match t.dtype() {
        DType::BF16 => {
            let values = flat.to_vec1::<half::bf16>()?;
            let mut data = vec![0u8; values.len() * 2];
            for (out, v) in data.chunks_exact_mut(2).zip(&values) {
                out.copy_from_slice(&v.to_bits().to_le_bytes());
            }
            data
        }
        _ => {
            let values = flat.to_vec1::<f32>()?;
            let mut data = vec![0u8; values.len() * 4];
            for (out, v) in data.chunks_exact_mut(4).zip(&values) {
                out.copy_from_slice(&v.to_le_bytes());
            }
            data
        }
    };
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        data: Bytes::from(data),
    })
}

/// Errors decoding a wire tensor.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("tensor {what}: {source}")]
    Candle {
        what: &'static str,
        source: candle_core::Error,
    },
}

/// Decodes and validates a wire tensor onto `device`.
pub fn decode(
    t: Option<&v1::Tensor>,
    what: &'static str,
    device: &Device,
) -> Result<Tensor, DecodeError> {
    let t = t.ok_or(PayloadError::Missing { what })?;
    let dtype = t.validate(what)?;
    let dtype = candle_dtype(dtype).ok_or(PayloadError::Dtype {
        what,
        dtype: t.dtype,
    })?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    // The wire is little-endian, as is every platform we build for.
    Tensor::from_raw_buffer(&t.data, dtype, &shape, device)
        .map_err(|source| DecodeError::Candle { what, source })
}

/// Splits assignments into the request's three parallel lists.
pub fn assignments_to_wire(assignments: &[Assignment]) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let tokens = assignments.iter().map(|a| a.token).collect();
    let experts = assignments.iter().map(|a| a.expert).collect();
    let weights = assignments.iter().map(|a| a.weight).collect();
    (tokens, experts, weights)
}

/// Joins the request's three lists; `None` if their lengths differ.
pub fn assignments_from_wire(req: &v1::ForwardRequest) -> Option<Vec<Assignment>> {
    let n = req.token_index.len();
    if req.expert_id.len() != n || req.weight.len() != n {
        return None;
    }
    Some(
        (0..n)
            .map(|i| Assignment {
                token: req.token_index[i],
                expert: req.expert_id[i],
                weight: req.weight[i],
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_bf16() {
        let t = Tensor::arange(0f32, 6f32, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let t = t.to_dtype(dtype).unwrap();
            let wire = encode(&t).unwrap();
            let back = decode(Some(&wire), "x", &Device::Cpu).unwrap();
            assert_eq!(back.dims(), &[2, 3]);
            let diff = (back.to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0);
        }
    }
}
