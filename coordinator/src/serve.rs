//! Starting the OpenAI-compatible server, in one place for the `coordinator serve` command, the
//! benchmarks and the tests: settings checked once, the tokenizer loaded, the scheduler thread
//! started ([`start`]), then the router served on a listener until a shutdown signal, with the
//! placement file re-read on SIGHUP when the experts are remote ([`Service::serve`]).
//! [`launch`] does all of it for the binary.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use omnishard_proto::ModelConfig;
use omnishard_proto::placement::Placement;
use tokio::net::TcpListener;

use crate::chat::{ChatPrompter, ChatTemplate, ReasoningParser, TemplateError, ToolCallParser};
use crate::engine::Engine;
use crate::grammar::Grammars;
use crate::kv_budget;
use crate::metrics::Metrics;
use crate::remote::RemoteExperts;
use crate::scheduler::{self, SchedulerConfig};
use crate::server::loading::{Progress, Staged};
use crate::server::{self, AppState, ServeConfig};
use crate::tokenizer::{TextTokenizer, TokenizerError};

/// Context length when neither `--max-context` nor the model's `max_position_embeddings` says.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// How to serve a loaded model.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// The checkpoint directory: its `tokenizer.json`, its name (the default model id) and its
    /// config (read again on each placement reload).
    pub model_dir: PathBuf,
    /// Model id reported by /v1/models and accepted in requests (default: the directory's name).
    pub served_model_name: Option<String>,
    /// Bearer token required on `/v1/*` and `/admin/*`.
    pub api_key: Option<String>,
    /// Prompt plus generated tokens per sequence (default: the model's max_position_embeddings,
    /// else [`DEFAULT_MAX_CONTEXT`]).
    pub max_context: Option<usize>,
    /// Special tokens written in prompts and messages act as control tokens (trusted callers
    /// that render their own templates); otherwise they are plain text.
    pub special_tokens_in_text: bool,
    /// Chat template file overriding the checkpoint's.
    pub chat_template: Option<PathBuf>,
    pub reasoning_parser: ReasoningParser,
    pub tool_call_parser: ToolCallParser,
    /// How long an HTTP/1 connection may take to send a request head, idle keep-alive waits
    /// included, before it is closed.
    pub idle_timeout: Duration,
    pub scheduler: SchedulerConfig,
    /// Placement file re-read on SIGHUP (only with remote experts).
    pub placement: Option<PathBuf>,
    /// How much media one prompt may carry.
    pub media: crate::server::media::MediaLimits,
    /// Largest request body read (a larger one is a 413, refused by its declared length; see
    /// `server::intake`).
    pub max_request_bytes: usize,
    /// Nice value added to the HTTP front end's threads (see [`server::priority`]).
    pub frontend_nice: i32,
    /// On SIGTERM or Ctrl-C, how long requests in flight may take to finish (new ones get 503)
    /// before they are ended with an error.
    pub shutdown_grace: Duration,
}

impl ServeSettings {
    /// `coordinator serve`'s defaults for the checkpoint in `model_dir`, with a 1 GiB KV cache
    /// budget (embedders and tests; the CLI sizes it from the machine).
    pub fn new(model_dir: PathBuf) -> Self {
        Self {
            model_dir,
            served_model_name: None,
            api_key: None,
            max_context: None,
            special_tokens_in_text: false,
            chat_template: None,
            reasoning_parser: ReasoningParser::default(),
            tool_call_parser: ToolCallParser::default(),
            idle_timeout: omnishard_proto::defaults::HTTP_IDLE_TIMEOUT,
            scheduler: SchedulerConfig {
                max_active: 64,
                max_batched_tokens: 512,
                queue_size: 256,
                // Bounded, so the prefix cache is: it keeps what the budget has room for.
                kv_cache_bytes: 1 << 30,
                prefix_caching: true,
            },
            placement: None,
            media: Default::default(),
            max_request_bytes: crate::server::intake::DEFAULT_MAX_REQUEST_BYTES,
            frontend_nice: crate::server::priority::DEFAULT_FRONTEND_NICE,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--max-context {max_context} exceeds the model's max_position_embeddings {model_max}")]
    ContextBeyondModel {
        max_context: usize,
        model_max: usize,
    },
    #[error(
        "the KV cache budget holds {capacity} tokens, fewer than one sequence of --max-context {max_context} needs: give --kv-cache-memory at least {needed_bytes} bytes, or a smaller --max-context"
    )]
    KvBudgetTooSmall {
        capacity: usize,
        max_context: usize,
        needed_bytes: usize,
    },
    #[error("--max-active-seqs, --max-batched-tokens and --queue-size must be at least 1")]
    ZeroLimit,
    #[error(
        "--max-batched-tokens ({max_batched_tokens}) must be at least --max-active-seqs ({max_active}): every running sequence needs one token per pass"
    )]
    BatchBelowActive {
        max_batched_tokens: usize,
        max_active: usize,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] TemplateError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("cannot load the model: {0}")]
    Load(String),
}

