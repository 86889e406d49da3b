//! Where a layer's call to the expert nodes spends its time, summed over calls: the
//! coordinator's stages — waiting for the layer's device work and copying the hidden states
//! off the device, cutting and encoding each node's request, the round trip, decoding the
//! answers, copying them back onto the device, summing each token's answers — and the node's
//! own, from the `NodeTiming` each answer carries (waiting for a compute thread, upload, the
//! experts — and of them the host's checking, planning and launching, and of that the checking
//! and planning — download and encoding).
//! What the round trip holds beyond the node's time is transport: both sides' gRPC and the
//! thread hand-offs. `coordinator bench` prints it per call for every remote configuration;
//! it is the profile behind issue 15's scaling figures.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use omnishard_proto::v1::NodeTiming;

/// The coordinator's stages of one layer's call, in order.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// The layer's device work finishing and the hidden states copied to the host.
    CopyOut,
    /// The assignments split into one share per node.
    Plan,
    /// Rows for nodes that read the coordinator's GPU memory gathered there (CUDA IPC).
    Staging,
    /// Each node's request built: rows cut out and encoded where they go as bytes.
    Encode,
    /// From sending to the last answer (the node's own time included).
    RoundTrip,
    /// The answers decoded and checked (those in nodes' GPU memory mapped).
    Decode,
    /// The answers copied onto the device (out of nodes' GPU memory, into one tensor).
    CopyBack,
    /// Each token's answers summed (its table built on the host, the sum launched).
    Combine,
}

const STAGES: [(Stage, &str); 8] = [
    (Stage::CopyOut, "device work + copy out"),
    (Stage::Plan, "plan"),
    (Stage::Staging, "stage rows"),
    (Stage::Encode, "encode"),
    (Stage::RoundTrip, "round trip"),
    (Stage::Decode, "decode"),
    (Stage::CopyBack, "copy back"),
    (Stage::Combine, "combine"),
];

/// The node's stages; "of it on the host" is the part of "experts" before the device's wait,
/// and "planning" the part of that before the first launch.
const NODE_STAGES: [&str; 6] = [
    "wait",
    "upload",
    "experts",
    "of it on the host",
    "planning",
    "download + encode",
];

/// A stage that takes longer than this in one call is counted apart as well: host work of a few
/// µs that sometimes takes milliseconds is the thread losing its core, not the work.
const LONG_LAP: Duration = Duration::from_millis(1);

/// Running sums, in nanoseconds (the coordinator's stages) and microseconds (the nodes').
#[derive(Debug, Default)]
pub struct CallProfile {
    calls: AtomicU64,
    stages: [AtomicU64; STAGES.len()],
    /// The part of `stages` spent in laps over [`LONG_LAP`].
    long: [AtomicU64; STAGES.len()],
    answers: AtomicU64,
    node: [AtomicU64; NODE_STAGES.len()],
}

impl CallProfile {
    /// A stopwatch for one call's stages.
    pub(super) fn start(&self) -> Laps<'_> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Laps {
            profile: self,
            since: Instant::now(),
        }
    }

    pub(super) fn node_answered(&self, t: &NodeTiming) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        let parts = [
            t.wait_us,
            t.upload_us,
            t.compute_us,
            t.launch_us,
            t.plan_us,
            t.download_us,
        ];
        for (sum, us) in self.node.iter().zip(parts) {
            sum.fetch_add(u64::from(us), Ordering::Relaxed);
        }
    }

    /// The sums so far, and zero to start again.
    pub fn take(&self) -> ProfileSummary {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        ProfileSummary {
            calls: take(&self.calls),
            stages: self.stages.each_ref().map(take),
            long: self.long.each_ref().map(take),
            answers: take(&self.answers),
            node: self.node.each_ref().map(take),
        }
    }
}

/// Times one call's stages one after another.
pub(super) struct Laps<'a> {
    profile: &'a CallProfile,
    since: Instant,
}

impl Laps<'_> {
    /// The time since the last lap (or the start) goes to `stage`.
    pub(super) fn lap(&mut self, stage: Stage) {
        let now = Instant::now();
        let took = now - self.since;
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.profile.stages[stage as usize].fetch_add(nanos, Ordering::Relaxed);
        if took > LONG_LAP {
            self.profile.long[stage as usize].fetch_add(nanos, Ordering::Relaxed);
        }
        self.since = now;
    }
}

/// What a [`CallProfile`] summed between two takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileSummary {
    pub calls: u64,
    stages: [u64; STAGES.len()],
    long: [u64; STAGES.len()],
    pub answers: u64,
    node: [u64; NODE_STAGES.len()],
}

impl ProfileSummary {
    /// The coordinator's time per call, all stages.
    pub fn per_call(&self) -> Duration {
        Duration::from_nanos(self.stages.iter().sum::<u64>() / self.calls.max(1))
    }
}

impl fmt::Display for ProfileSummary {
    /// Microseconds per layer call (the node's per answer).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let calls = self.calls.max(1) as f64;
        write!(f, "{} calls, µs per call:", self.calls)?;
        for (((_, name), nanos), long) in STAGES.iter().zip(self.stages).zip(self.long) {
            write!(f, " {name} {:.1}", nanos as f64 / 1e3 / calls)?;
            if long > 0 {
                write!(
                    f,
                    " ({:.1} in laps over {} ms)",
                    long as f64 / 1e3 / calls,
                    LONG_LAP.as_millis()
                )?;
            }
            write!(f, ",")?;
        }
        let answers = self.answers.max(1) as f64;
        write!(
            f,
            " total {:.1}; node, per answer ({} answers):",
            self.per_call().as_nanos() as f64 / 1e3,
            self.answers
        )?;
        for (name, us) in NODE_STAGES.iter().zip(self.node) {
            write!(f, " {name} {:.1}", us as f64 / answers)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_and_answers_add_up_and_take_starts_again() {
        let profile = CallProfile::default();
        for _ in 0..2 {
            let mut laps = profile.start();
            std::thread::sleep(Duration::from_millis(2));
            laps.lap(Stage::RoundTrip);
            laps.lap(Stage::Decode);
        }
        profile.node_answered(&NodeTiming {
            wait_us: 4,
            upload_us: 6,
            compute_us: 100,
            download_us: 10,
            launch_us: 30,
            plan_us: 12,
        });
        let summary = profile.take();
        assert_eq!((summary.calls, summary.answers), (2, 1));
        assert!(summary.per_call() >= Duration::from_millis(2));
        let text = summary.to_string();
        assert!(
            text.contains("experts 100.0 of it on the host 30.0 planning 12.0"),
            "{text}"
        );
        // The slept lap is a long one; the empty one is not.
        assert!(text.contains("in laps over 1 ms), decode"), "{text}");
        assert_eq!(text.matches("laps over").count(), 1, "{text}");
        assert_eq!(profile.take().calls, 0);
    }
}
