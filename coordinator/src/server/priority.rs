//! The HTTP front end yields the CPU to generation: its threads (the async workers and the
//! blocking pool that parses and tokenizes) run at a higher nice value than the scheduler
//! thread and the compute threads, so that a flood of requests, refused or not, slows the
//! answers to new requests before it slows the tokens of the sequences already running. On a
//! 2-core machine, 180 clients sending abusive requests as fast as they were refused raised a
//! probe stream's p99 inter-token gap 3.3× over what 20 ordinary streams alone cost it.
//!
//! Threads inherit their creator's nice value, and raising it back needs privileges: the
//! scheduler, the compute pool and the expert-call runtime must be started from a thread that
//! was never lowered (see `serve::launch`).

/// The default `--frontend-nice`.
pub const DEFAULT_FRONTEND_NICE: i32 = 5;

/// Raises the calling thread's nice value by `nice` (0: leaves it). Linux and other Unixes
/// where the nice value is per thread; elsewhere it does nothing.
pub fn lower_current_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread; a failure leaves its priority as it was.
        let set = unsafe {
            let tid = libc::gettid() as libc::id_t;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, current.saturating_add(nice))
        };
        if set != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot lower an HTTP thread's priority"
            );
        }
    }
}