/// A server ready to accept connections: settings checked, scheduler running.
pub struct Service {
    state: Arc<AppState>,
    placement: Option<PathBuf>,
    model_dir: PathBuf,
    idle_timeout: Duration,
    shutdown_grace: Duration,
}

/// Checks `settings` against the model, loads the tokenizer and starts the scheduler thread.
/// Blocking (the tokenizer is read from disk): call it before entering the async runtime.
pub fn start(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    settings: ServeSettings,
) -> Result<Service, ServeError> {
    let ServeSettings {
        model_dir,
        served_model_name,
        api_key,
        max_context,
        special_tokens_in_text,
        chat_template,
        reasoning_parser,
        tool_call_parser,
        idle_timeout,
        scheduler: sched,
        placement,
        media,
        max_request_bytes,
        frontend_nice: _,
        shutdown_grace,
    } = settings;
    let model_max = engine.config().max_position_embeddings;
    let max_context = max_context.or(model_max).unwrap_or(DEFAULT_MAX_CONTEXT);
    if let Some(model_max) = model_max
        && max_context > model_max
    {
        return Err(ServeError::ContextBeyondModel {
            max_context,
            model_max,
        });
    }
    if sched.max_active == 0 || sched.max_batched_tokens == 0 || sched.queue_size == 0 {
        return Err(ServeError::ZeroLimit);
    }
    let bytes_per_token =
        kv_budget::bytes_per_token(engine.config(), engine.model().dtype().size_in_bytes());
    let capacity = sched.kv_cache_bytes / bytes_per_token.max(1);
    if capacity < max_context {
        return Err(ServeError::KvBudgetTooSmall {
            capacity,
            max_context,
            needed_bytes: max_context.saturating_mul(bytes_per_token),
        });
    }
    metrics
        .kv_cache_capacity_tokens
        .set(capacity.min(i64::MAX as usize) as i64);
    if sched.max_batched_tokens < sched.max_active {
        return Err(ServeError::BatchBelowActive {
            max_batched_tokens: sched.max_batched_tokens,
            max_active: sched.max_active,
        });
    }
    let tokenizer = Arc::new(TextTokenizer::load(&model_dir, engine.config())?);
    let template = ChatTemplate::load(&model_dir, chat_template.as_deref())?;
    let chat = ChatPrompter::new(template, &tokenizer, reasoning_parser, tool_call_parser);
    tracing::info!(
        chat_template = %chat.template().origin(),
        reasoning_parser = chat.parses_reasoning(),
        tool_call_parser = chat.parses_tool_calls(),
        "chat template loaded"
    );
    let chat = Arc::new(chat);
    let grammars = Grammars::load(
        tokenizer.clone(),
        engine.config().vocab_size,
        tokenizer.stop_tokens(),
    )
    .map_err(|e| {
        tracing::warn!(error = %e, "constrained decoding (structured output, forced tool calls) is unavailable; such requests will be refused");
        e.to_string()
    });
    let model_name = served_model_name.unwrap_or_else(|| default_model_name(&model_dir));
    let sched_max_active = sched.max_active;
    let scheduler = scheduler::start(engine.clone(), sched, metrics.clone());
    let state = Arc::new(AppState::new(
        engine,
        tokenizer,
        chat,
        grammars,
        scheduler,
        metrics,
        ServeConfig {
            model_name,
            api_key,
            max_context,
            special_tokens_in_text,
            kv_capacity: capacity,
            max_sequences: sched_max_active,
            media,
            max_request_bytes,
            // A body must follow its head as promptly as the head itself had to arrive.
            body_deadline: idle_timeout,
        },
    ));
    Ok(Service {
        state,
        placement,
        model_dir,
        idle_timeout,
        shutdown_grace,
    })
}

