//! Weights verified, not trusted: when a node is admitted (at start-up, on `POST /admin/nodes`,
//! and whenever the process behind an address is a new one, down or up; the same process back
//! after a partition is not probed again), a sample
//! of the experts it says it holds (`--verify-experts N`, or all of them) is sent a fixed probe
//! batch, and each answer is compared with the same expert computed here in f32 from the
//! checkpoint (only the sampled experts' pages of the memory map are read). A node whose answer
//! is off is refused, with the expert named.
//!
//! What this protects against: a node started on another copy of the weights that matches the
//! config and tensor shapes (the fingerprint covers those and the routers, not the experts), a
//! corrupted or re-quantised file, the wrong shard files. What it does not: a node that answers
//! probes honestly and lies afterwards (an adversary on the network — mutual TLS authenticates
//! the nodes, `deploy/`), or damage smaller than the tolerance, which is set by the node's
//! compute dtype (a node on a GPU sums in another order than this CPU reference): relative error
//! per answer row ≤ 1e-4 in f32, 3e-2 in bf16/f16.

use candle_core::{DType, Device, Tensor};
use omnishard_model::{CallContext, Checkpoint, Experts, LocalExperts, Routing, wire};
use omnishard_proto::ModelConfig;
use omnishard_proto::v1::{ForwardRequest, expert_service_client::ExpertServiceClient};
use rand::seq::IndexedRandom;
use tonic::transport::Channel;

/// How many of a node's experts are probed when it is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyExperts {
    Off,
    /// This many, drawn at random each time (all where the node holds fewer).
    Sample(usize),
    All,
}

impl std::str::FromStr for VerifyExperts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "all" => Ok(Self::All),
            n => n
                .parse()
                .map(|n| if n == 0 { Self::Off } else { Self::Sample(n) })
                .map_err(|_| {
                    format!("`{s}`: expected a number of experts to probe, `all` or `off`")
                }),
        }
    }
}

/// The checkpoint the nodes' answers are checked against.
#[derive(Clone)]
pub struct Verifier {
    ckpt: Checkpoint,
    cfg: ModelConfig,
    mode: VerifyExperts,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Probe tokens per expert.
const TOKENS_PER_EXPERT: usize = 2;

impl Verifier {
    pub fn new(ckpt: Checkpoint, cfg: &ModelConfig, mode: VerifyExperts) -> Self {
        Self {
            ckpt,
            cfg: cfg.clone(),
            mode,
        }
    }

    /// The pairs to probe out of `held`, by layer.
    fn pick(&self, held: &[(usize, usize)]) -> Vec<(usize, Vec<usize>)> {
        let mut pairs: Vec<(usize, usize)> = match self.mode {
            VerifyExperts::Off => Vec::new(),
            VerifyExperts::All => held.to_vec(),
            VerifyExperts::Sample(n) => {
                held.choose_multiple(&mut rand::rng(), n).copied().collect()
            }
        };
        pairs.sort_unstable();
        let mut by_layer: Vec<(usize, Vec<usize>)> = Vec::new();
        for (layer, expert) in pairs {
            match by_layer.last_mut() {
                Some((l, experts)) if *l == layer => experts.push(expert),
                _ => by_layer.push((layer, vec![expert])),
            }
        }
        by_layer
    }

    /// The probe: `n` rows of fixed, varied values of about unit size, rounded to `dtype`.
    fn probe(&self, n: usize, dtype: DType) -> candle_core::Result<Tensor> {
        let hidden = self.cfg.hidden_size;
        // A fixed LCG: the same probe every time, no two rows alike.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let values: Vec<f32> = (0..n * hidden)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, (n, hidden), &Device::Cpu)?.to_dtype(dtype)
    }

    /// What the checkpoint says `experts` of `layer` make of `xs` (one expert per
    /// `TOKENS_PER_EXPERT` rows), in f32 on the CPU.
    fn expected(&self, layer: usize, experts: &[usize], xs: &Tensor) -> Result<Tensor, String> {
        let pairs: Vec<(usize, usize)> = experts.iter().map(|&e| (layer, e)).collect();
        let local = LocalExperts::load(
            &self.ckpt,
            &self.cfg,
            &pairs,
            DType::F32,
            &Device::Cpu,
            |_, _| {},
        )
        .map_err(|e| format!("cannot read the probed experts here: {e}"))?;
        let xs = xs.to_dtype(DType::F32).map_err(|e| e.to_string())?;
        local
            .forward(layer, &xs, &routing(experts), &CallContext::default())
            .map_err(|e| format!("cannot compute the probed experts here: {e}"))
    }
}

fn routing(experts: &[usize]) -> Routing {
    let ids: Vec<u32> = experts
        .iter()
        .flat_map(|&e| std::iter::repeat_n(e as u32, TOKENS_PER_EXPERT))
        .collect();
    Routing {
        top_k: 1,
        weights: vec![1.0; ids.len()],
        ids,
    }
}

/// Largest relative error of one answer row allowed for a node computing in `dtype`.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        _ => 3e-2,
    }
}

