//! Request intake: how much of a body the server reads, how many bodies it holds and parses at
//! once, and in what time, so that oversized and abusive requests are refused cheaply and
//! cannot take the memory or the CPU that generation needs.
//!
//! A body over `--max-request-bytes` is refused by its `Content-Length` before a byte of it is
//! kept (or as soon as a chunked one passes the limit); up to 16 times the limit, the rest is
//! read and discarded first, so the client sees the 413 rather than a reset connection. Bodies
//! being read share a memory budget of [`BUFFERED_BODIES`] full-size bodies (a request waits for
//! room, it is not refused), and must arrive within the read deadline. Parsing and tokenizing run on the blocking pool, at
//! most half the machine's cores at a time, so that a flood of requests queues instead of
//! starving the scheduler thread. Before the request is deserialized, [`super::shape`] checks its
//! JSON's shape in one allocation-free pass.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{AppState, GenerationError};

/// Full-size bodies the server holds in memory at once while reading them.
pub const BUFFERED_BODIES: usize = 16;

/// Default `--max-request-bytes`: as much as the API needs for a long prompt or a few media
/// items sent inline.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 2 << 20;

/// A refused body up to this many times the limit is read and discarded before the 413 (see
/// [`Intake::drain`]); a larger one is refused unread and its connection closed.
const DRAINED_BODIES: usize = 16;

/// What a body of undeclared length starts with (it grows as it arrives).
const UNDECLARED_CAPACITY: usize = 8 << 10;

/// Budget permits are KiB, so that a budget of gigabytes fits a semaphore's `u32` requests.
const PERMIT_BYTES: usize = 1024;

/// The server's limits on reading and parsing request bodies.
#[derive(Debug)]
pub struct Intake {
    max_body: usize,
    read_deadline: Duration,
    buffered: Arc<Semaphore>,
    parsing: Arc<Semaphore>,
    parsers: usize,
}

impl Intake {
    /// `max_body` bytes per request, read within `read_deadline`; parsing on at most half of
    /// the cores.
    pub fn new(max_body: usize, read_deadline: Duration) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parsers = (cores / 2).max(1);
        Self {
            max_body,
            read_deadline,
            buffered: Arc::new(Semaphore::new(
                permits_for(max_body).saturating_mul(BUFFERED_BODIES),
            )),
            parsing: Arc::new(Semaphore::new(parsers)),
            parsers,
        }
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Bodies parsed at once.
    pub fn parsers(&self) -> usize {
        self.parsers
    }

    /// Reads `body` whole, refusing it by its declared length before reading when that is
    /// over the limit, and otherwise as soon as it passes the limit or the deadline.
    /// `expects_continue`: the client waits for `100 Continue` before sending (`Expect:
    /// 100-continue`), so a refused body is not drained (reading it would invite it).
    pub async fn read(
        &self,
        declared: Option<usize>,
        expects_continue: bool,
        body: Body,
    ) -> Result<Admitted, GenerationError> {
        if let Some(len) = declared
            && len > self.max_body
        {
            if len <= self.drain_limit() && !expects_continue {
                self.drain(body.into_data_stream()).await;
            }
            return Err(self.too_large(&format!("{len} bytes")));
        }
        let expected = declared.unwrap_or(self.max_body);
        let permits = u32::try_from(permits_for(expected)).unwrap_or(u32::MAX);
        // Waiting for room is bounded like reading: a full budget is back-pressure.
        let room = tokio::time::timeout(
            self.read_deadline,
            self.buffered.clone().acquire_many_owned(permits),
        )
        .await
        .map_err(|_| GenerationError::QueueFull)?
        .map_err(|e| GenerationError::Internal(e.to_string()))?;
        let bytes = tokio::time::timeout(self.read_deadline, self.collect(body, declared))
            .await
            .map_err(|_| GenerationError::BodyTimeout(self.read_deadline.as_secs()))??;
        Ok(Admitted { bytes, _room: room })
    }