/// The model directory's own name (after resolving `.` and links), else "omnishard".
pub fn default_model_name(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "omnishard".into())
}

impl Service {
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    pub fn model_name(&self) -> &str {
        &self.state.config.model_name
    }

    /// With remote experts and a placement file: the task that re-reads the file on SIGHUP.
    fn reload_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        let remote = self.state.engine.remote().cloned()?;
        let path = self.placement.clone()?;
        Some(tokio::spawn(reload_on_sighup(
            remote,
            path,
            self.model_dir.clone(),
        )))
    }

    /// One line on what is served: model, layers, experts and where they run, dtype, device,
    /// context, chat template.
    pub fn summary(&self, addr: SocketAddr) -> String {
        let state = &self.state;
        let cfg = state.engine.config();
        let experts = match state.engine.remote() {
            Some(remote) => format!("on {} expert nodes", remote.status().len()),
            None => "in process".to_string(),
        };
        let model = state.engine.model();
        format!(
            "serving model `{}` on http://{addr} (OpenAI API under /v1): {} layers, {} experts per layer {experts}, {:?} on {:?}, context {} tokens, KV cache budget {} tokens, chat template {}",
            state.config.model_name,
            cfg.num_hidden_layers,
            cfg.num_experts,
            model.dtype(),
            model.device().location(),
            state.config.max_context,
            state.metrics.kv_cache_capacity_tokens.get(),
            state.chat.template().origin(),
        )
    }

    /// Serves the API on `listener` until `shutdown` completes, then drains: new requests get
    /// 503, those in flight get the shutdown grace to finish. With remote experts and a
    /// placement file, SIGHUP re-reads the file meanwhile.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let reload = self.reload_task();
        let draining = self.state.shutdown.clone();
        let grace = self.shutdown_grace;
        let served = accept(
            listener,
            server::router(self.state),
            self.idle_timeout,
            async move {
                shutdown.await;
                draining.drain(grace).await;
            },
        )
        .await;
        if let Some(task) = reload {
            task.abort();
        }
        served
    }
}

