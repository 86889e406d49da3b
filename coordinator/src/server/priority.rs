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

/// The calling thread's nice value (0 where it cannot be read).
pub fn current_nice() -> i32 {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain syscall on the calling thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
    #[cfg(not(target_os = "linux"))]
    let nice = 0;
    nice
}

/// Sets the calling thread's nice value to `nice` (a no-op where it already is). Absolute,
/// not relative: threads inherit their creator's value, and the blocking pool's threads are
/// created by the (already lowered) async workers. Linux, where the nice value is per thread;
/// elsewhere it does nothing.
pub fn set_current_thread_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        if current_nice() == nice {
            return;
        }
        // SAFETY: a plain syscall on the calling thread; a failure leaves its priority as it was.
        let set = unsafe {
            let tid = libc::gettid() as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if set != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot lower an HTTP thread's priority"
            );
        }
    }
}
