//! The task encoder's merges of a class's mask, as one op.
//!
//! Each level of the task encoder's context path merges the mask into the
//! features' part with an instance norm, a ReLU and a one-channel 3x3x3
//! convolution of the mask's own, plus that part (the merge unit split by
//! input channel, session 21); the norm has no parameters, so the levels
//! share it. As the engine's separate ops the norm read the mask three
//! times and wrote it normalised, and each level's convolution read that
//! again: about 104 MB of memory traffic a class at the full size,
//! 12.0-13.6 ms (issue 20). [`NormedMerges`] takes the mask's statistics,
//! then for each output row gathers the mask's rows normalised as it
//! copies them for the direct kernel ([`DirectConv3d::rows`]) and runs
//! every level's convolution on them, each adding its own part: the
//! normalised mask is never written (7.9-10.4 ms). [`replacement`] finds a
//! norm with its ReLU whose readers, two or more, are all such
//! convolutions.

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::{format, vec};

use tract_onnx::tract_core::internal::*;

use super::conv3d::DirectConv3d;
use super::graphs::constant_f32;
use super::instance_norm::InstanceNorm;
use super::parallel::SharedOut;

/// What [`replacement`] finds.
pub(crate) struct Found {
    pub op: NormedMerges,
    /// The op's inputs: the norm's input, then each convolution's residual.
    pub inputs: Vec<OutletId>,
    /// The convolutions' nodes, whose outputs the op's stand for, in order.
    pub convs: Vec<usize>,
}

/// [`NormedMerges`] for `node` where it is an instance norm with its ReLU
/// (constant scale and bias) of a one-channel f32 volume whose readers,
/// two or more, are all direct one-channel convolutions that add a
/// residual, reading it first (the class's mask, which every level
/// merges).
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Found>> {
    let Some(norm) = node.op_as::<InstanceNorm>() else {
        return Ok(None);
    };
    let input = model.outlet_fact(node.inputs[0])?;
    let one_channel = matches!(input.shape.as_concrete(), Some(&[_, 1, _, _, _]))
        && input.datum_type == f32::datum_type();
    let (Some(scale), Some(bias)) = (
        constant_f32(model, node.inputs[1]),
        constant_f32(model, node.inputs[2]),
    ) else {
        return Ok(None);
    };
    // With one reader, the norm runs in place and the op would only move
    // its pass into the convolution's row copies (three per row).
    let readers = model.outlet_successors(OutletId::new(node.id, 0));
    if !norm.has_relu() || !one_channel || readers.len() < 2 {
        return Ok(None);
    }
    let mut convs = Vec::new();
    let mut inputs = vec![node.inputs[0]];
    let mut nodes = Vec::new();
    for reader in readers {
        let conv_node = model.node(reader.node);
        let Some(conv) = conv_node.op_as::<DirectConv3d>() else {
            return Ok(None);
        };
        if reader.slot != 0 || !conv.is_one_channel_with_residual() || conv_node.inputs.len() != 2 {
            return Ok(None);
        }
        convs.push(conv.clone());
        inputs.push(conv_node.inputs[1]);
        nodes.push(conv_node.id);
    }
    let op = NormedMerges {
        norm: norm.clone(),
        scale_bias: (scale, bias),
        convs: Arc::new(convs),
    };
    Ok(Some(Found {
        op,
        inputs,
        convs: nodes,
    }))
}

/// `y_l = conv_l(relu(norm(x))) + r_l` for each of its convolutions `l`,
/// with `x` a one-channel volume (`[N, 1, D, H, W]`), `norm` its instance
/// norm (each sample's statistics) and `conv_l` a one-channel 3x3x3
/// convolution with zero padding. Inputs: `x`, then each `r_l` (of `x`'s
/// shape); outputs: each `y_l`.
#[derive(Debug, Clone)]
pub(crate) struct NormedMerges {
    norm: InstanceNorm,
    /// The norm's scale and bias.
    scale_bias: (f32, f32),
    convs: Arc<Vec<DirectConv3d>>,
}

/// Two ops are the same when they share their convolutions.
impl PartialEq for NormedMerges {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.convs, &other.convs)
    }
}

impl Eq for NormedMerges {}