    async fn collect(&self, body: Body, declared: Option<usize>) -> Result<Bytes, GenerationError> {
        let mut stream = body.into_data_stream();
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(UNDECLARED_CAPACITY));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                GenerationError::InvalidRequest(format!("cannot read the request body: {e}"))
            })?;
            if buf.len() + chunk.len() > self.max_body {
                drop(buf);
                self.drain(stream).await;
                return Err(self.too_large("more"));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Bodies up to this size are read to their end, and discarded, before a 413.
    fn drain_limit(&self) -> usize {
        self.max_body.saturating_mul(DRAINED_BODIES)
    }

    /// Reads and discards what is left of a refused body, up to the drain limit and within the
    /// read deadline, holding none of it: a client still sending gets the 413, where closing
    /// the connection on unread data resets it and the client sees a broken pipe instead.
    async fn drain(&self, mut stream: BodyDataStream) {
        let limit = self.drain_limit();
        let discard = async {
            let mut seen = 0usize;
            while let Some(Ok(chunk)) = stream.next().await {
                seen = seen.saturating_add(chunk.len());
                if seen > limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(self.read_deadline, discard).await;
    }

    fn too_large(&self, size: &str) -> GenerationError {
        GenerationError::BodyTooLarge(format!(
            "it is {size}; this server takes at most {} bytes (--max-request-bytes)",
            self.max_body
        ))
    }

    /// Runs `parse` on the blocking pool once one of the parsing slots is free.
    pub async fn parse<T: Send + 'static>(
        &self,
        parse: impl FnOnce() -> Result<T, GenerationError> + Send + 'static,
    ) -> Result<T, GenerationError> {
        let slot = self
            .parsing
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| GenerationError::Internal(e.to_string()))?;
        // The slot goes with the work: a client that goes away does not free it early.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            parse()
        })
        .await
        .unwrap_or_else(|e| Err(GenerationError::Internal(e.to_string())))
    }
}

fn permits_for(bytes: usize) -> usize {
    bytes.div_ceil(PERMIT_BYTES).max(1)
}

/// A request body read within the intake's limits; its share of the memory budget is given
/// back when it is dropped.
pub struct Admitted {
    pub bytes: Bytes,
    _room: OwnedSemaphorePermit,
}

impl FromRequest<Arc<AppState>> for Admitted {
    type Rejection = Response;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        state
            .intake
            .read(declared, expects_continue, req.into_body())
            .await
            .map_err(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: Vec<&'static [u8]>) -> Body {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn bodies_are_refused_by_declared_and_by_actual_length() {
        let intake = Intake::new(8, Duration::from_secs(5));
        let read = intake
            .read(Some(4), false, body_of(vec![b"ab", b"cd"]))
            .await
            .map(|a| a.bytes);
        assert_eq!(read.ok().as_deref(), Some(&b"abcd"[..]));
        // Far over the limit: refused unread (the body would stall if it were polled).
        let never = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let started = std::time::Instant::now();
        let err = intake
            .read(Some(8 * DRAINED_BODIES + 1), false, never)
            .await
            .err();
        assert!(
            matches!(err, Some(GenerationError::BodyTooLarge(_))),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        // A little over: read to its end and discarded, then refused.
        let err = intake
            .read(Some(12), false, body_of(vec![b"abcdef", b"ghijkl"]))
            .await
            .err();
        assert!(
            matches!(err, Some(GenerationError::BodyTooLarge(_))),
            "{err:?}"
        );
        // No length given: refused once the limit is passed.
        let err = intake
            .read(None, false, body_of(vec![b"abcde", b"fghij"]))
            .await
            .err();
        assert!(
            matches!(err, Some(GenerationError::BodyTooLarge(_))),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_stalls_runs_into_the_deadline() {
        let intake = Intake::new(1024, Duration::from_millis(50));
        let stalled =
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let err = intake.read(Some(10), false, stalled).await.err();
        assert!(
            matches!(err, Some(GenerationError::BodyTimeout(_))),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bodies_wait_for_room_in_the_budget() {
        let intake = Intake::new(PERMIT_BYTES, Duration::from_secs(5));
        let mut held = Vec::new();
        for _ in 0..BUFFERED_BODIES {
            held.push(intake.read(None, false, body_of(vec![b"x"])).await.ok());
        }
        let waiting = intake.read(Some(1), false, body_of(vec![b"y"]));
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(early.is_err(), "a body was read beyond the budget");
        held.pop();
        let late = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(late, Ok(Ok(_))));
    }
}
