//! The 3x3x3 convolution of the encoder and decoder blocks (stride 1, zero
//! padding 1, no bias), with a fast CPU path.
//!
//! burn's `Conv3d` on the `flex` backend computes the weight gradient as a
//! convolution whose kernel is the whole output volume; with its input
//! gradient that made the backward pass 5 to 10 times the forward pass and
//! a `small` training step take 6 s. On `flex` (with or without autodiff)
//! [`conv3x3`] therefore runs its own kernels and its own backward pass,
//! built on matrix products (the `gemm` crate, as `flex` itself uses):
//!
//! - **forward**: the output is cut into tiles of whole lines (`W`
//!   voxels). Per tile the 9 `(z, y)`-neighbouring lines of every input
//!   channel are gathered into a matrix `[9 C_in, T]` (small enough to stay
//!   in cache), multiplied by the weights arranged as `[3 C_out, 9 C_in]`,
//!   and the 3 products, one per kernel offset along `W`, are added into
//!   the output shifted by -1, 0 and +1 voxel. This is im2col with a third
//!   of the copying, and the products have `3 C_out` columns, which suits
//!   `gemm`'s kernels better than `C_out` for few channels;
//! - **input gradient**: the same convolution of the output gradient,
//!   with the kernel flipped and `C_in`, `C_out` swapped;
//! - **weight gradient**: from the same gathered matrix of the output
//!   gradient, times the tile's input lines shifted along `W`
//!   (`[3 C_in, T]`), summed over tiles.
//!
//! Tiles run in parallel on rayon's global pool (`RAYON_NUM_THREADS`), each
//! matrix product on one thread, writing straight into the output.
//! Nothing larger than the input and output is allocated, and the autodiff
//! graph keeps only the input and the weights, as burn's own convolution
//! does. Other backends (the GPU ones) use burn's `conv3d`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor, Flex};
use burn::module::Param;
use burn::nn::conv::Conv3d;
use burn::nn::{Initializer, PaddingConfig3d};
use burn::prelude::*;
use burn::tensor::module::conv3d;
use burn::tensor::ops::ConvOptions;
use rayon::prelude::*;

use super::ops::{FlexValues, as_primitive, flex_tensor};

/// Side of the cubic kernel.
const KERNEL: usize = 3;
/// Taps of the kernel, `3³`.
const TAPS: usize = KERNEL * KERNEL * KERNEL;
/// Largest gathered tile in `f32`s (512 KiB), so that a tile stays in
/// cache between being gathered and being multiplied.
const TILE_FLOATS: usize = 1 << 17;
/// Tiles per group whose weight-gradient contributions are summed in a
/// fixed order (see [`backward`]).
const GROUP: usize = 4;

/// Configuration of a [`Conv3x3`].
#[derive(Config, Debug)]
pub struct Conv3x3Config {
    /// Input channels.
    pub channels_in: usize,
    /// Output channels.
    pub channels_out: usize,
}

/// A 3x3x3 convolution, stride 1, zero padding 1, no bias: the same maths
/// and the same weight layout as burn's `Conv3d` (and ONNX `Conv`) with
/// those settings.
#[derive(Module, Debug)]
pub struct Conv3x3 {
    /// Weights `[C_out, C_in, 3, 3, 3]`, kernel axes in `[D, H, W]` order.
    pub weight: Param<Tensor<5>>,
}

impl Conv3x3Config {
    /// Builds the convolution with freshly initialised weights on `device`,
    /// drawn as burn's `Conv3dConfig` default draws them (Kaiming uniform,
    /// gain `1 / sqrt(3)`, fan in `27 C_in`).
    pub fn init(&self, device: &Device) -> Conv3x3 {
        let shape = [self.channels_out, self.channels_in, KERNEL, KERNEL, KERNEL];
        let weight = Initializer::KaimingUniform {
            gain: 1.0 / 3.0f64.sqrt(),
            fan_out_only: false,
        }
        .init_with(
            shape,
            Some(self.channels_in * TAPS),
            Some(self.channels_out * TAPS),
            device,
        );
        Conv3x3 { weight }
    }
}

