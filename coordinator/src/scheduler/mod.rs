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
//!
//! Each request brings its id and its tracing span: log lines about a sequence are children of
//! that span (so they carry the id), and every forward pass names the ids of its sequences to
//! the experts, which pass them on to the expert nodes.

mod sequence;

use std::any::Any;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::Engine;
use crate::error::GenerationError;
use crate::grammar::Constraint;
use crate::kv_budget::{self, KvBudget};
use crate::metrics::{Metrics, ThroughputLog};
use crate::sampling::{BatchRow, Sampler, SamplingParams, TokenLogprobs};
use omnishard_model::CallContext;
use omnishard_model::model::{LogitsFor, MediaSpan, Positions, SequenceInput};
use sequence::{Sequence, admit, take_token};

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences prefilling or decoding at once.
    pub max_active: usize,
    /// Tokens per forward pass (decode tokens first, then prompt chunks).
    pub max_batched_tokens: usize,
    /// Requests waiting for admission before new ones get 429.
    pub queue_size: usize,
    /// Bytes of keys and values the running sequences and the prefix cache may hold.
    pub kv_cache_bytes: usize,
    /// Keep the KV of prompts' whole blocks for later prompts that start the same way.
    pub prefix_caching: bool,
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
    /// A generated token (stop tokens are not sent), with its log-probabilities when the
    /// request asked for them.
    Token(u32, Option<TokenLogprobs>),
    /// Each prompt token with its log-probabilities given the tokens before it (none for the
    /// first), sent once, before the first token, when the request asked for them.
    PromptLogprobs(Vec<(u32, Option<TokenLogprobs>)>),
    Finished(FinishReason),
    /// The sequence failed and was dropped; nothing follows.
    Error(GenerationError),
}

pub struct GenerationRequest {
    /// The request id (the client's `X-Request-Id`, else the response id): sent to the expert
    /// nodes with every forward pass the sequence is in.
    pub id: String,
    /// The request's span: the scheduler's log lines about this sequence are its children.
    pub span: tracing::Span,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_tokens: Vec<u32>,
    /// Return each token's log-probability and this many of the most likely ones.
    pub logprobs: Option<usize>,
    /// Return the prompt tokens' log-probabilities and this many of the most likely tokens at
    /// each prompt position. Such a prompt is computed whole (not taken from the prefix cache).
    pub prompt_logprobs: Option<usize>,
    /// Encoder embeddings in place of some prompt tokens (audio), positions counted from the
    /// prompt's start. Such a prompt never goes to or comes from the prefix cache: its tokens
    /// alone do not say what it holds.
    pub media: Vec<MediaSpan>,
    /// The prompt's mRoPE positions when its media make them other than 0..n (images, video),
    /// and the delta the positions of later tokens continue with (`index + delta`).
    pub positions: Option<Positions>,
    pub rope_delta: i64,
    /// The grammar the answer must follow (structured output, forced tool calls).
    pub constraint: Option<Constraint>,
    /// More answers to the same prompt (`n` > 1): once the prompt is computed, each starts from
    /// a copy of its KV cache and draws its own tokens from the same first logits.
    pub forks: Vec<Fork>,
    pub events: UnboundedSender<Event>,
}

/// Another answer to a request's prompt.
pub struct Fork {
    pub sampling: SamplingParams,
    pub constraint: Option<Constraint>,
    pub events: UnboundedSender<Event>,
}

/// Handle to submit requests; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: SyncSender<(GenerationRequest, Instant)>,
    /// Set once, with the reason, when the thread could not start or has stopped.
    stopped: Arc<OnceLock<String>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full; retry later")]
    QueueFull,
    #[error("the scheduler has stopped: {reason}")]
    Stopped { reason: String },
}

impl SchedulerHandle {
    pub fn submit(&self, req: GenerationRequest) -> Result<(), SubmitError> {
        // A dead thread may leave its queue open for a moment: refuse now rather than queue a
        // request nobody will run.
        if let Some(reason) = self.stopped_reason() {
            return Err(SubmitError::Stopped { reason });
        }
        self.metrics.queue_depth.inc();
        let result = self.tx.try_send((req, Instant::now()));
        if result.is_err() {
            self.metrics.queue_depth.dec();
        }
        match result {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped {
                reason: self
                    .stopped_reason()
                    .unwrap_or_else(|| "the scheduler thread exited".into()),
            }),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.stopped.get().is_none()
    }

