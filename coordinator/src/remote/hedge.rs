//! Fast failure detection with replicas: hedged requests ("The Tail at Scale", Dean & Barroso,
//! CACM 2013). A node silently cut off by a partition answers nothing and resets nothing; with
//! only the fixed deadline every stream would stall for it. So each node's latency is learnt per
//! size of call ([`LatencyModel`]: a smoothed mean and deviation per power-of-two of assignments,
//! as TCP estimates its retransmission timeout, RFC 6298), and a call that runs well past what
//! that node normally takes is re-sent to replicas of its experts; whichever answers first is
//! used. The late node is marked down (the health checker re-admits it as soon as it answers),
//! so later layers do not wait for it again. Experts with no other live replica keep the fixed
//! deadline as the last resort.

use std::time::Duration;

/// Size classes: calls of 2^k to 2^(k+1)-1 assignments share an estimate.
const CLASSES: usize = 24;

/// Smoothed latency per size class of one node.
#[derive(Debug, Clone)]
pub(super) struct LatencyModel {
    classes: [Option<Estimate>; CLASSES],
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Smoothed latency and its mean deviation, in seconds.
    mean: f64,
    dev: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            classes: [None; CLASSES],
        }
    }
}

fn class(work: u64) -> usize {
    (u64::BITS - work.max(1).leading_zeros() - 1).min(CLASSES as u32 - 1) as usize
}

impl LatencyModel {
    /// Learns from a call of `work` assignments that took `seconds`.
    pub(super) fn record(&mut self, work: u64, seconds: f64) {
        let slot = &mut self.classes[class(work)];
        *slot = Some(match *slot {
            None => Estimate {
                mean: seconds,
                dev: seconds / 2.0,
            },
            Some(e) => {
                // RFC 6298's gains: 1/8 for the mean, 1/4 for the deviation.
                let dev = 0.75 * e.dev + 0.25 * (seconds - e.mean).abs();
                Estimate {
                    mean: 0.875 * e.mean + 0.125 * seconds,
                    dev,
                }
            }
        });
    }

    /// How long a call of `work` assignments may run before it is hedged: three times the
    /// usual worst (mean + 4 deviations) of its size class, never below `floor`. A class not
    /// seen yet borrows the nearest smaller one, scaled by the size ratio (work grows at most
    /// linearly), else the nearest larger one; `None` when nothing is known yet.
    pub(super) fn hedge_after(&self, work: u64, floor: Duration) -> Option<Duration> {
        let c = class(work);
        let estimate = self.classes[c].map(|e| (e, 1.0)).or_else(|| {
            let below = (0..c)
                .rev()
                .find_map(|k| self.classes[k].map(|e| (e, (1u64 << (c - k)) as f64)));
            below.or_else(|| (c + 1..CLASSES).find_map(|k| self.classes[k].map(|e| (e, 1.0))))
        })?;
        let (e, scale) = estimate;
        let worst = (e.mean + 4.0 * e.dev) * scale * 3.0;
        Some(Duration::from_secs_f64(worst).max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_millis(50);

    #[test]
    fn nothing_learnt_means_no_hedging() {
        assert_eq!(LatencyModel::default().hedge_after(8, FLOOR), None);
    }

    #[test]
    fn the_floor_holds_for_fast_nodes_and_slow_calls_wait_longer() {
        let mut m = LatencyModel::default();
        for _ in 0..50 {
            m.record(8, 0.002);
        }
        assert_eq!(m.hedge_after(8, FLOOR), Some(FLOOR));
        for _ in 0..50 {
            m.record(4096, 1.0);
        }
        let big = m.hedge_after(4096, FLOOR).expect("learnt");
        assert!(big >= Duration::from_secs(3), "{big:?}");
        // A size between the two borrows the smaller class, scaled up.
        let mid = m.hedge_after(1024, Duration::ZERO).expect("borrowed");
        assert!(mid > Duration::from_millis(6 * 100), "{mid:?}");
    }

    #[test]
    fn jitter_widens_the_threshold() {
        let (mut steady, mut jittery) = (LatencyModel::default(), LatencyModel::default());
        for i in 0..100 {
            steady.record(16, 0.050);
            jittery.record(16, if i % 2 == 0 { 0.010 } else { 0.090 });
        }
        let s = steady.hedge_after(16, Duration::ZERO).expect("learnt");
        let j = jittery.hedge_after(16, Duration::ZERO).expect("learnt");
        assert!(j > s, "{j:?} vs {s:?}");
    }

    #[test]
    fn classes_are_powers_of_two() {
        assert_eq!(class(0), 0);
        assert_eq!(class(1), 0);
        assert_eq!(class(2), 1);
        assert_eq!(class(3), 1);
        assert_eq!(class(1024), 10);
        assert_eq!(class(u64::MAX), CLASSES - 1);
    }
}
