//! The HTTP listener is bound before the model loads (a port clash shows at once, not after
//! minutes of loading), and until the server is ready every request gets 503: `/health` with
//! the loading stage and how long it has taken (for probes and for people), anything else with
//! OpenAI's error shape and a `Retry-After`. Once ready, requests go to the real router.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tower::ServiceExt;

/// What start-up is doing, for `/health` while loading.
#[derive(Clone)]
pub struct Progress {
    started: Instant,
    stage: Arc<Mutex<String>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            stage: Arc::new(Mutex::new("starting".into())),
        }
    }
}

impl Progress {
    /// Records (and logs) the stage start-up has reached.
    pub fn stage(&self, stage: &str) {
        tracing::info!(stage, "loading");
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage.to_string();
    }

    fn describe(&self) -> (String, f64) {
        let stage = self.stage.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (stage, self.started.elapsed().as_secs_f64())
    }
}

impl Progress {
    /// Shows the stage and elapsed time on a spinner line while loading, when stderr is a
    /// terminal (logs and pipes get the stage lines and the summary only); cleared by the
    /// returned guard.
    pub fn spinner(&self) -> Option<Spinner> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} loading: {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let (progress, shown) = (self.clone(), bar.clone());
        let ticker = std::thread::spawn(move || {
            while !shown.is_finished() {
                shown.set_message(progress.describe().0);
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        Some(Spinner {
            bar,
            ticker: Some(ticker),
        })
    }
}

/// The loading spinner; cleared when dropped.
pub struct Spinner {
    bar: indicatif::ProgressBar,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// Answers with the loading page until [`Staged::ready`] hands it the real router.
#[derive(Clone, Default)]
pub struct Staged {
    ready: Arc<OnceLock<Router>>,
    progress: Progress,
}

impl Staged {
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// From now on, requests go to `router`.
    pub fn ready(&self, router: Router) {
        let _ = self.ready.set(router);
    }

    /// The router to serve from the start.
    pub fn router(&self) -> Router {
        let staged = self.clone();
        Router::new().fallback(move |req: Request| {
            let staged = staged.clone();
            async move {
                match staged.ready.get() {
                    Some(router) => match router.clone().oneshot(req).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    },
                    None => staged.loading(&req),
                }
            }
        })
    }

    fn loading(&self, req: &Request) -> Response {
        let (stage, seconds) = self.progress.describe();
        let body = if req.uri().path() == "/health" {
            json!({"status": "loading", "stage": stage, "seconds": seconds})
        } else {
            json!({"error": {
                "message": format!("the server is still loading the model ({stage}, {seconds:.0} s so far); retry shortly"),
                "type": "service_unavailable", "param": null, "code": "loading"}})
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            axum::Json(body),
        )
            .into_response()
    }
}