impl Conv3x3 {
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]`
    /// - output: `[B, C_out, D, H, W]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        conv3x3(x, self.weight.val())
    }
}

/// 3x3x3 convolution with stride 1, zero padding 1 and no bias, equal to
/// burn's `conv3d` with those options (see the module docs for how).
///
/// # Shapes
/// - `x`: `[B, C_in, D, H, W]`
/// - `weight`: `[C_out, C_in, 3, 3, 3]`
/// - output: `[B, C_out, D, H, W]`
///
/// # Panics
/// If the shapes do not fit each other.
pub fn conv3x3(x: Tensor<5>, weight: Tensor<5>) -> Tensor<5> {
    let [_, channels_in, ..] = x.dims();
    let [_, weight_in, kd, kh, kw] = weight.dims();
    assert!(
        weight_in == channels_in && [kd, kh, kw] == [KERNEL; 3],
        "conv3x3: weight {:?} does not fit input {:?}",
        weight.dims(),
        x.dims()
    );
    if let Some((x, weight)) = flex_pair::<Flex>(&x, &weight) {
        return Tensor::from_primitive::<Flex>(flex_forward(x, weight));
    }
    autodiff_conv::<NoCheckpointing>(&x, &weight)
        .or_else(|| autodiff_conv::<BalancedCheckpointing>(&x, &weight))
        .unwrap_or_else(|| burn_conv3x3(x, weight))
}

/// A burn [`Conv3d`], through [`conv3x3`] (plus its bias) when it is a
/// 3x3x3 convolution with stride 1, padding 1 (explicit or `Same`), no
/// dilation and one group, and through its own `forward` otherwise. For
/// layers that keep burn's module (and its bias) for their parameters.
///
/// # Shapes
/// - `x`: `[B, C_in, D, H, W]`
/// - output: as `conv.forward(x)`
pub fn conv3d_forward(conv: &Conv3d, x: Tensor<5>) -> Tensor<5> {
    let padding_one = matches!(
        conv.padding,
        PaddingConfig3d::Explicit(1, 1, 1) | PaddingConfig3d::Same
    );
    if conv.kernel_size != [KERNEL; 3]
        || conv.stride != [1; 3]
        || conv.dilation != [1; 3]
        || conv.groups != 1
        || !padding_one
    {
        return conv.forward(x);
    }
    let y = conv3x3(x, conv.weight.val());
    match &conv.bias {
        Some(bias) => {
            let [channels] = bias.dims();
            y + bias.val().reshape([1, channels, 1, 1, 1])
        }
        None => y,
    }
}

/// burn's own convolution with the same settings (GPU backends).
fn burn_conv3x3(x: Tensor<5>, weight: Tensor<5>) -> Tensor<5> {
    conv3d(x, weight, None, ConvOptions::new([1; 3], [1; 3], [1; 3], 1))
}

/// Both tensors as `f32` primitives of backend `B`, or `None`.
fn flex_pair<B>(
    x: &Tensor<5>,
    weight: &Tensor<5>,
) -> Option<(B::FloatTensorPrimitive, B::FloatTensorPrimitive)>
where
    B: Backend,
    DispatchTensor: DispatchKindConversion<B>,
{
    Some((as_primitive::<B, 5>(x)?, as_primitive::<B, 5>(weight)?))
}

/// The convolution as a tracked autodiff operation on `Autodiff<Flex, C>`,
/// or `None` when the tensors live elsewhere.
fn autodiff_conv<C: CheckpointStrategy>(x: &Tensor<5>, weight: &Tensor<5>) -> Option<Tensor<5>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Flex, C>>,
{
    let (x, weight) = flex_pair::<Autodiff<Flex, C>>(x, weight)?;
    let output = match Conv3x3Backward
        .prepare::<C>([x.node(), weight.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (x, weight) = (x.into_primitive(), weight.into_primitive());
            let output = flex_forward(x.clone(), weight.clone());
            prep.finish((x, weight), output)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(flex_forward(x.into_primitive(), weight.into_primitive()))
        }
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(output))
}

/// Backward pass of [`conv3x3`] on `flex`; its state is the input and the
/// weights.
#[derive(Debug)]
struct Conv3x3Backward;

