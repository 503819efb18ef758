//! Work split over the model's thread pool, for the engine's own tract ops.
//!
//! tract runs an op's `eval` on the calling thread; the engine's ops
//! (`conv3d`, `instance_norm`, `upsample`) split their work over the pool
//! that tract's matrix products use, found with
//! `current_tract_executor`, so they use the threads the caller gave the
//! model and no others.

use core::marker::PhantomData;

use rayon::prelude::*;
use tract_linalg::multithread::{Executor, current_tract_executor};
use tract_onnx::prelude::{IntoTensor, TValue, Tensor, TractResult};

/// An f32 tensor of `shape` for an op's output, its values not yet set, so
/// that the threads that write them are the ones that fault its pages in.
/// `Tensor::zero` fills it on the calling thread first (a fresh 268 MB
/// output took 150-200 ms to fill here, nearly all page faults), and a
/// `Vec` handed to tract through `ndarray` is copied into a tensor of
/// tract's own, the output made twice.
///
/// # Safety
/// The caller writes every value before the tensor is read.
pub(crate) unsafe fn unwritten(shape: &[usize]) -> TractResult<Tensor> {
    // SAFETY: f32 has no invalid values; the caller writes them all.
    unsafe { Tensor::uninitialized::<f32>(shape) }
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
