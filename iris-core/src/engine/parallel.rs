//! Work split over the model's thread pool, for the engine's own tract ops.
//!
//! tract runs an op's `eval` on the calling thread; the engine's ops
//! (`conv3d`, `instance_norm`, `upsample`) split their work over the pool
//! that tract's matrix products use, found with
//! `current_tract_executor`, so they use the threads the caller gave the
//! model and no others.

use core::marker::PhantomData;
use std::prelude::rust_2024::*;

use rayon::prelude::*;
use tract_linalg::multithread::{Executor, current_tract_executor};
use tract_onnx::prelude::{IntoTValue, IntoTensor, TValue, TVec, Tensor, TractResult};

/// An f32 tensor of `shape` for an op's output, its values not yet set, so
/// that the threads that write them are the ones that fault its pages in.
/// `Tensor::zero` fills it on the calling thread first (a fresh 268 MB
/// output took 150-200 ms to fill here, nearly all page faults), and a
/// `Vec` handed to tract through `ndarray` is copied into a tensor of
/// tract's own, the output made twice. Large outputs ask for huge pages
/// ([`advise_huge_pages`]).
///
/// # Safety
/// The caller writes every value before the tensor is read.
pub(crate) unsafe fn unwritten(shape: &[usize]) -> TractResult<Tensor> {
    // SAFETY: f32 has no invalid values; the caller writes them all.
    let mut tensor = unsafe { Tensor::uninitialized::<f32>(shape)? };
    {
        let mut view = tensor.try_as_plain_ram_mut()?;
        advise_huge_pages(view.as_slice_mut::<f32>()?);
    }
    Ok(tensor)
}

/// f32 tensors of `shapes`, their values not yet set ([`unwritten`]), that
/// `write` fills through a slice of each, in order; for ops with several
/// outputs.
///
/// # Safety
/// `write` writes every value of every slice (or fails).
pub(crate) unsafe fn written<'s>(
    shapes: impl IntoIterator<Item = &'s [usize]>,
    write: impl FnOnce(&mut [&mut [f32]]) -> TractResult<()>,
) -> TractResult<TVec<TValue>> {
    let mut tensors = shapes
        .into_iter()
        // SAFETY: `write` writes every value (the caller's promise).
        .map(|shape| unsafe { unwritten(shape) })
        .collect::<TractResult<Vec<Tensor>>>()?;
    {
        let mut views = tensors
            .iter_mut()
            .map(|t| t.try_as_plain_ram_mut())
            .collect::<TractResult<Vec<_>>>()?;
        let mut slices = views
            .iter_mut()
            .map(|v| v.as_slice_mut::<f32>())
            .collect::<TractResult<Vec<&mut [f32]>>>()?;
        write(&mut slices)?;
    }
    Ok(tensors.into_iter().map(Tensor::into_tvalue).collect())
}

/// Fewest bytes for which [`unwritten`] asks for huge pages: glibc's largest
/// mmap threshold, so that such a block is a mapping of its own (a smaller
/// one may lie in the heap beside other allocations).
const HUGE_PAGES_FROM: usize = 32 << 20;

