//! Turning the scheduler's events for one request into an answer: text decoded incrementally,
//! cut at stop strings and split into reasoning, content and tool calls, then sent whole (one JSON object) or streamed (server-sent events
//! ending in `data: [DONE]`). Each request's end is logged once, in its span: finished (with
//! token counts and duration), failed, or cancelled by the client.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

use super::shutdown::InFlight;
use super::types::{Choice, Header, LogprobEntry, prompt_logprobs_json, tool_call_json, usage};
use super::{AppState, GenerationError};
use crate::chat::output::{self, Delta, OutputFormat, OutputParser};
use crate::scheduler::{Event, FinishReason, SchedulerHandle};
use crate::stop_strings::StopMatcher;
use crate::tokenizer::{DecodeStream, TextTokenizer};

/// Turns scheduler events into text, honouring stop strings, then into answer pieces
/// (reasoning, content, tool calls) as the request's [`OutputFormat`] says.
struct Assembler {
    decode: DecodeStream,
    stop: StopMatcher,
    output: OutputParser,
    completion_tokens: usize,
    /// Log-probabilities of tokens received and not yet sent (when the request asked).
    logprobs: Vec<LogprobEntry>,
    prompt: PromptLogprobs,
    /// vLLM's `prompt_logprobs` of the choice, once received and until sent.
    prompt_logprobs: Option<serde_json::Value>,
}

/// What a request does with its prompt's log-probabilities.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PromptLogprobs {
    /// Put them before the answer's in `logprobs` (completions' `echo` with `logprobs`).
    pub echoed: bool,
    /// Return them as vLLM's `prompt_logprobs`.
    pub separate: bool,
}

enum Piece {
    Deltas(Vec<Delta>),
    Done {
        deltas: Vec<Delta>,
        reason: &'static str,
    },
    Failed(GenerationError),
}

impl Assembler {
    fn new(stop: Vec<String>, format: OutputFormat, prompt: PromptLogprobs) -> Self {
        Self {
            decode: DecodeStream::default(),
            stop: StopMatcher::new(stop),
            output: OutputParser::new(format),
            completion_tokens: 0,
            logprobs: Vec::new(),
            prompt,
            prompt_logprobs: None,
        }
    }

    fn on_event(
        &mut self,
        tok: &TextTokenizer,
        scheduler: &SchedulerHandle,
        event: Option<Event>,
    ) -> Piece {
        let decode_failed = |e: crate::tokenizer::TokenizerError| {
            Piece::Failed(GenerationError::Decode(e.to_string()))
        };
        let text = |id: u32| tok.token_piece(id);
        let entry = |t: u32, lp: &Option<crate::sampling::TokenLogprobs>| LogprobEntry {
            token: text(t),
            logprob: lp.as_ref().map(|lp| lp.logprob),
            top: lp
                .as_ref()
                .map(|lp| lp.top.iter().map(|&(id, l)| (text(id), l)).collect()),
        };
        match event {
            Some(Event::PromptLogprobs(tokens)) => {
                if self.prompt.echoed {
                    self.logprobs
                        .extend(tokens.iter().map(|(t, lp)| entry(*t, lp)));
                }
                if self.prompt.separate {
                    self.prompt_logprobs = Some(prompt_logprobs_json(&tokens, text));
                }
                Piece::Deltas(Vec::new())
            }
            Some(Event::Token(t, logprobs)) => {
                self.completion_tokens += 1;
                if logprobs.is_some() {
                    self.logprobs.push(entry(t, &logprobs));
                }
                let piece = match self.decode.push(tok, t) {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => return decode_failed(e),
                };
                let (text, stopped) = self.stop.push(&piece);
                if stopped {
                    self.done(&text, "stop")
                } else {
                    Piece::Deltas(self.output.push(&text))
                }
            }
            Some(Event::Finished(reason)) => {
                let tail = match self.decode.finish(tok) {
                    Ok(t) => t,
                    Err(e) => return decode_failed(e),
                };
                let (mut text, stopped) = self.stop.push(&tail);
                if !stopped {
                    text.push_str(&self.stop.flush());
                }
                let reason = match reason {
                    _ if stopped => "stop",
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                };
                self.done(&text, reason)
            }
            Some(Event::Error(e)) => Piece::Failed(e),
            // The channel closed without a last event: the scheduler thread is gone.
            None => Piece::Failed(GenerationError::SchedulerStopped {
                reason: scheduler
                    .stopped_reason()
                    .unwrap_or_else(|| "it stopped before the request finished".into()),
            }),
        }
    }

