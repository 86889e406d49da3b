//! Sampling where the logits lie: on a GPU the penalty, the greedy argmax, unrestricted draws
//! (Gumbel-max) and the selection of top-k / top-p candidates run there
//! (`omnishard_model::ops::cuda::sample_rows`, a step's rows in one batch) and only ids or
//! candidates come back; the host finishes what the device cannot (grammars, biases, OpenAI's
//! penalties, min-p, barred stop tokens, a nucleus wider than the candidates).

use candle_core::{Device, Tensor};
use omnishard_model::ops::cuda;
use omnishard_model::ops::sampling::{DEVICE_CANDIDATES, DeviceDraw, RowSampling};
use rand::Rng;

use super::{Head, Sampler};

/// One row of a step for [`Sampler::sample_batch`]: its sequence's sampler, its logits (f32,
/// `[vocab]` or `[1, vocab]`) and its history (prompt and generated tokens).
pub struct BatchRow<'a> {
    pub sampler: &'a mut Sampler,
    pub logits: &'a Tensor,
    pub history: &'a [u32],
}

/// Rows of a step the device draws together (their indices, and what each asks of it).
struct DeviceGroup<'a> {
    rows: Vec<usize>,
    requests: Vec<(&'a Tensor, RowSampling<'a>)>,
}

impl Sampler {
    /// Picks the next token from one row of logits (f32, `[vocab]` or `[1, vocab]`) where they
    /// lie: on a GPU the penalty, the greedy argmax, unrestricted draws (Gumbel-max) and the
    /// selection of top-k / top-p candidates run there and only the candidates come back;
    /// elsewhere, or when the nucleus is wider than the device hands back, on the host.
    pub fn sample_tensor(&mut self, logits: &Tensor, history: &[u32]) -> candle_core::Result<u32> {
        let draw = match self.device_request(logits, history) {
            Some(req) => cuda::sample_row(logits, &req)?,
            None => None,
        };
        self.finish(draw, logits, history)
    }

    /// [`Sampler::sample_tensor`] for every row of a step, the rows the device takes in one
    /// batch of launches with one copy back (on a GPU, drawing rows one by one cost ~30 µs each:
    /// ~1 ms of a 32-sequence step). Every row's token is the one it would get alone.
    pub fn sample_batch(rows: &mut [BatchRow<'_>]) -> Vec<candle_core::Result<u32>> {
        // The rows the device takes, in groups it can draw together: logits of one dtype on
        // one device (in a step, all of them).
        let mut groups: Vec<DeviceGroup<'_>> = Vec::new();
        for (r, row) in rows.iter_mut().enumerate() {
            let Some(req) = row.sampler.device_request(row.logits, row.history) else {
                continue;
            };
            let logits = row.logits;
            let fits = |g: &&mut DeviceGroup<'_>| {
                g.requests.first().is_some_and(|(t, _)| {
                    t.dtype() == logits.dtype() && t.device().same_device(logits.device())
                })
            };
            match groups.iter_mut().find(fits) {
                Some(g) => {
                    g.rows.push(r);
                    g.requests.push((logits, req));
                }
                None => groups.push(DeviceGroup {
                    rows: vec![r],
                    requests: vec![(logits, req)],
                }),
            }
        }
        let mut draws: Vec<candle_core::Result<Option<DeviceDraw>>> =
            (0..rows.len()).map(|_| Ok(None)).collect();
        for DeviceGroup { rows: at, requests } in &groups {
            match cuda::sample_rows(requests) {
                Ok(Some(batch)) => {
                    for (r, draw) in at.iter().zip(batch) {
                        draws[*r] = Ok(Some(draw));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // Each row then fails (or not) on its own, with the key it already drew.
                    tracing::warn!(error = %e, rows = requests.len(), "sampling the batch on the device failed; sampling its rows one by one");
                    for (r, (logits, req)) in at.iter().zip(requests) {
                        draws[*r] = cuda::sample_row(logits, req);
                    }
                }
            }
        }
        rows.iter_mut()
            .zip(draws)
            .map(|(row, draw)| row.sampler.finish(draw?, row.logits, row.history))
            .collect()
    }

    /// What the device is asked for this row, when it may take it (a GPU, and nothing that
    /// needs the host); draws the row's Gumbel key.
    fn device_request<'h>(
        &mut self,
        logits: &Tensor,
        history: &'h [u32],
    ) -> Option<RowSampling<'h>> {
        let p = &self.params;
        let restricted = p.top_k.is_some() || p.top_p < 1.0;
        let on_device = !matches!(logits.device(), Device::Cpu)
            && !self.needs_host(history)
            && (p.temperature == 0.0 || p.top_k.is_none_or(|k| k <= DEVICE_CANDIDATES));
        if !on_device {
            return None;
        }
        let gumbel_key = (p.temperature > 0.0 && !restricted).then(|| self.rng.random());
        let p = &self.params;
        Some(RowSampling {
            penalized: if p.repetition_penalty != 1.0 {
                history
            } else {
                &[]
            },
            penalty: p.repetition_penalty,
            temperature: p.temperature,
            top: p.top_k.unwrap_or(DEVICE_CANDIDATES),
            gumbel_key,
        })
    }

    /// The token from the device's `draw`; the host samples where there is none or the device
    /// could not finish it (a nucleus wider than its candidates, too many ties).
    fn finish(
        &mut self,
        draw: Option<DeviceDraw>,
        logits: &Tensor,
        history: &[u32],
    ) -> candle_core::Result<u32> {
        match draw {
            Some(DeviceDraw::Token(t)) => return Ok(t),
            Some(DeviceDraw::Candidates { mut sorted, total }) => {
                let head = match self.params.top_k {
                    Some(k) => {
                        sorted.truncate(k);
                        Head::Whole
                    }
                    None => Head::Of(total),
                };
                if let Some(t) = self.draw(&sorted, head) {
                    return Ok(t);
                }
                tracing::debug!(
                    candidates = sorted.len(),
                    "the top-p nucleus is wider than the device's candidates; sampling on the host"
                );
            }
            Some(DeviceDraw::TooManyTies) | None => {}
        }
        let mut row = logits.flatten_all()?.to_vec1::<f32>()?;
        let step_failed = |e: crate::grammar::GrammarError| candle_core::Error::Msg(e.to_string());
        if let Some(c) = self.constraint.as_mut() {
            c.mask(&mut row).map_err(step_failed)?;
        }
        let token = self.sample(&row, history);
        let ends = self.stop_tokens.contains(&token);
        if let Some(c) = self.constraint.as_mut().filter(|_| !ends) {
            c.consume(token).map_err(step_failed)?;
        }
        Ok(token)
    }
}