/// Asks Linux to back `values` (not yet touched) with transparent huge
/// pages, where they are at least [`HUGE_PAGES_FROM`] bytes and the system
/// allows it (`/sys/kernel/mm/transparent_hugepage/enabled` at `madvise`
/// or `always`): the threads that write them then take one page fault per
/// 2 MiB instead of one per 4 KiB. Freed blocks this large go back to the
/// system, so every run of a graph faults its large tensors in afresh: with
/// the advice, the full-size encoder took 2.00-2.04 s against 2.16-2.29 s
/// and the decoder 5.23-5.47 s against 5.78-5.92 s, for the same peak
/// memory (issue 20). Where the advice is refused (huge pages off, another
/// system) nothing changes; `IRIS_HUGE_PAGES=0` turns it off (for
/// comparisons; read once per process).
fn advise_huge_pages(values: &mut [f32]) {
    let bytes = core::mem::size_of_val(values);
    if bytes < HUGE_PAGES_FROM {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Some(page) = advice_page_size() {
        let start = values.as_mut_ptr() as usize;
        let first = start.next_multiple_of(page);
        let end = (start + bytes) / page * page;
        // SAFETY: the page-aligned range lies inside `values`, which this
        // function borrows mutably; the advice changes how its pages are
        // backed, not what they hold.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

/// The system's page size, once per process; `None` where
/// `IRIS_HUGE_PAGES=0` turns the advice off.
#[cfg(target_os = "linux")]
fn advice_page_size() -> Option<usize> {
    static PAGE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        if std::env::var_os("IRIS_HUGE_PAGES").is_some_and(|v| v == "0") {
            return None;
        }
        // SAFETY: `sysconf` only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page).ok().filter(|&p| p > 0)
    })
}

/// The output of an op that maps its f32 input `x` to a tensor of the
/// same shape: `x`'s own tensor where no other node still reads it (`f`
/// gets `None` and the values to change in place), else a new one (`f`
/// gets `x`'s values and the output's, unwritten, see [`unwritten`]).
///
/// # Safety
/// Given an input, `f` writes every value of the output.
pub(crate) unsafe fn in_place_or_new(
    x: TValue,
    f: impl FnOnce(Option<&[f32]>, &mut [f32]),
) -> TractResult<Tensor> {
    if x.is_exclusive() {
        let mut x = x.into_tensor();
        {
            let mut view = x.try_as_plain_ram_mut()?;
            f(None, view.as_slice_mut::<f32>()?);
        }
        return Ok(x);
    }
    let values = x.try_as_plain_ram()?;
    // SAFETY: `f` writes every value (the caller's promise).
    let mut out = unsafe { unwritten(x.shape())? };
    {
        let mut view = out.try_as_plain_ram_mut()?;
        f(Some(values.as_slice::<f32>()?), view.as_slice_mut::<f32>()?);
    }
    Ok(out)
}

/// Calls `f(state, i)` for every `i` in `0..n`, in parallel where the model
/// has a pool, with a `state` made by `init` and reused over the items one
/// thread takes in turn (scratch buffers, allocated a few times rather than
/// once per item).
pub(crate) fn for_each_with<S>(
    n: usize,
    init: impl Fn() -> S + Send + Sync,
    f: impl Fn(&mut S, usize) + Send + Sync,
) {
    match current_tract_executor() {
        Executor::MultiThread(pool) => {
            pool.install(|| (0..n).into_par_iter().for_each_init(init, f))
        }
        _ => {
            let mut state = init();
            (0..n).for_each(|i| f(&mut state, i));
        }
    }
}

/// `[f(state, 0), f(state, 1), .., f(state, n - 1)]`, computed in parallel
/// where the model has a pool, with a `state` made by `init` and reused as
/// in [`for_each_with`].
pub(crate) fn map_with<S, T: Send>(
    n: usize,
    init: impl Fn() -> S + Send + Sync,
    f: impl Fn(&mut S, usize) -> T + Send + Sync,
) -> Vec<T> {
    match current_tract_executor() {
        Executor::MultiThread(pool) => {
            pool.install(|| (0..n).into_par_iter().map_init(init, f).collect())
        }
        _ => {
            let mut state = init();
            (0..n).map(|i| f(&mut state, i)).collect()
        }
    }
}

/// Calls `f(i, input plane i, output plane i)` for the planes of `input`
/// (`input_plane` values each) and `out` (`out_plane` values each), in
/// parallel where the model has a pool. Planes past the shorter of the two
/// are not visited; empty planes never are.
pub(crate) fn for_each_plane(
    (input, input_plane): (&[f32], usize),
    (out, out_plane): (&mut [f32], usize),
    f: impl Fn(usize, &[f32], &mut [f32]) + Send + Sync,
) {
    if input_plane == 0 || out_plane == 0 {
        return;
    }
    let f = |(i, (x, y)): (usize, (&[f32], &mut [f32]))| f(i, x, y);
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.install(|| {
            input
                .par_chunks_exact(input_plane)
                .zip(out.par_chunks_exact_mut(out_plane))
                .enumerate()
                .for_each(f)
        }),
        _ => input
            .chunks_exact(input_plane)
            .zip(out.chunks_exact_mut(out_plane))
            .enumerate()
            .for_each(f),
    }
}

/// Calls `f(i, plane i)` for the planes of `values` (`plane` values each),
/// in parallel where the model has a pool; empty planes are not visited.
pub(crate) fn for_each_plane_mut(
    (values, plane): (&mut [f32], usize),
    f: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if plane == 0 {
        return;
    }
    let f = |(i, x): (usize, &mut [f32])| f(i, x);
    match current_tract_executor() {
        Executor::MultiThread(pool) => {
            pool.install(|| values.par_chunks_exact_mut(plane).enumerate().for_each(f))
        }
        _ => values.chunks_exact_mut(plane).enumerate().for_each(f),
    }
}

/// An output buffer that several threads write, each its own disjoint
/// part (the engine's convolution kernels write through it).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<'a> {
    start: *mut f32,
    len: usize,
    buffer: PhantomData<&'a mut [f32]>,
}

// SAFETY: the threads write disjoint values (see `SharedOut::slice`).
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        SharedOut {
            start: out.as_mut_ptr(),
            len: out.len(),
            buffer: PhantomData,
        }
    }

    /// The number of values in the buffer.
    pub(crate) fn len(self) -> usize {
        self.len
    }

    /// The start of the buffer.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.start
    }

    /// Values `start..start + len` of the buffer.
    ///
    /// # Safety
    /// No other thread reads or writes these values while the slice lives.
    pub(crate) unsafe fn slice(self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.len, "outside the output buffer");
        // SAFETY: inside the buffer (checked), which outlives 'a; the
        // caller keeps other threads off these values.
        unsafe { core::slice::from_raw_parts_mut(self.start.add(start), len) }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping of this process that holds `address`.
    fn flags_of_mapping_at(address: usize) -> Option<String> {
        let maps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in maps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            let bounds = range.and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((start, end)) = bounds.filter(|_| !line.starts_with("VmFlags")) {
                inside = (start..end).contains(&address);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_string());
            }
        }
        None
    }

    #[test]
    fn large_outputs_are_advised_to_use_huge_pages() {
        // Without transparent huge pages in the kernel the advice is refused.
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return;
        }
        let flags = |values: usize| {
            // SAFETY: the values are written before anything reads them.
            let mut tensor = unsafe { unwritten(&[values]) }.expect("allocates");
            let mut view = tensor.try_as_plain_ram_mut().expect("plain");
            let values = view.as_slice_mut::<f32>().expect("f32");
            values.fill(1.0);
            let middle = values[values.len() / 2..].as_ptr() as usize;
            flags_of_mapping_at(middle).expect("the output's mapping is listed")
        };
        // `hg`: the mapping was advised MADV_HUGEPAGE (unless turned off).
        let advised = |flags: &str| flags.split(' ').any(|f| f == "hg");
        let on = std::env::var_os("IRIS_HUGE_PAGES").is_none_or(|v| v != "0");
        let large = flags(HUGE_PAGES_FROM / 4 + 1024);
        assert_eq!(advised(&large), on, "{large}");
        let small = flags(1 << 16);
        assert!(!advised(&small), "{small}");
    }
}
