//! A direct 3x3x3 convolution for tract, where the CPU has AVX-512.
//!
//! tract runs a 3-D convolution as a matrix product over a lazily gathered
//! im2col (issue 20): 12-30 % of this machine's multiply-add peak on the
//! model's shapes. [`substitute`] replaces each convolution the kernel
//! here serves (3x3x3, stride and dilation 1, zero padding 1 on every
//! side, one group, f32, batch 1, constant weights, rows of at least
//! [`MIN_WIDTH`] voxels) with [`DirectConv3d`] before tract optimises the
//! graph; tract keeps every other convolution.
//!
//! For each output row and block of [`BLOCK`] output channels the kernel
//! accumulates `BLOCK x 32` outputs in registers over every input channel
//! and the 27 taps: each tap is two 16-value loads of the input and
//! `2 * BLOCK` fused multiply-adds with the tap's weights broadcast. The
//! zero padding is not copied: taps above, below, in front of or behind
//! the volume are skipped, and the loads at the row's ends are masked. Depth
//! slices run in parallel on the model's thread pool. The sums run in
//! another order than tract's, so results differ from it by rounding only
//! (about 1e-6 relative; the parity tests hold at 1e-4).

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::{format, vec};

use tract_onnx::prelude::tract_itertools::Itertools;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::PaddingSpec;
use tract_onnx::tract_core::ops::cnn::conv::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Output channels one register block computes.
pub(crate) const BLOCK: usize = 8;
/// Output positions along a row one register block computes: two vectors.
const SPAN: usize = 32;
/// Narrowest row the direct kernel takes. Below it the 32-wide register
/// block is half padding and the deep levels have many channels, so each
/// block streams a large weight slice for few outputs: with 16 the
/// full-size decoder took 24.5 s per window, with 32 22.0 s (tract's
/// matrix product runs the narrower levels; `docs/benchmarks.md`).
pub(crate) const MIN_WIDTH: usize = 32;

/// Whether this CPU runs the direct kernel (x86-64 with AVX-512F), unless
/// `IRIS_DIRECT_CONV=0` turns it off (for comparisons with tract's own
/// convolution) when a model's graphs are planned.
pub(crate) fn available() -> bool {
    if std::env::var_os("IRIS_DIRECT_CONV").is_some_and(|v| v == "0") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Replaces every convolution of `model` that [`DirectConv3d`] serves;
/// returns how many. Does nothing where the CPU lacks AVX-512.
pub(crate) fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let Some(op) = DirectConv3d::for_conv(model, node, conv)? else {
            continue;
        };
        let input = node.inputs[0];
        let patch = TypedModelPatch::replace_single_op(model, node, &[input], op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// A 3x3x3 convolution with padding 1, computed directly (see the module
/// docs). Input `[1, Cin, D, H, W]`, output `[1, Cout, D, H, W]`.
#[derive(Debug, Clone)]
pub(crate) struct DirectConv3d {
    input_channels: usize,
    output_channels: usize,
    /// `[Cout / BLOCK (rounded up)][Cin][27][BLOCK]`, zero past `Cout`.
    weights: Arc<Vec<f32>>,
    /// `[Cout]`.
    bias: Arc<Vec<f32>>,
}

/// Two ops are the same when they share their packed weights (tract
/// compares ops to merge equal nodes).
impl PartialEq for DirectConv3d {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && Arc::ptr_eq(&self.bias, &other.bias)
    }
}

impl Eq for DirectConv3d {}

impl DirectConv3d {
    /// The direct form of `conv` (node `node` of `model`), or `None` when
    /// the kernel does not serve it.
    fn for_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Self>> {
        let spec = &conv.pool_spec;
        let unit = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&s| s == 1));
        let padded_by_one = match &spec.padding {
            PaddingSpec::Explicit(before, after) => {
                before.iter().chain(after).all(|&p| p == 1) && before.len() == 3
            }
            _ => false,
        };
        if conv.q_params.is_some()
            || conv.group != 1
            || conv.kernel_fmt != KernelFormat::OIHW
            || spec.data_format != DataFormat::NCHW
            || spec.kernel_shape.as_slice() != [3, 3, 3]
            || !unit(&spec.strides)
            || !unit(&spec.dilations)
            || !padded_by_one
            || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let (cin, cout) = (spec.input_channels, spec.output_channels);
        let input = model.outlet_fact(node.inputs[0])?;
        let shape = input.shape.as_concrete();
        let Some(&[1, c, _, _, w]) = shape else {
            return Ok(None);
        };
        if input.datum_type != f32::datum_type() || c != cin || w < MIN_WIDTH {
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
        let weights = pack(kernel.try_as_plain_ram()?.as_slice::<f32>()?, cin, cout);
        Ok(Some(DirectConv3d {
            input_channels: cin,
            output_channels: cout,
            weights: Arc::new(weights),
            bias: Arc::new(bias),
        }))
    }

    /// The convolution of `input` (`[Cin, D, H, W]`, C order) into `out`
    /// (`[Cout, D, H, W]`).
    fn run(&self, input: &[f32], [d, h, w]: [usize; 3], out: &mut [f32]) {
        let blocks = self.output_channels.div_ceil(BLOCK);
        let out = SharedOut(out.as_mut_ptr());
        let slice = |z: usize| {
            for y in 0..h {
                for block in 0..blocks {
                    // SAFETY: `available()` held when the op was made
                    // (`substitute` makes it only then); `input` is the
                    // op's whole input (checked by `eval`); each
                    // (z, y, block) writes its own outputs, inside `out`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::row_block(self, input, [z, y, block], [d, h, w], out.ptr())
                    };
                }
            }
        };
        match tract_linalg::multithread::current_tract_executor() {
            tract_linalg::multithread::Executor::MultiThread(pool) => {
                use rayon::prelude::*;
                pool.install(|| (0..d).into_par_iter().for_each(slice));
            }
            _ => (0..d).for_each(slice),
        }
    }
}