impl Backward<Flex, 2> for Conv3x3Backward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight) = ops.state;
        let (x, weight, grad) = (
            FlexValues::new(&x),
            FlexValues::new(&weight),
            FlexValues::new(&grad),
        );
        let (dx, dw) = backward(
            x.values(),
            weight.values(),
            grad.values(),
            Sizes::of(&x, &weight),
            [node_x.is_some(), node_weight.is_some()],
        );
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, flex_tensor(dx, x.shape));
        }
        if let (Some(node), Some(dw)) = (node_weight, dw) {
            grads.register::<Flex>(node.id, flex_tensor(dw, weight.shape));
        }
    }
}

/// [`conv3x3`] on flex tensors.
fn flex_forward(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
    let (x, weight) = (FlexValues::new(&x), FlexValues::new(&weight));
    let sizes = Sizes::of(&x, &weight);
    let mut shape = x.shape.clone();
    shape[1] = sizes.channels_out;
    flex_tensor(forward(x.values(), weight.values(), sizes), shape)
}

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    batch: usize,
    channels_in: usize,
    channels_out: usize,
    /// `[D, H, W]` in voxels.
    volume: [usize; 3],
}

/// A block of output voxels: `rows` lines of `W` voxels from line `first`
/// (line `z * H + y`) of image `batch`.
#[derive(Clone, Copy, Debug)]
struct Tile {
    batch: usize,
    first: usize,
    rows: usize,
}

impl Sizes {
    fn of(x: &FlexValues, weight: &FlexValues) -> Self {
        Self {
            batch: x.shape[0],
            channels_in: x.shape[1],
            channels_out: weight.shape[0],
            volume: [x.shape[2], x.shape[3], x.shape[4]],
        }
    }

    fn voxels(&self) -> usize {
        self.volume.iter().product()
    }

    /// The volume cut into tiles whose gathered matrices, `rows` values
    /// per voxel, hold at most [`TILE_FLOATS`] values (at least one line).
    fn tiles(&self, rows: usize) -> Vec<Tile> {
        let [d, h, w] = self.volume;
        let lines = d * h;
        let per_tile = (TILE_FLOATS / (rows * w).max(1)).clamp(1, lines.max(1));
        (0..self.batch)
            .flat_map(|batch| {
                (0..lines).step_by(per_tile).map(move |first| Tile {
                    batch,
                    first,
                    rows: per_tile.min(lines - first),
                })
            })
            .collect()
    }
}

/// The 9 `(z, y)` neighbours of a tile's lines, `[9 channels, T]`: row
/// `(i * 3 + a) * 3 + b` holds line `(z + a - 1, y + b - 1)` of channel `i`
/// of `image` (`[channels, D, H, W]`) for each of the tile's lines
/// `(z, y)`, zero outside the volume. The shifts along `W` are applied to
/// the products instead (see [`combine`]), so this matrix is a third of a
/// full im2col.
fn gather_lines(image: &[f32], volume: [usize; 3], tile: Tile, out: &mut Vec<f32>) {
    let [d, h, w] = volume;
    let plane = d * h * w;
    let t = tile.rows * w;
    out.resize(image.len() / plane * 9 * t, 0.0);
    for (row, lines) in out.chunks_exact_mut(t).enumerate() {
        let (channel, a, b) = (row / 9, (row / 3) % 3, row % 3);
        let source = &image[channel * plane..(channel + 1) * plane];
        for (i, line) in lines.chunks_exact_mut(w).enumerate() {
            let (z, y) = ((tile.first + i) / h, (tile.first + i) % h);
            // Line (z + a - 1, y + b - 1), written without underflow.
            if z + a == 0 || z + a > d || y + b == 0 || y + b > h {
                line.fill(0.0);
            } else {
                let start = ((z + a - 1) * h + (y + b - 1)) * w;
                line.copy_from_slice(&source[start..start + w]);
            }
        }
    }
}

