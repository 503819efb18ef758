//! The Iris training loss (the reference's `metrics/losses.py`): adaptive
//! Dice plus binary cross-entropy on logits, weights 1 and 1, computed per
//! class so that a trainer can weight or drop classes.

use burn::prelude::*;
use burn::tensor::activation::sigmoid;

/// Smoothing term of the reference Dice loss.
const DICE_SMOOTH: f32 = 1e-6;

/// Sums each `[B, K]` volume: `[B, K, D, H, W]` to `[B, K]`.
fn sum_volume(x: Tensor<5>) -> Tensor<2> {
    let [b, k, d, h, w] = x.dims();
    x.reshape([b, k, d * h * w]).sum_dim(2).reshape([b, k])
}

/// Adaptive Dice loss per class, `1 - TP / (TP + a FP + (1 - a) FN)` on
/// sigmoid probabilities, where `a = FP / (FP + FN)` clamped to
/// `[0.2, 0.8]` weighs the more frequent error type more (as the reference,
/// `a` is not detached).
///
/// # Shapes
/// - `logits`, `targets`: `[B, K, D, H, W]`, targets in `{0, 1}`
/// - output: `[B, K]`, each in `[0, 1]`
pub fn adaptive_dice_loss(logits: Tensor<5>, targets: Tensor<5>) -> Tensor<2> {
    let p = sigmoid(logits);
    let tp = sum_volume(p.clone() * targets.clone());
    let fp = sum_volume(p.clone() * (targets.clone().neg() + 1.0));
    let fn_ = sum_volume((p.neg() + 1.0) * targets);
    let alpha = (fp.clone() / (fp.clone() + fn_.clone() + DICE_SMOOTH)).clamp(0.2, 0.8);
    let beta = alpha.clone().neg() + 1.0;
    let denominator = tp.clone() + alpha * fp + beta * fn_;
    (tp / (denominator + DICE_SMOOTH)).neg() + 1.0
}

/// Binary cross-entropy on logits, averaged over each class's voxels, in the
/// stable form `max(x, 0) - x t + ln(1 + exp(-|x|))`.
///
/// # Shapes
/// - `logits`, `targets`: `[B, K, D, H, W]`, targets in `[0, 1]`
/// - output: `[B, K]`
pub fn bce_with_logits(logits: Tensor<5>, targets: Tensor<5>) -> Tensor<2> {
    let [_, _, d, h, w] = logits.dims();
    let per_voxel =
        logits.clone().clamp_min(0.0) - logits.clone() * targets + logits.abs().neg().exp().log1p();
    sum_volume(per_voxel) / (d * h * w) as f32
}

/// The training loss: adaptive Dice plus BCE, averaged over batch and
/// classes.
///
/// # Shapes
/// - `logits`, `targets`: `[B, K, D, H, W]`
/// - output: `[1]`
pub fn segmentation_loss(logits: Tensor<5>, targets: Tensor<5>) -> Tensor<1> {
    (adaptive_dice_loss(logits.clone(), targets.clone()) + bce_with_logits(logits, targets)).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{device, random, values};

    fn volume(data: &[f32], device: &Device) -> Tensor<5> {
        Tensor::from_data(
            TensorData::new(data.to_vec(), [1, 1, 1, 1, data.len()]),
            device,
        )
    }

    #[test]
    fn bce_matches_the_definition_and_stays_finite() {
        let device = device();
        let logits = [-100.0f32, -2.0, 0.0, 0.5, 3.0, 100.0];
        let targets = [0.0f32, 1.0, 1.0, 0.0, 1.0, 0.0];
        let got = values(bce_with_logits(
            volume(&logits, &device),
            volume(&targets, &device),
        ))[0];
        let expected = logits
            .iter()
            .zip(targets)
            .map(|(&x, t)| {
                let x = x as f64;
                let p = 1.0 / (1.0 + (-x).exp());
                // -[t ln p + (1 - t) ln(1 - p)], with ln(1 - p) = -x - ln(1 + e^-x).
                let log_p = -(1.0 + (-x).exp()).ln();
                let log_not_p = if x > 30.0 { -x } else { (1.0 - p).ln() };
                -(t as f64 * log_p + (1.0 - t as f64) * log_not_p)
            })
            .sum::<f64>()
            / 6.0;
        assert!((got as f64 - expected).abs() < 1e-4, "{got} vs {expected}");
    }

    #[test]
    fn dice_is_zero_when_right_and_one_when_wrong() {
        let device = device();
        let targets = [1.0f32, 1.0, 0.0, 0.0, 1.0];
        let right: Vec<f32> = targets
            .iter()
            .map(|&t| if t > 0.5 { 50.0 } else { -50.0 })
            .collect();
        let wrong: Vec<f32> = right.iter().map(|x| -x).collect();
        let t = volume(&targets, &device);
        let loss_right = values(adaptive_dice_loss(volume(&right, &device), t.clone()))[0];
        let loss_wrong = values(adaptive_dice_loss(volume(&wrong, &device), t))[0];
        assert!(loss_right < 1e-5, "{loss_right}");
        assert!((loss_wrong - 1.0).abs() < 1e-5, "{loss_wrong}");
    }

    #[test]
    fn dice_uses_the_clamped_adaptive_alpha() {
        let device = device();
        // p = sigmoid(logits) = [0.5, 0.5, 0.5, 0.5]; targets [1, 0, 0, 0]:
        // TP 0.5, FP 1.5, FN 0.5, alpha = 1.5 / 2 = 0.75 (inside the clamp):
        // dice = 0.5 / (0.5 + 0.75 * 1.5 + 0.25 * 0.5) = 0.5 / 1.75.
        let logits = volume(&[0.0; 4], &device);
        let loss = values(adaptive_dice_loss(
            logits.clone(),
            volume(&[1.0, 0.0, 0.0, 0.0], &device),
        ))[0];
        assert!((loss - (1.0 - 0.5 / 1.75)).abs() < 1e-5, "{loss}");
        // Targets [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]: TP 0.5, FP 4.5, FN 0.5,
        // alpha 0.9 clamped to 0.8: dice = 0.5 / (0.5 + 3.6 + 0.1).
        let mut targets = [0.0f32; 10];
        targets[0] = 1.0;
        let loss = values(adaptive_dice_loss(
            volume(&[0.0; 10], &device),
            volume(&targets, &device),
        ))[0];
        assert!((loss - (1.0 - 0.5 / 4.2)).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn loss_is_per_class_and_differentiable() {
        let device = device().autodiff();
        let logits = random([2, 3, 4, 4, 4], &device).require_grad();
        let targets = random([2, 3, 4, 4, 4], &device).greater_elem(0.0).float();
        assert_eq!(
            adaptive_dice_loss(logits.clone(), targets.clone()).dims(),
            [2, 3]
        );
        let loss = segmentation_loss(logits.clone(), targets);
        let grad = logits.grad(&loss.backward()).expect("logits require grad");
        let largest: f32 = grad.abs().max().into_scalar();
        assert!(largest > 0.0 && largest.is_finite());
    }
}