    /// The last text; an answer that stopped after calling tools finishes with `tool_calls`.
    fn done(&mut self, text: &str, reason: &'static str) -> Piece {
        let mut deltas = self.output.push(text);
        deltas.extend(self.output.finish());
        let reason = if reason == "stop" && self.output.tool_calls() > 0 {
            "tool_calls"
        } else {
            reason
        };
        Piece::Done { deltas, reason }
    }
}

/// Logs how a request ended, once: finished, failed, or — when dropped before either, because
/// the client went away and axum dropped the response — cancelled.
pub(super) struct Outcome {
    span: tracing::Span,
    metrics: Arc<crate::metrics::Metrics>,
    started: Instant,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_token: Option<Instant>,
    ended: bool,
}

impl Outcome {
    pub fn new(
        span: tracing::Span,
        metrics: Arc<crate::metrics::Metrics>,
        started: Instant,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            span,
            metrics,
            started,
            prompt_tokens,
            completion_tokens: 0,
            first_token: None,
            ended: false,
        }
    }

    /// Keeps the count of tokens received current (and when the first came).
    fn tokens(&mut self, completion_tokens: usize) {
        if completion_tokens > 0 && self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        self.completion_tokens = completion_tokens;
    }

    /// One line per request: id (the span), tokens in and out, time to first token, duration,
    /// finish reason; and the per-request metrics.
    fn finished(&mut self, reason: &str, completion_tokens: usize) {
        self.ended = true;
        self.tokens(completion_tokens);
        let seconds = self.started.elapsed().as_secs_f64();
        let ttft = self.first_token.map(|t| (t - self.started).as_secs_f64());
        tracing::info!(
            parent: &self.span,
            finish_reason = %reason,
            prompt_tokens = self.prompt_tokens,
            completion_tokens,
            ttft_seconds = ttft,
            seconds,
            "request finished"
        );
        let m = &self.metrics;
        m.request_e2e_seconds.observe(seconds);
        m.request_finished.with_label_values(&[reason]).inc();
        m.request_prompt_tokens.observe(self.prompt_tokens as f64);
        m.request_generation_tokens
            .observe(completion_tokens as f64);
    }

    fn failed(&mut self, e: &GenerationError, completion_tokens: usize) {
        self.ended = true;
        self.metrics
            .request_finished
            .with_label_values(&["error"])
            .inc();
        self.completion_tokens = completion_tokens;
        tracing::warn!(
            parent: &self.span,
            error = %e,
            status = e.status().as_u16(),
            prompt_tokens = self.prompt_tokens,
            completion_tokens,
            seconds = self.started.elapsed().as_secs_f64(),
            "request failed"
        );
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.ended {
            tracing::info!(
                parent: &self.span,
                prompt_tokens = self.prompt_tokens,
                completion_tokens = self.completion_tokens,
                seconds = self.started.elapsed().as_secs_f64(),
                "request cancelled: the client went away"
            );
        }
    }
}

/// What both answer forms need besides the events.
pub(super) struct Answer {
    pub header: Header,
    pub stop: Vec<String>,
    pub format: OutputFormat,
    /// The request asked for log-probabilities.
    pub logprobs: bool,
    pub prompt_logprobs: PromptLogprobs,
    /// Text sent before the answer (completions' `echo`).
    pub echo: Option<String>,
    pub include_usage: bool,
    /// Counts the request as in flight (for graceful shutdown) until the answer is sent.
    pub in_flight: InFlight,
    pub outcome: Outcome,
}

/// One choice's answer, assembled from its events.
struct Assembled {
    parts: output::Answer,
    logprobs: Vec<LogprobEntry>,
    prompt_logprobs: Option<serde_json::Value>,
    reason: &'static str,
    completion_tokens: usize,
}

/// Reads one choice's events to its end. Each choice has its own unbounded channel, so reading
/// them one after another holds nothing up.
async fn assemble(
    state: &AppState,
    mut asm: Assembler,
    echo: Option<String>,
    rx: &mut UnboundedReceiver<Event>,
    outcome: &mut Outcome,
    before: usize,
) -> Result<Assembled, (GenerationError, usize)> {
    let mut parts = output::Answer {
        content: echo.unwrap_or_default(),
        ..Default::default()
    };
    let mut logprobs = Vec::new();
    let mut cancelled = std::pin::pin!(state.shutdown.cancelled());
    loop {
        let event = tokio::select! {
            event = rx.recv() => event,
            () = &mut cancelled => Some(Event::Error(GenerationError::ShuttingDown)),
        };
        let piece = asm.on_event(&state.tokenizer, &state.scheduler, event);
        outcome.tokens(before + asm.completion_tokens);
        logprobs.append(&mut asm.logprobs);
        match piece {
            Piece::Deltas(deltas) => deltas.into_iter().for_each(|d| parts.add(d)),
            Piece::Done { deltas, reason } => {
                deltas.into_iter().for_each(|d| parts.add(d));
                return Ok(Assembled {
                    parts,
                    logprobs,
                    prompt_logprobs: asm.prompt_logprobs.take(),
                    reason,
                    completion_tokens: asm.completion_tokens,
                });
            }
            Piece::Failed(e) => return Err((e, asm.completion_tokens)),
        }
    }
}

