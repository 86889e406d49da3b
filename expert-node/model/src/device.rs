//! Where a process computes: `--device cpu|cuda[:N]` on both binaries, parsed and opened here
//! once, so that every tensor of the process lives on one candle [`Device`] (candle tells two
//! handles to the same GPU apart, and refuses to mix their tensors).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A compute device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device {spec} needs a build with CUDA support: this binary was built without the \
         `cuda` feature (rebuild with `cargo build --release --features cuda`), or use --device cpu"
    )]
    NotBuilt { spec: DeviceSpec },
    #[error("cannot open {spec}: {source} (is there such a GPU, and is its driver loaded?)")]
    Open {
        spec: DeviceSpec,
        source: candle_core::Error,
    },
}

impl DeviceSpec {
    /// Opens the device. On a GPU, candle's per-buffer event tracking is switched off: every
    /// tensor of the process lives on the device's one stream, where it only costs time.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(self, ordinal),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: DeviceSpec, ordinal: usize) -> Result<Device, DeviceError> {
    // A stream of its own rather than the legacy default stream, which cannot be captured
    // into a CUDA graph (batch-1 decode replays one: `ops::cuda::capture`).
    let cuda = candle_core::CudaDevice::new_with_stream(ordinal)
        .map_err(|source| DeviceError::Open { spec, source })?;
    // SAFETY: one stream per process, so no buffer is ever used on a stream other than the
    // one it was made on.
    unsafe { cuda.disable_event_tracking() };
    Ok(Device::Cuda(cuda))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: DeviceSpec, _ordinal: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt { spec })
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match lower.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| {
                    format!("bad GPU ordinal in {s:?}: write cuda:N with N = 0, 1, …")
                }),
                None => Err(format!("unknown device {s:?}; use cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_write() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
