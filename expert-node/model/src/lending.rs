//! Which of an expert node's answer buffers are lent to which coordinator (CUDA IPC answers,
//! `ForwardRequest.ipc_client`): the bookkeeping only, generic over the buffer so that it is
//! tested without a GPU (`ops::cuda::ipc` holds the device memory).
//!
//! A buffer is lent for one request's answer and stays lent until the same client sends a
//! request whose `ipc_keep_from` passes that request's id — the client's promise that it has
//! copied the answer out (or gave up on it). Ids are the client's own request ids, which only
//! grow. Each client gets at most `per_client` buffers; when all are lent the answer
//! travels as bytes. Clients that stop calling (a coordinator that went away) are forgotten,
//! least recently used first, once more than `max_clients` call — but never one with a buffer
//! lent that called within [`IDLE`]: a new client gets bytes instead.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// This host's identity for CUDA IPC: the kernel's boot id, the same for every process and
/// container on the host; "" where it cannot be read (then nothing is lent or asked for).
pub fn host_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// What a request asks of the node's answer (`ForwardRequest.ipc_*`).
pub struct IpcAsk<'a> {
    pub client: u64,
    pub host: &'a str,
    pub keep_from: u64,
    pub request: u64,
}

/// One buffer of a client, and for whose answer it is lent.
struct Slot<B> {
    buffer: B,
    bytes: usize,
    generation: u64,
    lent_for: Option<u64>,
}

struct Client<B> {
    id: u64,
    last_used: Instant,
    slots: Vec<Slot<B>>,
}

impl<B> Client<B> {
    /// Whether its buffers may be freed: none is lent, or it has not called for [`IDLE`] (a
    /// coordinator copies an answer out within milliseconds of it arriving).
    fn forgettable(&self, now: Instant) -> bool {
        self.slots.iter().all(|s| s.lent_for.is_none())
            || now.saturating_duration_since(self.last_used) >= IDLE
    }
}

/// How long a client with lent buffers must have been silent before a new one may take its
/// place.
pub const IDLE: Duration = Duration::from_secs(30);

/// A buffer lent for one answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Lent<'a, B> {
    pub buffer: &'a B,
    pub slot: u32,
    /// Unique per allocation on this node: the client maps memory by (slot, generation).
    pub generation: u64,
}

pub struct Lending<B> {
    clients: Vec<Client<B>>,
    max_clients: usize,
    per_client: usize,
    next_generation: u64,
}

impl<B> Lending<B> {
    /// `first_generation`: the generation of the first buffer; a node makes it random, so that
    /// a client never takes a restarted node's buffer for one it has mapped.
    pub fn new(max_clients: usize, per_client: usize, first_generation: u64) -> Self {
        Self {
            clients: Vec::new(),
            max_clients: max_clients.max(1),
            per_client: per_client.max(1),
            next_generation: first_generation,
        }
    }

