//! The generated gRPC code of `omnishard.v1`, payload checks that need no tensor library, and the
//! mapping from typed errors to gRPC status codes.

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("omnishard.v1");
}

use v1::Dtype;

/// How a node's error begins when it cannot map a request's hidden states from the
/// coordinator's GPU memory (CUDA IPC): the coordinator then stops sending them that way.
pub const IPC_READ_FAILED: &str = "cannot read the hidden states from the coordinator's GPU memory";

/// Errors whose gRPC status code is part of the contract.
pub trait ServiceError: std::fmt::Display {
    fn status_code(&self) -> tonic::Code;

    fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.status_code(), self.to_string())
    }
}

/// A malformed tensor payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("tensor {what} is missing")]
    Missing { what: &'static str },
    #[error("tensor {what} has unsupported dtype {dtype}")]
    Dtype { what: &'static str, dtype: i32 },
    #[error("tensor {what} has an impossible shape {shape:?} (rank at most 8, sizes within 2^63)")]
    Shape { what: &'static str, shape: Vec<u64> },
    #[error("tensor {what} has shape {shape:?} but {bytes} bytes of data (expected {expected})")]
    Length {
        what: &'static str,
        shape: Vec<u64>,
        bytes: usize,
        expected: u128,
    },
}

impl ServiceError for PayloadError {
    fn status_code(&self) -> tonic::Code {
        tonic::Code::InvalidArgument
    }
}

impl Dtype {
    /// Bytes per element, `None` for `DTYPE_UNSPECIFIED`.
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::Bf16 => Some(2),
            Dtype::Unspecified => None,
        }
    }
}

impl v1::Tensor {
    /// Checks dtype and that the data length matches the shape; returns the dtype.
    pub fn validate(&self, what: &'static str) -> Result<Dtype, PayloadError> {
        let dtype = Dtype::try_from(self.dtype)
            .ok()
            .filter(|d| d.size_in_bytes().is_some())
            .ok_or(PayloadError::Dtype {
                what,
                dtype: self.dtype,
            })?;
        // Strides are products of trailing sizes, zeros included or not: keep every such product
        // representable, or an empty tensor with huge sizes overflows the tensor library.
        let fits = self.shape.len() <= 8
            && self
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)))
                .is_some_and(|p| p <= i64::MAX as u64);
        if !fits {
            return Err(PayloadError::Shape {
                what,
                shape: self.shape.clone(),
            });
        }
        let expected = self
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes().unwrap_or(0) as u128, |acc, &d| {
                acc.checked_mul(d as u128)
            })
            .unwrap_or(u128::MAX);
        if expected != self.data.len() as u128 {
            return Err(PayloadError::Length {
                what,
                shape: self.shape.clone(),
                bytes: self.data.len(),
                expected,
            });
        }
        Ok(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{Dtype, Tensor};

    #[test]
    fn tensor_validation() {
        let t = Tensor {
            dtype: Dtype::Bf16 as i32,
            shape: vec![2, 3],
            data: vec![0u8; 12].into(),
        };
        assert_eq!(t.validate("x"), Ok(Dtype::Bf16));
        let short = Tensor {
            data: vec![0u8; 11].into(),
            ..t.clone()
        };
        assert!(short.validate("x").is_err());
        let bad = Tensor {
            dtype: 9,
            ..t.clone()
        };
        assert!(bad.validate("x").is_err());
        let huge = Tensor {
            shape: vec![u64::MAX, u64::MAX],
            ..t.clone()
        };
        assert!(huge.validate("x").is_err());
        // Found by the forward_request fuzz target: empty, but its strides overflow.
        let empty_but_huge = Tensor {
            shape: vec![0, u64::MAX / 2, 4],
            data: Default::default(),
            ..t
        };
        assert!(matches!(
            empty_but_huge.validate("x"),
            Err(super::PayloadError::Shape { .. })
        ));
    }
}