/// Serves `router` on every connection `listener` accepts until `shutdown`, then waits for the
/// open connections to finish their requests. Connections that send nothing, or (HTTP/1) do not
/// complete a request head, within `idle_timeout` (a slow or stalled client, or a keep-alive
/// connection left idle) are closed: axum's own `serve` sets no timer, and unfinished
/// connections stayed open forever.
async fn accept(
    listener: TcpListener,
    router: axum::Router,
    idle_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: pause rather than spin, keep serving.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        // Streamed tokens are small writes: without this, Nagle's algorithm holds each one back
        // until the client acknowledges the last (~40 ms with delayed ACKs).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // The protocol detection waits for a first byte with no timer of its own: a
            // connection that never sends one is dropped here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(idle_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// `coordinator serve`: binds `listen` first (a port in use fails at once), answers 503 with
/// the loading stage while `load` builds the engine, then serves until SIGTERM or Ctrl-C, and
/// drains (see [`server::shutdown`]); a second signal exits at once. Prints
/// `listening on http://ADDR` on stdout once ready (what scripts and tests wait for), and one
/// summary line on stderr.
pub fn launch<F>(
    load: F,
    metrics: Arc<Metrics>,
    settings: ServeSettings,
    listen: SocketAddr,
) -> Result<(), ServeError>
where
    F: FnOnce(&Progress) -> Result<Arc<Engine>, String> + Send + 'static,
{
    // Two workers are plenty: the model runs on the scheduler thread, not here.
    // The front end's threads run at the launching thread's nice value plus this.
    let nice = server::priority::current_nice().saturating_add(settings.frontend_nice);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || server::priority::set_current_thread_nice(nice))
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(async move {
        let bind_error = |source| ServeError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        eprintln!(
            "bound http://{addr}; loading the model (GET /health answers 503 with the progress until it is ready)"
        );
        let staged = Staged::default();
        let stop = Arc::new(tokio::sync::Notify::new());
        let idle_timeout = settings.idle_timeout;
        let grace = settings.shutdown_grace;
        let server = tokio::spawn(accept(listener, staged.router(), idle_timeout, {
            let stop = stop.clone();
            async move { stop.notified().await }
        }));
        let progress = staged.progress().clone();
        let spinner = progress.spinner();
        // On a thread of its own, not the (lowered) blocking pool: the scheduler thread, the
        // compute pool and the expert-call runtime started from it keep the normal priority.
        let (loaded_tx, loading) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                rayon::current_num_threads();
                let loaded = load(&progress).map_err(ServeError::Load).and_then(|engine| {
                    progress.stage("starting the scheduler");
                    start(engine, metrics, settings)
                });
                let _ = loaded_tx.send(loaded);
            })
            .map_err(|e| ServeError::Load(format!("cannot start the loader thread: {e}")))?;
        let service = tokio::select! {
            loaded = loading => loaded.map_err(|e| ServeError::Load(e.to_string()))?,
            () = stop_signal() => {
                // The loader cannot be interrupted: exit without waiting for it.
                eprintln!("interrupted while loading the model");
                std::process::exit(130);
            }
        };
        let service = match service {
            Ok(s) => s,
            Err(e) => {
                stop.notify_one();
                return Err(e);
            }
        };
        drop(spinner);
        let reload = service.reload_task();
        staged.ready(server::router(service.state.clone()));
        println!("listening on http://{addr}");
        eprintln!("{}", service.summary(addr));
        stop_signal().await;
        let shutdown = service.state.shutdown.clone();
        eprintln!(
            "shutting down: new requests get 503; waiting up to {} s for {} in flight (a second signal exits now)",
            grace.as_secs(),
            shutdown.in_flight()
        );
        tokio::select! {
            cut = shutdown.drain(grace) => {
                if cut > 0 {
                    tracing::warn!(requests = cut, "shutdown grace over: requests still running were ended with an error");
                }
            }
            () = stop_signal() => {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            }
        }
        stop.notify_one();
        if let Some(task) = reload {
            task.abort();
        }
        server
            .await
            .map_err(|e| ServeError::Http(std::io::Error::other(e)))?
    })
}

/// Resolves on Ctrl-C or (Unix) SIGTERM, the signal orchestrators stop processes with.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// On SIGHUP, re-reads the placement file: nodes new to it join, nodes gone from it retire.
async fn reload_on_sighup(remote: Arc<RemoteExperts>, path: PathBuf, model: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; placement reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            let addresses = ModelConfig::from_model_dir(&model)
                .map_err(|e| e.to_string())
                .and_then(|cfg| Placement::from_file(&path, &cfg).map_err(|e| e.to_string()))
                .map(|p| p.nodes.into_iter().map(|n| n.address).collect::<Vec<_>>());
            match addresses {
                Ok(addresses) => {
                    let remote = remote.clone();
                    let failures =
                        tokio::task::spawn_blocking(move || remote.sync_addresses(&addresses))
                            .await;
                    match failures {
                        Ok(f) if f.is_empty() => {
                            tracing::info!(path = %path.display(), "placement reloaded")
                        }
                        Ok(f) => {
                            tracing::warn!(?f, "placement reloaded; some nodes could not join")
                        }
                        Err(e) => tracing::error!(error = %e, "placement reload failed"),
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "placement reload failed; keeping the current nodes")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (remote, path, model);
}