pub(super) async fn whole_response(
    state: Arc<AppState>,
    answer: Answer,
    receivers: Vec<UnboundedReceiver<Event>>,
) -> Response {
    let Answer {
        mut header,
        stop,
        format,
        mut outcome,
        logprobs: wants_logprobs,
        prompt_logprobs,
        echo,
        in_flight: _in_flight,
        ..
    } = answer;
    let mut choices = Vec::with_capacity(receivers.len());
    let mut completion_tokens = 0;
    for mut rx in receivers {
        let asm = Assembler::new(stop.clone(), format, prompt_logprobs);
        let assembled = assemble(
            &state,
            asm,
            echo.clone(),
            &mut rx,
            &mut outcome,
            completion_tokens,
        )
        .await;
        match assembled {
            Ok(a) => {
                completion_tokens += a.completion_tokens;
                choices.push(a);
            }
            Err((e, tokens)) => {
                outcome.failed(&e, completion_tokens + tokens);
                return e.into_response();
            }
        }
    }
    let reason = choices.first().map_or("stop", |c| c.reason);
    outcome.finished(reason, completion_tokens);
    // As before the split: a whole response is stamped when it is complete.
    header.created = super::unix_now();
    let usage = usage(outcome.prompt_tokens, completion_tokens);
    let views: Vec<Choice<'_>> = choices
        .iter()
        .map(|c| Choice {
            answer: &c.parts,
            logprobs: wants_logprobs.then_some(c.logprobs.as_slice()),
            prompt_logprobs: c.prompt_logprobs.as_ref(),
            reason: c.reason,
        })
        .collect();
    Json(header.completion(&views, usage)).into_response()
}

/// One choice of a stream, carried from one event to the next.
struct ChoiceState {
    index: usize,
    /// Cleared once the choice is over (dropping it cancels the sequence: a stop string may
    /// end it early).
    rx: Option<UnboundedReceiver<Event>>,
    asm: Assembler,
    started: bool,
    tool_calls_sent: usize,
    /// The prompt's text, sent first (completions' `echo`).
    echo: Option<String>,
    /// Where the next token's text starts in the answer (completions' `text_offset`).
    text_offset: usize,
}

impl ChoiceState {
    /// A chunk of this choice; log-probabilities of tokens received so far ride on it.
    fn chunk(
        &mut self,
        header: &Header,
        wants_logprobs: bool,
        delta: serde_json::Value,
        reason: Option<&str>,
    ) -> SseEvent {
        let logprobs = std::mem::take(&mut self.asm.logprobs);
        let logprobs = wants_logprobs.then_some(logprobs.as_slice());
        let mut chunk = header.chunk(self.index, delta, logprobs, reason, self.text_offset);
        if let Some(p) = self.asm.prompt_logprobs.take() {
            chunk["choices"][0]["prompt_logprobs"] = p;
        }
        if let Some(entries) = logprobs {
            self.text_offset += entries.iter().map(|e| e.token.len()).sum::<usize>();
        }
        SseEvent::default().data(chunk.to_string())
    }

    /// One answer piece as a chunk's `delta`; tool calls are numbered in order.
    fn delta_chunk(&mut self, header: &Header, wants_logprobs: bool, delta: Delta) -> SseEvent {
        let delta = match delta {
            Delta::Content(t) => json!({"content": t}),
            Delta::Reasoning(t) => json!({"reasoning_content": t}),
            Delta::ToolCall(call) => {
                let index = self.tool_calls_sent;
                self.tool_calls_sent += 1;
                json!({"tool_calls": [tool_call_json(&call, Some(index))]})
            }
        };
        self.chunk(header, wants_logprobs, delta, None)
    }
}

/// The per-request state of a stream: its choices, interleaved as their tokens come.
struct StreamState {
    state: Arc<AppState>,
    choices: Vec<ChoiceState>,
    header: Header,
    include_usage: bool,
    outcome: Outcome,
    wants_logprobs: bool,
    /// The first choice's finish reason, for the request's log line.
    reason: Option<&'static str>,
    _in_flight: InFlight,
}

