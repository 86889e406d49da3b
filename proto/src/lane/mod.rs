//! A same-host lane between a coordinator and one expert node: the node's `ForwardRequest`s and
//! `ForwardResponse`s, encoded exactly as on the gRPC stream, passed through a few mailbox
//! slots in a shared-memory file instead of HTTP/2 on loopback.
//!
//! Why: at batch 1 a layer's call carries a few KiB, yet over gRPC it cost ~250 µs on the
//! device machines, almost all of it four sleeping threads being woken in turn (engine thread,
//! the two runtimes' I/O threads, the node's compute thread) — BENCHMARKS.md, issue 15. Here
//! the node's lane thread computes the request itself, and both sides spin briefly on the slot
//! before sleeping on a futex, so a call that is answered within the spin costs no wake-up at
//! all: the approach of vLLM's shared-memory broadcast queue and of MegaScale-Infer's
//! same-host path (Zhu et al. 2025, arXiv:2504.02263).
//!
//! The coordinator creates the file (`/dev/shm/omnishard-lane-*`, mode 0600) and hands its
//! path to the node over gRPC (`OpenLane`); the lane lives as long as that call's answer stream.
//! Each slot holds one request and its answer; a slot's `state` word goes FREE → POSTED
//! (coordinator, request written) → ANSWERED (node, answer written) → FREE (coordinator, answer
//! read). Both sides check every length against the slot's capacity: neither trusts the other's
//! bytes. Linux only (futexes on a shared mapping); elsewhere no lane opens and calls use gRPC.
//!
//! - `client.rs`: the coordinator's end (creating a lane, posting requests, taking answers).
//! - `server.rs`: the node's end (mapping a lane, answering what is posted).
//! - `futex.rs`: sleeping on and waking a word of the shared mapping.

mod client;
mod futex;
mod server;
#[cfg(all(test, target_os = "linux"))]
mod tests;

use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use client::{LaneClient, Posted};
pub use server::{LaneCloser, LaneServer};

/// Mailbox slots per lane: a call per micro-batch in flight, and spares for hedges.
pub const SLOTS: usize = 4;
/// Largest encoded request a slot takes: the hidden rows of 128 tokens of 2,048 in bf16 as
/// bytes (512 KiB; rows in GPU memory take a few bytes), with room to spare.
pub const REQUEST_CAPACITY: usize = 1 << 20;
/// Largest encoded answer a slot takes: one bf16 row of 2,048 per assignment at batch 32 as
/// bytes, with room for the message's framing (an answer in GPU memory is a handle).
pub const ANSWER_CAPACITY: usize = (1 << 20) + (64 << 10);
/// How a node's error begins when an answer came out larger than a slot: the coordinator then
/// sends the same request over gRPC.
pub const ANSWER_TOO_LARGE: &str = "the answer is too large for the shared-memory lane";

const MAGIC: u64 = u64::from_le_bytes(*b"OSLANE01");
const DIR: &str = "/dev/shm";
const PREFIX: &str = "omnishard-lane-";
const HEADER: usize = 4096;
// Header words, each on a cache line of its own.
const MAGIC_AT: usize = 0;
const SLOTS_AT: usize = 8;
const REQUEST_CAPACITY_AT: usize = 12;
const ANSWER_CAPACITY_AT: usize = 16;
const CLOSED_AT: usize = 64;
const DOORBELL_AT: usize = 128;
const ASLEEP_AT: usize = 192;
const CLAIMED_AT: usize = 256;
// A slot: its control line, then the request, then the answer.
const CONTROL: usize = 128;
const STATE_AT: usize = 0;
const REQUEST_LEN_AT: usize = 4;
const ANSWER_LEN_AT: usize = 8;
const WAITING_AT: usize = 64;
const STRIDE: usize = (CONTROL + REQUEST_CAPACITY + ANSWER_CAPACITY).next_multiple_of(4096);
const SIZE: usize = HEADER + SLOTS * STRIDE;

const FREE: u32 = 0;
const POSTED: u32 = 1;
const ANSWERED: u32 = 2;

/// Why a lane could not be made, opened or used.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("shared-memory lanes need Linux")]
    Unsupported,
    #[error("cannot create the shared-memory lane {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the shared-memory lane {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("the shared-memory lane was closed")]
    Closed,
    #[error("the node wrote an answer of {0} bytes, more than a lane slot holds")]
    Overlong(usize),
}

/// The mapped file and its words.
struct Mapping {
    map: memmap2::MmapRaw,
}

impl Mapping {
    /// Maps exactly the lane's size (whatever the file's length says by now).
    fn map(file: &File) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new().len(SIZE).map_raw(file)?;
        if map.len() != SIZE {
            return Err(std::io::Error::other(format!(
                "mapped {} bytes of a lane of {SIZE}",
                map.len()
            )));
        }
        Ok(Self { map })
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4) && at + 4 <= SIZE);
        // SAFETY: in bounds (SIZE is checked when mapping), 4-aligned in a page-aligned mapping
        // that lives as long as `self`; the other process only touches these words atomically.
        unsafe { &*(self.map.as_mut_ptr().add(at) as *const AtomicU32) }
    }

    fn read_u64(&self, at: usize) -> u64 {
        // SAFETY: in bounds and 8-aligned; written once, before the file is shared.
        unsafe { (*(self.map.as_mut_ptr().add(at) as *const AtomicU64)).load(Ordering::Acquire) }
    }

    fn slot(&self, slot: usize) -> usize {
        HEADER + slot * STRIDE
    }

    fn state(&self, slot: usize) -> &AtomicU32 {
        self.word(self.slot(slot) + STATE_AT)
    }

    /// Copies `len` bytes at `at` out (the other side cannot change them while we read: the slot
    /// is ours in its current state; a misbehaving peer can only garble its own call).
    fn read(&self, at: usize, len: usize) -> Vec<u8> {
        debug_assert!(at + len <= SIZE);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds; `out` is a fresh buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_mut_ptr().add(at), out.as_mut_ptr(), len)
        };
        out
    }

    fn write(&self, at: usize, bytes: &[u8]) {
        debug_assert!(at + bytes.len() <= SIZE);
        // SAFETY: in bounds; the region is this side's to write in the slot's current state.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(at),
                bytes.len(),
            )
        };
    }

    fn closed(&self) -> bool {
        self.word(CLOSED_AT).load(Ordering::Acquire) != 0
    }

    /// Marks the lane closed and wakes whoever sleeps on it.
    fn close(&self) {
        self.word(CLOSED_AT).store(1, Ordering::SeqCst);
        futex::wake(self.word(DOORBELL_AT));
        for slot in 0..SLOTS {
            futex::wake(self.state(slot));
        }
    }
}

/// Reserves the file's memory now: a full /dev/shm (Docker gives containers 64 MiB) is an error
/// here rather than a SIGBUS at the first write past it.
fn reserve(file: &File) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only allocates the file's blocks.
        let code = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, SIZE as libc::off_t) };
        if code != 0 {
            let e = std::io::Error::from_raw_os_error(code);
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot reserve {} MiB in {DIR} ({e}; a container needs a larger --shm-size)",
                    SIZE >> 20
                ),
            ));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
    Ok(())
}
