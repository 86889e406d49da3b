//! One sequence as the scheduler runs it: its request, KV cache, sampler and history; admitted
//! from the queue, preempted (cache dropped, recomputed later), resumed from a cached prefix,
//! forked into another choice of its request, and advanced by one sampled token at a time.

use std::time::Instant;

use candle_core::Tensor;
use omnishard_model::model::{KvCache, Positions};

use super::{Event, FinishReason, Fork, GenerationRequest};
use crate::error::GenerationError;
use crate::metrics::Metrics;
use crate::sampling::{Sampler, TokenLogprobs, logprobs};

pub(super) struct Sequence {
    pub(super) req: GenerationRequest,
    pub(super) enqueued: Instant,
    pub(super) cache: KvCache,
    pub(super) sampler: Sampler,
    /// Tokens of `history` already in the cache.
    pub(super) prefilled: usize,
    /// Tokens of `history` to put in the cache before decoding: the prompt, or after a
    /// preemption everything so far.
    pub(super) to_prefill: usize,
    /// Prompt and generated tokens, for the repetition penalty.
    pub(super) history: Vec<u32>,
    pub(super) generated: usize,
    pub(super) last_token_at: Option<Instant>,
    /// Finished or failed: removed after this pass.
    pub(super) done: bool,
    /// The prompt tokens' log-probabilities computed so far, while the request wants them and
    /// they have not been sent.
    pub(super) prompt_logprobs: Vec<(u32, Option<TokenLogprobs>)>,
}

impl Sequence {
    pub(super) fn decoding(&self) -> bool {
        self.prefilled >= self.to_prefill
    }

    /// Positions of the `len` tokens of `history` from index `start`: the prompt's mRoPE
    /// positions where it has them, `index + rope_delta` after (text positions for a prompt
    /// without images or video).
    pub(super) fn positions_at(&self, start: usize, len: usize) -> Positions {
        let Some(prompt) = &self.req.positions else {
            return Positions::text(start as u32, len);
        };
        let mut rows: [Vec<u32>; 3] = Default::default();
        for (r, row) in rows.iter_mut().enumerate() {
            row.extend((start..start + len).map(|i| {
                prompt.rows[r]
                    .get(i)
                    .copied()
                    .unwrap_or((i as i64 + self.req.rope_delta).max(0) as u32)
            }));
        }
        Positions { rows }
    }

    /// The request asked for its prompt's log-probabilities and has not had them yet.
    pub(super) fn wants_prompt_logprobs(&self) -> bool {
        self.req.prompt_logprobs.is_some()
    }

    /// Log-probabilities of the prompt tokens that `rows` (the logits of every token of the
    /// chunk just computed) predict.
    pub(super) fn record_prompt_logprobs(&mut self, rows: &Tensor) -> candle_core::Result<()> {
        let top = self.req.prompt_logprobs.unwrap_or(0);
        if self.prompt_logprobs.is_empty()
            && let Some(&first) = self.req.prompt.first()
        {
            self.prompt_logprobs.push((first, None));
        }
        for (i, row) in rows.to_vec2::<f32>()?.iter().enumerate() {
            if let Some(&next) = self.req.prompt.get(self.prefilled + i + 1) {
                self.prompt_logprobs
                    .push((next, Some(logprobs(row, next, top))));
            }
        }
        Ok(())
    }

    /// The prompt's log-probabilities once its last token is computed, taken once.
    pub(super) fn take_prompt_logprobs(&mut self) -> Option<Vec<(u32, Option<TokenLogprobs>)>> {
        self.req.prompt_logprobs.take()?;
        Some(std::mem::take(&mut self.prompt_logprobs))
    }

    /// Tells the client why the sequence cannot go on, and ends it.
    pub(super) fn fail(&mut self, why: &str) {
        tracing::warn!(parent: &self.req.span, error = why, "failing the sequence");
        let _ = self
            .req
            .events
            .send(Event::Error(GenerationError::ForwardFailed(
                why.to_string(),
            )));
        self.done = true;
    }

    /// KV positions this sequence holds or has been admitted to hold.
    pub(super) fn reserved(&self) -> usize {
        self.cache.seq_len().max(self.to_prefill) + self.req.forks.len() * self.to_prefill
    }

    /// Drops the cache to free its memory; everything so far is computed again when the
    /// sequence runs next (the same tokens, so the same text).
    pub(super) fn preempt(&mut self) {
        self.cache = KvCache::new();
        self.prefilled = 0;
        self.to_prefill = self.history.len();
        // Computed again with the prompt, if they were not sent yet.
        self.prompt_logprobs.clear();
    }