impl Op for NormedMerges {
    fn name(&self) -> StaticName {
        "IrisNormedMerges".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "norm, ReLU, {} one-channel convolutions",
            self.convs.len()
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for NormedMerges {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 1 + self.convs.len(),
            "normed merges: {} inputs, expected {}",
            inputs.len(),
            1 + self.convs.len()
        );
        let x = &inputs[0];
        let shape = x.shape();
        let &[_, 1, d, h, w] = shape else {
            bail!("normed merges: input {shape:?}, expected [N, 1, D, H, W]");
        };
        for r in &inputs[1..] {
            ensure!(
                r.shape() == shape && r.datum_type() == f32::datum_type(),
                "normed merges: residual {:?} {:?}, expected f32 {shape:?}",
                r.datum_type(),
                r.shape()
            );
        }
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let residuals = inputs[1..]
            .iter()
            .map(|r| r.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let residuals = residuals
            .iter()
            .map(|r| r.as_slice::<f32>())
            .collect::<TractResult<Vec<&[f32]>>>()?;
        let shapes = self.convs.iter().map(|_| shape);
        let write = |outs: &mut [&mut [f32]]| {
            let voxels = d * h * w;
            let (scale, bias) = self.scale_bias;
            for (sample, x) in x.chunks_exact(voxels).enumerate() {
                let at = sample * voxels;
                let norm = [self.norm.plane(scale, bias).affine(x).single()];
                let samples: Vec<(SharedOut, &[f32])> = outs
                    .iter_mut()
                    .zip(&residuals)
                    .map(|(out, r)| (SharedOut::new(&mut out[at..][..voxels]), &r[at..][..voxels]))
                    .collect();
                let slice = |rows: &mut super::conv3d::Rows, z: usize| {
                    for y in 0..h {
                        rows.gather(x, [z, y], [d, h, w], Some(&norm));
                        for (conv, &(out, residual)) in self.convs.iter().zip(&samples) {
                            // SAFETY: `rows` holds the rows of (z, y), made
                            // by this convolution's kind (every one of them
                            // one channel to one, `replacement`); the
                            // output and the residual hold the sample's `D
                            // * H * W` values, and only this (z, y) writes
                            // its row.
                            unsafe { conv.row(rows, [z, y], [d, h, w], (out, residual.as_ptr())) };
                        }
                    }
                };
                super::parallel::for_each_with(d, || self.convs[0].rows(w), slice);
            }
            Ok(())
        };
        // SAFETY: every row of every output is written above.
        unsafe { super::parallel::written(shapes, write) }
    }
}

impl TypedOp for NormedMerges {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(self
            .convs
            .iter()
            .map(|_| inputs[0].without_value())
            .collect())
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merges_equal_a_norm_then_each_convolution() {
        if !super::super::conv3d::available() {
            std::println!("skipped: this CPU has no AVX-512F, the op is not used");
            return;
        }
        let draw = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.4)
                .collect()
        };
        // Two samples, sides with a rest past the kernel's vectors, two
        // convolutions (each with its own weights, bias and residual).
        let (n, [d, h, w]) = (2usize, [3usize, 4usize, 21usize]);
        let voxels = d * h * w;
        let x = draw(n * voxels, 1);
        let kernels = [draw(27, 2), draw(27, 3)];
        let biases = [0.25f32, -0.5];
        let residuals = [draw(n * voxels, 4), draw(n * voxels, 5)];
        let (scale, shift) = (1.5f32, 0.1f32);
        let convs = kernels
            .iter()
            .zip(biases)
            .map(|(k, b)| DirectConv3d::one_channel(k, b).adding_residual())
            .collect();
        let op = NormedMerges {
            norm: InstanceNorm::with_relu(1e-5),
            scale_bias: (scale, shift),
            convs: Arc::new(convs),
        };
        let shape = [n, 1, d, h, w];
        let mut inputs = tvec!(Tensor::from_shape(&shape, &x).expect("x").into_tvalue());
        for r in &residuals {
            inputs.push(Tensor::from_shape(&shape, r).expect("r").into_tvalue());
        }
        let got = op.eval(&EvalContext::out_of_plan(), inputs).expect("runs");
        assert_eq!(got.len(), 2);
        for (l, got) in got.iter().enumerate() {
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for (sample, x) in x.chunks_exact(voxels).enumerate() {
                let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / voxels as f64;
                let var = x
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / voxels as f64;
                let normed = |z: isize, y: isize, v: isize| -> f64 {
                    let inside = (0..d as isize).contains(&z)
                        && (0..h as isize).contains(&y)
                        && (0..w as isize).contains(&v);
                    if !inside {
                        return 0.0;
                    }
                    let value = f64::from(x[((z as usize * h) + y as usize) * w + v as usize]);
                    ((value - mean) / (var + 1e-5).sqrt() * f64::from(scale) + f64::from(shift))
                        .max(0.0)
                };
                for (i, (z, y, v)) in (0..d)
                    .flat_map(|z| (0..h).flat_map(move |y| (0..w).map(move |v| (z, y, v))))
                    .enumerate()
                {
                    let mut want =
                        f64::from(biases[l]) + f64::from(residuals[l][sample * voxels + i]);
                    for (tap, &weight) in kernels[l].iter().enumerate() {
                        let (dz, dy, dv) = (tap / 9, tap / 3 % 3, tap % 3);
                        want += f64::from(weight)
                            * normed(
                                z as isize + dz as isize - 1,
                                y as isize + dy as isize - 1,
                                v as isize + dv as isize - 1,
                            );
                    }
                    let found = f64::from(got[sample * voxels + i]);
                    assert!(
                        (found - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "convolution {l}, sample {sample}, voxel {i}: {found} vs {want}"
                    );
                }
            }
        }
    }
}
