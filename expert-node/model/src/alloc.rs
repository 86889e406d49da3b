//! Large buffers kept by the allocator between calls. Every layer call allocates and frees
//! payloads of up to tens of MiB (hidden states, answers, their wire copies). glibc serves an
//! allocation over its mmap threshold (128 KiB, raised as it goes to at most 32 MiB) with fresh
//! pages and gives them back on free, and trims the heap's free top likewise, so every call
//! faulted all of its pages in again: on the device machine a batch-128 answer (4 MiB) took
//! 25 ms to copy off the GPU and encode on the node and 15 ms to decode on the coordinator,
//! ~12 µs per 4 KiB page. Raised thresholds keep freed buffers in the heap for the next call;
//! the price is that the resident size stays at its high-water mark.

/// Allocations up to this size come from the heap (and are reused once freed).
const MMAP_THRESHOLD: i32 = 256 << 20;
/// Free memory at the heap's top is given back only beyond this.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Tunes the process's allocator for reuse of large buffers; call it first thing in `main`.
/// Other allocators than glibc's are left as they are.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it is safe at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
