//! Synthetic contrast in the spirit of SynthSeg (Billot et al., 2023): an
//! image drawn from a label map alone, so that the network learns shapes,
//! not one scanner's intensities.
//!
//! Every label (background included) gets a random mean in `[0, 1]` and a
//! random standard deviation; each voxel is drawn from its label's
//! Gaussian; the image is multiplied by a smooth random bias field
//! `exp(b)`, `b` a coarse Gaussian grid upsampled trilinearly. The head
//! layers ([`SHELL_LABELS`]) sometimes take the background's intensities,
//! as in a skull-stripped scan. Blur, gamma,
//! normalisation, contrast, brightness and noise follow in
//! [`augment_intensity`](super::augment::augment_intensity).

use ndarray::{Array3, Zip};
use rand::{Rng, RngExt};
use rand_distr::StandardNormal;

use super::atlas::SHELL_LABELS;
use super::augment::{smooth_field, uniform};
use super::{Error, Result};

/// Ranges of the synthetic image model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// Range of each label's mean intensity. Default `[0, 1]`.
    pub mean: [f32; 2],
    /// Range of each label's standard deviation. Default `[0, 0.1]`.
    pub std: [f32; 2],
    /// Standard deviation of the log bias field. Default 0.3.
    pub bias_std: f32,
    /// Control points per axis of the bias field (>= 2). Default 4.
    pub bias_grid: usize,
    /// Probability that the head layers ([`SHELL_LABELS`]) look like
    /// background, as in a skull-stripped scan. Default 0.3.
    pub strip_probability: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            mean: [0.0, 1.0],
            std: [0.0, 0.1],
            bias_std: 0.3,
            bias_grid: 4,
            strip_probability: 0.3,
        }
    }
}

impl SynthConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::Core`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, [lo, hi]) in [("synth.mean", self.mean), ("synth.std", self.std)] {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) || (name == "synth.std" && lo < 0.0)
            {
                return Err(Error::invalid(
                    name,
                    format!("[{lo}, {hi}] must be an increasing range (std >= 0)"),
                ));
            }
        }
        if !(self.bias_std.is_finite() && self.bias_std >= 0.0) {
            return Err(Error::invalid(
                "synth.bias_std",
                format!("{} must be >= 0", self.bias_std),
            ));
        }
        if !(0.0..=1.0).contains(&self.strip_probability) {
            return Err(Error::invalid(
                "synth.strip_probability",
                format!("{} is not a probability", self.strip_probability),
            ));
        }
        if self.bias_grid < 2 {
            return Err(Error::invalid(
                "synth.bias_grid",
                format!("{} must be at least 2", self.bias_grid),
            ));
        }
        Ok(())
    }
}

/// Draws a synthetic image `[D, H, W]` (same shape as `labels`, values
/// roughly in `[0, 1.5]`, not normalised) from a label map.
///
/// # Errors
/// [`Error::Core`] for an invalid `config` or an empty label map.
pub fn synthesize(
    labels: &Array3<u16>,
    rng: &mut impl Rng,
    config: &SynthConfig,
) -> Result<Array3<f32>> {
    config.validate()?;
    if labels.is_empty() {
        return Err(Error::invalid("labels", "empty label map"));
    }
    // One (mean, std) per label present, drawn in increasing label order.
    let mut present = vec![false; usize::from(u16::MAX) + 1];
    labels.iter().for_each(|&l| present[usize::from(l)] = true);
    let mut table = vec![(0.0f32, 0.0f32); present.len()];
    for (entry, _) in table.iter_mut().zip(&present).filter(|(_, p)| **p) {
        let mean = uniform(rng, config.mean[0], config.mean[1]);
        *entry = (mean, uniform(rng, config.std[0], config.std[1]));
    }
    if rng.random_bool(config.strip_probability) {
        for shell in SHELL_LABELS {
            table[usize::from(shell)] = table[0];
        }
    }
    let (d, h, w) = labels.dim();
    let bias = if config.bias_std > 0.0 {
        let mut b = smooth_field(rng, [config.bias_grid; 3], [d, h, w], config.bias_std)?;
        b.mapv_inplace(f32::exp);
        Some(b)
    } else {
        None
    };
    let mut image = Array3::zeros((d, h, w));
    Zip::from(&mut image).and(labels).for_each(|v, &l| {
        let (mean, std) = table[usize::from(l)];
        *v = mean + std * rng.sample::<f32, _>(StandardNormal);
    });
    if let Some(b) = bias {
        image *= &b;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    #[test]
    fn labels_get_their_own_gaussian() {
        let labels = Array3::from_shape_fn((20, 20, 20), |(d, _, _)| u16::from(d >= 10) * 3);
        let config = SynthConfig {
            bias_std: 0.0,
            ..SynthConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let image = synthesize(&labels, &mut rng, &config).unwrap();
        let mean = |lo: usize, hi: usize| image.slice(ndarray::s![lo..hi, .., ..]).mean().unwrap();
        let (a, b) = (mean(0, 10), mean(10, 20));
        // Means come from the table drawn first: label 0, then label 3 (the
        // labels present, in order).
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let table: Vec<f32> = (0..2)
            .map(|_| {
                let m = uniform(&mut rng, 0.0f32, 1.0);
                uniform(&mut rng, 0.0f32, 0.1);
                m
            })
            .collect();
        assert!((a - table[0]).abs() < 0.01, "{a} vs {}", table[0]);
        assert!((b - table[1]).abs() < 0.01, "{b} vs {}", table[1]);
    }

    #[test]
    fn stripped_head_layers_look_like_background() {
        let labels = Array3::from_shape_fn(
            (20, 8, 8),
            |(d, _, _)| if d < 10 { 0 } else { SHELL_LABELS[1] },
        );
        let half_means = |strip: f64| {
            let config = SynthConfig {
                bias_std: 0.0,
                std: [0.0, 0.0],
                strip_probability: strip,
                ..SynthConfig::default()
            };
            let image = synthesize(&labels, &mut ChaCha8Rng::seed_from_u64(4), &config).unwrap();
            (image[[0, 0, 0]], image[[19, 0, 0]])
        };
        let (bg, shell) = half_means(1.0);
        assert_eq!(bg, shell);
        let (bg, shell) = half_means(0.0);
        assert_ne!(bg, shell);
    }

    #[test]
    fn bias_field_is_positive_and_smooth() {
        let labels = Array3::zeros((16, 16, 16));
        let config = SynthConfig {
            mean: [1.0, 1.0],
            std: [0.0, 0.0],
            ..SynthConfig::default()
        };
        let image = synthesize(&labels, &mut ChaCha8Rng::seed_from_u64(2), &config).unwrap();
        assert!(image.iter().all(|&v| v > 0.0));
        // Neighbouring voxels differ by far less than the field's range.
        let step = (0..15)
            .map(|i| (image[[i + 1, 8, 8]] - image[[i, 8, 8]]).abs())
            .fold(0.0, f32::max);
        let range = image.iter().fold(0.0f32, |m, &v| m.max(v))
            - image.iter().fold(f32::MAX, |m, &v| m.min(v));
        assert!(step < range / 3.0, "step {step}, range {range}");
    }
}