    /// Why the scheduler is not running (it never started, or it died), if it is not.
    pub fn stopped_reason(&self) -> Option<String> {
        self.stopped.get().cloned()
    }
}

/// Starts the scheduler thread; it runs until every handle is dropped. If the thread cannot be
/// started, or later panics, the handle says so ([`SchedulerHandle::stopped_reason`]): `/health`
/// then answers 503 with the reason, and new requests are refused with it.
pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig, metrics: Arc<Metrics>) -> SchedulerHandle {
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_size.max(1));
    let stopped = Arc::new(OnceLock::new());
    let handle = SchedulerHandle {
        tx,
        stopped: stopped.clone(),
        metrics: metrics.clone(),
    };
    let spawned = std::thread::Builder::new()
        .name("omnishard-scheduler".into())
        .spawn({
            let stopped = stopped.clone();
            move || {
                // Caught so the reason can be reported; the sequences (and their channels) were
                // dropped while unwinding, so their clients already got an error.
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    run(&engine, &cfg, &rx, &metrics)
                }));
                let reason = match outcome {
                    Ok(()) => "the scheduler thread exited".to_string(),
                    Err(payload) => {
                        let reason = format!(
                            "the scheduler thread panicked: {}",
                            panic_message(payload.as_ref())
                        );
                        tracing::error!(%reason, "scheduler stopped; /health now fails");
                        reason
                    }
                };
                let _ = stopped.set(reason);
            }
        });
    if let Err(e) = spawned {
        let reason = format!("cannot start the scheduler thread: {e}");
        tracing::error!(%reason, "scheduler not running; /health fails");
        let _ = stopped.set(reason);
    }
    handle
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

