//! Graceful shutdown of the API (as Kubernetes expects of a pod on SIGTERM): new generation
//! requests get 503 with `Retry-After` and `/health` fails, so a load balancer moves traffic
//! elsewhere; requests in flight run to their end within the grace; whatever is left then ends
//! with a clear error (a stream's last event) instead of a cut connection.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::error::GenerationError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// New requests refused; those in flight go on.
    Draining,
    /// The grace is over: requests still in flight end now.
    Cancelling,
}

/// The server's shutdown state and its count of generation requests in flight.
#[derive(Debug)]
pub struct Shutdown {
    phase: watch::Sender<Phase>,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

/// A generation request in flight: counted until dropped (with its response, or its stream).
#[derive(Debug)]
pub struct InFlight(Arc<Shutdown>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Shutdown {
    /// Admits a generation request, unless shutdown has begun.
    pub fn admit(self: &Arc<Self>) -> Result<InFlight, GenerationError> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.clone());
        if self.stopping() {
            return Err(GenerationError::ShuttingDown);
        }
        Ok(guard)
    }

    /// Shutdown has begun: new requests are refused and `/health` fails.
    pub fn stopping(&self) -> bool {
        *self.phase.borrow() != Phase::Serving
    }

    /// Resolves when requests in flight must end (the grace is over).
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut phase = self.phase.subscribe();
        async move {
            let _ = phase.wait_for(|p| *p == Phase::Cancelling).await;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Refuses new requests, waits up to `grace` for those in flight, then ends the rest and
    /// waits (briefly) for them to send their last event. Returns how many were cut short.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.phase.send_replace(Phase::Draining);
        let finished = tokio::time::timeout(grace, self.idle()).await.is_ok();
        if finished {
            return 0;
        }
        let cut = self.in_flight();
        self.phase.send_replace(Phase::Cancelling);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.idle()).await;
        cut
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_then_cancels_what_is_left() {
        let s = Arc::new(Shutdown::default());
        let quick = s.admit().expect("serving");
        let slow = s.admit().expect("serving");
        let cancelled = s.cancelled();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(quick);
        });
        let waiter = tokio::spawn(async move {
            cancelled.await;
            drop(slow);
        });
        let cut = s.drain(Duration::from_millis(100)).await;
        assert_eq!(cut, 1);
        waiter.await.expect("joined");
        assert_eq!(s.in_flight(), 0);
        assert!(matches!(s.admit(), Err(GenerationError::ShuttingDown)));
        assert_eq!(s.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_idle_server_drains_at_once() {
        let s = Arc::new(Shutdown::default());
        assert_eq!(s.drain(Duration::from_secs(60)).await, 0);
        assert!(s.stopping());
    }
}
