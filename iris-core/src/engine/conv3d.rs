//! The engine's own 3x3x3 convolution for tract, where the CPU has
//! AVX-512: Winograd's F(2x2x2, 3x3x3) (`winograd.rs`) for convolutions
//! with [`WINOGRAD_CHANNELS`] or more channels each way on volumes with
//! even sides, a direct kernel (below) for the others.
//!
//! tract runs a 3-D convolution as a matrix product over a lazily gathered
//! im2col (issue 20): 12-30 % of this machine's multiply-add peak on the
//! model's shapes, and at a batch above 1 over an eager im2col, 20 times
//! slower again. [`replacement`] gives each convolution the kernel here
//! serves (3x3x3, stride and dilation 1, zero padding 1 on every side, one
//! group, f32, constant weights) with [`DirectConv3d`] before tract
//! optimises the graph, except those with narrow rows (under
//! [`MIN_WIDTH`] voxels), several output channels and batch 1, which
//! tract's matrix product runs as fast; tract keeps every other
//! convolution.
//!
//! For each output row and register block the direct kernel accumulates
//! [`BLOCK`] output channels (or the one channel of a one-output
//! convolution) by 16, 32 or up to 128 positions in registers over every
//! input channel and the 27 taps: per tap, one 16-value load of the input
//! per vector and one fused multiply-add per vector and channel, with the
//! tap's weight broadcast. The input rows an output row reads are first
//! copied side by side with their zero padding ([`Rows`]), so the loads
//! need no masks and hit the nearest cache; taps above, below, in front of
//! or behind the volume are skipped. Depth slices run in parallel on the
//! model's thread pool, the samples of a batch one after the other. On
//! this project's 2-core VM (AMD EPYC, AVX-512) one thread of the kernel
//! ran 103-127 GFLOP/s on the model's wide shapes, about the core's
//! measured multiply-add peak (115 GFLOP/s). The sums run in another order than tract's, so results
//! differ from it by rounding only (about 1e-6 relative; the parity tests
//! hold at 1e-4).

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::{format, vec};

use tract_onnx::prelude::tract_itertools::Itertools;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::PaddingSpec;
use tract_onnx::tract_core::ops::cnn::conv::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::math::Add;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::Precision;
use super::parallel::SharedOut;
use super::winograd::Winograd;

/// Output channels one register block computes.
pub(crate) const BLOCK: usize = 8;
/// Narrowest row the engine's kernels take from batch-1 convolutions with
/// several output channels: the 8^3 level of the full-size model (256-512
/// input channels) stays with tract's matrix product, where it has long dot
/// products to work with and Winograd's tiles are few (the full-size encoder
/// took 3.02-3.11 s with it there against 2.94-3.01 s without, for 250 MiB
/// more). The 16^3 level is the engine's since session 18: by Winograd's
/// form the full-size encoder took 2.95-3.00 s against 3.38-3.50 s and the
/// decoder 8.30-8.92 s against 9.15-10.76 s (its 768-channel convolutions
/// 0.10-0.12 s against 0.39-0.40 s each), for 200 MiB more peak memory
/// (their transformed weights); the small model's decoder 122-141 ms
/// against 147-160 ms (`docs/benchmarks.md`).
pub(crate) const MIN_WIDTH: usize = 16;

/// Fewest input and output channels for which the convolution runs by
/// Winograd's algorithm (`winograd.rs`). Its transforms cost per channel
/// what its products save per channel pair, so it loses on few channels:
/// the small model's decoder took 164-182 ms with Winograd on its 8-channel
/// level, 150-156 ms without (and 164-175 ms with the direct kernel
/// everywhere).
pub(crate) const WINOGRAD_CHANNELS: usize = 16;

/// Whether this CPU runs the direct kernel (x86-64 with AVX-512F), unless
/// `IRIS_DIRECT_CONV=0` turns it off (for comparisons with tract's own
/// convolution) when a model's graphs are planned.
pub(crate) fn available() -> bool {
    std::env::var_os("IRIS_DIRECT_CONV").is_none_or(|v| v != "0") && has_avx512()
}

/// Whether this CPU is x86-64 with AVX-512F, which the engine's kernels
/// need.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The direct form of `node` where it is a convolution [`DirectConv3d`]
/// serves and the CPU runs the kernel, its Winograd form's products in
/// `precision`; its one input is the node's first.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
    precision: Precision,
) -> TractResult<Option<DirectConv3d>> {
    match node.op_as::<Conv>() {
        Some(conv) if available() => DirectConv3d::for_conv(model, node, conv, precision),
        _ => Ok(None),
    }
}

