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
/// peak resident size is what counts for a CLI run, and page faults are what cost. And the
/// process's memory comes in 4 KB pages, not transparent huge pages ([`no_huge_pages`]).
pub fn keep_freed_memory() {
    set_purge_delay(PURGE_DELAY_MS);
    no_huge_pages();
}

/// Transparent huge pages off for this process (Linux `PR_SET_THP_DISABLE`; it also covers the
/// arenas mimalloc reserved and advised `MADV_HUGEPAGE` before `main`), unless
/// `MIMALLOC_ALLOW_THP` is set, which then decides as mimalloc reads it.
///
/// Why: on a virtual machine whose host takes back the guest's free memory (virtio-balloon free
/// page reporting, which hands back free 2 MB blocks — the cloud VMs this was measured on), a huge
/// page is almost always one the host must fault in again: first touch of fresh memory ran at
/// 0.13–0.23 GB/s in 2 MB pages against 2.2–2.6 GB/s in 4 KB pages (Intel Xeon VM, 1–2 GB
/// touched), and 78 % of a slow load's samples were the kernel clearing huge pages. Measured,
/// full-size SD1.5 (random weights), 2 threads, alternating runs: `--dtype bf16` load from f32
/// files 16.6–17.3 → 2.8 s, an LCM-LoRA-shaped LoRA merged at load 20.3 → 2.1 s, a whole f32
/// run (512×336, 10 steps × 0.5, guidance) 27.2–29.2 → 23.2–23.7 s (the VAE's fresh activations:
/// encode 2.6–2.9 → 1.4 s, decode 4.1–4.3 → 2.6 s), UNet calls unchanged within the noise.
pub fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only how later page faults are
    // served; on a kernel without it the call fails with EINVAL and nothing changes.
    unsafe {
        // The arguments as the kernel reads them (unsigned longs; the unused ones must be zero).
        let (on, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
        libc::prctl(libc::PR_SET_THP_DISABLE, on, zero, zero, zero);
    }
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The process's transparent huge pages are off after [`super::no_huge_pages`] (the kernel's
    /// own flag, read back), unless the environment hands the choice to mimalloc.
    #[test]
    fn huge_pages_are_off_for_the_process() {
        super::no_huge_pages();
        let zero: libc::c_ulong = 0;
        // SAFETY: PR_GET_THP_DISABLE reads a flag; the unused arguments are zero.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, zero, zero, zero, zero) };
        let want = if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() { flag } else { 1 };
        assert_eq!(flag, want, "PR_GET_THP_DISABLE after no_huge_pages");
    }
}