/// Why a node's experts did not pass the probe.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum VerifyError {
    /// An answer is off: the node serves other weights. The same process will not do better.
    #[error("{0}")]
    Mismatch(String),
    /// The probe could not be run or checked (a call failed, a malformed answer): try again.
    #[error("{0}")]
    Failed(String),
}

/// Probes the node behind `client`, which says it holds `held` and computes in `dtype`.
/// `Err` names the first expert whose answer is off (or why none could be checked).
pub(super) async fn verify(
    verifier: &Verifier,
    mut client: ExpertServiceClient<Channel>,
    held: &[(usize, usize)],
    dtype: DType,
    fingerprint: &str,
    timeout: std::time::Duration,
) -> Result<(), VerifyError> {
    let failed = VerifyError::Failed;
    for (layer, experts) in verifier.pick(held) {
        let n = experts.len() * TOKENS_PER_EXPERT;
        let xs = verifier
            .probe(n, dtype)
            .map_err(|e| failed(e.to_string()))?;
        let routing = routing(&experts);
        let (token_index, expert_id, weight) =
            wire::assignments_to_wire(&routing.assignments().collect::<Vec<_>>());
        let mut req = tonic::Request::new(ForwardRequest {
            layer: layer as u32,
            hidden: Some(wire::encode(&xs).map_err(|e| failed(e.to_string()))?),
            token_index,
            expert_id,
            weight,
            fingerprint: fingerprint.to_string(),
            ..Default::default()
        });
        req.set_timeout(timeout);
        let answer = client
            .forward(req)
            .await
            .map_err(|s| {
                failed(format!(
                    "the probe of layer {layer} failed: {:?}: {}",
                    s.code(),
                    s.message()
                ))
            })?
            .into_inner();
        let got = wire::decode(answer.output.as_ref(), "probe output", &Device::Cpu)
            .and_then(|t| {
                t.to_dtype(DType::F32)
                    .map_err(|source| wire::DecodeError::Candle {
                        what: "probe output",
                        source,
                    })
            })
            .map_err(|e| {
                failed(format!(
                    "the probe of layer {layer} came back malformed: {e}"
                ))
            })?;
        let (v, l, e) = (verifier.clone(), layer, experts.clone());
        let want = tokio::task::spawn_blocking(move || v.expected(l, &e, &xs))
            .await
            .map_err(|e| failed(format!("the reference computation failed: {e}")))?
            .map_err(failed)?;
        compare(layer, &experts, &got, &want, tolerance(dtype))?;
    }
    Ok(())
}

/// Row by row, ‖got − want‖ / ‖want‖ within `tol`.
fn compare(
    layer: usize,
    experts: &[usize],
    got: &Tensor,
    want: &Tensor,
    tol: f64,
) -> Result<(), VerifyError> {
    if got.dims() != want.dims() {
        return Err(VerifyError::Mismatch(format!(
            "the probe of layer {layer} came back as {:?}, expected {:?}",
            got.dims(),
            want.dims()
        )));
    }
    let (got, want) = (
        got.to_vec2::<f32>()
            .map_err(|e| VerifyError::Failed(e.to_string()))?,
        want.to_vec2::<f32>()
            .map_err(|e| VerifyError::Failed(e.to_string()))?,
    );
    for (row, (g, w)) in got.iter().zip(&want).enumerate() {
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&a, &b) in g.iter().zip(w) {
            diff += f64::from(a - b).powi(2);
            norm += f64::from(b).powi(2);
        }
        let err = (diff / norm.max(1e-30)).sqrt();
        if err.is_nan() || err > tol {
            let expert = experts[row / TOKENS_PER_EXPERT];
            return Err(VerifyError::Mismatch(format!(
                "expert {expert} of layer {layer} answers unlike the checkpoint (relative error {err:.3e}, allowed {tol:.0e}): its weights differ from the coordinator's"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_parses() {
        assert_eq!("all".parse(), Ok(VerifyExperts::All));
        assert_eq!("off".parse(), Ok(VerifyExperts::Off));
        assert_eq!("0".parse(), Ok(VerifyExperts::Off));
        assert_eq!("00".parse(), Ok(VerifyExperts::Off));
        assert_eq!("12".parse(), Ok(VerifyExperts::Sample(12)));
        assert!("some".parse::<VerifyExperts>().is_err());
    }

    #[test]
    fn rows_off_by_more_than_the_tolerance_name_their_expert() {
        let want = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.], [2., 2.]], &Device::Cpu).unwrap();
        let close = (&want * 1.00001).unwrap();
        assert!(compare(3, &[5, 9], &close, &want, 1e-4).is_ok());
        let negated =
            Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.], [-2., -2.]], &Device::Cpu).unwrap();
        let err = compare(3, &[5, 9], &negated, &want, 1e-2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expert 9 of layer 3"), "{err}");
        let nan = Tensor::new(
            &[[f32::NAN, 0.], [0., 1.], [1., 1.], [2., 2.]],
            &Device::Cpu,
        )
        .unwrap();
        assert!(compare(3, &[5, 9], &nan, &want, 1e-2).is_err());
    }
}
