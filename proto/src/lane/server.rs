//! The node's end of a lane: only a private lane file of this user and layout is mapped, once;
//! posted requests are answered until the lane closes.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

// The layout, the mapping and the futexes are this module's parent's.
use super::*;

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
