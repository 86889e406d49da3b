//! Continuous batching (Orca, Yu et al., OSDI 2022): one scheduler thread owns the model and
//! every sequence's KV cache. Between forward passes it admits queued requests and drops
//! cancelled ones; each pass decodes one token for every running sequence and spends the rest of
//! the token budget on chunks of new prompts (chunked prefill, Sarathi, arXiv:2308.16369), so a
//! long prompt never stalls running streams. Each MoE layer therefore sends one message per
//! node for the whole batch.
//!
//! Requests come through a bounded queue (full → the caller answers 429); results go back over
//! a per-request unbounded channel, so a slow client never blocks the batch. A client that goes
//! away closes its channel, and its sequence and cache are dropped before the next pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::sampling::{Sampler, SamplingParams};
use omnishard_model::model::{KvCache, LogitsFor, Positions, SequenceInput};

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences prefilling or decoding at once.
    pub max_active: usize,
    /// Tokens per forward pass (decode tokens first, then prompt chunks).
    pub max_batched_tokens: usize,
    /// Requests waiting for admission before new ones get 429.
    pub queue_size: usize,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token.
    Stop,
    /// max_tokens reached.
    Length,
}

/// What the scheduler reports for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token (stop tokens are not sent).
    Token(u32),
    Finished(FinishReason),
    /// The forward pass failed; `unavailable` when expert nodes could not answer.
    Error {
        message: String,
        unavailable: bool,
    },
}

pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_tokens: Vec<u32>,
    pub events: UnboundedSender<Event>,
}

/// Handle to submit requests; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: SyncSender<(GenerationRequest, Instant)>,
    alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full; retry later")]
    QueueFull,
    #[error("the scheduler has stopped")]
    Stopped,
}

impl SchedulerHandle {
    pub fn submit(&self, req: GenerationRequest) -> Result<(), SubmitError> {
        self.metrics.queue_depth.inc();
        let result = self.tx.try_send((req, Instant::now()));
        if result.is_err() {
            self.metrics.queue_depth.dec();
        }
        match result {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

struct Sequence {
    req: GenerationRequest,
    enqueued: Instant,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt and generated tokens, for the repetition penalty.
    history: Vec<u32>,
    generated: usize,
    last_token_at: Option<Instant>,
    next_position: u32,
    /// Finished or failed: removed after this pass.
    done: bool,
}

impl Sequence {
    fn decoding(&self) -> bool {
        self.prefilled == self.req.prompt.len()
    }
}

/// Starts the scheduler thread; it runs until every handle is dropped.
pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig, metrics: Arc<Metrics>) -> SchedulerHandle {
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_size.max(1));
    let alive = Arc::new(AtomicBool::new(true));
    let handle = SchedulerHandle {
        tx,
        alive: alive.clone(),
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("omnishard-scheduler".into())
        .spawn(move || {
            // Cleared on return and on panic alike, so /health tells the truth.
            struct Alive(Arc<AtomicBool>);
            impl Drop for Alive {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _alive = Alive(alive);
            run(&engine, &cfg, &rx, &metrics);
        })
        .map_err(|e| tracing::error!(error = %e, "cannot start the scheduler thread"))
        .ok();
    handle
}

fn admit(seq: (GenerationRequest, Instant), metrics: &Metrics) -> Sequence {
    let (req, enqueued) = seq;
    metrics.queue_depth.dec();
    metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
    Sequence {
        sampler: Sampler::new(req.sampling.clone()),
        history: req.prompt.clone(),
        req,
        enqueued,
        cache: KvCache::new(),
        prefilled: 0,
        generated: 0,
        last_token_at: None,
        next_position: 0,
        done: false,
    }
}

fn run(
    engine: &Engine,
    cfg: &SchedulerConfig,
    rx: &Receiver<(GenerationRequest, Instant)>,
    metrics: &Metrics,
) {
    let mut active: Vec<Sequence> = Vec::new();
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(seq) => active.push(admit(seq, metrics)),
                Err(_) => return,
            }
        }
        while active.len() < cfg.max_active {
            match rx.try_recv() {
                Ok(seq) => active.push(admit(seq, metrics)),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        active.retain(|s| !s.req.events.is_closed());
        metrics.active_sequences.set(active.len() as i64);
        if active.is_empty() {
            continue;
        }
        step(engine, cfg, &mut active, metrics);
    }
}

/// One forward pass over a batch chosen from `active`; finished sequences are removed.
fn step(engine: &Engine, cfg: &SchedulerConfig, active: &mut Vec<Sequence>, metrics: &Metrics) {
    // Decoding sequences first (one token each), then prompt chunks with what budget is left.
    let mut budget = cfg.max_batched_tokens.max(1);
    let mut chosen: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, seq) in active.iter().enumerate() {
        if seq.decoding() && budget > 0 {
            let last = *seq.history.last().unwrap_or(&0);
            chosen.push((i, vec![last]));
            budget -= 1;
        }
    }
    for (i, seq) in active.iter().enumerate() {
        if !seq.decoding() && budget > 0 {
            let take = (seq.req.prompt.len() - seq.prefilled).min(budget);
            chosen.push((
                i,
                seq.req.prompt[seq.prefilled..seq.prefilled + take].to_vec(),
            ));
            budget -= take;
        }
    }
    let mut selected: Vec<&mut Sequence> = Vec::with_capacity(chosen.len());
    {
        let mut rest: Vec<Option<&mut Sequence>> = active.iter_mut().map(Some).collect();
        for (i, _) in &chosen {
            if let Some(seq) = rest[*i].take() {
                selected.push(seq);
            }
        }
    }
    let mut batch: Vec<SequenceInput<'_>> = Vec::with_capacity(chosen.len());
    let mut positions_next = Vec::with_capacity(chosen.len());
    for (seq, (_, tokens)) in selected.iter_mut().zip(&chosen) {
        let positions = Positions::text(seq.next_position, tokens.len());
        positions_next.push(positions.next_text_position());
        batch.push(SequenceInput {
            tokens,
            positions,
            cache: &mut seq.cache,
        });
    }
    let result = engine.model().forward(&mut batch, LogitsFor::Last);
    drop(batch);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            let unavailable = matches!(
                &e,
                omnishard_model::ModelError::Experts {
                    source: omnishard_model::ExpertError::Node { .. },
                    ..
                }
            );
            tracing::error!(error = %e, "forward pass failed; failing the sequences in it");
            // Their caches may be half-updated: drop the sequences.
            for seq in selected {
                let _ = seq.req.events.send(Event::Error {
                    message: e.to_string(),
                    unavailable,
                });
                seq.done = true;
            }
            active.retain(|s| !s.done);
            return;
        }
    };
    for (k, (seq, (_, tokens))) in selected.into_iter().zip(&chosen).enumerate() {
        seq.next_position = positions_next[k];
        if !seq.decoding() {
            seq.prefilled += tokens.len();
            if !seq.decoding() {
                continue;
            }
        }
        let row = match logits[k].squeeze(0).and_then(|t| t.to_vec1::<f32>()) {
            Ok(row) => row,
            Err(e) => {
                let _ = seq.req.events.send(Event::Error {
                    message: e.to_string(),
                    unavailable: false,
                });
                seq.done = true;
                continue;
            }
        };
        let token = seq.sampler.sample(&row, &seq.history);
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
            let _ = seq.req.events.send(Event::Token(token));
            (seq.generated >= seq.req.max_tokens).then_some(FinishReason::Length)
        };
        if let Some(reason) = done {
            let _ = seq.req.events.send(Event::Finished(reason));
            seq.done = true;
        }
    }
    active.retain(|s| !s.done);
}