fn run(
    engine: &Engine,
    cfg: &SchedulerConfig,
    rx: &Receiver<(GenerationRequest, Instant)>,
    metrics: &Metrics,
) {
    let bytes_per_token =
        kv_budget::bytes_per_token(engine.config(), engine.model().dtype().size_in_bytes());
    let mut kv = KvBudget::new(cfg.kv_cache_bytes, bytes_per_token, cfg.prefix_caching);
    let mut active: Vec<Sequence> = Vec::new();
    // Admitted once and preempted since: they go before new requests.
    let mut preempted: VecDeque<Sequence> = VecDeque::new();
    // Taken from the queue but not admitted yet (no room in the KV budget).
    let mut next: Option<(GenerationRequest, Instant)> = None;
    let mut throughput = ThroughputLog::new(metrics);
    loop {
        throughput.tick(metrics);
        if active.is_empty() && preempted.is_empty() && next.is_none() {
            match rx.recv() {
                Ok(req) => next = Some(req),
                Err(_) => return,
            }
        }
        // A waiting request whose client went away is dropped before it can hold the line.
        if next.as_ref().is_some_and(|(req, _)| req.events.is_closed())
            && let Some((req, enqueued)) = next.take()
        {
            drop(admit((req, enqueued), metrics));
        }
        while running(&active) < cfg.max_active {
            if next.is_none() && preempted.is_empty() {
                match rx.try_recv() {
                    Ok(req) => next = Some(req),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let (need, choices) = match (preempted.front(), &next) {
                (Some(seq), _) => (seq.history.len() + 1, 1),
                // Every choice of the request will hold a copy of the prompt.
                (None, Some((req, _))) => {
                    let choices = 1 + req.forks.len();
                    ((req.prompt.len() + 1) * choices, choices)
                }
                (None, None) => break,
            };
            if need > kv.capacity() {
                // Validation refuses these; a request that slips through fails instead of
                // waiting forever at the head of the queue.
                if let Some((req, enqueued)) = next.take() {
                    let seq = admit((req, enqueued), metrics);
                    let _ = seq
                        .req
                        .events
                        .send(Event::Error(GenerationError::InvalidRequest(format!(
                            "the request needs {need} KV cache positions; the budget holds {}",
                            kv.capacity()
                        ))));
                }
                continue;
            }
            let crowded = !active.is_empty() && running(&active) + choices > cfg.max_active;
            if crowded || !kv.make_room(in_cache(&active), need) {
                break;
            }
            let mut seq = match preempted.pop_front() {
                Some(seq) => seq,
                None => match next.take() {
                    Some(req) => admit(req, metrics),
                    None => break,
                },
            };
            // At least the last token is computed: its logits pick the next one. A prompt whose
            // log-probabilities are asked for is computed whole, so each token gets them.
            let lookup = if seq.wants_prompt_logprobs() || !seq.req.media.is_empty() {
                None
            } else {
                kv.lookup(&seq.history, seq.to_prefill - 1)
            };
            if let Some((cache, len)) = lookup {
                metrics.prefix_cache_hit_tokens.inc_by(len as u64);
                seq.resume_from(cache, len);
            }
            metrics
                .prefix_cache_query_tokens
                .inc_by(seq.to_prefill as u64);
            active.push(seq);
        }
        // Decoding adds a position per running sequence: evict cached prefixes, then preempt
        // the newest sequence, until that fits (a lone sequence always fits: validation bounds
        // it by the context, which the budget holds).
        while !kv.make_room(in_cache(&active), active.len()) && active.len() > 1 {
            if let Some(mut seq) = active.pop() {
                tracing::debug!(parent: &seq.req.span, "sequence preempted: the KV cache budget is full; it will be recomputed");
                metrics.preemptions.inc();
                seq.preempt();
                preempted.push_front(seq);
            }
        }
        metrics
            .kv_cache_tokens
            .set((in_cache(&active) + kv.cached()) as i64);
        active.retain(|s| {
            let gone = s.req.events.is_closed();
            if gone {
                tracing::debug!(
                    parent: &s.req.span,
                    completion_tokens = s.generated,
                    "sequence dropped: its client went away or a stop string ended it"
                );
            }
            !gone
        });
        metrics.active_sequences.set(active.len() as i64);
        if active.is_empty() {
            continue;
        }
        step(engine, cfg, &mut active, metrics, &mut kv);
        // Also after the step: when its last sequence finishes, the loop next blocks waiting for
        // work, and an idle server must not keep showing the sequences it had.
        metrics.active_sequences.set(active.len() as i64);
    }
}

/// Positions the running sequences hold or will hold once their prompts are computed (each
/// choice still to be forked holds a copy of the prompt).
fn in_cache(active: &[Sequence]) -> usize {
    active.iter().map(Sequence::reserved).sum()
}

/// Sequences running, counting the choices still to be forked.
fn running(active: &[Sequence]) -> usize {
    active.iter().map(|s| 1 + s.req.forks.len()).sum()
}

/// One forward pass over a batch chosen from `active` (whose prompts the KV budget holds
/// already); finished sequences are removed, and prompts just computed are offered to the
/// prefix cache.
fn step(
    engine: &Engine,
    cfg: &SchedulerConfig,
    active: &mut Vec<Sequence>,
    metrics: &Metrics,
    kv: &mut KvBudget,
) {
    // Decoding sequences first (one token each), then prompt chunks with what budget is left.
    let mut budget = cfg.max_batched_tokens.max(1);
    let in_use_after = in_cache(active) + budget;
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
            let take = (seq.to_prefill - seq.prefilled).min(budget);
            chosen.push((i, seq.history[seq.prefilled..seq.prefilled + take].to_vec()));
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
    // The ids go to the expert nodes, which log each once: a request can be followed there.
    let ctx = CallContext {
        request_ids: selected
            .iter()
            .map(|s| s.req.id.clone())
            .collect::<Vec<_>>()
            .into(),
    };
    // Every row's logits only when a prompt in the batch wants its log-probabilities (the
    // other sequences then use their last row).
    let which = if selected
        .iter()
        .any(|s| !s.decoding() && s.wants_prompt_logprobs())
    {
        LogitsFor::All
    } else {
        LogitsFor::Last
    };
    // Each prompt chunk's share of its media, counted from the chunk's start; failing to cut
    // it fails the step as a failed forward pass does (never a pass without the media).
    let media: candle_core::Result<Vec<Vec<MediaSpan>>> = selected
        .iter()
        .zip(&chosen)
        .map(|(seq, (_, tokens))| chunk_media(&seq.req.media, seq.prefilled, tokens.len()))
        .collect();
    let n_tokens: usize = chosen.iter().map(|(_, t)| t.len()).sum();
    let mut batch: Vec<SequenceInput<'_>> = Vec::with_capacity(chosen.len());
    for (seq, (_, tokens)) in selected.iter_mut().zip(&chosen) {
        let start = if seq.decoding() {
            seq.history.len() - 1
        } else {
            seq.prefilled
        };
        let positions = seq.positions_at(start, tokens.len());
        batch.push(SequenceInput {
            tokens,
            positions,
            cache: &mut seq.cache,
        });
    }
    let result = {
        let _step =
            tracing::trace_span!("step", sequences = batch.len(), tokens = n_tokens).entered();
        match media {
            Ok(media) => engine.forward_media(&mut batch, which, &ctx, &media),
            Err(e) => Err(e.into()),
        }
    };
    drop(batch);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            let error = GenerationError::from_forward(&e);
            tracing::error!(error = %e, requests = ?ctx.request_ids, "forward pass failed; failing the sequences in it");
            // Their caches may be half-updated: drop the sequences.
            for seq in selected {
                let _ = seq.req.events.send(Event::Error(error.clone()));
                seq.done = true;
            }
            active.retain(|s| !s.done);
            return;
        }
    };
    let mut spawned: Vec<Sequence> = Vec::new();
    // Who takes a token from which row, drawn together once every row is known.
    let mut takers: Vec<(&mut Sequence, Tensor)> = Vec::with_capacity(selected.len());
    let mut fork_rows: Vec<Tensor> = Vec::new();
    for (k, (seq, (_, tokens))) in selected.into_iter().zip(&chosen).enumerate() {
        let rows = &logits[k];
        let last = match rows
            .dim(0)
            .and_then(|n| rows.narrow(0, n.saturating_sub(1), 1))
        {
            Ok(last) => last,
            Err(e) => {
                seq.fail(&format!("cannot read the logits: {e}"));
                continue;
            }
        };
        if !seq.decoding() {
            if seq.wants_prompt_logprobs()
                && let Err(e) = seq.record_prompt_logprobs(rows)
            {
                seq.fail(&format!("cannot read the prompt's logits: {e}"));
                continue;
            }
            seq.prefilled += tokens.len();
            if !seq.decoding() {
                continue;
            }
            if seq.req.media.is_empty() {
                kv.remember(&seq.history[..seq.to_prefill], &seq.cache, in_use_after);
            }
        }
        let prompt_logprobs = seq.take_prompt_logprobs();
        // Its prompt just computed, a request with more choices forks them now.
        let forks = (!seq.req.forks.is_empty()).then(|| std::mem::take(&mut seq.req.forks));
        if let Some(forks) = forks {
            for fork in forks.into_iter().filter_map(|f| seq.fork(f)) {
                if let Some(lp) = &prompt_logprobs {
                    let _ = fork.req.events.send(Event::PromptLogprobs(lp.clone()));
                }
                spawned.push(fork);
                fork_rows.push(last.clone());
            }
        }
        if let Some(lp) = prompt_logprobs {
            let _ = seq.req.events.send(Event::PromptLogprobs(lp));
        }
        takers.push((seq, last));
    }
    let mut takers: Vec<(&mut Sequence, Tensor)> =
        spawned.iter_mut().zip(fork_rows).chain(takers).collect();
    let tokens = {
        let mut rows: Vec<BatchRow<'_>> = takers
            .iter_mut()
            .map(|(seq, last)| BatchRow {
                sampler: &mut seq.sampler,
                logits: last,
                history: &seq.history,
            })
            .collect();
        Sampler::sample_batch(&mut rows)
    };
    for ((seq, last), token) in takers.into_iter().zip(tokens) {
        take_token(seq, token, &last, metrics);
    }
    active.extend(spawned);
    active.retain(|s| !s.done);
}

/// The parts of `media` (spans from the prompt's start) that fall in the chunk of `len` tokens
/// from `start`, re-based to the chunk's start.
fn chunk_media(
    media: &[MediaSpan],
    start: usize,
    len: usize,
) -> candle_core::Result<Vec<MediaSpan>> {
    let mut out = Vec::new();
    for span in media {
        let rows = span.embeds.dim(0)?;
        let (lo, hi) = (span.start.max(start), (span.start + rows).min(start + len));
        if lo < hi {
            let cut = |t: &candle_core::Tensor| t.narrow(0, lo - span.start, hi - lo);
            out.push(MediaSpan {
                start: lo - start,
                embeds: cut(&span.embeds)?,
                deepstack: span.deepstack.iter().map(cut).collect::<Result<_, _>>()?,
            });
        }
    }
    Ok(out)
}

impl From<SubmitError> for GenerationError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull => Self::QueueFull,
            SubmitError::Stopped { reason } => Self::SchedulerStopped { reason },
        }
    }
}