impl StreamState {
    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.asm.completion_tokens).sum()
    }

    /// The events for choice `i`'s next scheduler event; when the last choice ends, the usage
    /// chunk (if asked for) and `[DONE]`.
    fn next_events(&mut self, i: usize, event: Option<Event>) -> Vec<SseEvent> {
        let (header, wants) = (&self.header, self.wants_logprobs);
        let choice = &mut self.choices[i];
        let mut out = Vec::new();
        // The prompt's log-probabilities ride on the choice's first chunk (with the echo).
        let prompt_piece = matches!(event, Some(Event::PromptLogprobs(_))).then(|| {
            choice
                .asm
                .on_event(&self.state.tokenizer, &self.state.scheduler, event.clone())
        });
        if !choice.started && header.kind == super::types::Kind::Chat {
            out.push(choice.chunk(
                header,
                wants,
                json!({"role": "assistant", "content": ""}),
                None,
            ));
        }
        if let Some(echo) = choice.echo.take() {
            out.push(choice.chunk(header, wants, json!({ "content": echo }), None));
        }
        choice.started = true;
        let piece = match prompt_piece {
            Some(piece) => {
                if out.is_empty() {
                    out.push(choice.chunk(header, wants, json!({"content": ""}), None));
                }
                piece
            }
            None => choice
                .asm
                .on_event(&self.state.tokenizer, &self.state.scheduler, event),
        };
        match piece {
            Piece::Deltas(deltas) => {
                for d in deltas {
                    out.push(choice.delta_chunk(header, wants, d));
                }
            }
            Piece::Done { deltas, reason } => {
                for d in deltas {
                    out.push(choice.delta_chunk(header, wants, d));
                }
                out.push(choice.chunk(header, wants, json!({}), Some(reason)));
                choice.rx = None;
                if i == 0 {
                    self.reason = Some(reason);
                }
                if self.choices.iter().all(|c| c.rx.is_none()) {
                    let tokens = self.completion_tokens();
                    if self.include_usage {
                        let chunk = self.header.usage_chunk(self.outcome.prompt_tokens, tokens);
                        out.push(SseEvent::default().data(chunk.to_string()));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    self.outcome.finished(self.reason.unwrap_or("stop"), tokens);
                }
            }
            Piece::Failed(e) => {
                out.push(SseEvent::default().data(e.body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
                self.outcome.failed(&e, self.completion_tokens());
                // One choice failing ends the request: the others are cancelled.
                self.choices.iter_mut().for_each(|c| c.rx = None);
            }
        }
        // Kept current so a cancellation is logged with what was sent.
        let tokens = self.completion_tokens();
        self.outcome.tokens(tokens);
        out
    }
}

pub(super) fn stream_response(
    state: Arc<AppState>,
    answer: Answer,
    receivers: Vec<UnboundedReceiver<Event>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let choices = receivers
        .into_iter()
        .enumerate()
        .map(|(index, rx)| ChoiceState {
            index,
            rx: Some(rx),
            asm: Assembler::new(answer.stop.clone(), answer.format, answer.prompt_logprobs),
            started: false,
            tool_calls_sent: 0,
            echo: answer.echo.clone(),
            text_offset: 0,
        })
        .collect();
    let st = StreamState {
        state,
        choices,
        header: answer.header,
        include_usage: answer.include_usage,
        outcome: answer.outcome,
        wants_logprobs: answer.logprobs,
        reason: None,
        _in_flight: answer.in_flight,
    };
    let cancelled = st.state.shutdown.cancelled();
    let events = futures::stream::unfold((st, Box::pin(cancelled)), |(mut st, mut cancelled)| async move {
        // The next event of whichever choice has one first; at the end of a shutdown's grace,
        // an error ends the stream.
        let (event, i) = {
            let open = st.choices.iter().find(|c| c.rx.is_some()).map_or(0, |c| c.index);
            let waiting = st.choices.iter_mut().filter_map(|c| {
                let index = c.index;
                c.rx.as_mut()
                    .map(|rx| Box::pin(async move { (rx.recv().await, index) }))
            });
            let waiting: Vec<_> = waiting.collect();
            if waiting.is_empty() {
                return None;
            }
            tokio::select! {
                (ready, _, _) = futures::future::select_all(waiting) => ready,
                () = &mut cancelled => (Some(Event::Error(GenerationError::ShuttingDown)), open),
            }
        };
        let out = st.next_events(i, event);
        Some((futures::stream::iter(out.into_iter().map(Ok)), (st, cancelled)))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::default())
}
