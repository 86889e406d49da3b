//! A second CUDA stream per device, for kernels that need the GPU's spare room while the main
//! stream's kernels run: the MoE step's tensor-core tiles (experts with many tokens) beside its
//! GEMVs (experts with few). Each of the two alone leaves much of the card idle where the other
//! is small (a few experts with many tokens at batch 32, a few with few at prefill), so run one
//! after the other they cost their sum; side by side, nearer their larger part.
//!
//! Ordering is the usual fork/join of two streams: the side stream waits for everything queued
//! on the main stream so far, and the main stream waits for the side stream before anything
//! after the join. Every buffer the side kernels touch must be allocated before the fork and
//! freed after the join (candle frees on the main stream), which [`Beside`] enforces by joining
//! on drop, error paths included. The pattern is also legal inside a CUDA graph capture.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};
use candle_core::{CudaDevice, Result};

/// A device's side stream and the two events of its fork and join, reused by every use.
struct Side {
    stream: Arc<CudaStream>,
    fork: CudaEvent,
    join: CudaEvent,
}

/// One side stream per device, made on first use and kept for the life of the process (a
/// device's stream and two events). The lock is held from fork to join, so two threads' uses of
/// one device never interleave their events.
type Sides = Vec<(candle_core::cuda_backend::DeviceId, &'static Mutex<Side>)>;
static SIDES: Mutex<Sides> = Mutex::new(Vec::new());

/// `dev`'s side stream, made on first use.
fn side(dev: &CudaDevice) -> Result<&'static Mutex<Side>> {
    let mut sides = SIDES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, side)) = sides.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(side);
    }
    let ctx = dev.cuda_stream().context().clone();
    let flags = Some(CUevent_flags::CU_EVENT_DISABLE_TIMING);
    let side: &'static Mutex<Side> = Box::leak(Box::new(Mutex::new(Side {
        stream: ctx.new_stream().w()?,
        fork: ctx.new_event(flags).w()?,
        join: ctx.new_event(flags).w()?,
    })));
    sides.push((dev.id(), side));
    Ok(side)
}

/// The side stream of a device between a fork and its join: kernels launched on
/// [`Beside::stream`] run after everything the main stream had queued at the fork, and the main
/// stream waits for them at [`Beside::join`] (or when this is dropped).
pub(super) struct Beside {
    main: Arc<CudaStream>,
    guard: MutexGuard<'static, Side>,
    joined: bool,
}

/// Forks `dev`'s side stream off its main stream.
pub(super) fn fork(dev: &CudaDevice) -> Result<Beside> {
    let main = dev.cuda_stream();
    let guard = side(dev)?.lock().unwrap_or_else(PoisonError::into_inner);
    guard.fork.record(&main).w()?;
    guard.stream.wait(&guard.fork).w()?;
    Ok(Beside {
        main,
        guard,
        joined: false,
    })
}

impl Beside {
    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        &self.guard.stream
    }

    /// The main stream waits for everything launched on the side stream so far.
    pub(super) fn join(mut self) -> Result<()> {
        // Marked joined only once the main stream waits: otherwise `drop` still synchronizes.
        self.wait()?;
        self.joined = true;
        Ok(())
    }

    fn wait(&self) -> Result<()> {
        self.guard.join.record(&self.guard.stream).w()?;
        self.main.wait(&self.guard.join).w()
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        if !self.joined
            && let Err(e) = self.wait()
        {
            // The main stream could not be made to wait: the only safe course left is for the
            // host to wait for the side stream before any buffer it reads is freed.
            tracing::error!(error = %e, "joining the side stream failed; synchronizing it");
            let _ = self.guard.stream.synchronize();
        }
    }
}