/// The output buffer, shared by the threads that write disjoint parts.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
impl SharedOut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the threads write disjoint outputs (see `DirectConv3d::run`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// `[Cout, Cin, 3, 3, 3]` weights as `[Cout / BLOCK][Cin][27][BLOCK]`.
fn pack(kernel: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut packed = vec![0.0; cout.div_ceil(BLOCK) * BLOCK * cin * 27];
    for (co, ci, tap) in (0..cout)
        .cartesian_product(0..cin)
        .cartesian_product(0..27)
        .map(|((co, ci), tap)| (co, ci, tap))
    {
        packed[(((co / BLOCK) * cin + ci) * 27 + tap) * BLOCK + co % BLOCK] =
            kernel[(co * cin + ci) * 27 + tap];
    }
    packed
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, DirectConv3d, SPAN};

    /// Output row `y` of depth slice `z` for output channels
    /// `block * BLOCK ..`, written into `out` (`[Cout, D, H, W]`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `z < D`, `y < H`, `block` is a block of the
    /// op's output channels, `input` holds `Cin * D * H * W` values and
    /// `out` holds `Cout * D * H * W`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_block(
        op: &DirectConv3d,
        input: &[f32],
        [z, y, block]: [usize; 3],
        [d, h, w]: [usize; 3],
        out: *mut f32,
    ) {
        let cin = op.input_channels;
        let channels = (op.output_channels - block * BLOCK).min(BLOCK);
        let weights = &op.weights[block * cin * 27 * BLOCK..][..cin * 27 * BLOCK];
        // The input rows each tap row reads: (dz, dy) with its row index
        // (z + dz - 1, y + dy - 1) inside the volume; the others are padding.
        let mut rows = [(0, 0); 9];
        let mut count = 0;
        for (dz, dy) in (0..9).map(|t| (t / 3, t % 3)) {
            if (1..=d).contains(&(z + dz)) && (1..=h).contains(&(y + dy)) {
                rows[count] = (dz * 3 + dy, ((z + dz - 1) * h + (y + dy - 1)) * w);
                count += 1;
            }
        }
        let rows = &rows[..count];
        let mut x0 = 0;
        while x0 < w {
            // Lane i of vector v reads x = x0 + 16 v + i + dx - 1 for tap dx;
            // the masks keep the x inside [0, w).
            let masks: [[__mmask16; 2]; 3] =
                core::array::from_fn(|dx| core::array::from_fn(|v| inside(x0 + 16 * v + dx, w)));
            let mut acc = [[_mm512_setzero_ps(); 2]; BLOCK];
            for (o, acc) in acc.iter_mut().enumerate().take(channels) {
                *acc = [_mm512_set1_ps(op.bias[block * BLOCK + o]); 2];
            }
            for (ci, taps) in weights.chunks_exact(27 * BLOCK).enumerate() {
                let channel = &input[ci * d * h * w..][..d * h * w];
                for &(tap_row, start) in rows {
                    let line = &channel[start..start + w];
                    for (dx, masks) in masks.iter().enumerate() {
                        let tap = &taps[(tap_row * 3 + dx) * BLOCK..][..BLOCK];
                        // The first lane reads x0 + dx - 1, which is -1 at
                        // the row's start: a wrapping pointer, whose lanes
                        // outside the row the masks never load.
                        let p = line.as_ptr().wrapping_add(x0 + dx).wrapping_sub(1);
                        // SAFETY: the masks load only lanes whose x is in
                        // [0, w), inside `line`; masked lanes are not read.
                        let (v0, v1) = unsafe {
                            (
                                _mm512_maskz_loadu_ps(masks[0], p),
                                _mm512_maskz_loadu_ps(masks[1], p.wrapping_add(16)),
                            )
                        };
                        for (acc, &weight) in acc.iter_mut().zip(tap) {
                            let weight = _mm512_set1_ps(weight);
                            acc[0] = _mm512_fmadd_ps(weight, v0, acc[0]);
                            acc[1] = _mm512_fmadd_ps(weight, v1, acc[1]);
                        }
                    }
                }
            }
            // Store the first `w - x0` positions (up to 32).
            let left = (w - x0).min(SPAN);
            let masks = [lanes(left.min(16)), lanes(left.saturating_sub(16))];
            for (o, acc) in acc.iter().enumerate().take(channels) {
                let co = block * BLOCK + o;
                // SAFETY: the row `(co, z, y)` of `out` starts here and
                // holds `w` values; the masks store only `left` of them
                // from `x0`.
                unsafe {
                    let dst = out.add(((co * d + z) * h + y) * w + x0);
                    _mm512_mask_storeu_ps(dst, masks[0], acc[0]);
                    _mm512_mask_storeu_ps(dst.add(16), masks[1], acc[1]);
                }
            }
            x0 += SPAN;
        }
    }

    /// The lanes `i` of a 16-lane vector whose `x = first + i - 1` is in
    /// `[0, w)`.
    fn inside(first: usize, w: usize) -> __mmask16 {
        (0..16)
            .filter(|&i| (1..=w).contains(&(first + i)))
            .fold(0, |mask, i| mask | (1 << i))
    }

    /// A mask of the first `n` (at most 16) lanes.
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
}