/// Another convolution that reads the input of convolution `node`, with
/// the op that runs both: where the CPU runs the kernels and both take
/// Winograd's form on that input, [`DirectConv3d`] with two outputs
/// (`node`'s channels, then the other's) transforms the input they share
/// once. The pre-activation blocks that change their channel count
/// convolve one normed input twice, for the block and for its shortcut: at
/// the decoder's 128^3 level a 96-channel input whose transform costs
/// about half of each convolution. The shortcut's sum with the block's
/// last convolution is then fused into that one ([`residual_sum`]). The
/// op's one input is `node`'s first; its products run in `precision`.
pub(crate) fn sibling<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
    precision: Precision,
) -> TractResult<Option<(&'m TypedNode, DirectConv3d)>> {
    let winograd = |node: &TypedNode| -> TractResult<Option<Served>> {
        let conv = match node.op_as::<Conv>() {
            Some(conv) if available() => conv,
            _ => return Ok(None),
        };
        let Some(served) = served(model, node, conv)? else {
            return Ok(None);
        };
        let [cin, cout] = served.channels;
        let serves = cin >= WINOGRAD_CHANNELS
            && cout >= WINOGRAD_CHANNELS
            && Winograd::serves(served.volume);
        Ok(serves.then_some(served))
    };
    let Some(first) = winograd(node)? else {
        return Ok(None);
    };
    for reader in model.outlet_successors(node.inputs[0]) {
        let other = model.node(reader.node);
        if other.id == node.id || reader.slot != 0 {
            continue;
        }
        if let Some(second) = winograd(other)? {
            let [cin, split] = first.channels;
            let channels = [cin, split + second.channels[1]];
            let (first_kernel, second_kernel) = (
                first.kernel.try_as_plain_ram()?,
                second.kernel.try_as_plain_ram()?,
            );
            let kernel = [
                first_kernel.as_slice::<f32>()?,
                second_kernel.as_slice::<f32>()?,
            ]
            .concat();
            let bias = [first.bias, second.bias].concat();
            let op = DirectConv3d {
                split: Some(split),
                ..DirectConv3d::new(&kernel, bias, channels, precision)
            };
            return Ok(Some((other, op)));
        }
    }
    Ok(None)
}

/// The `Add` node that is the one successor of convolution `node` and adds
/// to it an f32 term of its own shape, with that term: a convolution
/// [`replacement`] serves there can take the sum's place
/// ([`DirectConv3d::adding_residual`], inputs: the convolution's input and
/// the term).
pub(crate) fn residual_sum<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(&'m TypedNode, OutletId)>> {
    let [next] = node.outputs[0].successors.as_slice() else {
        return Ok(None);
    };
    let add = model.node(next.node);
    let is_add = add.op_as::<TypedBinOp>().is_some_and(|op| op.0.is::<Add>());
    if !is_add || add.inputs.len() != 2 {
        return Ok(None);
    }
    let residual = add.inputs[1 - next.slot];
    let conv = model.outlet_fact(OutletId::new(node.id, 0))?;
    let term = model.outlet_fact(residual)?;
    let sum = model.outlet_fact(OutletId::new(add.id, 0))?;
    if residual.node == node.id
        || term.datum_type != f32::datum_type()
        || term.shape != conv.shape
        || sum.shape != conv.shape
    {
        return Ok(None);
    }
    Ok(Some((add, residual)))
}

/// Whether `conv` (node `node`) has the form the engine's convolutions
/// take: a `side`³ kernel zero-padded by `side / 2` on every side, stride
/// and dilation 1, one group, weights `[Cout, Cin, ...]` over `[N, C, ...]`
/// data, not quantised, and three inputs (data, weights, bias).
pub(crate) fn is_plain(conv: &Conv, node: &TypedNode, side: usize) -> bool {
    let spec = &conv.pool_spec;
    let unit = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&s| s == 1));
    let pad = side / 2;
    let padded = match &spec.padding {
        PaddingSpec::Valid => pad == 0,
        PaddingSpec::Explicit(before, after) => {
            before.len() == 3 && before.iter().chain(after).all(|&p| p == pad)
        }
        _ => false,
    };
    conv.q_params.is_none()
        && conv.group == 1
        && conv.kernel_fmt == KernelFormat::OIHW
        && spec.data_format == DataFormat::NCHW
        && spec.kernel_shape.as_slice() == [side; 3]
        && unit(&spec.strides)
        && unit(&spec.dilations)
        && padded
        && node.inputs.len() == 3
}

/// What the engine's kernels take from a convolution they serve.
struct Served {
    /// `[Cout, Cin, 3, 3, 3]` f32, the graph's constant.
    kernel: Arc<Tensor>,
    /// `[Cout]`.
    bias: Vec<f32>,
    /// `[Cin, Cout]`.
    channels: [usize; 2],
    /// The input's `[D, H, W]`.
    volume: [usize; 3],
}

/// The weights of `conv` (node `node` of `model`) where the engine's kernels
/// serve it: 3x3x3, stride and dilation 1, zero padding 1, one group, f32,
/// constant weights, every shape known (see the module docs).
fn served(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Served>> {
    if !is_plain(conv, node, 3) {
        return Ok(None);
    }
    let spec = &conv.pool_spec;
    let (cin, cout) = (spec.input_channels, spec.output_channels);
    let input = model.outlet_fact(node.inputs[0])?;
    let shape = input.shape.as_concrete();
    let Some(&[n, c, d, h, w]) = shape else {
        return Ok(None);
    };
    // Narrow rows stay with tract, except where tract is slowest: one
    // output channel (a matrix product with one row) and batches
    // (eager im2col).
    let narrow = w < MIN_WIDTH && n == 1 && cout > 1;
    if input.datum_type != f32::datum_type() || c != cin || narrow {
        return Ok(None);
    }
    let constant = |ix: usize| -> TractResult<Option<Arc<Tensor>>> {
        let fact = model.outlet_fact(node.inputs[ix])?;
        Ok(fact
            .konst
            .clone()
            .filter(|t| t.datum_type() == f32::datum_type()))
    };
    let (Some(kernel), Some(bias)) = (constant(1)?, constant(2)?) else {
        return Ok(None);
    };
    if kernel.shape() != [cout, cin, 3, 3, 3] {
        return Ok(None);
    }
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = match bias.len() {
        1 => vec![bias[0]; cout],
        n if n == cout => bias,
        _ => return Ok(None),
    };
    Ok(Some(Served {
        kernel,
        bias,
        channels: [cin, cout],
        volume: [d, h, w],
    }))
}

/// A 3x3x3 convolution with padding 1, computed directly (see the module
/// docs). Input `[N, Cin, D, H, W]`, output `[N, Cout, D, H, W]`; with
/// `residual`, a second input of the output's shape is added to the output;
/// with `split`, two convolutions of one input ([`sibling`]).
#[derive(Debug, Clone)]
pub(crate) struct DirectConv3d {
    input_channels: usize,
    output_channels: usize,
    /// Whether the op adds its second input to its output.
    residual: bool,
    /// For two convolutions of one input: the first one's output channels.
    /// The op then has two outputs, `[N, split, D, H, W]` and the other
    /// channels, and runs by Winograd's form only.
    split: Option<usize>,
    /// Output channels per register block: [`BLOCK`], or 1 for a
    /// convolution with one output channel.
    block: usize,
    /// `[Cout / block (rounded up)][Cin][27][block]`, zero past `Cout`.
    weights: Arc<Vec<f32>>,
    /// `[Cout]`.
    bias: Arc<Vec<f32>>,
    /// The same weights in Winograd form, for convolutions with at least
    /// [`WINOGRAD_CHANNELS`] input and output channels: used on volumes
    /// with even sides.
    winograd: Option<Arc<Winograd>>,
}

/// Two ops are the same when they share their packed weights (tract
/// compares ops to merge equal nodes).
impl PartialEq for DirectConv3d {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && Arc::ptr_eq(&self.bias, &other.bias)
            && self.residual == other.residual
            && self.split == other.split
    }
}

