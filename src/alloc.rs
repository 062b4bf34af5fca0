//! The memory allocator of the binary, the benches and the probes (a library cannot choose one for
//! its callers; they declare `#[global_allocator] static A: ghiblify::alloc::Allocator` and call
//! [`keep_freed_memory`] first thing).
//!
//! Why: a UNet step or a VAE decode allocates and frees activations of tens to hundreds of MB,
//! hundreds of times. glibc's malloc serves each from a fresh mmap whose pages the kernel zeroes
//! and faults in again (a third of a UNet step here); mimalloc reuses them, and with purging off
//! it never hands them back mid-run. Measured on 2 cores, SD1.5 at 512²: UNet step 28.2 → 18.9 s
//! (mimalloc) ; VAE decode 19.0 → 15.5 s (purging off).

pub type Allocator = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2 and v3 alike).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the process for reuse (no purge back to the OS) until it exits: the
/// peak resident size is what counts for a CLI run, and page faults are what cost.
pub fn keep_freed_memory() {
    set_purge_delay(PURGE_DELAY_MS);
}

/// How long freed memory stays with the process before it goes back to the OS (mimalloc's own
/// default is 10 ms): never, by default.
const PURGE_DELAY_MS: i64 = -1;

/// The low-memory setting (`--dtype f16` on the CPU): freed memory idle for a second goes back.
/// Measured, whole 512² run with f16 weights: peak 2.99 GB (3.33 GB never purging), UNet calls
/// 13.1–14.1 s (12.0–12.8 s never purging: a step re-faults part of its working set).
pub const LOW_MEMORY_PURGE_DELAY_MS: i64 = 1000;

/// Sets mimalloc's purge delay in ms (-1: never). MIMALLOC_PURGE_DELAY, if set, wins.
pub fn set_purge_delay(ms: i64) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a plain integer option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms as _) };
}