    /// Takes back the buffers of `client` lent for its requests before `keep_from` (every
    /// request of a client says this, whether or not it asks for a buffer).
    pub fn release(&mut self, client: u64, keep_from: u64, now: Instant) {
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == client) {
            c.last_used = now;
            for s in &mut c.slots {
                if s.lent_for.is_some_and(|r| r < keep_from) {
                    s.lent_for = None;
                }
            }
        }
    }

    /// Lends `client` a buffer of at least `bytes` for `request`'s answer: a free one that fits
    /// (the smallest), else a new one from `alloc` (replacing a free one too small, or while the
    /// client has fewer than `per_client`). A new client past `max_clients` takes the place of
    /// the least recently used one that can be forgotten. `Ok(None)`: nothing can be lent (every
    /// buffer of the client is lent, or no client can be forgotten).
    pub fn lend<E>(
        &mut self,
        client: u64,
        request: u64,
        bytes: usize,
        now: Instant,
        alloc: impl FnOnce(usize) -> Result<B, E>,
    ) -> Result<Option<Lent<'_, B>>, E> {
        let at = match self.clients.iter().position(|c| c.id == client) {
            Some(at) => at,
            None => {
                if self.clients.len() >= self.max_clients {
                    let oldest = (0..self.clients.len())
                        .filter(|&i| self.clients[i].forgettable(now))
                        .min_by_key(|&i| self.clients[i].last_used);
                    let Some(oldest) = oldest else {
                        return Ok(None);
                    };
                    let gone = self.clients.swap_remove(oldest);
                    tracing::info!(
                        client = gone.id,
                        buffers = gone.slots.len(),
                        "forgetting the least recently used client's answer buffers"
                    );
                }
                self.clients.push(Client {
                    id: client,
                    last_used: now,
                    slots: Vec::new(),
                });
                self.clients.len() - 1
            }
        };
        let c = &mut self.clients[at];
        c.last_used = now;
        let fitting = (0..c.slots.len())
            .filter(|&i| c.slots[i].lent_for.is_none() && c.slots[i].bytes >= bytes)
            .min_by_key(|&i| c.slots[i].bytes);
        let slot = match fitting {
            Some(i) => i,
            None => {
                let free = c.slots.iter().position(|s| s.lent_for.is_none());
                if free.is_none() && c.slots.len() >= self.per_client {
                    return Ok(None);
                }
                let fresh = Slot {
                    buffer: alloc(bytes)?,
                    bytes,
                    generation: self.next_generation,
                    lent_for: None,
                };
                self.next_generation = self.next_generation.wrapping_add(1);
                match free {
                    Some(i) => {
                        c.slots[i] = fresh;
                        i
                    }
                    None => {
                        c.slots.push(fresh);
                        c.slots.len() - 1
                    }
                }
            }
        };
        let s = &mut c.slots[slot];
        s.lent_for = Some(request);
        Ok(Some(Lent {
            buffer: &s.buffer,
            slot: slot as u32,
            generation: s.generation,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::{Duration, Instant};

    use super::{IDLE, Lending};

    fn alloc(bytes: usize) -> Result<Vec<u8>, Infallible> {
        Ok(vec![0; bytes])
    }

    /// Releases below `keep_from`, then lends: (slot, generation, buffer size), `None` when
    /// nothing can be lent.
    fn lend_at(
        l: &mut Lending<Vec<u8>>,
        now: Instant,
        client: u64,
        keep_from: u64,
        request: u64,
        bytes: usize,
    ) -> Option<(u32, u64, usize)> {
        l.release(client, keep_from, now);
        l.lend(client, request, bytes, now, alloc)
            .unwrap()
            .map(|g| (g.slot, g.generation, g.buffer.len()))
    }

    fn lend(
        l: &mut Lending<Vec<u8>>,
        client: u64,
        keep_from: u64,
        request: u64,
        bytes: usize,
    ) -> Option<(u32, u64, usize)> {
        lend_at(l, Instant::now(), client, keep_from, request, bytes)
    }

    #[test]
    fn buffers_come_back_when_keep_from_passes_their_request() {
        let mut l = Lending::new(4, 2, 1);
        assert_eq!(lend(&mut l, 7, 0, 0, 100), Some((0, 1, 100)));
        assert_eq!(lend(&mut l, 7, 0, 1, 100), Some((1, 2, 100)));
        // Both lent, no third buffer for this client.
        assert_eq!(lend(&mut l, 7, 0, 2, 100), None);
        // Request 0 is done: its buffer is reused as it is (same generation).
        assert_eq!(lend(&mut l, 7, 1, 3, 80), Some((0, 1, 100)));
        // 1 and 3 still lent until keep_from passes them.
        assert_eq!(lend(&mut l, 7, 1, 4, 80), None);
        // A request that asks for nothing still gives buffers back.
        l.release(7, 4, Instant::now());
        assert_eq!(lend(&mut l, 7, 0, 5, 80), Some((0, 1, 100)));
        assert_eq!(lend(&mut l, 7, 0, 6, 80), Some((1, 2, 100)));
    }

    #[test]
    fn a_free_buffer_too_small_is_replaced_by_new_memory() {
        let mut l = Lending::new(4, 1, 1);
        assert_eq!(lend(&mut l, 1, 0, 0, 10), Some((0, 1, 10)));
        // Same slot, a new generation: the client must map it afresh.
        assert_eq!(lend(&mut l, 1, 1, 1, 20), Some((0, 2, 20)));
        // A smaller answer fits the larger buffer.
        assert_eq!(lend(&mut l, 1, 2, 2, 5), Some((0, 2, 20)));
    }

    #[test]
    fn a_client_with_buffers_lent_is_forgotten_only_when_idle() {
        let t0 = Instant::now();
        let mut l = Lending::new(2, 1, 1);
        assert_eq!(lend_at(&mut l, t0, 1, 0, 0, 10), Some((0, 1, 10)));
        assert_eq!(lend_at(&mut l, t0, 2, 0, 0, 10), Some((0, 2, 10)));
        // Client 1's keep_from says nothing about client 2's buffer.
        assert_eq!(lend_at(&mut l, t0, 2, 0, 1, 10), None);
        // Both clients have a buffer lent and called just now: a third gets none (bytes).
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(lend_at(&mut l, soon, 3, 0, 0, 10), None);
        // Client 2 gives its buffer back: it can be forgotten, client 1 still cannot.
        l.release(2, 1, soon);
        assert_eq!(lend_at(&mut l, soon, 3, 0, 0, 10), Some((0, 3, 10)));
        assert_eq!(l.clients.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 3]);
        // Client 1 silent past IDLE: a fourth client takes its place although it lent.
        let later = t0 + IDLE;
        l.release(3, 1, later);
        assert_eq!(lend_at(&mut l, later, 4, 0, 0, 10), Some((0, 4, 10)));
        assert_eq!(l.clients.iter().map(|c| c.id).collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn an_allocation_failure_lends_nothing() {
        let mut l: Lending<Vec<u8>> = Lending::new(1, 2, 1);
        let failed = l.lend(1, 0, 10, Instant::now(), |_| Err("out of memory"));
        assert_eq!(failed.err(), Some("out of memory"));
        assert_eq!(lend(&mut l, 1, 0, 1, 10), Some((0, 1, 10)));
    }
}