/// The tile's own lines shifted along `W`, `[3 channels, T]`: row
/// `i * 3 + c` holds channel `i` read at `x + c - 1`, zero past the ends
/// of each line.
fn shift_lines(image: &[f32], volume: [usize; 3], tile: Tile, out: &mut Vec<f32>) {
    let [d, h, w] = volume;
    let plane = d * h * w;
    let t = tile.rows * w;
    out.resize(image.len() / plane * 3 * t, 0.0);
    for (row, lines) in out.chunks_exact_mut(t).enumerate() {
        let (channel, c) = (row / 3, row % 3);
        let start = channel * plane + tile.first * w;
        let source = &image[start..start + t];
        for (line, src) in lines.chunks_exact_mut(w).zip(source.chunks_exact(w)) {
            shift_into(line, src, c);
        }
    }
}

/// `line[x] = src[x + c - 1]`, zero where that falls outside `src`.
fn shift_into(line: &mut [f32], src: &[f32], c: usize) {
    let w = line.len();
    match c {
        0 => {
            line[0] = 0.0;
            line[1..].copy_from_slice(&src[..w - 1]);
        }
        1 => line.copy_from_slice(src),
        _ => {
            line[..w - 1].copy_from_slice(&src[1..]);
            line[w - 1] = 0.0;
        }
    }
}

/// Adds `src[x + c - 1]` (zero outside `src`) to `line[x]`.
fn add_shifted(line: &mut [f32], src: &[f32], c: usize) {
    let w = line.len();
    let (dst, src) = match c {
        0 => (&mut line[1..], &src[..w - 1]),
        1 => (&mut line[..], src),
        _ => (&mut line[..w - 1], &src[1..]),
    };
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// The weights as the matrix that multiplies [`gather_lines`]' output:
/// `[3 C_out, 9 C_in]`, entry `((c, o), (i, a, b))` = `weight[o, i, a, b,
/// c]` (`weight` is `[C_out, C_in, 3, 3, 3]` row-major).
fn line_weights(weight: &[f32], channels_out: usize, channels_in: usize) -> Vec<f32> {
    let mut matrix = vec![0.0; weight.len()];
    for o in 0..channels_out {
        for i in 0..channels_in {
            for tap in 0..TAPS {
                let (ab, c) = (tap / 3, tap % 3);
                matrix[(c * channels_out + o) * channels_in * 9 + i * 9 + ab] =
                    weight[(o * channels_in + i) * TAPS + tap];
            }
        }
    }
    matrix
}

/// The output `[B, channels, D, H, W]` (`volume`) cut into each tile's
/// pieces: entry `[tile][channel]` is that channel's run of the tile's
/// voxels, so that tiles can write their results in parallel.
fn tile_slots<'a>(
    volume: &'a mut [f32],
    tiles: &[Tile],
    channels: usize,
    sizes: Sizes,
) -> Vec<Vec<&'a mut [f32]>> {
    let [_, _, w] = sizes.volume;
    let mut slots: Vec<Vec<&mut [f32]>> = tiles.iter().map(|_| Vec::new()).collect();
    for (index, mut rest) in volume.chunks_mut(sizes.voxels().max(1)).enumerate() {
        let batch = index / channels;
        // Tiles of one batch element are consecutive and in line order.
        for (slot, tile) in slots.iter_mut().zip(tiles) {
            if tile.batch == batch {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(tile.rows * w);
                slot.push(piece);
                rest = tail;
            }
        }
    }
    slots
}

/// Adds a tile's product `[3 channels, T]` (rows `(c, channel)`, the
/// contributions of the kernel's `W` offset `c - 1`) into its output
/// pieces: voxel `x` of a line gets row `(c, channel)` at `x + c - 1`,
/// summed over `c`, zero outside the line.
fn combine(pieces: &mut [&mut [f32]], product: &[f32], w: usize) {
    let channels = pieces.len();
    for (channel, out) in pieces.iter_mut().enumerate() {
        let t = out.len();
        for c in 0..KERNEL {
            let row = &product[(c * channels + channel) * t..(c * channels + channel + 1) * t];
            for (line, src) in out.chunks_exact_mut(w).zip(row.chunks_exact(w)) {
                add_shifted(line, src, c);
            }
        }
    }
}