impl Eq for DirectConv3d {}

/// What a convolution's output is added to.
#[derive(Clone, Copy)]
enum Addend<'a> {
    /// Nothing: the output is written, not read.
    Nothing,
    /// What the output holds (a residual in the output's own memory).
    Output,
    /// Other values of the output's size (a residual another node still
    /// reads), so that it is not copied first.
    Other(&'a [f32]),
}

impl DirectConv3d {
    /// The direct form of `conv` (node `node` of `model`), or `None` when
    /// the kernel does not serve it.
    fn for_conv(
        model: &TypedModel,
        node: &TypedNode,
        conv: &Conv,
        precision: Precision,
    ) -> TractResult<Option<Self>> {
        let Some(served) = served(model, node, conv)? else {
            return Ok(None);
        };
        let kernel = served.kernel.try_as_plain_ram()?;
        let kernel = kernel.as_slice::<f32>()?;
        Ok(Some(DirectConv3d::new(
            kernel,
            served.bias,
            served.channels,
            precision,
        )))
    }

    /// The same convolution adding its second input to its output (see
    /// [`residual_sum`]).
    pub(crate) fn adding_residual(self) -> Self {
        DirectConv3d {
            residual: true,
            ..self
        }
    }

    /// The op for `kernel` (`[Cout, Cin, 3, 3, 3]`) and `bias` (`[Cout]`),
    /// its Winograd form's products in `precision`.
    fn new(kernel: &[f32], bias: Vec<f32>, [cin, cout]: [usize; 2], precision: Precision) -> Self {
        let block = if cout == 1 { 1 } else { BLOCK };
        DirectConv3d {
            input_channels: cin,
            output_channels: cout,
            residual: false,
            split: None,
            block,
            weights: Arc::new(pack(kernel, [cin, cout], block)),
            bias: Arc::new(bias),
            winograd: (cin >= WINOGRAD_CHANNELS && cout >= WINOGRAD_CHANNELS)
                .then(|| Arc::new(Winograd::new(kernel, [cin, cout], precision))),
        }
    }

    /// The convolution of the samples of `input` (`[N, Cin, D, H, W]`, C
    /// order), one after the other, into `out` (`[N, Cout, D, H, W]`),
    /// plus `addend`.
    fn run_batch(&self, input: &[f32], [d, h, w]: [usize; 3], out: &mut [f32], addend: Addend) {
        let (voxels, size) = (d * h * w, self.output_channels * d * h * w);
        for (i, (sample, out)) in input
            .chunks_exact(self.input_channels * voxels)
            .zip(out.chunks_exact_mut(size))
            .enumerate()
        {
            let addend = match addend {
                Addend::Other(all) => Addend::Other(&all[i * size..][..size]),
                same => same,
            };
            self.run(sample, [d, h, w], out, addend);
        }
    }

    /// The convolution of one sample, `input` (`[Cin, D, H, W]`, C order),
    /// into `out` (`[Cout, D, H, W]`), plus `addend`.
    fn run(&self, input: &[f32], [d, h, w]: [usize; 3], out: &mut [f32], addend: Addend) {
        if let Some(winograd) = &self.winograd
            && Winograd::serves([d, h, w])
        {
            let accumulate = match addend {
                Addend::Nothing => false,
                Addend::Output => true,
                Addend::Other(values) => {
                    out.copy_from_slice(values);
                    true
                }
            };
            winograd.run(input, &self.bias, [d, h, w], [out, &mut []], accumulate);
            return;
        }
        assert_eq!(out.len(), self.output_channels * d * h * w, "output size");
        if let Addend::Other(values) = addend {
            assert_eq!(values.len(), out.len(), "addend size");
        }
        let out = SharedOut::new(out);
        // One `Rows` per thread, reused from slice to slice: a slot's key
        // names the input row it holds, so a row left by another slice is
        // either the one wanted or copied over.
        let rows = || self.rows(w);
        let slice = |rows: &mut Rows, z: usize| {
            let addend = match addend {
                Addend::Nothing => core::ptr::null(),
                Addend::Output => out.ptr().cast_const(),
                Addend::Other(values) => values.as_ptr(),
            };
            for y in 0..h {
                rows.gather(input, [z, y], [d, h, w], None);
                // SAFETY: `rows` holds the input rows of (z, y); `out` and
                // the addend (null or of `out`'s size, asserted above) hold
                // the output's values, and only this (z, y) writes its row.
                unsafe { self.row(rows, [z, y], [d, h, w], (out, addend)) };
            }
        };
        super::parallel::for_each_with(d, rows, slice);
    }

