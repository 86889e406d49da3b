//! Conversions between candle tensors and the wire's raw little-endian payloads
//! (`omnishard.v1.Tensor`), and between routing triples and their wire lists.

use bytes::Bytes;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
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

/// The wire dtype of a tensor about to travel; an error for any other dtype.
pub fn travelling_dtype(dtype: DType) -> candle_core::Result<v1::Dtype> {
    wire_dtype(dtype)
        .ok_or_else(|| candle_core::Error::Msg(format!("{dtype:?} tensors do not travel")))
}

pub fn candle_dtype(dtype: v1::Dtype) -> Option<DType> {
    match dtype {
        v1::Dtype::F32 => Some(DType::F32),
        v1::Dtype::Bf16 => Some(DType::BF16),
        v1::Dtype::Unspecified => None,
    }
}

/// A payload's bytes owned by the tensor data they were copied into (no second copy).
struct LeBytes<T>(Vec<T>);

impl<T: bytemuck::NoUninit> AsRef<[u8]> for LeBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Encodes an f32 or bf16 tensor of any shape (what travels today is `[tokens, hidden]`).
pub fn encode(t: &Tensor) -> candle_core::Result<v1::Tensor> {
    let dtype = travelling_dtype(t.dtype())?;
    let flat = t.flatten_all()?;
    // One copy off the tensor; its memory becomes the payload (a prefill's answer is tens of
    // MiB per layer). The wire is little-endian, as is every platform we build for.
    let data = match t.dtype() {
        DType::BF16 => {
            let values: Vec<u16> = flat
                .to_vec1::<half::bf16>()?
                .into_iter()
                .map(half::bf16::to_bits)
                .collect();
            Bytes::from_owner(LeBytes(values))
        }
        _ => Bytes::from_owner(LeBytes(flat.to_vec1::<f32>()?)),
    };
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        data,
    })
}

/// Encodes rows `rows` of a 2-D f32 or bf16 tensor on the CPU, `[rows.len(), width]`: each
/// row's bytes copied once, straight into the payload (the coordinator cuts a layer's hidden
/// states per node this way; a gather through the tensor library and an encode cost 2 ms per
/// 2 MiB on the GPU benchmark's host).
pub fn encode_rows(t: &Tensor, rows: &[u32]) -> candle_core::Result<v1::Tensor> {
    let (n, width) = t.dims2()?;
    let dtype = travelling_dtype(t.dtype())?;
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let all = layout.start_offset()..layout.start_offset() + n * width;
    let bytes: &[u8] = match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => bytemuck::cast_slice(v[all].reinterpret_cast()),
        Storage::Cpu(CpuStorage::F32(v)) => bytemuck::cast_slice(&v[all]),
        _ => candle_core::bail!("encode_rows takes an f32 or bf16 tensor on the CPU"),
    };
    let row_bytes = width * t.dtype().size_in_bytes();
    let mut data = Vec::with_capacity(rows.len() * row_bytes);
    for &r in rows {
        let r = r as usize;
        let Some(row) = bytes.get(r * row_bytes..(r + 1) * row_bytes) else {
            candle_core::bail!("row {r} of a tensor of {n} rows");
        };
        data.extend_from_slice(row);
    }
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape: vec![rows.len() as u64, width as u64],
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

    #[test]
    fn rows_are_cut_as_an_index_select_would() {
        let t = Tensor::arange(0f32, 15f32, &Device::Cpu)
            .unwrap()
            .reshape((5, 3))
            .unwrap();
        let rows = [4u32, 0, 2, 2];
        let idx = Tensor::new(&rows[..], &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let t = t.to_dtype(dtype).unwrap();
            let want = encode(&t.index_select(&idx, 0).unwrap()).unwrap();
            assert_eq!(encode_rows(&t, &rows).unwrap(), want, "{dtype:?}");
            // A view that starts past its storage's first element.
            let view = t.narrow(0, 1, 4).unwrap();
            let want = encode(&view.index_select(&idx.narrow(0, 1, 3).unwrap(), 0).unwrap());
            assert_eq!(encode_rows(&view, &[0, 2, 2]).unwrap(), want.unwrap());
            assert!(encode_rows(&t, &[5]).is_err());
        }
    }
}
