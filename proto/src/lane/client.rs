//! The coordinator's end of a lane: the file made and reserved, requests posted into free
//! slots, answers taken (or the call given up, the slot reused once answered).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

// The layout, the mapping and the futexes are this module's parent's.
use super::*;

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