impl Op for DirectConv3d {
    fn name(&self) -> StaticName {
        "IrisDirectConv3x3x3".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels",
            self.input_channels, self.output_channels
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv3d {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let &[1, c, d, h, w] = input.shape() else {
            bail!(
                "direct convolution: input shape {:?}, expected [1, C, D, H, W]",
                input.shape()
            );
        };
        ensure!(
            c == self.input_channels,
            "direct convolution: {c} input channels, expected {}",
            self.input_channels
        );
        let values = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut out = vec![0.0f32; self.output_channels * d * h * w];
        self.run(values, [d, h, w], &mut out);
        let shape = [1, self.output_channels, d, h, w];
        Ok(tvec!(
            tract_ndarray::Array::from_shape_vec(shape.as_slice(), out)?.into_tvalue()
        ))
    }
}

impl TypedOp for DirectConv3d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.clone();
        shape.set(1, self.output_channels.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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

    #[test]
    fn direct_equals_the_definition_on_every_block_and_tail() {
        if !available() {
            std::println!("skipped: this CPU has no AVX-512F, the direct kernel is not used");
            return;
        }
        // Output channels below, at and past a block; rows of one block,
        // with a tail, and of several; one to five input channels.
        let cases: [([usize; 2], [usize; 3]); 6] = [
            ([1, 1], [3, 4, 16]),
            ([2, 1], [2, 3, 20]),
            ([3, 12], [3, 2, 33]),
            ([5, 8], [2, 2, 48]),
            ([4, 9], [1, 3, 64]),
            ([2, 16], [4, 1, 100]),
        ];
        for (i, ([cin, cout], shape)) in cases.into_iter().enumerate() {
            let voxels: usize = shape.iter().product();
            let input = values(cin * voxels, 3 * i as u64);
            let kernel = values(cout * cin * 27, 3 * i as u64 + 1);
            let bias = values(cout, 3 * i as u64 + 2);
            let op = DirectConv3d {
                input_channels: cin,
                output_channels: cout,
                weights: Arc::new(pack(&kernel, cin, cout)),
                bias: Arc::new(bias.clone()),
            };
            let mut out = vec![f32::NAN; cout * voxels];
            op.run(&input, shape, &mut out);
            let expected = reference(&input, &kernel, &bias, [cin, cout], shape);
            for (j, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "case {i} ({cin} -> {cout}, {shape:?}), value {j}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_shipped_model_runs_its_wide_convolutions_direct() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/iris-tiny");
        let model = crate::engine::Model::load(&dir).expect("models/iris-tiny loads");
        for graph in [&model.encoder, &model.decoder] {
            let plan = graph.plan(1, &model.executor).expect("plans");
            let direct = plan
                .model()
                .nodes()
                .iter()
                .filter(|n| n.op().name() == "IrisDirectConv3x3x3")
                .count();
            // Where the kernel runs, the full-resolution level (32^3, the
            // only one at least MIN_WIDTH wide) has its convolutions direct.
            if available() {
                assert!(direct >= 2, "{direct} direct convolutions");
            } else {
                assert_eq!(direct, 0);
            }
        }
    }
}