/// The convolution of `x` (`[B, C_in, D, H, W]`) with `weights` from
/// [`line_weights`] (`[3 C_out, 9 C_in]`), giving `[B, C_out, D, H, W]`:
/// per tile, the weights times the tile's [`gather_lines`], then
/// [`combine`].
fn convolve(x: &[f32], weights: &[f32], sizes: Sizes) -> Vec<f32> {
    let (cin, cout) = (sizes.channels_in, sizes.channels_out);
    let [_, _, w] = sizes.volume;
    let n = sizes.voxels();
    let k = cin * 9;
    let mut output = vec![0.0; sizes.batch * cout * n];
    if output.is_empty() || k == 0 {
        return output;
    }
    let tiles = sizes.tiles(k);
    let slots = tile_slots(&mut output, &tiles, cout, sizes);
    tiles.par_iter().zip(slots).for_each_init(
        || (Vec::new(), Vec::new()),
        |(lines, product), (&tile, mut pieces)| {
            let image = &x[tile.batch * cin * n..(tile.batch + 1) * cin * n];
            gather_lines(image, sizes.volume, tile, lines);
            let t = lines.len() / k;
            product.resize(3 * cout * t, 0.0);
            matmul(
                MatrixMut::row_major(product, 3 * cout, t),
                false,
                Matrix::row_major(weights, 3 * cout, k),
                Matrix::row_major(lines, k, t),
            );
            combine(&mut pieces, product, w);
        },
    );
    output
}

/// The convolution: `x` `[B, C_in, D, H, W]` and `weight`
/// `[C_out, C_in, 3, 3, 3]`, both row-major, give `[B, C_out, D, H, W]`.
fn forward(x: &[f32], weight: &[f32], sizes: Sizes) -> Vec<f32> {
    let weights = line_weights(weight, sizes.channels_out, sizes.channels_in);
    convolve(x, &weights, sizes)
}