    /// Vectors of 16 outputs per register block on rows of `w`: enough for
    /// the row (one on rows of up to 16, two on wider ones) with eight
    /// output channels, up to eight with one.
    fn vectors(&self, w: usize) -> usize {
        match self.block {
            1 => w.div_ceil(16).next_power_of_two().min(8),
            _ if w <= 16 => 1,
            _ => 2,
        }
    }

    /// Scratch rows for the direct kernel on rows of `w`.
    pub(crate) fn rows(&self, w: usize) -> Rows {
        Rows::new(self.input_channels, w, 16 * self.vectors(w))
    }

    /// Output row (z, y) of every output channel by the direct kernel, from
    /// `rows` (gathered for (z, y)), into `out` (`[Cout, D, H, W]`) plus
    /// the values at the same places of `addend` unless it is null.
    ///
    /// # Safety
    /// `rows` holds the input rows of (z, y) ([`Rows::gather`], made by
    /// [`DirectConv3d::rows`] for this width); `out`, and `addend` unless
    /// null, hold `Cout * D * H * W` values, and no other thread touches
    /// row (z, y) of `out`.
    pub(crate) unsafe fn row(
        &self,
        rows: &Rows,
        [z, y]: [usize; 2],
        [d, h, w]: [usize; 3],
        (out, addend): (SharedOut<'_>, *const f32),
    ) {
        #[cfg(target_arch = "x86_64")]
        let kernel = avx512::kernel(self.block, self.vectors(w));
        for block in 0..self.output_channels.div_ceil(self.block) {
            // SAFETY: `available()` held when the op was made (`replacement`
            // gives it only then); the rest is the caller's promise.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                kernel(self, rows, [z, y, block], [d, h, w], (out.ptr(), addend))
            };
        }
    }

    /// The direct convolution of one channel to one with `kernel` (27
    /// taps) and `bias`.
    #[cfg(test)]
    pub(crate) fn one_channel(kernel: &[f32], bias: f32) -> Self {
        DirectConv3d::new(kernel, vec![bias], [1, 1], Precision::Float32)
    }

    /// Whether the op is a direct convolution of one channel to one that
    /// adds a residual (the task encoder's merges, [`super::merge`]).
    pub(crate) fn is_one_channel_with_residual(&self) -> bool {
        self.input_channels == 1
            && self.output_channels == 1
            && self.residual
            && self.split.is_none()
            && self.winograd.is_none()
    }
}

/// The input rows one output row reads, copied side by side.
///
/// In `[C, D, H, W]` the rows of one (z, y) lie a power of two apart
/// (`D * H * W` floats between channels), so at 128^3 they share cache
/// sets and the kernel's loads missed every cache level: 74 GFLOP/s on a
/// 32-deep 128^2 slab against 106 on an 8-deep one (one thread). Copied
/// here, the 9 rows of every channel are one contiguous block, read from
/// the nearest cache. Each depth plane keeps its last three rows (a ring
/// indexed by `y % 3`), so moving to the next output row copies one new
/// row per plane and channel.
pub(crate) struct Rows {
    /// `[Cin][3 planes][3 ring slots][stride]`; value `x` of a row is at
    /// `1 + x`, and the padding around it stays zero.
    values: Vec<f32>,
    /// Floats from one row to the next: `w` rounded up to the kernel's
    /// span, plus the padding before and after, so the kernel's loads need
    /// no masks.
    stride: usize,
    /// Which input row (`z * H + y`, plus one; zero for none) each slot
    /// holds.
    held: [usize; 9],
    /// The taps rows inside the volume read, as (tap row `3 * dz + dy`,
    /// offset of its slot in a channel's block); the kernel skips the
    /// others, which read padding.
    taps: [(usize, usize); 9],
    count: usize,
}

impl Rows {
    fn new(channels: usize, w: usize, span: usize) -> Self {
        let stride = w.next_multiple_of(span) + 2;
        Rows {
            values: vec![0.0; channels * 9 * stride],
            stride,
            held: [0; 9],
            taps: [(0, 0); 9],
            count: 0,
        }
    }

