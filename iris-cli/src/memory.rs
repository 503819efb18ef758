//! How the `iris` process keeps the memory it frees (Linux with glibc).
//!
//! Each graph run allocates a window's intermediate tensors (megabytes to a
//! few hundred megabytes) and frees them when it ends; the next run asks
//! for the same sizes again. By default glibc gives such memory back to the
//! system: blocks above its mmap threshold (128 KiB at first, raised
//! as blocks are freed, up to 32 MiB) are mapped and unmapped one by one,
//! and free space of more than twice that threshold at the top of the heap
//! is trimmed. So every run touches fresh pages and pays one page fault
//! (and one page clearing) per 4 KiB. Measured with the small model on this
//! project's 2-core VM: an encoder window took 59-65 ms with glibc's
//! defaults and 44-50 ms with the settings below (`docs/benchmarks.md`).
//!
//! The `iris` process is this crate's own, so it keeps freed memory for
//! reuse: blocks up to 32 MiB (glibc's largest threshold) come from the
//! heap, and the heap is not trimmed. The resident size then stays at its
//! high-water mark until the command exits, which the peak already is. A
//! library cannot choose this for its host (the settings are the whole
//! process's): hosts that embed libiris or the Python module set it
//! themselves (`GLIBC_TUNABLES`, or `mallopt`; see `docs/benchmarks.md`).
//! Settings given in the environment (`GLIBC_TUNABLES` with malloc
//! tunables, or glibc's `MALLOC_*_` variables) are left as they are.

/// Has glibc keep freed memory for reuse (see the module documentation),
/// unless the environment sets malloc's parameters itself. Does nothing
/// on other systems and C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !environment_sets_malloc() {
        // SAFETY: mallopt is thread-safe and only sets malloc's parameters;
        // glibc accepts both values (the mmap threshold at its documented
        // maximum, 32 MiB).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Whether the environment sets malloc's parameters: malloc tunables in
/// `GLIBC_TUNABLES`, or one of glibc's `MALLOC_..._` variables.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn environment_sets_malloc() -> bool {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    tunables.contains("glibc.malloc.")
        || std::env::vars_os().any(|(name, _)| {
            let name = name.to_string_lossy();
            name.starts_with("MALLOC_") && name.ends_with('_')
        })
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes one `rusage` it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(ok, 0, "getrusage");
        usage.ru_minflt
    }

    /// Allocates `bytes`, writes every page, frees it; returns the page
    /// faults that took.
    fn faults_of_one_use(bytes: usize) -> i64 {
        let before = minor_faults();
        let mut block = vec![0u8; bytes];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&block);
        drop(block);
        minor_faults() - before
    }

    #[test]
    fn a_freed_block_is_reused_without_new_page_faults() {
        if environment_sets_malloc() {
            return; // the environment's settings apply, not this module's
        }
        keep_freed_memory();
        let bytes = 16 << 20;
        let pages = (bytes / 4096) as i64;
        let first = faults_of_one_use(bytes);
        let again = faults_of_one_use(bytes);
        // The first use maps the pages; the second finds them in the heap.
        assert!(
            first >= pages / 2,
            "first use: {first} faults for {pages} pages"
        );
        assert!(
            again < pages / 20,
            "second use: {again} faults for {pages} pages"
        );
    }
}
