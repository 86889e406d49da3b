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

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// What the coordinator knows of each slot.
#[derive(Clone, Copy, PartialEq)]
enum Use {
    Free,
    Busy,
    /// Its call was given up (deadline, hedge lost) before the answer came: reusable once the
    /// node has answered it.
    Abandoned,
}

/// The coordinator's side of a lane.
pub struct LaneClient {
    map: Mapping,
    path: PathBuf,
    uses: Mutex<[Use; SLOTS]>,
}

impl LaneClient {
    /// Creates a fresh lane file, to be handed to the node (`path`) and unlinked once it has
    /// mapped it.
    pub fn create() -> Result<Self, LaneError> {
        if !cfg!(target_os = "linux") {
            return Err(LaneError::Unsupported);
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = Path::new(DIR).join(format!(
            "{PREFIX}{}-{nanos:08x}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let err = |source| LaneError::Create {
            path: path.display().to_string(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(err)?;
        let mapped = file
            .set_len(SIZE as u64)
            .and_then(|()| reserve(&file))
            .and_then(|()| Mapping::map(&file));
        let map = match mapped {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(err(e));
            }
        };
        map.write(MAGIC_AT, &MAGIC.to_le_bytes());
        map.write(SLOTS_AT, &(SLOTS as u32).to_le_bytes());
        map.write(
            REQUEST_CAPACITY_AT,
            &(REQUEST_CAPACITY as u32).to_le_bytes(),
        );
        map.write(ANSWER_CAPACITY_AT, &(ANSWER_CAPACITY as u32).to_le_bytes());
        Ok(Self {
            map,
            path,
            uses: Mutex::new([Use::Free; SLOTS]),
        })
    }

    /// The file to name in `OpenLane`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file's name: the mappings stay, and nothing is left behind if either process
    /// dies. Call once the node has mapped it (or will not).
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Closes the lane: the node's lane thread ends and calls waiting on it fail.
    pub fn close(&self) {
        self.map.close();
    }

    pub fn is_closed(&self) -> bool {
        self.map.closed()
    }

    /// Puts `request` in a free slot and rings the node. `None` when it is too large for a slot,
    /// every slot is busy or the lane is closed: send it over gRPC.
    pub fn post(self: &std::sync::Arc<Self>, request: &[u8]) -> Option<Posted> {
        if request.len() > REQUEST_CAPACITY || self.is_closed() {
            return None;
        }
        let slot = {
            let mut uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (0..SLOTS).find(|&s| match uses[s] {
                Use::Free => true,
                Use::Busy => false,
                Use::Abandoned => self.map.state(s).load(Ordering::Acquire) == ANSWERED,
            })?;
            uses[slot] = Use::Busy;
            slot
        };
        let base = self.map.slot(slot);
        self.map.write(base + CONTROL, request);
        self.map
            .word(base + REQUEST_LEN_AT)
            .store(request.len() as u32, Ordering::Relaxed);
        self.map.state(slot).store(POSTED, Ordering::SeqCst);
        // The node may have gone to sleep before seeing the slot: it reads the doorbell before
        // announcing its sleep and re-checks the slots after, so one of the two sees the other.
        self.map.word(DOORBELL_AT).fetch_add(1, Ordering::SeqCst);
        if self.map.word(ASLEEP_AT).load(Ordering::SeqCst) != 0 {
            futex::wake(self.map.word(DOORBELL_AT));
        }
        Some(Posted {
            lane: self.clone(),
            slot,
            taken: false,
        })
    }
}

impl Drop for LaneClient {
    fn drop(&mut self) {
        self.close();
        self.unlink();
    }
}

/// A request in a slot, until its answer has been taken or the call given up.
pub struct Posted {
    lane: std::sync::Arc<LaneClient>,
    slot: usize,
    taken: bool,
}

impl Posted {
    /// The answer, once the node has written it; `Some(Err)` when the lane closed first.
    pub fn try_take(&mut self) -> Option<Result<Vec<u8>, LaneError>> {
        if self.taken {
            return Some(Err(LaneError::Closed));
        }
        let map = &self.lane.map;
        if map.state(self.slot).load(Ordering::Acquire) != ANSWERED {
            return map.closed().then_some(Err(LaneError::Closed));
        }
        let base = map.slot(self.slot);
        let len = map.word(base + ANSWER_LEN_AT).load(Ordering::Relaxed) as usize;
        let answer = if len > ANSWER_CAPACITY {
            Err(LaneError::Overlong(len))
        } else {
            Ok(map.read(base + CONTROL + REQUEST_CAPACITY, len))
        };
        map.state(self.slot).store(FREE, Ordering::Release);
        self.taken = true;
        self.lane.uses.lock().unwrap_or_else(|e| e.into_inner())[self.slot] = Use::Free;
        Some(answer)
    }

    /// Sleeps until the node answers, the lane closes or `timeout` passes (then returns; call
    /// [`Posted::try_take`] again).
    pub fn sleep(&self, timeout: Duration) {
        let map = &self.lane.map;
        let base = map.slot(self.slot);
        map.word(base + WAITING_AT).store(1, Ordering::SeqCst);
        if map.state(self.slot).load(Ordering::SeqCst) == POSTED && !map.closed() {
            futex::wait(map.state(self.slot), POSTED, timeout);
        }
        map.word(base + WAITING_AT).store(0, Ordering::Relaxed);
    }
}

impl Drop for Posted {
    fn drop(&mut self) {
        if !self.taken {
            self.lane.uses.lock().unwrap_or_else(|e| e.into_inner())[self.slot] = Use::Abandoned;
        }
    }
}

/// The node's side of a lane.
pub struct LaneServer {
    map: Mapping,
}

/// Closes a [`LaneServer`] from another thread (when the coordinator's `OpenLane` call ends).
pub struct LaneCloser(std::sync::Arc<LaneServer>);

impl LaneCloser {
    pub fn close(&self) {
        self.0.map.close();
    }
}

impl LaneServer {
    /// Maps the lane a coordinator created. Only a file of ours in `/dev/shm`, not a link,
    /// of the layout this build uses, is accepted: a client cannot make the node write
    /// anywhere else.
    pub fn open(path: &str) -> Result<std::sync::Arc<Self>, LaneError> {
        let err = |reason: String| LaneError::Open {
            path: path.to_string(),
            reason,
        };
        if !cfg!(target_os = "linux") {
            return Err(LaneError::Unsupported);
        }
        let p = Path::new(path);
        let named = p.parent() == Some(Path::new(DIR))
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && !n.contains(".."));
        if !named {
            return Err(err(format!("not a lane: lanes are {DIR}/{PREFIX}*")));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
        let file = options.open(p).map_err(|e| err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.is_file() || meta.len() != SIZE as u64 {
            return Err(err(format!(
                "{} bytes where a lane of this version has {SIZE}",
                meta.len()
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: no arguments, no failure.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me || meta.mode() & 0o077 != 0 || meta.nlink() != 1 {
                return Err(err(format!(
                    "it must be this user's (uid {me}), private (mode 0600) and have one name"
                )));
            }
        }
        let map = Mapping::map(&file).map_err(|e| err(e.to_string()))?;
        let layout = (
            map.read_u64(MAGIC_AT),
            map.word(SLOTS_AT).load(Ordering::Acquire) as usize,
            map.word(REQUEST_CAPACITY_AT).load(Ordering::Acquire) as usize,
            map.word(ANSWER_CAPACITY_AT).load(Ordering::Acquire) as usize,
        );
        if layout != (MAGIC, SLOTS, REQUEST_CAPACITY, ANSWER_CAPACITY) {
            return Err(err(
                "its layout is not this build's: coordinator and node must be the same version"
                    .into(),
            ));
        }
        // One server per lane: two would answer the same slots.
        if map
            .word(CLAIMED_AT)
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(err("another node thread serves it already".into()));
        }
        Ok(std::sync::Arc::new(Self { map }))
    }

    pub fn closer(self: &std::sync::Arc<Self>) -> LaneCloser {
        LaneCloser(self.clone())
    }

    /// Answers posted requests with `handle(request, answer_capacity)` until the lane closes,
    /// or `stop()` says so between two requests (then it closes it). After each answer it
    /// polls for `spin` before sleeping on the doorbell.
    pub fn serve(
        &self,
        spin: Duration,
        mut handle: impl FnMut(&[u8], usize) -> Vec<u8>,
        stop: impl Fn() -> bool,
    ) {
        let map = &self.map;
        let mut busy_until = Instant::now() + spin;
        while !map.closed() {
            if stop() {
                map.close();
                break;
            }
            let mut served = false;
            for slot in 0..SLOTS {
                if map.state(slot).load(Ordering::Acquire) != POSTED {
                    continue;
                }
                let base = map.slot(slot);
                let len = map.word(base + REQUEST_LEN_AT).load(Ordering::Relaxed) as usize;
                let request = map.read(base + CONTROL, len.min(REQUEST_CAPACITY));
                let mut answer = handle(&request, ANSWER_CAPACITY);
                // The handler keeps within the capacity; an empty answer if it did not.
                if answer.len() > ANSWER_CAPACITY {
                    answer.clear();
                }
                map.write(base + CONTROL + REQUEST_CAPACITY, &answer);
                map.word(base + ANSWER_LEN_AT)
                    .store(answer.len() as u32, Ordering::Relaxed);
                map.state(slot).store(ANSWERED, Ordering::SeqCst);
                if map.word(base + WAITING_AT).load(Ordering::SeqCst) != 0 {
                    futex::wake(map.state(slot));
                }
                served = true;
            }
            if served {
                busy_until = Instant::now() + spin;
                continue;
            }
            if Instant::now() < busy_until {
                std::hint::spin_loop();
                continue;
            }
            let bell = map.word(DOORBELL_AT).load(Ordering::SeqCst);
            map.word(ASLEEP_AT).store(1, Ordering::SeqCst);
            let posted = (0..SLOTS).any(|s| map.state(s).load(Ordering::SeqCst) == POSTED);
            if !posted && !map.closed() {
                // Bounded: a coordinator that died without closing is noticed by the gRPC call.
                futex::wait(map.word(DOORBELL_AT), bell, Duration::from_millis(100));
            }
            map.word(ASLEEP_AT).store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(target_os = "linux")]
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word` holds `expected`, at most `timeout` (shared, not process-private:
    /// the word is in a mapping of two processes).
    pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `word` is a valid, aligned u32 for the call's duration; a spurious or
        // interrupted return is fine, every caller re-checks.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }

    pub(super) fn wake(word: &AtomicU32) {
        // SAFETY: as above; waking nobody is harmless.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    pub(super) fn wait(_: &AtomicU32, _: u32, timeout: Duration) {
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
    }

    pub(super) fn wake(_: &AtomicU32) {}
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{ANSWER_CAPACITY, LaneClient, LaneError, LaneServer, REQUEST_CAPACITY, SLOTS};

    /// A node thread answering each request with its bytes reversed.
    fn echo(
        client: &LaneClient,
        spin: Duration,
    ) -> (std::thread::JoinHandle<()>, super::LaneCloser) {
        let server = LaneServer::open(client.path().to_str().expect("utf-8")).expect("opens");
        let closer = server.closer();
        let thread = std::thread::spawn(move || {
            server.serve(
                spin,
                |req, cap| {
                    assert_eq!(cap, ANSWER_CAPACITY);
                    req.iter().rev().copied().collect()
                },
                || false,
            )
        });
        (thread, closer)
    }

    fn answer(posted: &mut super::Posted) -> Result<Vec<u8>, LaneError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(a) = posted.try_take() {
                return a;
            }
            assert!(Instant::now() < deadline, "no answer");
            posted.sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn requests_are_answered_awake_and_after_sleeping() {
        let client = Arc::new(LaneClient::create().expect("a lane"));
        let (thread, _closer) = echo(&client, Duration::from_micros(50));
        client.unlink();
        assert!(!client.path().exists(), "the name goes once mapped");
        for round in 0..3u8 {
            let mut posted = client.post(&[1, 2, round]).expect("a slot");
            assert_eq!(answer(&mut posted).expect("answered"), [round, 2, 1]);
            // Long enough for the node thread to fall asleep on the doorbell.
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every slot at once.
        let mut posted: Vec<_> = (0..SLOTS as u8)
            .map(|i| client.post(&[i; 3]).expect("a slot"))
            .collect();
        assert!(client.post(&[9]).is_none(), "all slots busy");
        for (i, p) in posted.iter_mut().enumerate() {
            assert_eq!(answer(p).expect("answered"), [i as u8; 3]);
        }
        client.close();
        thread
            .join()
            .expect("the node thread ends when the lane closes");
    }

    #[test]
    fn an_abandoned_slot_is_reused_once_answered_and_oversize_requests_are_refused() {
        let client = Arc::new(LaneClient::create().expect("a lane"));
        assert!(client.post(&vec![0; REQUEST_CAPACITY + 1]).is_none());
        // No node yet: every slot posted and given up.
        for _ in 0..SLOTS {
            drop(client.post(&[1]).expect("a slot"));
        }
        assert!(
            client.post(&[1]).is_none(),
            "abandoned slots wait for their answers"
        );
        let (thread, closer) = echo(&client, Duration::ZERO);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut posted = loop {
            if let Some(p) = client.post(&[7, 8]) {
                break p;
            }
            assert!(Instant::now() < deadline, "abandoned slots never came back");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(answer(&mut posted).expect("answered"), [8, 7]);
        closer.close();
        thread.join().expect("ends");
        assert!(client.post(&[1]).is_none(), "a closed lane takes no calls");
    }

    #[test]
    fn a_node_that_stops_closes_the_lane_between_calls() {
        let client = Arc::new(LaneClient::create().expect("a lane"));
        let server = LaneServer::open(client.path().to_str().expect("utf-8")).expect("opens");
        let served = std::sync::atomic::AtomicUsize::new(0);
        let mut posted = client.post(&[3]).expect("a slot");
        std::thread::scope(|s| {
            s.spawn(|| {
                server.serve(
                    Duration::from_millis(1),
                    |req, _| {
                        served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        req.to_vec()
                    },
                    || served.load(std::sync::atomic::Ordering::SeqCst) > 0,
                )
            });
            // The call already posted is answered; then the lane closes.
            assert_eq!(answer(&mut posted).expect("answered"), [3]);
        });
        assert!(client.is_closed());
        assert!(client.post(&[4]).is_none());
    }

    #[test]
    fn closing_fails_a_waiting_call_at_once() {
        let client = Arc::new(LaneClient::create().expect("a lane"));
        let mut waiting = client.post(&[1]).expect("a slot");
        assert!(waiting.try_take().is_none(), "no node: no answer yet");
        let closing = client.clone();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            closing.close();
        });
        let started = Instant::now();
        assert!(matches!(answer(&mut waiting), Err(LaneError::Closed)));
        assert!(started.elapsed() < Duration::from_secs(5));
        closer.join().expect("closed");
    }

    #[test]
    fn a_lane_is_served_once() {
        let client = LaneClient::create().expect("a lane");
        let path = client.path().to_str().expect("utf-8");
        let _first = LaneServer::open(path).expect("opens");
        let Err(second) = LaneServer::open(path) else {
            panic!("a second server was let in")
        };
        assert!(second.to_string().contains("serves it already"), "{second}");
    }

    #[test]
    fn only_lane_files_are_opened() {
        for path in [
            "/etc/passwd",
            "/dev/shm/other",
            "/dev/shm/omnishard-lane-../x",
        ] {
            let err = LaneServer::open(path).err().expect("refused");
            assert!(err.to_string().contains(path), "{err}");
        }
        let dir = std::path::Path::new("/dev/shm");
        let link = dir.join(format!("omnishard-lane-test-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/hostname", &link).expect("a link");
        let refused = LaneServer::open(link.to_str().expect("utf-8"));
        std::fs::remove_file(&link).expect("removed");
        assert!(refused.is_err(), "a link is not followed");
        let short = dir.join(format!("omnishard-lane-test-short-{}", std::process::id()));
        std::fs::write(&short, b"OSLANE01").expect("written");
        let refused = LaneServer::open(short.to_str().expect("utf-8"));
        std::fs::remove_file(&short).expect("removed");
        assert!(
            refused
                .err()
                .expect("refused")
                .to_string()
                .contains("bytes where a lane"),
        );
    }
}