/// Gradients with respect to the input and the weights (each only if
/// asked for in `wanted`), given the input `x`, the weights and the output
/// gradient `grad` (`[B, C_out, D, H, W]`).
///
/// Per tile, one [`gather_lines`] matrix of `grad`, `G`, serves both:
/// - the input gradient is the convolution of `grad` with the kernel
///   flipped and `C_in`, `C_out` swapped, i.e. [`convolve`]'s product
///   with those weights;
/// - the weight gradient `dW[o, i, a, b, c] = sum_p grad[o, p] x[i, p +
///   (a, b, c) - 1]` is, substituting `q = p + (a - 1, b - 1, 0)`,
///   `sum_q G[(o, 2 - a, 2 - b), q] X[(i, c), q]` with `X` the tile's
///   [`shift_lines`] of `x`: one product `X G^T` per tile, summed.
fn backward(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    sizes: Sizes,
    wanted: [bool; 2],
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (cin, cout) = (sizes.channels_in, sizes.channels_out);
    let n = sizes.voxels();
    let (k, rows_x) = (cout * 9, cin * 3);
    if n == 0 || k == 0 || rows_x == 0 {
        // Empty volumes or channels: all gradients are zero.
        return (
            wanted[0].then(|| vec![0.0; sizes.batch * cin * n]),
            wanted[1].then(|| vec![0.0; weight.len()]),
        );
    }
    // The flipped, transposed kernel `[C_in, C_out, 3, 3, 3]`.
    let mut flipped = vec![0.0; weight.len()];
    for o in 0..cout {
        for i in 0..cin {
            for tap in 0..TAPS {
                flipped[(i * cout + o) * TAPS + tap] =
                    weight[(o * cin + i) * TAPS + TAPS - 1 - tap];
            }
        }
    }
    let flipped = line_weights(&flipped, cin, cout);
    let tiles = sizes.tiles(k + rows_x);
    let [_, _, w] = sizes.volume;
    // The input gradient is written tile by tile into `dx`'s pieces.
    let mut dx = vec![0.0; if wanted[0] { sizes.batch * cin * n } else { 0 }];
    let mut slots = if wanted[0] {
        tile_slots(&mut dx, &tiles, cin, sizes)
    } else {
        tiles.iter().map(|_| Vec::new()).collect()
    };
    // Tiles go in fixed groups of `GROUP`, each summing its `X G^T`
    // (`[3 C_in, 9 C_out]`, stored column-major) in tile order, and the
    // group sums are added in group order: the weight gradient is the same
    // whatever the thread count and scheduling (training resumes
    // bit-exactly). Per worker: the gathered `G`, shifted `X` and product
    // buffers.
    let partial_sums: Vec<Vec<f32>> = tiles
        .par_chunks(GROUP)
        .zip(slots.par_chunks_mut(GROUP))
        .map_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(lines, shifted, product), (group, group_slots)| {
                let mut sum = vec![0.0; if wanted[1] { k * rows_x } else { 0 }];
                for (&tile, pieces) in group.iter().zip(group_slots) {
                    let image = &grad[tile.batch * cout * n..(tile.batch + 1) * cout * n];
                    gather_lines(image, sizes.volume, tile, lines);
                    let t = lines.len() / k;
                    if wanted[0] {
                        product.resize(3 * cin * t, 0.0);
                        matmul(
                            MatrixMut::row_major(product, 3 * cin, t),
                            false,
                            Matrix::row_major(&flipped, 3 * cin, k),
                            Matrix::row_major(lines, k, t),
                        );
                        combine(pieces, product, w);
                    }
                    if wanted[1] {
                        let image = &x[tile.batch * cin * n..(tile.batch + 1) * cin * n];
                        shift_lines(image, sizes.volume, tile, shifted);
                        let dst = MatrixMut {
                            values: &mut sum,
                            rows: rows_x,
                            cols: k,
                            row_stride: 1,
                            col_stride: rows_x,
                        };
                        let lines_t = Matrix {
                            values: lines,
                            rows: t,
                            cols: k,
                            row_stride: 1,
                            col_stride: t,
                        };
                        matmul(dst, true, Matrix::row_major(shifted, rows_x, t), lines_t);
                    }
                }
                sum
            },
        )
        .collect();
    let summed = partial_sums
        .into_iter()
        .reduce(|mut sum, other| {
            sum.iter_mut().zip(&other).for_each(|(a, b)| *a += b);
            sum
        })
        .unwrap_or_else(|| vec![0.0; k * rows_x]);
    let input_gradient = wanted[0].then_some(dx);
    let weight_gradient = wanted[1].then(|| {
        let mut dw = vec![0.0; cout * cin * TAPS];
        for o in 0..cout {
            for i in 0..cin {
                for tap in 0..TAPS {
                    let (a, b, c) = (tap / 9, (tap / 3) % 3, tap % 3);
                    let g_row = o * 9 + (2 - a) * 3 + (2 - b);
                    dw[(o * cin + i) * TAPS + tap] = summed[g_row * rows_x + i * 3 + c];
                }
            }
        }
        dw
    });
    (input_gradient, weight_gradient)
}

/// A strided matrix view: element `(i, j)` is
/// `values[i * row_stride + j * col_stride]`.
struct Matrix<'a> {
    values: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A strided mutable matrix view, laid out as [`Matrix`].
struct MatrixMut<'a> {
    values: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    fn row_major(values: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            values,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
}

