//! Allocator settings for the daemon's data path.
//!
//! Every NBD write arrives in a freshly allocated buffer of up to 8 MiB that lives until the last
//! slink applied it. glibc serves blocks above its mmap threshold with a fresh mmap each time, so
//! every 1 MiB write paid page faults and page zeroing (about 5% of the daemon's CPU in a 1 MiB
//! sequential-write profile). Raising the threshold above the largest request, and keeping freed
//! memory in the arenas up to a bound, lets those buffers be reused instead.

/// Blocks up to this size come from the arenas (the largest NBD request is 8 MiB; glibc caps the
/// setting at 32 MiB on 64-bit).
const MMAP_THRESHOLD_BYTES: libc::c_int = 32 << 20;
/// Free memory an arena keeps before giving it back to the kernel: the bound on what this
/// setting can hold on to.
const TRIM_THRESHOLD_BYTES: libc::c_int = 256 << 20;

/// Applies the settings; a refusal only costs speed, so it is logged and ignored.
pub fn tune_for_large_buffers() {
    // SAFETY: mallopt only changes allocator parameters; called before the daemon's threads
    // start allocating large buffers.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    };
    if !ok {
        tracing::warn!("mallopt refused the large-buffer settings; continuing with defaults");
    }
}