    /// Makes the rows output row (z, y) reads from `input` (`[Cin, D, H,
    /// W]`) ready, copying those not held yet; with `norms`, each
    /// channel's values as its norm maps them (`instance_norm::Affine::
    /// single`), the padding left zero.
    pub(crate) fn gather(
        &mut self,
        input: &[f32],
        [z, y]: [usize; 2],
        [d, h, w]: [usize; 3],
        norms: Option<&[[f32; 5]]>,
    ) {
        self.count = 0;
        for (dz, dy) in (0..9).map(|t| (t / 3, t % 3)) {
            if !(1..=d).contains(&(z + dz)) || !(1..=h).contains(&(y + dy)) {
                continue;
            }
            let (zi, yi) = (z + dz - 1, y + dy - 1);
            let slot = dz * 3 + yi % 3;
            self.taps[self.count] = (dz * 3 + dy, slot * self.stride);
            self.count += 1;
            if self.held[slot] != zi * h + yi + 1 {
                self.held[slot] = zi * h + yi + 1;
                let start = (zi * h + yi) * w;
                for (c, (channel, rows)) in input
                    .chunks_exact(d * h * w)
                    .zip(self.values.chunks_exact_mut(9 * self.stride))
                    .enumerate()
                {
                    let (from, to) = (
                        &channel[start..start + w],
                        &mut rows[slot * self.stride + 1..][..w],
                    );
                    match norms {
                        None => to.copy_from_slice(from),
                        Some(norms) => {
                            let [hi, lo, factor, bias, floor] = norms[c];
                            for (to, &x) in to.iter_mut().zip(from) {
                                *to = (((x - hi) - lo) * factor + bias).max(floor);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `[Cout, Cin, 3, 3, 3]` weights as `[Cout / block][Cin][27][block]`.
fn pack(kernel: &[f32], [cin, cout]: [usize; 2], block: usize) -> Vec<f32> {
    let mut packed = vec![0.0; cout.div_ceil(block) * block * cin * 27];
    for (co, ci, tap) in (0..cout)
        .cartesian_product(0..cin)
        .cartesian_product(0..27)
        .map(|((co, ci), tap)| (co, ci, tap))
    {
        packed[(((co / block) * cin + ci) * 27 + tap) * block + co % block] =
            kernel[(co * cin + ci) * 27 + tap];
    }
    packed
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{DirectConv3d, Rows};

    /// One output row for one block of output channels (see [`row_block`]).
    pub(super) type RowBlock =
        unsafe fn(&DirectConv3d, &Rows, [usize; 3], [usize; 3], (*mut f32, *const f32));

    /// The kernel for register blocks of `block` output channels (8 or 1)
    /// by `vectors` vectors of 16 outputs (1 or 2 with 8 channels; 1, 2, 4
    /// or 8 with one).
    pub(super) fn kernel(block: usize, vectors: usize) -> RowBlock {
        match (block, vectors) {
            (1, 1) => row_block::<1, 1>,
            (1, 2) => row_block::<1, 2>,
            (1, 4) => row_block::<1, 4>,
            (1, _) => row_block::<1, 8>,
            (_, 1) => row_block::<8, 1>,
            _ => row_block::<8, 2>,
        }
    }

    /// Output row `y` of depth slice `z` for output channels
    /// `block * OUT ..`, written into `out` (`[Cout, D, H, W]`) plus the
    /// values at the same places of `addend` where it is not null, in
    /// register blocks of `OUT` channels by `16 * VECTORS` positions.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `OUT` is the op's block; `z < D`, `y < H`;
    /// `block` is a block of the op's output channels; `out`, and `addend`
    /// unless null, hold `Cout * D * H * W` values. (`rows`, the input rows of (z, y) from
    /// [`Rows::gather`], is read through bounds-checked slices.)
    #[target_feature(enable = "avx512f")]
    unsafe fn row_block<const OUT: usize, const VECTORS: usize>(
        op: &DirectConv3d,
        rows: &Rows,
        [z, y, block]: [usize; 3],
        [d, h, w]: [usize; 3],
        (out, addend): (*mut f32, *const f32),
    ) {
        let span = 16 * VECTORS;
        let cin = op.input_channels;
        let channels = (op.output_channels - block * OUT).min(OUT);
        let weights = &op.weights[block * cin * 27 * OUT..][..cin * 27 * OUT];
        let taps = &rows.taps[..rows.count];
        let values = &rows.values[..cin * 9 * rows.stride];
        let mut x0 = 0;
        while x0 < w {
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; OUT];
            for (o, acc) in acc.iter_mut().enumerate().take(channels) {
                *acc = [_mm512_set1_ps(op.bias[block * OUT + o]); VECTORS];
            }
            for (weights, lines) in weights
                .chunks_exact(27 * OUT)
                .zip(values.chunks_exact(9 * rows.stride))
            {
                for &(tap_row, offset) in taps {
                    // Lane i of vector v reads padded position
                    // x0 + 16 v + i + dx, the input's x0 + 16 v + i + dx - 1,
                    // for tap dx: at most x0 + span + 1 < stride, as x0 < w.
                    let line = &lines[offset + x0..][..span + 2];
                    let tap_weights = &weights[tap_row * 3 * OUT..][..3 * OUT];
                    for (dx, tap) in tap_weights.chunks_exact(OUT).enumerate() {
                        let vectors: [__m512; VECTORS] = core::array::from_fn(|v| {
                            let lanes = &line[dx + 16 * v..][..16];
                            // SAFETY: `lanes` holds the 16 values loaded.
                            unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
                        });
                        for (acc, &weight) in acc.iter_mut().zip(tap) {
                            let weight = _mm512_set1_ps(weight);
                            for (acc, &vector) in acc.iter_mut().zip(&vectors) {
                                *acc = _mm512_fmadd_ps(weight, vector, *acc);
                            }
                        }
                    }
                }
            }
            // Store the first `w - x0` positions (up to `span`).
            let left = (w - x0).min(span);
            for (o, acc) in acc.iter().enumerate().take(channels) {
                let co = block * OUT + o;
                for (v, &acc) in acc.iter().enumerate() {
                    let mask = lanes(left.saturating_sub(16 * v).min(16));
                    if mask == 0 {
                        continue;
                    }
                    // SAFETY: the row `(co, z, y)` of `out` (and of
                    // `addend`) holds `w` values; this vector starts at its
                    // position `x0 + 16 v < w` (the mask is not empty), and
                    // the mask loads and stores only the positions below
                    // `w`.
                    unsafe {
                        let at = ((co * d + z) * h + y) * w + x0 + 16 * v;
                        let sum = if addend.is_null() {
                            acc
                        } else {
                            _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, addend.add(at)))
                        };
                        _mm512_mask_storeu_ps(out.add(at), mask, sum);
                    }
                }
            }
            x0 += span;
        }
    }

    /// A mask of the first `n` (at most 16) lanes.
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
}

impl Op for DirectConv3d {
    fn name(&self) -> StaticName {
        match (self.residual, self.split) {
            (true, _) => "IrisDirectConv3x3x3+Add".into(),
            (false, Some(_)) => "IrisDirectConv3x3x3 Pair".into(),
            (false, None) => "IrisDirectConv3x3x3".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let algorithm = match &self.winograd {
            Some(w) if w.precision() == Precision::Bfloat16 => {
                "Winograd F(2x2x2, 3x3x3) on even sides, bf16 products"
            }
            Some(_) => "Winograd F(2x2x2, 3x3x3) on even sides",
            None => "direct",
        };
        let outputs = match self.split {
            Some(split) => format!("{split} + {}", self.output_channels - split),
            None => self.output_channels.to_string(),
        };
        Ok(vec![format!(
            "{} -> {outputs} channels, {algorithm}",
            self.input_channels
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv3d {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 1 + usize::from(self.residual),
            "direct convolution: {} inputs, expected {}",
            inputs.len(),
            1 + usize::from(self.residual)
        );
        // Taken out of `inputs`, so that it is the only handle on the
        // residual where no other node reads it.
        let residual = if self.residual { inputs.pop() } else { None };
        let input = &inputs[0];
        let &[n, c, d, h, w] = input.shape() else {
            bail!(
                "direct convolution: input shape {:?}, expected [N, C, D, H, W]",
                input.shape()
            );
        };
        ensure!(
            c == self.input_channels,
            "direct convolution: {c} input channels, expected {}",
            self.input_channels
        );
        if let Some(split) = self.split {
            return self.eval_pair(values_of(input)?, [n, d, h, w], split);
        }
        let shape = [n, self.output_channels, d, h, w];
        if let Some(residual) = &residual {
            ensure!(
                residual.shape() == shape && residual.datum_type() == f32::datum_type(),
                "direct convolution: residual {:?} {:?}, expected f32 {shape:?}",
                residual.datum_type(),
                residual.shape()
            );
        }
        let out = match residual {
            // The sum goes into the residual's own tensor where no other
            // node reads it.
            Some(residual) if residual.is_exclusive() => {
                let mut out = residual.into_tensor();
                {
                    let mut view = out.try_as_plain_ram_mut()?;
                    let out = view.as_slice_mut::<f32>()?;
                    self.run_batch(values_of(input)?, [d, h, w], out, Addend::Output);
                }
                out
            }
            residual => {
                // SAFETY: `run_batch` writes every output (both kernels
                // store each value once, and read none they have not
                // written).
                let mut out = unsafe { super::parallel::unwritten(&shape)? };
                {
                    let mut view = out.try_as_plain_ram_mut()?;
                    let out = view.as_slice_mut::<f32>()?;
                    let addend = match &residual {
                        Some(residual) => Addend::Other(values_of(residual)?),
                        None => Addend::Nothing,
                    };
                    self.run_batch(values_of(input)?, [d, h, w], out, addend);
                }
                out
            }
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

/// The f32 values of `input`.
fn values_of(input: &TValue) -> TractResult<&[f32]> {
    input.try_as_plain_ram()?.as_slice::<f32>()
}

impl DirectConv3d {
    /// Two convolutions of one input (`split`: the first one's output
    /// channels), the samples one after the other, into two outputs.
    fn eval_pair(
        &self,
        input: &[f32],
        [n, d, h, w]: [usize; 4],
        split: usize,
    ) -> TractResult<TVec<TValue>> {
        let winograd = self
            .winograd
            .as_ref()
            .filter(|_| Winograd::serves([d, h, w]))
            .context("two convolutions of one input need Winograd's form")?;
        let voxels = d * h * w;
        let channels = [split, self.output_channels - split];
        // SAFETY: Winograd's form writes every output value of every
        // sample (its tiles cover the volume, whose sides are even).
        let mut first = unsafe { super::parallel::unwritten(&[n, channels[0], d, h, w])? };
        // SAFETY: as above.
        let mut second = unsafe { super::parallel::unwritten(&[n, channels[1], d, h, w])? };
        {
            let (mut firsts, mut seconds) = (
                first.try_as_plain_ram_mut()?,
                second.try_as_plain_ram_mut()?,
            );
            let firsts = firsts
                .as_slice_mut::<f32>()?
                .chunks_exact_mut(channels[0] * voxels);
            let seconds = seconds
                .as_slice_mut::<f32>()?
                .chunks_exact_mut(channels[1] * voxels);
            let samples = input.chunks_exact(self.input_channels * voxels);
            for ((sample, first), second) in samples.zip(firsts).zip(seconds) {
                winograd.run(sample, &self.bias, [d, h, w], [first, second], false);
            }
        }
        Ok(tvec!(first.into_tvalue(), second.into_tvalue()))
    }
}

impl TypedOp for DirectConv3d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let with_channels = |channels: usize| {
            let mut shape = inputs[0].shape.clone();
            shape.set(1, channels.to_dim());
            f32::fact(shape)
        };
        Ok(match self.split {
            Some(split) => tvec!(
                with_channels(split),
                with_channels(self.output_channels - split)
            ),
            None => tvec!(with_channels(self.output_channels)),
        })
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The convolution by its definition, in f64.
    fn reference(
        input: &[f32],
        kernel: &[f32],
        bias: &[f32],
        [cin, cout]: [usize; 2],
        [d, h, w]: [usize; 3],
    ) -> Vec<f64> {
        let at = |c: usize, z: isize, y: isize, x: isize| -> f64 {
            let inside = (0..d as isize).contains(&z)
                && (0..h as isize).contains(&y)
                && (0..w as isize).contains(&x);
            if inside {
                f64::from(input[((c * d + z as usize) * h + y as usize) * w + x as usize])
            } else {
                0.0
            }
        };
        let mut out = vec![0.0; cout * d * h * w];
        for (co, z, y, x) in (0..cout)
            .cartesian_product(0..d)
            .cartesian_product(0..h)
            .cartesian_product(0..w)
            .map(|(((co, z), y), x)| (co, z, y, x))
        {
            let mut sum = f64::from(bias[co]);
            for (ci, tap) in (0..cin).cartesian_product(0..27) {
                let (dz, dy, dx) = (tap / 9, tap / 3 % 3, tap % 3);
                let value = at(
                    ci,
                    (z + dz) as isize - 1,
                    (y + dy) as isize - 1,
                    (x + dx) as isize - 1,
                );
                sum += f64::from(kernel[(co * cin + ci) * 27 + tap]) * value;
            }
            out[((co * d + z) * h + y) * w + x] = sum;
        }
        out
    }

    /// A case of the kernels' tests: `[N, Cin, Cout]` and `[D, H, W]`.
    type Case = ([usize; 3], [usize; 3]);

    /// Cases Winograd's form serves (16 or more channels each way, even
    /// sides): a block of exactly one tile row, blocks that split rows (64
    /// tiles a row) and that span rows (20 and 17 tiles a row, runs
    /// crossing rows), one tile, output channels past a block, a batch of
    /// two.
    const WINOGRAD_CASES: [Case; 5] = [
        ([1, 16, 16], [2, 4, 64]),
        ([1, 17, 18], [4, 2, 128]),
        ([2, 16, 19], [4, 2, 40]),
        ([1, 20, 16], [2, 6, 34]),
        ([1, 16, 16], [2, 2, 2]),
    ];

    #[test]
    fn both_kernels_equal_the_definition_on_every_block_and_tail() {
        if !available() {
            std::println!("skipped: this CPU has no AVX-512F, the direct kernel is not used");
            return;
        }
        // The direct kernel: one output channel (every span) and blocks of
        // eight: below, at and past a block; rows of one span, with a
        // tail, and of several; one to five input channels; rows past the
        // three a plane keeps; batches of one to three. Then Winograd's.
        let direct: [Case; 10] = [
            ([1, 1, 1], [3, 4, 16]),
            ([2, 2, 1], [2, 3, 20]),
            ([1, 2, 1], [2, 7, 40]),
            ([3, 1, 1], [2, 2, 100]),
            ([1, 3, 12], [3, 2, 33]),
            ([2, 5, 8], [2, 2, 48]),
            ([1, 4, 9], [1, 3, 64]),
            ([1, 2, 16], [4, 1, 100]),
            ([1, 3, 8], [3, 6, 8]),
            ([1, 2, 3], [2, 5, 12]),
        ];
        let mut winograd_cases = 0;
        for (i, ([n, cin, cout], shape)) in direct.into_iter().chain(WINOGRAD_CASES).enumerate() {
            let voxels: usize = shape.iter().product();
            let input = values(n * cin * voxels, 3 * i as u64);
            let kernel = values(cout * cin * 27, 3 * i as u64 + 1);
            let bias = values(cout, 3 * i as u64 + 2);
            let op = DirectConv3d::new(&kernel, bias.clone(), [cin, cout], Precision::Float32);
            let expected: Vec<f64> = input
                .chunks_exact(cin * voxels)
                .flat_map(|sample| reference(sample, &kernel, &bias, [cin, cout], shape))
                .collect();
            let mut ops = vec![(
                "direct",
                DirectConv3d {
                    winograd: None,
                    ..op.clone()
                },
            )];
            if op.winograd.is_some() && Winograd::serves(shape) {
                winograd_cases += 1;
                ops.push(("winograd", op));
            }
            // Into a fresh output, added to a residual in the output's
            // memory, and added to one read from elsewhere.
            let residual = values(expected.len(), 3 * i as u64 + 3);
            for ((kernel, op), form) in ops.iter().cartesian_product(0..3) {
                let (mut out, addend) = match form {
                    0 => (vec![f32::NAN; expected.len()], Addend::Nothing),
                    1 => (residual.clone(), Addend::Output),
                    _ => (vec![f32::NAN; expected.len()], Addend::Other(&residual)),
                };
                op.run_batch(&input, shape, &mut out, addend);
                for (j, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                    let want = want
                        + match form {
                            0 => 0.0,
                            _ => f64::from(residual[j]),
                        };
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "case {i} ({n} x {cin} -> {cout}, {shape:?}, {kernel}, form \
                         {form}), value {j}: {got} vs {want}"
                    );
                }
            }
        }
        assert_eq!(winograd_cases, 5);
    }

    #[test]
    fn bfloat16_products_stay_within_their_rounding() {
        if Precision::Bfloat16.on_this_cpu() != Precision::Bfloat16 {
            std::println!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // An odd and an even count of input channels, output channels past
        // a block, a batch of two.
        for (i, ([n, cin, cout], shape)) in WINOGRAD_CASES.into_iter().enumerate() {
            let voxels: usize = shape.iter().product();
            let input = values(n * cin * voxels, 5 * i as u64);
            let kernel = values(cout * cin * 27, 5 * i as u64 + 1);
            let bias = values(cout, 5 * i as u64 + 2);
            let op = DirectConv3d::new(&kernel, bias.clone(), [cin, cout], Precision::Bfloat16);
            let mut out = vec![f32::NAN; n * cout * voxels];
            op.run_batch(&input, shape, &mut out, Addend::Nothing);
            // Each output against the exact sum, in units of the sum of its
            // terms' magnitudes: bfloat16 keeps 8 significant bits (a
            // relative step of 2^-8 each operand), and Winograd's
            // transforms add and subtract up to 64 such products a term.
            let magnitude = |x: &[f32]| x.iter().map(|v| v.abs()).collect::<Vec<_>>();
            let (abs_input, abs_kernel) = (magnitude(&input), magnitude(&kernel));
            let mut worst = 0.0f64;
            for (sample, (x, abs_x)) in input
                .chunks_exact(cin * voxels)
                .zip(abs_input.chunks_exact(cin * voxels))
                .enumerate()
            {
                let exact = reference(x, &kernel, &bias, [cin, cout], shape);
                let scale = reference(abs_x, &abs_kernel, &magnitude(&bias), [cin, cout], shape);
                let got = &out[sample * cout * voxels..][..cout * voxels];
                for (j, ((&got, want), scale)) in got.iter().zip(exact).zip(scale).enumerate() {
                    let error = (f64::from(got) - want).abs() / scale;
                    assert!(
                        error <= 2f64.powi(-7),
                        "case {i} ({cin} -> {cout}, {shape:?}), value {j}: {got} vs {want} \
                         (terms {scale})"
                    );
                    worst = worst.max(error);
                }
            }
            // The products did round: f32 stays near 1e-7 of the scale.
            assert!(worst > 1e-5, "case {i}: worst error {worst:e}");
        }
    }

    #[test]
    fn the_residual_is_added_in_place_only_where_no_other_node_reads_it() {
        if !available() {
            std::println!("skipped: this CPU has no AVX-512F, the direct kernel is not used");
            return;
        }
        let (cin, shape) = (3usize, [1usize, 3, 2, 3, 40]);
        let voxels: usize = shape[2..].iter().product();
        let kernel = values(cin * cin * 27, 7);
        let bias = values(cin, 8);
        let op = DirectConv3d::new(&kernel, bias.clone(), [cin, cin], Precision::Float32)
            .adding_residual();
        let x = values(cin * voxels, 9);
        let r = values(cin * voxels, 10);
        let conv = reference(&x, &kernel, &bias, [cin, cin], [2, 3, 40]);
        // `conv(x) + r`, with `r` also an output of the model (read
        // elsewhere: the sum goes into a copy) or not (into `r` itself).
        for keep_residual in [false, true] {
            let mut model = TypedModel::default();
            let input = model.add_source("x", f32::fact(shape)).expect("source");
            let residual = model.add_source("r", f32::fact(shape)).expect("source");
            let sum = model
                .wire_node("conv", op.clone(), &[input, residual])
                .expect("wires")[0];
            let outputs = match keep_residual {
                false => vec![sum],
                true => vec![sum, residual],
            };
            model.select_output_outlets(&outputs).expect("outputs");
            let plan = model.into_runnable().expect("plans");
            let [x_tensor, r_tensor] =
                [&x, &r].map(|v| Tensor::from_shape(&shape, v).expect("tensor"));
            let given = r_tensor.as_ptr::<f32>().expect("f32");
            let inputs = tvec!(x_tensor.into_tvalue(), r_tensor.into_tvalue());
            let out = plan.run(inputs).expect("runs");
            // The sum is in the residual's own memory exactly where no
            // other node reads the residual.
            let result = out[0].as_ptr::<f32>().expect("f32");
            assert_eq!(result == given, !keep_residual, "keep {keep_residual}");
            let got = out[0].try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for (j, (&got, (&c, &r))) in got.iter().zip(conv.iter().zip(&r)).enumerate() {
                let want = c + f64::from(r);
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "keep {keep_residual}, value {j}: {got} vs {want}"
                );
            }
            if keep_residual {
                let kept = out[1].try_as_plain_ram().expect("plain");
                assert_eq!(kept.as_slice::<f32>().expect("f32"), r.as_slice());
            }
        }
    }

    #[test]
    fn a_pair_computes_both_convolutions_of_its_input() {
        if !available() {
            std::println!("skipped: this CPU has no AVX-512F, the direct kernel is not used");
            return;
        }
        // Two samples; 16 and 20 output channels, so that a register block
        // of the products holds channels of both outputs.
        let (n, cin, couts, volume) = (2usize, 16usize, [16usize, 20], [4usize, 2, 34]);
        let voxels: usize = volume.iter().product();
        let input = values(n * cin * voxels, 40);
        let kernels = couts.map(|c| values(c * cin * 27, 41 + c as u64));
        let biases = couts.map(|c| values(c, 42 + c as u64));
        let op = DirectConv3d {
            split: Some(couts[0]),
            ..DirectConv3d::new(
                &kernels.concat(),
                biases.concat(),
                [cin, couts[0] + couts[1]],
                Precision::Float32,
            )
        };
        let mut model = TypedModel::default();
        let shape = [n, cin, volume[0], volume[1], volume[2]];
        let x = model.add_source("x", f32::fact(shape)).expect("source");
        let outputs = model.wire_node("pair", op, &[x]).expect("wires");
        model.select_output_outlets(&outputs).expect("outputs");
        let plan = model.into_runnable().expect("plans");
        let tensor = Tensor::from_shape(&shape, &input).expect("tensor");
        let got = plan.run(tvec!(tensor.into_tvalue())).expect("runs");
        assert_eq!(got.len(), 2);
        for (k, got) in got.iter().enumerate() {
            assert_eq!(got.shape(), [n, couts[k], volume[0], volume[1], volume[2]]);
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            let want = input.chunks_exact(cin * voxels).flat_map(|sample| {
                reference(sample, &kernels[k], &biases[k], [cin, couts[k]], volume)
            });
            for (j, (&got, want)) in got.iter().zip(want).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "output {k}, value {j}: {got} vs {want}"
                );
            }
        }
    }
}