    /// Another answer to this sequence's prompt, computed: a copy of its cache, its own sampler.
    /// `None` (the fork is told why) if the cache cannot be copied.
    pub(super) fn fork(&self, fork: Fork) -> Option<Sequence> {
        let cache = match self.cache.prefix(self.to_prefill) {
            Ok(cache) => cache,
            Err(e) => {
                let _ = fork
                    .events
                    .send(Event::Error(GenerationError::ForwardFailed(format!(
                        "cannot copy the prompt's KV cache for another choice: {e}"
                    ))));
                return None;
            }
        };
        let mut sampler = Sampler::for_sequence(
            fork.sampling.clone(),
            self.req.prompt.len(),
            self.req.stop_tokens.clone(),
        );
        if let Some(c) = fork.constraint {
            sampler = sampler.constrained(c);
        }
        Some(Sequence {
            req: GenerationRequest {
                id: self.req.id.clone(),
                span: self.req.span.clone(),
                prompt: self.req.prompt.clone(),
                max_tokens: self.req.max_tokens,
                sampling: fork.sampling,
                stop_tokens: self.req.stop_tokens.clone(),
                logprobs: self.req.logprobs,
                prompt_logprobs: None,
                media: self.req.media.clone(),
                positions: self.req.positions.clone(),
                rope_delta: self.req.rope_delta,
                constraint: None,
                forks: Vec::new(),
                events: fork.events,
            },
            enqueued: self.enqueued,
            cache,
            sampler,
            prefilled: self.to_prefill,
            to_prefill: self.to_prefill,
            history: self.history[..self.to_prefill].to_vec(),
            generated: 0,
            last_token_at: None,
            done: false,
            prompt_logprobs: Vec::new(),
        })
    }

    /// Starts from a cached prefix of `history`.
    pub(super) fn resume_from(&mut self, cache: KvCache, len: usize) {
        self.cache = cache;
        self.prefilled = len;
    }
}

pub(super) fn admit(seq: (GenerationRequest, Instant), metrics: &Metrics) -> Sequence {
    let (mut req, enqueued) = seq;
    metrics.queue_depth.dec();
    metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
    metrics
        .request_queue_seconds
        .observe(enqueued.elapsed().as_secs_f64());
    tracing::debug!(
        parent: &req.span,
        queued_ms = enqueued.elapsed().as_secs_f64() * 1e3,
        "sequence admitted"
    );
    Sequence {
        sampler: {
            let sampler = Sampler::for_sequence(
                req.sampling.clone(),
                req.prompt.len(),
                req.stop_tokens.clone(),
            );
            match req.constraint.take() {
                Some(c) => sampler.constrained(c),
                None => sampler,
            }
        },
        history: req.prompt.clone(),
        to_prefill: req.prompt.len(),
        req,
        enqueued,
        cache: KvCache::new(),
        prefilled: 0,
        generated: 0,
        last_token_at: None,
        done: false,
        prompt_logprobs: Vec::new(),
    }
}

/// Gives `seq` the token drawn from its row of `logits` (the scheduler draws a step's rows
/// together) and sends it on, or ends the sequence.
pub(super) fn take_token(
    seq: &mut Sequence,
    token: candle_core::Result<u32>,
    logits: &Tensor,
    metrics: &Metrics,
) {
    let token = match token {
        Ok(token) => token,
        Err(e) => {
            seq.fail(&format!("cannot sample from the logits: {e}"));
            return;
        }
    };
    seq.history.push(token);
    seq.generated += 1;
    metrics.completion_tokens.inc();
    let now = Instant::now();
    match seq.last_token_at {
        None => metrics
            .time_to_first_token
            .observe((now - seq.enqueued).as_secs_f64()),
        Some(t) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
    }
    seq.last_token_at = Some(now);
    let done = if seq.req.stop_tokens.contains(&token) {
        Some(FinishReason::Stop)
    } else {
        let logprobs = match seq.req.logprobs {
            None => None,
            Some(top) => logits
                .flatten_all()
                .and_then(|row| row.to_vec1::<f32>())
                .map(|row| logprobs(&row, token, top))
                .inspect_err(|e| tracing::warn!(parent: &seq.req.span, error = %e, "cannot read the logits for logprobs"))
                .ok(),
        };
        let _ = seq.req.events.send(Event::Token(token, logprobs));
        if seq.sampler.grammar_finished() {
            Some(FinishReason::Stop)
        } else {
            (seq.generated >= seq.req.max_tokens).then_some(FinishReason::Length)
        }
    };
    if let Some(reason) = done {
        tracing::debug!(
            parent: &seq.req.span,
            ?reason,
            completion_tokens = seq.generated,
            seconds = seq.enqueued.elapsed().as_secs_f64(),
            "sequence finished"
        );
        let _ = seq.req.events.send(Event::Finished(reason));
        seq.done = true;
    }
}