impl<'a> MatrixMut<'a> {
    fn row_major(values: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            values,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
}

/// Whether every element of a `rows x cols` view with these strides lies
/// inside a slice of `len` values.
fn in_bounds(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * row_stride + (cols - 1) * col_stride < len
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`, on the
/// calling thread.
///
/// # Panics
/// If the sizes do not fit or a view reaches outside its slice.
fn matmul(dst: MatrixMut<'_>, accumulate: bool, lhs: Matrix<'_>, rhs: Matrix<'_>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k
            && (dst.rows, dst.cols) == (m, n)
            && in_bounds(dst.values.len(), m, n, dst.row_stride, dst.col_stride)
            && in_bounds(lhs.values.len(), m, k, lhs.row_stride, lhs.col_stride)
            && in_bounds(rhs.values.len(), k, n, rhs.row_stride, rhs.col_stride),
        "matmul: [{m}, {k}] x [{}, {n}] into [{}, {}]",
        rhs.rows,
        dst.rows,
        dst.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert keeps every element `gemm` reads inside
    // `lhs.values` and `rhs.values` and every element it writes inside
    // `dst.values`, which is borrowed mutably and so aliases neither.
    // Distinct `(i, j)` of `dst` map to distinct elements for the strides
    // used here (row-major or column-major).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.values.as_mut_ptr(),
            dst.col_stride as isize,
            dst.row_stride as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.values.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{device, random, values};
    use burn::nn::PaddingConfig3d;
    use burn::nn::conv::Conv3dConfig;

    /// Largest difference relative to the largest magnitude of `expected`.
    fn relative_error<const D: usize>(got: Tensor<D>, expected: Tensor<D>) -> f32 {
        assert_eq!(got.dims(), expected.dims());
        let (got, expected) = (values(got), values(expected));
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        worst / scale
    }

    #[test]
    fn initialisation_draws_what_burn_conv3d_draws() {
        let device = device();
        device.seed(11);
        let ours = Conv3x3Config::new(5, 7).init(&device).weight.val();
        device.seed(11);
        let burns = Conv3dConfig::new([5, 7], [3, 3, 3])
            .with_bias(false)
            .init(&device)
            .weight
            .val();
        assert_eq!(ours.dims(), [7, 5, 3, 3, 3]);
        assert_eq!(values(ours), values(burns));
    }

    #[test]
    fn forward_and_gradients_match_burn_conv3d() {
        let device = device().autodiff();
        // Uneven sizes and channel counts catch any axis mix-up; the last
        // case spans several tiles.
        for (shape, channels_out) in [
            ([2, 3, 5, 4, 6], 4),
            ([1, 1, 3, 7, 2], 5),
            ([1, 1, 1, 1, 1], 2),
            ([2, 40, 6, 8, 9], 3),
        ] {
            let x = random(shape, &device).require_grad();
            let reference = Conv3dConfig::new([shape[1], channels_out], [3, 3, 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .with_bias(false)
                .init(&device);
            let ours = Conv3x3 {
                weight: Param::from_tensor(reference.weight.val().detach().require_grad()),
            };
            let [b, _, d, h, w] = shape;
            let upstream = random([b, channels_out, d, h, w], &device);

            let y_ours = ours.forward(x.clone());
            let y_burn = reference.forward(x.clone());
            let forward = relative_error(y_ours.clone().inner(), y_burn.clone().inner());

            let grads_ours = (y_ours * upstream.clone()).sum().backward();
            let grads_burn = (y_burn * upstream).sum().backward();
            let dx = relative_error(
                x.grad(&grads_ours).expect("x grad"),
                x.grad(&grads_burn).expect("x grad"),
            );
            let dw = relative_error(
                ours.weight.val().grad(&grads_ours).expect("weight grad"),
                reference
                    .weight
                    .val()
                    .grad(&grads_burn)
                    .expect("weight grad"),
            );
            assert!(
                forward < 1e-5 && dx < 1e-4 && dw < 1e-4,
                "{shape:?} -> {channels_out}: output {forward}, input grad {dx}, weight grad {dw}"
            );
        }
    }

    #[test]
    fn a_burn_conv3d_with_bias_runs_through_the_fast_path_unchanged() {
        let device = device().autodiff();
        let x = random([2, 2, 4, 3, 5], &device).require_grad();
        let upstream = random([2, 1, 4, 3, 5], &device);
        for padding in [PaddingConfig3d::Explicit(1, 1, 1), PaddingConfig3d::Same] {
            let conv = Conv3dConfig::new([2, 1], [3, 3, 3])
                .with_padding(padding)
                .init(&device);
            let ours = conv3d_forward(&conv, x.clone());
            let burns = conv.forward(x.clone());
            assert!(relative_error(ours.clone().inner(), burns.clone().inner()) < 1e-5);
            let grads_ours = (ours * upstream.clone()).sum().backward();
            let grads_burn = (burns * upstream.clone()).sum().backward();
            let bias = conv.bias.as_ref().expect("bias").val();
            let weight = conv.weight.val();
            let errors = [
                relative_error(
                    x.grad(&grads_ours).expect("x grad"),
                    x.grad(&grads_burn).expect("x grad"),
                ),
                relative_error(
                    weight.grad(&grads_ours).expect("weight grad"),
                    weight.grad(&grads_burn).expect("weight grad"),
                ),
                relative_error(
                    bias.grad(&grads_ours).expect("bias grad"),
                    bias.grad(&grads_burn).expect("bias grad"),
                ),
            ];
            assert!(errors.iter().all(|&e| e < 1e-4), "{errors:?}");
        }
    }

    #[test]
    fn flex_tensors_take_the_fast_path() {
        let x = random([1, 2, 3, 3, 3], &device());
        let weight = random([1, 2, 3, 3, 3], &device());
        assert!(flex_pair::<Flex>(&x, &weight).is_some());
        let autodiff = device().autodiff();
        let (xa, wa) = (
            random([1, 2, 3, 3, 3], &autodiff),
            random([1, 2, 3, 3, 3], &autodiff),
        );
        assert!(flex_pair::<Flex>(&xa, &wa).is_none());
        assert!(flex_pair::<Autodiff<Flex, NoCheckpointing>>(&xa, &wa).is_some());
        assert!(flex_pair::<Autodiff<Flex, NoCheckpointing>>(&x, &weight).is_none());
    }

    #[test]
    fn weight_gradient_alone_when_the_input_needs_none() {
        let device = device().autodiff();
        let x = random([2, 1, 6, 5, 4], &device);
        let weight = random([3, 1, 3, 3, 3], &device).require_grad();
        let upstream = random([2, 3, 6, 5, 4], &device);
        let ours = (conv3x3(x.clone(), weight.clone()) * upstream.clone())
            .sum()
            .backward();
        let burns = (burn_conv3x3(x.clone(), weight.clone()) * upstream)
            .sum()
            .backward();
        assert!(x.grad(&ours).is_none());
        let error = relative_error(
            weight.grad(&ours).expect("weight grad"),
            weight.grad(&burns).expect("weight grad"),
        );
        assert!(error < 1e-4, "relative error {error}");
    }

    #[test]
    fn gradients_are_bit_identical_for_any_thread_count() {
        // Enough voxels for many tiles and groups.
        let sizes = Sizes {
            batch: 2,
            channels_in: 3,
            channels_out: 4,
            volume: [40, 24, 32],
        };
        let device = device();
        let n = sizes.voxels();
        let data = |len: usize| values(random([len], &device));
        let x = data(sizes.batch * sizes.channels_in * n);
        let grad = data(sizes.batch * sizes.channels_out * n);
        let weight = data(sizes.channels_out * sizes.channels_in * TAPS);
        assert!(sizes.tiles(9 * 4 + 3 * 3).len() > 4 * GROUP);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool")
                .install(|| backward(&x, &weight, &grad, sizes, [true, true]))
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(run(threads) == one, "{threads} threads differ from one");
        }
    }

    #[test]
    fn without_autodiff_matches_burn_conv3d() {
        let device = device();
        let x = random([2, 6, 4, 5, 3], &device);
        let weight = random([3, 6, 3, 3, 3], &device);
        let error = relative_error(conv3x3(x.clone(), weight.clone()), burn_conv3x3(x, weight));
        assert!(error < 1e-5, "relative error {error}");
    }

    #[test]
    fn a_centre_tap_kernel_copies_and_a_corner_tap_shifts() {
        let device = device();
        let x = random([1, 1, 3, 4, 5], &device);
        let data = values(x.clone());
        let tap = |index: usize| {
            let mut w = vec![0.0f32; TAPS];
            w[index] = 1.0;
            Tensor::<5>::from_data(TensorData::new(w, [1, 1, 3, 3, 3]), &device)
        };
        assert_eq!(values(conv3x3(x.clone(), tap(13))), data);
        // Tap (0, 0, 0) reads voxel (z - 1, y - 1, x - 1), zero at the edges.
        let shifted = values(conv3x3(x, tap(0)));
        for z in 0..3 {
            for y in 0..4 {
                for xx in 0..5 {
                    let expected = if z > 0 && y > 0 && xx > 0 {
                        data[((z - 1) * 4 + y - 1) * 5 + xx - 1]
                    } else {
                        0.0
                    };
                    assert_eq!(shifted[(z * 4 + y) * 5 + xx], expected);
                }
            }
        }
    }
}
